"""One request as one role holds it: an explicit state, only legal transitions, one way out.

Each role (encode, prefill, decode) keeps one table, request id -> record. A record's state says
what the request holds in that role (a transfer room, a place in the engine, a page reservation, a
parcel in the outbox); only the transitions in the role's table are legal, and anything else
raises (and is logged), as for transfer's poll states (``transfer/poll.py``).

A record leaves its table only through :meth:`RequestTable.finish`, which moves it to a terminal
state (DONE or FAILED; FAILED is legal from every live state) and calls the role's release once,
with the state the request was in, so every exit (done, a failed room, an abort, a dead peer, a
failed step, an engine refusal) frees what that state holds, exactly once. A role moves a record
into a state before it takes what that state holds, and frees each holding idempotently, so a
request can never hold something (an engine slot, a room) without a record that will free it.

Each record carries the router's deadline for the request; the role ends every record past it
(``RequestTable.fail_overdue``) by itself, so a request is freed on time even when the router
died or its abort was lost.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import ClassVar, Generic, TypeVar

from opentelemetry import trace

from mmserve.tracing import link_from, span_carrier, tracer
from transfer.receiver import Receiver
from transfer.sender import Sender

log = logging.getLogger(__name__)
DEADLINE_PASSED = "the request passed its deadline (the router's --request-timeout)"


class IllegalTransition(RuntimeError):
    pass


class PrefillState(enum.Enum):
    WAITING_FOR_EMBEDDINGS = "waiting_for_embeddings"
    """Holds an embedding room (receiver) and the KV room (sender): encode has not sent yet."""
    PREFILLING = "prefilling"
    """Holds the prompt in the engine (pages, a slot) and the KV room, and the embedding room
    until its last chunk lands (the prompt starts on the first)."""
    AWAITING_DECODE = "awaiting_decode"
    """The prompt is done and its first token streamed; decode has not registered its KV room
    yet, so prefill does not know which tokens to send: its pages are kept in the engine."""
    SENDING_KV = "sending_kv"
    """The prompt left the engine; its KV rows wait in the outbox or are in transfer (KV room)."""
    DONE = "done"
    FAILED = "failed"


class DecodeState(enum.Enum):
    RESERVING = "reserving"
    """Waits, in arrival order, for pages (prompt + max_tokens) and a slot; holds only its stream."""
    RECEIVING_KV = "receiving_kv"
    """Holds its page reservation and slot, and a KV room (receiver) registered with prefill."""
    DECODING = "decoding"
    """In the engine's continuous batch; its stream gets each token."""
    DONE = "done"
    FAILED = "failed"


class EncodeState(enum.Enum):
    QUEUED = "queued"
    """Its pictures wait for the vision tower: the next step encodes every queued request's
    together (as few vision calls as the patch buckets allow)."""
    SENDING = "sending"
    """The visual rows wait in the outbox for sender blocks or are in transfer (embedding room)."""
    DONE = "done"
    FAILED = "failed"


State = TypeVar("State", bound=enum.Enum)

PREFILL_TRANSITIONS: Mapping[PrefillState, frozenset[PrefillState]] = {
    PrefillState.WAITING_FOR_EMBEDDINGS: frozenset({PrefillState.PREFILLING, PrefillState.FAILED}),
    PrefillState.PREFILLING: frozenset({PrefillState.SENDING_KV, PrefillState.AWAITING_DECODE, PrefillState.FAILED}),
    PrefillState.AWAITING_DECODE: frozenset({PrefillState.SENDING_KV, PrefillState.FAILED}),
    PrefillState.SENDING_KV: frozenset({PrefillState.DONE, PrefillState.FAILED}),
    PrefillState.DONE: frozenset(),
    PrefillState.FAILED: frozenset(),
}

DECODE_TRANSITIONS: Mapping[DecodeState, frozenset[DecodeState]] = {
    DecodeState.RESERVING: frozenset({DecodeState.RECEIVING_KV, DecodeState.FAILED}),
    DecodeState.RECEIVING_KV: frozenset({DecodeState.DECODING, DecodeState.FAILED}),
    DecodeState.DECODING: frozenset({DecodeState.DONE, DecodeState.FAILED}),
    DecodeState.DONE: frozenset(),
    DecodeState.FAILED: frozenset(),
}

ENCODE_TRANSITIONS: Mapping[EncodeState, frozenset[EncodeState]] = {
    EncodeState.QUEUED: frozenset({EncodeState.SENDING, EncodeState.FAILED}),
    EncodeState.SENDING: frozenset({EncodeState.DONE, EncodeState.FAILED}),
    EncodeState.DONE: frozenset(),
    EncodeState.FAILED: frozenset(),
}


