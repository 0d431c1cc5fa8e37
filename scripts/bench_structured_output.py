"""What structured output adds to a decode step: filling the token bitmask on host for the rows
with a grammar, its copy to the device, and the mask inside the sampler.

No real tokenizer is downloaded: the vocabulary is synthetic, the byte-level alphabet plus random
byte-level strings (1-8 characters of letters, digits, spaces and JSON punctuation) up to
Qwen3-VL's lm head size, which gives xgrammar a vocabulary of the real size to sort per state.

    python scripts/bench_structured_output.py --batch 32
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models

from mmserve.sampler import all_allowed_bitmask, init_penalty_state, pack_sampling_batch, sample
from mmserve.sampling_params import SamplingParams
from mmserve.structured_output import StructuredOutput
from mmserve.structured_output.grammars import Grammars
from mmserve.structured_output.matcher import fill_bitmask
from models.qwen3_vl_moe.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "tags": {"type": "array", "items": {"type": "string"}},
                                           "count": {"type": "integer"}},
          "required": ["name", "tags", "count"], "additionalProperties": False}
CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ") + list('{}[]":,.-_')


def byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def synthetic_tokenizer(size: int, seed: int = 0) -> Tokenizer:
    chars = byte_level_chars()
    rng = np.random.default_rng(seed)
    vocab = {chars[b]: b for b in range(256)}
    while len(vocab) < size:
        text = "".join(rng.choice(CHARS, rng.integers(1, 9)))
        vocab.setdefault("".join(chars[b] for b in text.encode()), len(vocab))
    return Tokenizer(BackendTokenizer(models.BPE(vocab, [])), "", {})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    tokenizer = synthetic_tokenizer(args.vocab - 64)
    start = time.perf_counter()
    grammars = Grammars(tokenizer, args.vocab, [args.vocab - 1])
    info_s = time.perf_counter() - start
    start = time.perf_counter()
    grammars.submit(StructuredOutput.from_schema(SCHEMA)).result()
    compile_s = time.perf_counter() - start
    states = [grammars.state(StructuredOutput.from_schema(SCHEMA)) for _ in range(args.batch)]

    # Each row walks its own valid path: the allowed token it takes is drawn from its mask.
    rng = np.random.default_rng(1)
    fill, copy = [], []
    device = jax.devices()[0]
    for _ in range(args.steps):
        start = time.perf_counter()
        bitmask = fill_bitmask(states, args.batch, args.vocab)
        fill.append(time.perf_counter() - start)
        start = time.perf_counter()
        jax.block_until_ready(jax.device_put(bitmask, device))
        copy.append(time.perf_counter() - start)
        bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little").reshape(args.batch, -1)[:, :args.vocab]
        for row, state in enumerate(states):
            allowed = np.flatnonzero(bits[row])
            if not state.terminated:
                state.accept(int(rng.choice(allowed)))

    logits = jnp.asarray(np.random.default_rng(2).normal(size=(args.batch, args.vocab)), jnp.float32)
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(args.batch)]
    batch = pack_sampling_batch(params, [0] * args.batch, list(range(args.batch)), args.batch)
    mask = jax.device_put(all_allowed_bitmask(args.batch, args.vocab), device)
    penalties = init_penalty_state(args.batch, args.vocab)
    timings = {}
    for name, token_bitmask in (("without mask", None), ("with mask", mask)):
        times = []
        for i in range(args.steps + 3):
            start = time.perf_counter()
            out, penalties = sample(logits, batch, penalties, jax.random.PRNGKey(i), token_bitmask=token_bitmask)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - start)
        timings[name] = statistics.median(times[3:])

    ms = lambda s: f"{s * 1e3:.2f} ms"  # noqa: E731
    print(f"device {device.platform}, batch {args.batch}, vocab {args.vocab}, bitmask {bitmask.nbytes / 1024:.0f} KiB")
    print(f"tokenizer info {info_s:.2f} s (once), schema compile {compile_s:.2f} s (once per schema)")
    print(f"fill bitmask (host, {args.batch} grammar rows): median {ms(statistics.median(fill))}, "
          f"max {ms(max(fill))}")
    print(f"host->device copy: median {ms(statistics.median(copy))}")
    print(f"sampler: {ms(timings['without mask'])} without the mask, {ms(timings['with mask'])} with it")


if __name__ == "__main__":
    main()
