"""Throughput of a whole room between two processes, against a same-process device copy.

This process is the receiver and the clock; a child process (this script, ``--child``) is
the sender. Each room goes through the full path: the sender gathers the chunk out of its
block pool (``pool``: as encode's embeddings go) or takes the rows it was given as they are
(``rows``: as prefill's KV goes) and offers it, the control plane announces it, the receiver
pulls it and keeps it (a receiver has no pool). The clock runs from the "go" until the receiver
holds the data. *Room / pull* is the room's throughput over the raw pull's (the data plane
alone) in the same run; the limit on one host is a device copy of the same bytes in one process.

    python scripts/bench_transfer.py [--sizes 1 4 16 64 256] [--planes jax zmq] [--reps 3]
        [--jax-settings size=256,copies=8,raw=0 size=4,copies=8,raw=0 ...] [--at-once 1 4]

Sizes are MiB; fractions time small rooms (0.015625 MiB is one 16 KiB row), where the room's
time is latency (control round trips, program dispatches), not bytes. Each ``--jax-settings``
entry runs the jax plane again with the transfer server's knobs set so on both sides
(``size``: ``jax_transfer_size`` in MiB, ``copies``: ``jax_parallel_copies``, ``raw``:
``jax_raw_buffers``). ``--at-once N`` also times N rooms of the payload handed over together
(the clock stops when the last has landed; throughput is their bytes together), next to the
raw pulls of N such arrays at once.

With ``MMSERVE_CLUSTER_SECRET`` set (as mmserve's roles always run) the control sockets are
CurveZMQ, keyed from it; unset, plain ZMQ. The data planes are never encrypted (docs/transfer.md,
"Security").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfer import (BootstrapServer, PollState, Receiver, Sender, TransferConfig,  # noqa: E402
                      TransferInfo, TransferMode, field)
from transfer.config import ENV  # noqa: E402
from mmserve.cluster_credential import SECRET_ENV  # noqa: E402

HIDDEN = 4096
FIELDS = (field("embeddings", (HIDDEN,), "float32"),)
TOKEN_BYTES = HIDDEN * 4
BLOCK = 64
MIB = 1 << 20


KNOBS = {"size": "jax_transfer_size", "copies": "jax_parallel_copies", "raw": "jax_raw_buffers"}
DEFAULT_SETTING = "size=256,copies=8,raw=0"
"""The jax transfer server's own defaults."""


def knobs(setting: str) -> dict[str, str]:
    """``size=4,copies=8,raw=1`` as the MMSERVE_* variables of those TransferConfig fields (size in
    bytes), so the config parses and checks them as it does a server's."""
    variables = {}
    for part in setting.split(","):
        key, _, value = part.partition("=")
        if key not in KNOBS:
            raise SystemExit(f"--jax-settings: unknown knob {key!r} in {setting!r} (size, copies, raw)")
        variables[ENV[KNOBS[key]]] = str(int(float(value) * MIB)) if key == "size" else value
    return variables


def config_for(room_blocks: int, rooms: int, plane: str, setting: str = DEFAULT_SETTING) -> TransferConfig:
    """Pools for ``rooms`` rooms at once of up to ``room_blocks`` blocks, each in one chunk."""
    return TransferConfig.from_env(
        knobs(setting), block_size=BLOCK, default_blocks=room_blocks, buffer_blocks=room_blocks * rooms,
        data_plane=plane, transfer_timeout_s=300.0, heartbeat_timeout_s=60.0, waiting_timeout_s=300.0,
        secret=os.environ.get(SECRET_ENV, ""))


def rows(room: int, tokens: int) -> jax.Array:
    return (jnp.arange(tokens * HIDDEN, dtype=jnp.float32).reshape(tokens, HIDDEN) + room) % 251.0


