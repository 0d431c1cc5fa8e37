"""The outbox stages rows as sender blocks free up, in order, only for rooms whose receiver has
registered, and a failed write fails only its room. A room whose rows are one run of one array is
offered as rows of its own (the sender's pool untouched); runs of several arrays are written into
the pool. Either way the receiver gets the runs end to end."""

import time

import jax
import numpy as np
import pytest

from mmserve.roles.outbox import Outbox, Parcel, Run
from transfer.bootstrap import BootstrapServer
from transfer.config import TransferConfig
from transfer.fields import field
from transfer.messages import TransferInfo, TransferMode
from transfer.poll import PollState
from transfer.receiver import Receiver
from transfer.sender import Sender

from idle_receiver import IdleReceiver

FIELDS = (field("embeddings", (4,), "float32"),)


@pytest.fixture
def registry():
    config = TransferConfig(block_size=4, default_blocks=1, buffer_blocks=4, data_plane="zmq")
    server = BootstrapServer(config).start()
    yield server
    server.close()


@pytest.fixture
def sender(registry):
    s = Sender(registry.config, FIELDS, "encode-test", registry.address)
    yield s
    s.close()


@pytest.fixture
def receiver(sender, registry):
    r = IdleReceiver(sender, registry.address, TransferMode.EMBEDDING)
    yield r
    r.close()


def parcel(room: int, tokens: int, width: int = 4) -> Parcel:
    rows = {"embeddings": np.full((tokens, width), room, np.float32)}
    return Parcel(room, TransferInfo(TransferMode.EMBEDDING, tokens), [Run(rows, 0, tokens)])


def test_parcels_wait_for_blocks_in_order(sender, receiver):
    receiver.register(1, 2, 3)
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
    assert sender.poll(2) is PollState.TRANSFERRING


def test_a_room_whose_receiver_has_not_registered_takes_no_blocks_and_holds_back_none(sender, receiver):
    """A receiver may hold back a registration until another room lands (decode, for a request
    sharing its first page with one arriving): the unregistered room's rows must not take the
    blocks the other one needs, nor stand in its way."""
    receiver.register(2)
    failures = []
    outbox = Outbox(sender, lambda room, reason: failures.append(room))
    outbox.put(parcel(1, 16))  # the whole pool, its receiver not there yet
    outbox.put(parcel(2, 8))
    outbox.flush()
    assert len(outbox) == 1 and sender.allocator.available_blocks() == 2
    assert sender.poll(2) is PollState.TRANSFERRING
    receiver.register(1)
    outbox.flush()
    assert len(outbox) == 1  # registered now, it waits for room 2's blocks
    sender.abort(2, "test")
    outbox.flush()
    assert len(outbox) == 0 and sender.allocator.available_blocks() == 0 and failures == []
    assert sender.poll(1) is PollState.TRANSFERRING


def test_a_failed_write_frees_its_blocks_and_fails_only_its_room(sender, receiver):
    receiver.register(7, 8)
    failures = []
    outbox = Outbox(sender, lambda room, reason: failures.append((room, reason)))
    outbox.put(parcel(7, 4, width=3))  # rows of the wrong shape
    outbox.put(parcel(8, 4))
    outbox.flush()
    assert [room for room, _ in failures] == [7] and "could not stage rows" in failures[0][1]
    assert sender.allocator.available_blocks() == 3  # only room 8's block is held
    assert len(outbox) == 0


def pool_written(sender) -> bool:
    return bool(np.asarray(jax.device_get(sender.buffers.pools["embeddings"])).any())


FIRST = np.arange(1, 8 * 4 + 1, dtype=np.float32).reshape(8, 4)
SECOND = -np.arange(1, 4 * 4 + 1, dtype=np.float32).reshape(4, 4)


