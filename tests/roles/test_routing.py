"""The router's routing policies and its index of which worker holds which KV pages."""

from __future__ import annotations

import dataclasses
import time

import pytest

from mmserve.cluster_credential import ClusterCredential
from mmserve.kv_events import BlockRemoved, BlockStored, EventBatch, KVEventPublisher
from mmserve.roles.prefix_index import KVEventFeed, PrefixIndex
from mmserve.roles.routing import RoutingConfig, WorkerChooser
from mmserve.roles.worker import PrefixCache

KEYS = [bytes([i]) * 32 for i in range(6)]


@dataclasses.dataclass
class Worker:
    name: str
    load: float = 0.0
    page_size: int = 4


def stored(*keys: bytes) -> EventBatch:
    return EventBatch(0.0, [BlockStored(list(keys), None, [0, 1, 2, 3], 4)])


def removed(*keys: bytes) -> EventBatch:
    return EventBatch(0.0, [BlockRemoved(list(keys))])


def chooser(policy: str, index: PrefixIndex, page_keys=lambda prompt, size: KEYS) -> WorkerChooser:
    return WorkerChooser(RoutingConfig(policy), index, page_keys)


PROMPT = object()  # the chooser hands prompts to page_keys only


def test_index_counts_a_workers_leading_pages_as_stored_and_removed():
    index = PrefixIndex()
    index.apply("a", stored(*KEYS[:4]))
    assert index.matched_pages("a", KEYS) == 4
    assert index.matched_pages("b", KEYS) == 0
    index.apply("a", removed(KEYS[1]))
    assert index.matched_pages("a", KEYS) == 1  # a hole ends the prefix: page 2 cannot be used without page 1
    index.forget("a")
    assert index.matched_pages("a", KEYS) == 0 and index.size("a") == 0


def test_cache_aware_sends_prefill_to_the_worker_holding_the_longest_prefix():
    index = PrefixIndex()
    index.apply("a", stored(*KEYS[:2]))
    index.apply("b", stored(*KEYS[:5]))
    choose = chooser("cache_aware", index)
    workers = [Worker("a"), Worker("b", load=0.5)]
    picks = [choose.choose("prefill", workers, PROMPT) for _ in range(4)]
    assert [(c.worker.name, c.matched_pages) for c in picks] == [("b", 5)] * 4


def test_cache_aware_passes_a_full_holder_over_for_a_worker_with_room():
    index = PrefixIndex()
    index.apply("b", stored(*KEYS))
    choice = chooser("cache_aware", index).choose("prefill", [Worker("a", 0.9), Worker("b", 1.0)], PROMPT)
    assert (choice.worker.name, choice.matched_pages) == ("a", 0)


def test_cache_aware_passes_a_much_busier_holder_over_for_the_least_loaded():
    """The first worker to cache a shared system prompt would otherwise take every request sharing
    it until it is full, while the others idle."""
    index = PrefixIndex()
    index.apply("a", stored(KEYS[0]))
    choose = chooser("cache_aware", index)
    busy, idle = Worker("a", 0.875), Worker("b", 0.0)
    assert choose.choose("prefill", [busy, idle], PROMPT).worker.name == "b"
    assert choose.choose("prefill", [Worker("a", 0.375), idle], PROMPT).matched_pages == 1  # within the gap
    strict = WorkerChooser(RoutingConfig("cache_aware", cache_aware_max_load_gap=0.0), index, lambda prompt, size: KEYS)
    assert strict.choose("prefill", [Worker("a", 0.125), idle], PROMPT).worker.name == "b"
    with pytest.raises(ValueError, match="cache_aware_max_load_gap"):
        RoutingConfig("cache_aware", cache_aware_max_load_gap=1.5)


def test_cache_aware_without_a_holder_goes_by_load_then_in_turn():
    choose = chooser("cache_aware", PrefixIndex())
    assert choose.choose("prefill", [Worker("a", 0.5), Worker("b", 0.25)], PROMPT).worker.name == "b"
    spread = [choose.choose("prefill", [Worker("a"), Worker("b")], PROMPT).worker.name for _ in range(4)]
    assert sorted(spread) == ["a", "a", "b", "b"]


