"""Fixtures for transfer tests: quick configs, a live registry, and real peer processes."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from transfer import BootstrapServer, TransferConfig, bucket_tokens  # noqa: E402
from transfer.config import ENV  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PEER = Path(__file__).with_name("transfer_peer.py")

# Heartbeat timeout leaves room for a jit compile stalling a loop on a busy machine.
QUICK = TransferConfig(block_size=4, default_blocks=4, buffer_blocks=64, bootstrap_timeout_s=20.0,
                       waiting_timeout_s=20.0, transfer_timeout_s=20.0, heartbeat_interval_s=0.2,
                       heartbeat_timeout_s=5.0)


def drive(parties: Iterable, until: Callable[[], bool], timeout: float = 20.0) -> None:
    """Runs the in-process parties' event loops until ``until()`` holds."""
    parties = list(parties)
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        for party in parties:
            party.progress(0.002)
        if not parties:
            time.sleep(0.005)


def assert_received(received, expected: dict, block_size: int, start: int = 0) -> None:
    """The room's tokens [start, total) equal ``expected[name][start:]`` bit for bit, and each chunk
    came as pulled: its bucket's rows, zero past its tokens."""
    for name, rows in expected.items():
        got = received.host(name)
        assert got.dtype == rows.dtype, name
        np.testing.assert_array_equal(got, rows[start:received.num_tokens], err_msg=name)
    at = start
    for chunk in received.chunks:
        assert chunk.offset == at
        at += chunk.count
        for name in expected:
            rows = np.asarray(chunk.arrays[name])
            assert rows.shape[0] == bucket_tokens(chunk.count, block_size), name
            assert not rows[chunk.count:].any(), f"{name}: padding rows must be zero"
    assert at == received.num_tokens


def run_for(parties: Iterable, seconds: float) -> None:
    """Keeps the parties' loops running for a while, to show that nothing happens meanwhile."""
    end = time.monotonic() + seconds
    drive(parties, lambda: time.monotonic() > end, timeout=seconds + 5.0)


class PeerProcess:
    """A transfer_peer.py child: commands in on stdin, JSON events out on stdout."""

    def __init__(self, role: str, config: TransferConfig, fields: str = "embedding", name: str = "",
                 bootstrap: str = "") -> None:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
               **{ENV[f.name]: str(getattr(config, f.name)) for f in dataclasses.fields(config) if f.name in ENV}}
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER), "--role", role, "--fields", fields, "--name", name, "--bootstrap", bootstrap],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        self.events: list[dict] = []
        self.stderr: collections.deque[str] = collections.deque(maxlen=60)
        threading.Thread(target=self._read_events, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _read_events(self) -> None:
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def command(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def wait_for(self, match: Callable[[dict], bool], timeout: float = 30.0, parties: Iterable = ()) -> dict:
        found: list[dict] = []

        def seen() -> bool:
            found.extend(e for e in self.events if match(e))
            if self.proc.poll() is not None and not found:
                raise RuntimeError(f"peer exited {self.proc.returncode}:\n{''.join(self.stderr)}")
            return bool(found)
        try:
            drive(parties, seen, timeout)
        except TimeoutError:
            seen_events = [(e["event"], e.get("room"), e.get("state"), e.get("reason")) for e in self.events]
            raise TimeoutError(f"no matching event in {seen_events}\n{''.join(self.stderr)}") from None
        return found[0]

    def state(self, room: int, state: str, timeout: float = 30.0, parties: Iterable = ()) -> dict:
        return self.wait_for(lambda e: e["event"] == "state" and e["room"] == room and e["state"] == state,
                             timeout, parties)

    def status(self, parties: Iterable = ()) -> dict:
        """A fresh snapshot of the peer's rooms and allocator."""
        seen = sum(e["event"] == "status" for e in self.events)
        self.command(op="status")
        statuses: list[dict] = []

        def arrived() -> bool:
            statuses[:] = [e for e in self.events if e["event"] == "status"]
            return len(statuses) > seen
        drive(parties, arrived, 10.0)
        return statuses[-1]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (subprocess.TimeoutExpired, BrokenPipeError):
                self.kill()


@pytest.fixture
def config() -> TransferConfig:
    return QUICK


@pytest.fixture
def bootstrap(config):
    server = BootstrapServer(config).start()
    yield server
    server.close()


@pytest.fixture
def pair(config, bootstrap):
    """An in-process KV sender published as "prefill-0" and a receiver."""
    from transfer import Receiver, Sender
    from transfer_payload import KV_FIELDS
    sender = Sender(config, KV_FIELDS, "prefill-0", bootstrap.address)
    receiver = Receiver(config, KV_FIELDS)
    yield sender, receiver
    receiver.close()
    sender.close()


@pytest.fixture
def spawn():
    """Starts peer processes and waits until each is ready; kills whatever is left at teardown."""
    peers: list[PeerProcess] = []

    def start(role: str, config: TransferConfig, **kwargs) -> PeerProcess:
        peer = PeerProcess(role, config, **kwargs)
        peers.append(peer)
        peer.wait_for(lambda e: e["event"] == "ready", timeout=60.0)
        return peer
    yield start
    for peer in peers:
        peer.close()
