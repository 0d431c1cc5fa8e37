"""What a request asks its output to be: any JSON object, or JSON valid under a schema.

``StructuredOutput`` is plain data (no xgrammar object), so it travels in ``SamplingParams`` and
its ``key`` names the compiled grammar in the cache. ``check`` converts the schema to a grammar
without the tokenizer: cheap, and it refuses what xgrammar cannot enforce, before anything is queued.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

# `json_object` is the grammar of this schema: any JSON object.
ANY_OBJECT_SCHEMA = '{"type":"object"}'


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """json_schema: the schema as canonical JSON text (sorted keys, no spaces), which is also the
    grammar's cache key; ANY_OBJECT_SCHEMA for OpenAI's ``json_object``."""

    json_schema: str

    def __post_init__(self):
        if not isinstance(self.json_schema, str):
            raise ValueError(f"json_schema must be JSON text, got {type(self.json_schema).__name__}")

    @classmethod
    def from_schema(cls, schema: Mapping[str, Any] | bool) -> "StructuredOutput":
        if not isinstance(schema, (Mapping, bool)):
            raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return cls(json.dumps(schema, sort_keys=True, separators=(",", ":")))

    @classmethod
    def any_object(cls) -> "StructuredOutput":
        return cls(ANY_OBJECT_SCHEMA)

    def check(self) -> None:
        """Raises ValueError when xgrammar cannot turn the schema into a grammar."""
        import xgrammar

        try:
            xgrammar.Grammar.from_json_schema(self.json_schema, **GRAMMAR_OPTIONS)
        except (RuntimeError, ValueError, TypeError) as error:
            raise ValueError(f"invalid JSON schema: {_first_line(error)}") from None


# Compact JSON: no whitespace between tokens. With `any_whitespace` a weak (or random) model can
# spend its whole budget on spaces and newlines, which the grammar would have to allow.
GRAMMAR_OPTIONS = {"any_whitespace": False, "separators": (",", ":"), "strict_mode": True}


def _first_line(error: Exception) -> str:
    """xgrammar's messages start with a timestamp and a C++ source location; keep what follows."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text
