"""A real sender or receiver in its own process, steered by JSON lines on stdin.

The tests spawn it with ``sys.executable`` (config from MMSERVE_* variables), write commands
and read events: one per room state change, the digests of what a receiver took, and
status snapshots of rooms and allocator. Closing stdin ends it; ``kill -9`` kills it.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading

import jax
import msgspec
import numpy as np

from transfer import PollState, Receiver, Sender, TransferConfig, TransferInfo, TransferMode
from transfer_payload import FIELD_SETS, digests, padded_payload, payload


def emit(**event) -> None:
    print(json.dumps(event), flush=True)


def read_commands(commands: queue.Queue) -> None:
    for line in sys.stdin:
        if line.strip():
            commands.put(json.loads(line))
    commands.put(None)


class Peer:
    def __init__(self, args: argparse.Namespace) -> None:
        config = TransferConfig.from_env()
        self.fields = FIELD_SETS[args.fields]
        if args.role == "sender":
            self.party = Sender(config, self.fields, args.name, args.bootstrap)
        else:
            self.party = Receiver(config, self.fields)
        self.states: dict[int, PollState] = {}
        self.held = []
        self.warm_up()

    def warm_up(self) -> None:
        """Takes the process's first XLA compile before "ready", as a serving role does at start-up,
        so it does not stall the loop past a peer's heartbeat timeout mid-test (a receiver compiles
        nothing: it keeps chunks as pulled)."""
        if isinstance(self.party, Receiver):
            return
        buffers, allocation = self.party.buffers, self.party.allocator.alloc(1)
        buffers.write(allocation, 0, payload(self.fields, 0, 1))
        jax.block_until_ready(buffers.read(allocation, 0, 1))
        self.party.allocator.free(allocation)

    def run(self, cmd: dict) -> None:
        op, room = cmd["op"], cmd.get("room")
        if op == "send":
            self.send(room, cmd["tokens"], TransferMode(cmd.get("mode", "embedding")), cmd.get("first_token"))
        elif op == "add" and isinstance(self.party, Sender):
            self.party.add(room)
        elif op == "add":
            self.party.add(room, cmd["bootstrap"], cmd["sender"], TransferMode(cmd.get("mode", "embedding")))
        elif op == "abort":
            self.party.abort(room)
        elif op == "hog":
            allocation = self.party.allocator.alloc(cmd["tokens"])
            if allocation is not None:
                self.held.append(allocation)
            emit(event="hogged", ok=allocation is not None)
            return
        elif op == "unhog":
            for allocation in self.held:
                self.party.allocator.free(allocation)
            self.held.clear()
        elif op == "status":
            self.status()
        else:
            raise ValueError(f"unknown op {op}")
        if room is not None:
            self.states.setdefault(room, None)

    def send(self, room: int, tokens: int, mode: TransferMode, first_token: int | None) -> None:
        allocation = self.party.allocator.alloc(tokens)
        self.party.buffers.write(allocation, 0, padded_payload(self.fields, room, tokens, allocation.block_size),
                                 num_tokens=tokens)
        info = TransferInfo(mode, tokens, {"rope_delta": -room}, first_token)
        self.party.send(room, allocation, info)

    def status(self) -> None:
        allocator = self.party.allocator
        emit(event="status", available=allocator.available_blocks(), total=allocator.num_blocks,
             held=sum(a.num_blocks for a in self.held),
             rooms={str(r): self.live_state(r) for r in self.states})

    def live_state(self, room: int) -> str:
        """The room's state now (not as of the last watch); a taken room stays a success."""
        before = self.states[room]
        return before.value if before is not None and before.terminal else self.party.poll(room).value

    def watch(self) -> None:
        for room, before in list(self.states.items()):
            if before is not None and before.terminal:
                continue
            state = self.party.poll(room)
            if state is before:
                continue
            self.states[room] = state
            reason = self.party.failure(room) if state is PollState.FAILED else ""
            if state is PollState.SUCCESS and isinstance(self.party, Receiver):
                self.report(room)
            emit(event="state", room=room, state=state.value, reason=reason)

    def report(self, room: int) -> None:
        received = self.party.take(room)
        expected = payload(self.fields, room, received.num_tokens)
        got = {f.name: received.host(f.name) for f in self.fields}
        padding_zero = all(not np.asarray(a)[c.count:].any() for c in received.chunks for a in c.arrays.values())
        emit(event="received", room=room, info=msgspec.to_builtins(received.info),
             digests=digests(got, received.num_tokens), expected=digests(expected, received.num_tokens),
             padding_zero=bool(padding_zero))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=("sender", "receiver"), required=True)
    parser.add_argument("--fields", choices=sorted(FIELD_SETS), default="embedding")
    parser.add_argument("--name", default="")
    parser.add_argument("--bootstrap", default="")
    args = parser.parse_args()
    commands: queue.Queue = queue.Queue()
    threading.Thread(target=read_commands, args=(commands,), daemon=True).start()
    peer = Peer(args)
    emit(event="ready", data_plane=peer.party.data_plane.kind)
    while True:
        while not commands.empty():
            cmd = commands.get()
            if cmd is None:
                peer.party.close()
                return
            peer.run(cmd)
        peer.party.progress(0.005)
        peer.watch()


if __name__ == "__main__":
    main()
