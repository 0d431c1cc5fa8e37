"""A thinking model's answer split into its reasoning and its content (vLLM's and SGLang's
``--reasoning-parser qwen3``): the text inside ``<think>`` ... ``</think>`` is the message's
``reasoning_content``, the rest its ``content``.

Qwen3-VL's Thinking checkpoints open the block in the prompt (their chat template ends the
generation prompt with ``<think>``), so the answer holds only the closing tag; older templates
leave the model to write ``<think>`` itself. Which one applies is read from the prompt: when its
last think tag is an opening one, the answer starts inside the block; otherwise only an answer
that itself starts with ``<think>`` (after whitespace) has reasoning, and one that never writes
it (an Instruct model, or a template that closed the block in the prompt to turn thinking off) is
content throughout. An answer cut inside the block (max_tokens) is reasoning throughout.

Streamed and whole answers are split by the same parser, so they agree: text is held back only
while it may still be the start of a tag.
"""

from __future__ import annotations

import dataclasses

OPEN = "<think>"
CLOSE = "</think>"
PARSERS = ("qwen3",)
"""The ``--reasoning-parser`` names; each reads the tags above."""


@dataclasses.dataclass
class Split:
    reasoning: str = ""
    content: str = ""

    def add(self, other: Split) -> Split:
        return Split(self.reasoning + other.reasoning, self.content + other.content)


def opens_thinking(prompt_tail: str) -> bool:
    """Whether a prompt ending with ``prompt_tail`` leaves a think block open."""
    return prompt_tail.rfind(OPEN) > prompt_tail.rfind(CLOSE)


class ReasoningParser:
    """One answer's text, fed piece by piece; ``finish`` once it has ended."""

    def __init__(self, in_reasoning: bool):
        self._state = "reasoning" if in_reasoning else "start"
        self._pending = ""  # text not yet known to be reasoning, a tag or content

    def feed(self, text: str) -> Split:
        self._pending += text
        out = Split()
        while True:
            if self._state == "start":
                head = self._pending.lstrip()
                if head.startswith(OPEN):
                    self._pending, self._state = head[len(OPEN):], "reasoning"
                    continue
                if OPEN.startswith(head):  # whitespace, or a tag begun: wait for more
                    return out
                self._state = "content"
            if self._state == "content":
                out.content += self._pending
                self._pending = ""
                return out
            end = self._pending.find(CLOSE)
            if end >= 0:
                out.reasoning += self._pending[:end]
                self._pending, self._state = self._pending[end + len(CLOSE):], "content"
                continue
            keep = partial_tag(self._pending, CLOSE)
            out.reasoning += self._pending[:len(self._pending) - keep]
            self._pending = self._pending[len(self._pending) - keep:]
            return out

    def finish(self) -> Split:
        """The rest: text held back as a possible tag is what it was written as."""
        rest, self._pending = self._pending, ""
        return Split(reasoning=rest) if self._state == "reasoning" else Split(content=rest)


def split_reasoning(text: str, in_reasoning: bool) -> Split:
    """A whole answer's reasoning and content."""
    parser = ReasoningParser(in_reasoning)
    return parser.feed(text).add(parser.finish())


def partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that may be the start of ``tag`` (held back by a
    streaming parser until the next piece says whether it is one)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
