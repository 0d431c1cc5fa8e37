"""Rows waiting for the sender's block buffers: staged in arrival order as blocks free up.

Both senders (encode: embeddings, prefill: KV) produce rows faster than a full pool can take
them; the outbox keeps them, takes a fresh allocation for each when one is available, and hands
the room to the transfer with its rows: as they are (prefill's KV, read from its pages), as rows
of their own taken from one run of a larger array (a request's pictures, when one vision call
made them all: the sender offers those too without touching its pool), or else written into the
allocation (pictures from several calls or the cache). A write that fails fails only its own
room.

Only a room whose receiver has registered takes blocks. A receiver may hold back its registration
until another room has landed (decode waits for a request sharing its first page to land, then
shares that page); were the held-back room's rows staged first, their blocks could leave none for
the room it waits on, and both would wait until their deadlines. Among registered rooms the
order is arrival: one waiting for blocks holds back the rest, so a large room is not starved by
smaller ones.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Mapping, Sequence

from transfer.messages import TransferInfo
from transfer.sender import Sender


@dataclasses.dataclass(frozen=True)
class Run:
    """Rows ``[start, start + count)`` of every field's array (field name -> array): a part of a
    larger array, as a picture's rows are of their vision call's output."""

    arrays: Mapping[str, object]
    start: int
    count: int


@dataclasses.dataclass
class Parcel:
    room: int
    info: TransferInfo
    runs: Sequence[Run] = ()
    """The room's rows, laid end to end: ``info.total_tokens`` of them in all (encode: each picture
    a part of its vision call's output); taken as rows of their own when they are one run of one
    array, else written into the sender's pool."""
    rows: Mapping[str, object] | None = None
    """Or the room's rows from token ``rows_start`` on as arrays of their own, already padded to
    the sender's bucket and zero past the total (prefill's KV, read from its pages so): the sender
    offers them as they are when one chunk carries them (:meth:`Sender.send`)."""
    rows_start: int = 0


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
        """Stages what it can; reads the sender's socket first, for registrations that arrived."""
        self.sender.progress(0)
        unregistered: list[Parcel] = []
        try:
            while self._parcels:
                parcel = self._parcels[0]
                if self.sender.receiver_holds(parcel.room) is None:
                    unregistered.append(self._parcels.popleft())
                    continue
                allocation = self.sender.allocator.alloc(parcel.info.total_tokens)
                if allocation is None:
                    break
                self._parcels.popleft()
                try:
                    rows = parcel.rows
                    if rows is None and (run := _one_run(parcel.runs)) is not None and \
                            run.count == parcel.info.total_tokens:
                        rows = self.sender.buffers.rows_of(run.arrays, run.start, run.count)
                    elif rows is None:
                        self._write(parcel, allocation)
                except Exception as error:  # the room fails; the worker and its other rooms go on
                    self.sender.allocator.free(allocation)
                    self._on_error(parcel.room, f"could not stage rows: {error}")
                    continue
                try:
                    self.sender.send(parcel.room, allocation, parcel.info, rows=rows, rows_start=parcel.rows_start)
                except ValueError as error:  # refused before the sender took the blocks: still ours
                    self.sender.allocator.free(allocation)
                    self._on_error(parcel.room, f"could not stage rows: {error}")
        finally:
            self._parcels.extendleft(reversed(unregistered))  # they came first: arrival order kept

    def _write(self, parcel: Parcel, allocation) -> None:
        offset = 0
        for run in parcel.runs:
            self.sender.buffers.write(allocation, offset, run.arrays, num_tokens=run.count, source_start=run.start)
            offset += run.count
        if offset != parcel.info.total_tokens:
            raise ValueError(f"{offset} rows for a room of {parcel.info.total_tokens} tokens")


def _one_run(runs: Sequence[Run]) -> Run | None:
    """The runs as one, when each continues the previous in the same arrays (a request's pictures
    encoded in one vision call, the common case); else None."""
    if not runs:
        return None
    first = runs[0]
    end = first.start + first.count
    for run in runs[1:]:
        if run.start != end or any(run.arrays.get(name) is not array for name, array in first.arrays.items()):
            return None
        end += run.count
    return Run(first.arrays, first.start, end - first.start)
