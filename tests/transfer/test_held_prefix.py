"""A receiver that already holds a room's first tokens (decode's own prefix cache) registers them as
held: only the rest is offered and moved, every row bit-exact, and a room with nothing left to send
fails on both sides with the reason, every block freed."""

from __future__ import annotations

import pytest

from conftest import assert_received, drive
from transfer import PollState, TransferMode
from transfer_payload import KV_FIELDS, payload, send_pooled

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(("tokens", "held", "chunks"), [(20, 8, 1), (60, 12, 2)])
def test_only_the_tokens_past_the_held_ones_move(pair, config, bootstrap, tokens, held, chunks):
    """(60, 12): 48 tokens to move through a 16-token first allocation: the other 32 resume."""
    sender, receiver = pair
    assert config.default_tokens == 16
    send_pooled(sender, config, 1, tokens)
    receiver.add(1, bootstrap.address, "prefill-0", TransferMode.KV, sender.incarnation, start_token=held)
    drive([sender, receiver], lambda: receiver.poll(1) is PollState.SUCCESS)
    drive([sender], lambda: sender.poll(1) is PollState.SUCCESS)
    received = receiver.take(1)
    assert (received.start_token, received.num_tokens, len(received.chunks)) == (held, tokens, chunks)
    assert_received(received, payload(KV_FIELDS, 1, tokens), config.block_size, held)
    assert sender.sent_tokens(1) == tokens
    assert receiver.allocator.available_blocks() == config.buffer_blocks
    assert sender.allocator.available_blocks() == config.buffer_blocks


@pytest.mark.parametrize("registers_first", [True, False])
def test_a_receiver_holding_every_token_fails_the_room_on_both_sides(pair, config, bootstrap, registers_first):
    sender, receiver = pair
    if registers_first:
        sender.add(2)
        receiver.add(2, bootstrap.address, "prefill-0", TransferMode.KV, start_token=10)
        drive([sender, receiver], lambda: receiver.poll(2) is PollState.WAITING_FOR_INPUT)
        send_pooled(sender, config, 2, 10)
    else:
        send_pooled(sender, config, 2, 10)
        receiver.add(2, bootstrap.address, "prefill-0", TransferMode.KV, start_token=10)
    drive([sender, receiver], lambda: receiver.poll(2) is PollState.FAILED)
    assert sender.poll(2) is PollState.FAILED
    assert "nothing to send" in sender.failure(2) and "nothing to send" in receiver.failure(2)
    receiver.forget(2)
    assert receiver.allocator.available_blocks() == config.buffer_blocks
    assert sender.allocator.available_blocks() == config.buffer_blocks


def test_a_negative_start_is_refused(pair, bootstrap):
    _, receiver = pair
    with pytest.raises(ValueError, match="start_token"):
        receiver.add(3, bootstrap.address, "prefill-0", TransferMode.KV, start_token=-1)
