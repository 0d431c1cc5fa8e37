"""An answer's ``<tool_call>`` blocks read back into OpenAI tool calls, whole or as it streams.

Qwen3(-VL) calls a function by writing

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(the format its chat template describes, the same vLLM's hermes parser reads). A block whose JSON
is an object with a string ``name`` and an object ``arguments`` becomes a call; any other text,
malformed blocks and a block the answer never closed (cut by max_tokens) included, stays content.
The whitespace that separates content from a call is dropped, so an answer without calls keeps its
text exactly.

The whole answer is parsed by streaming it in one piece, so both modes give the same content and
calls: a stream sends content as soon as it cannot be the start of a call, and each call whole,
once its ``</tool_call>`` arrives (vLLM streams the arguments piecewise as they arrive; a block is
known to be a call only when it closes, so here it is sent then).
"""

from __future__ import annotations

import dataclasses
import json
import math

from mmserve.serving.router.reasoning_parser import partial_tag

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """name: the function; arguments: its arguments as JSON text (OpenAI's ``function.arguments``)."""

    name: str
    arguments: str


@dataclasses.dataclass
class Parsed:
    """What a piece of the answer adds: content text and the calls that closed in it."""

    content: str = ""
    calls: list[ToolCall] = dataclasses.field(default_factory=list)

    def add(self, other: Parsed) -> Parsed:
        return Parsed(self.content + other.content, self.calls + other.calls)


class ToolCallParser:
    """One answer's text, fed piece by piece; ``finish`` once it has ended."""

    def __init__(self):
        self._pending = ""  # text not yet known to be content or a call
        self._in_call = False  # _pending follows an OPEN
        self._held_space = ""  # trailing whitespace of the content: sent once more content follows
        self._after_call = False  # drop the whitespace that follows a call
        self._out = Parsed()

    def feed(self, text: str) -> Parsed:
        self._pending += text
        while self._step():
            pass
        return self._take()

    def finish(self) -> Parsed:
        """The rest: an unclosed block or a partial "<tool_c" is content, and so is held whitespace."""
        self._content(OPEN + self._pending if self._in_call else self._pending)
        self._pending, self._in_call = "", False
        self._out.content += self._held_space
        self._held_space = ""
        return self._take()

    def _step(self) -> bool:
        """Consumes what can be decided in ``_pending``; False when it must wait for more text."""
        if self._in_call:
            end = self._pending.find(CLOSE)
            if end < 0:
                return False
            block, self._pending, self._in_call = self._pending[:end], self._pending[end + len(CLOSE):], False
            call = _call(block)
            if call is None:
                self._content(OPEN + block + CLOSE)
            else:
                self._out.calls.append(call)
                self._held_space, self._after_call = "", True
            return True
        start = self._pending.find(OPEN)
        if start >= 0:
            self._content(self._pending[:start])
            self._pending, self._in_call = self._pending[start + len(OPEN):], True
            return True
        keep = partial_tag(self._pending, OPEN)
        self._content(self._pending[:len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep:]
        return False

    def _content(self, text: str) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        text = self._held_space + text
        sent = text.rstrip()
        self._held_space = text[len(sent):]
        self._out.content += sent

    def _take(self) -> Parsed:
        out, self._out = self._out, Parsed()
        return out


def parse_tool_calls(text: str) -> Parsed:
    """A whole answer's content and calls."""
    parser = ToolCallParser()
    return parser.feed(text).add(parser.finish())


def _call(block: str) -> ToolCall | None:
    try:
        value = json.loads(block, parse_constant=_refuse, parse_float=_finite)
    except (ValueError, RecursionError):  # nested deeper than the json module recurses: not a call
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _refuse(constant: str):
    """NaN and Infinity are not JSON, though Python's parser takes them."""
    raise ValueError(f"{constant} is not JSON")


def _finite(text: str) -> float:
    """A number past a double's range (``1e999``) would be read as infinity and written back as
    ``Infinity``, which is not JSON: such a block is not a call."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} does not fit a double")
    return value
