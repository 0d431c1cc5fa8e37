"""Tokenizer and chat template: a `tokenizers` tokenizer.json plus the checkpoint's jinja template.

Loading follows transformers' precedence so that a checkpoint renders the prompt its authors wrote:
chat_template.jinja, else tokenizer_config.json "chat_template", else chat_template.json (the
processor's legacy file). Templates render in the same sandbox transformers uses (trim_blocks,
lstrip_blocks, loop controls, its `tojson`, `raise_exception`, `strftime_now`), and only plain JSON
data reaches them: a PIL image inside a message becomes the string "<Image>", which is all a
template may ask of it (whether the part is an image).

The `tiny` preset's tokenizer is built by :mod:`models.qwen3_vl_moe.tiny_tokenizer`.
"""

import dataclasses
import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.decoders import DecodeStream

from models.qwen3_vl_moe.segment_memo import SegmentMemo
from models.qwen3_vl_moe.token_count import COUNT_PIECE_CHARS, TooManyTokens, count_tokens

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
LEGACY_TEMPLATE_FILE = "chat_template.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")

def _plain(value):
    """What a template may see: JSON scalars, dicts, lists; anything else becomes "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return f"<{type(value).__name__}>"


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_content(token) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


@dataclasses.dataclass
class Tokenizer:
    """Text <-> ids, and chat messages -> prompt text."""

    backend: BackendTokenizer = dataclasses.field(repr=False)
    chat_template: str = dataclasses.field(repr=False)
    # tokenizer_config.json without the template, written back as it was read
    config: dict = dataclasses.field(default_factory=dict)
    extra_eos_token_ids: tuple[int, ...] = ()  # generation_config.json's stop ids beyond eos_token

    def __post_init__(self):
        self._template = _environment().from_string(self.chat_template)
        self._memo = SegmentMemo(self.backend)

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        path = Path(path)
        if not (path / TOKENIZER_FILE).is_file():  # the tokenizers library would raise a bare Exception
            raise FileNotFoundError(f"{path}: no {TOKENIZER_FILE}")
        backend = BackendTokenizer.from_file(str(path / TOKENIZER_FILE))
        config = _read_json(path / CONFIG_FILE) or {}
        template = config.pop("chat_template", None)
        if isinstance(template, list):  # transformers' legacy form for several named templates
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (path / TEMPLATE_FILE).is_file():
            template = (path / TEMPLATE_FILE).read_text(encoding="utf-8")
        elif template is None and (path / LEGACY_TEMPLATE_FILE).is_file():
            template = _read_json(path / LEGACY_TEMPLATE_FILE)["chat_template"]
        if template is None:
            raise ValueError(f"no chat template in {path} ({TEMPLATE_FILE}, {CONFIG_FILE} or {LEGACY_TEMPLATE_FILE})")
        stop = (_read_json(path / GENERATION_CONFIG_FILE) or {}).get("eos_token_id")
        stop_ids = () if stop is None else tuple(stop) if isinstance(stop, list) else (stop,)
        return cls(backend, template, config, stop_ids)

    def save(self, path):
        """Writes tokenizer.json, tokenizer_config.json and chat_template.jinja, as transformers 5 does."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / TOKENIZER_FILE))
        (path / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (path / TEMPLATE_FILE).write_text(self.chat_template, encoding="utf-8")

    @property
    def special_tokens(self) -> dict[str, str]:
        """bos/eos/unk/pad token strings, as templates receive them."""
        tokens = {key: _token_content(self.config.get(key)) for key in SPECIAL_TOKEN_KEYS}
        return {key: token for key, token in tokens.items() if token is not None}

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: the config's eos_token, then generation_config.json's."""
        ids = []
        if (eos := self.special_tokens.get("eos_token")) is not None:
            ids.append(self.token_to_id(eos))
        ids.extend(i for i in self.extra_eos_token_ids if i not in ids)
        return tuple(ids)

    @property
    def pad_token_id(self) -> int | None:
        pad = self.special_tokens.get("pad_token")
        return None if pad is None else self.token_to_id(pad)

    def token_to_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{token!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None,
               piece_chars: int = COUNT_PIECE_CHARS) -> list[int]:
        """Special-token strings in `text` (as in a rendered chat prompt) become their single ids.

        With ``max_tokens``, a text with more tokens raises TooManyTokens; a stretch longer than
        ``piece_chars`` is first counted a piece at a time as far as the limit (:mod:`token_count`),
        then, within it, tokenized (~0.6 ms per 1,000 characters here for each of the two). The
        stretches between added tokens are tokenized apart and remembered (:mod:`segment_memo`):
        a chat's later turn tokenizes only its new messages."""
        if not self._memo.usable:
            return self._encode_whole(text, add_special_tokens, max_tokens, piece_chars)
        ids: list[int] = []
        pieces = self._memo.pieces(text)
        piece = next(pieces, None)
        while piece is not None:
            (stretch, added), piece = piece, next(pieces, None)  # piece None: that was the last
            if added is not None:
                ids.append(added)
            else:
                left = None if max_tokens is None else max_tokens - len(ids)
                try:
                    ids += self._stretch_ids(stretch, left, piece_chars)
                except TooManyTokens as error:
                    raise TooManyTokens(len(ids) + error.counted, max_tokens, error.exact and piece is None) from None
            if max_tokens is not None and len(ids) > max_tokens:
                raise TooManyTokens(len(ids), max_tokens, exact=piece is None)
        return ids

    def _stretch_ids(self, stretch: str, max_tokens: int | None, piece_chars: int) -> list[int]:
        """A stretch between added tokens: remembered from an earlier text (a chat's earlier
        turns), else counted when long (as far as ``max_tokens``) and tokenized."""
        ids = self._memo.get(stretch)
        if ids is None:
            ids = self._encode_whole(stretch, False, max_tokens, piece_chars)
            self._memo.put(stretch, ids)
        return ids

    def _encode_whole(self, text: str, add_special_tokens: bool, max_tokens: int | None, piece_chars: int) -> list[int]:
        if max_tokens is not None and len(text) > piece_chars:
            count_tokens(self.backend, self._memo.added_tokens, text, max_tokens, piece_chars)
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if max_tokens is not None and len(ids) > max_tokens:
            raise TooManyTokens(len(ids), max_tokens, exact=True)
        return ids

    def count_tokens(self, text: str, limit: int, piece_chars: int = COUNT_PIECE_CHARS) -> int:
        """``text``'s tokens, counted a piece at a time as far as ``limit`` (:func:`count_tokens`)."""
        return count_tokens(self.backend, self._memo.added_tokens, text, limit, piece_chars)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def text_stream(self) -> "TextStream":
        return TextStream(self.backend)

    @property
    def reserved_template_names(self) -> set[str]:
        """What ``apply_chat_template`` itself gives the template (its own arguments, the special
        tokens, the environment's globals such as ``namespace``): no extra argument may set them."""
        return {"self", "messages", "tools", "add_generation_prompt", "continue_final_message", *self.special_tokens,
                *self._template.environment.globals}

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tools=None,
                            continue_final_message: bool = False, **kwargs) -> str:
        """Renders OpenAI-style messages (content a string or a list of text/image/video parts).

        Extra keyword arguments reach the template, as in transformers (e.g. add_vision_id=True).
        Keys whose value is None are dropped first, since templates test for presence.
        ``continue_final_message``: the text ends inside the last message, right after its text
        (its last text part), so that the model continues it (an answer's start written for it),
        as transformers does: a marker appended to that text is rendered and the text cut there;
        ValueError when there is no text to continue or the template drops it.
        """
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
        if reserved := sorted(set(kwargs) & self.reserved_template_names):
            raise ValueError(f"the chat template's {', '.join(reserved)} cannot be given as extra arguments")
        messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
        final = _mark_final_message(messages) if continue_final_message else None
        text = self._template.render(
            messages=_plain(messages),
            tools=_plain(tools),
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
            **_plain(kwargs),
        )
        return text if final is None else _cut_at_mark(text, final)


