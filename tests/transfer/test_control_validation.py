"""Malformed, oversized and out-of-order control messages get an Error reply and change no state,
on both ends; a peer without the deployment's keys is refused at the connection's handshake. The
other end here is a raw ZMQ socket playing a peer (with the keys, unless the test says otherwise)."""

from __future__ import annotations

import contextlib
import dataclasses
import time

import msgspec
import pytest
import zmq

from conftest import QUICK, drive, run_for
from transfer import BootstrapServer, PollState, Receiver, Sender, TransferInfo, TransferMode, field
from transfer.block_buffers import Chunk
from transfer.bootstrap import RegistryClient
from transfer.channel import RECEIVE_BATCH, connecting_socket, listening_socket
from transfer.curve import CurveKeys
from transfer.messages import (Abort, Codec, Error, ErrorCode, Heartbeat, PostedPull, Pulled, Ready, Register,
                               Registered, Resume, SenderEndpoint, ToReceiver, ToSender)
from zmq_handshake import handshake_refused
from transfer_payload import EMBEDDING_FIELDS, payload

pytestmark = pytest.mark.timeout(60)

SECRET = "s3cret"


@pytest.fixture
def secured(config):
    return dataclasses.replace(config, secret=SECRET, max_message_bytes=4096)


@pytest.fixture
def registry(secured):
    server = BootstrapServer(secured).start()
    yield server
    server.close()


def keys(secret: str = SECRET) -> CurveKeys | None:
    return dataclasses.replace(QUICK, secret=secret).control_keys


def dealer(secret: str = SECRET) -> zmq.Socket:
    """A peer's connecting socket, with the keys of ``secret`` (none for ""); ``"server key only"``:
    the deployment's server key (what a client must know to start a handshake) with a client key
    pair of its own, which only the listener's ZAP handler refuses."""
    if secret == "server key only":
        public, secret_key = zmq.curve_keypair()
        return connecting_socket(zmq.DEALER, 1 << 20, dataclasses.replace(keys(), client_public=public,
                                                                           client_secret=secret_key))
    return connecting_socket(zmq.DEALER, 1 << 20, keys(secret))


def register(room: int, fields=EMBEDDING_FIELDS, block_size: int = 4) -> Register:
    return Register(room, TransferMode.EMBEDDING, block_size, tuple(fields), 16)


class SenderUnderTest:
    """A real Sender with room 5 added (bootstrapping) and room 6 mid-transfer to ``peer``."""

    def __init__(self, config, registry) -> None:
        self.sender = Sender(config, EMBEDDING_FIELDS, "encode-0", registry.address)
        self.codec = Codec(ToReceiver, 1 << 20)
        self.peer = self.connect()
        self.sender.add(5)
        allocation = self.sender.allocator.alloc(9)
        self.sender.buffers.write(allocation, 0, payload(EMBEDDING_FIELDS, 6, 9))
        self.sender.send(6, allocation, TransferInfo(TransferMode.EMBEDDING, 9))
        assert isinstance(self.ask(self.peer, self.codec.encode(register(6))), Registered)
        self.ready = self.receive(self.peer)
        assert isinstance(self.ready, Ready) and self.ready.chunk.num_tokens == 9

    def connect(self, secret: str = SECRET) -> zmq.Socket:
        socket = dealer(secret)
        socket.connect(self.sender.endpoint.control)
        return socket

    def ask(self, socket: zmq.Socket, *frames: bytes):
        socket.send_multipart(list(frames))
        return self.receive(socket)

    def receive(self, socket: zmq.Socket):
        drive([self.sender], lambda: socket.poll(0), timeout=10)
        return self.codec.decode(socket.recv_multipart()[0])

    def snapshot(self) -> tuple:
        return (self.sender.poll(5), self.sender.poll(6), self.sender.sent_tokens(6),
                self.sender.allocator.available_blocks())


@pytest.fixture
def target(secured, registry):
    under_test = SenderUnderTest(secured, registry)
    yield under_test
    under_test.sender.close()


def encode(message) -> bytes:
    return msgspec.msgpack.encode(message)


