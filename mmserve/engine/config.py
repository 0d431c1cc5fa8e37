"""Engine settings: cache size, batch and chunk limits. CLI-friendly, validated on creation."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """page_size: tokens per KV page. num_pages: pages in the cache (page 0 is scratch); when None,
    as many as ``kv_cache_bytes`` holds. max_model_len: longest sequence (prompt + output).
    max_num_seqs: most sequences decoding at once. max_prefill_tokens: token budget of one prefill
    step (longer prompts are prefilled in chunks). max_prefill_seqs: most prompts in one prefill step.
    embedding_cache_size: encoded images kept, keyed by a hash of their pixels. seed: the engine's
    key for requests that give no seed of their own. precompile: compile every program of the
    engine's shape grid (:mod:`mmserve.engine.program_grid`) when the engine starts, so that no
    step waits for a compile while serving; the grid grows with max_num_seqs, max_prefill_seqs,
    max_prefill_tokens and max_model_len / page_size."""

    page_size: int = 16
    num_pages: int | None = None
    kv_cache_bytes: int = 256 * 2**20
    max_model_len: int = 2048
    max_num_seqs: int = 32
    max_prefill_tokens: int = 512
    max_prefill_seqs: int = 8
    embedding_cache_size: int = 64
    seed: int = 0
    precompile: bool = True

    def __post_init__(self):
        for name in ("page_size", "kv_cache_bytes", "max_model_len", "max_num_seqs", "max_prefill_tokens",
                     "max_prefill_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is scratch), got {self.num_pages}")
        if self.max_prefill_tokens < 16:
            raise ValueError(f"max_prefill_tokens must be >= 16, got {self.max_prefill_tokens}")

    @property
    def max_pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)
