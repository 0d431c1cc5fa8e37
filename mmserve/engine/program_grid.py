"""The shapes every device program is compiled for: one bounded grid, used both to pad each step
and to compile everything before the engine serves.

Every dynamic size is padded to a power-of-two bucket (:mod:`mmserve.engine.buckets`). What keeps
the grid small:

- a prefill step's padded size (row bucket x token bucket) is at most ``2 * max_prefill_tokens``
  (the scheduler stops adding prompts to a step that would exceed it);
- a prefill step whose chunks all start at token 0 attends over the pages its token bucket spans;
  a step that continues a prompt (a chunked one, or one starting after its cached prefix) runs
  that chunk alone and attends over the pages up to its end, padded to one of a few widths growing
  by ``CONTINUATION_WIDTH_STEP`` up to ``max_pages_per_seq``. So prefill has one width per (rows,
  tokens), plus a few per token bucket for continuations, not one per page bucket (a second turn
  of a short chat does not attend over a whole ``max_model_len`` of pages: at width 128 against 4
  the tiny model's prefill step took 10 ms against 2);
- visual inputs reach the prefill program as a fixed-size block of rows plus an index per token,
  so text and image steps share one program;
- the penalty slot is loaded from one fixed-size id array.

Decode keeps one program per (rows, page-width) bucket: its width follows the batch's longest
sequence, so short contexts do not pay for ``max_model_len``.
"""

from __future__ import annotations

import dataclasses

from mmserve.engine.buckets import all_buckets, bucket
from mmserve.engine.config import EngineConfig
from models.qwen3_vl_moe.config import ModelConfig

MIN_TOKEN_BUCKET = 16
MIN_PAGE_BUCKET = 4
"""Page-table width of the narrowest prefill/decode program."""
MIN_PATCH_BUCKET = 64
CONTINUATION_WIDTH_STEP = 4
"""Ratio between the page widths of continuation programs: fewer programs than every power of two,
at most 4x the pages a continuation needs."""


@dataclasses.dataclass(frozen=True)
class ProgramGrid:
    config: EngineConfig
    max_patches: int
    """Most vision patches one image or video can have."""

    @classmethod
    def for_model(cls, config: EngineConfig, model: ModelConfig) -> ProgramGrid:
        """An image or video whose tokens fit the context: at most merge_unit patches per token."""
        return cls(config, max_patches=model.vision.merge_unit * config.max_model_len)

    @property
    def max_pages(self) -> int:
        return self.config.max_pages_per_seq

    @property
    def padded_prefill_budget(self) -> int:
        return 2 * self.config.max_prefill_tokens

    @property
    def visual_rows(self) -> int:
        """Rows of the visual block a prefill step carries: a step holds at most this many tokens."""
        return self.config.max_prefill_tokens

    def prefill_rows(self, num_chunks: int) -> int:
        return bucket(num_chunks, 1, self.config.max_prefill_seqs)

    @property
    def max_chunk_tokens(self) -> int:
        """The largest token bucket of a prefill step: a chunk holds at most ``max_prefill_tokens``,
        and fewer than ``max_model_len`` (which may be the smaller of the two)."""
        return min(self.config.max_prefill_tokens, bucket(self.config.max_model_len, MIN_TOKEN_BUCKET))

    def prefill_tokens(self, longest_chunk: int) -> int:
        return bucket(longest_chunk, MIN_TOKEN_BUCKET, self.max_chunk_tokens)

    def prefill_fits(self, num_chunks: int, longest_chunk: int) -> bool:
        """Whether a step of these chunks stays inside the padded budget (and so inside the grid)."""
        return self.prefill_rows(num_chunks) * self.prefill_tokens(longest_chunk) <= self.padded_prefill_budget

    def prefill_width(self, tokens: int, context: int | None = None) -> int:
        """Pages a prefill program of ``tokens`` (a bucket) attends over. ``context``: when some
        chunk continues a prompt (starts past token 0), the longest row's tokens up to its chunk's
        end, whose earlier pages count too; None when every chunk starts at 0."""
        if context is None:
            return self.page_width(tokens)
        needed = -(-int(context) // self.config.page_size)
        return next(w for w in self.continuation_widths(tokens) if w >= needed)

    def continuation_widths(self, tokens: int) -> list[int]:
        """The widths a continuing chunk of ``tokens`` may run at: from the pages its own bucket
        spans, times ``CONTINUATION_WIDTH_STEP`` each, up to ``max_pages``."""
        widths, width = [], self.page_width(tokens)
        while width < self.max_pages:
            widths.append(width)
            width *= CONTINUATION_WIDTH_STEP
        return widths + [self.max_pages]

    def page_width(self, tokens: int) -> int:
        """Page-table width for sequences of up to ``tokens`` tokens (a token bucket may span more
        pages than a sequence can hold: then ``max_pages``)."""
        return bucket(min(-(-int(tokens) // self.config.page_size), self.max_pages), MIN_PAGE_BUCKET, self.max_pages)

    def prefill_shapes(self) -> list[tuple[int, int, int]]:
        """Every (rows, tokens, width) a prefill step can take."""
        shapes = []
        for rows in all_buckets(1, self.config.max_prefill_seqs):
            for tokens in all_buckets(MIN_TOKEN_BUCKET, self.max_chunk_tokens):
                if rows * tokens <= self.padded_prefill_budget:
                    shapes.append((rows, tokens, self.prefill_width(tokens)))
                if rows == 1:
                    shapes += [(1, tokens, w) for w in self.continuation_widths(tokens) if w != shapes[-1][2]]
        return shapes

    def decode_rows(self, num_requests: int) -> int:
        return bucket(num_requests, 1, self.config.max_num_seqs)

    def decode_shapes(self) -> list[tuple[int, int]]:
        """Every (rows, width) a decode step can take."""
        return [(rows, width) for rows in all_buckets(1, self.config.max_num_seqs)
                for width in all_buckets(MIN_PAGE_BUCKET, self.max_pages)]

    @property
    def kv_rows_max(self) -> int:
        return bucket(self.config.max_model_len, MIN_TOKEN_BUCKET)

    @property
    def slot_ids(self) -> int:
        """Length of the id array a penalty slot is loaded from (prompt and output together)."""
        return self.kv_rows_max

    def patches(self, num_patches: int) -> int:
        return bucket(num_patches, MIN_PATCH_BUCKET, self.patch_max)

    @property
    def patch_max(self) -> int:
        return bucket(self.max_patches, MIN_PATCH_BUCKET)

    def patch_buckets(self) -> list[int]:
        return all_buckets(MIN_PATCH_BUCKET, self.patch_max)
