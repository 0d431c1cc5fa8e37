"""Decode's ways out before a request's KV arrives: an abort while it waits for pages or while its
KV room is open, and a KV room that fails, each give back what the request held (pages, slot,
receiver blocks, the room) and end its stream with one error; a later abort changes nothing.
A structured request's schema arrives typed and starts compiling at once; one xgrammar cannot
enforce is refused before anything is held. A request dropped while it waits for pages tells
its prefill, which would otherwise hold its KV until the room's bootstrap timeout. A real decode
role over a real bootstrap registry (with no prefill behind it, or a real KV sender standing
for prefill's), driven by hand."""

import dataclasses
import time

import pytest

from mmserve import SamplingParams
from mmserve.engine.config import EngineConfig
from mmserve.roles.decode import DecodeRole
from mmserve.roles.fields import kv_fields
from mmserve.roles.request_state import DecodeState
from mmserve.roles.token_stream import TokenStream
from mmserve.roles.wire import sampling_to_pb
from mmserve.rpc import worker_pb2 as pb
from mmserve.structured_output import StructuredOutput
from models.qwen3_vl_moe import load_model
from transfer import BootstrapServer, PollState, Sender, TransferConfig, TransferInfo, TransferMode

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=[1])
def role(request):
    """A decode role with ``request.param`` slots (one unless a test says otherwise)."""
    transfer = TransferConfig(data_plane="zmq", bootstrap_timeout_s=1.0, heartbeat_interval_s=0.1,
                              heartbeat_timeout_s=1.0)
    bootstrap = BootstrapServer(transfer).start()
    engine = EngineConfig(num_pages=32, page_size=16, max_model_len=256, max_num_seqs=request.param, precompile=False)
    role = DecodeRole(load_model("tiny"), engine, transfer, "decode-requests", bootstrap.address)
    yield role
    role.close()
    bootstrap.close()


def decode(role, request_id: str, room: int, params: SamplingParams = SamplingParams(max_tokens=4),
           prompt: list[int] = list(range(3, 23)), prefill: str = "prefill-absent") -> TokenStream:
    stream = TokenStream("router")
    role.decode(pb.DecodeRequest(request_id=request_id, room=room, token_ids=prompt,
                                 sampling=sampling_to_pb(params), prefill_name=prefill),
                stream)
    return stream


def events(stream: TokenStream) -> list[pb.TokenEvent]:
    return [event for batch in stream.sent() for event in batch.events]


def test_aborts_while_reserving_and_receiving_free_everything_once(role):
    pages, blocks = role.engine.stats()["free_pages"], role.receiver.allocator.available_blocks()
    first, second = decode(role, "first", room=1), decode(role, "second", room=2)
    role.step()
    assert role.health()["requests"] == {"receiving_kv": 1, "reserving": 1}  # one slot: the second waits
    role.abort("second")
    assert [e.error for e in events(second)] == ["aborted"]
    assert role.health()["requests"] == {"receiving_kv": 1}
    role.abort("first")
    stats = role.health()
    assert [e.error for e in events(first)] == ["aborted"]
    assert stats["in_flight"] == 0 and stats["free_pages"] == pages and stats["free_kv_blocks"] == blocks
    with pytest.raises(KeyError):
        role.receiver.poll(1)
    role.abort("first")  # already gone: no second event, nothing freed twice
    assert events(first) == [] and role.engine.stats()["free_pages"] == pages
    decode(role, "third", room=3)
    role.step()
    assert role.health()["requests"] == {"receiving_kv": 1}  # the slot came back


def test_a_request_dropped_while_reserving_tells_prefill_to_free_its_kv(role):
    """Its router gone, decode drops a request still waiting for pages; prefill, holding its KV
    for a registration that will never come, is told at once (a declined room), not left to
    its bootstrap timeout (30 s here)."""
    config = dataclasses.replace(role.receiver.config, bootstrap_timeout_s=30.0)
    prefill = Sender(config, kv_fields(role.engine.model.config, role.engine.model.dtype), "prefill-0",
                     role.bootstrap)
    try:
        free = prefill.allocator.available_blocks()
        prefill.add(2)
        prefill.send(2, prefill.allocator.alloc(20), TransferInfo(TransferMode.KV, 20, first_token=5))
        decode(role, "first", room=1)
        stream = decode(role, "second", room=2, prefill="prefill-0")
        role.step()
        assert role.health()["requests"] == {"receiving_kv": 1, "reserving": 1}
        started = time.monotonic()
        role.drop_stream(stream)
        while prefill.poll(2) is not PollState.FAILED:
            role.pump()
            prefill.progress(0.005)
            assert time.monotonic() - started < 10, "prefill was not told"
        assert prefill.failure(2) == "receiver declined: the router's token stream closed"
        assert prefill.allocator.available_blocks() == free
        assert role.health()["requests"] == {"receiving_kv": 1}
    finally:
        prefill.close()


