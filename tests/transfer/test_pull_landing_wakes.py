"""A loop that sleeps on a receiver's sockets wakes when a pull lands, on either data plane: it
need not wake on a timer to look (a role's loop sleeps until then)."""

from __future__ import annotations

import dataclasses
import time

import pytest
import zmq

from transfer import PollState, Receiver, Sender, TransferMode, field
from transfer.data_plane import open_data_plane
from transfer_payload import send_rows

pytestmark = pytest.mark.timeout(60)
SLEEP_S = 10.0
# 256 KiB a token, so a 13-token pull (16 rows, 4 MiB) is still in flight when the receiver's
# progress that started it returns; with a few KiB it often landed within that call
WIDE_FIELDS = (field("k", (64, 1024), "float32"),)


@pytest.fixture
def config(config):
    return dataclasses.replace(config, buffer_blocks=8)


def pulling(sender, receiver, config, bootstrap, name: str, tokens: int) -> int:
    """A room whose chunk the receiver has started pulling and not seen land. A pull can still land
    within the receiver's progress that starts it (then the room is done and a new one tried)."""
    for room in range(1, 11):
        send_rows(sender, config, room, tokens, fields=WIDE_FIELDS)
        receiver.add(room, bootstrap.address, name, TransferMode.KV, sender.incarnation)
        # the sender answers the registration and offers the chunk; the receiver starts pulling it
        # (its progress does not wait, so only a pull landing within that very call is missed)
        deadline = time.monotonic() + 20
        while receiver.poll(room) not in (PollState.TRANSFERRING, PollState.SUCCESS):
            assert time.monotonic() < deadline, "the pull never started"
            sender.progress(0.002)
            receiver.progress(0)
        if receiver.poll(room) is PollState.TRANSFERRING:
            return room
        receiver.take(room)
    raise AssertionError("every pull landed as it started: no sleeping loop to wake")


@pytest.mark.parametrize("plane", ["jax", "zmq"])
def test_a_landed_pull_wakes_a_loop_sleeping_on_the_receivers_sockets(config, bootstrap, plane):
    config = dataclasses.replace(config, data_plane=plane)
    sender = Sender(config, WIDE_FIELDS, "prefill-0", bootstrap.address)
    receiver = Receiver(config, WIDE_FIELDS)
    try:
        tokens = 13
        room = pulling(sender, receiver, config, bootstrap, "prefill-0", tokens)
        start = time.monotonic()
        while receiver.poll(room) is PollState.TRANSFERRING and time.monotonic() - start < SLEEP_S:
            poller = zmq.Poller()  # as a process holding both would sleep (the zmq plane's sender serves pulls)
            for socket in receiver.sockets() + sender.sockets():
                poller.register(socket, zmq.POLLIN)
            poller.poll(SLEEP_S * 1000)
            receiver.progress(0)
            sender.progress(0)
        assert receiver.poll(room) is PollState.SUCCESS
        assert time.monotonic() - start < SLEEP_S / 2, "the landing did not wake the poll"
        assert receiver.take(room).num_tokens == tokens
    finally:
        receiver.close()
        sender.close()


@pytest.mark.parametrize("plane", ["jax", "zmq"])
def test_a_sender_sharing_the_receivers_plane_does_not_hide_a_landed_pull(config, bootstrap, plane):
    """Prefill's receiver (embeddings in) and sender (KV out) share one data plane. The sender's
    progress ran between a pull's landing and the receiver's look used to consume the landing's
    signal, and the loop then slept through it (a first token ~50 ms late, one request in ~16
    under ``--role all``)."""
    # no heartbeat meanwhile: the landing alone must wake the poll
    config = dataclasses.replace(config, data_plane=plane, heartbeat_interval_s=30.0, heartbeat_timeout_s=60.0)
    encode = Sender(config, WIDE_FIELDS, "encode-0", bootstrap.address)
    shared = open_data_plane(config)
    receiver = Receiver(config, WIDE_FIELDS, data_plane=shared)
    kv_sender = Sender(config, WIDE_FIELDS, "prefill-0", bootstrap.address, data_plane=shared)
    try:
        room = pulling(encode, receiver, config, bootstrap, "encode-0", 13)
        serve_until = time.monotonic() + 0.5  # the pull lands meanwhile (the zmq plane's needs encode to serve it)
        while time.monotonic() < serve_until:
            encode.progress(0.01)
        kv_sender.progress(0)
        poller = zmq.Poller()
        for socket in receiver.sockets() + kv_sender.sockets():
            poller.register(socket, zmq.POLLIN)
        start = time.monotonic()
        poller.poll(SLEEP_S * 1000)
        assert time.monotonic() - start < SLEEP_S / 2, "the landed pull no longer wakes the receiver's poll"
        receiver.progress(0)
        assert receiver.poll(room) is PollState.SUCCESS
    finally:
        receiver.close()
        kv_sender.close()
        shared.close()
        encode.close()
