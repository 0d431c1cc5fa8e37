"""Throughput of a whole room between two processes, against a same-process device copy.

This process is the receiver and the clock; a child process (this script, ``--child``) is
the sender. Each room goes through the full path: the sender gathers the chunk out of its
block pool (``pool``: as encode's embeddings go) or takes the rows it was given as they are
(``rows``: as prefill's KV goes) and offers it, the control plane announces it, the receiver
pulls it and keeps it (a receiver has no pool). The clock runs from the "go" until the receiver
holds the data. *Room / pull* is the room's throughput over the raw pull's (the data plane
alone) in the same run; the limit on one host is a device copy of the same bytes in one process.

    python scripts/bench_transfer.py [--sizes 1 4 16 64 256] [--planes jax zmq] [--reps 3]

Sizes are MiB; fractions time small rooms (0.015625 MiB is one 16 KiB row), where the room's
time is latency (control round trips, program dispatches), not bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfer import (BootstrapServer, PollState, Receiver, Sender, TransferConfig,  # noqa: E402
                      TransferInfo, TransferMode, field)

HIDDEN = 4096
FIELDS = (field("embeddings", (HIDDEN,), "float32"),)
TOKEN_BYTES = HIDDEN * 4
BLOCK = 64
MIB = 1 << 20


def config_for(max_mib: int, plane: str) -> TransferConfig:
    blocks = max_mib * MIB // TOKEN_BYTES // BLOCK
    return TransferConfig(block_size=BLOCK, default_blocks=blocks, buffer_blocks=blocks, data_plane=plane,
                          transfer_timeout_s=300.0, heartbeat_timeout_s=60.0, waiting_timeout_s=300.0)


def rows(room: int, tokens: int) -> jax.Array:
    return (jnp.arange(tokens * HIDDEN, dtype=jnp.float32).reshape(tokens, HIDDEN) + room) % 251.0


def child(args: argparse.Namespace) -> None:
    """The sender: stages each room on "stage" (written in its pool, or as rows of their own),
    hands it over on "go"."""
    sender = Sender(config_for(args.max_mib, args.plane), FIELDS, "bench-sender", args.bootstrap)
    commands: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [commands.put(json.loads(line)) for line in sys.stdin], daemon=True).start()
    staged, live = {}, set()
    print(json.dumps({"ready": [sender.data_plane.kind, sender.data_plane.address]}), flush=True)
    while True:
        while not commands.empty():
            cmd = commands.get()
            if cmd["op"] == "quit":
                sender.close()
                return
            room, tokens = cmd["room"], cmd["tokens"]
            if cmd["op"] == "offer":
                offered = jax.block_until_ready(rows(room, tokens))
                sender.data_plane.offer(room, [offered], timeout_s=300.0)
                print(json.dumps({"offered": room}), flush=True)
            elif cmd["op"] == "stage":
                allocation = sender.allocator.alloc(tokens)
                given = None
                if cmd["source"] == "pool":
                    sender.buffers.write(allocation, 0, {"embeddings": rows(room, tokens)})
                    jax.block_until_ready(sender.buffers.pools)
                else:  # as prefill gives its KV: the room's bucket, zero past the tokens
                    padded = jnp.zeros((sender.buffers.bucket(tokens), HIDDEN), jnp.float32)
                    given = {"embeddings": jax.block_until_ready(padded.at[:tokens].set(rows(room, tokens)))}
                staged[room] = (allocation, given)
                print(json.dumps({"staged": room}), flush=True)
            else:
                allocation, given = staged.pop(room)
                sender.send(room, allocation, TransferInfo(TransferMode.EMBEDDING, tokens), rows=given)
                live.add(room)
        sender.progress(0.001)
        for room in [r for r in live if sender.poll(r).terminal]:
            live.discard(room)
            print(json.dumps({"done": sender.poll(room).value}), flush=True)
            sender.forget(room)


class SenderProcess:
    def __init__(self, bootstrap: str, plane: str, max_mib: int) -> None:
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", "--bootstrap", bootstrap, "--plane", plane,
             "--max-mib", str(max_mib)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.kind, self.data_address = self.expect("ready")

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def expect(self, key: str):
        return json.loads(self.proc.stdout.readline())[key]

    def close(self) -> None:
        self.send(op="quit", room=0, tokens=0)
        self.proc.wait(timeout=30)


def time_room(receiver: Receiver, sender: SenderProcess, bootstrap: str, room: int, tokens: int,
              check: bool, source: str) -> float:
    sender.send(op="stage", room=room, tokens=tokens, source=source)
    sender.expect("staged")
    receiver.add(room, bootstrap, "bench-sender")
    while receiver.poll(room) is not PollState.WAITING_FOR_INPUT:
        receiver.progress(0.001)
    start = time.perf_counter()
    sender.send(op="go", room=room, tokens=tokens)
    while not receiver.poll(room).terminal:
        receiver.progress(0.001)
    jax.block_until_ready([c.arrays for c in receiver.landed(room)[1]])
    elapsed = time.perf_counter() - start
    if receiver.poll(room) is not PollState.SUCCESS:
        raise RuntimeError(f"room {room} failed: {receiver.failure(room)}")
    ended = sender.expect("done")
    if ended != "success":
        raise RuntimeError(f"sender ended room {room} as {ended}")
    if check:
        got = receiver.take(room).host("embeddings")
        np.testing.assert_array_equal(got, np.asarray(rows(room, tokens)))
    else:
        receiver.forget(room)
    return elapsed


def time_pull(receiver: Receiver, sender: SenderProcess, uuid: int, tokens: int) -> float:
    """The data plane alone: one offered array pulled into fresh device memory, no pools, no control."""
    sender.send(op="offer", room=uuid, tokens=tokens)
    sender.expect("offered")
    start = time.perf_counter()
    pending = receiver.data_plane.pull(sender.data_address, uuid, receiver.layout.specs(tokens))
    while not pending.done():
        time.sleep(0.0005)
    jax.block_until_ready(pending.result())
    return time.perf_counter() - start


def payload(nbytes: int) -> str:
    return f"{nbytes / MIB:g} MiB" if nbytes >= MIB else f"{nbytes // 1024} KiB"


def copy_seconds(nbytes: int, reps: int) -> tuple[float, float]:
    """Median seconds of a jitted device copy, and of a numpy host memcpy, of ``nbytes``."""
    device_copy = jax.jit(jnp.copy)
    x, host = jnp.ones(nbytes // 4, jnp.float32), np.ones(nbytes // 4, np.float32)
    device_copy(x).block_until_ready()
    device, memcpy = [], []
    for _ in range(reps):
        start = time.perf_counter()
        device_copy(x).block_until_ready()
        device.append(time.perf_counter() - start)
        start = time.perf_counter()
        host.copy()
        memcpy.append(time.perf_counter() - start)
    return statistics.median(device), statistics.median(memcpy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16, 64, 256],
                        help="payloads in MiB (fractions too: 0.015625 is one 16 KiB row)")
    parser.add_argument("--planes", nargs="+", default=["jax", "zmq"], choices=["jax", "zmq"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sources", nargs="+", default=["pool", "rows"], choices=["pool", "rows"],
                        help="rooms written in the sender's pool (encode's embeddings), or given as rows of "
                        "their own and offered as they are (prefill's KV)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--plane", help=argparse.SUPPRESS)
    parser.add_argument("--max-mib", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    max_mib = max(1, math.ceil(max(args.sizes)))
    copies = {mib: copy_seconds(max(1, int(mib * MIB) // TOKEN_BYTES) * TOKEN_BYTES, args.reps) for mib in args.sizes}
    print(f"backend {jax.default_backend()}, {HIDDEN}-float32 rows, block {BLOCK}, median of {args.reps} "
          f"after one checked warm-up room\n")
    print("| data plane | payload | rows from | room time | room throughput | raw pull time | raw pull | room / pull "
          "| device copy | ratio | host memcpy |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for plane in args.planes:
        config = config_for(max_mib, plane)
        bootstrap = BootstrapServer(config).start()
        receiver = Receiver(config, FIELDS)
        sender = SenderProcess(bootstrap.address, plane, max_mib)
        room = 0
        for mib in args.sizes:
            tokens = max(1, int(mib * MIB) // TOKEN_BYTES)
            rooms = {}
            for source in args.sources:
                times = []
                for rep in range(args.reps + 1):
                    room += 1
                    seconds = time_room(receiver, sender, bootstrap.address, room, tokens, rep == 0, source)
                    if rep:
                        times.append(seconds)
                rooms[source] = statistics.median(times)
            pulls = []
            for _ in range(args.reps + 1):
                room += 1
                pulls.append(time_pull(receiver, sender, room, tokens))
            pull = statistics.median(pulls[1:])
            nbytes = tokens * TOKEN_BYTES
            for source, seconds in rooms.items():
                throughput, raw, copy, memcpy = (nbytes / t / 1e9 for t in (seconds, pull, *copies[mib]))
                print(f"| {sender.kind} | {payload(nbytes)} | {source} | {seconds * 1e3:.2f} ms "
                      f"| {throughput:.2f} GB/s | {pull * 1e3:.2f} ms | {raw:.2f} GB/s | {throughput / raw:.2f} | {copy:.2f} GB/s | "
                      f"{throughput / copy:.3f} | {memcpy:.2f} GB/s |", flush=True)
        sender.close()
        receiver.close()
        bootstrap.close()


if __name__ == "__main__":
    main()
