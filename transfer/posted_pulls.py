"""A receiver's pulls made before their offer (docs/transfer.md "Pulls posted before the offer").

When a receiver knows a room's length and the rest fits the first chunk, it registers the room
with a ``PostedPull`` and pulls as soon as the sender takes the registration, so the chunk lands
as soon as it is offered. Such a pull is not reserved in the receiver's blocks (a reservation
made at registration is what once made rooms wait on one another: transfer/receiver.py) but kept
within limits of its own, here.
"""

from __future__ import annotations

import secrets

from transfer.block_buffers import BlockLayout
from transfer.config import TransferConfig
from transfer.data_plane import DataPlane, DataPlaneError, PendingPull
from transfer.messages import PostedPull
from transfer.receiver_room import ReceiverRoom

MAX_POSTED_PULLS = 2
"""Pulls made before their offer at once. Each waits on one of the data plane's landing watchers
until the sender offers (a vision tower's run, say), so a few are left for the pulls made on a
Ready."""


class PostedPulls:
    def __init__(self, config: TransferConfig, layout: BlockLayout, data_plane: DataPlane) -> None:
        self._config, self._layout, self._data_plane = config, layout, data_plane
        self._open = 0
        self._rows = 0
        """Rows of the open postings: at most one default chunk's bucket."""
        self.made = 0
        """Pulls made before their offer; ``taken`` of them brought their room's chunk."""
        self.taken = 0

    def register(self, room: ReceiverRoom) -> PostedPull | None:
        """The pull a room registers as posted, when the receiver knows the room's length, the rest
        fits the first chunk and the limits allow (at most ``MAX_POSTED_PULLS`` at once, their rows
        within one default chunk's bucket). Decided at registration, so that the sender answers
        with zeros only pulls the receiver makes."""
        rest = (room.expected or 0) - room.held
        if not (self._data_plane.posts_pulls and 1 <= rest <= self._config.default_tokens):
            return None
        rows = self._layout.bucket(rest)
        if self._open >= MAX_POSTED_PULLS or self._rows + rows > self._layout.bucket(self._config.default_tokens):
            return None
        room.posting = True
        self._open += 1
        self._rows += rows
        return PostedPull(secrets.randbits(63), rest)

    def make(self, room: ReceiverRoom) -> None:
        """Pulls the room's first chunk before it is offered, once the sender has taken the
        registration (and with it the promise to answer the pull)."""
        try:
            room.posted_pull = self._data_plane.pull(room.endpoint.data_address, room.posted.uuid,
                                                     self._layout.specs(self._layout.bucket(room.posted.num_tokens)))
        except DataPlaneError:
            return  # made again on the Ready, under the same uuid (which fails the room if the peer is gone)
        self.made += 1

    def end(self, room: ReceiverRoom) -> PendingPull | None:
        """The room's posted pull (None if it has none, or it was never made), no longer counted
        against the limits."""
        if not room.posting:
            return None
        room.posting = False
        self._open -= 1
        self._rows -= self._layout.bucket(room.posted.num_tokens)
        pending, room.posted_pull = room.posted_pull, None
        return pending
