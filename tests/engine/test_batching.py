"""Continuous batching gives every request the output it gets alone; seeds; preemption; page widths."""

import types

import numpy as np

from conftest import random_image
from hf_reference import IMAGE_ID, VISION_END, VISION_START
from mmserve import LLM, SamplingParams

IMAGE = [VISION_START, IMAGE_ID, VISION_END]


def mixed_prompts(count: int, seed: int, content_seed: int | None = None):
    """Text-only, one-image and two-image prompts of varied lengths; images repeat sizes. The
    lengths come from ``seed``, the token ids and pixels from ``content_seed`` (default ``seed``)."""
    lengths = np.random.default_rng(seed).integers(3, 40, count)
    content = seed if content_seed is None else content_seed
    rng = np.random.default_rng(content)
    prompts = []
    for i in range(count):
        text = [int(t) for t in rng.integers(0, 800, int(lengths[i]))]
        kind = i % 3
        if kind == 0:
            prompts.append({"prompt_token_ids": text})
        elif kind == 1:
            prompts.append({"prompt_token_ids": text + IMAGE, "multi_modal_data": {"image": random_image(content * 100 + i)}})
        else:
            prompts.append({"prompt_token_ids": IMAGE + text + IMAGE, "multi_modal_data": {
                "image": [random_image(content * 100 + i), random_image(content * 100 + i + 1, (40, 90))]}})
    return prompts


def greedy(max_tokens):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def test_batch_of_twelve_equals_one_at_a_time(llm):
    prompts = mixed_prompts(12, seed=1)
    params = [greedy(4 + i % 5) for i in range(12)]
    batched = llm.generate(prompts, params)
    alone = [llm.generate(p, sp)[0] for p, sp in zip(prompts, params)]
    for b, a in zip(batched, alone):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
    assert [len(b.outputs[0].token_ids) for b in batched] == [4 + i % 5 for i in range(12)]
    assert llm.engine.kv.num_free_pages == llm.engine.runner.num_pages - 1


def test_same_seed_same_output_whatever_the_batch(llm):
    prompt = {"prompt_token_ids": [5, 6, 7, 8, 9]}
    params = SamplingParams(temperature=1.0, seed=42, max_tokens=12, ignore_eos=True)
    alone = llm.generate(prompt, params)[0].outputs[0].token_ids
    crowd = mixed_prompts(5, seed=2)
    together = llm.generate(crowd + [prompt], [greedy(6)] * 5 + [params])[-1].outputs[0].token_ids
    other_seed = llm.generate(prompt, SamplingParams(temperature=1.0, seed=43, max_tokens=12,
                                                     ignore_eos=True))[0].outputs[0].token_ids
    assert alone == together
    assert alone != other_seed


def test_preemption_under_a_tiny_page_budget_keeps_outputs(llm, reference):
    prompts = mixed_prompts(6, seed=3)
    params = greedy(24)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    small = LLM(reference[1], num_pages=40, page_size=8, max_model_len=256, max_prefill_tokens=64,
                precompile=False)  # the grid is not what this tests: it compiles what the prompts use
    got = small.generate(prompts, params)
    assert small.engine.stats()["preemptions"] > 0
    assert [o.outputs[0].token_ids for o in got] == want
    assert small.engine.kv.num_free_pages == small.engine.runner.num_pages - 1


def test_sequences_longer_than_the_whole_cache_stop_there_and_nothing_waits_for_good(llm, reference):
    """A cache of 5 usable pages of 8 tokens (40) under max_model_len 512: sequences asked for
    more stop with ``length`` at 40 tokens, and requests preempted for them run afterwards (a
    sequence that outgrew the cache was preempted by itself and then never fitted again: the
    engine stepped nothing, forever, with requests waiting)."""
    prompts = [{"prompt_token_ids": [int(t) for t in np.random.default_rng(n).integers(3, 800, n)]}
               for n in (10, 12, 14)]
    small = LLM(reference[1], num_pages=6, page_size=8, max_model_len=512, max_prefill_tokens=64,
                precompile=False)
    got = small.generate(prompts, greedy(100))
    assert [len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in got] == [40] * 3
    assert [o.outputs[0].finish_reason for o in got] == ["length"] * 3
    want = llm.generate(prompts, [greedy(40 - len(p["prompt_token_ids"])) for p in prompts])
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]  # room to spare there
    assert small.engine.stats()["preemptions"] > 0
    assert small.engine.kv.num_free_pages == small.engine.runner.num_pages - 1


def test_decode_reads_only_the_pages_its_longest_sequence_needs(llm):
    """A short batch's decode program is narrower than max_model_len's page table."""
    from mmserve.engine.program_grid import MIN_PAGE_BUCKET

    seen = []
    runner = llm.engine.runner
    original = runner.run_decode

    def run_decode(self, **inputs):  # a method of the runner, as the lockstep calls only those
        seen.append(inputs["page_tables"].shape[1])
        return original(**inputs)

    runner.run_decode = types.MethodType(run_decode, runner)
    try:
        llm.generate([{"prompt_token_ids": list(range(3, 13))}], greedy(4))
    finally:
        del llm.engine.runner.run_decode
    assert set(seen) == {MIN_PAGE_BUCKET} and MIN_PAGE_BUCKET < llm.engine.config.max_pages_per_seq



def _hf_greedy(model, ids: list[int], steps: int, repetition_penalty: float = 1.0) -> list[int]:
    import torch

    t_ids = torch.tensor(ids)[None]
    with torch.no_grad():
        out = model.generate(t_ids, mm_token_type_ids=torch.zeros_like(t_ids, dtype=torch.int32), max_new_tokens=steps,
                             do_sample=False, repetition_penalty=repetition_penalty)
    return out[0, len(ids):].tolist()


def test_a_penalty_slot_left_by_another_request_changes_nothing(llm, reference):
    """A request without penalties does not load its penalty slot (a program run saved per
    request), so slots keep what earlier requests left. One request at a time, each takes the
    slot the last one freed (the free slots are a stack): a penalized request after them still
    equals transformers' repetition penalty, and a plain one equals transformers' greedy."""
    y, z = [40, 41, 42, 43], [60, 61, 5, 62]
    x = [5, 6, 7, 8, 9] + _hf_greedy(reference[0], [5, 6, 7, 8, 9], 6)  # the tokens it would pick next
    penalized = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=1.8)

    def ours(ids, params):
        return llm.generate({"prompt_token_ids": ids}, params)[0].outputs[0].token_ids

    ours(y, penalized)  # the slot: y's prompt and output
    assert ours(z, greedy(10)) == _hf_greedy(reference[0], z, 10)  # on y's slot, not loaded
    want = _hf_greedy(reference[0], x, 10, repetition_penalty=1.8)
    assert want != _hf_greedy(reference[0], x, 10)  # the penalty acts on this prompt
    assert ours(x, penalized) == want  # its own slot, loaded
    assert ours(z, greedy(10)) == _hf_greedy(reference[0], z, 10)
