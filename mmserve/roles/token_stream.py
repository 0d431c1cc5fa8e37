"""Decode's end of a router's token stream: the events of every request that router sent here,
gathered over a step and sent as one message.

One gRPC stream per router, not one per request: at concurrency 16 a stream per request meant a
message, a thread wake-up and a read on the router for every token of every request; now it is one
of each per step (SGLang's detokenizer sends its batches the same way). The role's loop thread puts
events as it makes them and flushes once its step is done; the gRPC thread of the router's
``Tokens`` call sends what was flushed.
"""

from __future__ import annotations

import queue
import threading

from mmserve.rpc import worker_pb2 as pb


class TokenStream:
    def __init__(self, stream_id: str = ""):
        self.stream_id = stream_id
        self._pending: list[pb.TokenEvent] = []
        self._batches: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False

    def put(self, event: pb.TokenEvent) -> None:
        """Adds an event to the current step's message (dropped once the stream is closed)."""
        with self._lock:
            if not self._closed:
                self._pending.append(event)

    def flush(self) -> int:
        """Hands the step's events, if any, to the sending thread as one message; returns how many."""
        with self._lock:
            count = len(self._pending)
            if count:
                self._batches.put(pb.TokenEvents(events=self._pending))
                self._pending = []
            return count

    def close(self) -> None:
        """Ends the stream: the sending thread returns, and later events are dropped."""
        with self._lock:
            self._closed = True
            self._pending = []
        self._batches.put(None)

    @property
    def closed(self) -> bool:
        return self._closed

    def next_batch(self) -> pb.TokenEvents | None:
        """The next flushed message, waiting for it; None once the stream is closed."""
        return self._batches.get()

    def sent(self) -> list[pb.TokenEvents]:
        """Every message flushed and not yet taken, without waiting (for tests and checks)."""
        out = []
        while True:
            try:
                batch = self._batches.get_nowait()
            except queue.Empty:
                return out
            if batch is not None:
                out.append(batch)
