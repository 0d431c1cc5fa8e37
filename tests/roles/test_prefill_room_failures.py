"""A KV room that fails while its prompt is still inside prefill's engine (decode never
registered, or too late) takes the request out of the engine: its pages and slot come back,
nothing raises on later steps, an abort of it is harmless, and the next prompt runs.
A real prefill role over a real bootstrap registry, its loop driven by hand."""

import time

import pytest

from mmserve import SamplingParams
from mmserve.engine.config import EngineConfig
from mmserve.roles.prefill import PrefillRole
from mmserve.roles.wire import sampling_to_pb
from mmserve.rpc import worker_pb2 as pb
from models.qwen3_vl_moe import load_model
from transfer import BootstrapServer, TransferConfig

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def role():
    transfer = TransferConfig(data_plane="zmq", bootstrap_timeout_s=0.5, heartbeat_interval_s=0.1,
                              heartbeat_timeout_s=1.0)
    bootstrap = BootstrapServer(transfer).start()
    engine = EngineConfig(num_pages=128, page_size=16, max_model_len=1024, max_prefill_tokens=16,
                          max_prefill_seqs=1, max_num_seqs=2, precompile=False)
    role = PrefillRole(load_model("tiny"), engine, transfer, "prefill-rooms", bootstrap.address)
    yield role
    role.close()
    bootstrap.close()


def prefill(role, request_id: str, room: int, length: int, first_token: int = 3) -> None:
    role.prefill(pb.PrefillRequest(request_id=request_id, room=room,
                                   token_ids=list(range(first_token, first_token + length)),
                                   sampling=sampling_to_pb(SamplingParams(max_tokens=4))))


def test_a_room_that_fails_mid_prompt_frees_the_request_and_the_role_goes_on(role):
    total = role.engine.stats()["free_pages"]
    prefill(role, "long", room=11, length=800)  # 50 chunks of 16: still prefilling when the room times out
    steps, deadline = 0, time.monotonic() + 240
    while role.health()["in_flight"]:
        role.step()  # no decode ever registers for room 11: it fails at the bootstrap timeout
        steps += 1
        assert time.monotonic() < deadline
    assert steps < 800 // 16, "the room must fail while the prompt is still being prefilled"
    for _ in range(5):
        role.step()  # used to raise KeyError from _ship on every step once the prompt finished
    stats = role.health()
    assert stats["running"] == stats["waiting"] == stats["in_flight"] == 0
    assert stats["free_pages"] == total
    role.abort("long")  # nothing left to abort: harmless
    prefill(role, "next", room=12, length=20, first_token=900)  # not a prefix of "long": two chunks to run
    role.step()
    assert role.health()["in_flight"] == 1
