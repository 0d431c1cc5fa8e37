"""The model runner: owns the device state (params, KV cache, penalty state) and the jitted programs.

Every call pads its batch to a shape of the :class:`ProgramGrid`, so each program compiles once
per shape, and :meth:`ModelRunner.compile` compiles the whole grid before the engine serves. The
KV cache and the penalty state are donated to the programs that update them. After a step only
the sampled ids come back to the host (plus logprobs when a request asked for them).

Each public method lays out its host inputs and runs its device program through the
``Lockstep`` (``run_*`` methods), so on a role spanning several processes every process runs the
same programs in the leader's order; the step's logits stay on device between ``run_prefill`` /
``run_decode`` and ``run_sample``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmserve.engine.config import EngineConfig
from mmserve.engine.kv_rows import gather_rows, scatter_rows
from mmserve.engine.request import Request
from mmserve.distributed.layout import MeshLayout, local_copy
from mmserve.distributed.lockstep import Lockstep
from mmserve.engine.program_grid import ProgramGrid
from mmserve.engine.scheduler import PrefillChunk
from mmserve.engine.visual_rows import VisualRows, empty_block, place_rows
from mmserve.kv_cache_manager import SCRATCH_PAGE, KVCacheManager
from mmserve.sampling_params import SamplingParams
from mmserve.sampler import (SamplerOutput, SamplingBatch, all_allowed_bitmask, init_penalty_state, load_slot,
                             no_logit_bias, pack_sampling_batch, padded_token_ids, sample)
from models.qwen3_vl_moe import Model, stages
from models.qwen3_vl_moe.kv_cache import KVCache

_PADDING_PARAMS = SamplingParams(temperature=0.0)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _prefill(module, params, ids, positions, cache, page_tables, starts, lengths, visual_rows, visual_deepstack,
             visual_index):
    """visual_rows [V, H] and visual_deepstack [V, levels * H]: the step's visual tokens, in a block
    of fixed size; visual_index [B, T]: each token's row in it, -1 at text tokens."""
    visual = visual_index >= 0
    index = jnp.maximum(visual_index, 0)
    levels = visual_deepstack.shape[1] // visual_rows.shape[1]
    stack = visual_deepstack.reshape(visual_deepstack.shape[0], levels, -1)
    deepstack = jnp.where(visual[None, ..., None], jnp.moveaxis(stack[index], -2, 0), 0)
    return stages.prefill(module, params, ids, positions, cache, page_tables, starts, lengths,
                          visual_rows[index], visual, deepstack)


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

    def row(self, i: int) -> tuple:
        """Row i as (token, logprob, top ids, top logprobs), the last three None without logprobs."""
        if self.logprobs is None:
            return self.token_ids[i], None, None, None
        return self.token_ids[i], self.logprobs[i], self.top_ids[i], self.top_logprobs[i]


