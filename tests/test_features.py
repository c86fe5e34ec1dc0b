"""Model features beyond plain generation: extra outputs, n, structured output,
chat messages, metrics, request ids, priorities and LoRA errors."""

import itertools
import json
import math
import time

import pytest
import requests
from helpers import metrics, sse_events


def generate(url, **body):
    return requests.post(url, json=body, timeout=120)


def test_logprobs_and_cumulative_logprob_agree(generate_url):
    out = generate(
        generate_url,
        text_input="Hello world",
        return_logprobs=True,
        return_cumulative_logprob=True,
        return_num_output_tokens=True,
        sampling_parameters=json.dumps({"max_tokens": 5, "temperature": 0, "logprobs": 2, "ignore_eos": True}),
    ).json()
    steps = json.loads(out["logprobs"])
    assert len(steps) == out["num_output_tokens"] == 5
    chosen = [step["candidates"][str(step["token_id"])] for step in steps]
    assert all(c["rank"] == 1 for c in chosen)  # greedy picks the most likely token
    assert all(len(step["candidates"]) >= 2 for step in steps)
    assert math.isclose(sum(c["logprob"] for c in chosen), out["cumulative_logprob"], rel_tol=1e-3, abs_tol=1e-3)


def test_cumulative_logprob_is_real_without_per_token_logprobs(generate_url):
    body = {
        "text_input": "Hello world",
        "stream": True,
        "return_cumulative_logprob": True,
        "return_logprobs": True,
        "sampling_parameters": json.dumps({"max_tokens": 8, "temperature": 0, "ignore_eos": True}),
    }
    events = sse_events(requests.post(f"{generate_url}_stream", json=body, stream=True, timeout=120))
    totals = [event["cumulative_logprob"] for event in events]
    assert len(totals) >= 2
    assert totals[0] < 0
    assert all(later < earlier for earlier, later in itertools.pairwise(totals)), totals
    assert all(event["logprobs"] == "null" for event in events)  # not asked for: not returned


def test_n_returns_one_element_per_sequence(generate_url):
    out = generate(
        generate_url,
        text_input="Once",
        exclude_input_in_output=True,
        return_num_output_tokens=True,
        sampling_parameters=json.dumps({"n": 3, "max_tokens": 4, "temperature": 1.0, "seed": 1, "ignore_eos": True}),
    ).json()
    assert isinstance(out["text_output"], list) and len(out["text_output"]) == 3
    assert out["num_output_tokens"] == [4, 4, 4]


def test_guided_choice_answers_one_of_the_choices(generate_url):
    out = generate(
        generate_url,
        text_input="Is the sky blue?",
        exclude_input_in_output=True,
        sampling_parameters=json.dumps({"guided_choice": ["yes", "no"], "max_tokens": 8}),
    )
    assert out.status_code == 200, out.text
    assert out.json()["text_output"] in ("yes", "no")


def test_guided_regex_and_json_schema(generate_url):
    regex = generate(
        generate_url,
        text_input="A number:",
        exclude_input_in_output=True,
        sampling_parameters=json.dumps({"structured_outputs": {"regex": "[0-9]{3}"}, "max_tokens": 8}),
    ).json()["text_output"]
    assert len(regex) == 3 and regex.isdigit()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    text = generate(
        generate_url,
        text_input="JSON:",
        exclude_input_in_output=True,
        sampling_parameters=json.dumps(
            {"guided_json": schema, "structured_outputs": {"disable_any_whitespace": True}, "max_tokens": 64}
        ),
    ).json()["text_output"]
    assert isinstance(json.loads(text)["ok"], bool)


def test_messages_are_formatted_with_the_chat_template(generate_url):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = generate(
        generate_url,
        messages=json.dumps(messages),
        return_num_input_tokens=True,
        parameters={"max_tokens": 2},
    ).json()
    assert out["text_output"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>")
    assert "<|im_start|>assistant\n" in out["text_output"]


@pytest.mark.parametrize(
    "messages, message",
    [
        ("not json", "messages is not valid JSON"),
        ("[]", "messages must be a non-empty JSON list"),
        ('[{"role": "user"}]', "messages[0] must be an object with string fields role and content"),
        ('[{"role": "robot", "content": "hi"}]', "messages[0].role must be system, user or assistant"),
    ],
)
def test_bad_messages_are_rejected(generate_url, messages, message):
    resp = generate(generate_url, messages=messages)
    assert resp.status_code == 400
    assert message in resp.json()["error"]


def test_priority_without_priority_scheduling_is_a_clear_error(generate_url):
    resp = generate(generate_url, text_input="Hi", parameters={"priority": 1, "max_tokens": 2})
    assert resp.status_code == 400
    assert "priority" in resp.json()["error"].lower()


def test_lora_name_without_lora_enabled_is_rejected(generate_url):
    resp = generate(generate_url, text_input="Hi", parameters={"lora_name": "doc-writer"})
    assert resp.status_code == 400
    assert "LoRA is not enabled" in resp.json()["error"]


def test_request_id_is_accepted_and_names_the_request_in_the_log(server, generate_url):
    assert generate(generate_url, id="req-41-ok", text_input="Hi", parameters={"max_tokens": 3}).status_code == 200
    resp = generate(generate_url, id="req-42-abc", text_input="Hi", parameters={"max_tokens": 3, "min_p": 7})
    assert resp.status_code == 400
    assert "min_p" in resp.json()["error"]
    deadline = time.monotonic() + 10
    while "req-42-abc" not in server.log_file.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "req-42-abc" in server.log_file.read_text()


def test_metrics_move_by_the_right_amounts(server, generate_url):
    time.sleep(1.0)  # let earlier tests' figures be published (every 0.25 s)
    before = metrics(server)
    out = generate(
        generate_url,
        text_input="Hello world",
        return_num_input_tokens=True,
        parameters={"max_tokens": 9, "temperature": 0, "ignore_eos": True},
    ).json()
    time.sleep(1.0)  # the model publishes metrics every 0.25 s
    after = metrics(server)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 9
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == out["num_input_tokens"]
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_generation_tokens"):
        assert after[f"vllm:{histogram}_count"] - before[f"vllm:{histogram}_count"] == 1
    assert after["vllm:request_generation_tokens_sum"] - before["vllm:request_generation_tokens_sum"] == 9
    assert after["vllm:num_requests_in_flight"] == 0
