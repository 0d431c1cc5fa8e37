"""A sender restarted under its name (a worker's pod keeps its name) is another incarnation: a room
opened with the earlier one is refused by the new one at once, not taken for an early registration
that would wait until the waiting timeout; a room opened with the new one is not misled by a
registry answer, cached or stale, that still names the dead one."""

from __future__ import annotations

import dataclasses
import time

import pytest

from conftest import drive
from transfer import BootstrapServer, PollState, Receiver, Sender
from transfer_payload import EMBEDDING_FIELDS

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def registry(config):
    """Patient timeouts (20 s), so a room that waits for them shows as a failed test, not a slow one."""
    bootstrap = BootstrapServer(config).start()
    yield config, bootstrap
    bootstrap.close()


def restart(config, bootstrap, old: Sender) -> Sender:
    """The dead sender's process gone without a word (no Withdraw), a new one under its name."""
    old._registry.close()  # noqa: SLF001: a killed process withdraws nothing; its lease is replaced below
    old._channel.close()  # noqa: SLF001
    return Sender(config, EMBEDDING_FIELDS, old.endpoint.name, bootstrap.address)


def published(bootstrap, sender: Sender) -> bool:
    """Whether the registry names this sender (not an earlier one under its name, nor none)."""
    endpoint = bootstrap.endpoints().get(sender.endpoint.name)
    return endpoint is not None and endpoint.incarnation == sender.incarnation


def seen_by_a_receiver(config, bootstrap) -> tuple[Sender, Receiver]:
    """A sender whose registry lease lasts 1 s, and a receiver that has registered a room with it."""
    config = dataclasses.replace(config, heartbeat_timeout_s=1.0)
    sender = Sender(config, EMBEDDING_FIELDS, "prefill-0", bootstrap.address)
    receiver = Receiver(config, EMBEDDING_FIELDS)
    sender.add(1)
    receiver.add(1, bootstrap.address, "prefill-0", incarnation=sender.incarnation)
    drive([sender, receiver], lambda: receiver.poll(1) is PollState.WAITING_FOR_INPUT)
    return sender, receiver


def test_every_sender_is_its_own_incarnation(registry):
    config, bootstrap = registry
    first = Sender(config, EMBEDDING_FIELDS, "prefill-0", bootstrap.address)
    second = Sender(config, EMBEDDING_FIELDS, "prefill-1", bootstrap.address)
    try:
        assert first.incarnation != second.incarnation
        assert first.incarnation > 0 and first.endpoint.incarnation == first.incarnation
        drive([first], lambda: "prefill-0" in bootstrap.endpoints())
        assert bootstrap.endpoints()["prefill-0"].incarnation == first.incarnation
    finally:
        first.close()
        second.close()


def test_a_room_of_the_dead_incarnation_is_refused_by_the_restarted_sender_at_once(registry):
    config, bootstrap = registry
    old = Sender(config, EMBEDDING_FIELDS, "prefill-0", bootstrap.address)
    old.add(5)
    opened_with = old.incarnation
    new = restart(config, bootstrap, old)
    receiver = Receiver(config, EMBEDDING_FIELDS)
    try:
        drive([new], lambda: published(bootstrap, new))
        started = time.monotonic()
        receiver.add(5, bootstrap.address, "prefill-0", incarnation=opened_with)
        drive([new, receiver], lambda: receiver.poll(5) is PollState.FAILED, timeout=10)
        assert time.monotonic() - started < 5, "the room of the dead sender waited instead of failing"
        assert "another incarnation of sender prefill-0" in receiver.failure(5)
        receiver.forget(5)
        assert receiver.allocator.available_blocks() == config.buffer_blocks
        with pytest.raises(KeyError):
            new.poll(5)  # refused: not kept as an early registration
    finally:
        receiver.close()
        new.close()


def test_a_room_of_the_live_incarnation_asks_again_past_a_cached_answer_naming_the_dead_one(registry):
    config, bootstrap = registry
    config = dataclasses.replace(config, heartbeat_interval_s=15.0, heartbeat_timeout_s=30.0)  # answers stay cached
    old = Sender(config, EMBEDDING_FIELDS, "prefill-0", bootstrap.address)
    receiver = Receiver(config, EMBEDDING_FIELDS)
    new = None
    try:
        old.add(1)
        receiver.add(1, bootstrap.address, "prefill-0", incarnation=old.incarnation)
        drive([old, receiver], lambda: receiver.poll(1) is PollState.WAITING_FOR_INPUT)  # answer cached
        new = restart(config, bootstrap, old)
        drive([new], lambda: published(bootstrap, new))
        new.add(2)
        receiver.add(2, bootstrap.address, "prefill-0", incarnation=new.incarnation)
        drive([new, receiver], lambda: receiver.poll(2) is PollState.WAITING_FOR_INPUT, timeout=10)
        assert new.poll(2) is PollState.WAITING_FOR_INPUT
    finally:
        receiver.close()
        if new is not None:
            new.close()


def test_a_room_opened_without_an_incarnation_takes_whichever_is_published(registry):
    config, bootstrap = registry
    sender = Sender(config, EMBEDDING_FIELDS, "prefill-0", bootstrap.address)
    receiver = Receiver(config, EMBEDDING_FIELDS)
    try:
        sender.add(3)
        receiver.add(3, bootstrap.address, "prefill-0")
        drive([sender, receiver], lambda: receiver.poll(3) is PollState.WAITING_FOR_INPUT)
    finally:
        receiver.close()
        sender.close()


def test_a_room_of_a_sender_that_died_fails_once_the_registry_stops_naming_it(registry):
    """The drill's prefill kill: decode reserves pages for a request after its prefill died (and
    before any restart); waiting for the bootstrap timeout would outlive the request's deadline."""
    config, bootstrap = registry
    sender, receiver = seen_by_a_receiver(config, bootstrap)
    try:
        sender._registry.close()  # noqa: SLF001: killed, it withdraws nothing
        sender._channel.close()  # noqa: SLF001
        drive([receiver], lambda: "prefill-0" not in bootstrap.endpoints(), timeout=10)
        started = time.monotonic()
        receiver.add(2, bootstrap.address, "prefill-0", incarnation=sender.incarnation)
        drive([receiver], lambda: receiver.poll(2) is PollState.FAILED, timeout=15)
        assert time.monotonic() - started < 3, "the room of the dead sender waited for the bootstrap timeout"
        assert "sender prefill-0 is gone" in receiver.failure(2)
    finally:
        receiver.close()


def test_a_sender_that_only_missed_its_lease_is_taken_again_once_it_publishes(registry):
    config, bootstrap = registry
    sender, receiver = seen_by_a_receiver(config, bootstrap)
    try:
        # the sender stalls (not driven) past its lease: the registry drops it, its rooms fail
        drive([receiver], lambda: "prefill-0" not in bootstrap.endpoints(), timeout=10)
        receiver.add(2, bootstrap.address, "prefill-0", incarnation=sender.incarnation)
        drive([receiver], lambda: receiver.poll(2) is PollState.FAILED, timeout=5)
        sender.add(3)  # it wakes, publishes again; the same incarnation is alive after all
        drive([sender], lambda: "prefill-0" in bootstrap.endpoints())
        receiver.add(3, bootstrap.address, "prefill-0", incarnation=sender.incarnation)
        drive([sender, receiver], lambda: receiver.poll(3) is PollState.WAITING_FOR_INPUT, timeout=10)
    finally:
        receiver.close()
        sender.close()