def test_a_kv_room_that_fails_ends_the_stream_and_returns_the_reservation(role):
    pages = role.engine.stats()["free_pages"]
    stream = decode(role, "lonely", room=7)
    deadline = time.monotonic() + 60
    role.step()
    assert role.engine.stats()["free_pages"] < pages
    while role.health()["in_flight"]:
        role.step()  # no prefill ever answers: the room fails at the bootstrap timeout
        assert time.monotonic() < deadline
    [event] = events(stream)
    assert event.error.startswith("KV transfer failed")
    assert role.engine.stats()["free_pages"] == pages
    role.abort("lonely")
    assert events(stream) == []


def test_a_request_id_or_room_in_use_is_refused(role):
    decode(role, "same", room=5)
    with pytest.raises(ValueError, match="request id"):
        decode(role, "same", room=6)
    with pytest.raises(ValueError, match="room 5"):
        decode(role, "other", room=5)


def test_a_structured_request_compiles_its_grammar_while_its_kv_is_awaited(role):
    spec = StructuredOutput.from_schema({"type": "object", "properties": {"n": {"type": "integer"}}})
    pages = role.engine.stats()["free_pages"]
    stream = decode(role, "structured", room=9, params=SamplingParams(max_tokens=4, structured_output=spec))
    assert spec.key() in role.engine.grammars._futures  # submitted as it arrived, before any step
    role.step()
    assert role.health()["requests"] == {"receiving_kv": 1}
    assert role._requests["structured"].params.structured_output == spec  # came through the wire typed
    role.abort("structured")
    assert [e.error for e in events(stream)] == ["aborted"]
    assert role.engine.stats()["free_pages"] == pages and not role.engine.has_unfinished()


def test_a_schema_that_cannot_be_enforced_is_refused_before_anything_is_held(role):
    bad = SamplingParams(max_tokens=4, structured_output=StructuredOutput.from_schema({"type": "objectx"}))
    with pytest.raises(ValueError, match="invalid JSON schema"):
        decode(role, "bad-schema", room=11, params=bad)
    assert role.health()["in_flight"] == 0


@pytest.mark.parametrize("role", [4], indirect=True)
def test_a_request_waits_while_another_receives_its_first_page(role):
    """Siblings (the same 20-token prompt: one full 16-token page before its last token) open one
    KV room at a time, so the later ones can share the first one's pages once it lands; another
    prompt goes ahead, and the wait ends when the first room ends, whichever way."""
    for i in range(3):
        decode(role, f"sibling-{i}", room=10 + i)
    decode(role, "other", room=20, prompt=list(range(103, 123)))
    decode(role, "short", room=21, prompt=list(range(3, 10)))  # no full page: nothing to share
    role.step()
    receiving = {r.request_id for r in role._requests.in_state(DecodeState.RECEIVING_KV)}  # noqa: SLF001
    assert receiving == {"sibling-0", "other", "short"}
    role.abort("sibling-0")
    role.step()
    receiving = {r.request_id for r in role._requests.in_state(DecodeState.RECEIVING_KV)}  # noqa: SLF001
    assert receiving == {"sibling-1", "other", "short"}
    for request_id in ("sibling-1", "sibling-2", "other", "short"):
        role.abort(request_id)
    assert role.health()["in_flight"] == 0


def test_decode_tells_the_router_it_holds_no_prompt_longer_than_its_kv_receiver_takes():
    """A receiver that takes 64 rows of KV at once: a longer prompt could never arrive, so the
    context decode reports (the router's check, a 400 at the door) stops there."""
    transfer = TransferConfig(data_plane="zmq", block_size=16, default_blocks=1, buffer_blocks=4)
    bootstrap = BootstrapServer(transfer).start()
    engine = EngineConfig(num_pages=32, page_size=16, max_model_len=256, max_num_seqs=1, precompile=False)
    role = DecodeRole(load_model("tiny"), engine, transfer, "decode-small-receiver", bootstrap.address)
    try:
        assert role.max_model_len() == 65 < engine.max_model_len
    finally:
        role.close()
        bootstrap.close()


def test_a_cache_smaller_than_the_context_caps_requests_at_the_cache_as_colocated_does():
    """A cache of 128 tokens under a context of 256 (allowed, with a warning: sequences stop at the
    cache's size, as colocated's engine stops them). A request asking for more than the whole
    cache could never reserve, and every request behind it waited (arrival order) for good."""
    transfer = TransferConfig(data_plane="zmq", bootstrap_timeout_s=60.0)
    bootstrap = BootstrapServer(transfer).start()
    engine = EngineConfig(num_pages=9, page_size=16, max_model_len=256, max_num_seqs=2, precompile=False)
    role = DecodeRole(load_model("tiny"), engine, transfer, "decode-small-cache", bootstrap.address)
    try:
        assert role.max_model_len() == 128  # what the router refuses longer prompts by
        decode(role, "long", room=1, params=SamplingParams(max_tokens=200), prompt=list(range(3, 43)))
        decode(role, "behind", room=2)
        role.step()
        assert role.health()["requests"] == {"receiving_kv": 1, "reserving": 1}  # the first holds the whole cache
        assert role._requests["long"].params.max_tokens == 128 - 40
        role.abort("long")
        role.step()
        assert role.health()["requests"] == {"receiving_kv": 1}
    finally:
        role.close()
        bootstrap.close()
