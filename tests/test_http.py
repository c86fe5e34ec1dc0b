"""curl-style requests to Triton's generate and generate_stream endpoints."""

import json

import pytest
import requests
from helpers import MODEL, sse_events

GREEDY = {"max_tokens": 12, "temperature": 0}


def stream(url, body) -> list[dict]:
    with requests.post(url.replace("/generate", "/generate_stream"), json=body, stream=True, timeout=120) as resp:
        assert resp.status_code == 200, resp.text
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return sse_events(resp)


def test_generate_returns_prompt_and_continuation(generate_url):
    resp = requests.post(generate_url, json={"text_input": "Hello world", "parameters": GREEDY}, timeout=120)
    assert resp.status_code == 200
    body = resp.json()
    assert body["model_name"] == MODEL
    assert body["text_output"].startswith("Hello world")
    assert len(body["text_output"]) > len("Hello world")


def test_generate_reports_counts_and_finish_reason(generate_url):
    body = {
        "text_input": "Hello world",
        "exclude_input_in_output": True,
        "return_finish_reason": True,
        "return_num_input_tokens": True,
        "return_num_output_tokens": True,
        "parameters": {"max_tokens": 7, "temperature": 0, "ignore_eos": True},
    }
    out = requests.post(generate_url, json=body, timeout=120).json()
    assert out["finish_reason"] == "length"
    assert out["num_output_tokens"] == 7
    assert out["num_input_tokens"] == 2  # "Hello" and " world" are single tokens of the tiny model
    assert not out["text_output"].startswith("Hello")


def test_sampling_parameters_input_works_like_request_parameters(generate_url):
    as_params = requests.post(generate_url, json={"text_input": "The sea", "parameters": GREEDY}, timeout=120)
    as_input = requests.post(generate_url, json={"text_input": "The sea", "sampling_parameters": json.dumps(GREEDY)}, timeout=120)
    assert as_params.json()["text_output"] == as_input.json()["text_output"]


def test_default_max_tokens_is_not_vllms_16(generate_url):
    body = {
        "text_input": "Hi",
        "exclude_input_in_output": True,
        "return_num_output_tokens": True,
        "parameters": {"temperature": 0, "ignore_eos": True},
    }
    out = requests.post(generate_url, json=body, timeout=300).json()
    assert out["num_output_tokens"] > 16


def test_stream_sends_deltas_that_add_up_to_the_whole_answer(generate_url):
    events = stream(generate_url, {"text_input": "Once upon a time", "stream": True, "parameters": GREEDY})
    assert len(events) >= 2
    whole = requests.post(
        generate_url,
        json={"text_input": "Once upon a time", "exclude_input_in_output": True, "parameters": GREEDY},
        timeout=120,
    ).json()["text_output"]
    assert "".join(e["text_output"] for e in events) == whole


def test_stream_counts_each_delta(generate_url):
    body = {
        "text_input": "Count",
        "stream": True,
        "return_num_output_tokens": True,
        "return_finish_reason": True,
        "parameters": {"max_tokens": 5, "temperature": 0, "ignore_eos": True},
    }
    events = stream(generate_url, body)
    assert sum(e["num_output_tokens"] for e in events) == 5
    assert events[-1]["finish_reason"] == "length"


def test_stop_string_ends_generation_with_reason_stop(generate_url):
    body = {"text_input": "Hello", "exclude_input_in_output": True, "parameters": GREEDY}
    text = requests.post(generate_url, json=body, timeout=120).json()["text_output"]
    stop = text[len(text) // 2 :][:3]
    body["return_finish_reason"] = True
    body["parameters"] = {**GREEDY, "stop": stop}  # a string here: Triton parameters cannot be lists
    out = requests.post(generate_url, json=body, timeout=120).json()
    assert out["finish_reason"] == "stop"
    assert stop not in out["text_output"]
    assert text.startswith(out["text_output"]) and len(out["text_output"]) < len(text)


def test_list_valued_parameters_go_through_sampling_parameters(generate_url):
    params = {**GREEDY, "stop": ["@@a@@", "@@b@@"], "stop_token_ids": [0]}
    body = {"text_input": "Hello", "sampling_parameters": json.dumps(params)}
    assert requests.post(generate_url, json=body, timeout=120).status_code == 200


@pytest.mark.parametrize(
    "body, message",
    [
        ({"parameters": {"max_tokens": 3}}, "text_input is required"),
        ({"text_input": "Hi", "parameters": {"foo": 1}}, "unknown sampling parameter 'foo'"),
        ({"text_input": "Hi", "parameters": {"temperature": "hot"}}, "'temperature' has value 'hot'; expected float"),
        ({"text_input": "Hi", "parameters": {"max_tokens": "ten"}}, "'max_tokens' has value 'ten'"),
        ({"text_input": "Hi", "parameters": {"max_tokens": -1}}, "max_tokens must be at least 1"),
        ({"text_input": "Hi", "sampling_parameters": "{not json"}, "sampling_parameters is not valid JSON"),
        ({"text_input": "Hi", "sampling_parameters": "[1, 2]"}, "sampling_parameters must be a JSON object"),
        ({"text_input": "Hi", "stream": True, "exclude_input_in_output": False}, "cannot be combined with stream=true"),
    ],
)
def test_bad_request_gets_400_naming_the_problem(generate_url, body, message):
    resp = requests.post(generate_url, json=body, timeout=60)
    assert resp.status_code == 400
    assert message in resp.json()["error"]


def test_bad_request_on_stream_endpoint_gets_an_error_event(generate_url):
    with requests.post(
        generate_url.replace("/generate", "/generate_stream"),
        json={"text_input": "Hi", "stream": True, "parameters": {"top_p": 7}},
        stream=True,
        timeout=60,
    ) as resp:
        text = resp.text
    assert "top_p must be in (0, 1]" in text


def test_server_keeps_serving_after_bad_requests(generate_url, server):
    for _ in range(3):
        requests.post(generate_url, json={"text_input": "Hi", "parameters": {"nope": 1}}, timeout=60)
    assert requests.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200
    ok = requests.post(generate_url, json={"text_input": "Hi", "parameters": GREEDY}, timeout=120)
    assert ok.status_code == 200
