"""OpenAI chat messages (and tools) -> the prompt text (the model's chat template) and its images and
videos, in order.

The rendered conversation is exactly what the offline ``LLM.chat`` renders for the same messages
with the images given as ``{"type": "image", "image": PIL.Image}`` parts and the videos as
``{"type": "video", "video": frames}`` (the sampled frames), so a served greedy answer equals the
offline one. Video parts are ``video_url`` (vLLM's and SGLang's name), data URLs or allowed local
files. An assistant message's ``tool_calls`` and the ``tool`` messages answering them reach the
template as sent (Qwen3-VL's renders a call's ``arguments`` text as is); so do the request's tools.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jinja2

from mmserve.serving.router.errors import InvalidRequest
from mmserve.serving.router.fields import without_nulls
from mmserve.serving.router.media import MediaReader
from mmserve.serving.router.reasoning_parser import opens_thinking
from models.qwen3_vl_moe.tokenizer import Tokenizer

ROLES = {"system", "developer", "user", "assistant", "tool"}
MESSAGE_KEYS = {"role", "content", "name", "tool_call_id", "tool_calls", "refusal"}
"""``refusal``: an assistant message's refusal text, as OpenAI returns it; taken and not rendered."""
TOOL_CALL_KEYS = {"id", "type", "function"}
MEDIA_PARTS = {"image_url": ("image", "from_url"), "video_url": ("video", "video_from_url")}
"""OpenAI part type -> (the offline part type, the MediaReader method that reads its URL)."""


TEMPLATE_FIELDS = {"add_generation_prompt", "continue_final_message", "chat_template_kwargs"}
"""vLLM's chat fields that shape the rendering."""


def template_options(body: dict[str, Any], tokenizer: Tokenizer) -> dict[str, Any]:
    """vLLM's ``add_generation_prompt`` (true by default), ``continue_final_message`` (false; the
    answer continues the final message, an assistant's start written for the model) and
    ``chat_template_kwargs`` (extra arguments for the template, Qwen3-VL's ``add_vision_id`` say),
    as ``apply_chat_template``'s keyword arguments."""
    options = {}
    for name, default in (("add_generation_prompt", True), ("continue_final_message", False)):
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise InvalidRequest(f"{name} must be a boolean", name)
        options[name] = default if value is None else value
    if options["add_generation_prompt"] and options["continue_final_message"]:
        raise InvalidRequest("continue_final_message needs add_generation_prompt set to false",
                             "continue_final_message")
    extra = body.get("chat_template_kwargs") or {}
    if not isinstance(extra, dict):
        raise InvalidRequest("chat_template_kwargs must be an object", "chat_template_kwargs")
    if reserved := sorted(set(extra) & tokenizer.reserved_template_names):
        raise InvalidRequest(f"chat_template_kwargs cannot set {', '.join(reserved)}", "chat_template_kwargs")
    return extra | options


def answer_opens_thinking(body: dict[str, Any], tokenizer: Tokenizer, options: dict[str, Any]) -> bool:
    """Whether the answer starts inside a think block the prompt opened: the template's own
    generation prompt opens one (Qwen3-VL Thinking's ends with ``<think>``; rendered for a probe
    message with the request's template arguments), or the continued final message's text leaves
    one open. Never from what users wrote elsewhere: a user's "<think>" at the end of a question
    made an Instruct model's whole answer reasoning (and its structured output free text)."""
    if options.get("continue_final_message"):
        final = body["messages"][-1].get("content")
        if isinstance(final, list):
            final = "".join(part.get("text", "") for part in final if isinstance(part, dict)
                            and isinstance(part.get("text"), str))
        return isinstance(final, str) and opens_thinking(final)
    if not options.get("add_generation_prompt", True):
        return False
    extra = {k: v for k, v in options.items() if k not in ("add_generation_prompt", "continue_final_message")}
    probe = [{"role": "user", "content": "?"}]
    bare = tokenizer.apply_chat_template(probe, add_generation_prompt=False, **extra)
    with_prompt = tokenizer.apply_chat_template(probe, add_generation_prompt=True, **extra)
    return opens_thinking(with_prompt[len(bare):] if with_prompt.startswith(bare) else with_prompt)


