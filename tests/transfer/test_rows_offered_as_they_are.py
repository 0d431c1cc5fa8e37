"""A room handed to the sender as arrays of its own (prefill's KV, read from its pages) is offered
as it is when one chunk carries it, and a room that arrives in one chunk is kept as pulled: the
rows are copied into neither side's pool, bit-exact all the same. So are rows given from the
tokens a registered receiver holds on. A room that goes in chunks, or whose receiver holds tokens
the rows start before, is written into the sender's pool first and arrives bit-exact too; a
receiver holding fewer tokens than the rows start at fails the room, and so do rows that cannot
be placed on the buffers' devices (out of memory), without raising into the role. Every block is
freed on both sides."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import transfer.sender
from conftest import assert_received, drive
from transfer import PollState, TransferInfo, TransferMode
from transfer_payload import KV_FIELDS, payload, send_rows

pytestmark = pytest.mark.timeout(60)


def pool_written(buffers) -> bool:
    return any(np.asarray(pool).any() for pool in jax.device_get(list(buffers.pools.values())))


def receive(sender, receiver, bootstrap, room: int, held: int = 0):
    receiver.add(room, bootstrap.address, "prefill-0", TransferMode.KV, sender.incarnation, start_token=held)
    drive([sender, receiver], lambda: receiver.poll(room) is PollState.SUCCESS)
    drive([sender], lambda: sender.poll(room) is PollState.SUCCESS)
    return receiver.take(room)


def assert_rows(received, room: int, tokens: int, held: int, config) -> None:
    assert_received(received, payload(KV_FIELDS, room, tokens), config.block_size, held)


def assert_all_free(config, sender, receiver) -> None:
    assert receiver.allocator.available_blocks() == config.buffer_blocks
    assert sender.allocator.available_blocks() == config.buffer_blocks


def test_a_room_that_goes_in_one_chunk_touches_neither_pool(pair, config, bootstrap):
    sender, receiver = pair
    assert config.default_tokens == 16
    send_rows(sender, config, 1, 13)
    received = receive(sender, receiver, bootstrap, 1)
    assert len(received.chunks) == 1
    assert_rows(received, 1, 13, 0, config)
    assert not pool_written(sender.buffers)
    assert_all_free(config, sender, receiver)


def test_rows_from_the_tokens_a_registered_receiver_holds_touch_neither_pool(pair, config, bootstrap):
    sender, receiver = pair
    sender.add(4)
    receiver.add(4, bootstrap.address, "prefill-0", TransferMode.KV, sender.incarnation, start_token=8)
    drive([sender, receiver], lambda: sender.receiver_holds(4) is not None)
    assert sender.receiver_holds(4) == 8
    send_rows(sender, config, 4, 20, start=8)
    drive([sender, receiver], lambda: receiver.poll(4) is PollState.SUCCESS)
    drive([sender], lambda: sender.poll(4) is PollState.SUCCESS)
    received = receiver.take(4)
    assert (received.start_token, len(received.chunks)) == (8, 1)
    assert_rows(received, 4, 20, 8, config)
    assert not pool_written(sender.buffers)
    assert sender.staged_rooms == 0
    assert_all_free(config, sender, receiver)


def test_a_receiver_holding_fewer_tokens_than_the_rows_start_at_fails_the_room(pair, config, bootstrap):
    sender, receiver = pair
    send_rows(sender, config, 5, 20, start=8)
    receiver.add(5, bootstrap.address, "prefill-0", TransferMode.KV, sender.incarnation, start_token=4)
    drive([sender, receiver], lambda: receiver.poll(5) is PollState.FAILED)
    assert sender.poll(5) is PollState.FAILED and "rows from 8" in receiver.failure(5)
    receiver.forget(5)
    assert_all_free(config, sender, receiver)


@pytest.mark.parametrize(("tokens", "held", "chunks"), [(40, 0, 2), (20, 8, 1)])
def test_a_room_sent_in_chunks_or_past_held_tokens_is_staged_and_arrives_whole(pair, config, bootstrap, tokens,
                                                                             held, chunks):
    """(40, 0): 16 tokens in the first allocation, the other 24 resumed; (20, 8): one chunk from token 8."""
    sender, receiver = pair
    send_rows(sender, config, 2, tokens)
    received = receive(sender, receiver, bootstrap, 2, held)
    assert (received.start_token, len(received.chunks)) == (held, chunks)
    assert_rows(received, 2, tokens, held, config)
    assert pool_written(sender.buffers) and sender.staged_rooms == 1
    assert_all_free(config, sender, receiver)


def test_rows_not_in_the_rooms_bucket_are_refused_and_take_nothing(pair, config):
    sender, _ = pair
    allocation = sender.allocator.alloc(13)
    rows = payload(KV_FIELDS, 3, 13)  # 13 rows, not padded to the bucket of 16
    with pytest.raises(ValueError, match="rows"):
        sender.send(3, allocation, TransferInfo(TransferMode.KV, 13, first_token=7), rows=rows)
    sender.allocator.free(allocation)  # still the caller's
    assert sender.allocator.available_blocks() == config.buffer_blocks


def test_rows_that_cannot_be_placed_fail_their_room_and_free_its_blocks(pair, config, bootstrap, monkeypatch):
    """The copy onto the buffers' devices raised out of ``send`` after the role had given up its
    blocks, with an error the role's outbox does not take for a refusal: the blocks leaked and the
    error reached the role's loop."""
    sender, receiver = pair

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while trying to allocate")
    with monkeypatch.context() as patch:
        patch.setattr(transfer.sender.jax, "device_put", out_of_memory)
        send_rows(sender, config, 6, 13)
    assert sender.poll(6) is PollState.FAILED
    receiver.add(6, bootstrap.address, "prefill-0", TransferMode.KV, sender.incarnation)
    drive([sender, receiver], lambda: receiver.poll(6) is PollState.FAILED)
    assert "failed" in receiver.failure(6)
    receiver.forget(6)
    assert_all_free(config, sender, receiver)
