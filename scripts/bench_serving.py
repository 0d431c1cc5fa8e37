"""Serving latency and throughput against a running server: TTFT, ITL and output tokens/s at a
given concurrency, every request a streamed chat with an image, and the compilations the server
made while serving (from ``mmserve_backend_compiles`` on /metrics; 0 once it compiles its whole
program grid before it is ready).

    pip install -e .
    python scripts/serve.py --role colocated --model tiny --port 8000 &
    python scripts/bench_serving.py --url http://127.0.0.1:8000 --requests 64 --concurrency 8

No warm-up by default: the first request should be as fast as the hundredth. Run it once against
``--role all`` and once against ``--role colocated`` to compare.

The client is light (``stream_client.py``: stdlib HTTP, each SSE line read with ``json.loads``)
and builds every picture before the clock starts, because on a small host it shares the CPU with
the server it measures; it prints the CPU it used during the run, as a share of the host's cores.

``--turns N`` makes each request a conversation of N turns about one picture (each turn sends the
whole history: the picture, the questions and answers so far, and a new question), the turns of
one conversation one after another, and prints the TTFT of each turn: turns after the first find
their prefix in the prefix cache (and, with several prefill workers, are routed to it). Against
``--role all`` at ``--concurrency 1`` each turn also says how many of its prompt tokens had their
KV sent to decode, next to the tokens new since the last turn (decode keeps the earlier turns).

    python scripts/bench_serving.py --url http://127.0.0.1:8000 --requests 16 --turns 4
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import resource
import statistics
import threading
import time
import urllib.request

import numpy as np
from PIL import Image

from stream_client import StreamClient, Streamed


def image_url(seed: int, size: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def one_request(client: StreamClient, picture: str, seed: int, max_tokens: int) -> tuple[float, list[float], int]:
    """(TTFT, inter-token gaps, output tokens) of one streamed request."""
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture}},
                                             {"type": "text", "text": f"Describe picture {seed}."}]}]
    answer = client.chat(messages, max_tokens)
    return answer.ttft, answer.gaps, answer.completion_tokens


TAIL_SAMPLES = 200
"""Below this many requests the TTFT line gives the maximum, not a p99 (numpy's p99 of 64 samples
falls below the true p99 in about three runs of four)."""
WORDS = "the a picture shows of in and with on light dark colour shape near far left right top bottom".split()


def document(seed: int, words: int) -> str:
    """``words`` words of filler text, different for each seed (so no two conversations share it)."""
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), words))


def conversation(client: StreamClient, picture: str, seed: int, max_tokens: int,
                 turns: int, context_words: int, kv_probe=None) -> list[tuple[float, list[float], int, tuple]]:
    """(TTFT, gaps, tokens, KV) of each turn of one conversation about one picture (and a document
    of ``context_words`` words before it, its own). KV: (prompt tokens, tokens new since the last
    turn's prompt and answer, prompt tokens whose KV reached decode) when ``kv_probe`` (the decode
    workers' kv_tokens_received; only meaningful with one conversation at a time) is given."""
    context = [{"type": "text", "text": document(seed, context_words)}] if context_words else []
    history = [{"role": "user", "content": context + [
        {"type": "image_url", "image_url": {"url": picture}},
        {"type": "text", "text": f"Describe picture {seed}."}]}]
    out = []
    for turn in range(turns):
        if turn:
            history.append({"role": "user", "content": f"And what else is in it ({turn})?"})
        received = kv_probe() if kv_probe else None
        answer: Streamed = client.chat(history, max_tokens)
        history.append({"role": "assistant", "content": answer.text})
        kv = ()
        if received is not None:
            seen = out[-1][3][0] + out[-1][2] if out else 0  # the last turn's prompt and answer
            kv = (answer.prompt_tokens, answer.prompt_tokens - seen, kv_probe() - received)
        out.append((answer.ttft, answer.gaps, answer.completion_tokens, kv))
    return out


def decode_kv_received(url: str) -> float | None:
    """Prompt tokens whose KV reached the decode workers so far (router's /health), None when the
    server has no decode role (colocated)."""
    with urllib.request.urlopen(f"{url}/health", timeout=10) as reply:
        workers = json.loads(reply.read()).get("roles", {}).get("decode", [])
    counts = [w["kv_tokens_received"] for w in workers if "kv_tokens_received" in w]
    return float(sum(counts)) if counts else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="tiny")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--image-size", type=int, default=128, help="side of the square test picture, pixels")
    p.add_argument("--warmup", type=int, default=0,
                   help="requests sent first and not measured (a server started with --no-precompile "
                        "compiles on them)")
    p.add_argument("--seed", type=int, default=0, help="first picture's seed: another seed, other pixels (so "
                   "nothing comes from the server's embedding cache)")
    p.add_argument("--image-sizes", type=int, nargs="+", default=None,
                   help="cycle the picture's side through these sizes (default: --image-size only)")
    p.add_argument("--turns", type=int, default=1,
                   help="turns per conversation about one picture (each turn resends the history); 1: single requests")
    p.add_argument("--context-words", type=int, default=0,
                   help="with --turns: a document of this many words opens each conversation (its own), so "
                        "the first turn has a long prompt to prefill and later turns a long prefix to reuse")
    args = p.parse_args()
    client = StreamClient(args.url, args.model)
    sizes = args.image_sizes or [args.image_size]
    warmup_seeds, seeds = range(10_000, 10_000 + args.warmup), range(args.seed, args.seed + args.requests)
    pictures = {seed: image_url(seed, sizes[seed % len(sizes)]) for seed in [*warmup_seeds, *seeds]}
    if args.turns > 1:
        probe = None
        if args.concurrency == 1 and decode_kv_received(args.url) is not None:
            probe = lambda: decode_kv_received(args.url)
        run = lambda seed: conversation(client, pictures[seed], seed, args.max_tokens, args.turns,
                                       args.context_words, probe)
    else:
        run = lambda seed: [one_request(client, pictures[seed], seed, args.max_tokens)]
    compiles_before = server_compiles(args.url)
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        # Each thread opens its connection here, not in its first measured request (/v1/models does
        # not touch the engine); the barrier holds each thread until all have one, so none takes two.
        opened = threading.Barrier(args.concurrency, timeout=60)

        def connect(_):
            try:
                client.connect()
            except BaseException:
                opened.abort()  # the others stop waiting (BrokenBarrierError) rather than hang
                raise
            opened.wait()

        list(pool.map(connect, range(args.concurrency)))
        list(pool.map(run, warmup_seeds))
        cpu_start, start = _cpu_seconds(), time.perf_counter()
        conversations = list(pool.map(run, seeds))
        elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    results = [turn for turns in conversations for turn in turns]
    ttft = [r[0] * 1000 for r in results]
    itl = [g * 1000 for r in results for g in r[1]]
    tokens = sum(r[2] for r in results)
    print(f"url {args.url}  requests {args.requests} x {args.turns} turns  concurrency {args.concurrency}  max_tokens {args.max_tokens}")
    # a p99 of fewer than TAIL_SAMPLES is the maximum or below it by chance: the maximum is said instead
    tail_name, tail = ("p99", np.percentile(ttft, 99)) if len(ttft) >= TAIL_SAMPLES else ("max", max(ttft))
    print(f"TTFT ms ({len(ttft)})  mean {statistics.mean(ttft):8.1f}  p50 {statistics.median(ttft):8.1f}  "
          f"p90 {np.percentile(ttft, 90):8.1f}  {tail_name} {tail:8.1f}  "
          f"{tail_name}/p50 {tail / statistics.median(ttft):5.2f}")
    if itl:
        print(f"ITL ms    mean {statistics.mean(itl):8.1f}  p50 {statistics.median(itl):8.1f}  "
              f"p90 {np.percentile(itl, 90):8.1f}")
    print(f"throughput {tokens / elapsed:8.1f} output tokens/s  ({tokens} tokens in {elapsed:.1f} s)")
    print(f"client CPU {cpu:.2f} s ({cpu / elapsed / os.cpu_count():.0%} of this host's {os.cpu_count()} cores "
          "during the run, where the server was on the same host)")
    if args.turns > 1:
        first = statistics.median(c[0][0] for c in conversations)
        for turn in range(args.turns):
            p50 = statistics.median(c[turn][0] for c in conversations)
            kv = [c[turn][3] for c in conversations if c[turn][3]]
            moved = (f"  KV to decode: {sum(k[2] for k in kv):.0f} of {sum(k[0] for k in kv)} prompt tokens "
                     f"({sum(k[1] for k in kv)} new)" if kv else "")
            print(f"turn {turn + 1}  TTFT p50 {p50 * 1000:8.1f} ms  ({p50 / first:4.2f}x turn 1){moved}")
    compiles_after = server_compiles(args.url)
    if compiles_before is not None and compiles_after is not None:
        print(f"compilations while serving: {compiles_after - compiles_before:.0f}")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def server_compiles(url: str) -> float | None:
    """XLA compilations so far: colocated's mmserve_backend_compiles gauge, or the sum of every
    worker's ``compiles`` in /health (the disaggregated roles); None if neither says."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("mmserve_backend_compiles "):
                return float(line.split()[1])
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as reply:
            roles = json.loads(reply.read()).get("roles", {})
    except OSError:
        return None
    counts = [w["compiles"] for workers in roles.values() for w in workers if "compiles" in w]
    return float(sum(counts)) if counts else None


if __name__ == "__main__":
    main()