def test_cache_aware_uses_each_workers_page_size():
    index = PrefixIndex()
    index.apply("a", stored(*KEYS[:3]))
    asked = []

    def page_keys(prompt, size):
        asked.append(size)
        return KEYS if size == 8 else [b"other" * 6 + b"xx"]

    choose = chooser("cache_aware", index, page_keys)
    choice = choose.choose("prefill", [Worker("a", page_size=8), Worker("b", page_size=16)], PROMPT)
    assert (choice.worker.name, choice.matched_pages) == ("a", 3)
    assert sorted(asked) == [8, 16]


def test_cache_aware_sends_decode_to_the_worker_holding_the_earlier_turns_and_encode_by_load():
    index = PrefixIndex()
    index.apply("a", stored(*KEYS))
    choose = chooser("cache_aware", index)
    decode = choose.choose("decode", [Worker("a", 0.5), Worker("b", 0.0)], PROMPT)
    assert (decode.worker.name, decode.matched_pages) == ("a", len(KEYS))
    assert choose.choose("encode", [Worker("a", 0.5), Worker("b", 0.0)], PROMPT).worker.name == "b"


def test_round_robin_spreads_whatever_the_workers_hold():
    index = PrefixIndex()
    index.apply("a", stored(*KEYS))
    choose = chooser("round_robin", index)
    picks = [choose.choose("prefill", [Worker("a"), Worker("b", 0.9)], PROMPT).worker.name for _ in range(4)]
    assert picks == ["a", "b", "a", "b"]


def test_least_load_picks_the_lowest_load():
    choose = chooser("least_load", PrefixIndex())
    assert choose.choose("prefill", [Worker("a", 0.5), Worker("b", 0.75), Worker("c", 0.25)], PROMPT).worker.name == "c"


def test_no_live_worker_is_a_lookup_error():
    with pytest.raises(LookupError, match="no prefill worker"):
        chooser("cache_aware", PrefixIndex()).choose("prefill", [], PROMPT)


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="routing_policy"):
        RoutingConfig("fastest")


def test_a_wildcard_bind_is_advertised_at_the_workers_host():
    cache = PrefixCache(16, "tcp://0.0.0.0:5570", "tcp://*:5571").dialled_at("10.0.0.7")
    assert (cache.events_endpoint, cache.replay_endpoint) == ("tcp://10.0.0.7:5570", "tcp://10.0.0.7:5571")
    assert PrefixCache(16, "tcp://127.0.0.1:5570").dialled_at("10.0.0.7").events_endpoint == "tcp://127.0.0.1:5570"


def test_the_feed_fills_the_index_from_a_real_publisher_and_forgets_an_unfollowed_worker():
    keys = ClusterCredential.generate().kv_event_keys
    publisher = KVEventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", keys)
    index = PrefixIndex()
    feed = KVEventFeed(index, keys)
    try:
        feed.follow("prefill-a", publisher.endpoint, publisher.replay_endpoint)
        publisher.publish([BlockStored(KEYS[:3], None, [0] * 12, 4)])  # may go out before the subscription
        time.sleep(0.5)
        publisher.publish([BlockRemoved([KEYS[2]])])  # reveals any gap: the replay fills it
        deadline = time.monotonic() + 10
        while index.matched_pages("prefill-a", KEYS) != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert index.matched_pages("prefill-a", KEYS) == 2
        feed.unfollow("prefill-a")
        assert index.matched_pages("prefill-a", KEYS) == 0
    finally:
        feed.close()
        publisher.close()


def test_a_feed_whose_subscriber_could_not_start_is_followed_again(monkeypatch):
    """A subscriber that fails to open (out of descriptors, say) ends its feed like any other
    failure, so the worker's next heartbeat follows it again (before, the feed stayed listed as
    followed, and that worker's index stayed empty for good)."""
    from mmserve.roles import prefix_index

    def refused(*args, **kwargs):
        raise OSError("too many open files")

    monkeypatch.setattr(prefix_index, "KVEventSubscriber", refused)
    feed = KVEventFeed(PrefixIndex(), ClusterCredential.generate().kv_event_keys)
    feed.follow("prefill-a", "tcp://127.0.0.1:9", "tcp://127.0.0.1:10")
    deadline = time.monotonic() + 10
    while feed.following() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert feed.following() == []


def test_a_stopped_feed_neither_applies_nor_forgets():
    """An unfollowed feed's thread may still be running when the worker's new feed has applied
    batches: it changes nothing of the worker's entry any more."""
    import threading

    index, stop = PrefixIndex(), threading.Event()
    index.apply("a", stored(*KEYS[:2]))
    stop.set()
    index.forget("a", stop)
    index.apply("a", removed(KEYS[0]), stop)
    assert index.matched_pages("a", KEYS) == 2
    index.forget("a")
    assert index.matched_pages("a", KEYS) == 0


