"""The service's way to Triton: tritonclient's asyncio gRPC client, one stream per request."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from tritonclient.grpc import InferResult
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from serving.openai_api.protocol import ApiError
from serving.triton_inputs import request_inputs
from triton_vllm_model.config import INTERNAL_MESSAGES, UNAVAILABLE_MESSAGES

PARAM_IN_MESSAGE = re.compile(r"sampling parameter '(\w+)'")


@dataclass
class Output:
    """One response of the model: per choice, the new text and what came with it."""

    texts: list[str]
    finish_reasons: list[str | None]
    num_output_tokens: list[int]
    logprobs: list[list | None]
    num_input_tokens: int


def not_found(model: str) -> ApiError:
    return ApiError(404, f"model '{model}' does not exist or is not ready; GET /v1/models lists the models", "model")


def error_for(message: str, model: str) -> ApiError:
    """The status of an error of a request to ``model``: a gRPC stream error carries the message only."""
    if "unknown model" in message.lower():  # Triton's words for a model it does not serve (or not ready)
        return not_found(model)
    if message.startswith(UNAVAILABLE_MESSAGES):
        return ApiError(503, message)
    if message.startswith(INTERNAL_MESSAGES):
        return ApiError(500, message)
    match = PARAM_IN_MESSAGE.search(message)
    return ApiError(400, message, match.group(1) if match else None)


def strings(result: InferResult, name: str) -> list[str]:
    array = result.as_numpy(name)
    return [] if array is None else [v.decode("utf-8") for v in array.reshape(-1)]


def output_of(result: InferResult) -> Output:
    texts = strings(result, "text_output")
    logprobs = [json.loads(v) for v in strings(result, "logprobs")] or [None] * len(texts)
    counts = result.as_numpy("num_output_tokens")
    return Output(
        texts=texts,
        finish_reasons=[r or None for r in strings(result, "finish_reason")] or [None] * len(texts),
        num_output_tokens=[int(c) for c in counts] if counts is not None else [0] * len(texts),
        logprobs=logprobs,
        num_input_tokens=int(result.as_numpy("num_input_tokens")[0]),
    )


class Triton:
    """Triton at ``url`` (host:port of its gRPC endpoint); ``headers`` go with every call."""

    def __init__(self, url: str, headers: dict[str, str] | None = None):
        self.url = url
        self.headers = headers or None
        self.client: InferenceServerClient | None = None

    async def open(self) -> None:
        """Connect; a gRPC channel belongs to the event loop it is made in, so this runs in the server's."""
        self.client = InferenceServerClient(self.url)

    async def close(self) -> None:
        await self.client.close()

    def unreachable(self, exc: Exception) -> ApiError:
        return ApiError(503, f"Triton at {self.url} did not answer: {message_of(exc)}")

    async def ready(self) -> bool:
        try:
            return await self.client.is_server_ready(headers=self.headers)
        except (InferenceServerException, grpc.RpcError):
            return False

    async def models(self) -> list[str]:
        """Names of the models ready to serve."""
        try:
            index = await self.client.get_model_repository_index(headers=self.headers)
        except (InferenceServerException, grpc.RpcError) as exc:
            raise self.unreachable(exc) from None
        return sorted({m.name for m in index.models if m.state == "READY"})

    async def check_model(self, name: str) -> None:
        try:
            ready = await self.client.is_model_ready(name, headers=self.headers)
        except InferenceServerException as exc:
            if "unknown model" not in message_of(exc).lower():
                raise self.unreachable(exc) from None
            ready = False
        if not ready:
            raise not_found(name)

    async def generate(
        self, model: str, request_id: str, prompt: str, messages: list[dict] | None, params: dict, stream: bool, logprobs: bool
    ) -> AsyncIterator[Output]:
        """The model's responses to one request. Closing the iterator early cancels the request on Triton.

        An unknown model comes back as the stream's first error: no readiness call per request.
        """
        inputs = request_inputs(prompt, messages, stream, params, logprobs)

        async def one_request():
            yield {"model_name": model, "inputs": inputs, "request_id": request_id}

        responses = self.client.stream_infer(one_request(), headers=self.headers)
        failure, ended = None, False
        try:
            # Triton ends the stream after the request's last response, since no other request follows.
            async for result, error in responses:
                if error is not None:
                    # An error is the request's last response: the stream is left to end by itself, because
                    # cancelling a stream whose request Triton has just finished can keep the model
                    # from ever unloading (the server then waits its whole exit timeout at a stop).
                    failure = error
                    continue
                yield output_of(result)
            ended = True
        except grpc.RpcError as exc:
            raise self.unreachable(exc) from None
        finally:
            if not ended:  # the caller stopped reading early: cancel the request on Triton
                responses.cancel()
        if failure is not None:
            raise error_for(message_of(failure), model)


def message_of(exc: Exception) -> str:
    if isinstance(exc, InferenceServerException):
        return exc.message() or str(exc)
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "details"):
        return exc.details() or str(exc)
    return str(exc)
