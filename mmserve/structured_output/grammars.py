"""Compiles grammars for one tokenizer, in a background thread, once per distinct schema.

Compiling (xgrammar precomputes which tokens each grammar state may take) costs milliseconds to
seconds, so it never runs on the engine's step: ``submit`` returns a future, and the engine keeps
the request out of the scheduler until it is done. Futures are cached by the spec's digest, so the
n siblings of a request, or the same schema sent again, compile once; the cache is bounded by count
and by the compiled grammars' memory.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import xgrammar
from tokenizers import pre_tokenizers

from mmserve.structured_output.matcher import GrammarState
from mmserve.structured_output.spec import GRAMMAR_OPTIONS, StructuredOutput

MAX_CACHED_GRAMMARS = 256
MAX_CACHED_GRAMMAR_BYTES = 256 << 20
"""Compiled grammars kept for reuse, by their ``memory_size_bytes``: one schema's may be tens of MB
(its literals, ``spec.MAX_LITERAL_CHARS``), and 256 of those were gigabytes held after their
requests ended."""
_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def tokenizer_info(tokenizer, vocab_size: int, stop_token_ids) -> xgrammar.TokenizerInfo:
    """xgrammar's view of the vocabulary of ``tokenizer`` (the model's Tokenizer: its ``backend`` is a
    ``tokenizers.Tokenizer``): the byte-level token strings by id, padded to the lm
    head's ``vocab_size`` (larger than the tokenizer's: ids past it are never allowed). Special
    tokens (<|im_end|>, <|image_pad|>...) are left empty so no grammar can spell text with them:
    they add no text to the output; only ``stop_token_ids`` may end a grammar. Added tokens that are
    not special (Qwen's <tool_call>, </tool_call>...) decode as their text, so they keep it (in the
    byte-level alphabet): a grammar that asks for "<tool_call>" may take the one token the model
    was trained to emit there."""
    backend = tokenizer.backend
    vocab = [""] * max(backend.get_vocab_size(with_added_tokens=True), 1)
    for token, token_id in backend.get_vocab(with_added_tokens=False).items():
        if token_id < len(vocab):
            vocab[token_id] = token
    for token_id, token in backend.get_added_tokens_decoder().items():
        if token_id < len(vocab):
            vocab[token_id] = "" if token.special else _byte_level(token.content)
    return xgrammar.TokenizerInfo(vocab[:vocab_size], xgrammar.VocabType.BYTE_LEVEL, vocab_size=vocab_size,
                                  stop_token_ids=sorted(stop_token_ids))


def _byte_level(text: str) -> str:
    """``text`` spelled in the byte-level alphabet that the ordinary tokens' strings use."""
    return "".join(piece for piece, _ in _BYTE_LEVEL.pre_tokenize_str(text))


class Grammars:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids):
        stop_token_ids = [t for t in stop_token_ids if t < vocab_size]
        self.info = tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self.vocab_size = vocab_size
        # A checkpoint whose lm head cannot emit any stop token (the tests' tiny ones) ends a
        # grammar on its last character instead: as soon as it could end (a number at the root
        # ends after its first digit; objects, arrays and strings end where they close).
        self.terminate_without_stop_token = not stop_token_ids
        # xgrammar's own cache of compiled grammars is unbounded by default (every schema ever
        # seen, ~64 KB each at a tiny vocabulary): the futures below are the cache, bounded
        self._compiler = xgrammar.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        self._futures: dict[bytes, Future] = {}
        self._sizes: dict[bytes, int] = {}
        self.cached_bytes = 0
        """The memory of the compiled grammars in the cache (of those whose compile has ended)."""
        self._lock = threading.Lock()

    def state(self, spec: StructuredOutput) -> GrammarState:
        """A new request's place in the grammar of ``spec`` (compiled, or compiling)."""
        return GrammarState(self.submit(spec), self.terminate_without_stop_token)

    def submit(self, spec: StructuredOutput) -> Future:
        """A future of the compiled grammar; the same future for the same spec while it is cached."""
        key = spec.key()
        with self._lock:
            future = self._futures.get(key)
            if future is None:
                future = self._futures[key] = self._pool.submit(self._compile_and_count, key, spec)
                self._evict()
            return future

    def _compile_and_count(self, key: bytes, spec: StructuredOutput) -> xgrammar.CompiledGrammar:
        """Compiles, then counts the grammar's memory in the cache's (before its future is done)."""
        compiled = self._compile(spec)
        with self._lock:
            if key in self._futures and key not in self._sizes:
                self._sizes[key] = compiled.memory_size_bytes
                self.cached_bytes += self._sizes[key]
                self._evict()
        return compiled

    def _evict(self) -> None:
        """Drops the oldest entries past the bounds (requests holding their futures keep them)."""
        while len(self._futures) > MAX_CACHED_GRAMMARS or self.cached_bytes > MAX_CACHED_GRAMMAR_BYTES:
            key = next(iter(self._futures))
            del self._futures[key]
            self.cached_bytes -= self._sizes.pop(key, 0)

    def _compile(self, spec: StructuredOutput) -> xgrammar.CompiledGrammar:
        if spec.json_schema:
            return self._compiler.compile_json_schema(spec.json_schema, **GRAMMAR_OPTIONS)
        if spec.structural_tag:
            return self._compiler.compile_structural_tag(spec.structural_tag)
        if spec.regex:
            return self._compiler.compile_regex(spec.regex)
        return self._compiler.compile_grammar(spec.grammar)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
