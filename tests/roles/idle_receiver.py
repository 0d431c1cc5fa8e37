"""A real transfer receiver that registers rooms with a role's sender and never pulls them.

A role's outbox gives sender blocks only to a room whose receiver has registered, so a test that
wants rows to hold blocks (and to wait for them) registers their rooms here. Its pool is taken
whole at the start, so every room's first ``Ready`` waits for space that never comes; a thread
keeps it answering heartbeats, so the sender does not fail the rooms for a silent peer.
"""

from __future__ import annotations

import threading
import time

from transfer import Receiver, Sender, TransferMode


class IdleReceiver:
    def __init__(self, sender: Sender, bootstrap: str, mode: TransferMode) -> None:
        self._sender, self._bootstrap, self._mode = sender, bootstrap, mode
        self.receiver = Receiver(sender.config, sender.buffers.fields)
        self.receiver.allocator.alloc(self.receiver.allocator.total_tokens)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._answer, daemon=True)
        self._thread.start()

    def register(self, *rooms: int, timeout_s: float = 30.0) -> None:
        """Registers ``rooms`` and returns once the sender has read every registration (it reads
        its socket here: call this from the thread that drives the role)."""
        with self._lock:
            for room in rooms:
                self.receiver.add(room, self._bootstrap, self._sender.endpoint.name, self._mode,
                                  self._sender.incarnation)
        deadline = time.monotonic() + timeout_s
        while any(self._sender.receiver_holds(room) is None for room in rooms):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rooms {rooms} did not register in {timeout_s} s")
            with self._lock:
                self.receiver.progress(0)
            self._sender.progress(0.01)

    def _answer(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self.receiver.progress(0)
            time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.receiver.close()
