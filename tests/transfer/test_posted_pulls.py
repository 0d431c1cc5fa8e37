"""A receiver that knows a room's length pulls its one chunk as soon as the sender has taken the
registration, before the sender offers it (the jax transfer server holds such a pull until the
offer comes): the chunk lands without waiting for the Ready's hop and the pull's start. Every
posted pull is answered, by its chunk or, when none will come (the room ended first, the length
was wrong), by zero rows, so none is left holding its arrays; rows arrive bit for bit either way."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import QUICK, assert_received, drive
from transfer import DataPlaneError, PollState, Receiver, Sender, TransferMode
from transfer.posted_pulls import MAX_POSTED_PULLS
from transfer_payload import EMBEDDING_FIELDS, KV_FIELDS, payload, send_pooled

pytestmark = pytest.mark.timeout(60)


def open_room(sender, receiver, bootstrap, room: int, expected: int | None, held: int = 0) -> None:
    sender.add(room)
    receiver.add(room, bootstrap.address, "prefill-0", TransferMode.KV, sender.incarnation, start_token=held,
                 expected_tokens=expected)
    drive([sender, receiver], lambda: receiver.poll(room) is PollState.WAITING_FOR_INPUT)


def assert_all_free(sender, receiver, config) -> None:
    drive([sender, receiver], lambda: receiver.unanswered_pulls() == 0)
    assert receiver.allocator.available_blocks() == config.buffer_blocks
    assert sender.allocator.available_blocks() == config.buffer_blocks


@pytest.mark.parametrize(("tokens", "held"), [(13, 0), (16, 0), (20, 6)])
def test_a_room_of_known_length_lands_through_the_pull_posted_before_its_offer(pair, config, bootstrap, tokens, held):
    sender, receiver = pair
    assert tokens - held <= config.default_tokens
    open_room(sender, receiver, bootstrap, 1, tokens, held)
    assert (receiver.posting.made, receiver.unanswered_pulls()) == (1, 1)  # made, and waiting for the offer
    send_pooled(sender, config, 1, tokens)
    drive([sender, receiver], lambda: receiver.poll(1) is PollState.SUCCESS)
    drive([sender], lambda: sender.poll(1) is PollState.SUCCESS)
    assert receiver.posting.taken == 1
    received = receiver.take(1)
    assert len(received.chunks) == 1
    assert_received(received, payload(KV_FIELDS, 1, tokens), config.block_size, held)
    sender.forget(1)
    assert_all_free(sender, receiver, config)


@pytest.mark.parametrize("ended_by", ["receiver", "sender"])
def test_a_room_ended_before_its_offer_answers_its_posted_pull_with_zeros(pair, config, bootstrap, ended_by):
    sender, receiver = pair
    open_room(sender, receiver, bootstrap, 2, 12)
    assert receiver.unanswered_pulls() == 1
    (receiver if ended_by == "receiver" else sender).abort(2)
    drive([sender, receiver], lambda: receiver.poll(2) is PollState.FAILED and sender.poll(2) is PollState.FAILED)
    receiver.forget(2)
    assert_all_free(sender, receiver, config)  # the zero rows landed: the pull holds nothing any more


def test_a_wrong_length_costs_only_the_posted_pull(pair, config, bootstrap):
    sender, receiver = pair
    open_room(sender, receiver, bootstrap, 3, 10)  # the room turns out to hold 14 tokens
    send_pooled(sender, config, 3, 14)
    drive([sender, receiver], lambda: receiver.poll(3) is PollState.SUCCESS)
    assert (receiver.posting.made, receiver.posting.taken) == (1, 0)
    assert_received(receiver.take(3), payload(KV_FIELDS, 3, 14), config.block_size)
    drive([sender], lambda: sender.poll(3) is PollState.SUCCESS)
    sender.forget(3)
    assert_all_free(sender, receiver, config)


def test_rooms_past_one_chunk_or_the_limit_pull_on_their_ready(pair, config, bootstrap):
    sender, receiver = pair
    rooms = [(10, 40)] + [(11 + i, 8) for i in range(MAX_POSTED_PULLS + 1)]  # 40 tokens: three chunks
    for room, tokens in rooms:
        open_room(sender, receiver, bootstrap, room, tokens)
    assert receiver.posting.made == MAX_POSTED_PULLS
    for room, tokens in rooms:
        send_pooled(sender, config, room, tokens)
    drive([sender, receiver], lambda: all(receiver.poll(r) is PollState.SUCCESS for r, _ in rooms))
    assert receiver.posting.taken == MAX_POSTED_PULLS
    for room, tokens in rooms:
        assert_received(receiver.take(room), payload(KV_FIELDS, room, tokens), config.block_size)
        drive([sender], lambda: sender.poll(room) is PollState.SUCCESS)
        sender.forget(room)
    assert_all_free(sender, receiver, config)


def test_a_data_plane_that_cannot_hold_early_pulls_posts_none(bootstrap):
    config = dataclasses.replace(QUICK, data_plane="zmq")
    sender, receiver = Sender(config, KV_FIELDS, "prefill-0", bootstrap.address), Receiver(config, KV_FIELDS)
    try:
        open_room(sender, receiver, bootstrap, 4, 12)
        send_pooled(sender, config, 4, 12)
        drive([sender, receiver], lambda: receiver.poll(4) is PollState.SUCCESS)
        assert receiver.posting.made == 0
        assert_received(receiver.take(4), payload(KV_FIELDS, 4, 12), config.block_size)
    finally:
        receiver.close()
        sender.close()


def test_a_posted_pull_ends_when_its_sender_is_killed(config, bootstrap, spawn):
    sender = spawn("sender", config, name="encode-0", bootstrap=bootstrap.address)
    receiver = Receiver(config, EMBEDDING_FIELDS)
    try:
        receiver.add(5, bootstrap.address, "encode-0", expected_tokens=12)
        drive([receiver], lambda: receiver.poll(5) is PollState.WAITING_FOR_INPUT)
        assert receiver.unanswered_pulls() == 1
        sender.kill()
        drive([receiver], lambda: receiver.poll(5) is PollState.FAILED, timeout=config.heartbeat_timeout_s + 5)
        receiver.forget(5)
        drive([receiver], lambda: receiver.unanswered_pulls() == 0)  # the dead peer's connection ended it
        assert receiver.allocator.available_blocks() == config.buffer_blocks
    finally:
        receiver.close()


def test_a_refused_registration_makes_no_pull_and_gives_its_limits_back(pair, config, bootstrap):
    sender, receiver = pair
    for room in (6, 7):  # ended by the sender before their receiver registered
        sender.add(room)
        sender.abort(room)
        sender.forget(room)
        receiver.add(room, bootstrap.address, "prefill-0", TransferMode.KV, sender.incarnation, expected_tokens=8)
    drive([sender, receiver], lambda: all(receiver.poll(r) is PollState.FAILED for r in (6, 7)))
    assert (receiver.posting.made, receiver.unanswered_pulls()) == (0, 0)
    open_room(sender, receiver, bootstrap, 8, 8)
    assert receiver.posting.made == 1
    send_pooled(sender, config, 8, 8)
    drive([sender, receiver], lambda: receiver.poll(8) is PollState.SUCCESS)
    assert receiver.posting.taken == 1
    assert_received(receiver.take(8), payload(KV_FIELDS, 8, 8), config.block_size)


def test_an_offer_refused_under_a_posted_uuid_still_answers_that_pull(pair, config, bootstrap, monkeypatch):
    """The room fails, and the pull posted for its chunk gets zero rows like any other that no chunk
    will answer, instead of holding its arrays until the transfer server gives up on it."""
    sender, receiver = pair
    open_room(sender, receiver, bootstrap, 9, 12)
    assert receiver.unanswered_pulls() == 1
    offer, refused = sender.data_plane.offer, []

    def refuse_once(uuid, arrays, timeout_s):
        if not refused:
            refused.append(uuid)
            raise DataPlaneError(f"offer {uuid} refused")
        offer(uuid, arrays, timeout_s)

    monkeypatch.setattr(sender.data_plane, "offer", refuse_once)
    send_pooled(sender, config, 9, 12)
    drive([sender, receiver], lambda: receiver.poll(9) is PollState.FAILED and sender.poll(9) is PollState.FAILED)
    assert receiver.posting.taken == 0
    receiver.forget(9)
    sender.forget(9)
    assert_all_free(sender, receiver, config)  # the zero rows landed under the refused uuid
