"""The router's KV event feeds are as reliable as the wire lets them be: a replay arrives whole
however long, a replay that timed out does not answer the next one, a gap the worker's buffer no
longer holds is reported (the index starts over), a snapshot lists parents before children, a
feed learns what a worker holds as it begins following it, a feed that failed is followed again,
and a worker silent for long is forgotten with its feed and index."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from mmserve.cluster_credential import ClusterCredential
from mmserve.kv_events import (AllBlocksCleared, BlockRemoved, BlockStored, EventsLost, KVEventPublisher, KVEventSubscriber,
                               TOPIC)
from mmserve.roles import worker_pool
from mmserve.roles.prefix_index import KVEventFeed, PrefixIndex
from mmserve.roles.routing import RoutingConfig, WorkerChooser
from mmserve.rpc import worker_pb2 as pb
from waiting import wait_for

pytestmark = pytest.mark.timeout(60)
KEYS = ClusterCredential.generate().kv_event_keys


def page(i: int) -> bytes:
    return i.to_bytes(32, "big")


def stored(i: int, tokens: int = 16) -> list:
    return [BlockStored([page(i)], None, list(range(tokens)), tokens)]


@pytest.fixture
def publisher():
    publisher = KVEventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", KEYS)
    yield publisher
    publisher.close()


def subscribe(publisher) -> KVEventSubscriber:
    subscriber = KVEventSubscriber(publisher.endpoint, publisher.replay_endpoint, KEYS)
    time.sleep(0.3)  # a SUB socket misses what is published before it has joined
    return subscriber


def test_a_replay_longer_than_the_sockets_high_water_mark_arrives_whole(publisher):
    """A ROUTER socket drops what passes a peer's high-water mark (1000 messages) without a word."""
    for i in range(3000):
        publisher.publish(stored(i))
    subscriber = subscribe(publisher)
    try:
        publisher.publish(stored(3000))  # reveals the gap: everything before it is replayed
        got = subscriber.receive(5.0)
        assert [seq for seq, _ in got] == list(range(3002))  # seq 0: the publisher's AllBlocksCleared
        assert isinstance(got[0][1].events[0], AllBlocksCleared)
    finally:
        subscriber.close()


def test_a_replay_that_timed_out_does_not_answer_the_next_one(publisher):
    """The answer is long (1,000 batches) so that it cannot all be waiting at once when read
    without waiting: with ten batches, a reader descheduled on a busy machine found the whole
    answer there and no replay ever timed out."""
    for i in range(1000):
        publisher.publish(stored(i))
    subscriber = subscribe(publisher)
    try:
        for _ in range(10):
            try:
                subscriber.replay(0, 0.0)
            except TimeoutError:
                break
        else:
            pytest.fail("a replay never timed out")
        time.sleep(0.5)  # the late answer has arrived by now
        got = subscriber.replay(998, 2.0)
        assert [seq for seq, _ in got] == [998, 999, 1000]
    finally:
        subscriber.close()


def test_a_gap_the_buffer_no_longer_holds_is_filled_by_a_snapshot_of_the_cache():
    """A block is announced once, when it is cached: a router joining a worker that has run for a
    while learns of every block the worker holds, long-held ones included, from the snapshot that
    answers a replay reaching back past the buffer (before, it was told the batches were lost, and
    never learnt of the blocks announced in them)."""
    small = KVEventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", KEYS, buffer_batches=5)
    try:
        for i in range(20):
            small.publish(stored(i))
        small.publish([BlockRemoved([page(3)])])
        small.publish([BlockStored([page(30), page(31)], page(19), list(range(32)), 16)])  # two blocks at once
        subscriber = subscribe(small)  # a router joining a worker that has run for a while
        small.publish(stored(40))
        got = subscriber.receive(5.0)
        assert [seq for seq, _ in got] == [23, 23]  # the snapshot covers the batch that showed the gap
        index = PrefixIndex()
        for _, batch in got:
            index.apply("w", batch)
        held = [i for i in range(20) if i != 3] + [30, 31, 40]
        assert index.size("w") == len(held) and all(index.matched_pages("w", [page(i)]) for i in held)
        snapshot = got[0][1].events
        assert isinstance(snapshot[0], AllBlocksCleared)
        (split,) = [e for e in snapshot if isinstance(e, BlockStored) and e.block_hashes == [page(31)]]
        assert (split.parent_block_hash, split.token_ids, split.block_size) == (page(30), list(range(16, 32)), 16)
        small.publish(stored(41))
        assert [seq for seq, _ in subscriber.receive(5.0)] == [24]  # in step again
        subscriber.close()
    finally:
        small.close()


