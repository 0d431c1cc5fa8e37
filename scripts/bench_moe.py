"""The MoE block's dispatch strategies side by side, in one run, against this machine's matmul rate.

For each shape (``bench``: bench_offline's config; ``30b``: Qwen3-VL-30B-A3B's proportions at
hidden 512: 128 experts, top-8, moe_intermediate 3/8 of hidden) and each token count it times
every strategy of :mod:`models.qwen3_vl_moe.moe_dispatch` on the whole block (router included)
and reports GFLOP/s on the *routed* work (tokens x top-k through one expert's two matmuls). The
reference is the same routed FLOPs as plain jitted matmuls, [T*k, H] @ [H, 2I] then [T*k, I] @
[I, H]: what the routed work would cost if it were one dense matmul. ``% of dense`` is the ratio.

Times are the fastest of --repeat runs (a shared machine slows runs down, never speeds one up).

    python scripts/bench_moe.py --tokens 1 32 512 1024
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from models.qwen3_vl_moe.config import TextConfig
from models.qwen3_vl_moe.moe import SparseMoeBlock
from models.qwen3_vl_moe.moe_dispatch import STRATEGIES

SHAPES = {
    "bench": TextConfig(hidden_size=256, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128),
    "30b": TextConfig(hidden_size=512, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=192),
}


def fastest(fn, *args, repeat: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def routed_flops(c: TextConfig, tokens: int) -> float:
    h, i = c.hidden_size, c.moe_intermediate_size
    return tokens * c.num_experts_per_tok * (2 * h * 2 * i + 2 * i * h)


def dense_reference(c: TextConfig, tokens: int, rng, repeat: int) -> float:
    """Seconds for the routed FLOPs as two plain matmuls (one expert's weights, T*k rows)."""
    rows = tokens * c.num_experts_per_tok
    x = jnp.asarray(rng.standard_normal((rows, c.hidden_size), np.float32))
    gate_up = jnp.asarray(rng.standard_normal((c.hidden_size, 2 * c.moe_intermediate_size), np.float32))
    down = jnp.asarray(rng.standard_normal((c.moe_intermediate_size, c.hidden_size), np.float32))

    @jax.jit
    def mlp(x, gate_up, down):
        h = x @ gate_up
        return (jax.nn.silu(h[:, : c.moe_intermediate_size]) * h[:, c.moe_intermediate_size:]) @ down

    return fastest(mlp, x, gate_up, down, repeat=repeat)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["bench", "30b"])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 512, 1024])
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--skip-slow", type=float, default=2.0,
                   help="skip a strategy at larger token counts once one call took longer than this (seconds)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}; GFLOP/s on routed work (% of dense)")
    for name in args.shapes:
        c = SHAPES[name]
        params = jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float32),
            {"gate": rng.standard_normal((c.hidden_size, c.num_experts), np.float32) * 0.02,
             "gate_up_proj": rng.standard_normal((c.num_experts, c.hidden_size, 2 * c.moe_intermediate_size),
                                                 np.float32) * 0.02,
             "down_proj": rng.standard_normal((c.num_experts, c.moe_intermediate_size, c.hidden_size),
                                              np.float32) * 0.02})
        print(f"\n{name}: hidden {c.hidden_size}, {c.num_experts} experts, top-{c.num_experts_per_tok}, "
              f"moe_intermediate {c.moe_intermediate_size}")
        print(f"{'tokens':>7} {'dense matmul':>13} " + " ".join(f"{s:>22}" for s in args.strategies))
        too_slow: set[str] = set()
        for tokens in args.tokens:
            flops = routed_flops(c, tokens)
            reference = flops / dense_reference(c, tokens, rng, args.repeat) / 1e9
            x = jnp.asarray(rng.standard_normal((tokens, c.hidden_size), np.float32))
            cells = []
            for strategy in args.strategies:
                if strategy in too_slow:
                    cells.append(f"{'(skipped)':>22}")
                    continue
                block = SparseMoeBlock(c, jnp.float32, strategy)
                run = jax.jit(lambda p, x, block=block: block.apply({"params": p}, x))
                seconds = fastest(run, params, x, repeat=args.repeat)
                if seconds > args.skip_slow:
                    too_slow.add(strategy)
                rate = flops / seconds / 1e9
                cells.append(f"{rate:>8.1f} ({100 * rate / reference:>3.0f}%) {seconds * 1e3:>7.2f}ms")
            print(f"{tokens:>7} {reference:>13.1f} " + " ".join(cells))


if __name__ == "__main__":
    main()
