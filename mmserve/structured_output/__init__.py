"""Structured output: a request's JSON schema enforced by a grammar (xgrammar), one token at a time."""

from mmserve.structured_output.spec import StructuredOutput

__all__ = ["StructuredOutput"]