@pytest.mark.parametrize("runs, expected", [
    ([Run({"embeddings": FIRST}, 5, 3), Run({"embeddings": SECOND}, 1, 2)], np.concatenate([FIRST[5:8], SECOND[1:3]])),
    ([Run({"embeddings": FIRST}, 1, 3), Run({"embeddings": FIRST}, 6, 2)], np.concatenate([FIRST[1:4], FIRST[6:8]])),
], ids=["two_arrays", "a_gap_between"])
def test_runs_not_one_run_are_written_end_to_end_from_their_own_offsets(sender, registry, runs, expected):
    """A request's pictures are runs of larger arrays (their vision calls' outputs): each run's rows
    land after the previous run's, taken from the run's own start."""
    failures = []
    outbox = Outbox(sender, lambda room, reason: failures.append(room))
    outbox.put(Parcel(9, TransferInfo(TransferMode.EMBEDDING, 5), runs))
    got = received_rows_after_flush(outbox, sender, registry, 9)
    assert failures == [] and len(outbox) == 0
    assert np.array_equal(got, expected)
    assert pool_written(sender)


def test_runs_that_are_one_run_of_one_array_are_offered_without_touching_the_pool(sender, registry):
    """Pictures one vision call encoded together are one run: taken out as rows of their own and
    offered as they are, as prefill's KV is."""
    failures = []
    outbox = Outbox(sender, lambda room, reason: failures.append(room))
    runs = [Run({"embeddings": FIRST}, 2, 3), Run({"embeddings": FIRST}, 5, 1)]  # one chunk: the receiver takes 4
    outbox.put(Parcel(4, TransferInfo(TransferMode.EMBEDDING, 4), runs))
    got = received_rows_after_flush(outbox, sender, registry, 4)
    assert failures == [] and len(outbox) == 0
    assert np.array_equal(got, FIRST[2:6])
    assert not pool_written(sender) and sender.staged_rooms == 0
    assert sender.allocator.available_blocks() == 4


def received_rows_after_flush(outbox, sender, registry, room: int) -> np.ndarray:
    """Registers a real receiver for the room, flushes the outbox once it has, and pulls."""
    receiver = Receiver(registry.config, FIELDS)
    try:
        receiver.add(room, registry.address, "encode-test", TransferMode.EMBEDDING, sender.incarnation)
        deadline = time.monotonic() + 20
        while sender.receiver_holds(room) is None or receiver.poll(room) is not PollState.SUCCESS:
            assert time.monotonic() < deadline and not receiver.poll(room).terminal, receiver.poll(room)
            outbox.flush()
            sender.progress(0.002)
            receiver.progress(0.002)
        while not sender.poll(room).terminal:
            assert time.monotonic() < deadline
            sender.progress(0.002)
        return receiver.take(room).host("embeddings")
    finally:
        receiver.close()


def test_runs_that_do_not_add_up_to_the_room_fail_it(sender, receiver):
    receiver.register(3)
    failures = []
    outbox = Outbox(sender, lambda room, reason: failures.append(room))
    rows = {"embeddings": np.zeros((4, 4), np.float32)}
    outbox.put(Parcel(3, TransferInfo(TransferMode.EMBEDDING, 3), [Run(rows, 0, 2)]))
    outbox.flush()
    assert failures == [3] and sender.allocator.available_blocks() == 4


def test_rows_the_sender_cannot_read_back_fail_their_room_and_free_its_blocks_once(sender, receiver, monkeypatch):
    """Once the sender has taken a room's blocks they are its to free: a chunk it cannot read out
    of its pool (a device out of memory, say) fails that room alone, as its poll says, its blocks
    freed once (the outbox freeing them too freed them twice and raised), and a room still waiting
    for its receiver stays."""
    receiver.register(11)
    failures = []

    def fail_room(room: int, reason: str) -> None:  # as the roles' _fail_room does
        failures.append(room)
        if not sender.poll(room).terminal:
            sender.abort(room, reason)

    outbox = Outbox(sender, fail_room)
    outbox.put(parcel(12, 4))  # its receiver has not registered
    rows = {"embeddings": np.ones((2, 4), np.float32)}
    outbox.put(Parcel(11, TransferInfo(TransferMode.EMBEDDING, 4), [Run(rows, 0, 2), Run(dict(rows), 0, 2)]))

    def unreadable(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(sender.buffers, "read", unreadable)
    outbox.flush()
    assert sender.poll(11) is PollState.FAILED and "could not stage rows: out of memory" in sender.failure(11)
    assert sender.allocator.available_blocks() == 4 and len(outbox) == 1
    receiver.register(12)
    monkeypatch.undo()
    outbox.flush()
    assert sender.poll(12) is PollState.TRANSFERRING and failures == []
