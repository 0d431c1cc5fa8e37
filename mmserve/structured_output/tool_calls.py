"""The grammar of an answer that must call a tool, in the format Qwen3(-VL) is trained on:

    <tool_call>
    {"name": "<function>", "arguments": <JSON valid under the function's parameters>}
    </tool_call>

xgrammar builds it (``get_model_structural_tag``, its "qwen_3" format: the Hermes-style calls of
Qwen3's chat template) as a structural tag, which travels as JSON text in a ``StructuredOutput``
like any schema. The router's parser (``serving/router/tool_parser.py``) reads the same format back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mmserve.structured_output.spec import StructuredOutput, first_line

TOOL_CALL_FORMAT = "qwen_3"
"""xgrammar's name for the <tool_call> JSON format; Qwen3-VL's Instruct models do not reason
first (no <think> block), so the grammar starts with the call."""

MAX_WHITESPACE = 4
"""The longest run of whitespace allowed between the arguments' JSON tokens: enough for the
template's ", " and ": " and a shallow indent, and bounded so that a weak model cannot spend its
whole budget on spaces inside a call."""


def tool_calls_output(functions: Sequence[Mapping[str, Any]], forced: str | None = None,
                      parallel: bool = True) -> StructuredOutput:
    """The answer's grammar when it must call a tool. ``functions``: the request's function
    definitions (name, parameters...). ``forced`` None is OpenAI's ``tool_choice: "required"``: the
    answer starts with a call to one of them (more calls, or text, may follow until the model
    stops); a name forces exactly one call to that function and nothing else. ``parallel`` False
    (OpenAI's ``parallel_tool_calls``) allows one call only.

    Raises ValueError when xgrammar refuses the functions (their parameters are no schema it can
    enforce)."""
    import xgrammar

    tools = [{"type": "function", "function": _object_arguments(function)} for function in functions]
    choice = "required" if forced is None else {"type": "function", "function": {"name": forced}}
    try:
        tag = xgrammar.get_model_structural_tag(TOOL_CALL_FORMAT, tools=tools, tool_choice=choice,
                                                reasoning="disabled", max_whitespace_cnt=MAX_WHITESPACE,
                                                parallel_tool_calls=parallel)
    except ValueError as error:  # pydantic's ValidationError is one
        raise ValueError(f"invalid tools: {first_line(error)}") from None
    spec = StructuredOutput(structural_tag=tag.model_dump_json())
    spec.check()
    return spec


def _object_arguments(function: Mapping[str, Any]) -> dict[str, Any]:
    """The function as xgrammar is to enforce it: its arguments an object (OpenAI's), whatever it
    says. xgrammar turns missing parameters, and ``"strict": false``, into the schema ``true``: any
    JSON value (a string, ``true``), which the answer's parser does not take for a call, so a call
    the grammar forced came back as plain text."""
    function = {key: value for key, value in function.items() if key != "strict"}
    if function.get("parameters") is None:
        function["parameters"] = {"type": "object"}
    return function
