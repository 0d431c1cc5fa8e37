"""Abort from either side and kill -9 of either peer mid-transfer: the survivor fails the room
within its timeout and every block on both sides is free again."""

from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import drive, run_for
from transfer import PollState, Receiver, Sender, TransferInfo, TransferMode
from transfer_payload import EMBEDDING_FIELDS, payload

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ROOM, TOKENS = 1, 40


def stall_mid_transfer(receiver: Receiver, sender_peer, bootstrap) -> object:
    """The sender has offered the room's first chunk and the receiver's pool cannot hold the
    whole room, so the receiver waits to pull it (holding nothing): mid-transfer."""
    receiver.add(ROOM, bootstrap.address, "encode-0")
    hog = receiver.allocator.alloc(receiver.allocator.available_blocks() * receiver.config.block_size)
    sender_peer.command(op="send", room=ROOM, tokens=TOKENS)
    sender_peer.state(ROOM, "transferring", parties=[receiver])
    run_for([receiver], 0.5)
    assert receiver.poll(ROOM) is PollState.WAITING_FOR_INPUT and receiver.received_tokens(ROOM) == 0
    return hog


@pytest.fixture
def stalled(config, bootstrap, spawn):
    sender = spawn("sender", config, name="encode-0", bootstrap=bootstrap.address)
    receiver = Receiver(config, EMBEDDING_FIELDS)
    hog = stall_mid_transfer(receiver, sender, bootstrap)
    yield sender, receiver, hog
    receiver.close()


def assert_receiver_clean(receiver: Receiver, hog) -> None:
    receiver.allocator.free(hog)
    assert receiver.allocator.available_blocks() == receiver.config.buffer_blocks


def test_receiver_abort_frees_blocks_on_both_sides(stalled):
    sender, receiver, hog = stalled
    receiver.abort(ROOM)
    assert receiver.poll(ROOM) is PollState.FAILED
    assert_receiver_clean(receiver, hog)
    event = sender.state(ROOM, "failed", parties=[receiver])
    assert "receiver aborted" in event["reason"]
    status = sender.status(parties=[receiver])
    assert status["available"] == status["total"]


def test_sender_abort_frees_blocks_on_both_sides(stalled):
    sender, receiver, hog = stalled
    sender.command(op="abort", room=ROOM)
    drive([receiver], lambda: receiver.poll(ROOM) is PollState.FAILED)
    assert "sender aborted" in receiver.failure(ROOM)
    assert_receiver_clean(receiver, hog)
    status = sender.status(parties=[receiver])
    assert status["rooms"][str(ROOM)] == "failed" and status["available"] == status["total"]


def test_killed_sender_fails_the_receiver_room_within_heartbeat_timeout(stalled, config):
    sender, receiver, hog = stalled
    sender.kill()
    killed = time.monotonic()
    drive([receiver], lambda: receiver.poll(ROOM) is PollState.FAILED, timeout=config.heartbeat_timeout_s + 5)
    assert time.monotonic() - killed < config.heartbeat_timeout_s + 2
    assert "heartbeat" in receiver.failure(ROOM)
    assert_receiver_clean(receiver, hog)


def test_killed_receiver_fails_the_sender_room_within_heartbeat_timeout(config, bootstrap, spawn):
    receiver = spawn("receiver", config)
    sender = Sender(config, EMBEDDING_FIELDS, "encode-0", bootstrap.address)
    receiver.command(op="add", room=ROOM, bootstrap=bootstrap.address, sender="encode-0")
    receiver.command(op="hog", tokens=(config.buffer_blocks - config.default_blocks) * config.block_size)
    assert receiver.wait_for(lambda e: e["event"] == "hogged")["ok"]
    allocation = sender.allocator.alloc(TOKENS)
    sender.buffers.write(allocation, 0, payload(EMBEDDING_FIELDS, ROOM, TOKENS))
    sender.send(ROOM, allocation, TransferInfo(TransferMode.EMBEDDING, TOKENS))
    drive([sender], lambda: sender.poll(ROOM) is PollState.TRANSFERRING)  # offered; the receiver cannot take it all
    receiver.kill()
    killed = time.monotonic()
    drive([sender], lambda: sender.poll(ROOM) is PollState.FAILED, timeout=config.heartbeat_timeout_s + 5)
    assert time.monotonic() - killed < config.heartbeat_timeout_s + 2
    assert "heartbeat" in sender.failure(ROOM)
    assert sender.allocator.available_blocks() == config.buffer_blocks
    sender.close()


def test_a_sender_restarted_under_the_same_name_serves_the_next_room(config, bootstrap, spawn):
    """A pod restarts with its name and a new address: the next room finds the new one."""
    first = spawn("sender", config, name="encode-0", bootstrap=bootstrap.address)
    receiver = Receiver(config, EMBEDDING_FIELDS)
    receiver.add(1, bootstrap.address, "encode-0")
    first.command(op="send", room=1, tokens=9)
    first.state(1, "success", parties=[receiver])
    drive([receiver], lambda: receiver.poll(1) is PollState.SUCCESS)
    receiver.take(1)
    first.kill()
    second = spawn("sender", config, name="encode-0", bootstrap=bootstrap.address)
    receiver.add(2, bootstrap.address, "encode-0")
    second.command(op="send", room=2, tokens=9)
    second.state(2, "success", timeout=config.heartbeat_timeout_s, parties=[receiver])
    drive([receiver], lambda: receiver.poll(2) is PollState.SUCCESS)
    np.testing.assert_array_equal(receiver.take(2).host("embeddings"),
                                  payload(EMBEDDING_FIELDS, 2, 9)["embeddings"])
    assert receiver.allocator.available_blocks() == config.buffer_blocks
    receiver.close()
