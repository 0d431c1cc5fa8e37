"""A prompt whose visual rows arrive in pieces (the prefill role, fed chunk by chunk by a resumed
embedding room) is prefilled up to its first visual token without a row while the rest is on the
way, and ends with the colocated engine's output, token for token. Rows arrive in the room's
order, every image's then every video's; here the video comes first in the prompt, so image rows
alone let nothing past it. A request waiting for rows leaves the engine nothing to run, and an
abort while it waits frees everything."""

import dataclasses

import numpy as np
import pytest

from conftest import random_image
from hf_reference import IMAGE_ID, VIDEO_ID, VISION_END, VISION_START
from mmserve import SamplingParams
from mmserve.engine.engine import LLMEngine

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def text(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 800, n)]


@pytest.fixture(scope="module")
def engine(llm):
    """Prefill steps of 16 tokens, so the prompt takes several steps between arrivals."""
    config = dataclasses.replace(llm.engine.config, max_prefill_tokens=16, precompile=False)
    return LLMEngine(llm.model, config)


def make_prompt(seed: int) -> dict:
    """Text, a video, text, an image, text; another seed shares no page with it (prefix caching)."""
    frames = [random_image(seed + i, (64, 64)) for i in range(4)]
    ids = (text(seed, 9) + [VISION_START, VIDEO_ID, VISION_END] + text(seed + 1, 3)
           + [VISION_START, IMAGE_ID, VISION_END] + text(seed + 2, 4))
    return {"prompt_token_ids": ids, "multi_modal_data": {"video": frames, "image": random_image(seed, (96, 128))}}


def first_rows(runs, n: int) -> list:
    """The first ``n`` rows of a kind's runs laid end to end, as runs."""
    out = []
    for run in runs:
        take = min(run.count, n)
        out.append(run.take(0, take))
        n -= take
    return out


def arrived(features, n: int) -> dict:
    """What ``n`` rows of a room bring: the images' rows first, then the videos'."""
    images = sum(r.count for r in features["image"])
    return {"image": first_rows(features["image"], min(n, images)),
            "video": first_rows(features["video"], max(n - images, 0))}


def request(engine, request_id):
    return next(r for r in engine.scheduler.running + list(engine.scheduler.waiting) if r.request_id == request_id)


def run_while_runnable(engine) -> list:
    outputs = []
    while engine.has_runnable():
        outputs += engine.step()
    return outputs


def assert_nothing_held(engine):
    assert not engine.has_unfinished()
    kv = engine.kv
    assert kv.num_free_pages == engine.runner.num_pages - 1
    assert kv.num_evictable_pages == kv.num_cached_pages + kv.num_tail_pages


def test_a_prompt_is_prefilled_as_its_rows_arrive_and_ends_as_colocated(llm, engine):
    prompt = make_prompt(40)
    prepared = engine.prepare(prompt)
    ids = np.asarray(prepared.token_ids)
    video, image = np.flatnonzero(ids == VIDEO_ID), np.flatnonzero(ids == IMAGE_ID)
    assert video[-1] < image[0] and video.size > 4 and image.size > 5 and video[0] > 16
    features = engine.encode_prompts([prepared])[0]

    engine.add_request(prepared, PARAMS, "arriving", features=arrived(features, 5), rows_arriving=True)
    assert run_while_runnable(engine) == []
    assert request(engine, "arriving").num_computed == video[0]  # image rows let nothing past the video
    engine.rows_arrived("arriving", arrived(features, image.size + 3), complete=False)
    assert engine.has_runnable()
    assert run_while_runnable(engine) == []
    assert request(engine, "arriving").num_computed == video[3]
    assert engine.has_unfinished() and not engine.has_runnable()

    engine.rows_arrived("arriving", features, complete=True)
    outputs = run_while_runnable(engine)
    got = next(o for o in outputs if o.finished).outputs[0].token_ids
    assert got == llm.generate(prompt, PARAMS)[0].outputs[0].token_ids
    assert_nothing_held(engine)


def test_an_abort_while_rows_are_on_the_way_frees_everything(engine):
    prompt = make_prompt(50)
    prepared = engine.prepare(prompt)
    features = engine.encode_prompts([prepared])[0]
    engine.add_request(prepared, PARAMS, "aborted", features=arrived(features, 3), rows_arriving=True)
    run_while_runnable(engine)
    assert request(engine, "aborted").num_computed > 0
    engine.abort("aborted")
    assert_nothing_held(engine)


def test_rows_that_do_not_fit_the_prompt_are_refused(engine):
    prompt = make_prompt(60)
    prepared = engine.prepare(prompt)
    features = engine.encode_prompts([prepared])[0]
    with pytest.raises(ValueError, match="placeholder"):
        engine.add_request(prepared, PARAMS, "short", features=arrived(features, 3), rows_arriving=False)
    engine.add_request(prepared, PARAMS, "incomplete", features=arrived(features, 3), rows_arriving=True)
    with pytest.raises(ValueError, match="placeholder"):
        engine.rows_arrived("incomplete", arrived(features, 4), complete=True)
    engine.abort("incomplete")
    assert_nothing_held(engine)
