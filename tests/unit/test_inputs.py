"""Reading requests (triton_vllm_model/inputs.py): exact messages for client mistakes."""

import json
import re

import numpy as np
import pytest
from triton_python_backend_utils import Tensor

from triton_vllm_model.inputs import (
    STRUCTURED_KEYS,
    RequestError,
    bool_input,
    check_type,
    parse_messages,
    sampling_dict,
    sampling_params,
    string_input,
)


class Request:
    def __init__(self, parameters="", **inputs):
        self.inputs = {name: Tensor(name, value) for name, value in inputs.items()}
        self._parameters = parameters

    def parameters(self):
        return self._parameters


@pytest.mark.parametrize(
    "key, value, hint, message",
    [
        ("n", "two", int, "sampling parameter 'n' has value 'two'; expected int"),
        ("n", 1.5, int, "sampling parameter 'n' has value 1.5; expected int"),
        ("temperature", "hot", float, "sampling parameter 'temperature' has value 'hot'; expected float"),
        ("ignore_eos", 1, bool, "sampling parameter 'ignore_eos' has value 1; expected bool"),
        ("seed", None, int, "sampling parameter 'seed' has value None; expected int"),
        ("seed", "1", int | None, "sampling parameter 'seed' has value '1'; expected int or null"),
        ("stop", 3, str | list[str] | None, "sampling parameter 'stop' has value 3; expected list or null or str"),
        ("logit_bias", [1], dict[int, float] | None, "sampling parameter 'logit_bias' has value [1]; expected dict or null"),
    ],
)
def test_wrong_types_are_named(key, value, hint, message):
    with pytest.raises(RequestError, match=f"^{re.escape(message)}$"):
        check_type(key, value, hint)


@pytest.mark.parametrize(
    "value, hint",
    [
        (2, int),
        (2, float),  # an integer is a fine float
        (0.5, float),
        (True, bool),
        (None, int | None),
        ("x", str | list[str] | None),
        (["x"], str | list[str] | None),
        ({"1": 2.0}, dict[int, float] | None),
        (object(), object),  # types the check does not know are vLLM's to judge
    ],
)
def test_right_types_pass(value, hint):
    check_type("key", value, hint)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"bogus": True}, "unknown sampling parameter 'bogus' (value True); allowed: "),
        ({"n": "two"}, "sampling parameter 'n' has value 'two'; expected int"),
        ({"structured_outputs": "x"}, "sampling parameter 'structured_outputs' must be an object, got 'x'"),
        ({"structured_outputs": {"disable_any_whitespace": True}}, "invalid structured output parameters "),
        ({"temperature": -1}, "invalid sampling parameters: "),
    ],
)
def test_sampling_params_reject(params, message):
    with pytest.raises(RequestError) as info:
        sampling_params(params, stream=False)
    assert str(info.value).startswith(message)


def test_unknown_parameter_lists_what_is_allowed():
    with pytest.raises(RequestError) as info:
        sampling_params({"bogus": 1}, stream=True)
    allowed = str(info.value).split("allowed: ", 1)[1].split(", ")
    assert allowed == sorted(allowed)
    assert {"lora_name", "priority", "structured_outputs", "temperature", *STRUCTURED_KEYS} <= set(allowed)
    assert "output_kind" not in allowed


def test_sampling_params_defaults():
    from vllm.sampling_params import RequestOutputKind

    params = sampling_params({"temperature": 0}, stream=True)
    assert params.max_tokens is None and params.temperature == 0
    assert params.output_kind == RequestOutputKind.DELTA
    assert sampling_params({}, stream=False).output_kind == RequestOutputKind.FINAL_ONLY
    assert sampling_params({"max_tokens": 5}, stream=False).max_tokens == 5


def test_messages_are_parsed():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert parse_messages(json.dumps(messages)) == messages


@pytest.mark.parametrize(
    "raw, message",
    [
        ("[", "messages is not valid JSON: Expecting value: line 1 column 2 (char 1)"),
        ("[]", 'messages must be a non-empty JSON list of {"role": ..., "content": ...} objects'),
        ('{"role": "user"}', 'messages must be a non-empty JSON list of {"role": ..., "content": ...} objects'),
        ('[{"role": "user"}]', "messages[0] must be an object with string fields role and content, got {'role': 'user'}"),
        ('["hi"]', "messages[0] must be an object with string fields role and content, got 'hi'"),
        (
            '[{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]',
            "messages[1].role must be system, user or assistant, got 'tool'",
        ),
    ],
)
def test_bad_messages(raw, message):
    with pytest.raises(RequestError) as info:
        parse_messages(raw)
    assert str(info.value) == message


def test_string_and_bool_inputs():
    request = Request(
        text_input=np.array([b"caf\xc3\xa9"], dtype=np.object_),
        stream=np.array([True]),
        two=np.array([b"a", b"b"], dtype=np.object_),
        bad=np.array([b"\xff"], dtype=np.object_),
    )
    assert string_input(request, "text_input") == "café"
    assert string_input(request, "missing") is None
    assert bool_input(request, "stream") is True
    assert bool_input(request, "missing") is None
    with pytest.raises(RequestError, match=r"^two must hold exactly one element, got 2$"):
        string_input(request, "two")
    with pytest.raises(RequestError, match=r"^two must hold exactly one boolean, got 2 elements$"):
        bool_input(request, "two")
    with pytest.raises(RequestError, match=r"^bad is not valid UTF-8: "):
        string_input(request, "bad")


def test_sampling_dict_sources():
    params = np.array([b'{"max_tokens": 3, "triton_x": 1, "id": "r"}'], dtype=np.object_)
    assert sampling_dict(Request(sampling_parameters=params)) == {"max_tokens": 3}
    assert sampling_dict(Request(parameters='{"temperature": 0, "triton_enable_empty_final_response": true}')) == {
        "temperature": 0
    }
    assert sampling_dict(Request()) == {}
    with pytest.raises(RequestError, match=r"^parameters is not valid JSON: "):
        sampling_dict(Request(parameters="{"))
    with pytest.raises(RequestError, match=r"^sampling_parameters must be a JSON object, got list$"):
        sampling_dict(Request(sampling_parameters=np.array([b"[1]"], dtype=np.object_)))
