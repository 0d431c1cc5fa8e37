"""Attention over the paged KV cache, side by side with this machine's memory rate, in one run.

Decode (one query per row) is a read of the rows' KV pages: its figure of merit is the KV bytes it
reads per second, shown next to a plain device copy of the same number of bytes (``copy GB/s``:
read + write, so a read-only pass may go faster). Prefill chunks are shown as GFLOP/s of the
score and value matmuls. Shapes: the layer of Qwen3-VL-30B-A3B (32 query heads, 4 KV heads,
head_dim 128) and of bench_offline's config (8 heads, 2 KV heads, head_dim 32).

    python scripts/bench_attention.py --rows 1 8 32 --context 256 2048
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from models.qwen3_vl_moe.paged_attention import attend

SHAPES = {"30b": (32, 4, 128), "bench": (8, 2, 32)}  # query heads, KV heads, head_dim
PAGE = 16


def fastest(fn, *args, repeat: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["30b", "bench"])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--context", type=int, nargs="+", default=[256, 2048])
    p.add_argument("--prefill-tokens", type=int, default=128, help="query tokens per row of the prefill case")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}")
    for name in args.shapes:
        heads, kv_heads, dim = SHAPES[name]
        print(f"\n{name}: {heads} heads, {kv_heads} KV heads, head_dim {dim}, page {PAGE}")
        print(f"{'rows':>5} {'context':>8} {'decode ms':>10} {'KV GB/s':>8} {'copy GB/s':>10} "
              f"{'prefill ms':>11} {'GFLOP/s':>8}")
        for rows in args.rows:
            for context in args.context:
                pages = context // PAGE
                cache_pages = rows * pages + 1
                k = jnp.asarray(rng.standard_normal((cache_pages, PAGE, kv_heads, dim), np.float32))
                v = jnp.asarray(rng.standard_normal((cache_pages, PAGE, kv_heads, dim), np.float32))
                tables = jnp.asarray(rng.permutation(np.arange(1, cache_pages))[: rows * pages].reshape(rows, pages),
                                     jnp.int32)
                run = jax.jit(attend, static_argnums=5)
                q1 = jnp.asarray(rng.standard_normal((rows, 1, heads, dim), np.float32))
                decode_s = fastest(run, q1, k, v, tables, jnp.full((rows, 1), context - 1, jnp.int32), dim**-0.5,
                                   repeat=args.repeat)
                kv_bytes = 2 * rows * context * kv_heads * dim * 4
                blob = jnp.asarray(rng.standard_normal(kv_bytes // 4, np.float32))
                copy_s = fastest(jax.jit(lambda x: x + 0), blob, repeat=args.repeat)
                t = args.prefill_tokens
                qt = jnp.asarray(rng.standard_normal((rows, t, heads, dim), np.float32))
                query_pos = jnp.broadcast_to(jnp.arange(context - t, context, dtype=jnp.int32), (rows, t))
                prefill_s = fastest(run, qt, k, v, tables, query_pos, dim**-0.5, repeat=args.repeat)
                flops = 2 * 2 * rows * heads * t * context * dim
                print(f"{rows:>5} {context:>8} {decode_s * 1e3:>10.3f} {kv_bytes / decode_s / 1e9:>8.1f} "
                      f"{2 * kv_bytes / copy_s / 1e9:>10.1f} {prefill_s * 1e3:>11.2f} {flops / prefill_s / 1e9:>8.1f}")


if __name__ == "__main__":
    main()
