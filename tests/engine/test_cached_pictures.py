"""A prompt whose pictures all lie in pages the engine holds cached (a later turn about the same
picture) is added without their embeddings, as the prefill role does to skip encode: its output is
an engine's without any cache, token for token; its cached pages stay pinned while it runs (a
preempted request finds them again), and nothing stays held after it ends, finished or aborted.
A prompt whose pictures are not all cached is refused, and nothing is held."""

import numpy as np
import pytest

from conftest import random_image
from hf_reference import IMAGE_ID, VISION_END, VISION_START
from mmserve import LLM, SamplingParams
from mmserve.engine.inputs import PreparedPrompt

PAGE = 8
IMAGE = [VISION_START, IMAGE_ID, VISION_END]
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def text(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 800, n)]


@pytest.fixture(scope="module")
def on(reference):
    return LLM(reference[1], num_pages=64, page_size=PAGE, max_model_len=512, max_prefill_tokens=64,
               precompile=False)


@pytest.fixture(scope="module")
def off(reference):
    return LLM(reference[1], num_pages=256, page_size=PAGE, max_model_len=512, max_prefill_tokens=64,
               enable_prefix_caching=False, precompile=False)


def without_pixels(llm, prompt) -> PreparedPrompt:
    """The prompt as prefill holds it: grids and content keys, no pixels."""
    prepared = llm.engine.prepare(prompt)
    return PreparedPrompt(prepared.token_ids, [_bare(v) for v in prepared.images], [_bare(v) for v in prepared.videos])


def _bare(visual):
    import dataclasses

    return dataclasses.replace(visual, pixel_values=None, source=None)


def run(llm, request_id: str) -> list[int]:
    engine = llm.engine
    while True:
        for output in engine.step():
            if output.request_id == request_id and output.finished:
                return output.outputs[0].token_ids


def assert_nothing_held(llm):
    kv = llm.engine.kv
    assert not llm.engine.has_unfinished()
    assert kv.num_free_pages == llm.engine.runner.num_pages - 1
    assert kv.num_evictable_pages == kv.num_cached_pages + kv.num_tail_pages


def conversation(seed: int):
    image = random_image(seed, (96, 128))  # 12 image tokens
    turn1 = {"prompt_token_ids": text(seed, 13) + IMAGE + text(seed + 1, 20), "multi_modal_data": {"image": image}}
    return image, turn1


def test_a_second_turn_runs_without_its_pictures_embeddings(on, off):
    image, turn1 = conversation(90)
    assert not on.engine.add_request_on_cached_pictures(without_pixels(on, turn1), PARAMS, "before")
    assert_nothing_held(on)
    answer = on.generate(turn1, PARAMS)[0].outputs[0].token_ids
    turn2 = {"prompt_token_ids": turn1["prompt_token_ids"] + answer + text(92, 9), "multi_modal_data": {"image": image}}
    assert on.engine.add_request_on_cached_pictures(without_pixels(on, turn2), PARAMS, "turn2")
    kv = on.engine.kv
    assert kv.num_evictable_pages - kv.num_tail_pages < kv.num_cached_pages  # pinned
    assert run(on, "turn2") == off.generate(turn2, PARAMS)[0].outputs[0].token_ids
    assert_nothing_held(on)


def test_another_picture_after_the_same_text_is_refused(on):
    image, turn1 = conversation(100)
    on.generate(turn1, PARAMS)
    other = dict(turn1, multi_modal_data={"image": random_image(101, (96, 128))})
    assert not on.engine.add_request_on_cached_pictures(without_pixels(on, other), PARAMS, "other")
    assert_nothing_held(on)


def test_an_abort_unpins_and_a_preempted_request_finds_its_pinned_pages(on, off):
    image, turn1 = conversation(110)
    answer = on.generate(turn1, PARAMS)[0].outputs[0].token_ids
    turn2 = {"prompt_token_ids": turn1["prompt_token_ids"] + answer + text(112, 9), "multi_modal_data": {"image": image}}
    assert on.engine.add_request_on_cached_pictures(without_pixels(on, turn2), PARAMS, "aborted")
    on.engine.abort("aborted")
    assert_nothing_held(on)



@pytest.mark.timeout(180)
def test_a_preempted_request_finds_its_pinned_pages_again(reference, off):
    """23 pages: an older request growing to 15 pages preempts turn 2 (the newest, 6 of its pages
    pinned); while turn 2 waits, the older one takes every page that is free or evictable, and
    only the pin keeps turn 2's picture pages (a recompute from token 0 would have no embeddings
    to read). Pins shrink the pool: a request needing more than the unpinned pages could never
    run, so they last only as long as their requests."""
    tight = LLM(reference[1], num_pages=24, page_size=PAGE, max_model_len=512, max_prefill_tokens=64,
                precompile=False)
    image, turn1 = conversation(130)
    answer = tight.generate(turn1, PARAMS)[0].outputs[0].token_ids
    turn2 = {"prompt_token_ids": turn1["prompt_token_ids"] + answer + text(132, 9), "multi_modal_data": {"image": image}}
    older = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    tight.engine.add_request({"prompt_token_ids": text(133, 40)}, older, "older")
    tight.engine.step()
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    assert tight.engine.add_request_on_cached_pictures(without_pixels(tight, turn2), params, "turn2")
    got = None
    while tight.engine.has_unfinished():
        for output in tight.engine.step():
            if output.request_id == "turn2" and output.finished:
                got = output.outputs[0].token_ids
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == off.generate(turn2, params)[0].outputs[0].token_ids
    assert_nothing_held(tight)


@pytest.mark.timeout(180)
def test_two_later_turns_whose_pins_would_starve_each_other_are_not_both_pinned(reference, off):
    """26 pages; each later turn needs 16 and pins 11 of a picture of its own. Both pinned, each
    waited for pages the other's pins held, for good, and so did every request behind them
    (pinned requests go first). The second is refused pins (its pictures would come from encode);
    both engines' answers agree, and a text request behind them runs."""
    tight = LLM(reference[1], num_pages=27, page_size=PAGE, max_model_len=256, max_prefill_tokens=64,
                precompile=False)
    turns = []
    for seed in (90, 95):
        image, turn1 = conversation(seed)
        answer = tight.generate(turn1, PARAMS)[0].outputs[0].token_ids
        turns.append({"prompt_token_ids": turn1["prompt_token_ids"] + answer + text(seed + 2, 9),
                      "multi_modal_data": {"image": image}})
    engine = tight.engine
    assert engine.add_request_on_cached_pictures(without_pixels(tight, turns[0]), PARAMS, "turn2-a")
    assert not engine.add_request_on_cached_pictures(without_pixels(tight, turns[1]), PARAMS, "turn2-b")
    engine.add_request(turns[1], PARAMS, "turn2-b")  # with its picture, as encode would send it
    engine.add_request({"prompt_token_ids": [5, 6, 7]}, PARAMS, "text")
    got, steps = {}, 0
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                got[output.request_id] = output.outputs[0].token_ids
        steps += 1
        assert steps < 200, "the engine stopped scheduling"
    assert got["turn2-a"] == off.generate(turns[0], PARAMS)[0].outputs[0].token_ids
    assert got["turn2-b"] == off.generate(turns[1], PARAMS)[0].outputs[0].token_ids
    assert len(got["text"]) == PARAMS.max_tokens
    assert_nothing_held(tight)
