"""Each role frees a request past the router's deadline by itself: no abort needed, so a request is
freed on time even when the router died or its abort was lost. Real roles over a real bootstrap
registry whose transfer timeouts (60 s) are far away, each driven by hand, the deadline given as
the router sends it (``timeout_s``: seconds left)."""

import math
import queue
import time

import numpy as np
import pytest

from mmserve import SamplingParams
from mmserve.engine.config import EngineConfig
from mmserve.engine.inputs import Visual
from mmserve.roles.decode import DecodeRole
from mmserve.roles.encode import EncodeJob, EncodeRole
from mmserve.roles.prefill import PrefillRole
from mmserve.roles.request_state import DEADLINE_PASSED
from mmserve.roles.token_stream import TokenStream
from mmserve.roles.wire import deadline_from_pb, sampling_to_pb
from mmserve.rpc import worker_pb2 as pb
from models.qwen3_vl_moe import load_model
from transfer import BootstrapServer, TransferConfig, TransferMode

from idle_receiver import IdleReceiver

pytestmark = pytest.mark.timeout(300)
PATIENT = TransferConfig(data_plane="zmq", bootstrap_timeout_s=60.0, waiting_timeout_s=60.0, heartbeat_interval_s=0.1,
                         heartbeat_timeout_s=1.0)


@pytest.fixture(scope="module")
def bootstrap():
    server = BootstrapServer(PATIENT).start()
    yield server.address
    server.close()


@pytest.fixture(scope="module")
def model():
    return load_model("tiny")


def step_until(role, condition, timeout_s: float = 60) -> float:
    """Steps the role until ``condition()``; returns how long that took."""
    started = time.monotonic()
    while not condition():
        role.step()
        assert time.monotonic() - started < timeout_s
    return time.monotonic() - started


def test_the_deadline_travels_as_seconds_left():
    assert deadline_from_pb(0.0) == math.inf
    assert 9.5 < deadline_from_pb(10.0) - time.monotonic() <= 10.0


def test_decode_fails_a_request_still_waiting_for_a_slot_at_its_deadline(model, bootstrap):
    """The one slot is held; the second request waits for it (no transfer timeout runs while a
    request waits for pages: only its deadline, or an abort, ends it)."""
    engine = EngineConfig(num_pages=32, page_size=16, max_model_len=256, max_num_seqs=1, precompile=False)
    role = DecodeRole(model, engine, PATIENT, "decode-deadlines", bootstrap)
    try:
        pages = role.engine.stats()["free_pages"]
        streams = {}
        for request_id, room, timeout_s in (("holder", 1, 0.0), ("waiter", 2, 1.0), ("receiver", 3, 0.0)):
            streams[request_id] = TokenStream()
            role.decode(pb.DecodeRequest(request_id=request_id, room=room, token_ids=list(range(3, 23)),
                                         sampling=sampling_to_pb(SamplingParams(max_tokens=4)),
                                         prefill_name="prefill-absent", timeout_s=timeout_s), streams[request_id])
        role.step()
        assert role.health()["requests"] == {"receiving_kv": 1, "reserving": 2}
        took = step_until(role, lambda: "waiter" not in role._requests)
        assert took < 10
        assert [e.error for e in _drain(streams["waiter"])] == [DEADLINE_PASSED]
        assert role.health()["requests"] == {"receiving_kv": 1, "reserving": 1}  # the others keep waiting
        for request_id in ("holder", "receiver"):
            role.abort(request_id)
        assert role.engine.stats()["free_pages"] == pages
    finally:
        role.close()


def test_prefill_fails_a_request_whose_kv_nobody_takes_at_its_deadline(model, bootstrap):
    engine = EngineConfig(num_pages=64, page_size=16, max_model_len=256, max_prefill_tokens=32, max_num_seqs=2,
                          precompile=False)
    role = PrefillRole(model, engine, PATIENT, "prefill-deadlines", bootstrap)
    try:
        pages, blocks = role.engine.stats()["free_pages"], role.sender.allocator.available_blocks()
        role.prefill(pb.PrefillRequest(request_id="unwanted", room=5, token_ids=list(range(3, 23)),
                                       sampling=sampling_to_pb(SamplingParams(max_tokens=4)), timeout_s=3.0),
                     queue.Queue())
        step_until(role, lambda: role.health()["requests"] == {"sending_kv": 1})  # decode never registers
        assert step_until(role, lambda: not role.health()["in_flight"]) < 10
        stats = role.health()
        assert stats["free_pages"] == pages and stats["free_kv_blocks"] == blocks
        with pytest.raises(KeyError):
            role.sender.poll(5)
    finally:
        role.close()


def test_encode_fails_a_request_whose_rows_nobody_pulls_at_its_deadline(model, bootstrap):
    role = EncodeRole(model, EngineConfig(precompile=False, max_num_seqs=2), PATIENT, "encode-deadlines", bootstrap)
    prefill = IdleReceiver(role.sender, bootstrap, TransferMode.EMBEDDING)
    try:
        blocks = role.sender.allocator.available_blocks()
        grid = np.array([[1, 4, 4]])
        pixels = np.random.default_rng(0).standard_normal((16, model.config.vision.patch_dim)).astype(np.float32)
        role.encode(EncodeJob("warm-up", 8, [Visual(grid, pixels)], []))  # compiles the vision tower
        role.abort("warm-up")
        role.encode(EncodeJob("unpulled", 9, [Visual(grid, pixels)], [], deadline=deadline_from_pb(1.0)))
        prefill.register(9)  # a prefill that registers and never pulls
        role.step()
        assert role.health()["requests"] == {"sending": 1} and role.health()["free_blocks"] < blocks
        assert step_until(role, lambda: not role.health()["in_flight"]) < 10
        assert role.health()["free_blocks"] == blocks
        with pytest.raises(KeyError):
            role.sender.poll(9)
    finally:
        prefill.close()
        role.close()


def _drain(stream: TokenStream) -> list[pb.TokenEvent]:
    return [event for batch in stream.sent() for event in batch.events]