def test_a_publisher_started_again_at_the_same_endpoints_is_reported_with_its_new_cache():
    """A restarted worker's publisher numbers its batches from 0 again: what was known of the old
    one's cache is reported lost, and the batches handed on describe the new one's from its start."""
    import socket

    def free() -> str:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return f"tcp://127.0.0.1:{probe.getsockname()[1]}"

    endpoints = (free(), free())
    old = KVEventPublisher(*endpoints, KEYS)
    subscriber = subscribe(old)
    try:
        for i in range(6):
            old.publish(stored(i))
        seen = []
        while len(seen) < 7:
            seen += [seq for seq, _ in subscriber.receive(5.0)]
        assert seen == list(range(7))  # (the first published before the SUB joined: replayed)
        old.close()
        new = KVEventPublisher(*endpoints, KEYS)  # its AllBlocksCleared goes out before the SUB is back
        try:
            with pytest.raises(EventsLost, match="started over") as lost:
                for i in range(50):  # until the SUB is back (a PUB drops what it sends before then)
                    new.publish(stored(100 + i))
                    assert subscriber.receive(0.2) == []
            seqs = [seq for seq, _ in lost.value.batches]
            assert seqs == list(range(len(seqs))) and 1 < len(seqs) <= 51
            assert isinstance(lost.value.batches[0][1].events[0], AllBlocksCleared)
        finally:
            new.close()
    finally:
        subscriber.close()


@pytest.mark.parametrize("token_ids", [True, False])
def test_a_replay_for_the_routers_index_takes_about_its_bytes_in_memory(token_ids):
    """The router's feed reads hashes only: a replay of a full buffer keeps each page's token ids
    encoded rather than as a Python int each (~6x their bytes); a router restarting replays every
    worker's at once."""
    import tracemalloc

    publisher = KVEventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", KEYS)
    for i in range(200):  # a long prompt's worth of token ids in each batch
        publisher.publish([BlockStored([page(i)], None, list(range(1000, 3048)), 2048)])
    subscriber = KVEventSubscriber(publisher.endpoint, publisher.replay_endpoint, KEYS, token_ids=token_ids)
    time.sleep(0.3)  # joined late: the next batch shows the gap, and the whole buffer is replayed
    try:
        _, size = publisher.buffered()
        tracemalloc.start()
        try:
            publisher.publish([BlockRemoved([page(999)])])
            got = subscriber.receive(5.0)
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        stored = [e for _, batch in got for e in batch.events if isinstance(e, BlockStored)]
        assert [e.block_hashes for e in stored] == [[page(i)] for i in range(200)]
        if token_ids:
            assert held > 4 * size and stored[7].token_ids == list(range(1000, 3048))
        else:
            assert held < 2 * size and msgspec.msgpack.decode(stored[7].token_ids) == list(range(1000, 3048))
    finally:
        subscriber.close()
        publisher.close()


def test_the_replay_buffer_is_bounded_in_bytes():
    bounded = KVEventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", KEYS, buffer_bytes=100_000)
    try:
        for i in range(200):  # a long prompt's pages in each batch: ~4.5 KB
            bounded.publish(stored(i, tokens=2048))
        batches, size = bounded.buffered()
        assert size <= 100_000 and 10 < batches < 200
    finally:
        bounded.close()


def test_a_feed_applies_a_cleared_cache_and_is_followed_again_after_it_failed(publisher):
    index = PrefixIndex()
    feed = KVEventFeed(index, KEYS)
    try:
        feed.follow("prefill-a", publisher.endpoint, publisher.replay_endpoint)
        time.sleep(0.3)
        publisher.publish(stored(1) + stored(2))
        wait_for(lambda: index.size("prefill-a") == 2)
        publisher.publish([AllBlocksCleared()])
        wait_for(lambda: index.size("prefill-a") == 0)
        publisher.publish(stored(3))
        wait_for(lambda: index.size("prefill-a") == 1)
        seq = (publisher.buffered()[0]).to_bytes(8, "big", signed=True)  # the next number, with no batch in it
        publisher._pub.send_multipart([TOPIC, seq, b"not msgpack"])  # noqa: SLF001: a corrupt batch on the wire
        wait_for(lambda: feed.following() == [])
        assert index.size("prefill-a") == 0  # what it knew stopped being kept up: forgotten
        feed.follow("prefill-a", publisher.endpoint, publisher.replay_endpoint)  # the worker's next heartbeat
        time.sleep(0.3)
        publisher.publish(stored(4))
        wait_for(lambda: index.size("prefill-a") == 2)  # the replay brings back page 3 (stored since the clear)
        assert index.matched_pages("prefill-a", [page(3)]) == 1
    finally:
        feed.close()


