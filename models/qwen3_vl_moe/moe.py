"""The sparse MoE block (softmax router, renormalised top-k, SiLU experts) and the dense MLP.

Experts are stored in the published checkpoint layout: ``gate_up_proj`` [E, H, 2I] applied as
``x @ W[e]`` and ``down_proj`` [E, I, H]. How tokens reach their experts is the block's
``dispatch`` strategy (:mod:`models.qwen3_vl_moe.moe_dispatch`); every strategy computes the same
function, so the choice is a matter of speed on the backend at hand.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.qwen3_vl_moe import moe_dispatch
from models.qwen3_vl_moe.config import TextConfig


class SparseMoeBlock(nn.Module):
    config: TextConfig
    dtype: jnp.dtype
    dispatch: str = "ragged_dot"

    @nn.compact
    def __call__(self, x, valid=None):
        """x [..., H]; valid (x's leading shape, bool): False marks padding tokens, which reach no
        expert (their output is zero), so a padded batch does no routed work for its padding."""
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
        if valid is not None:
            valid = valid.reshape(-1, 1)
            top_e, top_w = jnp.where(valid, top_e, e), jnp.where(valid, top_w, 0)

        return moe_dispatch.dispatch(self.dispatch, x, top_e, top_w, gate_up, down).reshape(shape)


class DenseMLP(nn.Module):
    config: TextConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype, param_dtype=self.dtype, name=name)
        inter = self.config.intermediate_size
        h = jax.nn.silu(dense(inter, "gate_proj")(x)) * dense(inter, "up_proj")(x)
        return dense(self.config.hidden_size, "down_proj")(h)
