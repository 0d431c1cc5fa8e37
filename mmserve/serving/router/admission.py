"""Admission: the router lets in only as many requests as its backend can hold at once.

A request that finds the backend full waits, first come first served, in a bounded queue for at
most ``queue_timeout_s``; one that finds the queue full is refused at once with 429, one that
waited too long (or finds no worker at all) with 503, both with ``Retry-After``. So a burst, or
clients that hold their streams open, never strand work inside the roles (a prompt prefilled
whose decode never finds a slot) and never make a later request hang without an answer.

The capacity is asked of the backend each time (workers come and go); a slot is held from
admission until the request's stream ends, whatever ends it.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

from mmserve.serving.router.errors import InvalidRequest

RECHECK_S = 0.25
"""How often a queued request looks at the capacity again (it grows when a worker registers)."""
RETRY_AFTER_S = 1


class Overloaded(InvalidRequest):
    """No room now: 429 (the queue is full) or 503 (waited too long, or no worker is up)."""

    def __init__(self, message: str, status: int, retry_after_s: int = RETRY_AFTER_S):
        super().__init__(message, None, "overloaded" if status == 429 else "unavailable", status,
                         {"Retry-After": str(retry_after_s)})


class Ticket:
    """One admitted request's slot; ``release`` is idempotent."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._release()


class Admission:
    def __init__(self, capacity: Callable[[], int], max_queued: int, queue_timeout_s: float):
        self._capacity = capacity
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.running = 0
        self._queue: collections.deque[asyncio.Future] = collections.deque()

    def capacity(self) -> int:
        return self._capacity()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def admit(self) -> Ticket:
        """A slot now, or after waiting in the queue; raises ``Overloaded`` otherwise."""
        capacity = self._capacity()
        if capacity <= 0:
            raise Overloaded("no worker can take requests now (none is up)", 503)
        if not self._queue and self.running < capacity:
            self.running += 1
            return Ticket(self)
        if len(self._queue) >= self.max_queued:
            raise Overloaded(f"the server is at capacity ({self.running} requests running, {len(self._queue)} "
                             f"queued); retry later", 429)
        turn = asyncio.get_running_loop().create_future()
        self._queue.append(turn)
        deadline = time.monotonic() + self.queue_timeout_s
        try:
            while not turn.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Overloaded(f"no capacity freed within {self.queue_timeout_s:g} s; retry later", 503)
                try:
                    await asyncio.wait_for(asyncio.shield(turn), min(RECHECK_S, left))
                except TimeoutError:
                    self._admit_queued()
        except BaseException:
            if turn.done() and not turn.cancelled():  # given a slot just as it gave up: hand it on
                self._release()
            else:
                turn.cancel()
                self._queue.remove(turn)
            raise
        return Ticket(self)

    def _release(self) -> None:
        self.running -= 1
        self._admit_queued()

    def _admit_queued(self) -> None:
        capacity = self._capacity()
        while self._queue and self.running < capacity:
            self.running += 1
            self._queue.popleft().set_result(None)