CONTINUE_MARK = "CONTINUE_FINAL_MESSAGE_TAG "
"""Appended to the text a ``continue_final_message`` rendering ends after (transformers' marker)."""


def _mark_final_message(messages: list[dict]) -> str:
    """Appends CONTINUE_MARK to the final message's text (its last text part), in place (the
    messages are this call's copies, their part lists copied here); returns that text."""
    if not messages or messages[-1].get("content") is None:
        raise ValueError("continue_final_message needs a final message with content to continue")
    final = messages[-1]
    content = final["content"]
    if isinstance(content, (list, tuple)):
        parts = [dict(part) if isinstance(part, dict) else part for part in content]
        for part in reversed(parts):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                text, part["text"] = part["text"], part["text"] + CONTINUE_MARK
                break
        else:
            raise ValueError("continue_final_message: the final message has no text to continue")
        final["content"] = parts
        return text
    if not isinstance(content, str):
        raise ValueError("continue_final_message: the final message's content is not text")
    final["content"] = content + CONTINUE_MARK
    return content


def _cut_at_mark(text: str, final: str) -> str:
    """``text`` up to the marker; trailing whitespace dropped where the template trimmed the
    marker's own (transformers' rule)."""
    mark = CONTINUE_MARK.strip()
    if final.strip() not in text or mark not in text:
        raise ValueError("continue_final_message: the final message does not appear in the rendered chat (the "
                         "template changed its text)")
    at = text.rindex(mark)
    return text[:at] if text[at:at + len(CONTINUE_MARK)] == CONTINUE_MARK else text[:at].rstrip()


class TextStream:
    """One output's text, decoded token by token (the `tokenizers` DecodeStream): each step costs
    the new token, not the whole output, and a character whose bytes span several tokens appears
    only once its last byte has arrived (never as U+FFFD). Special tokens add no text."""

    def __init__(self, backend: BackendTokenizer):
        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        """The text ``token_id`` completes ('' while a character is still incomplete)."""
        return self._stream.step(self._backend, int(token_id)) or ""


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
