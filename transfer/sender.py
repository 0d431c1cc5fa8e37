"""The sending side of a transfer (encode for embeddings, prefill for KV), driven by its role's loop.

The role allocates by the real length and calls ``send`` with the room's rows, either written in
its BlockBuffers at the allocation or as arrays of their own; from then on the sender owns the
allocation and frees it when the room ends, whichever way it ends. Rows given as arrays are
offered as they are when one chunk carries the whole room (the common case: no copy into the
pool and none out of it); a role that reads its rows after the receiver registered gives only
those past the tokens the receiver holds (:meth:`Sender.receiver_holds`). Only a room sent in
several chunks, or whose receiver holds some of the rows given, writes them into the pool first.
The allocation is taken either way: the pool's size stays the bound on the rows a sender holds.
Chunks go out as the receiver's capacity allows: the first fits its default allocation, and
each later one answers a ``Resume``. A receiver that already holds the room's first tokens says
so when it registers (``Register.start_token``), and only the rest is offered. Receivers register rooms (possibly before the role has
added them), pull each offered chunk and acknowledge it; rooms whose receiver goes silent,
aborts or times out fail and free their blocks. A receiver that pulled a room's chunk before
its offer (``Register.posted``) gets that chunk under its uuid, or zero rows of the posted size
when no such chunk will come (the room ended first, or its chunk is another), since a pull
cannot be cancelled.

A room the role has forgotten is remembered as ended for ``waiting_timeout_s``
(:mod:`transfer.ended_rooms`), so a receiver that registers for it late is refused at once with
the reason. A receiver that opened its room with an earlier incarnation of this sender's name
(``Register.incarnation``: the sender died and was restarted since) is refused at once too.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import zmq

from transfer.allocator import Allocation, BlockAllocator
from transfer.block_buffers import BlockBuffers, Chunk
from transfer.bootstrap import RegistryClient
from transfer.channel import Channel, bind_random_port, listening_socket
from transfer.config import TransferConfig
from transfer.data_plane import DataPlane, DataPlaneError, open_data_plane
from transfer.ended_rooms import EndedRooms
from transfer.fields import Field
from transfer.liveness import Liveness
from transfer.messages import (Abort, Codec, Decline, Error, ErrorCode, Heartbeat, HeartbeatAck, PostedPull,
                               ProtocolError, Pulled, Ready, Register, Registered, Resume, SenderEndpoint, ToSender,
                               TransferInfo, TransferMode)
from transfer.poll import SWEEP_INTERVAL_S, PollState, Room

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SenderRoom(Room):
    claimed: bool = False
    """Added by the role; an unclaimed room exists only because a receiver registered early."""
    peer: bytes | None = None
    mode: TransferMode | None = None
    capacity: int = 0
    """Tokens the receiver can take in the next chunk."""
    allocation: Allocation | None = None
    rows: Mapping[str, jax.Array] | None = None
    """The room's rows as the role gave them, from token ``rows_start`` on (not written into the
    pool at ``allocation`` yet)."""
    rows_start: int = 0
    held: int | None = None
    """Tokens the receiver said it holds when it registered (None until it registers)."""
    info: TransferInfo | None = None
    sent_tokens: int = 0
    """Tokens the receiver holds: those it registered as held (``Register.start_token``), then
    those it acknowledged."""
    outstanding: tuple[int, Chunk] | None = None
    """The offered chunk (uuid, chunk) the receiver has not acknowledged yet."""
    posted: PostedPull | None = None
    """The receiver's pull made before the offer (``Register.posted``), until an offer answers it."""


