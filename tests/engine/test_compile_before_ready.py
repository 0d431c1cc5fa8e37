"""An engine compiles its whole program grid when it is built; afterwards no mix of prompt
lengths, image sizes, batch sizes or sampling settings within its limits compiles anything.

Compilations are counted with jax's own monitoring events (a backend compile, or a program
fetched from the persistent compilation cache), not with the engine's counter."""

import contextlib

import jax
import numpy as np

from conftest import random_image
from hf_reference import IMAGE_ID, VIDEO_ID, VISION_END, VISION_START
from mmserve import LLM, SamplingParams

IMAGE = [VISION_START, IMAGE_ID, VISION_END]
COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/compile_requests_use_cache")


@contextlib.contextmanager
def compilations():
    seen: list[str] = []

    def on_duration(event, duration, **kwargs):
        if event in COMPILE_EVENTS:
            seen.append(event)

    def on_event(event, **kwargs):
        if event in COMPILE_EVENTS:
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_event_listener(on_event)


def workload(rng):
    """Every kind of step the limits allow: prompts from 1 token to chunked ones near max_model_len,
    images of several sizes and a video, batches from 1 to beyond max_num_seqs, greedy and sampled
    rows, logprobs, penalties, seeds, and outputs long enough to reach the widest page table."""
    text = lambda n: [int(t) for t in rng.integers(0, 800, n)]
    sizes = [(32, 32), (48, 64), (96, 64), (300, 300)]  # 64 to 81 image tokens, 256 to 324 patches
    prompts = [{"prompt_token_ids": text(n)} for n in (1, 7, 20, 33, 70, 200)]
    prompts += [{"prompt_token_ids": text(5) + IMAGE + text(n), "multi_modal_data": {"image": random_image(i, size)}}
                for i, (size, n) in enumerate(zip(sizes, (3, 30, 12, 50)))]
    prompts.append({"prompt_token_ids": IMAGE + text(4) + IMAGE, "multi_modal_data": {
        "image": [random_image(7, (32, 48)), random_image(8, (64, 64))]}})
    prompts.append({"prompt_token_ids": text(3) + [VISION_START, VIDEO_ID, VISION_END],
                    "multi_modal_data": {"video": [random_image(20 + i, (32, 48)) for i in range(4)]}})
    params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=3, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=1.0, max_tokens=3, logprobs=3, repetition_penalty=1.2, ignore_eos=True),
              SamplingParams(temperature=0.7, max_tokens=3, logit_bias={5: 3.0, 17: -100}, ignore_eos=True)]
    return prompts, params


def test_nothing_compiles_after_the_engine_is_built(reference):
    llm = LLM(reference[1], num_pages=128, page_size=8, max_model_len=256, max_num_seqs=4, max_prefill_tokens=32,
              max_prefill_seqs=4)
    rng = np.random.default_rng(0)
    prompts, params = workload(rng)
    with compilations() as seen:
        for batch in (1, 2, 3, 4, 7, len(prompts)):
            chosen = [prompts[i] for i in rng.choice(len(prompts), batch, replace=False)]
            llm.generate(chosen, [params[i % len(params)] for i in range(batch)])
        llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=250, ignore_eos=True))  # every width
    assert seen == []


def test_a_prefill_only_engine_computes_every_prompt_token_in_prefill_programs(reference):
    """The prefill role's engine has no decode program: a prompt one token longer than whole
    prefill budgets, whose last token is left alone after its chunks, and a prompt asked again
    (all but its last token cached) still run in the prefill programs it compiled."""
    from mmserve.engine.config import EngineConfig
    from mmserve.engine.engine import LLMEngine
    from mmserve.roles.prefill import PREFILL_PROGRAMS

    model = LLM(reference[1], precompile=False).model
    # the shapes of the engine above: its prefill programs load from the run's compilation cache
    engine = LLMEngine(model, EngineConfig(num_pages=128, page_size=8, max_model_len=256, max_num_seqs=4,
                                           max_prefill_tokens=32, max_prefill_seqs=4), programs=PREFILL_PROGRAMS)
    rng = np.random.default_rng(1)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    prompts = [[int(t) for t in rng.integers(0, 800, n)] for n in (33, 65)]
    with compilations() as seen:
        for i, ids in enumerate(prompts + prompts):  # the second time, all but the last token are cached
            engine.add_request({"prompt_token_ids": ids}, params, f"r{i}")
            while engine.has_unfinished():
                engine.step()
    assert seen == []
    assert engine.stats()["prefix_cache_hits"] == 32 + 64
