"""Reading a request: its input tensors, chat messages and sampling parameters.

Every client mistake raises RequestError, which the model answers with INVALID_ARG.
"""

import json
import typing

import triton_python_backend_utils as pb_utils
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

try:
    from vllm.sampling_params import StructuredOutputsParams
except ImportError:  # vLLM before 0.11
    StructuredOutputsParams = None

BOOL_INPUTS = [
    "stream",
    "exclude_input_in_output",
    "chat",
    "return_finish_reason",
    "return_cumulative_logprob",
    "return_logprobs",
    "return_num_input_tokens",
    "return_num_output_tokens",
]
STRING_INPUTS = ["sampling_parameters", "messages"]
# Keys of the request's sampling parameters that are not SamplingParams fields.
REQUEST_KEYS = {"lora_name", "priority"}
STRUCTURED_KEYS = {"guided_json": "json", "guided_choice": "choice", "guided_regex": "regex", "guided_grammar": "grammar"}
PRIVATE_SAMPLING_FIELDS = {"output_kind", "skip_clone", "output_text_buffer_length", "detokenize"}


class RequestError(Exception):
    """A client mistake: answered with INVALID_ARG (HTTP 400)."""


def string_input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise RequestError(f"{name} must hold exactly one element, got {values.size}")
    value = values[0]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"{name} is not valid UTF-8: {exc}") from None
    return str(value)


def bool_input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise RequestError(f"{name} must hold exactly one boolean, got {values.size} elements")
    return bool(values[0])


def parse_messages(raw):
    try:
        messages = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RequestError(f"messages is not valid JSON: {exc}") from None
    if not isinstance(messages, list) or not messages:
        raise RequestError('messages must be a non-empty JSON list of {"role": ..., "content": ...} objects')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RequestError(f"messages[{i}] must be an object with string fields role and content, got {m!r}")
        if m["role"] not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}].role must be system, user or assistant, got {m['role']!r}")
    return messages


def sampling_dict(request):
    """Sampling parameters from the sampling_parameters input, else the request's parameters."""
    raw = string_input(request, "sampling_parameters")
    source = "sampling_parameters"
    if raw is None:
        raw, source = request.parameters(), "parameters"
    try:
        params = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise RequestError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise RequestError(f"{source} must be a JSON object, got {type(params).__name__}")
    # Triton's own request parameters (triton_enable_empty_final_response, ...), and the
    # generate endpoint's "id", which is already the request id.
    return {k: v for k, v in params.items() if not k.startswith("triton_") and k != "id"}


def sampling_fields():
    hints = typing.get_type_hints(SamplingParams)
    names = getattr(SamplingParams, "__struct_fields__", None) or list(hints)
    return {n: hints.get(n) for n in names if not n.startswith("_") and n not in PRIVATE_SAMPLING_FIELDS}


SAMPLING_FIELDS = sampling_fields()


def check_type(key, value, hint):
    """Reject values of the wrong JSON type, naming key, value and what is allowed."""
    allowed = set(typing.get_args(hint)) or {hint}
    simple = {t for t in allowed if t in (int, float, bool, str, list, dict, type(None))}
    origins = {typing.get_origin(t) or t for t in allowed}
    if not simple and not origins & {list, dict}:
        return
    ok = (
        (value is None and type(None) in allowed)
        or (isinstance(value, bool) and bool in allowed)
        or (isinstance(value, int) and not isinstance(value, bool) and (int in allowed or float in allowed))
        or (isinstance(value, float) and float in allowed)
        or (isinstance(value, str) and str in allowed)
        or (isinstance(value, list) and list in origins)
        or (isinstance(value, dict) and dict in origins)
    )
    if not ok:
        names = sorted({getattr(t, "__name__", str(t)).replace("NoneType", "null") for t in origins})
        raise RequestError(f"sampling parameter {key!r} has value {value!r}; expected {' or '.join(names)}")


def sampling_params(params, stream):
    params = dict(params)
    structured = {STRUCTURED_KEYS[k]: params.pop(k) for k in list(params) if k in STRUCTURED_KEYS}
    if "structured_outputs" in params:
        value = params.pop("structured_outputs")
        if not isinstance(value, dict):
            raise RequestError(f"sampling parameter 'structured_outputs' must be an object, got {value!r}")
        structured.update(value)
    for key, value in params.items():
        if key not in SAMPLING_FIELDS:
            allowed = sorted(set(SAMPLING_FIELDS) | REQUEST_KEYS | set(STRUCTURED_KEYS) | {"structured_outputs"})
            raise RequestError(f"unknown sampling parameter {key!r} (value {value!r}); allowed: {', '.join(allowed)}")
        check_type(key, value, SAMPLING_FIELDS[key])
    if structured:
        if StructuredOutputsParams is None:
            raise RequestError("structured output needs vLLM 0.11 or newer")
        try:
            params["structured_outputs"] = StructuredOutputsParams(**structured)
        except Exception as exc:  # vLLM's checks raise more than ValueError
            raise RequestError(f"invalid structured output parameters {structured!r}: {exc}") from None
    params.setdefault("max_tokens", None)  # None: up to the context length, not vLLM's 16
    params["output_kind"] = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    try:
        return SamplingParams(**params)
    except Exception as exc:  # vLLM's validation errors are not all ValueErrors
        raise RequestError(f"invalid sampling parameters: {exc}") from None
