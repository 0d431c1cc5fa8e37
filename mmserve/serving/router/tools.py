"""OpenAI's ``tools`` and ``tool_choice`` on chat completions.

The functions are rendered into the prompt by the model's chat template (Qwen3-VL's "# Tools"
system block) and the answer's ``<tool_call>`` blocks are parsed back into ``tool_calls``
(``tool_parser.py``). ``tool_choice``:

- ``"auto"`` (the default with tools): the template and the parser, no grammar; works on every
  backend.
- ``"required"`` or ``{"type": "function", "function": {"name": ...}}``: a grammar makes the answer
  start with a call (to the named function: exactly one call), so it needs a backend that enforces
  grammars, as ``response_format`` does.
- ``"none"``: the model answers as if no tools were given (they are checked, not rendered).

Everything wrong with them is a 400 before anything is queued, schemas included (each tool's
parameters must be a schema xgrammar can enforce, when it is installed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from mmserve.serving.router.errors import InvalidRequest
from mmserve.serving.router.fields import without_nulls
from mmserve.structured_output import AVAILABLE as GRAMMARS_AVAILABLE, StructuredOutput
from mmserve.structured_output.spec import check_cost

FIELDS = {"tools", "tool_choice", "parallel_tool_calls"}
MAX_TOOLS = 128
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""OpenAI's rule for function names; it also keeps a name literal inside the grammar and the prompt."""
TOOL_KEYS = {"type", "function"}
FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
CHOICES = ("none", "auto", "required")


@dataclasses.dataclass(frozen=True)
class Tools:
    """definitions: the tools as the client sent them, null fields left out, for the template.
    grammar: what enforces a required or named choice (None for "auto").
    parallel: OpenAI's ``parallel_tool_calls``; False: an answer makes one call at most (the
    grammar allows one, and an answer's later calls are dropped, as vLLM drops them)."""

    definitions: tuple[dict[str, Any], ...]
    grammar: StructuredOutput | None = None
    parallel: bool = True


async def requested_tools(body: Mapping[str, Any], backend) -> Tools | None:
    """The request's tools; None when it has none or its tool_choice is "none"."""
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    if "tools" not in body:
        for name in ("tool_choice", "parallel_tool_calls"):
            if body.get(name) is not None:
                raise InvalidRequest(f"{name} needs tools", name)
        return None
    definitions = _definitions(body["tools"])
    functions = [tool["function"] for tool in definitions]
    choice, forced = _choice(body.get("tool_choice", "auto"), {f["name"] for f in functions})
    if choice in ("required", "function") and not (GRAMMARS_AVAILABLE and
                                                   getattr(backend, "supports_structured_output", False)):
        raise InvalidRequest(f"tool_choice {choice!r} is not supported by this server: it needs the grammar "
                             "library (pip install 'mmserve[structured]'); 'auto' works without", "tool_choice")
    parallel = parallel is not False
    grammar = await asyncio.to_thread(_checked_grammar, functions, choice, forced, parallel)
    return None if choice == "none" else Tools(definitions, grammar, parallel)


def _definitions(tools: Any) -> tuple[dict[str, Any], ...]:
    """The tools, checked, without their null fields (a null ``description`` or ``parameters`` is
    absent, as for OpenAI)."""
    if not isinstance(tools, list) or not tools:
        raise InvalidRequest("tools must be a non-empty list of function tools", "tools")
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"tools takes at most {MAX_TOOLS} functions, got {len(tools)}", "tools")
    seen: set[str] = set()
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InvalidRequest(f"{where}.type must be 'function'", where)
        tool = without_nulls(tool)
        _only(tool, TOOL_KEYS, where)
        function = tool.get("function")
        if not isinstance(function, dict):
            raise InvalidRequest(f"{where}.function must be an object", f"{where}.function")
        function = without_nulls(function)
        _only(function, FUNCTION_KEYS, f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise InvalidRequest(f"{where}.function.name must be 1 to 64 letters, digits, underscores or dashes, "
                                 f"got {name!r}", f"{where}.function.name")
        if name in seen:
            raise InvalidRequest(f"two tools are named {name!r}", f"{where}.function.name")
        seen.add(name)
        if "description" in function and not isinstance(function["description"], str):
            raise InvalidRequest(f"{where}.function.description must be a string", f"{where}.function.description")
        if "parameters" in function and not (isinstance(function["parameters"], dict)
                                             and function["parameters"].get("type", "object") == "object"):
            raise InvalidRequest(f"{where}.function.parameters must be a JSON schema of an object (the call's "
                                 "arguments)", f"{where}.function.parameters")
        if "strict" in function and not isinstance(function["strict"], bool):
            raise InvalidRequest(f"{where}.function.strict must be a boolean", f"{where}.function.strict")
        out.append({**tool, "function": function})
    return tuple(out)


def _choice(value: Any, names: set[str]) -> tuple[str, str | None]:
    if isinstance(value, str):
        if value not in CHOICES:
            raise InvalidRequest(f"tool_choice must be one of {list(CHOICES)} or a named function, got {value!r}",
                                 "tool_choice")
        return value, None
    function = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or set(value) != TOOL_KEYS:
        raise InvalidRequest('a named tool_choice is {"type": "function", "function": {"name": ...}}', "tool_choice")
    _only(function, {"name"}, "tool_choice.function")
    if function["name"] not in names:
        raise InvalidRequest(f"tool_choice names the function {function['name']!r}, which is not among tools",
                             "tool_choice")
    return "function", function["name"]


def _checked_grammar(functions: list[dict[str, Any]], choice: str, forced: str | None,
                     parallel: bool = True) -> StructuredOutput | None:
    """Checks every function's parameters (in a worker thread: xgrammar converts each schema), then
    builds the grammar a required or named choice needs."""
    if not GRAMMARS_AVAILABLE:
        return None
    try:  # all the functions' schemas together, before xgrammar converts any
        check_cost([f["parameters"] for f in functions if "parameters" in f], "invalid tools' parameters")
    except ValueError as error:
        raise InvalidRequest(str(error), "tools") from None
    for i, function in enumerate(functions):
        if "parameters" in function:
            try:
                StructuredOutput.from_schema(function["parameters"]).check()
            except ValueError as error:
                raise InvalidRequest(f"tools[{i}].function.parameters: {error}",
                                     f"tools[{i}].function.parameters") from None
    if choice not in ("required", "function"):
        return None
    from mmserve.structured_output.tool_calls import tool_calls_output

    try:
        return tool_calls_output(functions, forced, parallel)
    except ValueError as error:
        raise InvalidRequest(str(error), "tools") from None


def _only(value: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise InvalidRequest(f"{where} does not take {', '.join(unknown)}", where)