def test_the_pool_keeps_each_workers_incarnation_and_counts_a_new_one_as_a_restart():
    """A worker restarted at the same address (a pod with a fixed port) is told from the one before
    by its incarnation: the router sends the new one to receivers and counts the restart."""
    import asyncio

    from mmserve.roles.worker_pool import WorkerPool
    from mmserve.rpc import worker_pb2 as pb

    async def scenario():
        pool = WorkerPool("token", chooser("least_load", PrefixIndex()), model_fingerprint="")
        registration = pb.Registration(role="prefill", name="p", grpc_address="127.0.0.1:9", capacity=4,
                                       incarnation=11)
        assert (await pool.Register(registration, None)).ok
        assert (await pool.Register(registration, None)).ok  # a heartbeat
        assert pool.pick("prefill").worker.incarnation == 11 and pool.restarts == 0
        registration.incarnation = 12
        assert (await pool.Register(registration, None)).ok
        assert pool.pick("prefill").worker.incarnation == 12 and pool.restarts == 1
        for task in list(pool._closing):  # noqa: SLF001: the retired channel's close, not waited for by the pool
            task.cancel()

    asyncio.run(scenario())


def test_a_worker_leaving_is_sent_nothing_new_and_a_new_incarnation_is_back():
    """A stopping worker's last registration says it is leaving: requests go to the other worker
    at once, with none left the role is unavailable, and its restarted self is picked again."""
    import asyncio

    from mmserve.roles.worker_pool import WorkerPool
    from mmserve.rpc import worker_pb2 as pb

    async def scenario():
        pool = WorkerPool("token", chooser("round_robin", PrefixIndex()), model_fingerprint="")
        a, b = (pb.Registration(role="decode", name=name, grpc_address=f"127.0.0.1:{port}", capacity=4, incarnation=1)
                for name, port in (("a", 9), ("b", 10)))
        for registration in (a, b):
            assert (await pool.Register(registration, None)).ok
        assert {pool.pick("decode").worker.name for _ in range(4)} == {"a", "b"}
        a.leaving = True
        assert (await pool.Register(a, None)).ok
        assert {pool.pick("decode").worker.name for _ in range(4)} == {"b"}
        assert pool.workers["a"].leaving  # still known: its requests in flight keep their channel
        b.leaving = True
        assert (await pool.Register(b, None)).ok
        assert pool.live("decode") == [] and pool.capacity("decode") == 0
        a.leaving, a.incarnation = False, 2  # started again
        assert (await pool.Register(a, None)).ok
        assert pool.pick("decode").worker.name == "a" and pool.restarts == 1
        for task in list(pool._closing):  # noqa: SLF001: the retired channel's close, not waited for by the pool
            task.cancel()

    asyncio.run(scenario())


def test_decode_workers_report_their_kv_and_each_request_goes_where_its_kv_fits():
    """The router admits by decode's KV (prompt + max_tokens, whole pages) and sends a request to
    a decode worker with room by its own count of what it has sent there."""
    import asyncio

    from mmserve.engine.inputs import PreparedPrompt
    from mmserve.roles.router_backend import DisaggregatedBackend
    from mmserve.roles.worker_pool import WorkerPool
    from mmserve.rpc import worker_pb2 as pb
    from mmserve.sampling_params import SamplingParams
    from mmserve.serving.backend import GenerateRequest

    async def scenario():
        pool = WorkerPool("token", chooser("least_load", PrefixIndex()), model_fingerprint="")
        backend = DisaggregatedBackend(pool)
        assert backend.kv_capacity() is None  # no decode worker yet
        for name, pages in (("small", 10), ("large", 40)):
            assert (await pool.Register(pb.Registration(role="decode", name=name, grpc_address=f"127.0.0.1:{pages}",
                                                        capacity=8, kv_pages=pages, kv_page_size=8), None)).ok
        assert backend.kv_capacity() == 40 * 8  # the largest: what one request may reserve
        request = GenerateRequest("r", PreparedPrompt([1] * 30, [], []), SamplingParams(max_tokens=60))
        assert backend.kv_demand(request) == 96  # 90 tokens in pages of 8
        pool.workers["large"].in_flight = 3  # busier, but the only one with room for 12 pages
        assert pool.pick("decode", kv_tokens=90).worker.name == "large"
        pool.workers["large"].kv_reserved = 35
        assert pool.pick("decode", kv_tokens=90).worker.name == "small"  # neither has room: by load
        assert pool.pick("decode", kv_tokens=8).worker.name == "small"
        for task in list(pool._closing):  # noqa: SLF001
            task.cancel()

    asyncio.run(scenario())


