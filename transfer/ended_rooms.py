"""What a sender remembers of the rooms its role has forgotten: how each ended, for a while.

A receiver may register for a room after it ended (decode reserving its pages slowly, after
prefill's room already failed): remembered, it is refused at once with the reason, instead of
being taken for an early registration and left waiting until the waiting timeout. And a room a
receiver registered and then ended before the role added it is added as FAILED, with that
reason, instead of as a fresh room that would hold the blocks sent into it.
"""

from __future__ import annotations

import collections
from typing import NamedTuple

MAX_ENDED_ROOMS = 16384
"""Forgotten rooms remembered at once (an id, a time and at most 200 characters of reason each);
the oldest is dropped first."""


class Ended(NamedTuple):
    """How a forgotten room ended, remembered until ``until``; ``claimed``: the role had added it."""

    until: float
    ending: str
    claimed: bool


class EndedRooms:
    def __init__(self, keep_s: float) -> None:
        self._keep_s = keep_s
        self._ended: collections.OrderedDict[int, Ended] = collections.OrderedDict()
        """Oldest first."""

    def remember(self, room: int, ending: str, claimed: bool, now: float) -> None:
        self._ended[room] = Ended(now + self._keep_s, ending[:200], claimed)
        if len(self._ended) > MAX_ENDED_ROOMS:
            self._ended.popitem(last=False)

    def get(self, room: int) -> Ended | None:
        return self._ended.get(room)

    def pop(self, room: int) -> Ended | None:
        return self._ended.pop(room, None)

    def expire(self, now: float) -> None:
        while self._ended and next(iter(self._ended.values())).until < now:
            self._ended.popitem(last=False)
