"""The model's request inputs as gRPC tensors: what client_grpc.py and the OpenAI
service (serving/openai_api) send. tritonclient's asyncio client takes the same tensors."""

from __future__ import annotations

import json

import numpy as np
from tritonclient.grpc import InferInput


def tensor(name: str, value) -> InferInput:
    """A one-element input: BYTES for str or bytes, BOOL otherwise."""
    if isinstance(value, (str, bytes)):
        array = np.array([value.encode("utf-8") if isinstance(value, str) else value], dtype=np.object_)
        inp = InferInput(name, [1], "BYTES")
    else:
        array = np.array([bool(value)])
        inp = InferInput(name, [1], "BOOL")
    inp.set_data_from_numpy(array)
    return inp


def request_inputs(
    prompt: str, messages: list[dict] | None, stream: bool, params: dict, logprobs: bool = False
) -> list[InferInput]:
    """A generation request: new text only, with finish reasons and token counts.

    ``messages`` (chat) replaces ``prompt``, formatted by the model's chat template.
    ``logprobs``: also return the per-token log-probabilities that ``params`` asks for.
    """
    inputs = [
        tensor("messages", json.dumps(messages)) if messages is not None else tensor("text_input", prompt),
        tensor("stream", stream),
        tensor("exclude_input_in_output", True),
        tensor("sampling_parameters", json.dumps(params)),
        tensor("return_finish_reason", True),
        tensor("return_num_input_tokens", True),
        tensor("return_num_output_tokens", True),
    ]
    if logprobs:
        inputs.append(tensor("return_logprobs", True))
    return inputs
