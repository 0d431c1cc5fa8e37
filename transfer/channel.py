"""A ZMQ socket that speaks typed messages: size-capped, authenticated, validated, never blocking.

ROUTER sockets (sender control, registry) see ``[identity, payload, mac]``; DEALER sockets
(receivers, registry clients) see ``[payload, mac]``, where ``mac`` is the HMAC-SHA256 of the
payload under the channel's key: a peer that does not hold the key can neither speak (its
messages are refused before they are decoded) nor forge another's. With no key (a library user
who wants none) the mac frame is absent. Anything else, or a payload that fails the codec, comes
out of ``receive`` as a ``ProtocolError`` for the owner to answer.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from typing import Generic

import msgspec
import zmq

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


def make_socket(kind: int, max_bytes: int) -> zmq.Socket:
    socket = zmq.Context.instance().socket(kind)
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
    def __init__(self, socket: zmq.Socket, codec: Codec[M], key: bytes = b"") -> None:
        self.socket = socket
        self.codec = codec
        self._key = key
        self._routed = socket.type == zmq.ROUTER

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def send(self, message: msgspec.Struct, identity: bytes | None = None) -> None:
        payload = self.codec.encode(message)
        frames = [payload, self._mac(payload)] if self._key else [payload]
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
            if self._key and (len(payload) != 2 or not hmac.compare_digest(payload[1], self._mac(payload[0]))):
                yield identity, ProtocolError(ErrorCode.UNAUTHENTICATED, "message not signed with the cluster key")
                continue
            if len(payload) != (2 if self._key else 1):
                yield identity, ProtocolError(ErrorCode.MALFORMED, f"expected 1 payload frame, got {len(payload)}")
                continue
            try:
                yield identity, self.codec.decode(payload[0])
            except ProtocolError as error:
                yield identity, error

    def close(self) -> None:
        """Closes after at most CLOSE_LINGER_MS, so a last Abort or Withdraw still leaves."""
        self.socket.close(linger=CLOSE_LINGER_MS)
