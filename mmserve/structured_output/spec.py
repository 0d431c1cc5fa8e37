"""What a request asks its output to be: any JSON object, JSON valid under a schema, text in a
shape an xgrammar structural tag describes (tool calls, ``tool_calls.py``), text matching a regular
expression, one of a list of choices, or text of an EBNF grammar (xgrammar's GBNF dialect).

``StructuredOutput`` is plain data (no xgrammar object), so it travels in ``SamplingParams``; its
``key()`` (a digest of its text) keys its compiled grammar in the cache. ``check`` converts it to a
grammar without the tokenizer: cheap, and it refuses what xgrammar cannot enforce, before anything
is queued.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

# `json_object` is the grammar of this schema: any JSON object.
ANY_OBJECT_SCHEMA = '{"type":"object"}'

# xgrammar's conversion of a schema grows with the cube of its nesting: 31 nested objects (a JSON
# depth of 63) take ~4 ms, 450 took seconds on every check, one of them on the engine's thread,
# stalling every other request. Deeper schemas are refused (a 400) before xgrammar sees them.
MAX_JSON_DEPTH = 64

# A counted repetition in a regular expression ("pattern", "patternProperties") is unrolled by
# xgrammar, at a cost growing with the square of the count: `a{1000}` ~0.07 s, `a{3000}` 0.5 s,
# `a{20000}` 32 s, on every check (the router's, then the engine's), with nothing to stop it. The
# counts of a schema's patterns together are bounded instead (a 400 past it); `*`, `+` and `?` cost
# nothing of the kind and are not counted.
MAX_PATTERN_REPEATS = 2000

# xgrammar compiles an object's optional properties at a cost growing with about the cube of their
# count (the order they may come in): 300 took 1.3 s, 1,000 took 16.5 s at a 151,936-token
# vocabulary, on the engine's one compile thread, with no way to stop it (2026-12-07, a review's
# measurement). The optional properties of a request's schemas together are bounded (a 400 past it).
MAX_OPTIONAL_PROPERTIES = 256

# xgrammar spells out every literal a schema names (a const, each enum value, each property's name)
# as grammar states and keeps a token mask for each: a 100,000-character const compiled in 0.64 s
# into 51 MB, a 1,000,000-character one in 19 s into 471 MB (2026-12-07, the tiny vocabulary), on
# the engine's one compile thread. Their characters together are bounded, as OpenAI bounds them.
MAX_LITERAL_CHARS = 120_000

# A regular expression or grammar is compiled at a cost growing with its text: 20,000 alternatives
# of one word (~190,000 characters) took 1.0 s and 41 MB at a 151,936-token vocabulary (2026-12-08,
# xgrammar 0.2.9; counted repetitions cost little there: `[a-z]{1,300000}` 0.2 s, 31 MB). Their text
# is bounded as literals are.
MAX_GRAMMAR_CHARS = MAX_LITERAL_CHARS

# What xgrammar's compile costs in a regular expression, or in one rule of a grammar, is its
# quantifiers (?, *, +, {n,m}) and the alternatives inside its groups, growing with about their
# square: `a?` x 100 took 1.7 s, x 500 58 s and gigabytes, `("a" | "")` x 200 3.8 s (2026-12-08,
# a review; 151,936 tokens), in the engine's one compile thread, which no one can stop. 32 take
# ~0.1 s. Alternatives outside any group (a list of choices, a rule's own branches) cost little
# (20,000: 1 s) and are bounded by the length alone.
MAX_GRAMMAR_OPERATORS = 32
MAX_GRAMMAR_OPERATORS_TOTAL = 256
"""Over all of a grammar's rules: each rule's cost adds up (200 rules of 32: 11.5 s; 20: 1.2 s)."""

KINDS = {"json_schema": "JSON schema", "structural_tag": "structural tag", "regex": "regular expression",
         "grammar": "grammar"}
"""The fields of a StructuredOutput, and what its messages call each."""

MAX_CHECKED = 32
"""Specs remembered as checked (their digests: a request's schema may be megabytes of text)."""
_checked: OrderedDict[bytes, None] = OrderedDict()
_checked_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """Exactly one of:
    json_schema: the schema as canonical JSON text (sorted keys, no spaces); ANY_OBJECT_SCHEMA for
        OpenAI's ``json_object``.
    structural_tag: an xgrammar structural tag as JSON text (``StructuralTag.model_dump_json``).
    regex: a regular expression the whole output matches.
    grammar: an EBNF grammar (xgrammar's dialect, GBNF: ``root ::= ...``) the output is a sentence of;
        ``from_choice`` writes one for a list of choices."""

    json_schema: str = ""
    structural_tag: str = ""
    regex: str = ""
    grammar: str = ""

    def __post_init__(self):
        for name in KINDS:
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be text, got {type(getattr(self, name)).__name__}")
        if sum(bool(getattr(self, name)) for name in KINDS) != 1:
            raise ValueError(f"structured output needs exactly one of {', '.join(KINDS)}")

    @classmethod
    def from_schema(cls, schema: Mapping[str, Any] | bool) -> "StructuredOutput":
        if not isinstance(schema, (Mapping, bool)):
            raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return cls(json.dumps(schema, sort_keys=True, separators=(",", ":")))

    @classmethod
    def any_object(cls) -> "StructuredOutput":
        return cls(ANY_OBJECT_SCHEMA)

    @classmethod
    def from_regex(cls, pattern: str) -> "StructuredOutput":
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("a regular expression must be a non-empty string")
        return cls(regex=pattern)

    @classmethod
    def from_grammar(cls, grammar: str) -> "StructuredOutput":
        if not isinstance(grammar, str) or not grammar.strip():
            raise ValueError("a grammar must be a non-empty string")
        return cls(grammar=grammar)

    @classmethod
    def from_choice(cls, choices: list[str] | tuple[str, ...]) -> "StructuredOutput":
        """The output is exactly one of ``choices`` (vLLM's ``choice``): a grammar of their literals."""
        if not isinstance(choices, (list, tuple)) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError("choices must be a non-empty list of non-empty strings")
        # JSON's string escapes are the grammar's: quotes, backslashes and control characters
        # escaped, every other character as it is (a \u escape of an astral character would be a
        # surrogate pair, which xgrammar reads as two characters)
        return cls(grammar="root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in dict.fromkeys(choices)))

    def after_reasoning(self, end: str) -> "StructuredOutput":
        """This constraint from the point the model closes its reasoning with ``end`` on (what it
        thinks before is free text), as vLLM applies a request's structured output to a reasoning
        model's answer only: an xgrammar structural tag, the free text, up to two whitespace
        characters (the blank line Qwen writes after ``</think>``), then this constraint. (A JSON
        schema there may take single whitespace characters between its tokens, where alone its
        JSON is compact.)"""
        if self.json_schema:
            constraint = {"type": "json_schema", "json_schema": json.loads(self.json_schema), "max_whitespace_cnt": 1}
        elif self.regex:
            constraint = {"type": "regex", "pattern": self.regex}
        elif self.grammar:
            constraint = {"type": "grammar", "grammar": self.grammar}
        else:
            constraint = json.loads(self.structural_tag)["format"]
        thinking = {"type": "tag", "begin": "", "content": {"type": "any_text"}, "end": end}
        spacing = {"type": "regex", "pattern": r"\s{0,2}"}  # Qwen writes "</think>\n\n" before its answer
        return StructuredOutput(structural_tag=json.dumps(
            {"type": "structural_tag", "format": {"type": "sequence", "elements": [thinking, spacing, constraint]}},
            separators=(",", ":")))

    @property
    def kind(self) -> str:
        return next(name for name in KINDS if getattr(self, name))

    @property
    def text(self) -> str:
        return getattr(self, self.kind)

    def key(self) -> bytes:
        """A digest of the spec, which the caches keep instead of its text."""
        return hashlib.sha256(f"{self.kind}:{self.text}".encode()).digest()

    def check(self) -> None:
        """Raises ValueError when xgrammar cannot turn the spec into a grammar. A spec that
        passed is remembered: the router checks it off its loop, and the engine's own check of the
        same spec (on its thread) is then free."""
        key = self.key()
        with _checked_lock:
            if key in _checked:
                _checked.move_to_end(key)
                return
        _check(self)
        with _checked_lock:
            _checked[key] = None
            while len(_checked) > MAX_CHECKED:
                _checked.popitem(last=False)


def _check(spec: StructuredOutput) -> None:
    import xgrammar

    kind, text = KINDS[spec.kind], spec.text
    if spec.regex or spec.grammar:
        if len(text) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"invalid {kind}: {len(text)} characters, more than this server accepts "
                             f"({MAX_GRAMMAR_CHARS})")
        counts = branch_operators(text, grammar=bool(spec.grammar))
        if max(counts) > MAX_GRAMMAR_OPERATORS:
            raise ValueError(f"invalid {kind}: {max(counts)} quantifiers and alternatives inside groups in one "
                             f"{'rule' if spec.grammar else 'expression'}, more than this server accepts "
                             f"({MAX_GRAMMAR_OPERATORS})")
        if sum(counts) > MAX_GRAMMAR_OPERATORS_TOTAL:
            raise ValueError(f"invalid {kind}: {sum(counts)} quantifiers and alternatives inside groups in all, "
                             f"more than this server accepts ({MAX_GRAMMAR_OPERATORS_TOTAL})")
    else:
        if (depth := json_depth(text)) > MAX_JSON_DEPTH:
            raise ValueError(f"invalid {kind}: nested {depth} levels deep, more than this server accepts "
                             f"({MAX_JSON_DEPTH})")
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            document = None  # not JSON: xgrammar says so below
        check_cost([document], f"invalid {kind}")
    try:
        if spec.json_schema:
            xgrammar.Grammar.from_json_schema(spec.json_schema, **GRAMMAR_OPTIONS)
        elif spec.structural_tag:
            xgrammar.Grammar.from_structural_tag(spec.structural_tag)
        elif spec.regex:
            xgrammar.Grammar.from_regex(spec.regex)
        else:
            xgrammar.Grammar.from_ebnf(spec.grammar)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ValueError(f"invalid {kind}: {first_line(error)}") from None


def check_cost(documents: Iterable[Any], what: str) -> None:
    """Raises ValueError (its message starting with ``what``) when schemas, together, would cost
    xgrammar more than this server allows: counted repetitions in their patterns past
    MAX_PATTERN_REPEATS, optional object properties past MAX_OPTIONAL_PROPERTIES, literals'
    characters past MAX_LITERAL_CHARS. Together: a request's tools are checked one by one, each
    within the bounds, 128 of them 22 s of CPU."""
    repeats = optional = literals = 0
    for document in documents:
        repeats += sum(pattern_repeats(pattern) for pattern in _patterns(document))
        optional += _optional_properties(document)
        literals += _literal_chars(document)
    if repeats > MAX_PATTERN_REPEATS:
        raise ValueError(f"{what}: its patterns' counted repetitions ({{n}}, {{n,m}}) add up to {repeats}, "
                         f"more than this server accepts ({MAX_PATTERN_REPEATS})")
    if optional > MAX_OPTIONAL_PROPERTIES:
        raise ValueError(f"{what}: {optional} optional object properties (not in their object's "
                         f"\"required\"), more than this server accepts ({MAX_OPTIONAL_PROPERTIES})")
    if literals > MAX_LITERAL_CHARS:
        raise ValueError(f"{what}: its property names, enum values and consts add up to {literals} "
                         f"characters, more than this server accepts ({MAX_LITERAL_CHARS})")


_DATA_KEYWORDS = frozenset({"default", "examples", "enum", "const"})
"""Keywords whose values are JSON data, not schemas: a "properties" or "pattern" in them is a value."""
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
"""Keywords whose values map names to schemas: a property named "properties" is a name."""


def _schema_nodes(node: Any):
    """Every object of a schema (or of a structural tag holding schemas) that is a schema, at any
    depth (no deeper than MAX_JSON_DEPTH, checked first): not the data in its defaults, examples,
    enums and constants, nor the name maps of its properties and definitions."""
    if isinstance(node, dict):
        yield node
        for key, value in node.items():
            if key in _DATA_KEYWORDS:
                continue
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                for schema in value.values():
                    yield from _schema_nodes(schema)
            else:
                yield from _schema_nodes(value)
    elif isinstance(node, list):
        for item in node:
            yield from _schema_nodes(item)


def _optional_properties(document: Any) -> int:
    """Properties of every object schema that their object does not require."""
    count = 0
    for node in _schema_nodes(document):
        properties, required = node.get("properties"), node.get("required")
        if isinstance(properties, dict):
            needed = {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
            count += sum(key not in needed for key in properties)
    return count


def _literal_chars(document: Any) -> int:
    """Characters of the literals the grammar spells out: consts and enum values (as JSON text),
    property names."""
    count = 0
    for node in _schema_nodes(document):
        if "const" in node:
            count += len(json.dumps(node["const"], ensure_ascii=False))
        if isinstance(node.get("enum"), list):
            count += sum(len(json.dumps(value, ensure_ascii=False)) for value in node["enum"])
        if isinstance(node.get("properties"), dict):
            count += sum(len(name) for name in node["properties"])
    return count


def _patterns(document: Any):
    """Every regular expression of a schema: "pattern" values and "patternProperties" keys."""
    for node in _schema_nodes(document):
        if isinstance(node.get("pattern"), str):
            yield node["pattern"]
        if isinstance(node.get("patternProperties"), dict):
            yield from node["patternProperties"]


_ESCAPE = re.compile(r"\\.")
_CHARACTER_CLASS = re.compile(r"\[\]?[^\]]*\]")
_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")


_GRAMMAR_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


_RULE_HEAD = re.compile(r"[\w.-]+\s*::=")


def branch_operators(text: str, grammar: bool) -> list[int]:
    """The quantifiers and the alternatives inside groups of a regular expression, or of each rule
    of a grammar (its string literals not read, a rule running to the next rule's head however
    many lines it takes); escapes and character classes are not counted."""
    text = _CHARACTER_CLASS.sub("c", _ESCAPE.sub("e", _GRAMMAR_STRING.sub("s", text) if grammar else text))
    return [_operators(rule) for rule in (_RULE_HEAD.split(text) if grammar else [text])]


def _operators(text: str) -> int:
    count, depth = 0, 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth = max(depth - 1, 0)
        elif char in "?*+{" or char == "|" and depth:
            count += 1
    return count


def pattern_repeats(pattern: str) -> int:
    """The counts of a regular expression's counted repetitions, added up (``{n,m}`` counts m,
    ``{n,}`` n); escaped braces and braces in character classes are not repetitions."""
    text = _CHARACTER_CLASS.sub("c", _ESCAPE.sub("e", pattern))
    return sum(int(high) if high else int(low) for low, high in _REPEAT.findall(text))


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """How deeply JSON text nests its objects and arrays (brackets inside strings not counted)."""
    depth = deepest = 0
    for bracket in _BRACKET.findall(_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


# Compact JSON: no whitespace between tokens. With `any_whitespace` a weak (or random) model can
# spend its whole budget on spaces and newlines, which the grammar would have to allow.
GRAMMAR_OPTIONS = {"any_whitespace": False, "separators": (",", ":"), "strict_mode": True}


def first_line(error: Exception) -> str:
    """xgrammar's messages start with a timestamp and a C++ source location; keep what follows."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text
