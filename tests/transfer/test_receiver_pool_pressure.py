"""More rooms at once than the receiver's pool holds together: each waits for room, holding
nothing, and every one arrives. (A receiver that reserved a room piece by piece left each of
twelve rooms holding its default while it waited for the rest: the pool was full of parts and no
room could finish until their timeouts failed them all.)"""

from __future__ import annotations

import dataclasses

import pytest

from conftest import assert_received, drive, run_for
from transfer import PollState, Receiver, Sender, TransferInfo, TransferMode
from transfer_payload import EMBEDDING_FIELDS, padded_payload, payload

pytestmark = pytest.mark.timeout(60)
ROOMS = range(1, 13)
TOKENS = 100
"""Each room: 25 blocks of 4 against the receiver's 64 (its default holds 16 tokens)."""


def test_rooms_that_together_overfill_the_receivers_pool_all_arrive(config, bootstrap):
    receiver = Receiver(config, EMBEDDING_FIELDS)
    sender = Sender(dataclasses.replace(config, buffer_blocks=512), EMBEDDING_FIELDS, "encode-0", bootstrap.address)
    assert config.default_tokens < TOKENS <= config.buffer_blocks * config.block_size < len(ROOMS) * TOKENS
    try:
        for room in ROOMS:
            receiver.add(room, bootstrap.address, "encode-0")
            allocation = sender.allocator.alloc(TOKENS)
            sender.buffers.write(allocation, 0, padded_payload(EMBEDDING_FIELDS, room, TOKENS, config.block_size),
                                 num_tokens=TOKENS)
            sender.send(room, allocation, TransferInfo(TransferMode.EMBEDDING, TOKENS))
        taken = {}

        def all_taken() -> bool:  # as a role does: each room taken (its blocks freed) once it has arrived
            for room in [r for r in ROOMS if r not in taken]:
                assert receiver.poll(room) is not PollState.FAILED, receiver.failure(room)
                if receiver.poll(room) is PollState.SUCCESS:
                    taken[room] = receiver.take(room)
            return len(taken) == len(ROOMS)

        drive([sender, receiver], all_taken, timeout=15)  # the rooms' own timeouts are 20 s
        for room, received in taken.items():
            assert_received(received, payload(EMBEDDING_FIELDS, room, TOKENS), config.block_size)
        drive([sender], lambda: all(sender.poll(room) is PollState.SUCCESS for room in ROOMS))
        assert receiver.allocator.available_blocks() == config.buffer_blocks
        assert sender.allocator.available_blocks() == sender.config.buffer_blocks
    finally:
        receiver.close()
        sender.close()


def test_rooms_waiting_for_the_pool_reserve_in_the_order_they_began_to_wait(config, bootstrap):
    """A small room whose first chunk comes while a large one waits waits behind it, though the
    pool could hold the small one now: else rooms that fit would keep passing the large one
    (until its timeout) whenever the space it waits for frees up piece by piece."""
    receiver = Receiver(config, EMBEDDING_FIELDS)
    sender = Sender(config, EMBEDDING_FIELDS, "encode-0", bootstrap.address)
    pool = config.buffer_blocks * config.block_size
    taken = receiver.allocator.alloc(pool - 60)  # 60 tokens free: not enough for the large room
    rooms = {1: 100, 2: 20}  # in this order
    try:
        for room, tokens in rooms.items():
            receiver.add(room, bootstrap.address, "encode-0")
            allocation = sender.allocator.alloc(tokens)
            sender.buffers.write(allocation, 0, padded_payload(EMBEDDING_FIELDS, room, tokens, config.block_size),
                                 num_tokens=tokens)
            sender.send(room, allocation, TransferInfo(TransferMode.EMBEDDING, tokens))
            drive([sender, receiver], lambda: sender.poll(room) is PollState.TRANSFERRING)  # its Ready is out
        run_for([sender, receiver], 0.5)
        assert receiver.poll(2) is PollState.WAITING_FOR_INPUT  # behind room 1, holding nothing
        assert receiver.allocator.available_blocks() * config.block_size == 60
        receiver.allocator.free(taken)
        drive([sender, receiver], lambda: all(receiver.poll(room) is PollState.SUCCESS for room in rooms))
        for room, tokens in rooms.items():
            assert_received(receiver.take(room), payload(EMBEDDING_FIELDS, room, tokens), config.block_size)
        assert receiver.allocator.available_blocks() == config.buffer_blocks
    finally:
        receiver.close()
        sender.close()
