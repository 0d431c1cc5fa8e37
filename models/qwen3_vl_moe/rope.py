"""Rotary position embeddings: interleaved MRoPE for the language model.

Each of the head_dim/2 frequencies is driven by one of the three position axes (temporal, height,
width). Qwen3-VL interleaves them: frequency j follows H when j % 3 == 1 (within the first
3*section[1]), W when j % 3 == 2 (within the first 3*section[2]), T otherwise.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from models.qwen3_vl_moe.config import TextConfig


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def mrope_axis_of_frequency(config: TextConfig) -> np.ndarray:
    """For each frequency j < head_dim/2, the position axis (0=T, 1=H, 2=W) that drives it."""
    j = np.arange(config.head_dim // 2)
    axis = np.zeros_like(j)
    sec = config.mrope_section
    axis[(j % 3 == 1) & (j < 3 * sec[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * sec[2])] = 2
    return axis


def mrope_cos_sin(positions, config: TextConfig):
    """positions [..., 3, S] int -> (cos, sin) [..., S, head_dim] in float32."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float32) / config.head_dim))
    axis = mrope_axis_of_frequency(config)
    pos = positions.astype(jnp.float32)  # [..., 3, S]
    chosen = jnp.take(pos, jnp.asarray(axis), axis=-2)  # [..., half, S]
    angles = jnp.swapaxes(chosen, -1, -2) * jnp.asarray(inv_freq[:half], dtype=jnp.float32)
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [..., S, heads, head_dim] rotated by cos/sin [..., S, head_dim]."""
    cos, sin = cos[..., None, :], sin[..., None, :]
    out = x.astype(jnp.float32) * cos + rotate_half(x.astype(jnp.float32)) * sin
    return out.astype(x.dtype)
