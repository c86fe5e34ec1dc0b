"""The OpenAI service's pure logic: request fields to sampling parameters, model outputs to
response bodies, model errors to HTTP statuses, and which requests are cancelled on Triton.
No server."""

import asyncio
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from serving.openai_api.app import SETTINGS_VARIABLE
from serving.openai_api.protocol import ApiError, ChatRequest, CompletionRequest
from serving.openai_api.responses import Choices
from serving.openai_api.triton import Output, Triton, error_for
from triton_vllm_model.config import ENGINE_DIED, ENGINE_RESTARTING, GENERATION_FAILED


def completion(**fields):
    return CompletionRequest(model="m", prompt="Hi", **fields)


def chat(**fields):
    return ChatRequest(model="m", messages=[{"role": "user", "content": "Hi"}], **fields)


def test_completion_fields_become_sampling_parameters():
    params = completion(max_tokens=5, temperature=0, stop="\n", seed=3, n=2, logit_bias={"42": 1.5}).sampling(None)
    assert params == {"n": 2, "max_tokens": 5, "temperature": 0, "seed": 3, "stop": ["\n"], "logit_bias": {42: 1.5}}


def test_completion_max_tokens_defaults_to_16_as_openai_and_vllm_serve():
    assert completion().sampling(None)["max_tokens"] == 16
    assert "max_tokens" not in chat().sampling(None)  # chat: up to the context length


def test_vllm_extra_fields_pass_through_as_given():
    params = completion(top_k=5, min_p=0.1, ignore_eos=True, priority=1).sampling(None)
    assert params["top_k"] == 5 and params["min_p"] == 0.1 and params["ignore_eos"] is True and params["priority"] == 1


def test_max_completion_tokens_wins_over_max_tokens():
    assert chat(max_tokens=9, max_completion_tokens=4).sampling(None)["max_tokens"] == 4


@pytest.mark.parametrize(
    "fmt, structured",
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"json_object": True}),
        ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}, {"json": {"type": "object"}}),
    ],
)
def test_response_format_becomes_structured_output(fmt, structured):
    assert chat(response_format=fmt).sampling(None).get("structured_outputs") == structured


def test_structured_output_options_join_the_response_format():
    fmt = {"type": "json_object"}
    params = chat(response_format=fmt, structured_outputs={"disable_any_whitespace": True}).sampling(None)
    assert params["structured_outputs"] == {"json_object": True, "disable_any_whitespace": True}


def test_chat_logprobs_ask_for_top_logprobs_candidates():
    assert chat().requested_logprobs() is None
    assert chat(logprobs=True).requested_logprobs() == 0
    assert chat(logprobs=True, top_logprobs=3).requested_logprobs() == 3
    with pytest.raises(ApiError, match="top_logprobs needs logprobs"):
        chat(top_logprobs=3).requested_logprobs()


def test_messages_are_flattened_for_the_chat_template():
    request = ChatRequest(
        model="m",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        ],
    )
    assert request.model_messages() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