@dataclasses.dataclass(eq=False, kw_only=True)
class RoleRequest(Generic[State]):
    """What one role knows of one request; each role's subclass adds what it carries."""

    TRANSITIONS: ClassVar[Mapping]
    INITIAL: ClassVar[frozenset]
    """The states a request may enter the role in."""
    FAILED: ClassVar[enum.Enum]
    """Its FAILED state (found in TRANSITIONS)."""

    request_id: str
    room: int
    """The router's room id: the request's transfer rooms in this role (embedding in, KV out)."""
    state: State
    reason: str = ""
    """Why it failed."""
    deadline: float = math.inf
    """``time.monotonic()`` past which the role fails it by itself (the router's deadline)."""
    span: trace.Span = trace.INVALID_SPAN
    """The request's span in this role (a child of the router's, ``mmserve.tracing``): each move is
    an event on it, and ``RequestTable.finish`` ends it. Not recording unless tracing is on."""
    HOPS: ClassVar[Mapping] = {}
    """States that are a hop of their own in the request's trace (a transfer): each gets a child
    span of ``span``, named here, from entering the state to leaving it."""
    _hop: trace.Span | None = dataclasses.field(default=None, repr=False)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        failed = next(s for s in cls.TRANSITIONS if s.name == "FAILED")
        stuck = [s.name for s, to in cls.TRANSITIONS.items() if to and failed not in to]
        if stuck:
            raise TypeError(f"{cls.__name__}: no way to FAILED from {stuck}")
        cls.FAILED = failed

    def __post_init__(self) -> None:
        if self.state not in self.INITIAL:
            raise IllegalTransition(f"request {self.request_id} cannot start {self.state.name}")
        self._trace_hop()

    @property
    def finished(self) -> bool:
        return not self.TRANSITIONS[self.state]

    def move(self, state: State) -> None:
        if state not in self.TRANSITIONS[self.state]:
            error = IllegalTransition(f"request {self.request_id} ({type(self).__name__}): illegal transition "
                                      f"{self.state.name} -> {state.name}")
            log.error("%s", error)
            raise error
        self.state = state
        self.span.add_event(state.value)
        self._trace_hop()

    def hop_carrier(self) -> dict[str, str]:
        """The current hop's span context, for the transfer's own message (the peer links to it)."""
        return span_carrier(self._hop) if self._hop is not None else {}

    def link_hop(self, carrier: Mapping[str, object]) -> None:
        """Links the current hop's span to the peer's side of the transfer (its ``hop_carrier``)."""
        if self._hop is not None:
            link_from(self._hop, carrier)

    def _trace_hop(self) -> None:
        """Ends the span of the hop the request left, starts the one of the hop it entered."""
        if self._hop is not None:
            self._hop.end()
            self._hop = None
        if self.state in self.HOPS and self.span.is_recording():
            self._hop = tracer.start_span(self.HOPS[self.state], context=trace.set_span_in_context(self.span),
                                          attributes={"mmserve.room": str(self.room)})


Record = TypeVar("Record", bound=RoleRequest)


class RequestTable(Generic[Record]):
    """A role's requests by id, each released once by ``release(record, state_it_was_in)``."""

    def __init__(self, release: Callable[[Record, enum.Enum], None]):
        self._release = release
        self._records: dict[str, Record] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._records

    def __iter__(self) -> Iterator[Record]:
        """A snapshot in arrival order: finishing a record while iterating is fine."""
        return iter(list(self._records.values()))

    def __getitem__(self, request_id: str) -> Record:
        return self._records[request_id]

    def get(self, request_id: str) -> Record | None:
        return self._records.get(request_id)

    def in_state(self, *states: enum.Enum) -> list[Record]:
        return [r for r in self._records.values() if r.state in states]

    def counts(self) -> dict[str, int]:
        """Requests held in each state, for health reports."""
        counts: dict[str, int] = {}
        for record in self._records.values():
            counts[record.state.value] = counts.get(record.state.value, 0) + 1
        return counts

    def fail_overdue(self) -> None:
        """Fails every request past its deadline, freeing what it holds."""
        now = time.monotonic()
        for record in [r for r in self._records.values() if r.deadline < now]:
            self.finish(record.request_id, record.FAILED, DEADLINE_PASSED)

    def check_new(self, request_id: str, room: int) -> None:
        """Refuses a request id or room this role already holds (before anything is taken for it)."""
        if request_id in self._records:
            raise ValueError(f"request id {request_id!r} is already in use")
        if any(r.room == room for r in self._records.values()):
            raise ValueError(f"room {room} is already in use")

    def add(self, record: Record) -> Record:
        self.check_new(record.request_id, record.room)
        self._records[record.request_id] = record
        return record

    def finish(self, request_id: str, state: enum.Enum, reason: str = "") -> bool:
        """Ends the request in ``state`` (DONE or FAILED) and frees what it held; False (and
        nothing done) when the role no longer holds it."""
        record = self._records.get(request_id)
        if record is None:
            return False
        if record.TRANSITIONS[state]:
            raise IllegalTransition(f"request {request_id}: {state.name} is not an end")
        was = record.state
        record.move(state)
        record.reason = reason
        del self._records[request_id]
        try:
            self._release(record, was)
        finally:
            if reason:
                record.span.set_status(trace.StatusCode.ERROR, reason)
            record.span.end()
        return True


def close_room(side: Sender | Receiver, room: int, reason: str) -> None:
    """Ends one side's transfer room, telling the peer why if it is still live, and forgets it
    (freeing its blocks). A room the side does not hold (never opened, already taken) is done."""
    try:
        state = side.poll(room)
    except KeyError:
        return
    if not state.terminal:
        side.abort(room, reason[:500] or "aborted")
    side.forget(room)
