"""A receiver that registers for a room its sender has already ended and forgotten (decode that
reserved its pages only after prefill's KV room timed out) is told at once, with the sender's
reason, and frees its blocks; it is not taken for an early registration and left waiting for the
waiting timeout."""

from __future__ import annotations

import dataclasses
import time

import pytest

from conftest import drive
from transfer import BootstrapServer, PollState, Receiver, Sender, TransferInfo, TransferMode
from transfer_payload import EMBEDDING_FIELDS

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def parties(config):
    """A sender whose rooms fail 0.5 s after they open, and a patient waiting timeout (20 s)."""
    config = dataclasses.replace(config, bootstrap_timeout_s=0.5)
    bootstrap = BootstrapServer(config).start()
    sender = Sender(config, EMBEDDING_FIELDS, "prefill-0", bootstrap.address)
    receiver = Receiver(config, EMBEDDING_FIELDS)
    yield bootstrap, sender, receiver
    receiver.close()
    sender.close()
    bootstrap.close()


def test_a_registration_for_a_room_the_sender_failed_and_forgot_is_refused_at_once(parties):
    bootstrap, sender, receiver = parties
    sender.add(7)
    drive([sender], lambda: sender.poll(7) is PollState.FAILED, timeout=5)  # nobody registered in time
    sender.forget(7)  # as the role does when it ends the request
    started = time.monotonic()
    receiver.add(7, bootstrap.address, "prefill-0")
    drive([sender, receiver], lambda: receiver.poll(7) is PollState.FAILED, timeout=10)
    assert time.monotonic() - started < 5, "the late receiver waited instead of being told"
    assert "already ended (failed: timed out while bootstrapping)" in receiver.failure(7)
    receiver.forget(7)
    assert receiver.allocator.available_blocks() == receiver.config.buffer_blocks
    with pytest.raises(KeyError):
        sender.poll(7)  # refused, not kept as an early registration


def test_a_room_added_again_after_it_was_forgotten_is_registered_as_usual(parties):
    bootstrap, sender, receiver = parties
    sender.add(8)
    drive([sender], lambda: sender.poll(8) is PollState.FAILED, timeout=5)
    sender.forget(8)
    sender.add(8)
    receiver.add(8, bootstrap.address, "prefill-0")
    drive([sender, receiver], lambda: receiver.poll(8) is PollState.WAITING_FOR_INPUT)


def test_a_room_its_receiver_ended_before_the_role_added_it_is_failed_when_added(parties):
    """A receiver may register before the role has added the room (the sender then holds it for
    the role); one that aborts it then leaves the role a FAILED room with the reason when it adds
    it, so the blocks it sends are freed at once, not held by a fresh room for the bootstrap
    timeout."""
    bootstrap, sender, receiver = parties
    receiver.add(9, bootstrap.address, "prefill-0")
    drive([sender, receiver], lambda: receiver.poll(9) is PollState.WAITING_FOR_INPUT)
    receiver.abort(9, "the client left")
    drive([sender, receiver], lambda: 9 not in sender._rooms)
    sender.add(9)
    assert sender.poll(9) is PollState.FAILED and "the client left" in sender.failure(9)
    blocks = sender.allocator.available_blocks()
    assert sender.send(9, sender.allocator.alloc(8), TransferInfo(TransferMode.EMBEDDING, 8)) is PollState.FAILED
    assert sender.allocator.available_blocks() == blocks