SENDER_CASES = {
    "garbage": (lambda t: [b"\xc1\x00garbage"], ErrorCode.MALFORMED),
    "unknown type": (lambda t: [encode({"type": "gimme", "room": 6})], ErrorCode.MALFORMED),
    "negative room": (lambda t: [encode({**msgspec.to_builtins(register(6)), "room": -1})], ErrorCode.MALFORMED),
    "wrong direction": (lambda t: [encode(t.ready)], ErrorCode.MALFORMED),
    "two payload frames": (lambda t: [encode(Heartbeat(1)), encode(Heartbeat(2))], ErrorCode.MALFORMED),
    "oversized": (lambda t: [encode(Abort(6, "x" * 300)) + b"\x00" * 5000], ErrorCode.OVERSIZED),
    "wrong fields": (lambda t: [encode(register(5, fields=(field("x", (3,), "float32"),)))], ErrorCode.MISMATCH),
    "wrong block size": (lambda t: [encode(register(5, block_size=8))], ErrorCode.MISMATCH),
    # its zero answer would be bigger than the pool: it once raised while the room failed, every sweep
    "posted pull over the pool": (lambda t: [encode({**msgspec.to_builtins(register(5)), "capacity_tokens": 1 << 30,
                                                     "posted": msgspec.to_builtins(PostedPull(11, 1 << 30))})],
                                  ErrorCode.MISMATCH),
    "posted pull over its own first chunk": (lambda t: [encode({**msgspec.to_builtins(register(5)),
                                                                "posted": msgspec.to_builtins(PostedPull(11, 17))})],
                                             ErrorCode.MALFORMED),
    "register twice": (lambda t: [encode(register(6))], ErrorCode.OUT_OF_ORDER),
    "wrong uuid": (lambda t: [encode(Pulled(6, t.ready.uuid ^ 1))], ErrorCode.OUT_OF_ORDER),
    "resume before ack": (lambda t: [encode(Resume(6, 9, 16))], ErrorCode.OUT_OF_ORDER),
    "unregistered room": (lambda t: [encode(Pulled(5, 1))], ErrorCode.UNKNOWN_ROOM),
}

STRANGER_CASES = {
    "heartbeat": (lambda t: [encode(Heartbeat(1))], ErrorCode.UNAUTHENTICATED),
    "ack of another's chunk": (lambda t: [encode(Pulled(6, t.ready.uuid))], ErrorCode.UNKNOWN_ROOM),
    "abort of another's room": (lambda t: [encode(Abort(6, "mine now"))], ErrorCode.UNKNOWN_ROOM),
}


def assert_rejected_without_change(target: SenderUnderTest, socket: zmq.Socket, frames: list[bytes],
                                   code: ErrorCode) -> None:
    before = target.snapshot()
    reply = target.ask(socket, *frames)
    assert isinstance(reply, Error) and reply.code is code, reply
    assert target.snapshot() == before
    target.peer.send_multipart([encode(Pulled(6, target.ready.uuid))])
    drive([target.sender], lambda: target.sender.poll(6) is PollState.SUCCESS, timeout=10)
    assert target.sender.allocator.available_blocks() == target.sender.config.buffer_blocks


@pytest.mark.parametrize("case", sorted(SENDER_CASES))
def test_sender_rejects_bad_message_from_its_peer_and_keeps_state(target, case):
    frames, code = SENDER_CASES[case]
    assert_rejected_without_change(target, target.peer, frames(target), code)


@pytest.mark.parametrize("case", sorted(STRANGER_CASES))
def test_sender_rejects_a_stranger_and_keeps_state(target, case):
    frame, code = STRANGER_CASES[case]
    assert_rejected_without_change(target, target.connect(), frame(target), code)


@pytest.mark.parametrize("secret", ["guess", "", "server key only"])
def test_a_peer_without_the_keys_is_refused_at_the_handshake(target, secret):
    """Keys from another secret, none, or the right server key with a client key of its own: the
    sender's control socket refuses the connection before reading anything of it, so no message (a Register, an Abort of a live room) is ever
    decoded, and the sender changes nothing."""
    before = target.snapshot()
    intruder = target.connect(secret)
    for message in (register(5), Abort(6, "mine now")):
        with contextlib.suppress(zmq.Again):  # a blocking send waits for good once the refusal dropped its peer
            intruder.send_multipart([encode(message)], flags=zmq.NOBLOCK)
    assert handshake_refused(intruder, [target.sender], reconnect=target.sender.endpoint.control)
    for _ in range(50):  # a few of its reconnections, each refused
        target.sender.progress(0.01)
    assert not intruder.poll(0) and target.snapshot() == before
    target.peer.send_multipart([encode(Pulled(6, target.ready.uuid))])
    drive([target.sender], lambda: target.sender.poll(6) is PollState.SUCCESS, timeout=10)
    intruder.close(linger=0)


