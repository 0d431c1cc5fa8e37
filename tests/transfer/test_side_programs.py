"""What a sender compiles before serving covers every transfer it then makes: after
``Sender.programs`` ran, rooms of every length up to the maximum, in one chunk or resumed, compile
no pool write or read on either side (the receiver keeps chunks as pulled: it has no pool)."""

from __future__ import annotations

import pytest

from conftest import drive
from transfer import PollState, Receiver, Sender, TransferInfo, TransferMode
from transfer.block_buffers import _gather, _scatter
from transfer_payload import KV_FIELDS, padded_payload

pytestmark = pytest.mark.timeout(120)


def test_after_both_sides_programs_ran_no_room_compiles(config, bootstrap):
    max_tokens = 4 * config.default_tokens
    sender = Sender(config, KV_FIELDS, "prefill-0", bootstrap.address)
    receiver = Receiver(config, KV_FIELDS)
    try:
        for program in sender.programs(max_tokens):
            program()
        compiled = (_scatter._cache_size(), _gather._cache_size())
        for room, tokens in enumerate((1, 5, config.default_tokens, config.default_tokens + 1, max_tokens), 1):
            allocation = sender.allocator.alloc(tokens)
            sender.buffers.write(allocation, 0, padded_payload(KV_FIELDS, room, tokens, config.block_size),
                                 num_tokens=tokens)
            sender.send(room, allocation, TransferInfo(TransferMode.KV, tokens, first_token=7))
            receiver.add(room, bootstrap.address, "prefill-0", TransferMode.KV, sender.incarnation)
            drive([sender, receiver], lambda room=room: receiver.poll(room) is PollState.SUCCESS)
            drive([sender], lambda room=room: sender.poll(room) is PollState.SUCCESS)
            received = receiver.take(room)
            assert len(received.chunks) == (1 if tokens <= config.default_tokens else 2)
        assert (_scatter._cache_size(), _gather._cache_size()) == compiled
    finally:
        receiver.close()
        sender.close()
