"""When each peer was last heard from, so a peer that stops answering fails its rooms.

A peer is watched only while some live room depends on it; the clock starts when the first
such room appears, so a peer we have not needed for a while is not declared dead on sight.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable


class Liveness:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._last_heard: dict[Hashable, float] = {}

    def heard(self, peer: Hashable, now: float) -> None:
        self._last_heard[peer] = now

    def dead(self, needed: Iterable[Hashable], now: float) -> list[Hashable]:
        """Peers in ``needed`` silent for longer than the timeout; forgets peers no longer needed."""
        needed = set(needed)
        for peer in list(self._last_heard):
            if peer not in needed:
                del self._last_heard[peer]
        for peer in needed:
            self._last_heard.setdefault(peer, now)
        return [peer for peer in needed if now - self._last_heard[peer] > self.timeout_s]
