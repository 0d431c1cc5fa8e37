"""Rooms between real processes on loopback: every field arrives bit-exact, in both modes.

The in-process side is a real Sender or Receiver driven by ``drive``; the other side is a
transfer_peer.py process. Nothing is mocked: ZMQ control, the registry and the data plane
are the real ones.
"""

from __future__ import annotations

import dataclasses
import tempfile

import pytest

from conftest import assert_received, drive, run_for
from transfer import PollState, Receiver, Sender, TransferInfo, TransferMode
from transfer_payload import EMBEDDING_FIELDS, KV_FIELDS, digests, padded_payload, payload

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def assert_bit_exact(received, fields, room: int, block_size: int) -> None:
    assert_received(received, payload(fields, room, received.num_tokens), block_size)


def receive(receiver: Receiver, sender, room: int, timeout: float = 30.0):
    sender.state(room, "success", timeout=timeout, parties=[receiver])
    drive([receiver], lambda: receiver.poll(room) is PollState.SUCCESS)
    return receiver.take(room)


@pytest.mark.parametrize("plane", ["jax", "zmq", "private"])
def test_embedding_that_fits_and_one_that_resumes_arrive_bit_exact(plane, config, bootstrap, spawn):
    """``private``: the zmq plane on Unix sockets in a directory only this user enters (``--role
    all``'s), which ``auto`` picks when given one."""
    if plane == "private":
        config = dataclasses.replace(config, data_plane="auto", data_plane_dir=tempfile.mkdtemp())
    else:
        config = dataclasses.replace(config, data_plane=plane)
    sender = spawn("sender", config, name="encode-0", bootstrap=bootstrap.address)
    receiver = Receiver(config, EMBEDDING_FIELDS)
    assert receiver.data_plane.kind == ("zmq" if plane == "private" else plane)
    assert receiver.data_plane.address.startswith(f"ipc://{config.data_plane_dir}/") == (plane == "private")
    fits, resumes = 1, 2
    assert 9 <= config.default_tokens < 50
    for room, tokens in ((fits, 9), (resumes, 50)):
        receiver.add(room, bootstrap.address, "encode-0")
        sender.command(op="send", room=room, tokens=tokens)
    for room, tokens, chunks in ((fits, 9, 1), (resumes, 50, 2)):
        received = receive(receiver, sender, room)
        assert received.num_tokens == tokens and len(received.chunks) == chunks
        assert received.info.aux == {"rope_delta": -room}
        assert_bit_exact(received, EMBEDDING_FIELDS, room, config.block_size)
    assert receiver.allocator.available_blocks() == config.buffer_blocks
    status = sender.status()
    assert status["available"] == status["total"]
    receiver.close()


def test_rooms_arrive_bit_exact_with_the_jax_servers_knobs_set(config, bootstrap, spawn):
    """A transfer size far below a room's bytes cuts each pull into many pieces, copied two at a
    time from raw buffers, on both sides (the peer takes them from its environment)."""
    config = dataclasses.replace(config, data_plane="jax", jax_transfer_size=512, jax_parallel_copies=2,
                                 jax_raw_buffers=True)
    sender = spawn("sender", config, name="encode-0", bootstrap=bootstrap.address)
    receiver = Receiver(config, EMBEDDING_FIELDS)
    for room, tokens in ((1, 9), (2, 50)):
        receiver.add(room, bootstrap.address, "encode-0")
        sender.command(op="send", room=room, tokens=tokens)
    for room, tokens in ((1, 9), (2, 50)):
        received = receive(receiver, sender, room)
        assert received.num_tokens == tokens
        assert_bit_exact(received, EMBEDDING_FIELDS, room, config.block_size)
    receiver.close()


