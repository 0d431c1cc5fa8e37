"""One computation per key at a time: callers asking for a key another caller is computing wait for
that caller's result instead of computing it again (Go's ``singleflight``).

Encode decodes each client's picture file in the gRPC thread of its call, before the embedding
cache can know it (the vision tower has not run yet): the ``n`` choices of one request, or clients
sending the same file together, reach encode at once, and each decoded it (a 4096x4096 JPEG's
request took 2.4 s at ``n=16`` against 1.1 s at ``n=1``, docs/status.md).
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[Hashable, concurrent.futures.Future[T]] = {}

    def run(self, key: Hashable, compute: Callable[[], T]) -> tuple[T, bool]:
        """``compute()``'s result, or the result of the call computing ``key`` right now (its
        exception too); and whether this call computed it. Nothing is kept once the computing call
        returns: a later call computes again."""
        with self._lock:
            future = self._running.get(key)
            computes = future is None
            if computes:
                future = self._running[key] = concurrent.futures.Future()
        if not computes:
            return future.result(), False
        try:
            result = compute()
        except BaseException as error:
            future.set_exception(error)
            raise
        else:
            future.set_result(result)
            return result, True
        finally:
            with self._lock:
                del self._running[key]
