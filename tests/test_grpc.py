"""gRPC streaming with tritonclient, as clients of the official vLLM backend do it."""

import json
import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

MODEL = "qwen2.5-0.5b"


def inputs(prompt, stream, params, **flags):
    def bytes_input(name, value):
        t = grpcclient.InferInput(name, [1], "BYTES")
        t.set_data_from_numpy(np.array([value.encode()], dtype=np.object_))
        return t

    def bool_input(name, value):
        t = grpcclient.InferInput(name, [1], "BOOL")
        t.set_data_from_numpy(np.array([value], dtype=bool))
        return t

    result = [bytes_input("text_input", prompt), bool_input("stream", stream)]
    result.append(bytes_input("sampling_parameters", json.dumps(params)))
    result += [bool_input(name, value) for name, value in flags.items()]
    return result


def stream_infer(url, prompt, stream, params, **flags):
    responses = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(MODEL, inputs(prompt, stream, params, **flags), enable_empty_final_response=True)
    got = []
    while True:
        result, error = responses.get(timeout=120)
        if error is not None:
            client.stop_stream()
            return got, error
        got.append(result)
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    client.close()
    return got, None


def text(result):
    array = result.as_numpy("text_output")
    return "" if array is None else array[0].decode()


def test_grpc_stream_matches_non_streamed_answer(grpc_url):
    params = {"max_tokens": 10, "temperature": 0}
    streamed, error = stream_infer(grpc_url, "The weather today", True, params)
    assert error is None
    assert len([r for r in streamed if text(r)]) >= 2
    whole, error = stream_infer(grpc_url, "The weather today", False, params, exclude_input_in_output=True)
    assert error is None
    assert len(whole) == 1
    assert "".join(text(r) for r in streamed) == text(whole[0])


def test_grpc_returns_typed_extra_outputs(grpc_url):
    params = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
    got, error = stream_infer(
        grpc_url,
        "Hello world",
        False,
        params,
        return_num_input_tokens=True,
        return_num_output_tokens=True,
        return_finish_reason=True,
    )
    assert error is None
    result = got[-1]
    assert result.as_numpy("num_input_tokens").dtype == np.uint32
    assert result.as_numpy("num_input_tokens")[0] == 2
    assert result.as_numpy("num_output_tokens")[0] == 4
    assert result.as_numpy("finish_reason")[0] == b"length"


@pytest.mark.parametrize(
    "params, message",
    [
        ({"n": "two"}, "'n' has value 'two'"),
        ({"bogus": True}, "unknown sampling parameter 'bogus'"),
        ({"temperature": -1}, "temperature must be non-negative"),
    ],
)
def test_grpc_bad_parameters_get_invalid_argument(grpc_url, params, message):
    got, error = stream_infer(grpc_url, "Hi", True, params)
    assert error is not None
    assert message in error.message()
