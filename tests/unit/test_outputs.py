"""Response contents (triton_vllm_model/outputs.py): how Deltas merge, which tensors go out."""

import json
from types import SimpleNamespace

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_vllm_model.outputs import Delta, Seq, error_response, logprobs_json, response

ALL = {"finish_reason": True, "cumulative_logprob": True, "logprobs": True, "num_input_tokens": True, "num_output_tokens": True}
NONE = dict.fromkeys(ALL, False)


def seq(text, token_ids, finish_reason=None, cumulative_logprob=None, logprobs=None):
    return Seq(text, list(token_ids), logprobs, cumulative_logprob, finish_reason)


def test_delta_of_engine_output():
    out = SimpleNamespace(
        prompt="Hi",
        prompt_token_ids=[1, 2],
        outputs=[SimpleNamespace(index=0, text="a", token_ids=(5,), logprobs=None, cumulative_logprob=None, finish_reason=None)],
    )
    delta = Delta.of(out)
    assert delta == Delta({0: seq("a", [5])}, 2, "Hi")
    empty = Delta.of(SimpleNamespace(prompt=None, prompt_token_ids=None, outputs=[]))
    assert (empty.seqs, empty.num_input_tokens, empty.prompt) == ({}, 0, "")


def test_deltas_merge():
    first = Delta({0: seq("Hel", [1], logprobs=[{1: "a"}], cumulative_logprob=-1.0)}, 3, "p")
    later = Delta(
        {
            0: seq("lo", [2, 3], finish_reason="length", logprobs=[{2: "b"}, {3: "c"}], cumulative_logprob=-2.5),
            1: seq("x", [9]),
        },
        3,
        "p",
    )
    first.extend(later)
    assert first.seqs[0] == seq("Hello", [1, 2, 3], "length", -2.5, [{1: "a"}, {2: "b"}, {3: "c"}])
    assert first.seqs[1] == seq("x", [9])


def test_merge_keeps_missing_logprobs_missing():
    first = Delta({0: seq("a", [1])}, 1, "")
    first.extend(Delta({0: seq("b", [2], logprobs=[{2: "x"}])}, 1, ""))
    assert first.seqs[0].logprobs is None and first.seqs[0].text == "ab"


def job(outputs, sampled_logprobs=False):
    return SimpleNamespace(outputs=outputs, sampled_logprobs=sampled_logprobs)


def tensors(resp):
    return {t.name(): t.as_numpy() for t in resp.output_tensors}


def test_response_with_text_only():
    delta = Delta({0: seq("lo", [2])}, 4, "Hel", prefix="Hel")
    got = tensors(response(job(NONE), delta))
    assert list(got) == ["text_output"]
    assert got["text_output"].tolist() == [b"Hello"]


def test_response_with_every_output():
    lp = SimpleNamespace(logprob=-0.5, rank=1, decoded_token="a")
    delta = Delta({0: seq("a", [7], "stop", -0.5, [{7: lp}]), 2: seq("", [], None)}, 3, "")
    got = tensors(response(job(ALL, sampled_logprobs=True), delta))
    assert list(got) == [
        "text_output",
        "finish_reason",
        "cumulative_logprob",
        "logprobs",
        "num_input_tokens",
        "num_output_tokens",
    ]
    assert got["text_output"].tolist() == [b"a", b"", b""]  # a missing sequence index answers empty
    assert got["finish_reason"].tolist() == [b"stop", b"", b""]
    assert got["cumulative_logprob"].dtype == np.float32 and got["cumulative_logprob"].tolist() == [-0.5, 0.0, 0.0]
    steps = json.loads(got["logprobs"][0])
    assert steps == [{"token_id": 7, "candidates": {"7": {"logprob": -0.5, "rank": 1, "decoded_token": "a"}}}]
    assert got["logprobs"].tolist()[1:] == [b"null", b"null"]
    assert got["num_input_tokens"].dtype == np.uint32 and got["num_input_tokens"].tolist() == [3]
    assert got["num_output_tokens"].tolist() == [1, 0, 0]


def test_logprobs_are_null_unless_sampled():
    delta = Delta({0: seq("a", [7], logprobs=[{7: None}])}, 1, "")
    assert tensors(response(job({**NONE, "logprobs": True}), delta))["logprobs"].tolist() == [b"null"]
    assert logprobs_json(None) == "null" and logprobs_json(seq("a", [1])) == "null"


def test_error_response():
    resp = error_response("bad", pb_utils.TritonError.INVALID_ARG)
    assert resp.error.message() == "bad" and resp.error.code() == pb_utils.TritonError.INVALID_ARG
