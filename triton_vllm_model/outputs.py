"""What a response carries: new output of a request (Delta) and the response tensors made of it."""

import json
from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils

# The model's outputs and their types (the inputs are in inputs.py).
OUTPUTS = [
    ("text_output", "TYPE_STRING"),
    ("finish_reason", "TYPE_STRING"),
    ("cumulative_logprob", "TYPE_FP32"),
    ("logprobs", "TYPE_STRING"),
    ("num_input_tokens", "TYPE_UINT32"),
    ("num_output_tokens", "TYPE_UINT32"),
]


@dataclass
class Seq:
    """New output of one sequence since the last response."""

    text: str
    token_ids: list
    logprobs: list | None
    cumulative_logprob: float | None
    finish_reason: str | None


@dataclass
class Delta:
    """New output of one request: what one response carries."""

    seqs: dict
    num_input_tokens: int
    prompt: str
    prefix: str = ""

    @classmethod
    def of(cls, out):
        seqs = {
            o.index: Seq(
                o.text, list(o.token_ids), None if o.logprobs is None else list(o.logprobs), o.cumulative_logprob, o.finish_reason
            )
            for o in out.outputs
        }
        return cls(seqs, len(out.prompt_token_ids or []), out.prompt or "")

    def extend(self, later):
        for index, seq in later.seqs.items():
            mine = self.seqs.get(index)
            if mine is None:
                self.seqs[index] = seq
                continue
            mine.text += seq.text
            mine.token_ids += seq.token_ids
            if mine.logprobs is not None and seq.logprobs is not None:
                mine.logprobs += seq.logprobs
            mine.cumulative_logprob = seq.cumulative_logprob
            mine.finish_reason = seq.finish_reason


def response(job, delta):
    """The InferenceResponse of a Delta, with the outputs the request of ``job`` asked for."""
    seqs = [delta.seqs.get(i) for i in range(max(delta.seqs, default=-1) + 1)]
    tensors = [pb_utils.Tensor("text_output", strings([delta.prefix + (s.text if s else "") for s in seqs]))]
    if job.outputs["finish_reason"]:
        reasons = [str(s.finish_reason) if s and s.finish_reason else "" for s in seqs]
        tensors.append(pb_utils.Tensor("finish_reason", strings(reasons)))
    if job.outputs["cumulative_logprob"]:
        values = [s.cumulative_logprob if s and s.cumulative_logprob is not None else 0.0 for s in seqs]
        tensors.append(pb_utils.Tensor("cumulative_logprob", np.asarray(values, dtype=np.float32)))
    if job.outputs["logprobs"]:
        values = [logprobs_json(s) if job.sampled_logprobs else "null" for s in seqs]
        tensors.append(pb_utils.Tensor("logprobs", strings(values)))
    if job.outputs["num_input_tokens"]:
        tensors.append(pb_utils.Tensor("num_input_tokens", np.asarray([delta.num_input_tokens], dtype=np.uint32)))
    if job.outputs["num_output_tokens"]:
        counts = [len(s.token_ids) if s else 0 for s in seqs]
        tensors.append(pb_utils.Tensor("num_output_tokens", np.asarray(counts, dtype=np.uint32)))
    return pb_utils.InferenceResponse(output_tensors=tensors)


def logprobs_json(seq):
    if seq is None or seq.logprobs is None:
        return "null"
    steps = []
    for token_id, step in zip(seq.token_ids, seq.logprobs, strict=False):
        entry = {}
        for tid, lp in step.items():
            entry[str(tid)] = {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
        steps.append({"token_id": token_id, "candidates": entry})
    return json.dumps(steps)


def strings(values):
    return np.asarray([v.encode("utf-8") for v in values], dtype=np.object_)


def error_response(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
