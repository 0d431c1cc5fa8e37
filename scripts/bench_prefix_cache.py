"""Prefix caching: the time to first token of a long prompt, cold, against a second prompt that shares
its prefix (the same image and ~1000 tokens of text, then a new question), in one run.

For each shape (random-weight checkpoints as in bench_offline.py: ``bench`` and the 30b-proportioned
``30b``) it runs one engine with the prefix cache and one without, on the same prompts, and prints
the first prompt's time, the second prompt's time with and without the cache, and their ratios.
Each timing is ``LLM.generate`` of one prompt with ``max_tokens=1`` (the vision tower, prefill and one
sampled token); the image is in the embedding cache by the second prompt in both engines, so the
difference is the prefix cache alone. Programs are compiled by a warm-up pair of the same lengths;
each measurement repeats on fresh prompts and the fastest counts.

    python scripts/bench_prefix_cache.py --shapes bench 30b --prefix-tokens 1000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench_offline import END, IMAGE, START, write_checkpoint
from mmserve import LLM, SamplingParams

FIRST_TOKEN = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def prompt_pair(seed: int, prefix_tokens: int, question_tokens: int):
    """Two prompts with one image and ``prefix_tokens`` of text in common, then different questions."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    prefix = [START, IMAGE, END] + [int(t) for t in rng.integers(0, 900, prefix_tokens)]
    questions = [[int(t) for t in rng.integers(0, 900, question_tokens)] for _ in range(2)]
    return [{"prompt_token_ids": prefix + q, "multi_modal_data": {"image": image}} for q in questions]


def seconds(llm: LLM, prompt) -> float:
    start = time.perf_counter()
    llm.generate(prompt, FIRST_TOKEN)
    return time.perf_counter() - start


def measure(llm: LLM, seed: int, args) -> tuple[float, float]:
    first, second = prompt_pair(seed, args.prefix_tokens, args.question_tokens)
    return seconds(llm, first), seconds(llm, second)


def bench_shape(shape: str, args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp), shape)
        engine = dict(max_model_len=args.max_model_len, num_pages=1024, page_size=16, precompile=False)
        on, off = LLM(ckpt, **engine), LLM(ckpt, enable_prefix_caching=False, **engine)
        for llm in (on, off):
            measure(llm, 1, args)  # warm-up: compiles every program the measured prompts use
        compiles = on.engine.stats()["compiles"]
        runs = [measure(on, 2 + i, args) + measure(off, 2 + i, args) for i in range(args.repeat)]
        first_on, second_on, first_off, second_off = (min(r[i] for r in runs) for i in range(4))
        stats = on.engine.stats()
        length = len(on.engine.prepare(prompt_pair(0, args.prefix_tokens, args.question_tokens)[0]).token_ids)
        print(f"{shape:>6} {length:>7} {first_on * 1e3:>9.1f} {second_on * 1e3:>10.1f} {second_off * 1e3:>11.1f} "
              f"{second_on / first_on:>12.3f} {second_on / second_off:>11.3f}   (first without cache "
              f"{first_off * 1e3:.1f} ms; hits {stats['prefix_cache_hits']} of {stats['prefix_cache_queries']} "
              f"tokens; compiles after warm-up: {stats['compiles'] - compiles})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["bench", "30b"])
    p.add_argument("--prefix-tokens", type=int, default=1000, help="shared text tokens after the image")
    p.add_argument("--question-tokens", type=int, default=16, help="tokens after the shared prefix, new per prompt")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement, on fresh prompts; the fastest counts")
    args = p.parse_args()
    print("times: LLM.generate of one prompt, max_tokens=1 (vision + prefill + first token), fastest of "
          f"{args.repeat}")
    print(f"{'shape':>6} {'tokens':>7} {'first ms':>9} {'second ms':>10} {'second off':>11} "
          f"{'second/first':>12} {'on/off':>11}")
    for shape in args.shapes:
        bench_shape(shape, args)


if __name__ == "__main__":
    main()
