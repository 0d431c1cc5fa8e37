"""Prefix caching changes no output: every case runs on an engine with the cache and on one without
(and, for the second turn about an image, on transformers), token for token, greedy and seeded;
the cache hits where it should, never across different pictures, and leaks no page."""

import dataclasses

import numpy as np
import pytest
import torch

from conftest import random_image
from hf_reference import IMAGE_ID, VIDEO_ID, VISION_END, VISION_START
from mmserve import LLM, SamplingParams
from mmserve.engine.page_hash import PageKeys

PAGE = 8
ENGINE = dict(page_size=PAGE, max_model_len=512, max_prefill_tokens=32, precompile=False)
IMAGE = [VISION_START, IMAGE_ID, VISION_END]
SEED = {"greedy": 0, "seeded": 1000}  # each variant its own content, so neither finds the other's pages
PARAMS = {"greedy": SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
          "seeded": SamplingParams(temperature=1.0, top_k=50, seed=7, repetition_penalty=1.5, max_tokens=10,
                                    ignore_eos=True)}


@pytest.fixture(scope="module")
def on(reference):
    return LLM(reference[1], num_pages=256, **ENGINE)


@pytest.fixture(scope="module")
def off(reference):
    return LLM(reference[1], num_pages=256, enable_prefix_caching=False, **ENGINE)


def text(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 800, n)]


