"""The sampler's time per call, with and without logprobs, at a real vocabulary's size.

The sampler computes the raw logprobs (a log_softmax and a top-k over the vocabulary) only when a
row of the batch asks for them. This times both kinds of batch side by side in one run, greedy and
seeded random rows, on random logits:

    python scripts/bench_sampler.py --batch-sizes 1 32 --vocab 151936 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from mmserve.sampler import init_penalty_state, pack_sampling_batch, sample
from mmserve.sampling_params import SamplingParams


def time_calls(batch_size: int, vocab: int, temperature: float, reps: int) -> dict[str, float]:
    """Median ms per call of each kind of batch, calls of the two kinds alternating."""
    logits = jax.random.normal(jax.random.PRNGKey(0), (batch_size, vocab))
    slots = list(range(batch_size))
    batches = {kind: pack_sampling_batch([SamplingParams(temperature=temperature, seed=row, logprobs=logprobs)
                                          for row in slots], [0] * batch_size, slots, batch_size)
               for kind, logprobs in (("no logprobs", None), ("logprobs=5", 5))}
    penalties, key = init_penalty_state(batch_size, vocab), jax.random.PRNGKey(1)
    times: dict[str, list[float]] = {kind: [] for kind in batches}
    for rep in range(reps + 2):  # the first two of each compile and warm up
        for kind, batch in batches.items():
            start = time.perf_counter()
            out, penalties = sample(logits, batch, penalties, key, rep)
            jax.block_until_ready(out)
            if rep >= 2:
                times[kind].append(time.perf_counter() - start)
    return {kind: statistics.median(t) * 1e3 for kind, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--vocab", type=int, nargs="+", default=[151936, 1024],
                        help="vocabulary sizes (151936: Qwen3-VL's)")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    print(f"{'batch':>5} {'vocab':>7} {'rows':>7} {'no logprobs':>12} {'logprobs=5':>11} {'ratio':>6}")
    for vocab in args.vocab:
        for batch_size in args.batch_sizes:
            for rows, temperature in (("greedy", 0.0), ("random", 0.8)):
                ms = time_calls(batch_size, vocab, temperature, args.reps)
                print(f"{batch_size:>5} {vocab:>7} {rows:>7} {ms['no logprobs']:>9.2f} ms {ms['logprobs=5']:>8.2f} ms "
                      f"{ms['logprobs=5'] / ms['no logprobs']:>6.2f}")


if __name__ == "__main__":
    main()
