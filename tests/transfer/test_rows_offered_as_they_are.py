"""A room handed to the sender as arrays of its own (prefill's KV, read from its pages) is offered
as it is when one chunk carries it, and a room that arrives in one chunk is kept as pulled: the
rows are copied into neither side's pool, bit-exact all the same. A room that goes in chunks, or
past tokens the receiver holds, is written into the sender's pool first and arrives bit-exact too;
every block is freed on both sides."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import drive
from transfer import PollState, Receiver, Sender, TransferInfo, TransferMode
from transfer_payload import KV_FIELDS, padded_payload, payload

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pair(config, bootstrap):
    sender = Sender(config, KV_FIELDS, "prefill-0", bootstrap.address)
    receiver = Receiver(config, KV_FIELDS)
    yield sender, receiver
    receiver.close()
    sender.close()


def pool_written(buffers) -> bool:
    return any(np.asarray(pool).any() for pool in jax.device_get(list(buffers.pools.values())))


def send_rows(sender: Sender, config, room: int, tokens: int) -> None:
    allocation = sender.allocator.alloc(tokens)
    sender.send(room, allocation, TransferInfo(TransferMode.KV, tokens, first_token=7),
                rows=padded_payload(KV_FIELDS, room, tokens, config.block_size))


def receive(sender, receiver, bootstrap, room: int, held: int = 0):
    receiver.add(room, bootstrap.address, "prefill-0", TransferMode.KV, sender.incarnation, start_token=held)
    drive([sender, receiver], lambda: receiver.poll(room) is PollState.SUCCESS)
    drive([sender], lambda: sender.poll(room) is PollState.SUCCESS)
    return receiver.take(room)


def assert_rows(received, room: int, tokens: int, held: int, receiver) -> None:
    expected = payload(KV_FIELDS, room, tokens)
    for field in KV_FIELDS:
        rows = np.asarray(received.arrays[field.name])
        assert rows.shape[0] == receiver.buffers.bucket(tokens - held)
        np.testing.assert_array_equal(rows[:tokens - held], expected[field.name][held:], err_msg=field.name)
        assert not rows[tokens - held:].any()


def assert_all_free(config, sender, receiver) -> None:
    assert receiver.allocator.available_blocks() == config.buffer_blocks
    assert sender.allocator.available_blocks() == config.buffer_blocks


def test_a_room_that_goes_in_one_chunk_touches_neither_pool(pair, config, bootstrap):
    sender, receiver = pair
    assert config.default_tokens == 16
    send_rows(sender, config, 1, 13)
    received = receive(sender, receiver, bootstrap, 1)
    assert received.chunks == 1
    assert_rows(received, 1, 13, 0, receiver)
    assert not pool_written(sender.buffers) and not pool_written(receiver.buffers)
    assert_all_free(config, sender, receiver)


@pytest.mark.parametrize(("tokens", "held", "chunks"), [(40, 0, 2), (20, 8, 1)])
def test_a_room_sent_in_chunks_or_past_held_tokens_is_staged_and_arrives_whole(pair, config, bootstrap, tokens,
                                                                             held, chunks):
    """(40, 0): 16 tokens in the first allocation, the other 24 resumed; (20, 8): one chunk from token 8."""
    sender, receiver = pair
    send_rows(sender, config, 2, tokens)
    received = receive(sender, receiver, bootstrap, 2, held)
    assert (received.start_token, received.chunks) == (held, chunks)
    assert_rows(received, 2, tokens, held, receiver)
    assert pool_written(sender.buffers)
    assert_all_free(config, sender, receiver)


def test_rows_not_in_the_rooms_bucket_are_refused_and_take_nothing(pair, config):
    sender, _ = pair
    allocation = sender.allocator.alloc(13)
    rows = payload(KV_FIELDS, 3, 13)  # 13 rows, not padded to the bucket of 16
    with pytest.raises(ValueError, match="rows"):
        sender.send(3, allocation, TransferInfo(TransferMode.KV, 13, first_token=7), rows=rows)
    sender.allocator.free(allocation)  # still the caller's
    assert sender.allocator.available_blocks() == config.buffer_blocks
