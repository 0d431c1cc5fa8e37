"""Tokenizer and chat template: a `tokenizers` tokenizer.json plus the checkpoint's jinja template.

Loading follows transformers' precedence so that a checkpoint renders the prompt its authors wrote:
chat_template.jinja, else tokenizer_config.json "chat_template", else chat_template.json (the
processor's legacy file). Templates render in the same sandbox transformers uses (trim_blocks,
lstrip_blocks, loop controls, its `tojson`, `raise_exception`, `strftime_now`), and only plain JSON
data reaches them: a PIL image inside a message becomes the string "<Image>", which is all a
template may ask of it (whether the part is an image).

`build_tiny_tokenizer` makes the offline tokenizer of the `tiny` preset: byte-level BPE trained on a
built-in corpus to exactly 1000 tokens, then the Qwen special tokens at fixed ids (TINY_SPECIAL_IDS)
and Qwen's tool-call markers (TINY_TOOL_TOKEN_IDS, not special: they decode as text).
It has no normaliser (Qwen's applies NFC), so every UTF-8 string survives encode then decode.
"""

import dataclasses
import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
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

TINY_ORDINARY_TOKENS = 1000
TINY_SPECIAL_IDS = {
    "<|endoftext|>": 1000,
    "<|im_start|>": 1001,
    "<|im_end|>": 1002,
    "<|vision_start|>": 1003,
    "<|vision_end|>": 1004,
    "<|image_pad|>": 1005,
    "<|video_pad|>": 1006,
}
# Qwen's tool-call markers: added tokens that are not special (as in Qwen's tokenizer), so decoding
# keeps them in the text, where the tool-call parser finds them.
TINY_TOOL_TOKEN_IDS = {
    "<tool_call>": 1007,
    "</tool_call>": 1008,
    "<tool_response>": 1009,
    "</tool_response>": 1010,
}

