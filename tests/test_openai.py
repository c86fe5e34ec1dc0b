"""The OpenAI-compatible service, used through the official openai SDK as its users use it."""

import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from helpers import MODEL, engine_core_pids, metric, metrics, run_script, thread_policies, wait_for

from serving.openai_api.service import OpenAIService
from serving.tritonserver import free_port

LONG = {"ignore_eos": True}  # vLLM's extra field: every request makes exactly max_tokens tokens


@pytest.fixture(scope="module")
def client(openai_service):
    return openai.OpenAI(base_url=f"{openai_service.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(tiny_repository):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_repository / MODEL / "1" / "weights")


def test_models_lists_the_served_model(client, openai_service):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert requests.get(f"{openai_service.url}/health", timeout=10).status_code == 200


@pytest.mark.cpu
def test_the_service_runs_under_sched_batch_on_the_cpu(openai_service):
    # As the local server: a thread of the API that wakes up must not preempt the engine core.
    tree = thread_policies(openai_service.process.pid)
    assert tree[0][0].cmdline()[1:3] == ["-m", "serving.openai_api"], tree[0][0].cmdline()
    for process, policies in tree:
        assert policies == {os.SCHED_BATCH}, (process.cmdline()[:3], policies)


def test_completion_usage_counts_real_tokens(client, tokenizer):
    prompt = "The capital of France is"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, temperature=0, extra_body=LONG)
    assert out.object == "text_completion" and out.model == MODEL
    assert out.choices[0].finish_reason == "length" and out.choices[0].text
    assert out.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == out.usage.prompt_tokens + 7


def test_chat_messages_go_through_the_chat_template(client, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, extra_body=LONG)
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out.usage.prompt_tokens == len(tokenizer(templated, add_special_tokens=False)["input_ids"])
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content
    assert out.usage.completion_tokens == 3


def test_max_completion_tokens_limits_a_chat_answer(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=4, extra_body=LONG
    )
    assert out.usage.completion_tokens == 4 and out.choices[0].finish_reason == "length"


def test_streamed_completion_equals_the_whole_one(client):
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0, extra_body=LONG)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert len([c for c in chunks if c.choices]) > 1, "the answer came in one piece: not streamed"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_a_stream_is_server_sent_events_that_proxies_pass_on_unbuffered(openai_service):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 5, "stream": True, **LONG}
    with requests.post(f"{openai_service.url}/v1/completions", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no" and response.headers["cache-control"] == "no-store"
        events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_streamed_chat_equals_the_whole_one(client):
    args = dict(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=24, temperature=0, extra_body=LONG
    )
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert all(c.usage is None for c in chunks), "usage was sent without stream_options.include_usage"


def test_n_gives_that_many_choices_and_counts_them_all(client):
    out = client.completions.create(model=MODEL, prompt="Hi", n=3, max_tokens=5, temperature=1.0, seed=7, extra_body=LONG)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert len({c.text for c in out.choices}) > 1, "three samples at temperature 1 all came out the same"
    assert out.usage.completion_tokens == 15


def test_several_prompts_in_one_completion_request(client):
    out = client.completions.create(model=MODEL, prompt=["Hi", "Hello there"], max_tokens=3, temperature=0, extra_body=LONG)
    one = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, temperature=0, extra_body=LONG)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[1].text == one.choices[0].text
    assert out.usage.completion_tokens == 6


def test_stop_string_ends_the_answer_before_it(client):
    args = dict(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=32, temperature=0, extra_body=LONG)
    text = client.completions.create(**args).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"no usable stop string in {text!r}"
    stopped = client.completions.create(**{**args, "extra_body": {}}, stop=[stop])
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_chat_logprobs_are_the_sampled_tokens_and_their_best_rivals(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob)  # greedy: the best one is sampled
        assert token.logprob <= 0


def test_completion_logprobs_line_up_with_the_text(client):
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=5, temperature=0, logprobs=2, extra_body=LONG)
    logprobs = out.choices[0].logprobs
    assert "".join(logprobs.tokens) == out.choices[0].text
    assert len(logprobs.token_logprobs) == 5 and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(5)]
    assert all(len(top) >= 2 for top in logprobs.top_logprobs)


def test_json_schema_response_format_gives_matching_json(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Answer in JSON"}],
        max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        extra_body={"structured_outputs": {"disable_any_whitespace": True}},
    )
    assert isinstance(json.loads(out.choices[0].message.content)["ok"], bool)


@pytest.mark.parametrize(
    "args, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"n": 0}, "n"),
        ({"extra_body": {"no_such_parameter": 1}}, "no_such_parameter"),
        ({"extra_body": {"top_k": "many"}}, "top_k"),
        ({"logprobs": 99}, "logprobs"),
    ],
)
def test_a_bad_parameter_is_a_400_naming_it(client, args, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, **args)
    assert err.value.status_code == 400
    assert param in err.value.message
    assert err.value.body["param"] == param


