"""The model runner: owns the device state (params, KV cache, penalty state) and the jitted programs.

Every call pads its batch to a bucket (powers of two), so each program compiles once per bucket.
The KV cache and the penalty state are donated to the programs that update them. After a step
only the sampled ids come back to the host (plus logprobs when a request asked for them).

Each public method lays out its host inputs and runs its device program through the
``Lockstep`` (``run_*`` methods), so on a role spanning several processes every process runs the
same programs in the leader's order; the step's logits stay on device between ``run_prefill`` /
``run_decode`` and ``run_sample``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import numpy as np

from mmserve.engine.buckets import all_buckets, bucket
from mmserve.engine.config import EngineConfig
from mmserve.engine.kv_rows import gather_rows, scatter_rows
from mmserve.engine.request import Request
from mmserve.distributed.layout import MeshLayout
from mmserve.distributed.lockstep import Lockstep
from mmserve.engine.scheduler import PrefillChunk
from mmserve.kv_cache_manager import SCRATCH_PAGE, KVCacheManager
from mmserve.sampling_params import SamplingParams
from mmserve.sampler import (SamplingBatch, init_penalty_state, load_slot, pack_sampling_batch, padded_token_ids,
                             sample)
from models.qwen3_vl_moe import Model, stages
from models.qwen3_vl_moe.kv_cache import KVCache

MIN_TOKEN_BUCKET = 16
MIN_PAGE_BUCKET = 4
"""Page-table width of the narrowest prefill/decode program. Attention reads every page a row's
table lists, so a step's width follows the batch's longest sequence (power-of-two buckets), not
``max_model_len``: short contexts do not pay for the longest one."""
_PADDING_PARAMS = SamplingParams(temperature=0.0)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _prefill(module, params, ids, positions, cache, page_tables, starts, lengths, mm_embeds, mm_mask, deepstack):
    return stages.prefill(module, params, ids, positions, cache, page_tables, starts, lengths,
                          mm_embeds, mm_mask, deepstack)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _decode(module, params, tokens, positions, cache, page_tables, context_lens):
    return stages.decode(module, params, tokens, positions, cache, page_tables, context_lens)


class SampledTokens(NamedTuple):
    """Host copies of one step's samples, row i for the i-th request of the step; the logprob
    arrays only when some request asked for them."""

    token_ids: np.ndarray
    logprobs: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None


class ModelRunner:
    def __init__(self, model: Model, config: EngineConfig, layout: MeshLayout | None = None,
                 lockstep: Lockstep | None = None):
        """With a ``layout`` the KV cache is created sharded over its mesh (params come sharded
        from ``load_model``); XLA partitions the programs from those shardings."""
        self.model = model
        self.config = config
        self.layout = layout
        text = model.config.text
        self.num_pages = config.num_pages or KVCacheManager.num_pages_for_budget(
            config.kv_cache_bytes, text.num_hidden_layers, text.num_key_value_heads, text.head_dim,
            config.page_size, model.dtype)
        # Committed to their device from the start: the programs' outputs are, and a first call on
        # uncommitted inputs would compile a second variant of every program.
        home = jax.devices()[0] if layout is None else layout.replicated()
        self.cache = (jax.device_put(KVCache.create(text, self.num_pages, config.page_size, model.dtype), home)
                      if layout is None else
                      layout.create_kv_cache(model.config, self.num_pages, config.page_size, model.dtype))
        self.penalties = jax.device_put(init_penalty_state(config.max_num_seqs, text.vocab_size), home)
        self._key = jax.random.PRNGKey(config.seed)
        self._steps = 0
        self._logits = None
        self.lockstep = lockstep or Lockstep()
        self.lockstep.bind("runner", self)

    def read_kv(self, page_table: list[int], num_tokens: int):
        """(k, v) rows [bucket(num_tokens), layers, kv, d] of a sequence, on this process's devices."""
        k, v = self.lockstep.call("runner", "run_read_kv", page_table=self._page_tables([page_table], 1)[0],
                                  rows=bucket(num_tokens, MIN_TOKEN_BUCKET))
        return _local(k), _local(v)

    def run_read_kv(self, page_table, rows):
        return self.lockstep.readable(gather_rows(self.cache, page_table, int(rows)), self.layout)

    def write_kv(self, page_table: list[int], k_rows, v_rows, num_tokens: int) -> None:
        self.lockstep.call("runner", "run_write_kv", page_table=self._page_tables([page_table], 1)[0],
                           k_rows=k_rows, v_rows=v_rows, num_tokens=np.int32(num_tokens))

    def run_write_kv(self, page_table, k_rows, v_rows, num_tokens):
        if self.layout is not None:
            k_rows, v_rows = jax.device_put((k_rows, v_rows), self.layout.kv_rows(k_rows.shape))
        self.cache = scatter_rows(self.cache, page_table, k_rows, v_rows, num_tokens)

    def load_slot(self, request: Request) -> None:
        """Points the request's penalty slot at its prompt and output so far."""
        self.lockstep.call("runner", "run_load_slot", slot=request.slot,
                           prompt_ids=padded_token_ids(request.prompt_ids),
                           output_ids=padded_token_ids(request.output_ids))

    def run_load_slot(self, slot, prompt_ids, output_ids):
        self.penalties = load_slot(self.penalties, slot, prompt_ids, output_ids)

    def prefill(self, chunks: list[PrefillChunk], page_tables: list[list[int]]) -> None:
        """Runs prompt chunks; the logits at each row's last chunk token wait for ``sample``."""
        c, cfg = self.model.config, self.config
        rows = bucket(len(chunks), 1, cfg.max_prefill_seqs)
        t = bucket(max(ch.length for ch in chunks), MIN_TOKEN_BUCKET, cfg.max_prefill_tokens)
        ids = np.zeros((rows, t), np.int32)
        positions = np.zeros((rows, 3, t), np.int32)
        starts = np.zeros(rows, np.int32)
        lengths = np.zeros(rows, np.int32)
        hidden, levels = c.text.hidden_size, len(c.vision.deepstack_visual_indexes)
        visual = any(ch.request.visual is not None for ch in chunks)
        mask = np.zeros((rows, t), bool) if visual else None
        embeds = np.zeros((rows, t, hidden), np.float32) if visual else None
        deepstack = np.zeros((levels, rows, t, hidden), np.float32) if visual else None
        for i, ch in enumerate(chunks):
            r, end = ch.request, ch.start + ch.length
            ids[i, : ch.length] = r.token_ids(ch.start, end)
            positions[i, :, : ch.length] = r.positions(ch.start, end)
            starts[i], lengths[i] = ch.start, ch.length
            if r.visual is not None:
                span = max(min(end, len(r.prompt_ids)) - ch.start, 0)
                mask[i, :span] = r.visual.mask[ch.start:ch.start + span]
                embeds[i, :span] = r.visual.embeds[ch.start:ch.start + span]
                deepstack[:, i, :span] = r.visual.deepstack[:, ch.start:ch.start + span]
        self.lockstep.call("runner", "run_prefill", ids=ids, positions=positions,
                           page_tables=self._page_tables(page_tables, rows, self._width(max(starts + lengths))),
                           starts=starts, lengths=lengths,
                           embeds=embeds, mask=mask, deepstack=deepstack)

    def run_prefill(self, ids, positions, page_tables, starts, lengths, embeds, mask, deepstack):
        self._logits, self.cache = _prefill(self.model.module, self.model.params, ids, positions, self.cache,
                                            page_tables, starts, lengths, embeds, mask, deepstack)

    def decode(self, requests: list[Request], page_tables: list[list[int]]) -> None:
        """One token for each request (its newest); the logits wait for ``sample``."""
        rows = bucket(len(requests), 1, self.config.max_num_seqs)
        tokens = np.zeros(rows, np.int32)
        positions = np.zeros((rows, 3), np.int32)
        context = np.full(rows, -1, np.int32)
        for i, r in enumerate(requests):
            tokens[i] = r.token_ids(r.num_computed, r.num_computed + 1)[0]
            positions[i] = r.positions(r.num_computed, r.num_computed + 1)[:, 0]
            context[i] = r.num_computed
        self.lockstep.call("runner", "run_decode", tokens=tokens, positions=positions,
                           page_tables=self._page_tables(page_tables, rows, self._width(max(context) + 1)),
                           context=context)

    def precompile_decode(self) -> None:
        """Runs every decode program once, on padding rows (which write nothing). The sampler still
        compiles on first use per batch bucket; it is far smaller than a forward."""
        for rows in all_buckets(1, self.config.max_num_seqs):
            for width in all_buckets(MIN_PAGE_BUCKET, self.config.max_pages_per_seq):
                self.lockstep.call("runner", "run_decode", tokens=np.zeros(rows, np.int32),
                                   positions=np.zeros((rows, 3), np.int32),
                                   page_tables=self._page_tables([], rows, width),
                                   context=np.full(rows, -1, np.int32))

    def run_decode(self, tokens, positions, page_tables, context):
        self._logits, self.cache = _decode(self.model.module, self.model.params, tokens, positions, self.cache,
                                           page_tables, context)

    def sample(self, requests: list[Request | None]) -> SampledTokens:
        """Samples row i of the last step's logits for requests[i]; None rows (and padding) are
        neither sampled nor counted."""
        rows = self._logits.shape[0]
        padded = requests + [None] * (rows - len(requests))
        batch = pack_sampling_batch(
            [r.params if r else _PADDING_PARAMS for r in padded],
            [len(r.output_ids) if r else 0 for r in padded],
            [r.slot if r else 0 for r in padded],
            rows)
        batch = batch._replace(valid=np.array([r is not None for r in padded]))
        out = self.lockstep.call("runner", "run_sample", **batch._asdict())
        ids = np.asarray(out.token_ids)
        if all(r is None or r.params.logprobs is None for r in requests):
            return SampledTokens(ids)
        return SampledTokens(ids, np.asarray(out.logprobs), np.asarray(out.top_token_ids),
                             np.asarray(out.top_logprobs))

    def run_sample(self, **batch):
        key = jax.random.fold_in(self._key, self._steps)
        self._steps += 1
        out, self.penalties = sample(self._logits, SamplingBatch(**batch), self.penalties, key)
        self._logits = None
        return self.lockstep.readable(out, self.layout)

    def _width(self, tokens: int) -> int:
        """Pages a program must see for sequences of up to ``tokens`` tokens, bucketed. Taken from
        tokens rather than from the tables (which may hold pages reserved ahead), an unchunked
        prefill's width follows from its token bucket, so it adds no program variants."""
        return bucket(-(-int(tokens) // self.config.page_size), MIN_PAGE_BUCKET, self.config.max_pages_per_seq)

    def _page_tables(self, tables: list[list[int]], rows: int, width: int | None = None) -> np.ndarray:
        """[rows, width] page ids, SCRATCH_PAGE past each table (width None: max_pages_per_seq);
        pages past the width (reserved ahead) are left out."""
        width = width or self.config.max_pages_per_seq
        out = np.full((rows, width), SCRATCH_PAGE, np.int32)
        for i, table in enumerate(tables):
            out[i, : min(len(table), width)] = table[:width]
        return out


def _local(x):
    """This process's copy of a replicated array (the whole array when it is all local)."""
    return x if x.is_fully_addressable else x.addressable_data(0)