class Sender:
    def __init__(self, config: TransferConfig, fields: Sequence[Field], name: str, bootstrap_address: str,
                 data_plane: DataPlane | None = None, device: jax.Device | None = None) -> None:
        self.config = config
        self.allocator = BlockAllocator(config.buffer_blocks, config.block_size)
        self.buffers = BlockBuffers(fields, config.buffer_blocks, config.block_size, device)
        self._owns_plane = data_plane is None
        self.data_plane = data_plane or open_data_plane(config, self.buffers.device)
        socket = listening_socket(zmq.ROUTER, config.max_message_bytes, config.control_keys)
        control = bind_random_port(socket, config.bind_host, config.advertise_host)
        self._channel: Channel[ToSender] = Channel(socket, Codec(ToSender, config.max_message_bytes))
        self.incarnation = 1 + secrets.randbits(62)
        """Tells this sender from others published under ``name`` before or after it."""
        self.endpoint = SenderEndpoint(name, control, self.data_plane.kind, self.data_plane.address, self.incarnation)
        self._registry = RegistryClient(bootstrap_address, config)
        self._registry.publish(self.endpoint, time.monotonic())
        self._rooms: dict[int, SenderRoom] = {}
        self.staged_rooms = 0
        """Rooms given as rows that had to be written into the pool (sent in several chunks, or
        from tokens before those their receiver holds)."""
        self._ended = EndedRooms(config.waiting_timeout_s)
        self._liveness = Liveness(config.heartbeat_timeout_s)
        self._next_sweep = 0.0
        self._poller = zmq.Poller()
        for s in (socket, self._registry.channel.socket, *self.data_plane.offer_sockets()):
            self._poller.register(s, zmq.POLLIN)

    def add(self, room: int) -> None:
        """Announces a room the role will send; it bootstraps until its receiver registers. A room
        whose receiver registered and then ended it before the role added it is FAILED, with the
        reason: a fresh room would hold the blocks sent into it until the bootstrap timeout."""
        ended = self._ended.pop(room)
        state = self._rooms.get(room)
        if state is None:
            state = self._rooms[room] = SenderRoom(room, self.config)
            if ended is not None and not ended.claimed:
                state.move(PollState.FAILED)
                state.reason = ended.ending
        state.claimed = True

    def poll(self, room: int) -> PollState:
        return self._rooms[room].state

    def failure(self, room: int) -> str:
        return self._rooms[room].reason

    def sent_tokens(self, room: int) -> int:
        """Tokens the receiver holds: registered as held, then acknowledged."""
        return self._rooms[room].sent_tokens

    def receiver_holds(self, room: int) -> int | None:
        """Tokens the room's receiver said it holds when it registered (they are not sent); None
        while it has not registered. A role that reads its rows after this knows which to read."""
        state = self._rooms.get(room)
        return None if state is None else state.held

    def send(self, room: int, allocation: Allocation, info: TransferInfo,
             rows: Mapping[str, jax.Array] | None = None, rows_start: int = 0) -> PollState:
        """Hands the room's data to the transfer: written in ``buffers`` at ``allocation``, or
        ``rows``: tokens ``[rows_start, total)`` of every field, ``buffers.bucket(total -
        rows_start)`` rows, zero past the total, offered as they are when one chunk carries them
        and written at ``allocation`` only if the sender must send them in several. Tokens before
        ``rows_start`` are those the receiver holds (:meth:`receiver_holds`): a receiver that
        registers holding fewer fails the room.

        The allocation belongs to the sender once the arguments are checked (a ValueError
        leaves it the caller's), even if the room already failed: a room whose rows cannot be
        staged or offered fails, and its blocks are freed with it, without raising here.
        """
        if info.total_tokens != allocation.num_tokens:
            raise ValueError(f"info says {info.total_tokens} tokens, allocation holds {allocation.num_tokens}")
        if rows is not None:
            if not 0 <= rows_start < info.total_tokens:
                raise ValueError(f"rows from token {rows_start} of a room of {info.total_tokens}")
            self.buffers.check_rows(rows, self.buffers.bucket(info.total_tokens - rows_start))
        self.add(room)
        state = self._rooms[room]
        if state.info is not None:
            raise ValueError(f"room {room} already has its data")
        if state.state.terminal:
            self.allocator.free(allocation)
            return state.state
        state.allocation, state.info, state.rows_start = allocation, info, rows_start
        if rows is not None:
            try:  # a copy onto the buffers' devices, which can run out of memory
                state.rows = {name: jax.device_put(a, self.buffers.sharding) for name, a in rows.items()}
            except Exception as error:  # the room fails; the sender and its other rooms go on
                self._fail(state, f"could not place rows: {error}")
                return state.state
        if state.peer is not None:
            self._start(state)
        return state.state

    def abort(self, room: int, reason: str = "aborted by sender") -> None:
        self._fail(self._rooms[room], reason)

    def forget(self, room: int) -> None:
        """Drops a finished room's record, remembering how it ended; abort a live room first."""
        state = self._rooms[room]
        if not state.state.terminal:
            raise ValueError(f"room {room} is still {state.state.name}")
        del self._rooms[room]
        self._remember_ended(state)

    def _remember_ended(self, state: SenderRoom) -> None:
        ending = state.state.value + (f": {state.reason}" if state.reason else "")
        self._ended.remember(state.room, ending, state.claimed, time.monotonic())

    def progress(self, timeout_s: float = 0.0) -> None:
        """Answers the control socket, serves the data plane and enforces every deadline."""
        if self._poller.poll(int(timeout_s * 1000)):
            for identity, message in self._channel.receive():
                try:
                    reply = self._handle(identity, message)
                except ProtocolError as error:
                    reply = error.reply()
                if reply is not None:
                    self._channel.send(reply, identity)
            self._registry.replies()
        self.data_plane.serve_offers()
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL_S
        self._registry.publish(self.endpoint, now)
        self._ended.expire(now)
        for room in [r for r in self._rooms.values() if r.expired(now)]:
            self._fail(room, f"timed out while {room.state.value}")
        live_peers = {r.peer for r in self._rooms.values() if r.peer is not None and not r.state.terminal}
        for peer in self._liveness.dead(live_peers, now):
            for room in [r for r in self._rooms.values() if r.peer == peer and not r.state.terminal]:
                self._fail(room, "receiver stopped answering heartbeats")

    def programs(self, max_tokens: int, source_rows: Sequence[int] = ()) -> list[Callable[[], None]]:
        """The pool's programs a sender runs (:meth:`BlockBuffers.programs`): the writes of the
        role's rows, and one read per chunk, of one run."""
        return self.buffers.programs(max_tokens, source_rows)

    def sockets(self) -> list[zmq.Socket]:
        """What ``progress`` reads. A caller that waits on several senders and receivers at once
        polls these with its own poller, then calls ``progress(0)`` on each."""
        return [socket for socket, _ in self._poller.sockets]

    def close(self) -> None:
        for room in list(self._rooms.values()):
            self._fail(room, "sender closed")
        self._registry.withdraw(self.endpoint.name)
        self._registry.close()
        self._channel.close()
        if self._owns_plane:
            self.data_plane.close()

    def _handle(self, identity: bytes, message: ToSender | ProtocolError) -> object:
        if isinstance(message, ProtocolError):
            raise message
        self._liveness.heard(identity, time.monotonic())
        if isinstance(message, Register):
            return self._on_register(identity, message)
        if isinstance(message, Heartbeat):
            if not any(r.peer == identity for r in self._rooms.values()):
                raise ProtocolError(ErrorCode.UNAUTHENTICATED, "heartbeat before any registration")
            return HeartbeatAck(message.seq)
        if isinstance(message, Decline):
            return self._on_decline(identity, message)
        room = self._rooms.get(message.room) if message.room is not None else None
        if isinstance(message, Error):
            if room is not None and room.peer == identity:
                self._fail(room, f"receiver rejected {message.code.value}: {message.detail}", notify=False)
            return None
        if room is None or room.peer != identity:
            raise ProtocolError(ErrorCode.UNKNOWN_ROOM, f"room {message.room} is not registered by you", message.room)
        if isinstance(message, Abort):
            if room.state.terminal:
                raise ProtocolError(ErrorCode.OUT_OF_ORDER, f"room already {room.state.value}", room.room)
            self._fail(room, f"receiver aborted: {message.reason}", notify=False)
        elif isinstance(message, Pulled):
            self._on_pulled(room, message)
        else:
            self._on_resume(room, message)
        return None

    def _on_register(self, identity: bytes, message: Register) -> None:
        if message.block_size != self.config.block_size or tuple(message.fields) != self.buffers.fields:
            raise ProtocolError(ErrorCode.MISMATCH, f"sender has block_size {self.config.block_size} and "
                                f"fields {self.buffers.fields}", message.room)
        pool_tokens = self.buffers.num_blocks * self.config.block_size
        if message.posted is not None and self.buffers.bucket(message.posted.num_tokens) > pool_tokens:
            # answered with zero rows of that size if no chunk matches: no more than the pool holds
            raise ProtocolError(ErrorCode.MISMATCH, f"a pull posted for {message.posted.num_tokens} tokens, more than "
                                f"the sender's pool of {pool_tokens} ever sends in one chunk", message.room)
        if message.incarnation is not None and message.incarnation != self.incarnation:
            raise ProtocolError(ErrorCode.UNKNOWN_ROOM, f"room {message.room} was opened with another incarnation "
                                f"of sender {self.endpoint.name} (it restarted since)", message.room)
        ended = self._ended.get(message.room)
        if ended is not None:
            raise ProtocolError(ErrorCode.OUT_OF_ORDER, f"room {message.room} already ended ({ended.ending})",
                                message.room)
        room = self._rooms.get(message.room)
        if room is not None and (room.peer is not None or room.state.terminal):
            raise ProtocolError(ErrorCode.OUT_OF_ORDER, f"room {message.room} is already "
                                f"{'registered' if room.peer is not None else room.state.value}", message.room)
        if room is not None and room.info is not None and room.info.mode is not message.mode:
            raise ProtocolError(ErrorCode.MISMATCH, f"room carries {room.info.mode.value}", message.room)
        room = self._rooms.setdefault(message.room, SenderRoom(message.room, self.config))
        room.peer, room.mode, room.capacity = identity, message.mode, message.capacity_tokens
        room.sent_tokens = room.held = message.start_token
        room.posted = message.posted
        self._channel.send(Registered(message.room), identity)
        if room.allocation is not None:
            self._start(room)
        else:
            room.move(PollState.WAITING_FOR_INPUT)

    def _on_decline(self, identity: bytes, message: Decline) -> None:
        """Ends a room no receiver will take; one the role has not added yet is remembered as
        ended (``_fail``), so its ``add`` gives FAILED. A room that ended already holds nothing."""
        if self._ended.get(message.room) is not None:
            return
        room = self._rooms.get(message.room)
        if room is not None and room.peer not in (None, identity):
            raise ProtocolError(ErrorCode.UNKNOWN_ROOM, f"room {message.room} is registered by another receiver",
                                message.room)
        if room is None:
            room = self._rooms[message.room] = SenderRoom(message.room, self.config)
        self._fail(room, f"receiver declined: {message.reason}", notify=False)

    def _on_pulled(self, room: SenderRoom, message: Pulled) -> None:
        if room.state is not PollState.TRANSFERRING or room.outstanding is None or room.outstanding[0] != message.uuid:
            raise ProtocolError(ErrorCode.OUT_OF_ORDER, f"no chunk {message.uuid} outstanding", room.room)
        room.sent_tokens += room.outstanding[1].num_tokens
        room.outstanding = None
        if room.sent_tokens == room.info.total_tokens:
            self._release(room)
            room.move(PollState.SUCCESS)
        else:
            room.touch()

    def _on_resume(self, room: SenderRoom, message: Resume) -> None:
        if (room.state is not PollState.TRANSFERRING or room.outstanding is not None
                or message.from_token != room.sent_tokens):
            raise ProtocolError(ErrorCode.OUT_OF_ORDER, f"cannot resume from {message.from_token}: "
                                f"{room.state.value}, {room.sent_tokens} sent", room.room)
        room.capacity = message.capacity_tokens
        self._offer_next_chunk(room)

    def _start(self, room: SenderRoom) -> None:
        if room.mode is not room.info.mode:
            self._fail(room, f"receiver expects {room.mode.value}, sender has {room.info.mode.value}")
            return
        if room.sent_tokens >= room.info.total_tokens:
            self._fail(room, f"the receiver holds {room.sent_tokens} tokens of a room of {room.info.total_tokens}: "
                       "nothing to send")
            return
        if room.rows is not None and room.sent_tokens < room.rows_start:
            self._fail(room, f"the receiver holds {room.sent_tokens} tokens, the sender has rows from "
                       f"{room.rows_start} on")
            return
        room.move(PollState.TRANSFERRING)
        self._offer_next_chunk(room)

    def _offer_next_chunk(self, room: SenderRoom) -> None:
        chunk = self.buffers.chunk(room.allocation, room.sent_tokens, room.capacity)
        if room.rows is not None and chunk.offset == room.rows_start and chunk.offset + chunk.num_tokens == \
                room.info.total_tokens:
            rows = room.rows
        else:
            try:
                self._stage(room)
                rows = self.buffers.read(room.allocation, chunk.offset, chunk.num_tokens)
            except Exception as error:  # the room fails; the sender and its other rooms go on
                self._fail(room, f"could not stage rows: {error}")
                return
        posted, room.posted = room.posted, None
        if posted is not None and (chunk.offset, chunk.num_tokens) == (room.held, posted.num_tokens):
            uuid = posted.uuid
        else:
            uuid = secrets.randbits(63)
            if posted is not None:
                self._answer_with_zeros(posted)
        try:
            self.data_plane.offer(uuid, [rows[f.name] for f in self.buffers.fields], self._offer_timeout_s)
        except DataPlaneError as error:
            if posted is not None and uuid == posted.uuid:
                room.posted = posted  # its pull still waits: _fail answers it with zeros
            self._fail(room, str(error))
            return
        room.outstanding = (uuid, chunk)
        room.touch()
        self._channel.send(Ready(room.room, uuid, chunk, room.info), room.peer)

    @property
    def _offer_timeout_s(self) -> float:
        return self.config.transfer_timeout_s + self.config.heartbeat_timeout_s

    def _answer_with_zeros(self, posted: PostedPull) -> None:
        """Offers zero rows under a pull the receiver posted that no chunk will answer (the room
        ended first, or its first chunk is not the one posted), so that the pull ends: its
        receiver drops what lands, and the offer expires if nobody pulls it. Never raises: it runs
        while a room fails, and a failure that stopped halfway would leave the room live, failing
        again at every sweep (the receiver's own timeout ends its pull)."""
        try:
            zeros = self.buffers.zeros(posted.num_tokens)
            self.data_plane.offer(posted.uuid, [zeros[f.name] for f in self.buffers.fields], self._offer_timeout_s)
        except Exception as error:  # noqa: BLE001 - device memory short, a plane error: the room still ends
            log.warning("could not answer a posted pull: %s", error)

    def _stage(self, room: SenderRoom) -> None:
        """Writes rows given as arrays into the pool, for a room sent in chunks."""
        if room.rows is not None:
            rows, room.rows = room.rows, None
            self.staged_rooms += 1
            self.buffers.write(room.allocation, room.rows_start, rows, num_tokens=room.info.total_tokens - room.rows_start)

    def _release(self, room: SenderRoom) -> None:
        room.rows = None
        if room.allocation is not None:
            self.allocator.free(room.allocation)
            room.allocation = None

    def _fail(self, room: SenderRoom, reason: str, notify: bool = True) -> None:
        """Ends a live room: frees its blocks, tells the receiver (unless it told us), records why."""
        if room.state.terminal:
            return
        self._release(room)
        if room.posted is not None:
            self._answer_with_zeros(room.posted)
            room.posted = None
        room.move(PollState.FAILED)
        room.reason = reason
        log.info("room %d failed: %s", room.room, reason)
        if notify and room.peer is not None:
            self._channel.send(Abort(room.room, reason[:500]), room.peer)
        if not room.claimed:  # no role holds it to forget it: remembered for the role's add
            del self._rooms[room.room]
            self._remember_ended(room)
