"""Every deadline fails its room and frees its blocks, with both parties in this process."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import drive
from transfer import BootstrapServer, PollState, Receiver, Sender, TransferInfo, TransferMode
from transfer_payload import EMBEDDING_FIELDS, payload

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def short(config):
    return dataclasses.replace(config, bootstrap_timeout_s=1.0, waiting_timeout_s=1.0, transfer_timeout_s=1.5)


@pytest.fixture
def parties(short):
    bootstrap = BootstrapServer(short).start()
    sender = Sender(short, EMBEDDING_FIELDS, "encode-0", bootstrap.address)
    receiver = Receiver(short, EMBEDDING_FIELDS)
    yield bootstrap, sender, receiver
    receiver.close()
    sender.close()
    bootstrap.close()


def stage(sender: Sender, room: int, tokens: int):
    allocation = sender.allocator.alloc(tokens)
    sender.buffers.write(allocation, 0, payload(EMBEDDING_FIELDS, room, tokens))
    return allocation


def all_free(*sides) -> bool:
    return all(side.allocator.available_blocks() == side.config.buffer_blocks for side in sides)


def test_sender_room_nobody_registers_fails_after_bootstrap_timeout(parties):
    _, sender, _ = parties
    sender.send(1, stage(sender, 1, 9), TransferInfo(TransferMode.EMBEDDING, 9))
    assert sender.poll(1) is PollState.BOOTSTRAPPING
    drive([sender], lambda: sender.poll(1) is PollState.FAILED, timeout=5)
    assert "bootstrapping" in sender.failure(1)
    assert all_free(sender)


def test_receiver_room_for_an_unpublished_sender_fails_after_bootstrap_timeout(parties):
    bootstrap, _, receiver = parties
    receiver.add(1, bootstrap.address, "nobody")
    assert all_free(receiver)  # nothing is reserved for a room before its first chunk is offered
    drive([receiver], lambda: receiver.poll(1) is PollState.FAILED, timeout=5)
    assert all_free(receiver)


def test_registered_room_without_input_fails_after_waiting_timeout_on_both_sides(parties):
    bootstrap, sender, receiver = parties
    sender.add(1)
    receiver.add(1, bootstrap.address, "encode-0")
    drive([sender, receiver], lambda: receiver.poll(1) is PollState.WAITING_FOR_INPUT)
    assert sender.poll(1) is PollState.WAITING_FOR_INPUT
    drive([sender, receiver], lambda: sender.poll(1) is PollState.FAILED and receiver.poll(1) is PollState.FAILED,
          timeout=5)
    assert all_free(sender, receiver)
    assert sender.send(1, stage(sender, 1, 9), TransferInfo(TransferMode.EMBEDDING, 9)) is PollState.FAILED
    assert all_free(sender), "data handed to a failed room is freed at once"


def test_a_room_the_receiver_cannot_reserve_fails_at_its_timeout_and_frees_both_sides(parties):
    bootstrap, sender, receiver = parties
    receiver.add(1, bootstrap.address, "encode-0")
    hog = receiver.allocator.alloc(receiver.allocator.available_blocks() * receiver.config.block_size)
    sender.send(1, stage(sender, 1, 40), TransferInfo(TransferMode.EMBEDDING, 40))
    drive([sender, receiver], lambda: receiver.poll(1) is PollState.FAILED and sender.poll(1) is PollState.FAILED,
          timeout=10)
    assert "timed out" in receiver.failure(1) and "timed out" in sender.failure(1)
    receiver.allocator.free(hog)
    assert all_free(sender, receiver)


def test_abort_while_waiting_for_input_reaches_the_sender(parties):
    bootstrap, sender, receiver = parties
    sender.add(1)
    receiver.add(1, bootstrap.address, "encode-0")
    drive([sender, receiver], lambda: sender.poll(1) is PollState.WAITING_FOR_INPUT)
    receiver.abort(1)
    drive([sender, receiver], lambda: sender.poll(1) is PollState.FAILED)
    assert "receiver aborted" in sender.failure(1)
    assert all_free(sender, receiver)


def test_registration_before_the_role_adds_the_room_is_kept(parties):
    bootstrap, sender, receiver = parties
    receiver.add(1, bootstrap.address, "encode-0")
    drive([sender, receiver], lambda: receiver.poll(1) is PollState.WAITING_FOR_INPUT)
    sender.send(1, stage(sender, 1, 9), TransferInfo(TransferMode.EMBEDDING, 9))
    drive([sender, receiver], lambda: receiver.poll(1) is PollState.SUCCESS and sender.poll(1) is PollState.SUCCESS)
    assert receiver.take(1).num_tokens == 9
    assert all_free(sender, receiver)
