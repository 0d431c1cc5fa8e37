"""Logical axis names of every parameter and of the KV cache.

The model names what each array dimension *means* ("heads", "experts", "vocab", ...); which mesh
axis, if any, carries that meaning is decided elsewhere by one rules table (``mmserve.distributed``),
so the same model runs unsharded on one CPU and tensor/expert parallel on a pod.

Two choices are made here because they follow from the model's own layout:

- the vision attention is replicated: its fused ``qkv`` columns are (q | k | v) blocks, so a
  column split would cut across the three; its MLP and the mergers split their hidden columns;
- a flattened ``heads * head_dim`` dimension may only be split at head boundaries, which
  :func:`granules` states (a shard must hold whole heads; the 4 KV heads of the real config are
  therefore replicated on an 8-way model axis, and so are its query heads, which split only in the
  groups that share a KV head).
"""

from __future__ import annotations

import jax

from models.qwen3_vl_moe.config import ModelConfig

Axes = tuple[str | None, ...]

KV_CACHE_AXES: Axes = ("layers", "pages", None, "kv_heads", None)
"""[layers, pages, page_size, kv_heads, head_dim]: see :class:`KVCache`."""
KV_ROW_AXES: Axes = (None, "layers", "kv_heads", None)
"""[tokens, layers, kv_heads, head_dim]: one sequence's KV as token rows, split like the cache."""

_BY_MODULE_AND_NAME: dict[tuple[str, str], Axes] = {
    ("embed_tokens", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("q_proj", "kernel"): ("embed", "heads"),
    ("q_proj", "bias"): ("heads",),
    ("k_proj", "kernel"): ("embed", "kv_heads"),
    ("k_proj", "bias"): ("kv_heads",),
    ("v_proj", "kernel"): ("embed", "kv_heads"),
    ("v_proj", "bias"): ("kv_heads",),
    ("o_proj", "kernel"): ("heads", "embed"),
    ("o_proj", "bias"): ("embed",),
    ("mlp", "gate"): ("embed", None),
    ("mlp", "gate_up_proj"): ("experts", "embed", "expert_mlp"),
    ("mlp", "down_proj"): ("experts", "expert_mlp", "embed"),
    ("gate_proj", "kernel"): ("embed", "mlp"),
    ("up_proj", "kernel"): ("embed", "mlp"),
    ("down_proj", "kernel"): ("mlp", "embed"),
    ("linear_fc1", "kernel"): (None, "vision_mlp"),
    ("linear_fc1", "bias"): ("vision_mlp",),
    ("linear_fc2", "kernel"): ("vision_mlp", None),
    ("qkv", "kernel"): (None, None),
    ("proj", "kernel"): (None, None),
    ("patch_embed", "kernel"): (None, None),
    ("visual", "pos_embed"): (None, None),
}
"""Every parameter of two or more dims is listed, so that a new one cannot be replicated unseen;
one-dim parameters not listed (norm weights, output biases) are replicated."""


def granules(config: ModelConfig) -> dict[str, int]:
    """Logical axis -> size of its indivisible unit: a shard of the axis holds whole units.

    The query heads split in whole groups (the query heads that share one KV head), so they split
    exactly when the KV heads do. Split alone, beside a replicated KV cache, they made XLA split
    the cache by head inside every step and all-gather the whole of it (every layer and page) back
    to the replicated layout the step returns: two such gathers a step, and ~60% of the cache in
    scratch per device (``test_sharded_model.py``)."""
    text = config.text
    group = text.num_attention_heads // text.num_key_value_heads
    return {"heads": text.head_dim * group, "kv_heads": text.head_dim}


def param_axes(params) -> dict:
    """The parameter tree (real or abstract) with each leaf replaced by its logical axes."""
    return jax.tree_util.tree_map_with_path(_leaf_axes, params)


def _leaf_axes(path, leaf) -> Axes:
    names = [key.key for key in path]
    module, name = (names[-2] if len(names) > 1 else ""), names[-1]
    axes = _BY_MODULE_AND_NAME.get((module, name))
    if axes is None:
        if leaf.ndim != 1:
            raise KeyError(f"no logical axes for parameter {'/'.join(names)}")
        axes = (None,)
    if len(axes) != leaf.ndim:
        raise ValueError(f"parameter {'/'.join(names)} has {leaf.ndim} dims, logical axes {axes}")
    return axes