def chat_prompt(messages: Any, tokenizer: Tokenizer, reader: MediaReader,
                tools: Sequence[dict[str, Any]] | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A prompt for ``prepare_prompt``: ``{"prompt": text, "multi_modal_data": {"image": [...]}}``.
    ``tools``: the function tools to render (checked by ``tools.py``), or None; ``options``: from
    :func:`template_options`."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", "messages")
    media: dict[str, list] = {"image": [], "video": []}
    conversation = [_message(m, f"messages[{i}]", media, reader) for i, m in enumerate(messages)]
    try:
        text = tokenizer.apply_chat_template(conversation, tools=list(tools) if tools else None,
                                             **(options or {"add_generation_prompt": True}))
    except (jinja2.TemplateError, TypeError) as error:  # TypeError: the client's data in an operation it cannot take
        raise InvalidRequest(f"the chat template rejected the messages: {error}", "messages") from None
    except ValueError as error:  # continue_final_message with no text to continue
        raise InvalidRequest(str(error), "continue_final_message") from None
    return {"prompt": text, "multi_modal_data": {kind: items for kind, items in media.items() if items}}


def _message(message: Any, param: str, media: dict[str, list], reader: MediaReader) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise InvalidRequest("a message must be an object", param)
    message = without_nulls(message)
    unknown = set(message) - MESSAGE_KEYS
    if unknown:
        raise InvalidRequest(f"unsupported message field(s): {sorted(unknown)}", param)
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise InvalidRequest(f"role must be one of {sorted(ROLES)}, got {role!r}", f"{param}.role")
    for key in ("name", "tool_call_id", "refusal"):
        if key in message and not isinstance(message[key], str):
            raise InvalidRequest(f"{key} must be a string, got {message[key]!r}", f"{param}.{key}")
    if "refusal" in message and role != "assistant":
        raise InvalidRequest("only an assistant message has a refusal", f"{param}.refusal")
    content = message.get("content")
    if content is None and role != "assistant":
        raise InvalidRequest("content is required", f"{param}.content")
    out = {key: value for key, value in message.items() if key not in ("content", "refusal")}
    if "tool_calls" in message:
        if role != "assistant":
            raise InvalidRequest("only an assistant message has tool_calls", f"{param}.tool_calls")
        out["tool_calls"] = _tool_calls(message["tool_calls"], f"{param}.tool_calls")
    out["role"] = "system" if role == "developer" else role  # OpenAI's newer name for system
    if isinstance(content, list):
        out["content"] = [_part(p, f"{param}.content[{j}]", media, reader) for j, p in enumerate(content)]
    elif isinstance(content, str) or content is None:
        out["content"] = content or ""
    else:
        raise InvalidRequest("content must be a string or a list of parts", f"{param}.content")
    return out


def _tool_calls(calls: Any, param: str) -> list[dict[str, Any]]:
    """OpenAI's shape: ``[{"id", "type": "function", "function": {"name", "arguments"}}]``, with
    ``arguments`` as JSON text (or, as templates also take, an object); returned without null fields."""
    if not isinstance(calls, list):
        raise InvalidRequest("tool_calls must be a list", param)
    out = []
    for j, call in enumerate(calls):
        where = f"{param}[{j}]"
        call = without_nulls(call) if isinstance(call, dict) else call
        if not isinstance(call, dict) or set(call) - TOOL_CALL_KEYS or call.get("type", "function") != "function":
            raise InvalidRequest('a tool call is {"id", "type": "function", "function": {"name", "arguments"}}', where)
        function = without_nulls(call["function"]) if isinstance(call.get("function"), dict) else None
        if (function is None or set(function) - {"name", "arguments"}
                or not isinstance(function.get("name"), str)
                or not isinstance(function.get("arguments"), (str, dict))):
            raise InvalidRequest("a tool call's function needs a string name and arguments (JSON text)",
                                 f"{where}.function")
        out.append({**call, "function": function})
    return out


def _part(part: Any, param: str, media: dict[str, list], reader: MediaReader) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise InvalidRequest("a text part needs a string 'text'", param)
        return {"type": "text", "text": part["text"]}
    if kind in MEDIA_PARTS:
        media_kind, read = MEDIA_PARTS[kind]
        url = part.get(kind)
        url = url.get("url") if isinstance(url, dict) else url
        item = getattr(reader, read)(url, f"{param}.{kind}")
        media[media_kind].append(item)
        return {"type": media_kind, media_kind: item}
    raise InvalidRequest(f"unsupported content part type {kind!r} (this server takes 'text', 'image_url' and "
                         "'video_url')", param)
