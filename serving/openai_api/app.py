"""The OpenAI-compatible HTTP API: routes, authentication, errors and the response bodies.

Every route forwards to Triton (serving/openai_api/triton.py); the service keeps no
state between requests, so several can serve behind one load balancer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sse_starlette import ServerSentEvent

from serving.openai_api.protocol import ApiError, ChatRequest, CompletionRequest
from serving.openai_api.responses import Choices
from serving.openai_api.triton import Output, Triton

# Keep proxies (nginx) from caching or buffering a stream.
SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}

# The settings of ``python -m serving.openai_api``, as JSON, for every worker process.
SETTINGS_VARIABLE = "OPENAI_API_SETTINGS"


def from_environment() -> FastAPI:
    """The app of one worker process of ``python -m serving.openai_api``."""
    settings = json.loads(os.environ[SETTINGS_VARIABLE])
    return create_app(Triton(settings["triton_url"], settings["triton_headers"]), settings["api_key"])


def create_app(triton: Triton, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="OpenAI-compatible API for Triton + vLLM", lifespan=lambda app: connected(triton))
    app.add_exception_handler(ApiError, lambda request, exc: error_response(exc))
    app.add_exception_handler(RequestValidationError, lambda request, exc: error_response(validation_error(exc)))

    async def authenticate(request: Request) -> None:  # async: FastAPI runs a plain def in its thread pool
        given = request.headers.get("authorization", "")
        if api_key and not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)])

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if await triton.ready() else 503)

    @v1.get("/models")
    async def models() -> dict:
        names = await triton.models()
        return {"object": "list", "data": [model_card(name) for name in names]}

    @v1.get("/models/{name}")
    async def model(name: str) -> dict:
        await triton.check_model(name)
        return model_card(name)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = body.prompts()
        params = body.sampling(body.logprobs)
        choices = Choices("text_completion", f"cmpl-{uuid.uuid4().hex}", body, logprobs_style="completion")
        runs = [
            triton.generate(body.model, f"{choices.id}-{i}", p, None, params, body.stream, body.logprobs is not None)
            for i, p in enumerate(prompts)
        ]
        return await respond(request, body, choices, runs)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        messages = body.model_messages()
        logprobs = body.requested_logprobs()
        params = body.sampling(logprobs)
        choices = Choices("chat.completion", f"chatcmpl-{uuid.uuid4().hex}", body, logprobs_style="chat")
        runs = [triton.generate(body.model, choices.id, "", messages, params, body.stream, logprobs is not None)]
        return await respond(request, body, choices, runs)

    app.include_router(v1)
    return app


@contextlib.asynccontextmanager
async def connected(triton: Triton):
    await triton.open()
    yield
    await triton.close()


def model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "triton"}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(where) or None
    return ApiError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param)


async def respond(request: Request, body, choices: Choices, runs: list[AsyncIterator[Output]]):
    """A streamed answer, or one JSON body once every prompt's request is done."""
    if body.stream:
        first = await first_outputs(runs)  # errors before the first event still get a status code
        # Starlette sends the events as they come; sse-starlette's EventSourceResponse would
        # also open a cancel scope around every send: a tenth of the event loop's time, measured.
        return StreamingResponse(stream_events(choices, runs, first), media_type="text/event-stream", headers=SSE_HEADERS)
    done = asyncio.ensure_future(collect(choices, runs))
    gone = asyncio.ensure_future(disconnected(request))
    await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not done.done():  # the client left: cancelling closes the gRPC streams, which cancels on Triton
        done.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await done
        return Response(status_code=499)
    gone.cancel()
    return done.result()


async def disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(choices: Choices, runs: list[AsyncIterator[Output]]) -> dict:
    async def one(prompt: int, run: AsyncIterator[Output]) -> None:
        async for output in run:
            choices.add(prompt, output)

    await all_or_none(one(i, run) for i, run in enumerate(runs))
    return choices.final()


async def first_outputs(runs: list[AsyncIterator[Output]]) -> list[Output | None]:
    """Each prompt's first output; on an error every request is cancelled."""
    try:
        return await all_or_none(anext(run, None) for run in runs)
    except BaseException:
        await close_all(runs)
        raise


async def all_or_none(coroutines) -> list:
    """The coroutines' results; the first error cancels the others and is raised as it is."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coroutines]
    except BaseExceptionGroup as errors:
        raise errors.exceptions[0] from None
    return [task.result() for task in tasks]


async def close_all(runs: list[AsyncIterator[Output]]) -> None:
    for run in runs:
        await run.aclose()


def event(data: dict | str) -> bytes:
    """One server-sent event: a ``data:`` field holding a JSON body, or ``[DONE]``."""
    return ServerSentEvent(data if isinstance(data, str) else json.dumps(data), sep="\n").encode()


async def stream_events(choices: Choices, runs: list[AsyncIterator[Output]], first: list[Output | None]):
    try:
        for i, run in enumerate(runs):
            if first[i] is not None:
                for chunk in choices.chunks(i, first[i]):
                    yield event(chunk)
            async for output in run:
                for chunk in choices.chunks(i, output):
                    yield event(chunk)
        if choices.request.include_usage():
            yield event(choices.usage_chunk())
    except ApiError as exc:  # after the first event the status is sent: the error goes in the stream
        yield event(exc.body())
    finally:
        await close_all(runs)
    yield event("[DONE]")
