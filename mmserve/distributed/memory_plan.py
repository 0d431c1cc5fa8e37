"""How many parameters a model has and how many bytes each device of a mesh holds, from shapes only.

Nothing is allocated and no device is needed: the parameter tree comes from ``jax.eval_shape`` and
the shard shapes from the same rules as a real load, over an ``AbstractMesh``. So a v5e-16 or an
8xH100 plan is computed on a laptop, and it is exact for the parameters (up to allocator padding);
activations and compiled-program scratch come on top.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from models.qwen3_vl_moe.config import ModelConfig
from models.qwen3_vl_moe.kv_cache import KVCache
from models.qwen3_vl_moe.model import abstract_params
from mmserve.distributed.layout import MeshLayout
from mmserve.distributed.mesh import MeshShape


@dataclasses.dataclass(frozen=True)
class Part:
    """One group of arrays: its element count, bytes in all, and bytes on the fullest device."""

    name: str
    elements: int
    total_bytes: int
    device_bytes: int


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    mesh: MeshShape
    dtype: str
    parts: tuple[Part, ...]  # vision, text, then the KV cache when kv_tokens > 0
    kv_tokens: int

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)

    @property
    def param_count(self) -> int:
        return self.part("vision").elements + self.part("text").elements

    @property
    def device_bytes(self) -> int:
        return sum(p.device_bytes for p in self.parts)


def plan_memory(config: ModelConfig, mesh: MeshShape, dtype="bfloat16", kv_tokens: int = 0, page_size: int = 16):
    dtype = jnp.dtype(dtype)
    layout = MeshLayout(mesh.abstract())
    params = _abstract_params(config, dtype)
    shardings = layout.params(config, params)
    text_keys = [k for k in params if k != "visual"]
    parts = [
        _part("vision", params["visual"], shardings["visual"]),
        _part("text", {k: params[k] for k in text_keys}, {k: shardings[k] for k in text_keys}),
    ]
    if kv_tokens:
        pages = -(-kv_tokens // page_size)
        cache = jax.eval_shape(lambda: KVCache.create(config.text, pages, page_size, dtype))
        parts.append(_part("kv_cache", cache, layout.kv_cache(cache)))
    return MemoryPlan(mesh, dtype.name, tuple(parts), kv_tokens)


@functools.lru_cache(maxsize=4)
def _abstract_params(config: ModelConfig, dtype):
    """Tracing the real model's init takes seconds; plans of one model on several meshes share it."""
    return abstract_params(config, dtype)


def _part(name: str, arrays, shardings) -> Part:
    leaves, shards = jax.tree.leaves(arrays), jax.tree.leaves(shardings)
    return Part(
        name=name,
        elements=sum(math.prod(a.shape) for a in leaves),
        total_bytes=sum(math.prod(a.shape) * a.dtype.itemsize for a in leaves),
        device_bytes=sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in zip(leaves, shards)),
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def format_plan(plan: MemoryPlan, device_gib: float | None = None) -> str:
    rows = [("", "parameters", "bytes, all", "bytes per device")]
    params = [p for p in plan.parts if p.name != "kv_cache"]
    for p, label in zip(params, ("vision tower", "language model")):
        rows.append((label, f"{p.elements / 1e6:,.1f}M", _gib(p.total_bytes), _gib(p.device_bytes)))
    rows.append((
        "parameters, total", f"{plan.param_count / 1e9:,.3f}B",
        _gib(sum(p.total_bytes for p in params)), _gib(sum(p.device_bytes for p in params)),
    ))
    if plan.kv_tokens:
        kv = plan.part("kv_cache")
        rows.append((f"KV cache, {plan.kv_tokens:,} tokens", "", _gib(kv.total_bytes), _gib(kv.device_bytes)))
    rows.append(("per device, all of the above", "", "", _gib(plan.device_bytes)))
    if device_gib:
        rows.append((f"left of {device_gib:g} GiB per device", "", "", _gib(int(device_gib * 2**30) - plan.device_bytes)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"mesh {plan.mesh} ({plan.mesh.num_devices} devices), {plan.dtype}"]
    for row in rows:
        lines.append("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]))
    return "\n".join(lines)
