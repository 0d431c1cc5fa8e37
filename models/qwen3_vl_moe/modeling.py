"""The whole model as one Flax module: vision tower, language model and LM head.

Its methods are the building blocks of the three stages in :mod:`stages`; the parameter tree is
``{"visual": ..., "language_model": ..., "lm_head": ...}`` (no ``lm_head`` when tied).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from models.qwen3_vl_moe.config import ModelConfig
from models.qwen3_vl_moe.text import TextModel
from models.qwen3_vl_moe.vision import VisionTower


class Qwen3VLMoe(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    moe_dispatch: str = "ragged_dot"

    def setup(self):
        self.visual = VisionTower(self.config.vision, self.dtype)
        self.language_model = TextModel(self.config.text, self.dtype, self.moe_dispatch)
        if not self.config.tie_word_embeddings:
            self.lm_head = nn.Dense(
                self.config.text.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.dtype
            )

    def encode(self, patches, interp_idx, interp_weight, rope_pos, segment_ids):
        return self.visual(patches, interp_idx, interp_weight, rope_pos, segment_ids)

    def embed(self, input_ids):
        return self.language_model.embed(input_ids)

    def decoder(self, embeds, positions, cache, page_tables, starts, lengths, deepstack=None):
        return self.language_model(embeds, positions, cache, page_tables, starts, lengths, deepstack)

    def logits(self, hidden):
        if self.config.tie_word_embeddings:
            return self.language_model.attend_logits(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def __call__(self, input_ids, positions, cache, page_tables, starts, lengths, patches, vision_tables):
        """Touches every parameter once; used only to initialise the tree."""
        embeds, deepstack = self.encode(patches, *vision_tables)
        hidden, cache = self.decoder(self.embed(input_ids), positions, cache, page_tables, starts, lengths)
        return self.logits(hidden), embeds, deepstack
