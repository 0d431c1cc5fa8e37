"""A KV room that fails while its prompt is still inside prefill's engine (decode never
registered, or too late) takes the request out of the engine: its pages and slot come back,
nothing raises on later steps, an abort of it is harmless, and the next prompt runs. So does
every other way out (an abort mid-prompt, a failed step, a room failing while its KV waits for
sender blocks): each frees everything the request held, once.
A real prefill role over a real bootstrap registry, its loop driven by hand."""

import queue
import time

import pytest

from mmserve import SamplingParams
from mmserve.engine.config import EngineConfig
from mmserve.roles.prefill import PrefillRole
from mmserve.roles.wire import sampling_to_pb
from mmserve.rpc import worker_pb2 as pb
from models.qwen3_vl_moe import load_model
from transfer import BootstrapServer, TransferConfig, TransferMode

from idle_receiver import IdleReceiver

pytestmark = pytest.mark.timeout(300)


def prefill_role(**transfer):
    transfer = TransferConfig(data_plane="zmq", heartbeat_interval_s=0.1, heartbeat_timeout_s=1.0, **transfer)
    bootstrap = BootstrapServer(transfer).start()
    engine = EngineConfig(num_pages=128, page_size=16, max_model_len=1024, max_prefill_tokens=16,
                          max_prefill_seqs=1, max_num_seqs=2, precompile=False)
    role = PrefillRole(load_model("tiny"), engine, transfer, "prefill-rooms", bootstrap.address)
    yield role
    role.close()
    bootstrap.close()


@pytest.fixture
def role():
    """Rooms fail 0.5 s after they open: no decode ever registers."""
    yield from prefill_role(bootstrap_timeout_s=0.5)


@pytest.fixture
def patient_role():
    """Rooms live until the test fails them; a KV pool of two blocks of 16 rows."""
    yield from prefill_role(bootstrap_timeout_s=60.0, block_size=16, default_blocks=1, buffer_blocks=2)


@pytest.fixture
def decode(patient_role):
    """Registers KV rooms as a decode would, and never pulls them."""
    receiver = IdleReceiver(patient_role.sender, patient_role.bootstrap, TransferMode.KV)
    yield receiver
    receiver.close()


def prefill(role, request_id: str, room: int, length: int, first_token: int = 3) -> queue.Queue:
    """The stream of the router's call: the first token's event, or the error that ended it before."""
    stream: queue.Queue = queue.Queue()
    role.prefill(pb.PrefillRequest(request_id=request_id, room=room,
                                   token_ids=list(range(first_token, first_token + length)),
                                   sampling=sampling_to_pb(SamplingParams(max_tokens=4))), stream)
    return stream


def test_a_room_that_fails_mid_prompt_frees_the_request_and_the_role_goes_on(role):
    total = role.engine.stats()["free_pages"]
    stream = prefill(role, "long", room=11, length=800)  # 50 chunks of 16: still prefilling when the room times out
    steps, deadline = 0, time.monotonic() + 240
    while role.health()["in_flight"]:
        role.step()  # no decode ever registers for room 11: it fails at the bootstrap timeout
        steps += 1
        assert time.monotonic() < deadline
    assert steps < 800 // 16, "the room must fail while the prompt is still being prefilled"
    [event] = drain(stream)  # the router's call hears why, and no first token
    assert not event.token_ids and "timed out" in event.error
    for _ in range(5):
        role.step()  # used to raise KeyError from _ship on every step once the prompt finished
    stats = role.health()
    assert stats["running"] == stats["waiting"] == stats["in_flight"] == 0
    assert stats["free_pages"] == total and stats["free_kv_blocks"] == role.sender.allocator.num_blocks
    with pytest.raises(KeyError):
        role.sender.poll(11)  # the KV room is forgotten: nothing left in the transfer layer either
    role.abort("long")  # nothing left to abort: harmless
    prefill(role, "next", room=12, length=20, first_token=900)  # not a prefix of "long": two chunks to run
    role.step()
    assert role.health()["in_flight"] == 1


def drain(stream: queue.Queue) -> list:
    out = []
    while not stream.empty():
        out.append(stream.get_nowait())
    return out


