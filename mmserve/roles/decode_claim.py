"""A request's decode worker, picked as the router admits it (``DisaggregatedBackend.kv_claim``):
its KV pages and its place in the worker's ``in_flight`` are counted there from admission on, so
the next request admitted sees them, and a leaving worker's drain waits for it. (Counted as one
pool summed over the decode workers, a request was admitted that no single worker had room for.)"""

from __future__ import annotations

from collections.abc import Callable

from mmserve.roles.worker_pool import WorkerHandle


class DecodeClaim:
    """An admitted request's decode worker, the pages it reserves there and its place in the
    worker's ``in_flight`` (which a leaving worker's drain waits on), counted from its admission
    to its end (``release``, idempotent)."""

    def __init__(self, worker: WorkerHandle | None, tokens: int, forget: Callable[[], None]):
        self.worker = worker
        self._pages = worker.kv_pages_for(tokens) if worker is not None else 0
        self._forget = forget
        if worker is not None:
            worker.kv_reserved += self._pages
            worker.in_flight += 1

    def release(self) -> None:
        if self._forget is not None:
            if self.worker is not None:
                self.worker.kv_reserved -= self._pages
                self.worker.in_flight -= 1
            self._forget()
            self._forget = None
