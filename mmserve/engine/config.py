"""Engine settings: cache size, batch and chunk limits. CLI-friendly, validated on creation."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """What an engine may hold and do per step. Each field is a ``serve.py`` flag (its docstring is the
    flag's help, :mod:`mmserve.config_flags`)."""

    page_size: int = 16
    """tokens per KV page"""
    num_pages: int | None = None
    """KV pages in the cache, page 0 being scratch (default: as many as --kv-cache-bytes holds)"""
    kv_cache_bytes: int = 256 * 2**20
    """memory for the KV cache when --num-pages is not given: the whole cache, over every device of
    the role's mesh (each holds its share: plan_memory.py's "bytes, all" column)"""
    max_model_len: int = 2048
    """longest sequence, prompt plus output; longer requests are refused (a 400 over HTTP)"""
    max_num_seqs: int = 32
    """most sequences decoding at once"""
    max_prefill_tokens: int = 512
    """token budget of one prefill step; longer prompts are prefilled in chunks (at least 16)"""
    max_prefill_seqs: int = 8
    """most prompts in one prefill step"""
    embedding_cache_bytes: int = 256 * 2**20
    """memory for encoded images and videos kept, keyed by a hash of the client's file, so a repeated
    picture skips decoding and the vision tower (least recently used evicted first; 0: none kept).
    A picture keeps its whole vision call's output alive (the pictures encoded with it, the call's
    padding), and that is what is counted"""
    seed: int = 0
    """the engine's random key for requests that give no seed of their own"""
    precompile: bool = True
    """compile every program of the engine's shape grid (mmserve.engine.program_grid) before serving, so
    that no step waits for a compile; --no-precompile starts faster and stalls on the first requests of
    each shape. The grid grows with max_num_seqs, max_prefill_seqs, max_prefill_tokens and
    max_model_len / page_size"""
    enable_prefix_caching: bool = True
    """keep the KV pages of finished prompts, keyed by their tokens and images, so that a prompt sharing
    a prefix with an earlier one (a system prompt, a second turn about the same image) computes only the
    rest; cached pages nobody uses are evicted, least recently used first, when pages run short.
    --no-enable-prefix-caching recomputes every prompt"""

    async_scheduling: bool = True
    """dispatch a decode step before the last one's tokens are read, when it runs the same requests
    (nothing waiting, no grammar, none at its length limit), so the host's bookkeeping of a step
    overlaps the device's next one, as vLLM's async scheduling does; a request that stopped (EOS, a
    stop string) has its row of that step dropped. --no-async-scheduling runs every step in turn"""

    def __post_init__(self):
        for name in ("page_size", "kv_cache_bytes", "max_model_len", "max_num_seqs", "max_prefill_tokens",
                     "max_prefill_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.embedding_cache_bytes < 0:
            raise ValueError(f"embedding_cache_bytes must be >= 0, got {self.embedding_cache_bytes}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is scratch), got {self.num_pages}")
        if self.max_prefill_tokens < 16:
            raise ValueError(f"max_prefill_tokens must be >= 16, got {self.max_prefill_tokens}")

    def check_model(self, model_config) -> None:
        """ValueError when this config asks what the model (a ``ModelConfig``) cannot do: a
        context past its ``max_position_embeddings``, refused as vLLM refuses it (positions the
        model was never trained on, where its answers are noise)."""
        limit = model_config.text.max_position_embeddings
        if self.max_model_len > limit:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings {limit}")

    @property
    def max_pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)
