"""The sparse MoE block (softmax router, renormalised top-k, SiLU experts) and the dense MLP.

Experts are stored in the published checkpoint layout: ``gate_up_proj`` [E, H, 2I] applied as
``x @ W[e]`` and ``down_proj`` [E, I, H]. Tokens are dispatched by sorting their (token, choice)
pairs by expert and running two grouped matmuls (``jax.lax.ragged_dot``), so the work is the
routed work, not E dense passes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.qwen3_vl_moe.config import TextConfig


class SparseMoeBlock(nn.Module):
    config: TextConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        c = self.config
        shape = x.shape
        x = x.reshape(-1, c.hidden_size)
        e, k, inter = c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size
        init = nn.initializers.normal(0.02)
        router = self.param("gate", init, (c.hidden_size, e), self.dtype)
        gate_up = self.param("gate_up_proj", init, (e, c.hidden_size, 2 * inter), self.dtype)
        down = self.param("down_proj", init, (e, inter, c.hidden_size), self.dtype)

        probs = jax.nn.softmax((x @ router).astype(jnp.float32), axis=-1)
        top_w, top_e = jax.lax.top_k(probs, k)
        top_w = (top_w / jnp.sum(top_w, axis=-1, keepdims=True)).astype(x.dtype)

        flat_e = top_e.reshape(-1)
        order = jnp.argsort(flat_e, stable=True)
        token_of = order // k
        group_sizes = jnp.bincount(flat_e, length=e).astype(jnp.int32)
        h = jax.lax.ragged_dot(x[token_of], gate_up, group_sizes)
        h = jax.nn.silu(h[:, :inter]) * h[:, inter:]
        out = jax.lax.ragged_dot(h, down, group_sizes)
        out = out * top_w.reshape(-1)[order][:, None]
        combined = jnp.zeros_like(x).at[token_of].add(out)
        return combined.reshape(shape)


class DenseMLP(nn.Module):
    config: TextConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype, param_dtype=self.dtype, name=name)
        inter = self.config.intermediate_size
        h = jax.nn.silu(dense(inter, "gate_proj")(x)) * dense(inter, "up_proj")(x)
        return dense(self.config.hidden_size, "down_proj")(h)
