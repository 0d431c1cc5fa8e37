"""Encode's ways out: an abort and a failed embedding room each free the request's blocks and room
once, and rows still waiting in the outbox for blocks are dropped with their room, never sent
later into a room nobody tracks. A real encode role over a real bootstrap registry, driven by
hand; a real transfer receiver registers the rooms a test wants staged, and never pulls."""

import numpy as np
import pytest

from mmserve.engine.config import EngineConfig
from mmserve.engine.encoder import Encoder
from mmserve.engine.inputs import Visual
from mmserve.roles.encode import EncodeJob, EncodeRole
from models.qwen3_vl_moe import load_model
from transfer import BootstrapServer, TransferConfig, TransferMode

from idle_receiver import IdleReceiver

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def bootstrap():
    """Rooms live until the test fails them; a pool of one 16-row block (a picture takes it)."""
    transfer = TransferConfig(data_plane="zmq", bootstrap_timeout_s=60.0, heartbeat_interval_s=0.1,
                              heartbeat_timeout_s=1.0, block_size=16, default_blocks=1, buffer_blocks=1)
    server = BootstrapServer(transfer).start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def role(bootstrap):
    role = EncodeRole(load_model("tiny"), EngineConfig(precompile=False, max_num_seqs=2), bootstrap.config,
                      "encode-requests", bootstrap.address)
    yield role
    role.close()


@pytest.fixture
def prefill(role, bootstrap):
    """Registers rooms as a prefill would, and never pulls them."""
    receiver = IdleReceiver(role.sender, bootstrap.address, TransferMode.EMBEDDING)
    yield receiver
    receiver.close()


def pixels(role, seed: int) -> np.ndarray:
    """16 patches (4 visual tokens after the 2x2 merge) of random pixels."""
    return np.random.default_rng(seed).standard_normal((16, role.encoder.model.config.vision.patch_dim)).astype(
        np.float32)


def encode(role, request_id: str, room: int) -> None:
    role.encode(EncodeJob(request_id, room, [Visual(np.array([[1, 4, 4]]), pixels(role, room))], []))


def only_sending_then_freed(role, request_id: str) -> None:
    """``request_id`` is the one request left, its rows waiting for prefill; aborted, it leaves
    nothing held."""
    stats = role.health()
    assert stats["requests"] == {"sending": 1} and stats["queued"] == 1
    role.abort(request_id)
    for _ in range(3):
        role.step()
    assert role.health()["in_flight"] == 0 and role.health()["queued"] == 0 and role.health()["free_blocks"] == 1


def test_rows_waiting_for_blocks_are_dropped_with_their_room_and_aborts_free_the_rest(role, prefill):
    prefill.register(1, 2)
    encode(role, "first", room=1)
    encode(role, "second", room=2)  # waits for the one block
    role.step()
    stats = role.health()
    assert stats["requests"] == {"sending": 2} and stats["queued"] == 1 and stats["free_blocks"] == 0
    role.sender.abort(2, "receiver aborted")  # prefill gave up on the second
    role.step()
    stats = role.health()
    assert stats["requests"] == {"sending": 1} and stats["queued"] == 0
    role.abort("first")  # the router's abort: its block comes back
    for _ in range(3):
        role.step()
    stats = role.health()
    assert stats["in_flight"] == 0 and stats["queued"] == 0 and stats["free_blocks"] == 1
    for room in (1, 2):
        with pytest.raises(KeyError):
            role.sender.poll(room)  # not re-opened by a late send
    role.abort("first")  # already gone: nothing to do
    with pytest.raises(ValueError, match="request id"):
        encode(role, "third", room=3)
        encode(role, "third", room=4)
    role.abort("third")
    assert role.health()["in_flight"] == 0 and role.health()["free_blocks"] == 1


def test_requests_queued_together_share_one_vision_step_and_get_their_own_rows(role):
    """Encode batches across requests: what arrives between two steps is encoded in one step, each
    request's rows those of its picture encoded alone."""
    encode(role, "a", room=11)
    encode(role, "b", room=12)
    assert role.health()["requests"] == {"queued": 2}
    calls = role.vision_calls
    role.step()
    assert role.vision_calls == calls + 1
    assert role.health()["requests"] == {"sending": 2}
    alone = Encoder(role.encoder.model, EngineConfig(precompile=False, embedding_cache_bytes=0))
    for room in (11, 12):
        picture = Visual(np.array([[1, 4, 4]]), pixels(role, room))
        together = role.encoder.cache.get(picture.content_key)
        for a, b in zip(together.host(), alone.encode(picture).host()):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for request_id in ("a", "b"):
        role.abort(request_id)
    for _ in range(3):
        role.step()
    assert role.health()["in_flight"] == 0 and role.health()["free_blocks"] == 1


def test_an_abort_while_the_vision_tower_runs_ends_only_that_request(role, monkeypatch):
    """The router's abort comes on another thread, while the step's vision call runs outside the
    lock: the aborted request's rows are not queued, and the others of that call are."""
    encode_many = role.encoder.encode_many

    def encode_then_abort(visuals):
        rows = encode_many(visuals)
        role.abort("gone")  # as a gRPC thread would, mid-call
        return rows

    monkeypatch.setattr(role.encoder, "encode_many", encode_then_abort)
    encode(role, "gone", room=21)
    encode(role, "kept", room=22)
    role.step()
    only_sending_then_freed(role, "kept")


def test_a_picture_that_fails_to_decode_in_an_unforeseen_way_fails_only_its_request(role, monkeypatch):
    """Whatever decoding a request's picture raises (a ValueError is the client's file; anything
    else a bug, logged), that request fails and the others queued with it are encoded: an
    unforeseen error once escaped the step, which met it again on every step after."""
    decodable = role.encoder.decodable
    broken = pixels(role, 31)

    def decode(visual):
        if visual.pixel_values is broken:
            raise RuntimeError("a decoder bug")
        return decodable(visual)

    monkeypatch.setattr(role.encoder, "decodable", decode)
    role.encode(EncodeJob("bug", 31, [Visual(np.array([[1, 4, 4]]), broken)], []))
    encode(role, "fine", room=32)
    role.step()
    only_sending_then_freed(role, "fine")


def test_pictures_of_two_requests_each_within_a_short_context_are_encoded_together():
    """With a context of 64 tokens the largest patch bucket is 256 patches: two pictures of 200
    patches (50 tokens each) were packed into one call of 400, past every bucket, and the whole
    step failed. Each gets its rows as encoded alone."""
    model = load_model("tiny")
    encoder = Encoder(model, EngineConfig(precompile=False, max_model_len=64, embedding_cache_bytes=0))
    rng = np.random.default_rng(5)
    pictures = [Visual(np.array([[1, 10, 20]]), rng.standard_normal((200, model.config.vision.patch_dim)).astype(
        np.float32)) for _ in range(2)]
    together = encoder.encode_many(pictures)
    for rows, picture in zip(together, pictures, strict=True):
        for a, b in zip(rows.host(), encoder.encode(picture).host()):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
