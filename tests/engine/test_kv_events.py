"""KV events: a subscriber sees exactly the pages the engine's prefix cache stored and evicted, with
their tokens and parent chain; one that missed batches gets them replayed; one without the
cluster's key gets nothing."""

import os
import time

import numpy as np
import pytest

from mmserve import LLM, SamplingParams
from mmserve.engine.config import EngineConfig
from mmserve.engine.engine import LLMEngine
from mmserve.engine.kv_rows import KVRows
from transfer.curve import CurveKeys
from mmserve.kv_events import BlockRemoved, BlockStored, KVEventPublisher, KVEventSubscriber

PAGE = 8
KEYS = CurveKeys.derive(os.urandom(32), os.urandom(32))


@pytest.fixture
def publisher():
    publisher = KVEventPublisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", KEYS, buffer_batches=1000)
    yield publisher
    publisher.close()


@pytest.fixture
def llm(reference, publisher):
    """An engine of 12 pages (11 usable) publishing its KV events."""
    llm = LLM(reference[1], num_pages=2, page_size=PAGE, precompile=False)
    llm.engine = LLMEngine(llm.model, EngineConfig(num_pages=12, page_size=PAGE, max_model_len=96,
                                                   max_prefill_tokens=32, precompile=False), kv_events=publisher)
    return llm


def subscribe(publisher, keys=KEYS) -> KVEventSubscriber:
    subscriber = KVEventSubscriber(publisher.endpoint, publisher.replay_endpoint, keys)
    time.sleep(0.3)  # a SUB socket misses what is published before it has joined
    return subscriber


def drain(subscriber, batches: int) -> list:
    out = []
    deadline = time.monotonic() + 10
    while len(out) < batches and time.monotonic() < deadline:
        out += subscriber.receive(0.5)
    return out


def text(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 800, n)]


def run(llm, prompt: list[int], max_tokens: int = 3) -> list[int]:
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                    ignore_eos=True))[0]
    return prompt + out.outputs[0].token_ids


def test_a_subscriber_sees_exactly_what_was_stored_and_evicted(llm, publisher):
    subscriber = subscribe(publisher)
    first = run(llm, text(1, 37))  # 40 tokens with its output: 4 full pages (the 5th: 0 of 8)
    shared = run(llm, first[:16] + text(2, 13))  # its first two pages are first's
    others = [run(llm, text(10 + i, 30)) for i in range(3)]  # 11 usable pages: the oldest are evicted
    batches = drain(subscriber, 1)
    while more := subscriber.receive(0.5):
        batches += more
    assert [seq for seq, _ in batches] == list(range(len(batches))), "batches arrive in order, none missing"
    events = [e for _, batch in batches for e in batch.events]
    stored = [e for e in events if isinstance(e, BlockStored)]
    removed = [h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes]
    # each stored page carries its tokens and chains to the page before it in its sequence
    by_tokens = {tuple(e.token_ids): e for e in stored}
    for sequence in [first, shared, *others]:
        pages = [tuple(sequence[i:i + PAGE]) for i in range(0, len(sequence) - len(sequence) % PAGE, PAGE)]
        pages = pages[:(len(sequence) - 1) // PAGE]  # the last token's KV is never written
        chain = [by_tokens[p] for p in pages if p in by_tokens]
        assert len(chain) == len(pages), "every full computed page was stored once"
        assert chain[0].parent_block_hash is None
        for parent, child in zip(chain, chain[1:]):
            assert child.parent_block_hash == parent.block_hashes[0]
        assert {e.block_size for e in chain} == {PAGE}
    assert len(stored) == len({e.block_hashes[0] for e in stored}), "the shared pages were stored once"
    assert removed, "the small cache evicted"
    stored_at = {e.block_hashes[0]: i for i, e in enumerate(events) if isinstance(e, BlockStored)}
    assert all(h in stored_at for h in removed)
    live = set(stored_at) - set(removed)
    kv = llm.engine.kv
    assert len(live) == kv.num_cached_pages
    assert all(kv.prefix_cache.longest_prefix([h]) for h in live), "what the events say is cached, is"
    subscriber.close()


def test_a_late_subscriber_is_replayed_what_it_missed(llm, publisher):
    run(llm, text(3, 30))
    run(llm, text(4, 30))
    subscriber = subscribe(publisher)  # joined after those batches were published
    run(llm, text(5, 30))
    got = drain(subscriber, 3)
    assert subscriber.replays == 1
    assert [seq for seq, _ in got][0] == 0
    assert [seq for seq, _ in got] == list(range(len(got)))
    subscriber.close()


def test_a_subscriber_without_the_cluster_key_gets_nothing(llm, publisher):
    stranger = CurveKeys.derive(os.urandom(32), os.urandom(32))
    wrong_client = CurveKeys(KEYS.server_public, KEYS.server_secret, stranger.client_public, stranger.client_secret)
    subscriber = subscribe(publisher, wrong_client)
    run(llm, text(6, 30))
    assert subscriber.receive(1.0) == []
    subscriber.close()


def test_what_a_decode_worker_caches_between_steps_is_published_at_once(llm, publisher):
    """A decode worker changes its cache outside any step: a reservation evicts pages, a request's
    arriving KV stores them, a cancelled reservation gives them back. Each is published when it
    happens (they waited for the next step that scheduled something: an idle worker's router
    index stayed wrong for as long as it was idle)."""
    from mmserve.engine.page_hash import prompt_page_keys
    from mmserve.engine.request import Request

    engine = llm.engine
    run(llm, text(7, 40))  # 5 full pages cached
    subscriber = subscribe(publisher)
    cached = engine.kv.num_cached_pages
    prompt = text(8, 60)  # 60 tokens + 20: 10 of the 11 usable pages, evicting all but 1 idle page
    keys = prompt_page_keys(engine.prepare({"prompt_token_ids": prompt}), engine.model, PAGE)
    reservation = engine.reserve("arriving", len(prompt) + 20, prompt, keys)
    removed = [h for _, batch in drain(subscriber, 1) for e in batch.events if isinstance(e, BlockRemoved)
               for h in e.block_hashes]
    assert len(removed) == cached - engine.kv.num_cached_pages > 0
    k, v = engine.runner.read_kv(engine.kv.page_table("arriving"), len(prompt), 64)  # rows of the right shape
    request = Request("arriving", prompt, SamplingParams(temperature=0, max_tokens=20), np.zeros((3, 0), np.int32),
                      0, None, num_computed=len(prompt), page_keys=keys)
    engine.admit_prefilled(request, reservation, [KVRows(k, v, 0, len(prompt))], (1, None, None, None))
    stored = [e for _, batch in drain(subscriber, 1) for e in batch.events if isinstance(e, BlockStored)]
    assert [tuple(e.token_ids) for e in stored] == [tuple(prompt[i:i + PAGE]) for i in range(0, 56, PAGE)]
    engine.abort("arriving")
    subscriber.close()
