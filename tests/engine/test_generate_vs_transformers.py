"""Greedy LLM.generate equals transformers' greedy generate, tokens and logprobs."""

import numpy as np
import pytest
import torch

from conftest import random_image
from hf_reference import IMAGE_ID, VIDEO_ID, VISION_END, VISION_START
from mmserve import SamplingParams

STEPS = 8


def _hf_generate(model, ids, processed):
    t_ids = torch.tensor(ids)[None]
    kwargs = {}
    if "pixel_values" in processed:
        kwargs |= dict(pixel_values=torch.tensor(processed["pixel_values"]),
                       image_grid_thw=torch.tensor(processed["image_grid_thw"]))
    if "pixel_values_videos" in processed:
        kwargs |= dict(pixel_values_videos=torch.tensor(processed["pixel_values_videos"]),
                       video_grid_thw=torch.tensor(processed["video_grid_thw"]))
    mm = torch.zeros_like(t_ids, dtype=torch.int32)
    mm[t_ids == IMAGE_ID], mm[t_ids == VIDEO_ID] = 1, 2
    with torch.no_grad():
        out = model.generate(t_ids, mm_token_type_ids=mm, max_new_tokens=STEPS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, **kwargs)
    tokens = out.sequences[0, len(ids):].tolist()
    logprobs = [torch.log_softmax(step[0].double(), -1).numpy() for step in out.logits]
    return tokens, logprobs


def _case(name, llm):
    rng = np.random.default_rng(len(name))
    text = list(rng.integers(0, 800, 9))
    image = [VISION_START, IMAGE_ID, VISION_END]
    if name == "text":
        return {"prompt_token_ids": text}
    if name == "image":
        return {"prompt_token_ids": text + image + text[:4], "multi_modal_data": {"image": random_image(1)}}
    if name == "two_images":
        return {"prompt_token_ids": text + image + text[:3] + image,
                "multi_modal_data": {"image": [random_image(2), random_image(3, (80, 40))]}}
    frames = [random_image(10 + i, (64, 64)) for i in range(4)]
    return {"prompt_token_ids": text + [VISION_START, VIDEO_ID, VISION_END] + text[:2],
            "multi_modal_data": {"video": frames}}


@pytest.mark.parametrize("name", ["text", "image", "two_images", "video"])
def test_greedy_generate_equals_transformers(name, llm, reference):
    prompt = _case(name, llm)
    media = prompt.get("multi_modal_data", {})
    processed = llm.model.processor(
        images=(media["image"] if isinstance(media.get("image"), list) else [media["image"]]) if "image" in media
        else None,
        videos=[media["video"]] if "video" in media else None)
    expanded = llm.engine.prepare(prompt).token_ids
    want_tokens, want_logprobs = _hf_generate(reference[0], expanded, processed)

    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=STEPS, logprobs=5))[0].outputs[0]
    assert out.token_ids == want_tokens
    assert abs(out.cumulative_logprob - sum(want[t] for want, t in zip(want_logprobs, want_tokens))) < 1e-3
    for step, (got, want) in enumerate(zip(out.logprobs, want_logprobs)):
        assert abs(got.logprob - want[got.token_id]) < 1e-4, f"step {step}"
        top5 = np.argsort(-want)[:5]
        assert sorted(got.top) == sorted(top5.tolist()), f"step {step}"
        for token, logprob in got.top.items():
            assert abs(logprob - want[token]) < 1e-4, f"step {step} token {token}"


def test_min_tokens_equals_transformers_min_new_tokens(llm, reference):
    """vLLM's ``min_tokens`` against transformers' ``min_new_tokens``: the greedy answer's first
    token made its stop token, so without the minimum the answer would end at once; with 3 the
    token cannot be drawn for three steps (nor would a stop string end it), then stops it."""
    ids = [int(t) for t in np.random.default_rng(7).integers(0, 800, 12)]
    free = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=STEPS))[0].outputs[0]
    stop = free.token_ids[0]
    t_ids = torch.tensor(ids)[None]
    with torch.no_grad():
        hf = reference[0].generate(t_ids, mm_token_type_ids=torch.zeros_like(t_ids, dtype=torch.int32),
                                   max_new_tokens=STEPS, do_sample=False, min_new_tokens=3, eos_token_id=[stop],
                                   pad_token_id=stop)
    want = hf[0, len(ids):].tolist()
    want = want[:want.index(stop, 3) + 1] if stop in want[3:] else want
    params = SamplingParams(temperature=0, max_tokens=STEPS, min_tokens=3, stop_token_ids=[stop])
    out = llm.generate({"prompt_token_ids": ids}, params)[0].outputs[0]
    assert out.token_ids == want and stop not in out.token_ids[:3]
    assert llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=STEPS,
                                                                  stop_token_ids=[stop]))[0].outputs[0].token_ids == [stop]
