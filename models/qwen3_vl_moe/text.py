"""The Qwen3-VL-MoE language model over a paged KV cache.

Parameter names follow the checkpoint (``model.language_model.*``). The model is a pure function
of (params, inputs, cache): the cache goes in and the updated cache comes out, so the engine can
jit it with the cache donated.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from models.qwen3_vl_moe.config import TextConfig
from models.qwen3_vl_moe.kv_cache import KVCache
from models.qwen3_vl_moe.moe import DenseMLP, SparseMoeBlock
from models.qwen3_vl_moe.paged_attention import attend, token_slots, write_kv
from models.qwen3_vl_moe.rope import apply_rope, mrope_cos_sin


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))
        return weight * normed.astype(x.dtype)


class Attention(nn.Module):
    config: TextConfig
    dtype: jnp.dtype
    layer: int

    @nn.compact
    def __call__(self, x, cos, sin, cache: KVCache, slots):
        c = self.config
        b, t, _ = x.shape
        dense = lambda n, name: nn.Dense(
            n, use_bias=c.attention_bias, dtype=self.dtype, param_dtype=self.dtype, name=name
        )
        q = dense(c.num_attention_heads * c.head_dim, "q_proj")(x).reshape(b, t, -1, c.head_dim)
        k = dense(c.num_key_value_heads * c.head_dim, "k_proj")(x).reshape(b, t, -1, c.head_dim)
        v = dense(c.num_key_value_heads * c.head_dim, "v_proj")(x).reshape(b, t, -1, c.head_dim)
        q = apply_rope(RMSNorm(c.rms_norm_eps, self.dtype, name="q_norm")(q), cos, sin)
        k = apply_rope(RMSNorm(c.rms_norm_eps, self.dtype, name="k_norm")(k), cos, sin)

        page, slot, query_pos, page_tables = slots
        cache = KVCache(k=write_kv(cache.k, self.layer, k, page, slot), v=write_kv(cache.v, self.layer, v, page, slot))
        out = attend(q, cache.k, cache.v, page_tables, query_pos, c.head_dim**-0.5, layer=self.layer)
        return dense(c.hidden_size, "o_proj")(out), cache


class DecoderLayer(nn.Module):
    config: TextConfig
    dtype: jnp.dtype
    layer: int
    moe_dispatch: str = "ragged_dot"

    @nn.compact
    def __call__(self, x, cos, sin, cache, slots, valid):
        c = self.config
        h, cache = Attention(c, self.dtype, self.layer, name="self_attn")(
            RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x), cos, sin, cache, slots
        )
        x = x + h
        normed = RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        if c.is_moe_layer(self.layer):
            h = SparseMoeBlock(c, self.dtype, self.moe_dispatch, name="mlp")(normed, valid)
        else:
            h = DenseMLP(c, self.dtype, name="mlp")(normed)
        return x + h, cache


class TextModel(nn.Module):
    config: TextConfig
    dtype: jnp.dtype = jnp.float32
    moe_dispatch: str = "ragged_dot"
    """How MoE layers send tokens to experts: a strategy of :mod:`models.qwen3_vl_moe.moe_dispatch`."""

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        self.layers = [DecoderLayer(c, self.dtype, i, self.moe_dispatch) for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def attend_logits(self, hidden):
        """Logits through the tied embedding table."""
        return self.embed_tokens.attend(hidden)

    def __call__(self, embeds, positions, cache: KVCache, page_tables, starts, lengths, deepstack=None):
        """Runs the decoder over token chunks and writes their KV into the cache.

        embeds [B, T, H] (token embeddings with visual embeddings already in place); positions
        [B, 3, T] MRoPE positions; deepstack [levels, B, T, H] added after layers 0..levels-1 (zero
        rows at text tokens, so adding everywhere equals adding at the visual positions).
        Returns (normed hidden [B, T, H], cache).
        """
        b, t, _ = embeds.shape
        slots = token_slots(page_tables, starts, lengths, t, cache.page_size, cache.num_pages)
        slots = (*slots, page_tables)
        valid = jnp.arange(t)[None, :] < lengths[:, None]  # [B, T]: padding rows and tokens are False
        cos, sin = mrope_cos_sin(positions, self.config)
        x = embeds
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, cos, sin, cache, slots, valid)
            if deepstack is not None and i < deepstack.shape[0]:
                x = x + deepstack[i].astype(x.dtype)
        return self.norm(x), cache
