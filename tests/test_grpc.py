"""gRPC streaming with tritonclient, as clients of the official vLLM backend do it."""

import numpy as np
import pytest
from helpers import grpc_inputs, grpc_stream


def stream_infer(url, prompt, stream, params, **flags):
    return grpc_stream(url, grpc_inputs(prompt, stream, params, **flags))


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
