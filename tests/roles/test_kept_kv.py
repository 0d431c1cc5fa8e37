"""A prompt that finishes before its decode registers keeps its KV in its pages, and prefill
reads only the tokens decode lacks once it registers: the rows go out as read, never through
the sender's pool (which cost two more copies under concurrent load, where decode holds back a
registration until a request sharing its first page has landed). The kept pages come back on
every way out: sent, the room failed, an abort; they are given up for a prompt that needs them,
and only then. A room decode declined before its prompt came refuses the prompt.
A real prefill role over a real bootstrap registry, its loop driven by hand; decode's side is a
real transfer receiver."""

import queue
import time

import numpy as np
import pytest

from mmserve import SamplingParams
from mmserve.engine.config import EngineConfig
from mmserve.roles.fields import kv_fields
from mmserve.roles.prefill import PrefillRole
from mmserve.roles.wire import sampling_to_pb
from mmserve.rpc import worker_pb2 as pb
from models.qwen3_vl_moe import load_model
from transfer import BootstrapServer, PollState, Receiver, TransferConfig, TransferMode

pytestmark = pytest.mark.timeout(300)
PROMPT = list(range(3, 43))  # 40 tokens: two full pages of 16 and a partial one


def make_role(num_pages: int = 64, **transfer):
    config = TransferConfig(data_plane="zmq", heartbeat_interval_s=0.1, heartbeat_timeout_s=1.0, **transfer)
    bootstrap = BootstrapServer(config).start()
    engine = EngineConfig(num_pages=num_pages, page_size=16, max_model_len=256, max_prefill_tokens=64,
                          max_num_seqs=4, precompile=False)
    role = PrefillRole(load_model("tiny"), engine, config, "prefill-kept", bootstrap.address)
    receiver = Receiver(config, kv_fields(role.model.config, role.model.dtype))
    return role, receiver, bootstrap


@pytest.fixture
def parts():
    role, receiver, bootstrap = make_role(bootstrap_timeout_s=60.0)
    yield role, receiver, bootstrap
    receiver.close()
    role.close()
    bootstrap.close()


def prefill(role, request_id: str, room: int, prompt: list[int] = PROMPT) -> queue.Queue:
    stream: queue.Queue = queue.Queue()
    role.prefill(pb.PrefillRequest(request_id=request_id, room=room, token_ids=prompt,
                                   sampling=sampling_to_pb(SamplingParams(max_tokens=4, temperature=0))), stream)
    return stream


def register(role, receiver, bootstrap, room: int, held: int) -> None:
    receiver.add(room, bootstrap.address, role.sender.endpoint.name, TransferMode.KV, role.sender.incarnation,
                 start_token=held)


