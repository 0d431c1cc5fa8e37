"""A receiver lets go of a sender that no live room has needed for the heartbeat timeout: its
control channel and its data plane connection. Senders restart under new addresses, and a
receiver that kept every channel it ever opened would poll them all for good (one more socket
per restart of each sender it ever received from)."""

from __future__ import annotations

import dataclasses
import os

import pytest

from conftest import drive, run_for
from transfer import BootstrapServer, PollState, Receiver, Sender, TransferMode
from transfer_payload import KV_FIELDS, send_rows

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def quick(config):
    """Senders given up on 1 s after their last room ended."""
    config = dataclasses.replace(config, heartbeat_timeout_s=1.0)
    bootstrap = BootstrapServer(config).start()
    receiver = Receiver(config, KV_FIELDS)
    yield config, bootstrap, receiver
    receiver.close()
    bootstrap.close()


def receive_one(config, bootstrap, receiver: Receiver, sender: Sender, room: int) -> None:
    sender.add(room)
    receiver.add(room, bootstrap.address, sender.endpoint.name, incarnation=sender.incarnation,
                 mode=TransferMode.KV, expected_tokens=12)
    drive([sender, receiver], lambda: receiver.poll(room) is not PollState.BOOTSTRAPPING)
    send_rows(sender, config, room, 12)
    drive([sender, receiver], lambda: receiver.poll(room) is PollState.SUCCESS)
    assert receiver.take(room).num_tokens == 12
    drive([sender], lambda: sender.poll(room) is PollState.SUCCESS)
    sender.forget(room)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_receiver_keeps_no_socket_for_senders_it_no_longer_needs(quick):
    config, bootstrap, receiver = quick
    sender = Sender(config, KV_FIELDS, "prefill-0", bootstrap.address)
    receive_one(config, bootstrap, receiver, sender, 1)
    while_needed = len(receiver.sockets())
    sender.close()
    for room in range(2, 7):  # the sender restarts five times, each time at a new address
        sender = Sender(config, KV_FIELDS, "prefill-0", bootstrap.address)
        receive_one(config, bootstrap, receiver, sender, room)
        sender.close()
    before = open_descriptors()
    run_for([receiver], config.heartbeat_timeout_s + 1.5)
    assert len(receiver.sockets()) == while_needed - 1, "a dead sender's control channel is still polled"
    assert open_descriptors() < before


def test_a_sender_let_go_of_is_connected_again_for_its_next_room(quick):
    config, bootstrap, receiver = quick
    sender = Sender(config, KV_FIELDS, "prefill-0", bootstrap.address)
    try:
        receive_one(config, bootstrap, receiver, sender, 1)
        polled = len(receiver.sockets())
        run_for([sender, receiver], config.heartbeat_timeout_s + 1.5)
        assert len(receiver.sockets()) == polled - 1
        receive_one(config, bootstrap, receiver, sender, 2)
        assert len(receiver.sockets()) == polled
    finally:
        sender.close()


def test_a_sender_a_live_room_needs_is_kept_however_quiet_the_room(quick):
    config, bootstrap, receiver = quick
    sender = Sender(config, KV_FIELDS, "prefill-0", bootstrap.address)
    try:
        sender.add(1)
        receiver.add(1, bootstrap.address, "prefill-0", mode=TransferMode.KV, incarnation=sender.incarnation)
        drive([sender, receiver], lambda: receiver.poll(1) is PollState.WAITING_FOR_INPUT)
        run_for([sender, receiver], config.heartbeat_timeout_s * 3)  # nothing offered; heartbeats answered
        assert receiver.poll(1) is PollState.WAITING_FOR_INPUT
        send_rows(sender, config, 1, 12)
        drive([sender, receiver], lambda: receiver.poll(1) is PollState.SUCCESS)
        assert receiver.take(1).num_tokens == 12
    finally:
        sender.close()


def test_a_receiver_forgets_sender_names_no_room_has_asked_about_for_the_waiting_timeout(quick):
    """Senders come back under new names (a new pod, a new pid): what the receiver's directory
    knew of each name it ever met stayed for good."""
    config, bootstrap, receiver = quick
    receiver.config = config = dataclasses.replace(config, waiting_timeout_s=1.0)
    receiver._directory.config = config  # noqa: SLF001: a short memory for this test
    for room in range(1, 4):
        sender = Sender(config, KV_FIELDS, f"prefill-pid{room}", bootstrap.address)
        receive_one(config, bootstrap, receiver, sender, room)
        sender.close()
    directory = receiver._directory  # noqa: SLF001: what it holds, not what it answers
    assert len(directory._answers) == 3  # noqa: SLF001
    run_for([receiver], config.waiting_timeout_s + 1.5)
    assert not (directory._answers or directory._seen or directory._endpoints or directory._asked)  # noqa: SLF001
