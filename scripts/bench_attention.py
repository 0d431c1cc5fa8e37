"""Attention over the paged KV cache, side by side with this machine's memory rate, in one run.

Decode (one query per row) is a read of the rows' KV pages: its figure of merit is the KV bytes it
reads per second, shown next to a plain device copy of the same number of bytes (``copy GB/s``:
read + write, so a read-only pass may go faster). Prefill chunks are shown as GFLOP/s of the
score and value matmuls. Shapes: the layer of Qwen3-VL-30B-A3B (32 query heads, 4 KV heads,
head_dim 128), of bench_offline's config (8 heads, 2 KV heads, head_dim 32) and of the built-in
``tiny`` model (4 heads, 2 KV heads, head_dim 16). ``--reach`` puts the prefill chunk's last query
at that share of the context: the engine runs a chunk in a page table of its bucket's width, which a
later turn's chunk (a short continuation of a long context) or a short prompt only partly uses.

Implementations (``--impl``): ``blocked`` is ``paged_attention.attend`` (blocks of pages, online
softmax), ``dense`` is ``attend_dense`` (every page gathered, one softmax), ``blocked:N`` the
blocked one with N keys a block. With two or more, each is timed in turn in the same rounds
(so a busy machine slows all alike) and ``speedup`` is the first one's time over each other's.

    python scripts/bench_attention.py --rows 1 8 32 --context 256 2048
    python scripts/bench_attention.py --shapes tiny --rows 1 --context 1024 --prefill-tokens 64 \
        --reach 0.0625 0.55 1 --impl blocked:2048 blocked
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from models.qwen3_vl_moe.paged_attention import attend, attend_dense

SHAPES = {"30b": (32, 4, 128), "bench": (8, 2, 32), "tiny": (4, 2, 16)}  # query heads, KV heads, head_dim
PAGE = 16


def implementation(name: str):
    if name == "dense":
        return attend_dense
    if name == "blocked":
        return attend
    if name.startswith("blocked:"):
        return functools.partial(attend, block_tokens=int(name.split(":")[1]))
    raise ValueError(f"unknown implementation {name}")


def fastest(fns, *args, repeat: int) -> list[float]:
    """Best wall time of each fn over ``repeat`` rounds, each round running every fn once in turn."""
    for fn in fns:
        jax.block_until_ready(fn(*args))
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["30b", "bench"])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--context", type=int, nargs="+", default=[256, 2048])
    p.add_argument("--prefill-tokens", type=int, default=128, help="query tokens per row of the prefill case")
    p.add_argument("--reach", type=float, nargs="+", default=[1.0],
                   help="where the prefill chunk's last query lies, as a share of the context (one row per value)")
    p.add_argument("--impl", nargs="+", default=["dense", "blocked"],
                   help="dense | blocked | blocked:KEYS_PER_BLOCK; the first is the base of the speedups")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    runs = [jax.jit(implementation(name), static_argnums=5) for name in args.impl]
    print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}")
    for name in args.shapes:
        heads, kv_heads, dim = SHAPES[name]
        print(f"\n{name}: {heads} heads, {kv_heads} KV heads, head_dim {dim}, page {PAGE}, "
              f"prefill {args.prefill_tokens} tokens a row")
        print(f"{'impl':>12} {'rows':>5} {'context':>8} {'decode ms':>10} {'KV GB/s':>8} {'copy GB/s':>10} "
              f"{'reach':>6} {'prefill ms':>11} {'GFLOP/s':>8} {'speedup dec':>12} {'speedup pre':>12}")
        for rows in args.rows:
            for context in args.context:
                pages = context // PAGE
                cache_pages = rows * pages + 1
                k = jnp.asarray(rng.standard_normal((cache_pages, PAGE, kv_heads, dim), np.float32))
                v = jnp.asarray(rng.standard_normal((cache_pages, PAGE, kv_heads, dim), np.float32))
                tables = jnp.asarray(rng.permutation(np.arange(1, cache_pages))[: rows * pages].reshape(rows, pages),
                                     jnp.int32)
                q1 = jnp.asarray(rng.standard_normal((rows, 1, heads, dim), np.float32))
                decode_args = (q1, k, v, tables, jnp.full((rows, 1), context - 1, jnp.int32), dim**-0.5)
                decode_s = fastest(runs, *decode_args, repeat=args.repeat)
                kv_bytes = 2 * rows * context * kv_heads * dim * 4
                blob = jnp.asarray(rng.standard_normal(kv_bytes // 4, np.float32))
                copy_s = fastest([jax.jit(lambda x: x + 0)], blob, repeat=args.repeat)[0]
                t = args.prefill_tokens
                qt = jnp.asarray(rng.standard_normal((rows, t, heads, dim), np.float32))
                for reach in args.reach:
                    end = max(t, round(context * reach))  # one past the chunk's last query
                    query_pos = jnp.broadcast_to(jnp.arange(end - t, end, dtype=jnp.int32), (rows, t))
                    prefill_args = (qt, k, v, tables, query_pos, dim**-0.5)
                    outs = [np.asarray(run(*prefill_args)) for run in runs]
                    for impl, out in zip(args.impl[1:], outs[1:]):
                        err = float(np.max(np.abs(out - outs[0])))
                        assert err < 1e-4, f"{impl} differs from {args.impl[0]} by {err:.2e}"
                    prefill_s = fastest(runs, *prefill_args, repeat=max(1, args.repeat // 2))
                    flops = 2 * 2 * rows * heads * t * end * dim  # the keys up to the chunk's end
                    for impl, d_s, p_s in zip(args.impl, decode_s, prefill_s):
                        print(f"{impl:>12} {rows:>5} {context:>8} {d_s * 1e3:>10.3f} {kv_bytes / d_s / 1e9:>8.1f} "
                              f"{2 * kv_bytes / copy_s / 1e9:>10.1f} {reach:>6.3g} {p_s * 1e3:>11.2f} "
                              f"{flops / p_s / 1e9:>8.1f} {decode_s[0] / d_s:>11.2f}x {prefill_s[0] / p_s:>11.2f}x",
                              flush=True)

if __name__ == "__main__":
    main()
