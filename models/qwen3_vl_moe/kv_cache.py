"""The paged KV cache the language model reads and writes.

Keys and values of all layers live in two arrays of pages, [layers, pages, page_size, kv_heads,
head_dim]. A sequence owns a list of pages (its page table); token ``i`` of the sequence lives in
page ``table[i // page_size]``, slot ``i % page_size``. Pages of one sequence need not be
contiguous. The cache is a pytree, so the programs that update it can donate it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from models.qwen3_vl_moe.config import TextConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [layers, pages, page_size, kv_heads, head_dim]
    v: jax.Array

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @classmethod
    def create(cls, config: TextConfig, num_pages: int, page_size: int, dtype=jnp.float32) -> KVCache:
        shape = (config.num_hidden_layers, num_pages, page_size, config.num_key_value_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @staticmethod
    def bytes_per_page(config: TextConfig, page_size: int, dtype=jnp.float32) -> int:
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
        return per_token * page_size * jnp.dtype(dtype).itemsize
