"""The vision stage: images and videos to embeddings and deepstack rows, jitted per patch bucket,
with the embedding cache in front so that the same picture is encoded once. The rows stay on device
(``VisualRows``: each picture a run of its vision call's output) until the prefill program or the
transfer's block buffers read them."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmserve.distributed.layout import MeshLayout, local_copy
from mmserve.distributed.lockstep import Lockstep
from mmserve.engine.config import EngineConfig
from mmserve.engine.embedding_cache import EmbeddingCache
from mmserve.engine.inputs import Visual, with_pixels
from mmserve.engine.program_grid import ProgramGrid
from mmserve.engine.single_flight import SingleFlight
from mmserve.engine.visual_rows import VisualRows
from mmserve.engine.warmup import compile_programs
from models.qwen3_vl_moe import Model, stages
from models.qwen3_vl_moe.vision_inputs import vision_inputs


PACKED_PATCHES = 512
"""Patches of small images packed into one vision call. Packing saves a call per image, but the
tower attends over the whole packed sequence (masked to each image), so its attention grows with
the square of the pack: 512 patches (eight 128x128 images) keeps that below the per-call cost."""


@functools.partial(jax.jit, static_argnums=0)
def _encode(module, params, patches, interp_idx, interp_weight, rope_pos, segment_ids):
    """(embeddings [N/4, H], deepstack [N/4, levels * H]): token-major, as the transfer carries them."""
    embeds, deepstack = stages.encode(module, params, patches, interp_idx, interp_weight, rope_pos, segment_ids)
    return embeds, jnp.swapaxes(deepstack, 0, 1).reshape(embeds.shape[0], -1)


class Encoder:
    def __init__(self, model: Model, config: EngineConfig, layout: MeshLayout | None = None,
                 lockstep: Lockstep | None = None):
        """The vision program runs through ``lockstep`` (every process of a multi-host role runs
        it); its outputs are replicated over ``layout``'s mesh there, so the leader can read them.
        Patch counts are padded to the buckets of ``config``'s program grid."""
        self.model = model
        self.grid = ProgramGrid.for_model(config, model.config)
        self._pack_limit = min(PACKED_PATCHES, self.grid.patch_max)
        self.cache = EmbeddingCache(config.embedding_cache_bytes)
        self._decoding: SingleFlight[Visual] = SingleFlight()
        self._counting = threading.Lock()
        self.pictures_decoded = 0
        """Files decoded (callers sharing another's decode of the same file not counted)."""
        self.layout = layout
        self.lockstep = lockstep or Lockstep()
        self.lockstep.bind("encoder", self)

    def holds(self, content_key: bytes) -> bool:
        """Whether the embeddings of this picture are cached (then it need not be decoded); safe to
        ask from another thread (an answer may be stale: ``encode_many`` decodes what it lacks)."""
        return content_key in self.cache

    def decodable(self, visual: Visual) -> Visual:
        """The visual ready for ``encode_many``: as it is when it has its pixels or its embeddings are
        cached, else decoded (raising ``RequestRejected`` for a file that will not decode)."""
        if visual.pixel_values is not None or visual.content_key in self.cache:
            return visual
        return self.decoded(visual)

    def decoded(self, visual: Visual) -> Visual:
        """The visual with its patches (``with_pixels``); safe from any thread, and a file that
        other callers are decoding right now (the same content key) is decoded once for all of them."""
        if visual.pixel_values is not None:
            return visual
        out, computed = self._decoding.run(visual.content_key, lambda: with_pixels(visual, self.model.processor))
        if computed:
            with self._counting:
                self.pictures_decoded += 1
            return out
        return Visual(out.grid_thw, out.pixel_values, content_key=visual.content_key, timestamps=visual.timestamps)

    def encode(self, visual: Visual) -> VisualRows:
        """One image or video's rows, on device."""
        return self.encode_many([visual])[0]

    def encode_many(self, visuals: list[Visual]) -> list[VisualRows]:
        """Features of each visual, in order. Those not cached run packed together, up to
        ``PACKED_PATCHES`` patches a call (each keeps its own attention segments), and no more than
        the largest patch bucket (below that with a short context: a pack of pictures each within
        it ran past every bucket, failing the whole step)."""
        keys = [v.content_key for v in visuals]
        found = {key: self.cache.get(key) for key in dict.fromkeys(keys)}
        # A visual passed undecoded because the cache held it may have been evicted since: decoded here.
        missing = {key: self.decoded(visual) for key, visual in zip(keys, visuals) if found[key] is None}
        batch: list[tuple[bytes, Visual]] = []
        for key, visual in missing.items():
            if batch and sum(len(v.pixel_values) for _, v in batch) + len(visual.pixel_values) > self._pack_limit:
                found.update(self._run(batch))
                batch = []
            batch.append((key, visual))
        if batch:
            found.update(self._run(batch))
        for key in missing:
            self.cache.put(key, found[key])
        return [found[key] for key in keys]

    def _run(self, batch: list[tuple[bytes, Visual]]) -> dict[bytes, VisualRows]:
        grids = np.concatenate([v.grid_thw for _, v in batch])
        tables = vision_inputs(grids, self.model.config.vision)
        n = tables.num_patches
        size = self.grid.patches(n)
        patches = np.zeros((size, batch[0][1].pixel_values.shape[1]), np.float32)
        patches[:n] = np.concatenate([v.pixel_values for _, v in batch])
        padded = tables.padded(size)
        embeds, deepstack = self.lockstep.call(
            self.run_encode, patches=patches, interp_idx=padded.interp_idx,
            interp_weight=padded.interp_weight, rope_pos=padded.rope_pos, segment_ids=padded.segment_ids)
        embeds, deepstack = local_copy(embeds), local_copy(deepstack)  # the leader's, where a role spans processes
        merge, out, start = self.model.config.vision.merge_unit, {}, 0
        for key, visual in batch:
            count = len(visual.pixel_values) // merge
            out[key] = VisualRows(embeds, deepstack, start, count)
            start += count
        return out

    def programs(self) -> list[Callable[[], None]]:
        """One callable per patch bucket, running the vision tower once on it (compiled, and past
        its slow first execution, before any request)."""
        merge = self.model.config.vision.spatial_merge_size
        tables = vision_inputs(np.array([[1, merge, merge]]), self.model.config.vision)

        def run(size):
            padded = tables.padded(size)
            patches = np.zeros((size, self.model.config.vision.patch_dim), np.float32)
            jax.block_until_ready(self.run_encode(patches, padded.interp_idx, padded.interp_weight, padded.rope_pos,
                                                  padded.segment_ids))

        return [functools.partial(run, size) for size in self.grid.patch_buckets()]

    def output_rows(self) -> list[int]:
        """The row counts of the vision call's outputs (one per patch bucket): the arrays a
        picture's ``VisualRows`` are runs of."""
        return [size // self.model.config.vision.merge_unit for size in self.grid.patch_buckets()]

    def run_compile(self) -> None:
        compile_programs(self.programs(), "encoder")

    def run_encode(self, patches, interp_idx, interp_weight, rope_pos, segment_ids):
        out = _encode(self.model.module, self.model.params, jnp.asarray(patches, self.model.dtype), interp_idx,
                      interp_weight, rope_pos, segment_ids)
        return self.lockstep.readable(out, self.layout)