class ReceiverUnderTest:
    """A real Receiver whose room 1 is registered with a raw ROUTER posing as its sender."""

    def __init__(self, config, registry) -> None:
        self.receiver = Receiver(config, EMBEDDING_FIELDS)
        self.router = listening_socket(zmq.ROUTER, 1 << 20, config.control_keys)
        self.router.bind("tcp://127.0.0.1:*")
        endpoint = SenderEndpoint("fake", self.router.getsockopt_string(zmq.LAST_ENDPOINT),
                                  self.receiver.data_plane.kind, self.receiver.data_plane.address)
        self.publisher = RegistryClient(registry.address, config)
        self.publisher.publish(endpoint, 0.0)
        self.codec = Codec(ToSender, 1 << 20)
        self.receiver.add(1, registry.address, "fake")
        self.identity, message = self.receive()
        assert isinstance(message, Register) and message.capacity_tokens == config.default_tokens
        self.router.send_multipart([self.identity, encode(Registered(1))])
        drive([self.receiver], lambda: self.receiver.poll(1) is PollState.WAITING_FOR_INPUT)

    def receive(self):
        """The next message that is not a heartbeat."""
        while True:
            drive([self.receiver], lambda: self.router.poll(0), timeout=10)
            identity, frame = self.router.recv_multipart()
            message = self.codec.decode(frame)
            if not isinstance(message, Heartbeat):
                return identity, message

    def snapshot(self) -> tuple:
        return self.receiver.poll(1), self.receiver.received_tokens(1), self.receiver.allocator.available_blocks()

    def close(self) -> None:
        self.receiver.close()
        self.publisher.close()
        self.router.close(linger=0)


@pytest.mark.parametrize("secret", ["guess", ""])
def test_a_receiver_talks_only_to_a_listener_holding_the_keys(secured, registry, secret):
    """Something published as the room's sender without the deployment's keys (another secret, or
    none): the receiver's connection fails its handshake, so its Register never reaches it."""
    receiver = Receiver(secured, EMBEDDING_FIELDS)
    impostor = listening_socket(zmq.ROUTER, 1 << 20, keys(secret))
    impostor.bind("tcp://127.0.0.1:*")
    publisher = RegistryClient(registry.address, secured)
    try:
        publisher.publish(SenderEndpoint("fake", impostor.getsockopt_string(zmq.LAST_ENDPOINT),
                                         receiver.data_plane.kind, receiver.data_plane.address), 0.0)
        receiver.add(1, registry.address, "fake")
        assert handshake_refused(impostor, [receiver])
        for _ in range(50):
            receiver.progress(0.01)
        assert not impostor.poll(0)
    finally:
        receiver.close()
        publisher.close()
        impostor.close(linger=0)


def ready(room: int = 1, offset: int = 0, count: int = 9, padded: int = 12, mode=TransferMode.EMBEDDING) -> bytes:
    info = TransferInfo(mode, 40, first_token=1 if mode is TransferMode.KV else None)
    return encode(Ready(room, 77, Chunk(offset, count, padded), info))


RECEIVER_CASES = {
    "garbage": ([b"\x92\x01"], ErrorCode.MALFORMED),
    "wrong direction": ([encode(register(1))], ErrorCode.MALFORMED),
    "oversized": ([encode(Abort(1)) + b"\x00" * 5000], ErrorCode.OVERSIZED),
    "registered twice": ([encode(Registered(1))], ErrorCode.OUT_OF_ORDER),
    "chunk out of order": ([ready(offset=8, count=4, padded=4)], ErrorCode.OUT_OF_ORDER),
    "unknown room": ([ready(room=99)], ErrorCode.UNKNOWN_ROOM),
    "wrong mode": ([ready(mode=TransferMode.KV)], ErrorCode.MISMATCH),
    "chunk over capacity": ([ready(count=20, padded=20)], ErrorCode.MISMATCH),
    "padding not a bucket": ([ready(padded=9)], ErrorCode.MISMATCH),
}


