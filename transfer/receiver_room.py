"""What a receiver keeps per room: its record (state, sender, reservation, pulls, chunks landed),
the blocks reserved for it, each chunk as pulled, and a finished room's data as ``take`` hands it
over. The protocol that fills them is :mod:`transfer.receiver`."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from transfer.allocator import Allocation
from transfer.data_plane import PendingPull
from transfer.directory import SenderKey
from transfer.messages import PostedPull, Ready, SenderEndpoint, TransferInfo, TransferMode
from transfer.poll import Room


@dataclasses.dataclass
class Reservation:
    """A room's blocks, and how many of its tokens have arrived in them."""

    allocation: Allocation
    filled: int = 0

    @property
    def free(self) -> int:
        return self.allocation.capacity_tokens - self.filled


@dataclasses.dataclass(frozen=True)
class Landed:
    """One chunk as pulled: ``arrays[name]`` holds the room's tokens ``[offset, offset + count)``
    in its first rows, padded to their bucket."""

    arrays: dict[str, jax.Array]
    offset: int
    count: int


@dataclasses.dataclass(frozen=True)
class Received:
    """A finished room: its chunks, which hold tokens [start_token, total) end to end."""

    info: TransferInfo
    chunks: tuple[Landed, ...]
    """One, or more when the receiver had to resume."""
    start_token: int = 0
    """The tokens the receiver held already (``add(..., start_token=)``), not sent again."""

    @property
    def num_tokens(self) -> int:
        return self.info.total_tokens

    def host(self, name: str) -> np.ndarray:
        """Field ``name`` of tokens [start_token, total) on the host, in one array: for tests
        and tools, never on the serving path."""
        return np.concatenate([np.asarray(c.arrays[name])[:c.count] for c in self.chunks])


@dataclasses.dataclass
class ReceiverRoom(Room):
    sender: SenderKey = ("", "")
    mode: TransferMode = TransferMode.EMBEDDING
    incarnation: int | None = None
    """The sender incarnation the room was opened with (None: whichever is published)."""
    held: int = 0
    """Tokens at the start of the room the receiver holds already: never sent."""
    looked_again: bool = False
    """The registry was asked again because its cached answer was another incarnation."""
    asked_at: int | None = None
    """The directory's answer count when the room asked again about a sender judged gone."""
    endpoint: SenderEndpoint | None = None
    """Set once Register is sent."""
    reservation: Reservation | None = None
    """The whole room's tokens, reserved when its first chunk is offered."""
    info: TransferInfo | None = None
    pull: tuple[PendingPull, Ready] | None = None
    expected: int | None = None
    """The room's length when the receiver knows it ahead (``add(..., expected_tokens=)``)."""
    declined: str | None = None
    """Why the receiver will never take the room (``Receiver.decline``): it only tells the sender."""
    posted: PostedPull | None = None
    """The first chunk's uuid and length, sent with Register (a chunk the sender offers under it)."""
    posting: bool = False
    """``posted`` counts against the receiver's limits: from Register until a Ready takes its pull
    or the room ends."""
    posted_pull: PendingPull | None = None
    """That chunk's pull, made once the sender answered Registered, until a Ready takes it."""
    landed: list[Landed] = dataclasses.field(default_factory=list)
    """The chunks pulled so far, as pulled (the reservation only counts their space)."""

    @property
    def received(self) -> int:
        """Tokens held: those held already, then those that arrived."""
        return self.held + (self.reservation.filled if self.reservation else 0)
