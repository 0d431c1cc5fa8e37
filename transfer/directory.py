"""A receiver's view of the registries: which sender name listens where, looked up on demand.

Lookups are asynchronous (one DEALER per registry) and retried while the sender has not
published yet, so a receiver can be told about a room before its sender is up. An answer is
trusted for one heartbeat interval (senders re-publish at that pace), so a busy receiver asks
about once per interval per sender, not per room, and a sender restarted under the same name (a
pod keeps its name) is found at its new address by the next room, not after a failed one.

The directory also remembers which incarnation of each sender the registry stopped naming (its
lease ran out: the process died; or another incarnation replaced it), so a room opened with that
incarnation fails at once instead of waiting, unanswered, for the bootstrap timeout. What it
knows of a sender no room has asked about for the waiting timeout is dropped (:meth:`prune`):
senders come back under new names, and a receiver would otherwise keep every name it ever met.
"""

from __future__ import annotations

import time

import zmq

from transfer.bootstrap import RegistryClient
from transfer.config import TransferConfig
from transfer.messages import Found, NotFound, SenderEndpoint

LOOKUP_RETRY_S = 0.05

SenderKey = tuple[str, str]
"""(registry address, sender name)."""


class SenderDirectory:
    def __init__(self, config: TransferConfig, poller: zmq.Poller) -> None:
        self.config = config
        self._poller = poller
        self._registries: dict[str, RegistryClient] = {}
        self._endpoints: dict[SenderKey, tuple[SenderEndpoint, float]] = {}
        """Each answer with the time until which it is trusted."""
        self._next_lookup: dict[SenderKey, float] = {}
        self._seen: dict[SenderKey, int] = {}
        """The incarnation each sender had in the latest answer naming it."""
        self._gone: dict[SenderKey, int] = {}
        """The incarnation the registry last stopped naming, per sender (one per name: bounded)."""
        self._answers: dict[SenderKey, int] = {}
        """How many answers about each sender have come back, so a room can wait for a newer one."""
        self._asked: dict[SenderKey, float] = {}
        """When a room last asked about each sender."""
        self._next_prune = 0.0

    def watch(self, registry: str) -> None:
        if registry not in self._registries:
            client = self._registries[registry] = RegistryClient(registry, self.config)
            self._poller.register(client.channel.socket, zmq.POLLIN)

    def error(self, key: SenderKey) -> str | None:
        """Why the registry refused us (a wrong secret), if it did."""
        return self._registries[key[0]].error

    def find(self, key: SenderKey, now: float) -> SenderEndpoint | None:
        """The sender's endpoint if a recent answer gave it; otherwise asks (at most every
        LOOKUP_RETRY_S) and returns None."""
        self._asked[key] = now
        endpoint, fresh_until = self._endpoints.get(key, (None, 0.0))
        if now < fresh_until:
            return endpoint
        if now >= self._next_lookup.get(key, 0.0):
            self._registries[key[0]].lookup(key[1])
            self._next_lookup[key] = now + LOOKUP_RETRY_S
        return None

    def collect(self) -> None:
        """Reads the registries' answers into the cache; a sender no longer registered is dropped."""
        fresh_until = time.monotonic() + self.config.heartbeat_interval_s
        for address, registry in self._registries.items():
            for answer in registry.replies():
                key = (address, answer.endpoint.name if isinstance(answer, Found) else answer.name)
                self._answers[key] = self._answers.get(key, 0) + 1
                if isinstance(answer, Found):
                    incarnation = answer.endpoint.incarnation
                    self._endpoints[key] = answer.endpoint, fresh_until
                    seen = self._seen.get(key)
                    if seen is not None and seen != incarnation:
                        self._gone[key] = seen
                    elif self._gone.get(key) == incarnation:
                        del self._gone[key]  # it only missed its lease (a stall) and published again
                    self._seen[key] = incarnation
                elif isinstance(answer, NotFound):
                    self._endpoints.pop(key, None)
                    if key in self._seen:
                        self._gone[key] = self._seen[key]

    def gone(self, key: SenderKey, incarnation: int | None) -> bool:
        """Whether the registry stopped naming that incarnation of the sender since it named it."""
        self._asked[key] = time.monotonic()
        return incarnation is not None and self._gone.get(key) == incarnation

    def answers(self, key: SenderKey) -> int:
        """How many answers about the sender have come back so far."""
        return self._answers.get(key, 0)

    def forget(self, key: SenderKey) -> None:
        """Drops a sender found dead, so the next room looks it up again."""
        self._endpoints.pop(key, None)
        self._next_lookup.pop(key, None)

    def prune(self, now: float) -> None:
        """Forgets the senders no room has asked about for ``waiting_timeout_s`` (looks once per
        heartbeat interval)."""
        if now < self._next_prune:
            return
        self._next_prune = now + self.config.heartbeat_interval_s
        records = (self._endpoints, self._next_lookup, self._seen, self._gone, self._answers)
        for key in {key for record in records for key in record}:
            if now - self._asked.setdefault(key, now) > self.config.waiting_timeout_s:
                for record in (*records, self._asked):
                    record.pop(key, None)

    def close(self) -> None:
        for registry in self._registries.values():
            registry.close()
