"""The one table that maps the model's logical axis names to mesh axes.

A dimension is split over its mesh axis only when the split is even and keeps its units whole
(``granules``: a shard of ``heads`` holds whole heads); otherwise it is replicated. That rule is
what replicates the 4 KV heads of Qwen3-VL-30B-A3B on an 8-way ``model`` axis, and what lets a
batch of one run on a mesh with ``data=2``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jax.sharding import PartitionSpec

LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "batch": "data",
    "vocab": "model",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "expert_mlp": "model",
    "vision_mlp": "model",
    "experts": "expert",
    # Replicated on purpose: the residual stream is needed whole by every norm, and KV pages are
    # indexed by global page tables (a data-parallel replica reads its own rows of a shared cache).
    "embed": None,
    "pages": None,
    "layers": None,
}


def partition_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    axis_sizes: Mapping[str, int],
    granules: Mapping[str, int] | None = None,
    rules: Mapping[str, str | None] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """Logical axes of an array of ``shape`` -> its PartitionSpec on a mesh of ``axis_sizes``."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    granules = granules or {}
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in the rules table")
        mesh_axis = None if name is None else rules[name]
        ways = axis_sizes.get(mesh_axis, 1) if mesh_axis else 1
        if ways == 1 or mesh_axis in used or size % (ways * granules.get(name, 1)):
            spec.append(None)
        else:
            spec.append(mesh_axis)
            used.add(mesh_axis)
    return PartitionSpec(*spec)