@pytest.mark.parametrize(
    "fields, param",
    [({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"), ({"prompt": []}, "prompt")],
)
def test_unsupported_completion_fields_are_400s(fields, param):
    with pytest.raises(ApiError) as err:
        CompletionRequest(model="m", **{"prompt": "Hi", **fields}).prompts()
    assert (err.value.status, err.value.param) == (400, param)


@pytest.mark.parametrize(
    "message, status, param",
    [
        (f"{ENGINE_RESTARTING}", 503, None),
        (f"{ENGINE_DIED} (EngineDeadError)", 503, None),
        (f"{GENERATION_FAILED}: RuntimeError: boom", 500, None),
        ("unknown sampling parameter 'bogus' (value 1); allowed: n", 400, "bogus"),
        ("sampling parameter 'top_k' has value 'x'; expected int", 400, "top_k"),
    ],
)
def test_model_errors_get_their_status(message, status, param):
    error = error_for(message, "qwen")
    assert (error.status, error.param) == (status, param)
    assert error.body()["error"]["message"] == message


@pytest.mark.parametrize(
    "message",
    ["Request for unknown model: 'nope' is not found", "Request for unknown model: 'nope' has no available versions"],
)
def test_an_unknown_model_is_a_404_naming_it(message):
    error = error_for(message, "nope")
    assert (error.status, error.param) == (404, "model")
    assert "'nope'" in error.body()["error"]["message"]


def output(texts, reasons=None, counts=None, logprobs=None, prompt_tokens=3):
    return Output(
        texts=texts,
        finish_reasons=reasons or [None] * len(texts),
        num_output_tokens=counts or [1] * len(texts),
        logprobs=logprobs or [None] * len(texts),
        num_input_tokens=prompt_tokens,
    )


def test_whole_answer_counts_every_choice_of_every_prompt():
    choices = Choices("text_completion", "cmpl-1", completion(n=2), "completion")
    choices.add(0, output(["a", "b"], ["length", "stop"], [4, 2], prompt_tokens=3))
    choices.add(1, output(["c", "d"], ["stop", "stop"], [1, 1], prompt_tokens=5))
    body = choices.final()
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "a", "length"),
        (1, "b", "stop"),
        (2, "c", "stop"),
        (3, "d", "stop"),
    ]
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16}


def test_chat_stream_sends_the_role_first_then_content_then_usage():
    request = chat(stream=True, stream_options={"include_usage": True})
    choices = Choices("chat.completion", "chatcmpl-1", request, "chat")
    first = choices.chunks(0, output(["Hel"]))
    last = choices.chunks(0, output(["lo"], ["length"]))
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert last[0]["choices"][0] == {"index": 0, "delta": {"content": "lo"}, "logprobs": None, "finish_reason": "length"}
    assert first[0]["usage"] is None and first[0]["object"] == "chat.completion.chunk"
    assert choices.usage_chunk() == {**choices._head("chat.completion.chunk"), "choices": [], "usage": choices.usage()}
    assert choices.usage()["completion_tokens"] == 2


