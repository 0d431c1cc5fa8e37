"""A ZMQ socket that speaks typed messages: size-capped, authenticated, validated, never blocking.

ROUTER sockets (sender control, registry) see ``[identity, payload]``; DEALER sockets
(receivers, registry clients) see ``[payload]``. With keys (``TransferConfig.control_keys``, from
the deployment's secret) the sockets are CurveZMQ: a listening socket admits only peers holding
the client key, refused at the handshake before anything of theirs is read, and a connecting
socket talks only to a listener holding the server key; the traffic is encrypted. Without keys (a
library user who wants none) they are plain ZMQ. Anything that is not one payload frame, or a
payload that fails the codec, comes out of ``receive`` as a ``ProtocolError`` for the owner to
answer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Generic

import msgspec
import zmq

from transfer.curve import CurveKeys, admit_only_the_client, curve_client, curve_server
from transfer.messages import M, Codec, ErrorCode, ProtocolError

CLOSE_LINGER_MS = 100
HARD_LIMIT_FACTOR = 16
"""ZMQ drops a peer that sends a frame over this many times the cap, so nothing unbounded is buffered."""
RECEIVE_QUEUE = 256
"""Messages ZMQ queues from one peer before it drops more (its default, 1,000, times the frame
limit let one connection hold gigabytes): control traffic is a few messages per room, read every
loop turn."""
RECEIVE_BATCH = 256
"""The most messages one ``receive`` takes: a peer flooding the socket cannot keep its owner's
loop (and the heartbeats and deadlines it runs) from going on."""


_listening_contexts: dict[CurveKeys, tuple[zmq.Context, object]] = {}
"""Per key set: the context its listening sockets live in, and that context's ZAP handler (kept
here: without a handler libzmq admits any client that knows the server's public key)."""
_contexts_lock = threading.Lock()


def _listening_context(keys: CurveKeys) -> zmq.Context:
    """A context whose ZAP handler admits ``keys``' client key only, one per key set, for the
    process's life (a handler answers for every socket of its context)."""
    with _contexts_lock:
        if keys not in _listening_contexts:
            context = zmq.Context()
            _listening_contexts[keys] = (context, admit_only_the_client(context, keys))
        return _listening_contexts[keys][0]


def listening_socket(kind: int, max_bytes: int, keys: CurveKeys | None) -> zmq.Socket:
    """A socket to bind: with ``keys``, a CurveZMQ server admitting only their client key."""
    if keys is None:
        return _capped(zmq.Context.instance().socket(kind), max_bytes)
    return curve_server(_capped(_listening_context(keys).socket(kind), max_bytes), keys)


def connecting_socket(kind: int, max_bytes: int, keys: CurveKeys | None) -> zmq.Socket:
    """A socket to connect: with ``keys``, a CurveZMQ client that talks only to their server."""
    socket = _capped(zmq.Context.instance().socket(kind), max_bytes)
    return socket if keys is None else curve_client(socket, keys)


def _capped(socket: zmq.Socket, max_bytes: int) -> zmq.Socket:
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, max_bytes * HARD_LIMIT_FACTOR)
    socket.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
    return socket


def bind_random_port(socket: zmq.Socket, host: str, advertise_host: str = "") -> str:
    """Binds ``host`` on a free port; returns the endpoint peers dial (``advertise_host`` when given)."""
    socket.bind(f"tcp://{host}:*")
    endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
    if not advertise_host:
        return endpoint
    return f"tcp://{advertise_host}:{endpoint.rsplit(':', 1)[1]}"


class Channel(Generic[M]):
    def __init__(self, socket: zmq.Socket, codec: Codec[M]) -> None:
        self.socket = socket
        self.codec = codec
        self._routed = socket.type == zmq.ROUTER

    def send(self, message: msgspec.Struct, identity: bytes | None = None) -> None:
        frames = [self.codec.encode(message)]
        if self._routed:
            frames.insert(0, identity)
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # the peer's queue is full: it is not reading, and liveness will fail it

    def receive(self) -> Iterator[tuple[bytes | None, M | ProtocolError]]:
        """The messages waiting now (at most ``RECEIVE_BATCH``; the socket stays readable for the
        rest), decoded or as the error to answer it with."""
        for _ in range(RECEIVE_BATCH):
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            identity = frames[0] if self._routed else None
            payload = frames[1:] if self._routed else frames
            if len(payload) != 1:
                yield identity, ProtocolError(ErrorCode.MALFORMED, f"expected 1 payload frame, got {len(payload)}")
                continue
            try:
                yield identity, self.codec.decode(payload[0])
            except ProtocolError as error:
                yield identity, error

    def close(self) -> None:
        """Closes after at most CLOSE_LINGER_MS, so a last Abort or Withdraw still leaves."""
        self.socket.close(linger=CLOSE_LINGER_MS)
