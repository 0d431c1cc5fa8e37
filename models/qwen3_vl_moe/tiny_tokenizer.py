"""The `tiny` preset's tokenizer, made offline: byte-level BPE trained on a built-in corpus to exactly
1000 tokens, then the Qwen special tokens at fixed ids (TINY_SPECIAL_IDS) and Qwen's tool-call
markers (TINY_TOOL_TOKEN_IDS, not special: they decode as text). It has no normaliser (Qwen's
applies NFC), so every UTF-8 string survives encode then decode.
"""

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from models.qwen3_vl_moe.tokenizer import Tokenizer

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
