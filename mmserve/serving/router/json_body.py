"""The request body as JSON; whatever is malformed about it is a 400 saying why, never a 500.

msgspec's decoder refuses what Python's ``json`` lets through to fail later: invalid UTF-8, lone
UTF-16 surrogates (``"\\ud800"``, which raise when the text is encoded), NaN and Infinity, integers
longer than 4300 digits and floats beyond double range. Nesting deeper than the interpreter's
recursion limit raises RecursionError, caught here too. The body's size and arrival time are
bounded before this reads it (``body_guard``).

The size does not bound what decoding costs: each JSON value becomes a Python object, and a body
of tiny containers (``[[],[],...]``, two bytes each) decoded to ~27 times its size (32 MiB: ~870
MB and 2-6 s of the event loop). So a body is refused before it is decoded when it may hold more
than ``MAX_JSON_VALUES`` values, counted from its bytes (:func:`json_values_at_most`).

Nor does the decoder bound nesting below the interpreter's limit: a body 600 levels deep decodes,
and then whatever walks it recursively (the chat template's copy of a tool call's arguments)
raised RecursionError, a 500. So a body nested deeper than ``MAX_JSON_DEPTH`` is refused first
(:func:`json_depth`).
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
from starlette.requests import Request

from mmserve.serving.router.errors import InvalidRequest

MAX_JSON_VALUES = 1 << 20
"""Values a request body may hold (at ~100 bytes each decoded, ~100 MB). A prompt of 262,144
token ids and a ``logit_bias`` over a 152k-token vocabulary each stay well under it."""

MAX_JSON_DEPTH = 128
"""Levels of arrays and objects a request body may nest: a request's own envelope is a few, a
JSON schema in it at most 64 more (``structured_output.spec.MAX_JSON_DEPTH``)."""

_STRUCTURAL = bytes(1 if code in b",:[{" else 0 for code in range(256))
_NESTING = bytes(1 if code in b"[{" else 255 if code in b"]}" else 0 for code in range(256))
_QUOTE = bytes(1 if code == ord('"') else 0 for code in range(256))
_SLICE_BYTES = 4 << 20


def json_values_at_most(body: bytes) -> int:
    """An upper bound on the Python objects decoding ``body`` would make: one per value and one
    per object key. An array of n values holds its bracket and n - 1 commas; an object of n
    members its brace, n - 1 commas and n colons; so the brackets, braces, commas and colons,
    plus the top value, number at least the objects.

    Counted first on the raw bytes, which counts those characters inside strings too (more, so
    still a bound; a few passes at memory speed); only a body over the limit that way is counted
    again outside its strings (:func:`_outside_strings`)."""
    count = _count(body)
    if count <= MAX_JSON_VALUES:
        return count
    return _outside_strings(body)


def _count(text: bytes) -> int:
    return text.count(b",") + text.count(b":") + text.count(b"[") + text.count(b"{") + 1


def _outside_strings(body: bytes) -> int:
    """:func:`_count` of the characters outside string literals. With escaped backslashes, then
    escaped quotes, dropped first, every quote left opens or closes a string, so a character is
    inside one where the quotes before it are odd in number (a running xor, in slices, so the
    work is bounded to a few slices' size whatever the body). Where the body is not valid JSON the
    decoder stops at its first fault, and up to there these strings are exactly the decoder's.
    (A regular expression blanking the strings took 1.4 s on 32 MiB of short strings, this 0.2.)"""
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    inside, count = 0, 1
    for start in range(0, len(text), _SLICE_BYTES):
        part = text[start:start + _SLICE_BYTES]
        parity = np.bitwise_xor.accumulate(np.frombuffer(part.translate(_QUOTE), np.uint8)) ^ inside
        inside = int(parity[-1])
        count += int(np.count_nonzero(np.frombuffer(part.translate(_STRUCTURAL), np.uint8) > parity))
    return count


def json_depth(body: bytes) -> int:
    """How deeply JSON text nests (brackets inside strings not counted), exactly where it is valid
    JSON; at most the count of its opening brackets, so a body with few of them is not scanned.
    Strings are found as in :func:`_outside_strings`; the depth is a running sum over slices."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return 0
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    inside, depth, deepest = 0, 0, 0
    for start in range(0, len(text), _SLICE_BYTES):
        part = text[start:start + _SLICE_BYTES]
        parity = np.bitwise_xor.accumulate(np.frombuffer(part.translate(_QUOTE), np.uint8)) ^ inside
        inside = int(parity[-1])
        steps = np.frombuffer(part.translate(_NESTING), np.int8).astype(np.int32) * (parity == 0)
        running = np.cumsum(steps) + depth
        deepest, depth = max(deepest, int(running.max())), int(running[-1])
    return deepest


def decode_json(body: bytes) -> Any:
    if json_values_at_most(body) > MAX_JSON_VALUES:
        raise InvalidRequest(f"the request body holds more than {MAX_JSON_VALUES} JSON values")
    if json_depth(body) > MAX_JSON_DEPTH:
        raise InvalidRequest(f"the request body's JSON is nested too deeply: more than {MAX_JSON_DEPTH} levels deep")
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as error:
        raise InvalidRequest(f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidRequest("the request body's JSON is nested too deeply") from None


async def json_body(request: Request) -> Any:
    return decode_json(await request.body())