@pytest.mark.parametrize("case", sorted(RECEIVER_CASES))
def test_receiver_rejects_bad_message_and_keeps_state(secured, registry, case):
    target = ReceiverUnderTest(secured, registry)
    try:
        frames, code = RECEIVER_CASES[case]
        before = target.snapshot()
        target.router.send_multipart([target.identity, *frames])
        _, reply = target.receive()
        assert isinstance(reply, Error) and reply.code is code, reply
        assert target.snapshot() == before
        target.router.send_multipart([target.identity, encode(Abort(1, "done"))])
        drive([target.receiver], lambda: target.receiver.poll(1) is PollState.FAILED)
        assert target.receiver.allocator.available_blocks() == secured.buffer_blocks
    finally:
        target.close()


def test_a_flood_of_junk_does_not_hold_the_senders_loop(target):
    """A stranger's burst of messages out of order: one ``progress`` answers at most a batch of them and
    returns (it used to read until the socket was empty, a flood keeping it from its heartbeats and
    deadlines); the next calls answer the rest, and the sender still serves its peer."""
    stranger = target.connect()
    sent = 3 * RECEIVE_BATCH
    for _ in range(sent):
        stranger.send_multipart([encode(Heartbeat(1))])
    time.sleep(0.5)  # let them reach the sender's queue
    answered = [0]

    def read_answers() -> int:
        while stranger.poll(50):
            stranger.recv_multipart()
            answered[0] += 1
        return answered[0]

    target.sender.progress(0)
    assert 0 < read_answers() <= RECEIVE_BATCH
    drive([target.sender], lambda: read_answers() == sent, timeout=20)
    target.peer.send_multipart([encode(Pulled(6, target.ready.uuid))])
    drive([target.sender], lambda: target.sender.poll(6) is PollState.SUCCESS, timeout=10)
    stranger.close(linger=0)


def test_a_receiver_does_not_take_junk_on_its_senders_port_for_a_live_sender(secured, registry):
    """Its sender stops answering heartbeats while sending junk on the room's connection: the receiver still fails the room once the heartbeat timeout passes (junk used to count
    as the sender being alive, so the room waited for the much longer waiting timeout)."""
    config = dataclasses.replace(secured, heartbeat_timeout_s=1.0)
    target = ReceiverUnderTest(config, registry)
    try:
        deadline = time.monotonic() + 10

        def junk_sent_and_failed() -> bool:
            target.router.send_multipart([target.identity, b"\xc1\x00junk"])
            assert time.monotonic() < deadline, "the room outlived its sender's heartbeats"
            return target.receiver.poll(1) is PollState.FAILED

        drive([target.receiver], junk_sent_and_failed, timeout=15)
        assert target.receiver.allocator.available_blocks() == config.buffer_blocks
    finally:
        target.close()


def test_rooms_registered_and_aborted_with_posted_pulls_cost_the_sender_one_answer_per_size(secured, registry):
    """Each posted pull a room ends without answering is answered with zero rows of its size
    (a pull cannot be cancelled), offered until it expires. A peer registering and aborting rooms
    with posted pulls made the sender build a fresh set of zeros for each: 200 pairs of small
    messages held 200 pools' worth of device memory for a minute."""
    import jax

    # the zmq plane holds its offers as arrays of this process (the jax server's, out of sight)
    target = SenderUnderTest(dataclasses.replace(secured, data_plane="zmq"), registry)
    pool_tokens = target.sender.config.buffer_blocks * target.sender.config.block_size
    pool_bytes = sum(a.nbytes for a in target.sender.buffers.pools.values())
    before = sum(a.nbytes for a in jax.live_arrays())
    for room in range(100, 300):
        target.peer.send_multipart([encode(Register(room, TransferMode.EMBEDDING, 4, tuple(EMBEDDING_FIELDS),
                                                    pool_tokens, posted=PostedPull(room, pool_tokens)))])
        target.peer.send_multipart([encode(Abort(room, "bye"))])
    try:
        run_for([target.sender], 2.0)
        assert sum(a.nbytes for a in jax.live_arrays()) - before <= pool_bytes
    finally:
        target.sender.close()
