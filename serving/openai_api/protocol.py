"""The OpenAI request bodies the service accepts, and the model's sampling parameters made of them.

Fields OpenAI defines are typed here. Any other field is one of vLLM's extra sampling
parameters (``top_k``, ``min_p``, ``ignore_eos``, ...), passed to the model as given:
the model checks it against vLLM's SamplingParams and names what it does not know.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "InternalServerError")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far


class JsonSchema(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = "response"
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class Request(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="allow")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=128)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None  # accepted, unused

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def continuous_usage(self) -> bool:
        return self.include_usage() and self.stream_options.continuous_usage_stats

    def sampling(self, logprobs: int | None) -> dict:
        """The model's ``sampling_parameters``: the fields given, vLLM's extras, structured output."""
        params = {
            key: value
            for key in ("n", "max_tokens", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")
            if (value := getattr(self, key)) is not None
        }
        if self.stop is not None:
            params["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        if self.logit_bias:
            params["logit_bias"] = token_bias(self.logit_bias)
        if logprobs is not None:
            params["logprobs"] = logprobs
        extra = dict(self.model_extra or {})
        structured = structured_output(self.response_format)
        if structured:  # vLLM's own structured_outputs options (disable_any_whitespace, ...) may come with it
            options = extra.pop("structured_outputs", None)
            params["structured_outputs"] = {**options, **structured} if isinstance(options, dict) else structured
        params.update(extra)
        return params


class CompletionRequest(Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's and vllm serve's default here
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str]:
        if self.echo:
            raise ApiError(400, "echo is not supported: the model returns new text only", "echo")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", "suffix")
        if self.best_of not in (None, 1, self.n):
            raise ApiError(400, "best_of is not supported (vLLM removed it); use n", "best_of")
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise ApiError(400, "prompt must not be empty", "prompt")
        return prompts


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_model(self) -> dict:
        """The model's ``{"role", "content"}``: OpenAI's developer role is a system message."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None

    def model_messages(self) -> list[dict]:
        if self.tools:
            raise ApiError(400, "tools are not supported by this service", "tools")
        return [m.for_model() for m in self.messages]

    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def sampling(self, logprobs: int | None) -> dict:
        params = super().sampling(logprobs)
        if self.max_completion_tokens is not None:
            params["max_tokens"] = self.max_completion_tokens
        return params


def token_bias(bias: dict[str, float]) -> dict[int, float]:
    try:
        return {int(token): value for token, value in bias.items()}
    except ValueError:
        raise ApiError(400, "logit_bias keys must be token ids", "logit_bias") from None


def structured_output(fmt: ResponseFormat | None) -> dict | None:
    """response_format as the model's ``structured_outputs`` (vLLM's StructuredOutputsParams)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"json_object": True}
    if fmt.json_schema is None or fmt.json_schema.json_schema is None:
        raise ApiError(400, "response_format json_schema needs json_schema.schema", "response_format")
    return {"json": fmt.json_schema.json_schema}
