"""Structured output: a request's JSON schema enforced by a grammar (xgrammar), one token at a time."""

import importlib.util

from mmserve.structured_output.spec import StructuredOutput

AVAILABLE = importlib.util.find_spec("xgrammar") is not None
"""Whether the grammar library is installed (the ``structured`` extra); without it, requests asking
for a response_format are refused."""

__all__ = ["AVAILABLE", "StructuredOutput"]
