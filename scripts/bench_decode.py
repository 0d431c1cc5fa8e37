"""Decode's achieved memory bandwidth, next to this machine's streaming rate under XLA, in one run.

A decode step at a small batch is bound by the bytes it reads, not by its FLOPs: every weight it
uses (attention projections, norms, the router, the experts its rows chose, the lm_head), each
row's embedding and the KV of its context's pages (not the page table's padding, which points at
one scratch page, read again from cache). This script times the engine's decode
program (``ModelRunner.run_decode``, the program the engine runs, on fresh random tokens each call
so that the routing, and so the experts read, changes from step to step) at each batch size and
divides those bytes by the time: the step's achieved bandwidth. The reference is the same XLA
streaming weights through a chain of matrix-vector products, the most bytes per second a
memory-bound program gets on this device (HBM on an accelerator, DRAM and caches on a CPU).
``% of stream`` is how close decode runs to that floor.

Experts read per layer: exactly top-k at batch 1; at larger batches the expected number of
distinct experts under uniform routing, E * (1 - (1 - k/E)^B) (random weights route nearly
uniformly; a trained model's routing is more skewed, so fewer experts and fewer bytes).

    python scripts/bench_decode.py --shape 30b --batch-sizes 1 8 32
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench_matmul import seconds as fastest
from bench_offline import TEXT_SHAPES, write_checkpoint
from mmserve.engine.config import EngineConfig
from mmserve.engine.runner import ModelRunner
from models.qwen3_vl_moe import load_model

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def stream_rate(dtype, repeat: int, total_bytes: int = 512 * 2**20, side: int = 4096) -> float:
    """Bytes per second XLA reads weights at in a chain of [1, side] x [side, side] products over
    ``total_bytes`` of distinct matrices (more than a CPU's caches hold between calls)."""
    count = max(1, total_bytes // (side * side * jnp.dtype(dtype).itemsize))
    key = jax.random.PRNGKey(0)
    weights = [jax.random.normal(jax.random.fold_in(key, i), (side, side), dtype) * 0.01 for i in range(count)]
    x = jnp.ones((1, side), dtype)

    @jax.jit
    def chain(x, weights):
        for w in weights:
            x = jnp.tanh(x @ w)
        return x

    seconds = fastest(lambda: chain(x, weights).block_until_ready(), repeat)
    return sum(w.nbytes for w in weights) / seconds


def step_bytes(params, text, rows: int, pages: int, page_size: int, itemsize: int) -> dict[str, float]:
    """Bytes one decode step of ``rows`` rows reads, by kind."""
    expert = other = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params["language_model"])[0] + \
            jax.tree_util.tree_flatten_with_path(params["lm_head"])[0]:
        name = jax.tree_util.keystr(path)
        if "embed_tokens" in name:
            continue
        if any(w in name for w in EXPERT_WEIGHTS) and leaf.ndim == 3:
            expert += leaf.nbytes
        else:
            other += leaf.nbytes
    e, k = text.num_experts, text.num_experts_per_tok
    chosen = k if rows == 1 else e * (1 - (1 - k / e) ** rows)
    kv = rows * pages * page_size * text.num_hidden_layers * 2 * text.num_key_value_heads * text.head_dim * itemsize
    return {"weights": other, "experts": expert * chosen / e, "kv": kv, "embeddings": rows * text.hidden_size * itemsize,
            "experts_chosen": chosen}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="a Hugging Face checkpoint dir (default: a generated one)")
    p.add_argument("--shape", choices=sorted(TEXT_SHAPES), default="30b", help="the generated checkpoint's shape")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 8, 32])
    p.add_argument("--context", type=int, default=256, help="tokens each row has computed before the step")
    p.add_argument("--moe-dispatch", default="auto")
    p.add_argument("--repeat", type=int, default=30)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or write_checkpoint(Path(tmp) / "ckpt", args.shape)
        model = load_model(checkpoint, dtype=args.dtype, moe_dispatch=args.moe_dispatch)
    text = model.config.text
    page_size = 16
    pages_per_row = -(-(args.context + 1) // page_size)
    config = EngineConfig(page_size=page_size, max_num_seqs=max(args.batch_sizes),
                          max_model_len=max(2048, args.context + 1),
                          num_pages=max(args.batch_sizes) * pages_per_row + 1, precompile=False)
    runner = ModelRunner(model, config)
    itemsize = jnp.dtype(model.dtype).itemsize
    stream = stream_rate(model.dtype, args.repeat)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
          f"{args.checkpoint or args.shape}, {args.dtype}, MoE dispatch {model.moe_dispatch}, context {args.context}")
    print(f"streaming weights through matrix-vector products: {stream / 1e9:.1f} GB/s")
    print(f"{'batch':>5} {'step ms':>8} {'experts/layer':>13} {'MB read':>8} {'GB/s':>7} {'% of stream':>11} "
          f"{'floor ms':>8}")
    rng = np.random.default_rng(0)
    for batch in args.batch_sizes:
        rows = runner.grid.decode_rows(batch)
        width = runner.grid.page_width(args.context + 1)
        tables = np.zeros((rows, width), np.int32)
        for i in range(batch):
            tables[i, :pages_per_row] = 1 + i * pages_per_row + np.arange(pages_per_row)
        positions = np.full((rows, 3), args.context, np.int32)
        context = np.where(np.arange(rows) < batch, args.context, -1).astype(np.int32)

        def step():
            tokens = rng.integers(0, text.vocab_size, rows).astype(np.int32)
            runner.run_decode(tokens, positions, tables, context)
            jax.block_until_ready(runner.cache)

        seconds = fastest(step, args.repeat)
        read = step_bytes(model.params, text, batch, pages_per_row, page_size, itemsize)
        total = sum(v for name, v in read.items() if name != "experts_chosen")
        print(f"{batch:>5} {seconds * 1e3:>8.2f} {read['experts_chosen']:>13.1f} {total / 1e6:>8.1f} "
              f"{total / seconds / 1e9:>7.1f} {100 * total / seconds / stream:>10.0f}% {total / stream * 1e3:>8.2f}")


if __name__ == "__main__":
    main()
