"""The Qwen3-VL vision tower: patch embedding, ViT blocks, the merger and the deepstack mergers.

Parameter names follow the Hugging Face checkpoint (``model.visual.*``) so that loading is a
rename plus a transpose. Patches arrive in merge-block order (four consecutive rows form one
merged token), with the grid-dependent tables of :mod:`vision_inputs`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.qwen3_vl_moe.config import VisionConfig
from models.qwen3_vl_moe.rope import rotate_half


def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


class VisionAttention(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids):
        c = self.config
        n = x.shape[0]
        qkv = nn.Dense(3 * c.hidden_size, dtype=self.dtype, param_dtype=self.dtype, name="qkv")(x)
        q, k, v = jnp.moveaxis(qkv.reshape(n, 3, c.num_heads, c.head_dim), 1, 0)
        q = (q.astype(jnp.float32) * cos + rotate_half(q.astype(jnp.float32)) * sin).astype(x.dtype)
        k = (k.astype(jnp.float32) * cos + rotate_half(k.astype(jnp.float32)) * sin).astype(x.dtype)
        scores = jnp.einsum("qhd,khd->hqk", q, k) * (c.head_dim**-0.5)
        same = segment_ids[:, None] == segment_ids[None, :]
        scores = jnp.where(same[None], scores.astype(jnp.float32), -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("hqk,khd->qhd", probs, v).reshape(n, c.hidden_size)
        return nn.Dense(c.hidden_size, dtype=self.dtype, param_dtype=self.dtype, name="proj")(out)


class VisionMLP(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = nn.Dense(c.intermediate_size, dtype=self.dtype, param_dtype=self.dtype, name="linear_fc1")(x)
        x = _gelu_tanh(x) if c.hidden_act == "gelu_pytorch_tanh" else _gelu_exact(x)
        return nn.Dense(c.hidden_size, dtype=self.dtype, param_dtype=self.dtype, name="linear_fc2")(x)


class VisionBlock(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids):
        norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.dtype, name=name)
        x = x + VisionAttention(self.config, self.dtype, name="attn")(norm("norm1")(x), cos, sin, segment_ids)
        return x + VisionMLP(self.config, self.dtype, name="mlp")(norm("norm2")(x))


class PatchMerger(nn.Module):
    """Merges each 2x2 block of patches into one token of the language model's width.

    The final merger normalises each patch before the shuffle; the deepstack mergers normalise the
    concatenated block after it (``postshuffle``).
    """

    config: VisionConfig
    dtype: jnp.dtype
    postshuffle: bool

    @nn.compact
    def __call__(self, x):
        c = self.config
        width = c.hidden_size * c.merge_unit
        norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.dtype, name="norm")
        x = norm(x.reshape(-1, width)) if self.postshuffle else norm(x).reshape(-1, width)
        x = nn.Dense(width, dtype=self.dtype, param_dtype=self.dtype, name="linear_fc1")(x)
        x = _gelu_exact(x)
        return nn.Dense(c.out_hidden_size, dtype=self.dtype, param_dtype=self.dtype, name="linear_fc2")(x)


class VisionTower(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, patches, interp_idx, interp_weight, rope_pos, segment_ids):
        """patches [N, C*T*P*P] -> (embeddings [N/4, out], deepstack [levels, N/4, out])."""
        c = self.config
        x = nn.Dense(c.hidden_size, dtype=self.dtype, param_dtype=self.dtype, name="patch_embed")(
            patches.astype(self.dtype)
        )
        table = self.param(
            "pos_embed", nn.initializers.normal(0.02), (c.num_position_embeddings, c.hidden_size), self.dtype
        )
        pos = jnp.sum(table[interp_idx] * interp_weight[..., None].astype(self.dtype), axis=1)
        x = x + pos.astype(x.dtype)
        cos, sin = self._rotary(rope_pos)

        deepstack = []
        for i in range(c.depth):
            x = VisionBlock(c, self.dtype, name=f"blocks_{i}")(x, cos, sin, segment_ids)
            if i in c.deepstack_visual_indexes:
                level = c.deepstack_visual_indexes.index(i)
                deepstack.append(
                    PatchMerger(c, self.dtype, postshuffle=True, name=f"deepstack_merger_list_{level}")(x)
                )
        merged = PatchMerger(c, self.dtype, postshuffle=False, name="merger")(x)
        return merged, jnp.stack(deepstack)

    def _rotary(self, rope_pos):
        """2-D rotary tables: the first half of each head's frequencies rotate by row, the rest by col."""
        c = self.config
        spatial = c.head_dim // 2
        inv_freq = 1.0 / (c.rope_theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
        freqs = rope_pos.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, spatial/2]
        freqs = freqs.reshape(freqs.shape[0], -1)
        emb = jnp.concatenate([freqs, freqs], axis=-1)[:, None, :]  # [N, 1, head_dim]
        return jnp.cos(emb), jnp.sin(emb)
