"""What the output must follow: OpenAI's ``response_format`` (``text``, no constraint; ``json_object``;
``json_schema``), or vLLM's ``structured_outputs`` object (``json``, ``regex``, ``choice``,
``grammar`` or ``json_object``: exactly one), or vLLM's older top-level ``guided_json``,
``guided_regex``, ``guided_choice`` and ``guided_grammar`` (sent through ``extra_body``). A request
gives at most one of these fields.

The spec is turned into a grammar here, in a worker thread, before anything is queued, so one
xgrammar cannot enforce is a 400 naming the field; the engine then compiles it against the
vocabulary off its step (with disaggregated roles, prefill's and decode's engines each do).
A backend that cannot enforce a grammar (the grammar library is not installed) refuses it with a
400 rather than ignore it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from mmserve.serving.router.errors import InvalidRequest
from mmserve.structured_output import StructuredOutput

FIELD = "response_format"
STRUCTURED_OUTPUTS = "structured_outputs"
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
"""vLLM's older fields, each the ``structured_outputs`` key it became."""
CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")
"""The keys of ``structured_outputs``."""
FIELDS = {FIELD, STRUCTURED_OUTPUTS, *GUIDED}


def _given(body: Mapping[str, Any]) -> list[str]:
    """The fields a request asks a structured output with (a null is absent)."""
    return [name for name in (FIELD, STRUCTURED_OUTPUTS, *GUIDED) if body.get(name) is not None]


def given_field(body: Mapping[str, Any]) -> str | None:
    """The field a request asks its structured output with (the first, when it gives several)."""
    return next(iter(_given(body)), None)


async def structured_output(body: Mapping[str, Any], backend) -> StructuredOutput | None:
    given = _given(body)
    if len(given) > 1:
        raise InvalidRequest(f"give one of {', '.join(given)}, not several", given[-1])
    if not given:
        return None
    name = given[0]
    if name == FIELD:
        spec = _parse(body[name])
    elif name == STRUCTURED_OUTPUTS:
        spec = _structured_outputs(body[name])
    else:
        spec = _constraint(GUIDED[name], body[name], name)
    return None if spec is None else await _checked(spec, name, backend)


NATIVE = {"json_schema": "json", "regex": "regex", "ebnf": "grammar"}
"""SGLang's ``sampling_params`` fields of its native ``/generate``, each the ``structured_outputs``
key it is the same as."""


async def native_structured_output(sampling: dict[str, Any], backend) -> StructuredOutput | None:
    """Takes SGLang's ``json_schema`` (JSON text or an object), ``regex`` or ``ebnf`` out of a
    native request's ``sampling_params`` (at most one) as the spec they ask."""
    values = {key: sampling.pop(key, None) for key in NATIVE}
    given = [key for key, value in values.items() if value is not None]
    if len(given) > 1:
        raise InvalidRequest(f"give one of sampling_params.{', sampling_params.'.join(given)}, not several",
                             f"sampling_params.{given[-1]}")
    if not given:
        return None
    name = f"sampling_params.{given[0]}"
    return await _checked(_constraint(NATIVE[given[0]], values[given[0]], name), name, backend)


async def _checked(spec: StructuredOutput, name: str, backend) -> StructuredOutput:
    """The spec, once the backend can enforce it and xgrammar can parse it (a 400 naming ``name`` else)."""
    if not getattr(backend, "supports_structured_output", False):
        raise InvalidRequest(f"{name} is not supported by this server: it needs the grammar library "
                             "(pip install 'mmserve[structured]')", name)
    try:
        await asyncio.to_thread(spec.check)
    except ValueError as error:
        raise InvalidRequest(str(error), name) from None
    return spec


def _structured_outputs(value: Any) -> StructuredOutput:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{STRUCTURED_OUTPUTS} must be an object", STRUCTURED_OUTPUTS)
    _only(value, set(CONSTRAINTS), STRUCTURED_OUTPUTS)
    if "json_object" in value and not isinstance(value["json_object"], (bool, type(None))):
        raise InvalidRequest(f"{STRUCTURED_OUTPUTS}.json_object must be a boolean", STRUCTURED_OUTPUTS)
    given = [key for key in CONSTRAINTS if value.get(key) not in (None, False)]
    if len(given) != 1:
        raise InvalidRequest(f"{STRUCTURED_OUTPUTS} takes exactly one of {', '.join(CONSTRAINTS)}",
                             STRUCTURED_OUTPUTS)
    return _constraint(given[0], value[given[0]], STRUCTURED_OUTPUTS)


def _constraint(kind: str, value: Any, param: str) -> StructuredOutput:
    """One ``structured_outputs`` constraint (or the older field that asked it) as a spec."""
    if kind == "json":
        return _json_schema(value, param)
    if kind == "json_object":
        return StructuredOutput.any_object()
    try:
        if kind == "regex":
            return StructuredOutput.from_regex(value)
        if kind == "choice":
            return StructuredOutput.from_choice(value)
        return StructuredOutput.from_grammar(value)
    except ValueError as error:
        raise InvalidRequest(f"{param}: {error}", param) from None


def _json_schema(value: Any, param: str) -> StructuredOutput:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):  # nested past the interpreter's limit: not a schema either
            raise InvalidRequest(f"{param} must be a JSON schema (an object or its JSON text)", param) from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{param} must be a JSON schema object", param)
    return StructuredOutput.from_schema(value)


def _parse(value: Any) -> StructuredOutput | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{FIELD} must be an object", FIELD)
    kind = value.get("type")
    if kind == "text":
        _only(value, {"type"})
        return None
    if kind == "json_object":
        _only(value, {"type"})
        return StructuredOutput.any_object()
    if kind == "json_schema":
        _only(value, {"type", "json_schema"})
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequest(f"{FIELD}.json_schema must be an object with a name and a schema", FIELD)
        _only(spec, {"name", "description", "schema", "strict"}, f"{FIELD}.json_schema")
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise InvalidRequest(f"{FIELD}.json_schema.name must be a non-empty string", FIELD)
        if "strict" in spec and not isinstance(spec["strict"], (bool, type(None))):
            raise InvalidRequest(f"{FIELD}.json_schema.strict must be a boolean", FIELD)
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise InvalidRequest(f"{FIELD}.json_schema.schema must be a JSON schema object", FIELD)
        return StructuredOutput.from_schema(schema)
    raise InvalidRequest(f"{FIELD}.type must be 'text', 'json_object' or 'json_schema', got {kind!r}", FIELD)


def _only(value: Mapping[str, Any], allowed: set[str], where: str = FIELD) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise InvalidRequest(f"{where} does not take {', '.join(unknown)}", where.split(".")[0])