def child(args: argparse.Namespace) -> None:
    """The sender: stages each room on "stage" (written in its pool, or as rows of their own),
    hands it over on "go". It sleeps on its sockets and on stdin together, as a role's loop sleeps
    on its sockets and its calls' wake pipe, so a "go" is taken as soon as it is written."""
    config = config_for(args.room_blocks, args.rooms, args.plane, args.setting)
    sender = Sender(config, FIELDS, "bench-sender", args.bootstrap)
    stdin, pending = sys.stdin.fileno(), b""
    staged, live = {}, set()
    print(json.dumps({"ready": [sender.data_plane.kind, sender.data_plane.address]}), flush=True)
    while True:
        poller = zmq.Poller()
        for socket in [stdin, *sender.sockets()]:
            poller.register(socket, zmq.POLLIN)
        if stdin in dict(poller.poll(1)):
            data = os.read(stdin, 1 << 16)
            if not data:
                sender.close()
                return
            *lines, pending = (pending + data).split(b"\n")
            for cmd in map(json.loads, lines):
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
                else:  # "go"
                    allocation, given = staged.pop(room)
                    sender.send(room, allocation, TransferInfo(TransferMode.EMBEDDING, tokens), rows=given)
                    live.add(room)
        sender.progress(0)
        for room in [r for r in live if sender.poll(r).terminal]:
            live.discard(room)
            print(json.dumps({"done": sender.poll(room).value}), flush=True)
            sender.forget(room)


class SenderProcess:
    def __init__(self, bootstrap: str, plane: str, room_blocks: int, rooms: int, setting: str) -> None:
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", "--bootstrap", bootstrap, "--plane", plane,
             "--room-blocks", str(room_blocks), "--rooms", str(rooms), "--setting", setting],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.kind, self.data_address = self.expect("ready")

    def send(self, *cmds: dict, **cmd) -> None:
        """One command, or several written at once (the child takes them in one turn of its loop)."""
        self.proc.stdin.write("".join(json.dumps(c) + "\n" for c in (cmds or (cmd,))))
        self.proc.stdin.flush()

    def expect(self, key: str):
        return json.loads(self.proc.stdout.readline())[key]

    def close(self) -> None:
        self.send(op="quit", room=0, tokens=0)
        self.proc.wait(timeout=30)


def time_rooms(receiver: Receiver, sender: SenderProcess, bootstrap: str, rooms: list[int], tokens: int,
               check: bool, source: str) -> float:
    """Seconds from handing ``rooms`` over together until the receiver holds the last of them."""
    for room in rooms:
        sender.send(op="stage", room=room, tokens=tokens, source="rows" if source == "posted" else source)
        sender.expect("staged")
        # "posted": rows as they are, to a receiver that knows the room's length (a PostedPull)
        receiver.add(room, bootstrap, "bench-sender", expected_tokens=tokens if source == "posted" else None)
    while any(receiver.poll(room) is not PollState.WAITING_FOR_INPUT for room in rooms):
        receiver.progress(0.001)
    start = time.perf_counter()
    sender.send(*({"op": "go", "room": room, "tokens": tokens} for room in rooms))
    while not all(receiver.poll(room).terminal for room in rooms):
        receiver.progress(0.001)
    jax.block_until_ready([c.arrays for room in rooms for c in receiver.landed(room)[1]])
    elapsed = time.perf_counter() - start
    for room in rooms:
        if receiver.poll(room) is not PollState.SUCCESS:
            raise RuntimeError(f"room {room} failed: {receiver.failure(room)}")
    for _ in rooms:
        ended = sender.expect("done")
        if ended != "success":
            raise RuntimeError(f"sender ended a room as {ended}")
    for room in rooms:
        if check:
            got = receiver.take(room).host("embeddings")
            np.testing.assert_array_equal(got, np.asarray(rows(room, tokens)))
        else:
            receiver.forget(room)
    return elapsed


def time_pulls(receiver: Receiver, sender: SenderProcess, uuids: list[int], tokens: int) -> float:
    """The data plane alone: offered arrays pulled together into fresh device memory, no pools, no control."""
    for uuid in uuids:
        sender.send(op="offer", room=uuid, tokens=tokens)
        sender.expect("offered")
    start = time.perf_counter()
    pending = [receiver.data_plane.pull(sender.data_address, uuid, receiver.layout.specs(tokens)) for uuid in uuids]
    while not all(p.done() for p in pending):
        time.sleep(0.0005)
    jax.block_until_ready([p.result() for p in pending])
    return time.perf_counter() - start