class ModelRunner:
    def __init__(self, model: Model, config: EngineConfig, layout: MeshLayout | None = None,
                 lockstep: Lockstep | None = None):
        """With a ``layout`` the KV cache is created sharded over its mesh (params come sharded
        from ``load_model``); XLA partitions the programs from those shardings."""
        self.model = model
        self.config = config
        self.layout = layout
        text = model.config.text
        self.grid = ProgramGrid.for_model(config, model.config)
        self.num_pages = config.num_pages or KVCacheManager.num_pages_for_budget(
            config.kv_cache_bytes, text.num_hidden_layers, text.num_key_value_heads, text.head_dim,
            config.page_size, model.dtype)
        # Committed to their device from the start: the programs' outputs are, and a first call on
        # uncommitted inputs would compile a second variant of every program.
        self._home = home = jax.devices()[0] if layout is None else layout.replicated()
        self._block_device = jax.local_devices()[0]
        """Where a prefill step's visual block is assembled: the leader's own device (its inputs,
        the vision tower's or a transfer's rows, are the leader's), then placed as ``_home``."""
        self.cache = (jax.device_put(KVCache.create(text, self.num_pages, config.page_size, model.dtype), home)
                      if layout is None else
                      layout.create_kv_cache(model.config, self.num_pages, config.page_size, model.dtype))
        self.penalties = jax.device_put(init_penalty_state(config.max_num_seqs, text.vocab_size), home)
        levels, rows = len(model.config.vision.deepstack_visual_indexes), self.grid.visual_rows
        # What a text-only prefill step passes as its visual block: made once, on device, so that
        # text steps move no zeros and share the program of image steps.
        self._no_visual = jax.device_put((np.zeros((rows, text.hidden_size), model.dtype),
                                          np.zeros((rows, levels * text.hidden_size), model.dtype)), home)
        self._all_allowed: dict[int, jax.Array] = {}  # rows -> resident mask of steps without a grammar
        self._no_logit_bias: dict[int, tuple[jax.Array, jax.Array]] = {}  # rows -> resident zero bias table
        self._key = jax.random.PRNGKey(config.seed)
        self._steps = 0
        self._logits = None
        self._sampled_ids: jax.Array | None = None  # the last sample's, which a decode step may follow
        self.lockstep = lockstep or Lockstep()
        self.lockstep.bind("runner", self)

    def read_kv(self, page_table: list[int], num_tokens: int, rows: int, start: int = 0):
        """(k, v) rows [rows, layers, kv, d] of a sequence's tokens ``start..num_tokens-1`` (zero
        past them), on this process's devices."""
        k, v = self.lockstep.call(self.run_read_kv, page_table=self._page_tables([page_table], 1)[0],
                                  rows=rows, start=np.int32(start), num_tokens=np.int32(num_tokens))
        return local_copy(k), local_copy(v)

    def run_read_kv(self, page_table, rows, start, num_tokens):
        return self.lockstep.readable(gather_rows(self.cache, page_table, int(rows), start, num_tokens), self.layout)

    def write_kv(self, page_table: list[int], k_rows, v_rows, start: int, num_tokens: int) -> None:
        """Writes ``num_tokens`` rows as the sequence's tokens from ``start`` on."""
        self.lockstep.call(self.run_write_kv, page_table=self._page_tables([page_table], 1)[0],
                           k_rows=k_rows, v_rows=v_rows, start=np.int32(start), num_tokens=np.int32(num_tokens))

    def run_write_kv(self, page_table, k_rows, v_rows, start, num_tokens):
        if self.layout is not None:
            k_rows, v_rows = jax.device_put((k_rows, v_rows), self.layout.kv_rows(k_rows.shape))
        self.cache = scatter_rows(self.cache, page_table, k_rows, v_rows, start, num_tokens)

    def load_slot(self, request: Request) -> None:
        """Points the request's penalty slot at its prompt and output so far. Skipped for a request
        without penalties: whatever its slot holds leaves its logits bit-identical, and loading a
        slot costs a program run (~0.4 ms on CPU) per admitted request."""
        if not request.params.has_penalties:
            return
        size = self.grid.slot_ids
        self.lockstep.call(self.run_load_slot, slot=np.int32(request.slot),
                           prompt_ids=padded_token_ids(request.prompt_ids, size),
                           output_ids=padded_token_ids(request.output_ids, size))

    def run_load_slot(self, slot, prompt_ids, output_ids):
        self.penalties = load_slot(self.penalties, slot, prompt_ids, output_ids)

    def prefill(self, chunks: list[PrefillChunk], page_tables: list[list[int]]) -> None:
        """Runs prompt chunks; the logits at each row's last chunk token wait for ``sample``."""
        grid = self.grid
        rows = grid.prefill_rows(len(chunks))
        t = grid.prefill_tokens(max(ch.length for ch in chunks))
        ids = np.zeros((rows, t), np.int32)
        positions = np.zeros((rows, 3, t), np.int32)
        starts = np.zeros(rows, np.int32)
        lengths = np.zeros(rows, np.int32)
        visual_index = np.full((rows, t), -1, np.int32)
        placed, used = [], 0  # (block rows, visual rows) of the step's visual tokens
        for i, ch in enumerate(chunks):
            r, end = ch.request, ch.start + ch.length
            ids[i, : ch.length] = r.token_ids(ch.start, end)
            positions[i, :, : ch.length] = r.positions(ch.start, end)
            starts[i], lengths[i] = ch.start, ch.length
            for at, run in ([] if r.visual is None else r.visual.in_span(ch.start, end)):
                block_rows = used + np.arange(at.size)
                visual_index[i, at - ch.start] = block_rows
                placed.append((block_rows, run))
                used += at.size
        visual_rows = visual_deepstack = None  # a text-only step: the program reads the zero block
        if placed:
            visual_rows, visual_deepstack = place_rows(self._empty_block(), placed)
        continues = any(ch.start > 0 for ch in chunks)
        width = grid.prefill_width(t, max(ch.start + ch.length for ch in chunks) if continues else None)
        self.lockstep.call(self.run_prefill, ids=ids, positions=positions,
                           page_tables=self._page_tables(page_tables, rows, width),
                           starts=starts, lengths=lengths, visual_rows=visual_rows,
                           visual_deepstack=visual_deepstack, visual_index=visual_index)

    def _empty_block(self):
        text, levels = self.model.config.text, len(self.model.config.vision.deepstack_visual_indexes)
        return empty_block(self.grid.visual_rows, text.hidden_size, levels, self.model.dtype, self._block_device)

    def run_prefill(self, ids, positions, page_tables, starts, lengths, visual_rows, visual_deepstack, visual_index):
        """visual_rows / visual_deepstack: the step's visual block, built on the leader's device
        (None: a text-only step, which reads the resident zero block)."""
        if visual_rows is None:
            visual_rows, visual_deepstack = self._no_visual
        else:  # placed as the zero block is (device to device), so both kinds of step run one program
            visual_rows, visual_deepstack = jax.device_put((visual_rows, visual_deepstack), self._home)
        self._logits, self.cache = _prefill(self.model.module, self.model.params, ids, positions, self.cache,
                                            page_tables, starts, lengths, visual_rows, visual_deepstack, visual_index)

    def decode(self, requests: list[Request], page_tables: list[list[int]], follows_sample: bool = False) -> None:
        """One token for each request (its newest); the logits wait for ``sample``. With
        ``follows_sample`` the tokens are the last sample's ids, still on device, for a step
        dispatched before they were read (the same requests in the same rows: ``LLMEngine``'s
        overlapped steps); else each request's newest."""
        rows = self.grid.decode_rows(len(requests))
        positions = np.zeros((rows, 3), np.int32)
        context = np.full(rows, -1, np.int32)
        tokens = None
        if not follows_sample:
            tokens = np.zeros(rows, np.int32)
            for i, r in enumerate(requests):
                tokens[i] = r.token_ids(r.num_computed, r.num_computed + 1)[0]
        for i, r in enumerate(requests):
            positions[i] = r.positions(r.num_computed, r.num_computed + 1)[:, 0]
            context[i] = r.num_computed
        self.lockstep.call(self.run_decode, tokens=tokens, positions=positions,
                           page_tables=self._page_tables(page_tables, rows, self.grid.page_width(max(context) + 1)),
                           context=context)

    def run_decode(self, tokens, positions, page_tables, context):
        """``tokens`` None: the last sample's ids, as this process holds them. Resolved here, not by
        the caller, because on a role spanning processes the leader cannot send its device arrays:
        each process reads its own copy of the sample (replicated over the mesh by ``run_sample``)."""
        if tokens is None:
            tokens = self._sampled_ids
            if tokens is None or tokens.shape[0] != positions.shape[0]:
                raise RuntimeError("a decode step follows a sample of other rows")
        # placed as the last sample's ids are, so both kinds of step run one program
        tokens = jax.device_put(tokens, self._home)
        self._logits, self.cache = _decode(self.model.module, self.model.params, tokens, positions, self.cache,
                                           page_tables, context)

    def sample(self, requests: list[Request | None], bitmask: np.ndarray | None = None) -> SampledTokens:
        """Samples row i of the last step's logits for requests[i]; None rows (and padding) are
        neither sampled nor counted. bitmask: i32[len(requests), words], the tokens row i may take
        (see ``sampler.sample``); None allows every token on every row."""
        return self.read_sample(requests, self.dispatch_sample(requests, bitmask))

    def dispatch_sample(self, requests: list[Request | None], bitmask: np.ndarray | None = None) -> SamplerOutput:
        """``sample`` without the read: the step's samples, on device (a request's output count is
        taken as it is now, a placeholder for a token not read yet included)."""
        rows = self._logits.shape[0]
        padded = requests + [None] * (rows - len(requests))
        batch = pack_sampling_batch(
            [r.params if r else _PADDING_PARAMS for r in padded],
            [len(r.output_ids) if r else 0 for r in padded],
            [r.slot if r else 0 for r in padded],
            rows)
        batch = batch._replace(valid=np.array([r is not None for r in padded]))
        if bitmask is not None and bitmask.shape[0] < rows:
            bitmask = np.concatenate([bitmask, all_allowed_bitmask(rows - bitmask.shape[0], self._vocab_size)])
        return self.lockstep.call(self.run_sample, token_bitmask=bitmask, **batch._asdict())

    @staticmethod
    def read_sample(requests: list[Request | None], out: SamplerOutput) -> SampledTokens:
        """Host copies of a dispatched sample (waits for it): the one device-to-host read of a step."""
        ids = np.asarray(out.token_ids)
        if all(r is None or r.params.logprobs is None for r in requests):
            return SampledTokens(ids)
        return SampledTokens(ids, np.asarray(out.logprobs), np.asarray(out.top_token_ids),
                             np.asarray(out.top_logprobs))

    def run_sample(self, token_bitmask, **batch):
        call = np.int32(self._steps)
        self._steps += 1
        rows = self._logits.shape[0]
        if token_bitmask is None:
            token_bitmask = self._allowed(rows)
        else:  # placed as the resident mask is, so both kinds of step run one program
            token_bitmask = jax.device_put(token_bitmask, self._home)
        if batch["bias_ids"] is None:
            batch["bias_ids"], batch["bias_values"] = self._no_bias(rows)
        else:  # as the resident table is placed (one program)
            batch["bias_ids"], batch["bias_values"] = jax.device_put((batch["bias_ids"], batch["bias_values"]),
                                                                     self._home)
        out, self.penalties = sample(self._logits, SamplingBatch(**batch), self.penalties, self._key, call,
                                     token_bitmask)
        self._logits = None
        out = self.lockstep.readable(out, self.layout)
        self._sampled_ids = out.token_ids
        return out

    def programs(self, kinds: frozenset[str], kv_read_rows: Sequence[int] = ()) -> list[Callable[[], None]]:
        """Callables that each run one program of the grid once, on padding (it writes nothing to
        the cache and counts no token), so that it is compiled and has run before any request:
        the grid's programs of ``kinds`` ("prefill", "decode", "kv_read": the KV reads a prefill
        worker ships to decode, one per row count of ``kv_read_rows``), each followed by the
        sampler on its logits, and the penalty slot.
        The first run matters too: a program's first execution is several times slower."""
        grid = self.grid

        def filled(*shape, value=0):
            return np.full(shape, value, np.int32)

        def prefill(rows, t, width):
            self.run_prefill(filled(rows, t), filled(rows, 3, t), filled(rows, width, value=SCRATCH_PAGE),
                             filled(rows), filled(rows), None, None, filled(rows, t, value=-1))
            self._sample_padding(rows)

        def decode(rows, width):
            self.run_decode(filled(rows), filled(rows, 3), filled(rows, width, value=SCRATCH_PAGE),
                            filled(rows, value=-1))
            self._sample_padding(rows)
            if self.layout is not None:  # and a step on those ids, as an overlapped step runs: on a
                # mesh, placing them may be a program of its own (on one device it is nothing)
                self.run_decode(None, filled(rows, 3), filled(rows, width, value=SCRATCH_PAGE),
                                filled(rows, value=-1))
                self._sample_padding(rows)

        def slot():
            ids = padded_token_ids([], grid.slot_ids)
            self.run_load_slot(np.int32(0), ids, ids)

        def kv_read(rows):
            jax.block_until_ready(self.run_read_kv(filled(grid.max_pages, value=SCRATCH_PAGE), rows, np.int32(0),
                                                   np.int32(0)))

        return ([functools.partial(prefill, *shape) for shape in grid.prefill_shapes() if "prefill" in kinds]
                + [functools.partial(decode, *shape) for shape in grid.decode_shapes() if "decode" in kinds]
                + [slot]
                + [functools.partial(kv_read, rows) for rows in kv_read_rows if "kv_read" in kinds])

    def arrival_programs(self, kinds: frozenset[str], source_rows: Sequence[int]) -> list[Callable[[], None]]:
        """One callable per row count of the arrays rows arrive in (from the vision tower or a
        transfer), running what takes them, writing nothing: with "prefill", placing one row into
        a step's visual block (``visual_rows.place_rows``); with "kv_write", ``write_kv``."""
        text, levels = self.model.config.text, len(self.model.config.vision.deepstack_visual_indexes)
        kv_shape = (text.num_hidden_layers, text.num_key_value_heads, text.head_dim)

        def zeros(*shape):
            return jax.device_put(np.zeros(shape, self.model.dtype), self._block_device)

        def place(rows):
            run = VisualRows(zeros(rows, text.hidden_size), zeros(rows, levels * text.hidden_size), start=0, count=1)
            jax.block_until_ready(place_rows(self._empty_block(), [(np.zeros(1, np.int32), run)]))

        def write(rows):
            # As write_kv's rows reach run_write_kv: a receiver's device arrays, or across processes
            # the host copies the lockstep sends every process.
            k = np.zeros((rows, *kv_shape), self.model.dtype)
            k = k if self.lockstep.spans_processes else zeros(rows, *kv_shape)
            self.run_write_kv(np.full(self.config.max_pages_per_seq, SCRATCH_PAGE, np.int32), k, k, np.int32(0),
                              np.int32(0))
            jax.block_until_ready(self.cache)

        rows = sorted(set(source_rows))
        return ([functools.partial(place, r) for r in rows if "prefill" in kinds]
                + [functools.partial(write, r) for r in rows if "kv_write" in kinds])

    def _sample_padding(self, rows: int) -> None:
        """The sampler on the last step's logits, every row padding: nothing counted, and the
        engine's random stream (``_steps``) left where it was."""
        batch = pack_sampling_batch([_PADDING_PARAMS] * rows, [0] * rows, [0] * rows, rows)
        bias_ids, bias_values = self._no_bias(rows)
        batch = batch._replace(valid=np.zeros(rows, bool), bias_ids=bias_ids, bias_values=bias_values)
        out, self.penalties = sample(self._logits, batch, self.penalties, self._key, np.int32(0),
                                     self._allowed(rows))
        self._logits = None
        out = self.lockstep.readable(out, self.layout)
        self._sampled_ids = out.token_ids
        jax.block_until_ready(out)

    @property
    def _vocab_size(self) -> int:
        return self.model.config.text.vocab_size

    def _no_bias(self, rows: int) -> tuple[jax.Array, jax.Array]:
        """The logit-bias table that biases nothing, ``rows`` rows, kept on device as ``_allowed``."""
        if rows not in self._no_logit_bias:
            self._no_logit_bias[rows] = jax.device_put(no_logit_bias(rows), self._home)
        return self._no_logit_bias[rows]

    def _allowed(self, rows: int) -> jax.Array:
        """The all-allowed mask of ``rows`` rows, kept on device: a step without a grammar copies none."""
        if rows not in self._all_allowed:
            self._all_allowed[rows] = jax.device_put(all_allowed_bitmask(rows, self._vocab_size), self._home)
        return self._all_allowed[rows]

    def _page_tables(self, tables: list[list[int]], rows: int, width: int | None = None) -> np.ndarray:
        """[rows, width] page ids, SCRATCH_PAGE past each table (width None: max_pages_per_seq);
        pages past the width (reserved ahead) are left out."""
        width = width or self.config.max_pages_per_seq
        out = np.full((rows, width), SCRATCH_PAGE, np.int32)
        for i, table in enumerate(tables):
            out[i, : min(len(table), width)] = table[:width]
        return out