def run_until(role, condition, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        role.step()
        assert time.monotonic() < deadline


def test_an_abort_mid_prompt_takes_it_out_of_the_engine_and_tells_decode(patient_role):
    role = patient_role
    total = role.engine.stats()["free_pages"]
    long = prefill(role, "long", room=21, length=800)
    for _ in range(3):
        role.step()
    assert role.health()["requests"] == {"prefilling": 1} and role.engine.stats()["free_pages"] < total
    role.abort("long")
    stats = role.health()
    assert stats["running"] == stats["waiting"] == stats["in_flight"] == 0 and stats["free_pages"] == total
    with pytest.raises(KeyError):
        role.sender.poll(21)
    role.abort("long")
    assert [e.error for e in drain(long)] == ["aborted by the router"]  # once
    following = prefill(role, "next", room=22, length=20, first_token=900)
    run_until(role, lambda: role.health()["requests"] == {"sending_kv": 1})  # its KV waits for decode
    assert role.engine.stats()["free_pages"] == total
    [first] = drain(following)  # the first token went to the router as its KV went to the outbox
    assert len(first.token_ids) == 1 and not first.error and not first.finish_reason


def test_a_failed_step_fails_its_requests_and_frees_their_rooms(patient_role, monkeypatch):
    role = patient_role
    total = role.engine.stats()["free_pages"]

    def broken(*args):
        raise RuntimeError("device lost")

    monkeypatch.setattr(role.engine.runner, "prefill", broken)
    prefill(role, "doomed", room=31, length=20)
    role.step()
    stats = role.health()
    assert stats["in_flight"] == stats["running"] == 0 and stats["free_pages"] == total
    with pytest.raises(KeyError):
        role.sender.poll(31)


def test_a_failed_kv_read_fails_the_room_and_the_engine_still_frees_the_prompt(patient_role, monkeypatch):
    role = patient_role
    total = role.engine.stats()["free_pages"]

    def broken(*args):
        raise RuntimeError("device lost")

    monkeypatch.setattr(role.engine.runner, "read_kv", broken)
    prefill(role, "unread", room=35, length=20)
    run_until(role, lambda: not role.health()["in_flight"])
    stats = role.health()
    assert stats["running"] == stats["waiting"] == 0 and stats["free_pages"] == total
    with pytest.raises(KeyError):
        role.sender.poll(35)


def test_an_abort_while_the_kv_is_read_leaves_no_rows_waiting_in_the_outbox(patient_role, decode, monkeypatch):
    """The router's abort comes on another thread: one landing while prefill reads a finished
    prompt's KV out of its pages must not be followed by those rows entering the outbox, where
    no one would ever take them out (the abort has dropped the request's parcels already)."""
    role = patient_role
    decode.register(43)
    read = role.engine.runner.read_kv

    def read_then_abort(*args):
        rows = read(*args)
        role.abort("left")  # as a gRPC thread would, between the read and the rows' queueing
        return rows

    monkeypatch.setattr(role.engine.runner, "read_kv", read_then_abort)
    prefill(role, "left", room=43, length=20)
    run_until(role, lambda: not role.health()["in_flight"])
    for _ in range(3):
        role.step()
    assert len(role._outbox) == 0 and role.health()["free_kv_blocks"] == role.sender.allocator.num_blocks


def test_kv_waiting_for_sender_blocks_is_dropped_when_its_room_fails(patient_role, decode):
    """Its rows must not be sent later into a room nobody tracks (the old code re-opened the
    forgotten room on send, holding blocks until another timeout and never forgetting it)."""
    role = patient_role
    decode.register(41, 42)
    blocks = role.sender.allocator.num_blocks
    prefill(role, "first", room=41, length=20)  # 20 rows: both KV blocks
    prefill(role, "second", room=42, length=20)  # its rows wait for them
    run_until(role, lambda: role.health()["requests"] == {"sending_kv": 2})
    run_until(role, lambda: len(role._outbox) == 1)
    assert role.health()["free_kv_blocks"] == 0
    role.sender.abort(42, "receiver aborted")  # decode gave up on the second
    role.step()
    assert role.health()["requests"] == {"sending_kv": 1} and len(role._outbox) == 0
    role.sender.abort(41, "receiver aborted")  # and on the first: its blocks come back
    for _ in range(3):
        role.step()
    stats = role.health()
    assert stats["in_flight"] == 0 and stats["free_kv_blocks"] == blocks
    for room in (41, 42):
        with pytest.raises(KeyError):
            role.sender.poll(room)


def test_a_prompt_whose_kv_exceeds_the_whole_sender_pool_fails_alone(patient_role, decode):
    """Its KV could never get sender blocks: the room fails at once instead of holding the queue
    of KV waiting for blocks forever, and the next prompt's KV goes out."""
    role = patient_role
    total = role.engine.stats()["free_pages"]
    prefill(role, "huge", room=37, length=40)  # 40 tokens of KV, a pool of 32 rows
    run_until(role, lambda: not role.health()["in_flight"])
    assert role.engine.stats()["free_pages"] == total
    with pytest.raises(KeyError):
        role.sender.poll(37)
    decode.register(38)
    prefill(role, "next", room=38, length=20, first_token=900)
    run_until(role, lambda: role.health()["free_kv_blocks"] < role.sender.allocator.num_blocks)  # its KV holds blocks
    assert role.health()["requests"] == {"sending_kv": 1}


def test_prefill_tells_the_router_it_holds_no_prompt_longer_than_its_kv_pool(patient_role):
    """The context it reports (the router refuses, with a 400, a prompt that fits no prefill
    worker's) stops at its transfer pool's 32 rows: a 33-token prompt's KV could never be sent,
    whatever its engine's max_model_len (1024) holds."""
    held = patient_role.max_model_len()
    assert held == 33 < patient_role.engine.config.max_model_len