# Qwen2's pre-tokenizer split: contractions, letter runs, single digits, punctuation runs, newlines.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Follows Qwen3-VL's template: <|im_start|>role\n...<|im_end|>\n turns, optional "Picture n: " /
# "Video n: " labels, tool results folded into one user turn (with their own media), and with
# `tools` its "# Tools" system block, the functions as JSON lines inside <tools></tools>, and an
# assistant's calls rendered as <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>.
TINY_CHAT_TEMPLATE = """\
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content) %}
    {%- if content is string %}
        {{- content }}
    {%- else %}
        {%- for part in content %}
            {%- if part.type == 'image' or 'image' in part or 'image_url' in part %}
                {%- set image_count.value = image_count.value + 1 %}
                {%- if add_vision_id %}{{ 'Picture ' ~ image_count.value ~ ': ' }}{% endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif part.type == 'video' or 'video' in part %}
                {%- set video_count.value = video_count.value + 1 %}
                {%- if add_vision_id %}{{ 'Video ' ~ video_count.value ~ ': ' }}{% endif %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in part %}
                {{- part.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- render_content(messages[0].content) + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
        '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": '
        '<args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {{- '<|im_start|>user\\n' + render_content(message.content) + '<|im_end|>\\n' }}
    {%- elif message.role == 'system' %}
        {%- if not (tools and loop.first) %}
            {{- '<|im_start|>system\\n' + render_content(message.content) + '<|im_end|>\\n' }}
        {%- endif %}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if message.content is defined %}
            {{- render_content(message.content) }}
        {%- endif %}
        {%- for call in message.tool_calls or [] %}
            {%- if message.content or not loop.first %}
                {{- '\\n' }}
            {%- endif %}
            {%- set call = call.function or call %}
            {{- '<tool_call>\\n{"name": "' + call.name + '", "arguments": ' }}
            {{- call.arguments if call.arguments is string else call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or loop.previtem.role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + render_content(message.content) + '\\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('unknown role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# The tiny tokenizer's training text. Changing it changes every tiny token id.
TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden gate.
A picture is worth a thousand words, but a video can hold a thousand pictures and the sound of rain.
Describe the image in detail: what colors do you see, how many people are standing near the river,
and what is written on the red sign above the bakery door?
In the morning the market opens at seven o'clock. Vendors bring apples, oranges, bread, cheese,
fresh fish, flowers and honey. Children run between the stalls and dogs sleep in the warm sun.
The train to the northern mountains leaves every hour; the journey takes about three hours and
passes through forests, tunnels, small villages, lakes, bridges and a long green valley.
Scientists measured the temperature of the water at twelve stations along the coast. They found
that the average temperature increased by two degrees between 1990 and 2020, with the largest
change in the summer months of July and August.
Please write a short poem about the moon, the stars, and a cat who cannot sleep at night.
She opened the letter slowly. It said: "Meet me at the station at noon. Bring the map, the keys,
and the small blue box. Don't tell anyone." She folded it twice and put it in her coat pocket.
How do I cook rice? Rinse one cup of rice, add two cups of water and a pinch of salt, bring it
to a boil, then cover the pot and let it simmer on low heat for fifteen minutes.
The computer program reads an image, splits it into patches of sixteen by sixteen pixels, and
turns each patch into a vector of numbers that the model can understand and reason about.
Questions and answers: Where is the library? It is next to the museum, across from the park.
When does the concert start? At eight in the evening. Who is playing? A jazz quartet from Chicago.
Weather report: cloudy with a chance of showers in the afternoon, winds from the west at ten
kilometers per hour, and temperatures falling to four degrees Celsius overnight.
The history of writing began with marks pressed into clay, then ink on paper, then type made of
metal, and finally the letters that glow on the screens we carry in our hands every day.
Mathematics: if x plus three equals seven, then x equals four. The area of a circle is pi times
the radius squared. A triangle has three sides and its angles add up to one hundred eighty degrees.
My grandmother kept a garden with tomatoes, beans, carrots, potatoes, onions, garlic and herbs
such as basil, mint, parsley and thyme. Every autumn we helped her pick the last of the harvest.
The ship sailed south across the ocean for forty days. The sailors told stories, repaired the
sails, caught fish, watched whales and dolphins, and counted the stars to find their way home.
Thank you for your help! You're welcome. Could you explain that again, more simply, please?
Sure: the model looks at the picture, thinks about your question, and then writes an answer.
Numbers and symbols: 0 1 2 3 4 5 6 7 8 9, 100%, $25.50, 3.14, #42, a+b=c, (x, y), [1, 2], {key: value}.
Email addresses look like name@example.com and web pages begin with https:// followed by a domain.
Running, jumping, swimming, climbing, reading, writing, singing, dancing, painting and building
are things people enjoy; playing, learning, teaching, traveling, listening and sharing too.
The photograph shows a narrow street at sunset. Bicycles lean against a yellow wall, laundry hangs
from the windows, and an old man sits on a bench feeding pigeons beside a small fountain.
"""


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

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tools=None, **kwargs) -> str:
        """Renders OpenAI-style messages (content a string or a list of text/image/video parts).

        Extra keyword arguments reach the template, as in transformers (e.g. add_vision_id=True).
        Keys whose value is None are dropped first, since templates test for presence.
        """
        messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
        return self._template.render(
            messages=_plain(messages),
            tools=_plain(tools),
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
            **_plain(kwargs),
        )


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


def build_tiny_tokenizer() -> Tokenizer:
    """The `tiny` preset's tokenizer: same text in, same ids out, on every machine, with no download."""
    backend = BackendTokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_ORDINARY_TOKENS,
        min_frequency=0,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TINY_CORPUS.splitlines(keepends=True), trainer=trainer)
    if backend.get_vocab_size() != TINY_ORDINARY_TOKENS:
        raise RuntimeError(f"the tiny corpus yields {backend.get_vocab_size()} tokens, not {TINY_ORDINARY_TOKENS}")
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in TINY_SPECIAL_IDS])
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in TINY_TOOL_TOKEN_IDS])
    for token, token_id in (TINY_SPECIAL_IDS | TINY_TOOL_TOKEN_IDS).items():
        if backend.token_to_id(token) != token_id:
            raise RuntimeError(f"{token} got id {backend.token_to_id(token)}, expected {token_id}")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "model_max_length": 262144,
    }
    return Tokenizer(backend, TINY_CHAT_TEMPLATE, config)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