def tokens_of(mib: float) -> int:
    return max(1, int(mib * MIB) // TOKEN_BYTES)


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
    parser.add_argument("--sources", nargs="+", default=["pool", "rows", "posted"], choices=["pool", "rows", "posted"],
                        help="rooms written in the sender's pool (pictures from several vision calls), given as "
                        "rows of their own and offered as they are (prefill's KV), or so to a receiver that "
                        "knows the room's length and pulls before the offer (jax plane; the roles' common case)")
    parser.add_argument("--jax-settings", nargs="+", default=[DEFAULT_SETTING],
                        help="the jax transfer server's knobs, one run of the jax plane each: "
                        "size=MiB,copies=N,raw=0|1 (default: the server's own defaults)")
    parser.add_argument("--at-once", type=int, nargs="+", default=[1],
                        help="rooms of a payload handed over together (and raw pulls made together)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--plane", help=argparse.SUPPRESS)
    parser.add_argument("--room-blocks", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rooms", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--setting", default=DEFAULT_SETTING, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    for setting in args.jax_settings:  # refused before anything starts
        try:
            config_for(1, 1, "jax", setting)
        except ValueError as error:
            raise SystemExit(f"--jax-settings {setting!r}: {error}") from None
    room_blocks = max(math.ceil(tokens_of(mib) / BLOCK) for mib in args.sizes)
    copies = {mib: copy_seconds(tokens_of(mib) * TOKEN_BYTES, args.reps) for mib in args.sizes}
    print(f"backend {jax.default_backend()}, {HIDDEN}-float32 rows, block {BLOCK}, median of {args.reps} "
          f"after one checked warm-up room\n")
    print("| data plane | server knobs | payload | at once | rows from | room time | room throughput | raw pull time "
          "| raw pull | room / pull | device copy | ratio | host memcpy |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    runs = [(plane, setting) for plane in args.planes
            for setting in (args.jax_settings if plane == "jax" else ["-"])]
    for plane, setting in runs:
        knob_setting = setting if plane == "jax" else DEFAULT_SETTING
        config = config_for(room_blocks, max(args.at_once), plane, knob_setting)
        bootstrap = BootstrapServer(config).start()
        receiver = Receiver(config, FIELDS)
        sender = SenderProcess(bootstrap.address, plane, room_blocks, max(args.at_once), knob_setting)
        room = 0
        for mib in args.sizes:
            tokens = tokens_of(mib)
            for at_once in args.at_once:
                rooms = {}
                for source in args.sources:
                    times = []
                    for rep in range(args.reps + 1):
                        batch = list(range(room + 1, room + 1 + at_once))
                        room += at_once
                        seconds = time_rooms(receiver, sender, bootstrap.address, batch, tokens, rep == 0, source)
                        if rep:
                            times.append(seconds)
                    rooms[source] = statistics.median(times)
                pulls = []
                for _ in range(args.reps + 1):
                    batch = list(range(room + 1, room + 1 + at_once))
                    room += at_once
                    pulls.append(time_pulls(receiver, sender, batch, tokens))
                pull = statistics.median(pulls[1:])
                nbytes = tokens * TOKEN_BYTES
                for source, seconds in rooms.items():
                    throughput, raw = (at_once * nbytes / t / 1e9 for t in (seconds, pull))
                    copy, memcpy = (nbytes / t / 1e9 for t in copies[mib])
                    print(f"| {sender.kind} | {setting} | {payload(nbytes)} | {at_once} | {source} "
                          f"| {seconds * 1e3:.2f} ms | {throughput:.2f} GB/s | {pull * 1e3:.2f} ms | {raw:.2f} GB/s "
                          f"| {throughput / raw:.2f} | {copy:.2f} GB/s | {throughput / copy:.3f} | {memcpy:.2f} GB/s |",
                          flush=True)
        sender.close()
        receiver.close()
        bootstrap.close()


if __name__ == "__main__":
    main()
