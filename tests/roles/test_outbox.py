"""The outbox stages rows as sender blocks free up, in order, and a failed write fails only its room."""

import numpy as np
import pytest

from mmserve.roles.outbox import Outbox, Parcel
from transfer.bootstrap import BootstrapServer
from transfer.config import TransferConfig
from transfer.fields import field
from transfer.messages import TransferInfo, TransferMode
from transfer.poll import PollState
from transfer.sender import Sender

FIELDS = (field("embeddings", (4,), "float32"),)


@pytest.fixture
def sender():
    config = TransferConfig(block_size=4, default_blocks=1, buffer_blocks=4, data_plane="zmq")
    registry = BootstrapServer(config).start()
    s = Sender(config, FIELDS, "encode-test", registry.address)
    yield s
    s.close()
    registry.close()


def parcel(room: int, tokens: int, width: int = 4) -> Parcel:
    rows = {"embeddings": np.full((tokens, width), room, np.float32)}
    return Parcel(room, rows, TransferInfo(TransferMode.EMBEDDING, tokens))


def test_parcels_wait_for_blocks_in_order(sender):
    failures = []
    outbox = Outbox(sender, lambda room, reason: failures.append(room))
    outbox.put(parcel(1, 12))  # 3 of the 4 blocks
    outbox.put(parcel(2, 8))  # 2 blocks: must wait
    outbox.put(parcel(3, 4))  # would fit, but stays behind room 2
    outbox.flush()
    assert len(outbox) == 2 and sender.allocator.available_blocks() == 1
    sender.abort(1, "test")  # room 1's blocks go back to the pool
    outbox.flush()
    assert len(outbox) == 0 and failures == []
    assert sender.allocator.available_blocks() == 1  # rooms 2 and 3 hold 2 + 1 blocks
    assert sender.poll(2) is PollState.BOOTSTRAPPING


def test_a_failed_write_frees_its_blocks_and_fails_only_its_room(sender):
    failures = []
    outbox = Outbox(sender, lambda room, reason: failures.append((room, reason)))
    outbox.put(parcel(7, 4, width=3))  # rows of the wrong shape
    outbox.put(parcel(8, 4))
    outbox.flush()
    assert [room for room, _ in failures] == [7] and "could not stage rows" in failures[0][1]
    assert sender.allocator.available_blocks() == 3  # only room 8's block is held
    assert len(outbox) == 0
