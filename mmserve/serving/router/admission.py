"""Admission: the router lets in only as many requests as its backend can hold at once.

A request that finds the backend full waits, first come first served, in a bounded queue for at
most ``queue_timeout_s``; one that finds the queue full is refused at once with 429, one that
waited too long (or finds no worker at all) with 503, both with ``Retry-After``. So a burst, or
clients that hold their streams open, never strand work inside the roles (a prompt prefilled
whose decode never finds a slot) and never make a later request hang without an answer.

Requests are counted, and their KV is claimed where the backend reserves it up front (decode
reserves prompt + max_tokens for each request, so pages, not slots, are often what runs out
first): the backend claims it on one decode worker with room as the request is admitted, so a
request whose KV fits no worker now waits here rather than inside decode, where its prefilled KV
would hold prefill's transfer buffers meanwhile. (Counted as one pool summed over the decode
workers, a request was admitted that no single worker had room for.) One that could not fit
even in the largest idle worker is refused with 400.

The capacity is asked of the backend each time (workers come and go); a slot and its KV are held
from admission until the request's stream ends, whatever ends it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Callable

from mmserve.serving.backend import NO_CLAIM, KVClaim
from mmserve.serving.router.errors import InvalidRequest

RECHECK_S = 0.25
"""How often a queued request looks at the capacity again (it grows when a worker registers)."""
RETRY_AFTER_S = 1


class Overloaded(InvalidRequest):
    """No room now: 429 (the queue is full) or 503 (waited too long, or no worker is up). Raised
    before the backend sees the request, like the client's mistakes, but the server's condition:
    typed ``server_error``, as OpenAI types its overloaded refusals."""

    type_ = "server_error"

    def __init__(self, message: str, status: int, retry_after_s: int = RETRY_AFTER_S):
        super().__init__(message, None, "overloaded" if status == 429 else "unavailable", status,
                         {"Retry-After": str(retry_after_s)})


class Ticket:
    """One admitted request's slot and its KV claim; ``release`` is idempotent."""

    def __init__(self, admission: Admission, kv_tokens: int, claim: KVClaim):
        self._admission = admission
        self.kv_tokens = kv_tokens
        self._claim = claim
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._claim.release()
            self._admission._release(self.kv_tokens)


class Admission:
    def __init__(self, capacity: Callable[[], int], max_queued: int, queue_timeout_s: float,
                 kv_capacity: Callable[[], int | None] = lambda: None):
        self._capacity = capacity
        self._kv_capacity = kv_capacity
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.running = 0
        self.kv_held = 0
        self._queue: collections.deque[_Waiting] = collections.deque()

    def capacity(self) -> int:
        return self._capacity()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def admit(self, kv_tokens: int = 0, claim: Callable[[], KVClaim | None] = lambda: NO_CLAIM) -> Ticket:
        """A slot and the KV ``claim()`` reserves (None: no room for it now) now, or after waiting
        in the queue; raises ``Overloaded`` otherwise, ``InvalidRequest`` (400) if ``kv_tokens``
        of KV could never fit."""
        capacity, kv_capacity = self._capacity(), self._kv_capacity()
        if capacity <= 0:
            raise Overloaded("no worker can take requests now (none is up)", 503)
        if kv_capacity is not None and kv_tokens > kv_capacity:
            raise InvalidRequest(f"the prompt and max_tokens need {kv_tokens} tokens of KV cache, more than a "
                                 f"decode worker holds ({kv_capacity}); lower max_tokens or shorten the prompt",
                                 "max_tokens")
        waiting = _Waiting(asyncio.get_running_loop().create_future(), kv_tokens, claim)
        if not self._queue and self._take(waiting, capacity):
            return Ticket(self, kv_tokens, waiting.turn.result())
        if len(self._queue) >= self.max_queued:
            raise Overloaded(f"the server is at capacity ({self.running} requests running, {len(self._queue)} "
                             f"queued); retry later", 429)
        self._queue.append(waiting)
        deadline = time.monotonic() + self.queue_timeout_s
        try:
            while not waiting.turn.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Overloaded(f"no capacity freed within {self.queue_timeout_s:g} s; retry later", 503)
                try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that
                    # arrives as the turn comes (the client leaving just as it is admitted)
                    async with asyncio.timeout(min(RECHECK_S, left)):
                        await asyncio.shield(waiting.turn)
                except TimeoutError:
                    if self._capacity() <= 0:  # a role's last worker died: as at the door, not a wait
                        raise Overloaded("no worker can take requests now (none is up)", 503) from None
                    self._admit_queued()
        except BaseException:
            if waiting.turn.done() and not waiting.turn.cancelled():  # admitted just as it gave up: hand it on
                waiting.turn.result().release()
                self._release(kv_tokens)
            else:
                waiting.turn.cancel()
                self._queue.remove(waiting)
            raise
        return Ticket(self, kv_tokens, waiting.turn.result())

    def _take(self, waiting: _Waiting, capacity: int) -> bool:
        """Admits ``waiting`` if a slot is free and its KV can be claimed now (its turn then holds
        the claim)."""
        if self.running >= capacity:
            return False
        claim = waiting.claim()
        if claim is None:
            return False
        self.running += 1
        self.kv_held += waiting.kv_tokens
        waiting.turn.set_result(claim)
        return True

    def _release(self, kv_tokens: int) -> None:
        self.running -= 1
        self.kv_held -= kv_tokens
        self._admit_queued()

    def _admit_queued(self) -> None:
        """First come, first served: the head waits for its KV even where a later one would fit."""
        capacity = self._capacity()
        while self._queue and self._take(self._queue[0], capacity):
            self._queue.popleft()


@dataclasses.dataclass(eq=False)
class _Waiting:
    """A request waiting for admission; ``turn`` gets its KV claim when it is admitted."""

    turn: asyncio.Future
    kv_tokens: int
    claim: Callable[[], KVClaim | None]