def test_many_rooms_from_one_sender_reach_two_receivers(config, bootstrap, spawn):
    config = dataclasses.replace(config, buffer_blocks=256)
    receivers = [spawn("receiver", config), spawn("receiver", config)]
    sender = Sender(config, EMBEDDING_FIELDS, "encode-0", bootstrap.address)
    lengths = {10 + i: n for i, n in enumerate((3, 4, 16, 13, 40, 37, 64, 61))}
    for room, tokens in lengths.items():
        allocation = sender.allocator.alloc(tokens)
        sender.buffers.write(allocation, 0, padded_payload(EMBEDDING_FIELDS, room, tokens, config.block_size),
                             num_tokens=tokens)
        sender.send(room, allocation, TransferInfo(TransferMode.EMBEDDING, tokens))
    for room in lengths:
        receivers[room % 2].command(op="add", room=room, bootstrap=bootstrap.address, sender="encode-0")
    for room, tokens in lengths.items():
        report = receivers[room % 2].wait_for(lambda e, room=room: e["event"] == "received" and e["room"] == room,
                                              parties=[sender])
        assert report["info"]["total_tokens"] == tokens
        assert report["digests"] == report["expected"] == digests(payload(EMBEDDING_FIELDS, room, tokens), tokens)
        assert report["padding_zero"]
    drive([sender], lambda: all(sender.poll(room) is PollState.SUCCESS for room in lengths))
    assert sender.allocator.available_blocks() == config.buffer_blocks
    for peer in receivers:
        status = peer.status(parties=[sender])
        assert status["available"] == status["total"]
    sender.close()


def test_kv_pages_and_first_token_travel_the_same_path(config, bootstrap, spawn):
    sender = spawn("sender", config, fields="kv", name="prefill-0", bootstrap=bootstrap.address)
    receiver = Receiver(config, KV_FIELDS)
    receiver.add(7, bootstrap.address, "prefill-0", mode=TransferMode.KV)
    sender.command(op="send", room=7, tokens=23, mode="kv", first_token=151643)
    received = receive(receiver, sender, 7)
    assert received.info.mode is TransferMode.KV and received.info.first_token == 151643
    assert len(received.chunks) == 2
    assert_bit_exact(received, KV_FIELDS, 7, config.block_size)
    assert receiver.allocator.available_blocks() == config.buffer_blocks
    receiver.close()


def test_a_room_waits_holding_nothing_while_the_receiver_pool_cannot_hold_it_then_completes(config, bootstrap,
                                                                                            spawn):
    sender = spawn("sender", config, name="encode-0", bootstrap=bootstrap.address)
    receiver = Receiver(config, EMBEDDING_FIELDS)
    receiver.add(3, bootstrap.address, "encode-0")
    hog = receiver.allocator.alloc(receiver.allocator.available_blocks() * config.block_size)
    sender.command(op="send", room=3, tokens=40)
    sender.state(3, "transferring", parties=[receiver])  # the first chunk is offered
    run_for([receiver], 1.0)
    assert receiver.poll(3) is PollState.WAITING_FOR_INPUT  # not pulled: 40 tokens cannot be reserved
    assert receiver.received_tokens(3) == 0
    assert sender.status(parties=[receiver])["rooms"]["3"] == "transferring"
    receiver.allocator.free(hog)
    received = receive(receiver, sender, 3)
    assert len(received.chunks) == 2
    assert_bit_exact(received, EMBEDDING_FIELDS, 3, config.block_size)
    assert receiver.allocator.available_blocks() == config.buffer_blocks
    receiver.close()


@pytest.mark.parametrize("plane", ["jax", "zmq"])
@pytest.mark.parametrize("bind_host, advertise_host", [("0.0.0.0", "127.0.0.1"), ("localhost", "")])
def test_listeners_publish_an_address_their_peers_can_dial(plane, bind_host, advertise_host, config, bootstrap, spawn):
    """Across hosts a sender binds 0.0.0.0 and publishes the advertised host; given a host name it
    publishes the name's address. (The jax transfer server given a name listens on 0.0.0.0 and
    says so, for its address and its bulk transport's: a peer on another host dials itself.)"""
    config = dataclasses.replace(config, data_plane=plane, bind_host=bind_host, advertise_host=advertise_host)
    sender = spawn("sender", config, name="encode-0", bootstrap=bootstrap.address)
    receiver = Receiver(config, EMBEDDING_FIELDS)
    receiver.add(1, bootstrap.address, "encode-0")
    sender.command(op="send", room=1, tokens=9)
    assert_bit_exact(receive(receiver, sender, 1), EMBEDDING_FIELDS, 1, config.block_size)
    published = bootstrap.endpoints()["encode-0"]
    assert "0.0.0.0" not in published.control and "0.0.0.0" not in published.data_address, published
    if advertise_host:
        assert published.control.startswith(f"tcp://{advertise_host}:")
        assert f"{advertise_host}:" in published.data_address
    receiver.close()


def test_a_private_data_plane_directory_others_can_enter_is_refused(config, tmp_path):
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o755)
    with pytest.raises(ValueError, match="must be a directory of this user's, mode 0700"):
        Receiver(dataclasses.replace(config, data_plane_dir=str(open_to_all)), EMBEDDING_FIELDS)