def tokens(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def hits_of(llm, prompt, params) -> tuple[list[int], int]:
    """(output tokens, prefix cache hits in tokens) of one prompt run alone."""
    before = llm.engine.stats()["prefix_cache_hits"]
    out = tokens(llm, prompt, params)[0]
    return out, llm.engine.stats()["prefix_cache_hits"] - before


def assert_nothing_held(llm):
    """Every page is free or cached-and-idle, and every cached page can be evicted."""
    kv, total = llm.engine.kv, llm.engine.runner.num_pages - 1
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting
    assert kv.num_free_pages == total
    assert kv.num_evictable_pages == kv.num_cached_pages + kv.num_tail_pages
    assert kv.can_allocate(total * PAGE)


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_shared_system_prompt(on, off, sampling):
    system = text(1 + SEED[sampling], 61)  # 7 full pages and 5 tokens of the 8th
    prompts = [{"prompt_token_ids": system + text(10 + SEED[sampling] + i, 5 + 3 * i)} for i in range(4)]
    params = PARAMS[sampling]
    first, hits = hits_of(on, prompts[0], params)
    assert hits == 0
    assert first == tokens(off, prompts[0], params)[0]
    for prompt in prompts[1:]:
        got, hits = hits_of(on, prompt, params)
        assert hits == 56  # the system prompt's 7 full pages; its partial 8th page differs per prompt
        assert got == tokens(off, prompt, params)[0]
    assert tokens(on, prompts, params) == tokens(off, prompts, params)  # together, in one batch
    assert_nothing_held(on)


def test_prefix_ending_mid_page_hits_only_its_full_pages(on, off):
    shared = text(2, 5 * PAGE + 3)
    a, b = shared + text(20, 9), shared + text(21, 4)
    params = PARAMS["greedy"]
    tokens(on, {"prompt_token_ids": a}, params)
    got, hits = hits_of(on, {"prompt_token_ids": b}, params)
    assert hits == 5 * PAGE
    assert got == tokens(off, {"prompt_token_ids": b}, params)[0]


@pytest.mark.parametrize("length", [6 * PAGE, 6 * PAGE + 1, 6 * PAGE + 5])
def test_a_prompt_seen_before_computes_at_least_its_last_token(on, off, length):
    prompt = {"prompt_token_ids": text(100 + length, length)}
    params = PARAMS["greedy"]
    first = tokens(on, prompt, params)[0]
    again, hits = hits_of(on, prompt, params)
    assert hits == (length - 1) // PAGE * PAGE
    assert first == again == tokens(off, prompt, params)[0]


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_prompts_asked_again_with_only_their_last_token_to_compute_run_as_one_decode_step(on, off, sampling):
    """A prompt whose earlier run left its last page as a tail (a one-token answer) is found cached
    but for its last token; asked again in a burst, they take one decode step, not a one-row
    prefill step each, and their outputs are unchanged (seeded: with a penalty, whose slot is
    loaded for the decode row)."""
    prompts = [{"prompt_token_ids": text(300 + SEED[sampling] + i, 13 + 6 * i)} for i in range(4)]
    params = dataclasses.replace(PARAMS[sampling], max_tokens=1)
    first = tokens(on, prompts, params)
    steps, step = [], on.engine.step
    on.engine.step = lambda: steps.append(1) or step()
    try:
        before = on.engine.stats()["prefix_cache_hits"]
        again = tokens(on, prompts, params)
    finally:
        on.engine.step = step
    assert on.engine.stats()["prefix_cache_hits"] - before == sum(len(p["prompt_token_ids"]) - 1 for p in prompts)
    assert len(steps) == 1
    assert first == again == tokens(off, prompts, params)
    assert_nothing_held(on)


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_second_turn_about_the_same_image(on, off, sampling):
    image = random_image(5 + SEED[sampling], (96, 128))  # 12 image tokens
    params = PARAMS[sampling]
    turn1 = {"prompt_token_ids": text(3 + SEED[sampling], 13) + IMAGE + text(4, 20), "multi_modal_data": {"image": image}}
    answer = tokens(on, turn1, params)[0]
    assert answer == tokens(off, turn1, params)[0]
    ids = on.engine.prepare(turn1).token_ids  # the image expanded
    turn2 = {"prompt_token_ids": turn1["prompt_token_ids"] + answer + text(6, 11), "multi_modal_data": {"image": image}}
    got, hits = hits_of(on, turn2, params)
    # Turn 1's prompt and answer (the answer's last token never got its KV written) were kept: its
    # full pages cached, its partial last page as a tail.
    assert (len(ids) + len(answer) - 1) % PAGE  # else the case could not tell a tail from a full page
    assert hits == len(ids) + len(answer) - 1
    assert got == tokens(off, turn2, params)[0]


def test_second_turn_equals_transformers(on, reference):
    image = random_image(8, (96, 128))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    turn1 = {"prompt_token_ids": text(30, 11) + IMAGE + text(31, 9), "multi_modal_data": {"image": image}}
    answer = tokens(on, turn1, params)[0]
    turn2 = {"prompt_token_ids": turn1["prompt_token_ids"] + answer + text(32, 7), "multi_modal_data": {"image": image}}
    got, hits = hits_of(on, turn2, params)
    assert hits > 0
    ids = on.engine.prepare(turn2).token_ids
    processed = on.model.processor(images=[image])
    t_ids = torch.tensor(ids)[None]
    with torch.no_grad():
        out = reference[0].generate(t_ids, mm_token_type_ids=(t_ids == IMAGE_ID).int(), max_new_tokens=6,
                                    do_sample=False, pixel_values=torch.tensor(processed["pixel_values"]),
                                    image_grid_thw=torch.tensor(processed["image_grid_thw"]))
    assert got == out[0, len(ids):].tolist()


def test_same_text_with_different_images_shares_only_the_pages_before_the_image(on, off):
    before = text(7, 2 * PAGE + 3)  # the image starts in page 2, after 3 text tokens of it
    ids = before + IMAGE + text(8, 30)
    a = {"prompt_token_ids": ids, "multi_modal_data": {"image": random_image(40, (96, 128))}}
    b = {"prompt_token_ids": ids, "multi_modal_data": {"image": random_image(41, (96, 128))}}
    params = PARAMS["greedy"]
    want_a, want_b = tokens(off, a, params)[0], tokens(off, b, params)[0]
    assert want_a != want_b  # else the case could not tell a shared page
    assert hits_of(on, a, params)[0] == want_a
    got_b, hits = hits_of(on, b, params)
    assert hits == 2 * PAGE
    assert got_b == want_b
    again_a, hits = hits_of(on, a, params)
    assert again_a == want_a and hits > 4 * PAGE  # the same picture does hit past the image


def test_same_text_with_different_videos_shares_only_the_pages_before_the_video(on, off):
    before = text(13, 3 * PAGE + 5)
    ids = before + [VISION_START, VIDEO_ID, VISION_END] + text(14, 12)
    a, b = ({"prompt_token_ids": ids, "multi_modal_data": {"video": [random_image(80 + 4 * v + i, (64, 64))
                                                                       for i in range(4)]}} for v in range(2))
    params = PARAMS["greedy"]
    want_a, want_b = tokens(off, a, params)[0], tokens(off, b, params)[0]
    assert want_a != want_b
    assert hits_of(on, a, params)[0] == want_a
    got_b, hits = hits_of(on, b, params)
    first_frame = on.engine.prepare(a).token_ids.index(VIDEO_ID)  # after its timestamp's text tokens
    assert first_frame > len(before) + 2 and hits == first_frame // PAGE * PAGE
    assert got_b == want_b
    again_a, hits = hits_of(on, a, params)
    assert again_a == want_a and hits > first_frame + PAGE


def test_preempting_a_request_whose_pages_are_shared(reference):
    system = text(9, 4 * PAGE)
    prompts = [{"prompt_token_ids": system + text(50 + i, 6 + i)} for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    small = dict(ENGINE, num_pages=24, max_model_len=128)
    on, off = LLM(reference[1], **small), LLM(reference[1], enable_prefix_caching=False, **small)
    want = tokens(off, prompts, params)
    got = tokens(on, prompts, params)
    stats = on.engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert got == want
    assert_nothing_held(on)


def test_abort_of_one_of_two_sharers(on, off):
    system = text(11, 5 * PAGE)
    a, b = ({"prompt_token_ids": system + text(60 + i, 7)} for i in range(2))
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    tokens(on, {"prompt_token_ids": system + [1]}, params)  # caches the system prompt's pages
    engine = on.engine
    ids = [engine.add_request(p, params) for p in (a, b)]
    while not all(i in engine.kv for i in ids):
        engine.step()
    engine.step()
    tables = [engine.kv.page_table(i) for i in ids]
    assert tables[0][:5] == tables[1][:5]  # both hold the cached system pages
    engine.abort(ids[0])
    held = engine.kv.page_table(ids[1])
    assert engine.kv.num_free_pages + len(held) == engine.runner.num_pages - 1  # b's shared pages are not free
    outputs = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id] = out
    assert outputs[ids[1]].outputs[0].token_ids == tokens(off, b, params)[0]
    assert_nothing_held(on)
    assert engine.kv.cached_prefix(PageKeys(PAGE, []).first(5, lambda s, e: system[s:e])) == tables[0][:5]


def test_cached_pages_are_evicted_when_pages_run_short(reference):
    on = LLM(reference[1], num_pages=20, **dict(ENGINE, max_model_len=128))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i in range(6):  # 6 prompts of 8 pages: more than the cache holds
        tokens(on, {"prompt_token_ids": text(70 + i, 8 * PAGE)}, params)
        assert_nothing_held(on)
    assert 0 < on.engine.kv.num_cached_pages <= 19
    assert hits_of(on, {"prompt_token_ids": text(75, 8 * PAGE)}, params)[1] == 7 * PAGE  # the latest stays
    assert hits_of(on, {"prompt_token_ids": text(70, 8 * PAGE)}, params)[1] == 0  # the oldest went first


def test_caching_off_counts_nothing(off):
    tokens(off, [{"prompt_token_ids": text(12, 30)}] * 2, PARAMS["greedy"])
    stats = off.engine.stats()
    assert stats["prefix_cache_hits"] == stats["prefix_cache_queries"] == stats["cached_pages"] == 0


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_prompts_sent_together_share_their_common_pages_instead_of_computing_them_side_by_side(on, off, sampling):
    """n siblings (or a burst sharing a system prompt) submitted at once: the first computes the
    shared pages, the others wait a step and take them from the cache; outputs are unchanged."""
    prompts = [{"prompt_token_ids": text(90 + SEED[sampling], 10)}] * 3  # a full page and 2 tokens each
    params = PARAMS[sampling]  # all three fit one prefill step (32 tokens)
    before = on.engine.stats()["prefix_cache_hits"]
    got = tokens(on, prompts, params)
    assert on.engine.stats()["prefix_cache_hits"] - before == 2 * PAGE  # the first page, for the other two
    assert got == tokens(off, prompts, params)
    assert_nothing_held(on)


def test_a_cache_salt_shares_pages_only_with_the_same_salt(on, off):
    """vLLM's ``cache_salt``: a prompt finds the pages (full ones and a tail) of an earlier prompt
    only when both carry the same salt, or both none; the outputs are the uncached ones either way."""
    ids = text(400, 4 * PAGE + 3)
    params = dataclasses.replace(PARAMS["greedy"], max_tokens=1)  # leaves the last page as a tail
    expected = tokens(off, {"prompt_token_ids": ids}, params)[0]
    asked = [(None, 0), ("tenant a", 0), ("tenant a", len(ids) - 1), ("tenant b", 0), (None, len(ids) - 1),
             ("tenant b", len(ids) - 1)]
    for salt, expected_hits in asked:
        prompt = {"prompt_token_ids": ids} | ({"cache_salt": salt} if salt else {})
        got, hits = hits_of(on, prompt, params)
        assert (salt, hits) == (salt, expected_hits)
        assert got == expected
    assert_nothing_held(on)


@pytest.mark.parametrize("salt", ["", 7, ["a"], "lone \ud800 surrogate"])
def test_a_cache_salt_is_a_non_empty_string(on, salt):
    with pytest.raises(ValueError, match="cache_salt"):
        on.generate({"prompt_token_ids": text(401, 5), "cache_salt": salt}, PARAMS["greedy"])


def test_a_cache_salt_keeps_encoded_pictures_apart_too(on, off):
    """The embedding cache finds a picture only for a prompt of the same salt: another tenant's
    picture is encoded again, not served from the cache, and no page of it is shared."""
    image = random_image(410, (96, 128))
    prompt = {"prompt_token_ids": text(411, 9) + IMAGE + text(412, 12), "multi_modal_data": {"image": image}}
    params = PARAMS["greedy"]
    expected = tokens(off, prompt, params)[0]
    for salt, found in (("tenant a", False), ("tenant a", True), ("tenant b", False), (None, False)):
        before = on.engine.stats()["embedding_cache_hits"]
        got, hits = hits_of(on, prompt | ({"cache_salt": salt} if salt else {}), params)
        assert (salt, on.engine.stats()["embedding_cache_hits"] > before, hits > 0) == (salt, found, found)
        assert got == expected