def test_a_feed_learns_what_an_idle_worker_holds_as_it_begins_following_it(publisher):
    """A router that starts (or restarts) beside a worker that cached a system prompt and has
    been idle since: the index learns the worker's pages at once, from the replay, not at the
    worker's next batch (an idle worker sends none, and requests went elsewhere meanwhile)."""
    publisher.publish(stored(1) + stored(2))
    publisher.publish([BlockRemoved([page(2)])] + stored(3))
    index = PrefixIndex()
    feed = KVEventFeed(index, KEYS)
    try:
        feed.follow("prefill-a", publisher.endpoint, publisher.replay_endpoint)
        wait_for(lambda: index.size("prefill-a") == 2, 5, "the feed did not learn what the worker holds")
        assert index.matched_pages("prefill-a", [page(1)]) == 1 and index.matched_pages("prefill-a", [page(3)]) == 1
        publisher.publish(stored(4))  # the first live batch: asks the replay again, and goes on in step
        wait_for(lambda: index.size("prefill-a") == 3)
        publisher.publish([BlockRemoved([page(1)])])
        wait_for(lambda: index.size("prefill-a") == 2)
    finally:
        feed.close()


def test_a_snapshot_lists_each_block_after_its_parent():
    """A parent evicted and cached again comes after its child in the order of storing; a
    subscriber building a tree drops a block whose parent it has not seen."""
    small = KVEventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", KEYS, buffer_batches=2)
    try:
        small.publish([BlockStored([page(1)], None, [1] * 16, 16)])
        small.publish([BlockStored([page(2), page(3)], page(1), [2] * 32, 16)])
        small.publish([BlockRemoved([page(1)])])
        small.publish([BlockStored([page(1)], None, [1] * 16, 16)])
        small.publish(stored(9))
        subscriber = KVEventSubscriber(small.endpoint, small.replay_endpoint, KEYS)
        [(_, snapshot)] = subscriber.replay(0, 5.0)
        subscriber.close()
        order = [e.block_hashes[0] for e in snapshot.events if isinstance(e, BlockStored)]
        assert sorted(order) == sorted([page(1), page(2), page(3), page(9)])
        assert order.index(page(1)) < order.index(page(2)) < order.index(page(3))
    finally:
        small.close()


def test_a_worker_silent_for_long_is_forgotten_with_its_feed_and_index(publisher):
    index = PrefixIndex()
    feed = KVEventFeed(index, KEYS)

    async def scenario():
        pool = worker_pool.WorkerPool("token", WorkerChooser(RoutingConfig("cache_aware"), index, None), feed,
                                       model_fingerprint="")
        gone = pb.Registration(role="prefill", name="prefill-host-1", grpc_address="127.0.0.1:9", capacity=1,
                               incarnation=1, page_size=16, kv_events_endpoint=publisher.endpoint,
                               kv_events_replay_endpoint=publisher.replay_endpoint)
        staying = pb.Registration(role="prefill", name="prefill-host-2", grpc_address="127.0.0.1:10", capacity=1,
                                  incarnation=2)
        assert (await pool.Register(gone, None)).ok and (await pool.Register(staying, None)).ok
        await asyncio.sleep(0.3)
        publisher.publish(stored(1))
        await asyncio.to_thread(wait_for, lambda: index.size("prefill-host-1") == 1)
        pool.workers["prefill-host-1"].last_seen -= worker_pool.WORKER_FORGET_S + 1  # a minute of silence
        # a heartbeat of a worker known already: after a scale-down nobody new registers (only a
        # new worker's registration looked, and the dead one's feed ran for good)
        assert (await pool.Register(staying, None)).ok
        assert list(pool.workers) == ["prefill-host-2"]
        assert feed.following() == [] and index.size("prefill-host-1") == 0
        for task in list(pool._closing):  # noqa: SLF001: the retired channels' close, not waited for by the pool
            task.cancel()

    try:
        asyncio.run(scenario())
    finally:
        feed.close()