def test_a_prompt_goes_only_to_workers_whose_context_holds_it_and_none_holding_it_is_a_400():
    """Decode refusing a prompt longer than its context would answer only after prefill's first
    token reached the client; the router knows each worker's context from its registration."""
    import asyncio

    from mmserve.engine.inputs import PreparedPrompt
    from mmserve.roles.router_backend import DisaggregatedBackend
    from mmserve.roles.worker_pool import WorkerPool
    from mmserve.rpc import worker_pb2 as pb
    from mmserve.sampling_params import SamplingParams
    from mmserve.serving.backend import GenerateRequest

    async def scenario():
        pool = WorkerPool("token", chooser("least_load", PrefixIndex()), model_fingerprint="")
        backend = DisaggregatedBackend(pool)
        for name, context in (("short", 64), ("long", 256)):
            assert (await pool.Register(pb.Registration(role="decode", name=name, grpc_address=f"127.0.0.1:{context}",
                                                        capacity=8, max_model_len=context), None)).ok
        pool.workers["long"].in_flight = 7  # busier, but the only one holding 100 tokens
        assert pool.pick("decode", PreparedPrompt([1] * 100, [], [])).worker.name == "long"
        assert pool.pick("decode", PreparedPrompt([1] * 10, [], [])).worker.name == "short"
        events = [e async for e in backend.generate(
            GenerateRequest("r", PreparedPrompt([1] * 256, [], []), SamplingParams(max_tokens=4)))]
        assert len(events) == 1 and events[0].invalid and "256 tokens" in events[0].error
        assert [w.in_flight for w in pool.workers.values()] == [0, 7] and not backend._active  # noqa: SLF001
        for task in list(pool._closing):  # noqa: SLF001
            task.cancel()

    asyncio.run(scenario())


def test_the_pool_refuses_a_worker_of_another_model_and_keeps_the_ones_of_its_own():
    """A worker started with another --model would answer the router's token ids from its own
    vocabulary: its registration is refused with a reason, and it is never picked."""
    import asyncio

    from mmserve.roles.worker_pool import WorkerPool
    from mmserve.rpc import worker_pb2 as pb

    async def scenario():
        pool = WorkerPool("token", chooser("least_load", PrefixIndex()), model_fingerprint="a" * 64)
        stranger = pb.Registration(role="decode", name="d", grpc_address="127.0.0.1:9", capacity=4,
                                   model_fingerprint="b" * 64)
        for _ in range(2):  # the first registration and a heartbeat
            ack = await pool.Register(stranger, None)
            assert not ack.ok and "another model" in ack.error and "bbbbbbbbbbbb" in ack.error
        assert not (await pool.Register(pb.Registration(role="decode", name="e", grpc_address="127.0.0.1:10",
                                                        capacity=4), None)).ok  # no fingerprint at all
        assert pool.workers == {} and pool.live("decode") == []
        own = pb.Registration(role="decode", name="d", grpc_address="127.0.0.1:9", capacity=4,
                              model_fingerprint="a" * 64)
        assert (await pool.Register(own, None)).ok
        assert [w.name for w in pool.live("decode")] == ["d"]
        for task in list(pool._closing):  # noqa: SLF001
            task.cancel()
        await pool.workers["d"].channel.close()

    asyncio.run(scenario())