def run_until(role, receiver, condition, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        role.step()
        receiver.progress(0.001)
        assert time.monotonic() < deadline


def received(role, receiver, room: int):
    run_until(role, receiver, lambda: receiver.poll(room).terminal and not role.health()["in_flight"])
    assert receiver.poll(room) is PollState.SUCCESS, receiver.failure(room)
    return receiver.take(room)


def test_a_decode_registering_late_gets_only_the_tokens_it_lacks_read_straight_from_the_pages(parts):
    role, receiver, bootstrap = parts
    total = role.engine.stats()["free_pages"]
    prefill(role, "early", room=1)
    register(role, receiver, bootstrap, 1, held=0)  # in time: read as the prompt finishes
    early = received(role, receiver, 1)

    first = prefill(role, "late", room=2)
    run_until(role, receiver, lambda: role.health()["requests"] == {"awaiting_decode": 1})
    assert len(first.get_nowait().token_ids) == 1  # the first token did not wait for decode
    for _ in range(3):
        role.step()  # it keeps waiting, its pages kept
    assert role.health()["requests"] == {"awaiting_decode": 1} and role.engine.stats()["free_pages"] < total
    register(role, receiver, bootstrap, 2, held=16)  # holding the first page (shared with another request)
    late = received(role, receiver, 2)

    assert (late.start_token, len(late.chunks), late.info.total_tokens) == (16, 1, 40)
    assert late.info.first_token == early.info.first_token
    for name in ("k", "v"):  # the last token's KV is computed again, in a program of another shape
        np.testing.assert_allclose(late.host(name), early.host(name)[16:], rtol=1e-5, atol=1e-5)
    assert role.sender.staged_rooms == 0  # never written into the sender's pool
    assert role.engine.stats()["free_pages"] == total
    assert role.sender.allocator.available_blocks() == role.sender.allocator.num_blocks


def cache_first_page(role, receiver, bootstrap, room: int) -> None:
    """Runs a prompt starting as PROMPT to its end, its decode registered in time: prefill's cache
    holds PROMPT's first page, so a decode may hold it too (only such prompts are kept)."""
    prefill(role, f"seed-{room}", room, prompt=PROMPT[:16] + list(range(600, 610)))
    register(role, receiver, bootstrap, room, held=0)
    received(role, receiver, room)


def test_a_prompt_with_nothing_cached_is_read_whole_at_once_for_a_decode_not_registered_yet(parts):
    """No page of it found in prefill's cache, so none in decode's: waiting for the registration
    would only make it wait for the step then running to end."""
    role, receiver, bootstrap = parts
    prefill(role, "fresh", room=5, prompt=list(range(700, 740)))
    run_until(role, receiver, lambda: role.health()["requests"] == {"sending_kv": 1})
    register(role, receiver, bootstrap, 5, held=0)
    assert received(role, receiver, 5).info.total_tokens == 40
    assert role.sender.staged_rooms == 0


def test_kept_pages_come_back_when_the_room_fails_before_decode_registers(parts):
    role, receiver, bootstrap = parts
    cache_first_page(role, receiver, bootstrap, room=30)
    total = role.engine.stats()["free_pages"]
    prefill(role, "orphan", room=3)
    run_until(role, receiver, lambda: role.health()["requests"] == {"awaiting_decode": 1})
    role.sender.abort(3, "timed out while bootstrapping")  # as the sender's own timeout fails it
    run_until(role, receiver, lambda: not role.health()["in_flight"])
    assert role.engine.stats()["free_pages"] == total
    with pytest.raises(KeyError):
        role.sender.poll(3)


def test_kept_pages_come_back_on_an_abort_and_keep_the_prompts_tail(parts):
    """Aborted while its KV waits for decode: its pages come back, and the prompt's partial last
    page is still left as a tail (a later prompt continuing it computes only its new tokens)."""
    role, receiver, bootstrap = parts
    cache_first_page(role, receiver, bootstrap, room=40)
    total, tails = role.engine.stats()["free_pages"], role.engine.kv.num_tail_pages
    prefill(role, "gone", room=4)
    run_until(role, receiver, lambda: role.health()["requests"] == {"awaiting_decode": 1})
    role.abort("gone")
    assert not role.health()["in_flight"] and role.engine.stats()["free_pages"] == total
    assert role.engine.kv.num_tail_pages == tails + 1
    with pytest.raises(KeyError):
        role.sender.poll(4)


def keep_two(role, receiver, bootstrap) -> None:
    """Two finished prompts sharing a cached first page keep their KV (rooms 11 and 12) for
    decodes that have not registered: 7 of 8 pages."""
    cache_first_page(role, receiver, bootstrap, room=10)
    for request_id, room in (("kept-1", 11), ("kept-2", 12)):
        prefill(role, request_id, room, prompt=PROMPT[:16] + list(range(room * 60, room * 60 + 40)))
    run_until(role, receiver, lambda: role.health()["requests"] == {"awaiting_decode": 2})


def test_kept_pages_are_given_up_for_a_prompt_that_needs_them():
    """8 pages; two finished prompts sharing a cached first page keep 7 for decodes that have not
    registered (decode holds them back until a third request's KV lands); the third prompt needs
    4 pages to run.
    Kept pages waited for decode, decode for the third's KV, the third for the kept pages, until
    the rooms timed out. Short of pages, prefill reads the oldest kept KV whole and lets its
    pages go: the third runs."""
    role, receiver, bootstrap = make_role(num_pages=9, bootstrap_timeout_s=60.0)
    try:
        keep_two(role, receiver, bootstrap)
        assert role.engine.stats()["free_pages"] == 1
        third = prefill(role, "third", room=13, prompt=list(range(900, 956)))
        run_until(role, receiver, lambda: not third.empty(), timeout_s=60)
        assert len(third.get_nowait().token_ids) == 1
        assert role.health()["requests"] == {"sending_kv": 2, "awaiting_decode": 1}  # kept-1's KV read whole
        register(role, receiver, bootstrap, 11, held=0)
        run_until(role, receiver, lambda: receiver.poll(11).terminal)
        assert receiver.take(11).info.total_tokens == 56
    finally:
        receiver.close()
        role.close()
        bootstrap.close()


def test_kept_kv_is_not_given_up_once_nothing_waits_for_pages():
    """The prompt that was short of pages is aborted (its client left) before any step runs it:
    the engine's word "short of pages" is stale then, and every idle loop step read another kept
    prompt whole and let its pages go, so a decode registering with a prefix got its rows
    through the sender's pool after all."""
    role, receiver, bootstrap = make_role(num_pages=9, bootstrap_timeout_s=60.0)
    try:
        keep_two(role, receiver, bootstrap)
        prefill(role, "third", room=13, prompt=list(range(900, 956)))
        role.step()  # short of pages: kept-1 given up for it
        assert role.health()["requests"] == {"sending_kv": 1, "awaiting_decode": 1, "prefilling": 1}
        role.abort("third")
        for _ in range(3):
            role.step()
        assert role.health()["requests"] == {"sending_kv": 1, "awaiting_decode": 1}  # kept-2 still kept
    finally:
        receiver.close()
        role.close()
        bootstrap.close()


def test_a_room_decode_declined_before_the_prompt_came_is_refused_without_running_it(parts):
    """Decode dropped the request (its router gone) before prefill had it: the prompt is refused
    as it comes, with decode's reason, instead of being prefilled for a room already failed."""
    role, receiver, bootstrap = parts
    receiver.decline(21, bootstrap.address, role.sender.endpoint.name, role.sender.incarnation, "the router left")
    deadline = time.monotonic() + 10
    while "receiver declined" not in str(role.sender._ended.get(21)):  # noqa: SLF001: the decline has landed
        role.pump()
        receiver.progress(0.001)
        assert time.monotonic() < deadline
    with pytest.raises(ValueError, match="receiver declined: the router left"):
        prefill(role, "declined", room=21)
    assert not role.engine.has_unfinished() and role.health()["in_flight"] == 0
