"""This machine's matmul rate under XLA (a jitted ``jnp.dot``) next to torch's (``torch.mm``), fp32.

The engine's speed against transformers follows the ratio of these two on a CPU: where torch's
BLAS uses instructions XLA:CPU's does not (AMX, AVX-512 on recent Xeons), every engine ratio in
``bench_offline.py`` drops with it. The smallest shape is dominated by the cost of one call.

    python scripts/bench_matmul.py
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
    import torch
except ImportError:  # the test extra's CPU wheel (pyproject.toml pins it)
    raise SystemExit('bench_matmul.py times torch\'s matmuls beside XLA\'s: pip install -e ".[test]"') from None

SHAPES = [(32, 256, 256), (512, 256, 256), (512, 512, 1536), (2048, 1024, 1024)]


def seconds(run, repeat: int) -> float:
    """The fastest of ``repeat`` calls (the machine is shared; noise only slows a call down)."""
    run()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=30)
    args = p.parse_args()
    dot = jax.jit(jnp.dot)
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"{'m x k x n':>18} {'jax GFLOP/s':>12} {'torch GFLOP/s':>14} {'jax/torch':>10}")
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        a, b = rng.random((m, k), np.float32), rng.random((k, n), np.float32)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        flops = 2 * m * k * n
        jax_rate = flops / seconds(lambda: dot(ja, jb).block_until_ready(), args.repeat) / 1e9
        torch_rate = flops / seconds(lambda: torch.mm(ta, tb), args.repeat) / 1e9
        print(f"{f'{m} x {k} x {n}':>18} {jax_rate:>12.1f} {torch_rate:>14.1f} {jax_rate / torch_rate:>10.2f}")


if __name__ == "__main__":
    main()
