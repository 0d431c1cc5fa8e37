"""Rows waiting for the sender's block buffers: staged in arrival order as blocks free up.

Both senders (encode: embeddings, prefill: KV) produce rows faster than a full pool can take
them; the outbox keeps them, writes each into a fresh allocation when one is available, and hands
the room to the transfer. A write that fails fails only its own room.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Mapping

from transfer.messages import TransferInfo
from transfer.sender import Sender


@dataclasses.dataclass
class Parcel:
    room: int
    rows: Mapping[str, object]
    """Field name -> rows (at least ``info.total_tokens`` of them; padding rows are not sent)."""
    info: TransferInfo


class Outbox:
    def __init__(self, sender: Sender, on_error: Callable[[int, str], None]):
        self.sender = sender
        self._on_error = on_error
        self._parcels: collections.deque[Parcel] = collections.deque()

    def __len__(self) -> int:
        return len(self._parcels)

    def put(self, parcel: Parcel) -> None:
        self._parcels.append(parcel)

    def drop(self, room: int) -> None:
        self._parcels = collections.deque(p for p in self._parcels if p.room != room)

    def flush(self) -> None:
        while self._parcels:
            parcel = self._parcels[0]
            allocation = self.sender.allocator.alloc(parcel.info.total_tokens)
            if allocation is None:
                return
            self._parcels.popleft()
            try:
                self.sender.buffers.write(allocation, 0, parcel.rows, num_tokens=parcel.info.total_tokens)
            except Exception as error:  # the room fails; the worker and its other rooms go on
                self.sender.allocator.free(allocation)
                self._on_error(parcel.room, f"could not stage rows: {error}")
                continue
            self.sender.send(parcel.room, allocation, parcel.info)