def test_health_asks_every_worker_at_once():
    """Six workers each answering their check 0.4 s late (a worker answers between two of its
    steps): the router's health takes about one answer's time, not six (2.4 s, past a
    Kubernetes probe's default 1 s timeout, on a busy but healthy cluster)."""
    import asyncio

    import grpc

    from mmserve.roles.router_backend import DisaggregatedBackend
    from mmserve.roles.worker_pool import ROLES, WorkerPool
    from mmserve.rpc import worker_pb2 as pb
    from mmserve.rpc import worker_pb2_grpc as pb_grpc

    class BusyWorker(pb_grpc.WorkerServicer):
        async def Check(self, request, context):
            await asyncio.sleep(0.4)
            return pb.Health(healthy=True, details_json='{"free_pages": 1}')

    async def scenario():
        server = grpc.aio.server()
        pb_grpc.add_WorkerServicer_to_server(BusyWorker(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        pool = WorkerPool("token", chooser("least_load", PrefixIndex()), model_fingerprint="")
        try:
            for role in ROLES:
                for i in range(2):
                    assert (await pool.Register(pb.Registration(role=role, name=f"{role}-{i}", incarnation=i + 1,
                                                                grpc_address=f"127.0.0.1:{port}", capacity=1),
                                                None)).ok
            started = time.monotonic()
            health = await DisaggregatedBackend(pool).health()
            took = time.monotonic() - started
        finally:
            for worker in pool.workers.values():
                await worker.channel.close()
            await server.stop(None)
        assert health["healthy"] and [w["name"] for w in health["roles"]["prefill"]] == ["prefill-0", "prefill-1"]
        assert took < 1.2, f"{took:.2f} s: asked in turn"

    asyncio.run(scenario())


def test_admission_claims_each_requests_kv_on_one_decode_worker_with_room():
    """Two decode workers of 992 tokens: three requests of 600 are not admitted at once (the
    pages were counted as one pool of 1,984, and the third went to a worker without room and
    waited inside decode, its KV held in prefill's buffers), and one of 1,200 is a 400 (it was
    admitted, and decode capped its answer), as with one worker."""
    import asyncio

    from mmserve.engine.inputs import PreparedPrompt
    from mmserve.roles.router_backend import DisaggregatedBackend
    from mmserve.roles.worker_pool import WorkerPool
    from mmserve.rpc import worker_pb2 as pb
    from mmserve.sampling_params import SamplingParams
    from mmserve.serving.backend import GenerateRequest
    from mmserve.serving.router.admission import Admission
    from mmserve.serving.router.errors import InvalidRequest

    def request(i: int, max_tokens: int) -> GenerateRequest:
        return GenerateRequest(f"r{i}", PreparedPrompt([1] * 8, [], []), SamplingParams(max_tokens=max_tokens))

    async def scenario():
        pool = WorkerPool("token", chooser("least_load", PrefixIndex()), model_fingerprint="")
        backend = DisaggregatedBackend(pool)
        for name in ("d0", "d1"):
            assert (await pool.Register(pb.Registration(role="decode", name=name, grpc_address=f"127.0.0.1:{len(name)}",
                                                        capacity=8, kv_pages=62, kv_page_size=16), None)).ok
        admission = Admission(lambda: 8, 8, 0.5, backend.kv_capacity)

        def admit(r: GenerateRequest):
            return admission.admit(backend.kv_demand(r), lambda: backend.kv_claim(r))

        first, second = await admit(request(0, 592)), await admit(request(1, 592))
        assert {backend._claims[r].worker.name for r in ("r0", "r1")} == {"d0", "d1"}  # noqa: SLF001
        freed = backend._claims["r0"].worker  # noqa: SLF001
        third = asyncio.ensure_future(admit(request(2, 592)))
        await asyncio.sleep(0.1)
        assert not third.done() and admission.queued == 1  # waits at the door, holding nothing
        first.release()
        await asyncio.wait_for(third, 1)
        assert backend._claims["r2"].worker is freed  # noqa: SLF001
        assert sum(w.kv_reserved for w in pool.workers.values()) == 2 * 38
        with pytest.raises(InvalidRequest, match="more than a decode worker holds"):
            await admit(request(3, 1192))
        second.release()
        third.result().release()
        assert all(w.kv_reserved == 0 for w in pool.workers.values()) and not backend._claims  # noqa: SLF001
        assert all(w.in_flight == 0 for w in pool.workers.values())
        # A worker told to stop between a request's admission and its start: its drain hears of
        # the claim (it might stop before the request came), and the request is sent elsewhere.
        claimed = await admit(request(5, 8))
        worker = backend._claims["r5"].worker  # noqa: SLF001
        leaving = pb.Registration(role="decode", name=worker.name, grpc_address=worker.address, capacity=8,
                                  kv_pages=62, kv_page_size=16, leaving=True)
        assert (await pool.Register(leaving, None)).routed == 1
        events = [e async for e in backend.generate(request(5, 8))]
        assert "no prefill worker" in events[-1].error  # decode was picked again before that
        assert worker.kv_reserved == worker.in_flight == 0 and "r5" not in backend._claims  # noqa: SLF001
        claimed.release()
        for task in list(pool._closing):  # noqa: SLF001
            task.cancel()

    asyncio.run(scenario())