def test_continuous_usage_stats_put_the_running_usage_in_every_chunk():
    request = completion(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    choices = Choices("text_completion", "cmpl-1", request, "completion")
    assert choices.chunks(0, output(["a"], counts=[2]))[0]["usage"]["completion_tokens"] == 2
    assert choices.chunks(0, output(["b"], counts=[3]))[0]["usage"]["completion_tokens"] == 5


def test_a_token_whose_text_is_held_back_still_gets_its_chunk_and_usage():
    request = completion(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    choices = Choices("text_completion", "cmpl-1", request, "completion")
    first = choices.chunks(0, output([""], counts=[1]))  # the first byte of a two-byte character
    second = choices.chunks(0, output(["é"], counts=[1]))
    assert [(c["choices"][0]["text"], c["usage"]["completion_tokens"]) for c in first + second] == [("", 1), ("é", 2)]


def test_a_choice_with_nothing_new_sends_no_chunk():
    choices = Choices("text_completion", "cmpl-1", completion(n=2, stream=True), "completion")
    chunks = choices.chunks(0, output(["x", ""], counts=[1, 0]))
    assert [c["choices"][0]["index"] for c in chunks] == [0]


def step(token_id, *candidates):
    """The model's logprobs entry for one token: candidates as (id, text, logprob, rank)."""
    return {
        "token_id": token_id,
        "candidates": {str(i): {"logprob": lp, "rank": rank, "decoded_token": text} for i, text, lp, rank in candidates},
    }


def test_chat_logprobs_take_the_sampled_token_and_the_best_k():
    choices = Choices("chat.completion", "c", chat(logprobs=True, top_logprobs=1), "chat")
    sampled_second_best = step(7, (7, "b", -1.5, 2), (3, "a", -0.5, 1))
    choices.add(0, output(["b"], ["length"], logprobs=[[sampled_second_best]]))
    content = choices.final()["choices"][0]["logprobs"]["content"]
    assert content == [
        {"token": "b", "logprob": -1.5, "bytes": [98], "top_logprobs": [{"token": "a", "logprob": -0.5, "bytes": [97]}]}
    ]


def test_completion_logprobs_offsets_continue_across_stream_chunks():
    choices = Choices("text_completion", "c", completion(logprobs=1, stream=True), "completion")
    first = choices.chunks(0, output(["ab"], logprobs=[[step(1, (1, "ab", -0.1, 1))]]))[0]
    second = choices.chunks(0, output(["c"], logprobs=[[step(2, (2, "c", -0.2, 1))]]))[0]
    assert first["choices"][0]["logprobs"]["text_offset"] == [0]
    assert second["choices"][0]["logprobs"] == {
        "tokens": ["c"],
        "token_logprobs": [-0.2],
        "top_logprobs": [{"c": -0.2}],
        "text_offset": [2],
    }


def _run_main(monkeypatch) -> dict:
    import uvicorn

    from serving.openai_api import __main__ as service

    calls = {}
    monkeypatch.setenv(SETTINGS_VARIABLE, "")  # restored after the test
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.update(app=app, **kwargs))
    assert service.main(["--port", "9123"]) == 0
    return calls


def test_the_service_uses_grpcs_polling_client_by_default(monkeypatch):
    monkeypatch.delenv("GRPC_EXPERIMENTS", raising=False)
    calls = _run_main(monkeypatch)
    assert calls["port"] == 9123
    assert os.environ["GRPC_EXPERIMENTS"] == "-event_engine_client"


def test_the_command_line_imports_grpc_only_after_setting_its_client():
    # gRPC reads GRPC_EXPERIMENTS once, at import: main() must run before anything imports it.
    check = "import sys, serving.openai_api.__main__; print('grpc' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_a_users_grpc_experiments_setting_is_kept(monkeypatch):
    monkeypatch.setenv("GRPC_EXPERIMENTS", "")
    _run_main(monkeypatch)
    assert os.environ["GRPC_EXPERIMENTS"] == ""


class FakeStream:
    """The responses of one gRPC stream, as tritonclient's asyncio client yields them."""

    def __init__(self, messages):
        self.messages = list(messages)
        self.read_to_end = False
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.messages:
            self.read_to_end = True
            raise StopAsyncIteration
        return self.messages.pop(0)

    def cancel(self):
        self.cancelled = True


def model_result(text: str) -> InferResult:
    reply = service_pb2.ModelInferResponse()
    for name, datatype, raw in (
        ("text_output", "BYTES", serialize_byte_tensor(np.array([text.encode()], dtype=np.object_)).item()),
        ("num_input_tokens", "INT32", np.array([3], dtype=np.int32).tobytes()),
    ):
        tensor = reply.outputs.add(name=name, datatype=datatype)
        tensor.shape.append(1)
        reply.raw_output_contents.append(raw)
    return InferResult(reply)


def generate_from(stream: FakeStream):
    triton = Triton("unused:0")
    triton.client = SimpleNamespace(stream_infer=lambda requests, headers: stream)
    return triton.generate("m", "id", "Hi", None, {}, stream=True, logprobs=False)


async def read_all(outputs) -> list[str]:
    return [output.texts[0] async for output in outputs]


def test_a_finished_stream_is_not_cancelled():
    stream = FakeStream([(model_result("Hello"), None), (model_result(" world"), None)])
    assert asyncio.run(read_all(generate_from(stream))) == ["Hello", " world"]
    assert stream.read_to_end and not stream.cancelled


def test_an_error_is_raised_once_triton_has_ended_the_stream():
    error = InferenceServerException(msg="unknown sampling parameter 'bogus'")
    stream = FakeStream([(model_result("Hello"), None), (None, error)])
    with pytest.raises(ApiError) as raised:
        asyncio.run(read_all(generate_from(stream)))
    assert (raised.value.status, raised.value.param) == (400, "bogus")
    assert stream.read_to_end and not stream.cancelled


def test_a_caller_that_stops_reading_cancels_the_request():
    stream = FakeStream([(model_result("Hello"), None), (model_result(" world"), None)])

    async def read_one():
        outputs = generate_from(stream)
        first = await anext(outputs)
        await outputs.aclose()
        return first.texts[0]

    assert asyncio.run(read_one()) == "Hello"
    assert stream.cancelled
