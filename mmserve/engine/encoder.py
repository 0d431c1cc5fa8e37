"""The vision stage: images and videos to embeddings and deepstack rows, jitted per patch bucket,
with the embedding cache in front so that the same pixels are encoded once."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmserve.distributed.layout import MeshLayout
from mmserve.distributed.lockstep import Lockstep
from mmserve.engine.config import EngineConfig
from mmserve.engine.embedding_cache import EmbeddingCache, pixel_key
from mmserve.engine.inputs import Visual
from mmserve.engine.program_grid import ProgramGrid
from mmserve.engine.warmup import compile_programs
from models.qwen3_vl_moe import Model, stages
from models.qwen3_vl_moe.vision_inputs import vision_inputs


@functools.partial(jax.jit, static_argnums=0)
def _encode(module, params, patches, interp_idx, interp_weight, rope_pos, segment_ids):
    return stages.encode(module, params, patches, interp_idx, interp_weight, rope_pos, segment_ids)


class Encoder:
    def __init__(self, model: Model, config: EngineConfig, layout: MeshLayout | None = None,
                 lockstep: Lockstep | None = None):
        """The vision program runs through ``lockstep`` (every process of a multi-host role runs
        it); its outputs are replicated over ``layout``'s mesh there, so the leader can read them.
        Patch counts are padded to the buckets of ``config``'s program grid."""
        self.model = model
        self.grid = ProgramGrid.for_model(config, model.config)
        self.cache = EmbeddingCache(config.embedding_cache_size)
        self.layout = layout
        self.lockstep = lockstep or Lockstep()
        self.lockstep.bind("encoder", self)

    def encode(self, visual: Visual) -> tuple[np.ndarray, np.ndarray]:
        """One image or video -> host (embeddings [n, H], deepstack [levels, n, H]); the prompt's
        placement of them is host work (see models.qwen3_vl_moe.multimodal)."""
        key = pixel_key(visual.pixel_values, visual.grid_thw)
        cached = self.cache.get(key)
        if cached is None:
            cached = self._run(visual)
            self.cache.put(key, cached)
        return cached

    def encode_all(self, visuals: list[Visual]) -> tuple[np.ndarray, np.ndarray] | None:
        """All images (or all videos) of a prompt, concatenated in prompt order."""
        if not visuals:
            return None
        features = [self.encode(v) for v in visuals]
        return np.concatenate([f[0] for f in features]), np.concatenate([f[1] for f in features], axis=1)

    def _run(self, visual: Visual) -> tuple[np.ndarray, np.ndarray]:
        tables = vision_inputs(visual.grid_thw, self.model.config.vision)
        n = tables.num_patches
        size = self.grid.patches(n)
        patches = np.zeros((size, visual.pixel_values.shape[1]), np.float32)
        patches[:n] = visual.pixel_values
        padded = tables.padded(size)
        embeds, deepstack = self.lockstep.call(
            "encoder", "run_encode", patches=patches, interp_idx=padded.interp_idx,
            interp_weight=padded.interp_weight, rope_pos=padded.rope_pos, segment_ids=padded.segment_ids)
        merged = n // self.model.config.vision.merge_unit
        return np.asarray(embeds)[:merged], np.asarray(deepstack)[:, :merged]

    def programs(self) -> list[Callable[[], None]]:
        """One callable per patch bucket, compiling the vision tower with a step's arguments."""
        merge = self.model.config.vision.spatial_merge_size
        tables = vision_inputs(np.array([[1, merge, merge]]), self.model.config.vision)

        def compile_for(size):
            padded = tables.padded(size)
            patches = jnp.zeros((size, self.model.config.vision.patch_dim), self.model.dtype)
            _encode.lower(self.model.module, self.model.params, patches, padded.interp_idx, padded.interp_weight,
                          padded.rope_pos, padded.segment_ids).compile()

        return [functools.partial(compile_for, size) for size in self.grid.patch_buckets()]

    def run_compile(self) -> None:
        compile_programs(self.programs(), "encoder")

    def run_encode(self, patches, interp_idx, interp_weight, rope_pos, segment_ids):
        out = _encode(self.model.module, self.model.params, jnp.asarray(patches, self.model.dtype), interp_idx,
                      interp_weight, rope_pos, segment_ids)
        return self.lockstep.readable(out, self.layout)
