"""The receiving side of a transfer (prefill for embeddings, decode for KV), driven by its role's loop.

It does not know how long a room is: it looks the sender up in the registry and registers a
default capacity (the most the first chunk may carry). The first chunk's Ready tells the total:
only then does the receiver reserve, the whole rest of the room at once, and while its pool
cannot give that, the room waits, holding nothing. It pulls the first chunk into that
reservation and resumes from the tokens it holds for the rest, so nothing is sent twice.
(Reserving a default at registration and the rest piece by piece, rooms each holding a part
waited on one another: twelve rooms registered with a busy sender held their defaults while
the one room offered could not reserve its rest, until their timeouts failed them all.) Every
chunk is kept as pulled, never copied: the reservations bound what the receiver holds (it has no pool of its own), ``landed`` shows the chunks of
a live room (prefill starts on the first), and ``take`` returns them all. A room whose first
tokens the receiver holds already (decode's own prefix cache) starts past them. ``take`` frees
the room's blocks.

The role often knows a room's length though (``add(..., expected_tokens=)``): then, where the
rest fits the first chunk, the receiver pulls it as soon as the sender has the registration,
before it is offered (``PostedPull``; docs/transfer.md "Pulls posted before the offer"), and the
chunk lands as soon as the sender offers it. Such a pull is not reserved in the pool (that is
what made rooms wait on one another above) but kept within its own small limits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import zmq

from transfer.allocator import BlockAllocator
from transfer.block_buffers import BlockLayout
from transfer.config import TransferConfig
from transfer.data_plane import DataPlane, DataPlaneError, PendingPull, open_data_plane
from transfer.directory import SenderDirectory
from transfer.fields import Field
from transfer.messages import (Abort, Decline, Error, ErrorCode, Heartbeat, HeartbeatAck, ProtocolError, Pulled,
                               Ready, Register, Registered, Resume, ToReceiver, TransferInfo, TransferMode)
from transfer.poll import SWEEP_INTERVAL_S, PollState
from transfer.posted_pulls import PostedPulls
from transfer.receiver_room import Landed, Received, ReceiverRoom, Reservation
from transfer.sender_links import SenderLinks


class Receiver:
    def __init__(self, config: TransferConfig, fields: Sequence[Field], data_plane: DataPlane | None = None,
                 device: jax.Device | None = None) -> None:
        self.config = config
        self.allocator = BlockAllocator(config.buffer_blocks, config.block_size)
        self.layout = BlockLayout(fields, config.buffer_blocks, config.block_size, device)
        self._owns_plane = data_plane is None
        self.data_plane = data_plane or open_data_plane(config, self.layout.device)
        self._rooms: dict[int, ReceiverRoom] = {}
        self._poller = zmq.Poller()
        """The receiver's own sockets (control channels, the registry); the data plane's come and
        go with its peers, so :meth:`sockets` asks it each time."""
        self._directory = SenderDirectory(config, self._poller)
        self._links = SenderLinks(config, self._poller, self.data_plane)
        self._next_heartbeat = 0.0
        self._next_sweep = 0.0
        self._orphans: list[PendingPull] = []
        """Pulls whose rows nobody will take (their room ended, or its chunk came another way),
        kept until they land: each holds its destination arrays and a landing watcher."""
        self.posting = PostedPulls(config, self.layout, self.data_plane)
        self._deferred: dict[int, Ready] = {}
        """Rooms whose first chunk (its Ready) waits until the pool can reserve the whole room, in
        the order they began to wait: they reserve in that order, and a room whose first chunk
        arrives while any waits waits behind it, so a large room is not passed forever by smaller
        ones."""

    def add(self, room: int, bootstrap_address: str, sender: str,
            mode: TransferMode = TransferMode.EMBEDDING, incarnation: int | None = None, start_token: int = 0,
            expected_tokens: int | None = None) -> None:
        """Starts receiving ``room`` from the sender published as ``sender`` in that registry.

        ``incarnation``: the one of that sender the room was opened with (its
        ``Sender.incarnation``), when known; if the sender restarted since, the room fails at once.
        ``start_token``: the room's first tokens are held here already, so only the rest is sent;
        a room of no more tokens than that fails (the sender has nothing to offer).
        ``expected_tokens``: the room's length, when the receiver knows it (prefill knows its
        prompt's picture rows, decode its prompt's length): where the rest fits one chunk, its pull
        is made as soon as the sender has the registration, before the sender offers it, so the
        chunk lands as soon as it is offered (:class:`PostedPull`). A wrong length costs only that.
        """
        if room in self._rooms:
            raise ValueError(f"room {room} already added")
        if start_token < 0:
            raise ValueError(f"start_token must be >= 0, got {start_token}")
        self._directory.watch(bootstrap_address)
        self._rooms[room] = ReceiverRoom(room, self.config, sender=(bootstrap_address, sender), mode=mode,
                                         incarnation=incarnation, held=start_token, expected=expected_tokens)
        self._advance(self._rooms[room], time.monotonic())

    def decline(self, room: int, bootstrap_address: str, sender: str, incarnation: int | None = None,
                reason: str = "") -> None:
        """Tells the sender published as ``sender`` that this receiver will never take ``room``,
        which it never added (decode drops a request still waiting for pages: without a word, the
        sender would hold the room's rows until its bootstrap timeout). The sender is looked up
        as for ``add``; the room is dropped once told, or once the sender proves gone or the
        bootstrap timeout passes: nothing to poll or forget."""
        if room in self._rooms:
            raise ValueError(f"room {room} already added")
        self._directory.watch(bootstrap_address)
        self._rooms[room] = ReceiverRoom(room, self.config, sender=(bootstrap_address, sender),
                                         incarnation=incarnation, declined=reason[:500] or "declined")
        self._advance(self._rooms[room], time.monotonic())

    def poll(self, room: int) -> PollState:
        return self._rooms[room].state

    def failure(self, room: int) -> str:
        return self._rooms[room].reason

    def received_tokens(self, room: int) -> int:
        return self._rooms[room].received

    def landed(self, room: int) -> tuple[TransferInfo | None, tuple[Landed, ...]]:
        """What a room (live or finished) has brought so far: its TransferInfo (None before its
        first chunk) and its chunks in order. They stay valid after the room ends."""
        state = self._rooms[room]
        return state.info, tuple(state.landed)

    def take(self, room: int) -> Received:
        """The data of a successful room; frees its blocks and forgets it."""
        state = self._rooms[room]
        if state.state is not PollState.SUCCESS:
            raise ValueError(f"room {room} is {state.state.value}, not success")
        received = Received(state.info, tuple(state.landed), state.held)
        self.forget(room)
        return received

    def abort(self, room: int, reason: str = "aborted by receiver") -> None:
        self._fail(self._rooms[room], reason)

    def forget(self, room: int) -> None:
        """Drops a finished room, freeing blocks a successful room still holds; abort a live room first."""
        state = self._rooms[room]
        if not state.state.terminal:
            raise ValueError(f"room {room} is still {state.state.value}")
        self._release(state)
        del self._rooms[room]

    def progress(self, timeout_s: float = 0.0) -> None:
        """Reads every socket, completes pulls, allocates for resumes and enforces every deadline;
        first waits up to ``timeout_s`` for any of :meth:`sockets` (a landed pull included)."""
        if timeout_s > 0:
            poller = zmq.Poller()
            for socket in self.sockets():
                poller.register(socket, zmq.POLLIN)
            poller.poll(int(timeout_s * 1000))
        now = time.monotonic()
        self._directory.collect()
        for address, channel, message in self._links.receive(now):
            try:
                self._handle(address, message)
            except ProtocolError as error:
                channel.send(error.reply())
        self.data_plane.collect_pulls()
        self._orphans = [p for p in self._orphans if not p.done()]
        self._reserve_deferred()
        for room in [r for r in self._rooms.values() if not r.state.terminal]:
            self._advance(room, now)
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL_S
            self._heartbeat(now)
            self._directory.prune(now)
            for room in [r for r in self._rooms.values() if r.expired(now)]:
                self._fail(room, f"timed out while {room.state.value}")

    def unanswered_pulls(self) -> int:
        """Pulls made and not landed (or failed) yet: rooms', posted ones and those of rooms that
        ended meanwhile. Each holds its destination arrays (and a landing watcher) until then."""
        pulls = self._orphans + [r.posted_pull for r in self._rooms.values() if r.posted_pull is not None] + [
            r.pull[0] for r in self._rooms.values() if r.pull is not None]
        return sum(not p.done() for p in pulls)

    def sockets(self) -> list[zmq.Socket | int]:
        """What ``progress`` reads, a pull's landing included (the data plane makes a socket or
        a descriptor readable). A caller that waits on several senders and receivers at once
        polls these with its own poller, then calls ``progress(0)`` on each."""
        return [socket for socket, _ in self._poller.sockets] + list(self.data_plane.pull_sockets())

    def close(self) -> None:
        for room in list(self._rooms.values()):
            self._fail(room, "receiver closed")
            self._release(room)
        self._links.close()
        self._directory.close()
        if self._owns_plane:
            self.data_plane.close()

    def _handle(self, address: str, message: ToReceiver | ProtocolError) -> None:
        if isinstance(message, ProtocolError):
            raise message
        if isinstance(message, HeartbeatAck):
            return
        room = self._rooms.get(message.room) if message.room is not None else None
        mine = room is not None and room.endpoint is not None and room.endpoint.control == address
        if isinstance(message, Error):
            if mine:
                self._fail(room, f"sender rejected {message.code.value}: {message.detail}", notify=False)
            return
        if not mine:
            raise ProtocolError(ErrorCode.UNKNOWN_ROOM, f"room {message.room} is not registered with you", message.room)
        if isinstance(message, Abort):
            if room.state.terminal:
                raise ProtocolError(ErrorCode.OUT_OF_ORDER, f"room already {room.state.value}", room.room)
            self._fail(room, f"sender aborted: {message.reason}", notify=False)
        elif isinstance(message, Registered):
            if room.state is not PollState.BOOTSTRAPPING:
                raise ProtocolError(ErrorCode.OUT_OF_ORDER, f"room is {room.state.value}", room.room)
            room.move(PollState.WAITING_FOR_INPUT)
            if room.posting:
                self.posting.make(room)
        else:
            self._on_ready(room, message)

    def _on_ready(self, room: ReceiverRoom, ready: Ready) -> None:
        expecting = room.state is PollState.WAITING_FOR_INPUT or (
            room.state is PollState.TRANSFERRING and room.pull is None)
        if not expecting or ready.chunk.offset != room.received:
            raise ProtocolError(ErrorCode.OUT_OF_ORDER, f"no chunk at {ready.chunk.offset} expected: "
                                f"{room.state.value}, {room.received} received", room.room)
        if ready.info.mode is not room.mode or (room.info is not None and ready.info != room.info):
            raise ProtocolError(ErrorCode.MISMATCH, "chunk describes another transfer", room.room)
        chunk = ready.chunk
        if room.posted is not None and ready.uuid == room.posted.uuid:
            if (chunk.offset, chunk.num_tokens) != (room.held, room.posted.num_tokens) or room.info is not None:
                raise ProtocolError(ErrorCode.MISMATCH, f"{chunk} offered under the pull posted for "
                                    f"{room.posted.num_tokens} tokens from {room.held}", room.room)
        elif room.posting:  # the sender answers the posted pull with zeros
            self._end_posting(room)
        promised = room.reservation.free if room.info is not None else self.config.default_tokens  # Resume, Register
        if chunk.num_tokens > promised or chunk.padded_tokens != self.layout.bucket(chunk.num_tokens):
            raise ProtocolError(ErrorCode.MISMATCH, f"{chunk} does not fit {promised} free tokens "
                                f"in buckets of block size {self.config.block_size}", room.room)
        if not self.allocator.can_ever_hold(ready.info.total_tokens - room.held):
            self._fail(room, f"{ready.info.total_tokens - room.held} tokens exceed the whole pool")
            return
        if room.info is None and (self._deferred or not self._reserve_whole(room, ready.info.total_tokens - room.held)):
            self._deferred[room.room] = ready
            room.touch()
            return
        self._pull(room, ready)

    def _reserve_whole(self, room: ReceiverRoom, tokens: int) -> bool:
        """Before a room's first pull: reserves all its ``tokens``; False while the pool cannot."""
        allocation = self.allocator.alloc(tokens)
        if allocation is None:
            return False
        room.reservation = Reservation(allocation)
        return True

    def _reserve_deferred(self) -> None:
        for number, ready in list(self._deferred.items()):
            room = self._rooms[number]  # a room leaves this queue before it can be forgotten (_fail)
            if not self._reserve_whole(room, ready.info.total_tokens - room.held):
                return
            del self._deferred[number]
            self._pull(room, ready)

    def _pull(self, room: ReceiverRoom, ready: Ready) -> None:
        chunk = ready.chunk
        pending = self.posting.end(room)
        self.posting.taken += pending is not None
        try:
            pending = pending or self.data_plane.pull(room.endpoint.data_address, ready.uuid,
                                                      self.layout.specs(chunk.padded_tokens))
        except DataPlaneError as error:
            self._fail(room, str(error))
            return
        room.info, room.pull = ready.info, (pending, ready)
        if room.state is PollState.WAITING_FOR_INPUT:
            room.move(PollState.TRANSFERRING)
        else:
            room.touch()

    def _advance(self, room: ReceiverRoom, now: float) -> None:
        if room.state is PollState.BOOTSTRAPPING and room.endpoint is None:
            self._bootstrap(room, now)
        elif room.pull is not None and room.pull[0].done():
            self._land(room)

    def _bootstrap(self, room: ReceiverRoom, now: float) -> None:
        if self._directory.gone(room.sender, room.incarnation):
            # The sender may only have missed its lease and published since: ask once, and fail
            # on an answer newer than the question.
            if room.asked_at is None:
                room.asked_at = self._directory.answers(room.sender)
                self._directory.forget(room.sender)
            elif self._directory.answers(room.sender) > room.asked_at:
                self._fail(room, f"sender {room.sender[1]} is gone: the registry stopped naming the incarnation "
                           "this room was opened with (it died or restarted)", notify=False)
                return
        error = self._directory.error(room.sender)
        if error is not None:
            self._fail(room, error)
            return
        endpoint = self._directory.find(room.sender, now)
        if endpoint is None:
            return
        if endpoint.data_plane != self.data_plane.kind:
            self._fail(room, f"sender uses the {endpoint.data_plane} data plane, we use {self.data_plane.kind}")
            return
        if room.incarnation not in (None, endpoint.incarnation) and not room.looked_again:
            # A cached answer may name the sender before the one the room was opened with: ask
            # once more. Whatever the registry says then, the sender itself judges the room.
            room.looked_again = True
            self._directory.forget(room.sender)
            return
        try:
            channel = self._links.to(endpoint.control, endpoint.data_address)
        except zmq.ZMQError as error:  # the registry checks the address's form; this is what is left
            self._fail(room, f"cannot connect to sender {room.sender[1]} at {endpoint.control}: {error}")
            return
        room.endpoint = endpoint
        if room.declined is not None:
            channel.send(Decline(room.room, room.declined))
            self._fail(room, room.declined, notify=False)
            return
        room.posted = self.posting.register(room)
        channel.send(Register(
            room.room, room.mode, self.config.block_size, self.layout.fields,
            self.config.default_tokens, room.incarnation, room.held, room.posted))

    def _end_posting(self, room: ReceiverRoom) -> None:
        """Ends a room's posted pull, from which no chunk will be taken: kept until its zero rows land."""
        pending = self.posting.end(room)
        if pending is not None:
            self._orphans.append(pending)

    def _land(self, room: ReceiverRoom) -> None:
        """Keeps a completed pull as it is, counts it against the reservation, and acknowledges it."""
        pending, ready = room.pull
        room.pull = None
        try:
            arrays = pending.result()
        except DataPlaneError as error:
            self._fail(room, str(error))
            return
        count = ready.chunk.num_tokens
        rows = dict(zip((f.name for f in self.layout.fields), arrays, strict=True))
        room.landed.append(Landed(rows, ready.chunk.offset, count))
        room.reservation.filled += count
        self._links.to(room.endpoint.control).send(Pulled(room.room, ready.uuid))
        if room.received == room.info.total_tokens:
            room.move(PollState.SUCCESS)
        else:  # the rest is reserved already (on the first chunk): resume from what is held
            room.touch()
            self._links.to(room.endpoint.control).send(Resume(room.room, room.received, room.reservation.free))

    def _heartbeat(self, now: float) -> None:
        needed = {r.endpoint.control for r in self._rooms.values() if r.endpoint is not None and not r.state.terminal}
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.heartbeat_interval_s
            for address in needed:
                self._links.to(address).send(Heartbeat(int(now * 1000)))
        for address in self._links.dead(needed, now):
            for room in [r for r in self._rooms.values() if r.endpoint is not None
                         and r.endpoint.control == address and not r.state.terminal]:
                self._directory.forget(room.sender)
                self.data_plane.forget_peer(room.endpoint.data_address)
                self._fail(room, "sender stopped answering heartbeats", notify=False)
        live_data = {r.endpoint.data_address for r in self._rooms.values()
                     if r.endpoint is not None and not r.state.terminal}
        self._links.close_idle(needed, live_data, now)

    def _release(self, room: ReceiverRoom) -> None:
        room.landed = []
        if room.reservation is not None:
            self.allocator.free(room.reservation.allocation)
            room.reservation = None

    def _fail(self, room: ReceiverRoom, reason: str, notify: bool = True) -> None:
        """Ends a live room: frees its blocks, tells the sender (unless it told us), records why."""
        if room.state.terminal:
            return
        if room.pull is not None:
            self._orphans.append(room.pull[0])
            room.pull = None
        self._end_posting(room)
        self._release(room)
        self._deferred.pop(room.room, None)
        room.move(PollState.FAILED)
        room.reason = reason
        if notify and room.endpoint is not None:
            self._links.to(room.endpoint.control).send(Abort(room.room, reason[:500]))
        if room.declined is not None:  # nobody polls or forgets it
            del self._rooms[room.room]