def test_bad_chat_requests_are_400s(client):
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-model", prompt="Hi", max_tokens=2)
    assert "no-such-model" in err.value.message and err.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_vllm_bench_serve_runs_unchanged_against_the_api(openai_service, tiny_repository):
    done = run_script(
        "benchmarks/vllm_bench_serve.py",
        "--backend", "openai", "--base-url", openai_service.url, "--endpoint", "/v1/completions",
        "--model", MODEL, "--tokenizer", str(tiny_repository / MODEL / "1" / "weights"),
        "--dataset-name", "random", "--random-input-len", "16", "--random-output-len", "8",
        "--num-prompts", "8", "--max-concurrency", "4", "--ignore-eos",
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert re.search(r"Successful requests:\s+8\b", done.stdout), done.stdout[-2000:]
    assert re.search(r"Total generated tokens:\s+64\b", done.stdout), done.stdout[-2000:]


def test_the_api_key_is_required_when_set(server, tmp_path):
    service = OpenAIService(
        f"{server.host}:{server.grpc_port}", port=free_port(), api_key="sk-test", log_file=tmp_path / "openai.log"
    )
    with_key = openai.OpenAI(base_url=f"{service.start().url}/v1", api_key="sk-test", max_retries=0)
    try:
        assert with_key.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{service.url}/v1", api_key="wrong", max_retries=0).models.list()
        assert requests.get(f"{service.url}/health", timeout=10).status_code == 200  # probes need no key
    finally:
        service.stop()


def busy(server) -> bool:  # Triton's /metrics page is refreshed about once a second
    return metric(server, "vllm:num_requests_in_flight") > 0


def idle(server) -> bool:
    figures = metrics(server)
    return figures["vllm:num_requests_in_flight"] == 0 and figures["vllm:num_requests_running"] == 0


def test_a_client_leaving_a_stream_cancels_it_on_triton(server, client):
    stream = client.completions.create(model=MODEL, prompt="Go", max_tokens=2000, stream=True, extra_body=LONG)
    try:
        next(iter(stream))
        assert wait_for(lambda: busy(server), 5.0), "/metrics never showed the request"
    finally:
        stream.close()
    assert wait_for(lambda: idle(server), 2.0), "the engine still works for a client that left"


def test_stopping_the_service_ends_its_streams_and_cancels_them_on_triton(server, tmp_path):
    service = OpenAIService(f"{server.host}:{server.grpc_port}", port=free_port(), log_file=tmp_path / "openai.log")
    client = openai.OpenAI(base_url=f"{service.start().url}/v1", api_key="unused", max_retries=0)
    stream = client.completions.create(model=MODEL, prompt="Go", max_tokens=2000, stream=True, extra_body=LONG)
    chunks = iter(stream)
    next(chunks)
    assert wait_for(lambda: busy(server), 5.0), "/metrics never showed the request"
    assert service.stop() == signal.SIGTERM, "the service did not exit on SIGTERM: it was killed"
    with pytest.raises(openai.APIError):  # the stream ends without its last chunk
        for chunk in chunks:
            assert chunk.choices[0].finish_reason is None, "the stream was let finish"
    assert wait_for(lambda: idle(server), 2.0), "the engine still works for a stream of a stopped service"


def test_a_client_leaving_a_whole_answer_cancels_it_on_triton(server, openai_service):
    body = {"model": MODEL, "prompt": "Go", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(requests.Timeout):
        requests.post(f"{openai_service.url}/v1/completions", json=body, timeout=1.0)
    assert busy(server), "the request ended before the client left"
    assert wait_for(lambda: idle(server), 2.0), "the engine still works for a client that left"


@pytest.mark.parametrize("stream", [False, True])
def test_a_bad_prompt_among_several_fails_the_request_and_frees_the_others(server, client, stream):
    too_long = "word " * 3000  # longer than the tiny model's 2,048-token context
    with pytest.raises(openai.BadRequestError):
        out = client.completions.create(model=MODEL, prompt=["Go", too_long], max_tokens=1500, stream=stream, extra_body=LONG)
        list(out) if stream else None
    assert wait_for(lambda: idle(server), 2.0), "the good prompt's request still runs after the request failed"


def test_32_concurrent_streams_all_complete(client):
    def one(i):
        chunks = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Story {i}"}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=LONG,
        )
        chunks = list(chunks)
        return chunks[-1].usage.completion_tokens, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert [tokens for tokens, _ in results] == [16] * 32
    assert all(text for _, text in results)


def test_503_while_the_engine_restarts_then_served_again(server, client):
    stream = client.completions.create(model=MODEL, prompt="Go", max_tokens=2000, stream=True, extra_body=LONG)
    chunks = iter(stream)
    next(chunks)
    for pid in engine_core_pids(server):
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    with pytest.raises(openai.APIError, match="engine"):  # the stream in flight ends with an error event
        for _ in chunks:
            pass
    assert time.monotonic() - killed_at < 10
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert err.value.status_code == 503 and "engine" in err.value.message

    def served():
        try:
            return client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens > 0
        except openai.APIStatusError:
            return False

    assert wait_for(served, 90), "not serving again 90 s after the engine was killed"
