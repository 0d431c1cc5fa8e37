"""Where the model's arrays live on a mesh: NamedShardings for params, KV cache and activations.

``MeshLayout`` joins the model's logical axes (:mod:`models.qwen3_vl_moe.partitioning`) with the
rules table; it works the same over a real ``Mesh`` and over an ``AbstractMesh`` (no devices),
which is how a memory plan for a pod is computed on a laptop.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from models.qwen3_vl_moe import partitioning
from models.qwen3_vl_moe.config import ModelConfig
from models.qwen3_vl_moe.kv_cache import KVCache
from mmserve.distributed.rules import LOGICAL_AXIS_RULES, partition_spec


@dataclasses.dataclass(frozen=True)
class MeshLayout:
    mesh: Mesh | AbstractMesh
    rules: dict[str, str | None] = dataclasses.field(default_factory=lambda: dict(LOGICAL_AXIS_RULES))

    def sharding(self, logical_axes, shape, granules=None) -> NamedSharding:
        spec = partition_spec(logical_axes, shape, self.mesh.shape, granules, self.rules)
        return NamedSharding(self.mesh, spec)

    def params(self, config: ModelConfig, params):
        """The parameter tree (real or abstract) -> a matching tree of NamedShardings.

        Its signature is the ``shardings`` argument of ``load_model``.
        """
        granules = partitioning.granules(config)
        return jax.tree.map(
            lambda leaf, axes: self.sharding(axes, leaf.shape, granules),
            params,
            partitioning.param_axes(params),
        )

    def idle_axes(self, shardings) -> list[str]:
        """The mesh axes of more than one device that split none of ``shardings`` (a tree of
        NamedShardings, :meth:`params`'): along them every device holds the same whole copy of the
        model, which is legal (a batch axis, say) but is seldom what a ``--mesh`` meant (an
        ``expert`` axis that divides no expert count, a ``model`` axis no head count)."""
        used = {axis for sharding in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
                for entry in sharding.spec for axis in ((entry,) if isinstance(entry, str) else entry or ())}
        return [axis for axis, size in self.mesh.shape.items() if size > 1 and axis not in used]

    def kv_cache(self, cache: KVCache) -> KVCache:
        """A KVCache (real or abstract) -> a KVCache of NamedShardings."""
        return jax.tree.map(lambda a: self.sharding(partitioning.KV_CACHE_AXES, a.shape), cache)

    def create_kv_cache(self, config: ModelConfig, num_pages: int, page_size: int, dtype=jnp.float32) -> KVCache:
        """A zeroed cache allocated shard by shard, never whole on one device."""
        create = functools.partial(KVCache.create, config.text, num_pages, page_size, dtype)
        shardings = self.kv_cache(jax.eval_shape(create))
        return jax.jit(create, out_shardings=shardings)()

    def kv_rows(self, shape) -> NamedSharding:
        """Where arriving KV rows land: their heads on the devices that hold those heads' pages."""
        return self.sharding(partitioning.KV_ROW_AXES, shape)

    def activation(self, logical_axes, shape) -> NamedSharding:
        """Sharding of an input or output, e.g. ``("batch", None)`` for token ids [B, T]."""
        return self.sharding(logical_axes, shape)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def replicate(self, tree):
        """The arrays copied whole onto every device of the mesh: a collective when the mesh spans
        processes (every process must run it), after which each can read its local copy."""
        return _replicator(self.replicated())(tree)


@functools.lru_cache
def _replicator(sharding: NamedSharding):
    """One jitted identity per target sharding, so it compiles once per shape, not per call."""
    return jax.jit(lambda tree: tree, out_shardings=sharding)


def local_copy(x: jax.Array) -> jax.Array:
    """This process's copy of a replicated array (the array itself when it is all local)."""
    return x if x.is_fully_addressable else x.addressable_data(0)
