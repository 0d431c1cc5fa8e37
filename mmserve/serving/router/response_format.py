"""OpenAI's ``response_format``: ``text`` (no constraint), ``json_object``, or ``json_schema``;
and vLLM's ``guided_json`` (a schema, as an object or JSON text, sent through ``extra_body``).

The schema is turned into a grammar here, in a worker thread, before anything is queued, so one
xgrammar cannot enforce is a 400 naming ``response_format``; the engine then compiles it against
the vocabulary off its step (with disaggregated roles, prefill's and decode's engines each do).
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
GUIDED_JSON = "guided_json"
FIELDS = {FIELD, GUIDED_JSON}


async def structured_output(body: Mapping[str, Any], backend) -> StructuredOutput | None:
    if FIELD in body and GUIDED_JSON in body:
        raise InvalidRequest(f"give either {FIELD} or {GUIDED_JSON}, not both", GUIDED_JSON)
    spec = _guided_json(body[GUIDED_JSON]) if GUIDED_JSON in body else _parse(body.get(FIELD))
    if spec is None:
        return None
    if not getattr(backend, "supports_structured_output", False):
        raise InvalidRequest(f"{FIELD} is not supported by this server: it needs the grammar library "
                             "(pip install 'mmserve[structured]')", FIELD)
    try:
        await asyncio.to_thread(spec.check)
    except ValueError as error:
        raise InvalidRequest(str(error), GUIDED_JSON if GUIDED_JSON in body else FIELD) from None
    return spec


def _guided_json(value: Any) -> StructuredOutput:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):  # nested past the interpreter's limit: not a schema either
            raise InvalidRequest(f"{GUIDED_JSON} must be a JSON schema (an object or its JSON text)",
                                 GUIDED_JSON) from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{GUIDED_JSON} must be a JSON schema object", GUIDED_JSON)
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
        raise InvalidRequest(f"{where} does not take {', '.join(unknown)}", FIELD)
