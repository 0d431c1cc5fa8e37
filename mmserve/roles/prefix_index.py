"""The router's view of which worker holds which KV pages, kept from the workers' KV events.

Each worker's prefix cache publishes ``BlockStored`` / ``BlockRemoved`` (:mod:`mmserve.kv_events`);
a :class:`KVEventFeed` follows every worker that advertises its endpoints in its heartbeat and
applies the batches here. A block's hash is its page key, which the router computes for a new
request from the same prompt (:func:`mmserve.engine.page_hash.prompt_page_keys`): the number of a
request's leading pages a worker holds is how much of its prefill that worker would skip.

Missed events only cost routing quality, never correctness: a worker holding less than the index
thinks recomputes what it lacks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from transfer.curve import CurveKeys
from mmserve.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, EventsLost, KVEventSubscriber

log = logging.getLogger(__name__)
RECEIVE_TIMEOUT_S = 0.2


class PrefixIndex:
    """Block hashes held per worker; thread-safe (feeds write, the router's event loop reads)."""

    def __init__(self):
        self._blocks: dict[str, set[bytes]] = {}
        self._lock = threading.Lock()

    def apply(self, worker: str, batch: EventBatch, stop: threading.Event | None = None) -> None:
        """``stop``: the feed's, checked under the lock, so a batch read before an unfollow is not
        applied after the unfollow's ``forget``."""
        with self._lock:
            if stop is not None and stop.is_set():
                return
            held = self._blocks.setdefault(worker, set())
            for event in batch.events:
                if isinstance(event, BlockStored):
                    held.update(event.block_hashes)
                elif isinstance(event, BlockRemoved):
                    held.difference_update(event.block_hashes)
                elif isinstance(event, AllBlocksCleared):
                    held.clear()

    def forget(self, worker: str, stop: threading.Event | None = None) -> None:
        """``stop``: the feed's, as for :meth:`apply` (a feed stopped and replaced by a new one for
        the same worker must not wipe what the new one has applied)."""
        with self._lock:
            if stop is not None and stop.is_set():
                return
            self._blocks.pop(worker, None)

    def matched_pages(self, worker: str, page_keys: Sequence[bytes]) -> int:
        """How many of ``page_keys`` (a prompt's full pages, in order) the worker holds from the first on."""
        with self._lock:
            held = self._blocks.get(worker)
            if not held:
                return 0
            for i, key in enumerate(page_keys):
                if key not in held:
                    return i
            return len(page_keys)

    def size(self, worker: str) -> int:
        with self._lock:
            return len(self._blocks.get(worker, ()))


class KVEventFeed:
    """One thread per followed worker, receiving its event batches into the index (a gap in the
    sequence is filled from the worker's replay socket by the subscriber)."""

    def __init__(self, index: PrefixIndex, keys: CurveKeys):
        self.index = index
        self._keys = keys
        self._following: dict[str, tuple[tuple[str, str], threading.Event]] = {}
        self._lock = threading.Lock()
        """Guards ``_following``: the router's loop follows, a feed's thread leaves it when it fails."""

    def follow(self, worker: str, endpoint: str, replay_endpoint: str) -> None:
        """Starts following ``worker`` at these endpoints (again from scratch when they changed: a
        restarted worker starts with an empty cache)."""
        endpoints = (endpoint, replay_endpoint)
        with self._lock:
            current = self._following.get(worker)
            if current is not None and current[0] == endpoints:
                return
        self.unfollow(worker)
        stop = threading.Event()
        with self._lock:
            self._following[worker] = (endpoints, stop)
        threading.Thread(target=self._receive, args=(worker, endpoints, stop), name=f"kv-events {worker}",
                         daemon=True).start()
        log.info("following %s's KV events at %s", worker, endpoint)

    def unfollow(self, worker: str) -> None:
        with self._lock:
            current = self._following.pop(worker, None)
        if current is not None:
            current[1].set()
        self.index.forget(worker)

    def following(self) -> list[str]:
        with self._lock:
            return list(self._following)

    def close(self) -> None:
        for worker in self.following():
            self.unfollow(worker)

    def _catch_up(self, worker: str, subscriber: KVEventSubscriber, stop: threading.Event) -> None:
        """What the worker holds already, from its replay of everything (its buffer from its first
        batch, or a snapshot of its cache): an idle worker publishes nothing, and its cached
        pages (a shared system prompt's) stayed unknown until it next cached or evicted one.
        The subscriber's numbering stays at its start, so its first live batch asks the replay
        for everything again and the index takes it again in order (a live batch read as older
        than this answer would look like a publisher that started over)."""
        try:
            batches = subscriber.replay(0, subscriber.replay_timeout_s)
        except TimeoutError:  # its first live batch asks again
            log.warning("%s did not answer the KV event replay asked as the router began following it", worker)
            return
        for _, batch in batches:
            self.index.apply(worker, batch, stop)

    def _receive(self, worker: str, endpoints: tuple[str, str], stop: threading.Event) -> None:
        subscriber, delivered = None, False
        try:
            subscriber = KVEventSubscriber(*endpoints, self._keys, token_ids=False)  # the index reads hashes only
            self._catch_up(worker, subscriber, stop)
            while not stop.is_set():
                try:
                    batches = subscriber.receive(RECEIVE_TIMEOUT_S)
                except TimeoutError:  # the replay did not answer: the next batch asks again
                    log.warning("%s did not answer a KV event replay; asking again with its next batch", worker)
                    continue
                except EventsLost as lost:  # what the index knows of it is wrong: start over from here
                    # (a router joining a worker whose buffer no longer reaches back to its start too)
                    log.log(logging.WARNING if delivered else logging.INFO,
                            "%s's KV events: %s; its index starts over", worker, lost)
                    self.index.forget(worker, stop)
                    batches = lost.batches
                for _, batch in batches:
                    self.index.apply(worker, batch, stop)
                delivered = delivered or bool(batches)
        except Exception:
            log.exception("following %s's KV events failed; following it again at its next heartbeat", worker)
        finally:
            if subscriber is not None:
                subscriber.close()
            with self._lock:  # a feed that ended by itself is followed again at the worker's next heartbeat
                if self._following.get(worker, (None, None))[1] is stop:
                    del self._following[worker]
                    stop.set()
                    self.index.forget(worker)
