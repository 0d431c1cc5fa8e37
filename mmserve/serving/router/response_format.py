"""OpenAI's ``response_format``: ``text`` (no constraint), ``json_object``, or ``json_schema``.

The schema is turned into a grammar here, in a worker thread, before anything is queued, so one
xgrammar cannot enforce is a 400 naming ``response_format``; the engine then compiles it against
the vocabulary off its step. Backends that cannot enforce a grammar (disaggregated workers, for
now) refuse it with a 400 rather than ignore it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from mmserve.serving.router.errors import InvalidRequest
from mmserve.structured_output import StructuredOutput

FIELD = "response_format"


async def structured_output(body: Mapping[str, Any], backend) -> StructuredOutput | None:
    spec = _parse(body.get(FIELD))
    if spec is None:
        return None
    if not getattr(backend, "supports_structured_output", False):
        raise InvalidRequest(f"{FIELD} is not supported by this server's backend (disaggregated mode); "
                             "use --role colocated", FIELD)
    try:
        await asyncio.to_thread(spec.check)
    except ValueError as error:
        raise InvalidRequest(str(error), FIELD) from None
    return spec


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
