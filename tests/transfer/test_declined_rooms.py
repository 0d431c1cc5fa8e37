"""A receiver that will never take a room it did not register for (decode dropping a request still
waiting for pages) declines it: the sender frees the rows it holds for the room at once, not at
the bootstrap timeout; a room its role adds later is FAILED with the receiver's reason; another
receiver's room cannot be declined; and the receiver keeps nothing of a declined room."""

from __future__ import annotations

import dataclasses
import time

import pytest

from conftest import drive, run_for
from transfer import BootstrapServer, PollState, Receiver, Sender, TransferInfo, TransferMode
from transfer_payload import EMBEDDING_FIELDS

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def parties(config):
    """A sender with a patient bootstrap timeout (20 s): a room it frees sooner was declined."""
    bootstrap = BootstrapServer(config).start()
    sender = Sender(config, EMBEDDING_FIELDS, "prefill-0", bootstrap.address)
    receivers = [Receiver(config, EMBEDDING_FIELDS), Receiver(config, EMBEDDING_FIELDS)]
    yield bootstrap, sender, receivers
    for receiver in receivers:
        receiver.close()
    sender.close()
    bootstrap.close()


def test_a_declined_room_frees_the_senders_rows_at_once(parties):
    bootstrap, sender, [receiver, _] = parties
    free = sender.allocator.available_blocks()
    sender.add(3)
    assert sender.send(3, sender.allocator.alloc(8), TransferInfo(TransferMode.EMBEDDING, 8)) is PollState.BOOTSTRAPPING
    assert sender.allocator.available_blocks() < free
    started = time.monotonic()
    receiver.decline(3, bootstrap.address, "prefill-0", sender.incarnation, "the router's token stream closed")
    drive([sender, receiver], lambda: sender.poll(3) is PollState.FAILED, timeout=10)
    assert time.monotonic() - started < 5
    assert sender.failure(3) == "receiver declined: the router's token stream closed"
    assert sender.allocator.available_blocks() == free
    with pytest.raises(KeyError):
        receiver.poll(3)  # nothing kept to poll or forget
    assert receiver.allocator.available_blocks() == receiver.config.buffer_blocks


def test_a_room_declined_before_the_role_added_it_is_failed_when_added(parties):
    bootstrap, sender, [receiver, _] = parties
    receiver.decline(4, bootstrap.address, "prefill-0", reason="deadline passed")
    drive([sender, receiver], lambda: sender._ended.get(4) is not None, timeout=10)
    sender.add(4)
    assert sender.poll(4) is PollState.FAILED and "deadline passed" in sender.failure(4)
    blocks = sender.allocator.available_blocks()
    assert sender.send(4, sender.allocator.alloc(8), TransferInfo(TransferMode.EMBEDDING, 8)) is PollState.FAILED
    assert sender.allocator.available_blocks() == blocks


def test_another_receivers_room_cannot_be_declined(parties):
    bootstrap, sender, [owner, other] = parties
    sender.add(5)
    owner.add(5, bootstrap.address, "prefill-0")
    drive([sender, owner], lambda: owner.poll(5) is PollState.WAITING_FOR_INPUT)
    other.decline(5, bootstrap.address, "prefill-0", reason="not mine")
    run_for([sender, owner, other], 0.5)
    assert sender.poll(5) is PollState.WAITING_FOR_INPUT and owner.poll(5) is PollState.WAITING_FOR_INPUT
    sender.send(5, sender.allocator.alloc(8), TransferInfo(TransferMode.EMBEDDING, 8))
    drive([sender, owner], lambda: owner.poll(5) is PollState.SUCCESS)


def test_a_room_declined_to_a_sender_nobody_publishes_is_dropped_at_the_bootstrap_timeout(config):
    config = dataclasses.replace(config, bootstrap_timeout_s=0.3)
    bootstrap = BootstrapServer(config).start()
    receiver = Receiver(config, EMBEDDING_FIELDS)
    try:
        receiver.decline(6, bootstrap.address, "prefill-absent", reason="gone")
        run_for([receiver], 1.0)
        receiver.decline(6, bootstrap.address, "prefill-absent", reason="gone")  # the first was dropped
    finally:
        receiver.close()
        bootstrap.close()
