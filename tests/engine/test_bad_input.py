"""Bad input raises a clear ValueError, changes nothing, and the engine serves the next request."""

import numpy as np
import pytest
from PIL import Image

from hf_reference import IMAGE_ID, VIDEO_ID, VISION_END, VISION_START
from mmserve import SamplingParams

GOOD = {"prompt_token_ids": [11, 12, 13]}


@pytest.mark.parametrize("prompt, params, message", [
    ({"prompt_token_ids": [1, VISION_START, IMAGE_ID, VISION_END], "multi_modal_data": {"image": b"not an image"}},
     {}, "PIL"),
    ({"prompt_token_ids": list(range(600))}, {}, "context"),
    ({"prompt": "word " * 2_000_000}, {}, r"the prompt has at least \d+ tokens; the context holds 512"),
    ({"prompt_token_ids": [1, IMAGE_ID, 2, IMAGE_ID], "multi_modal_data": {"image": []}}, {}, "placeholder"),
    # two images' runs would be one: the model reads one picture of the wrong size (it raised in the step)
    ({"prompt_token_ids": [1, VISION_START, IMAGE_ID, IMAGE_ID, VISION_END],
      "multi_modal_data": {"image": [Image.new("RGB", (32, 32)), Image.new("RGB", (32, 32))]}}, {},
     "placeholders are next to each other"),
    (GOOD, {"max_tokens": -1}, "max_tokens"),
    (GOOD, {"temprature": 0.5}, "unknown sampling field"),
    ({"prompt_token_ids": [1, 5000]}, {}, "vocabulary"),
    ({"prompt_token_ids": [True, False]}, {}, "list of ints"),  # JSON's booleans are ints to Python
    ({"prompt": "hi", "prompt_token_ids": [1]}, {}, "exactly one"),
    # the test checkpoint's tokenizer has 1,011 tokens for a vocabulary of 1,000: this one had no
    # embedding row, and the answer was NaN logits and token 0 for good
    ({"prompt": "hi <|im_start|>"}, {}, r"token 1001 \('<\|im_start\|>'\), outside the model's vocabulary"),
    ({"prompt_token_ids": [1, VISION_START, VIDEO_ID, VISION_END],
      "multi_modal_data": {"video": (np.zeros((4, 32, 32, 3), np.uint8), {"fps": 0})}}, {}, "fps must be a positive"),
    ({"prompt_token_ids": [1, VISION_START, VIDEO_ID, VISION_END],
      "multi_modal_data": {"video": (np.zeros((4, 32, 32, 3), np.uint8), {"fps": 2, "frames_indices": [0, 1]})}},
     {}, r"one index >= 0 per frame \(4\)"),
])
def test_bad_input_raises_and_engine_serves_next(llm, prompt, params, message):
    free = llm.engine.kv.num_free_pages
    with pytest.raises(ValueError, match=message):
        llm.generate([GOOD, prompt], SamplingParams.from_dict({"temperature": 0, "max_tokens": 3} | params))
    assert not llm.engine.has_unfinished()
    assert llm.engine.kv.num_free_pages == free
    out = llm.generate(GOOD, SamplingParams(temperature=0, max_tokens=3))[0]
    assert len(out.outputs[0].token_ids) == 3


def test_a_picture_without_pixels_is_a_value_error(llm):
    free = llm.engine.kv.num_free_pages
    empty = {"prompt_token_ids": [1, VISION_START, IMAGE_ID, VISION_END], "multi_modal_data": {"image": Image.new("RGB", (0, 0))}}
    with pytest.raises(ValueError, match="at least one pixel each way, got 0x0"):
        llm.generate([GOOD, empty], SamplingParams(temperature=0, max_tokens=3))
    assert not llm.engine.has_unfinished() and llm.engine.kv.num_free_pages == free


def test_a_generate_stopped_midway_leaves_nothing_behind_for_the_next(llm, monkeypatch):
    """Ctrl-C (or a failed step) in the middle of generate(): its requests leave the engine, and the
    next generate() answers with its own requests only (it used to raise KeyError on another's)."""
    params = SamplingParams(temperature=0, max_tokens=6)
    expected = llm.generate(GOOD, params)[0].outputs[0].token_ids
    free = llm.engine.kv.num_free_pages
    step, calls = llm.engine.step, []

    def interrupted_step():
        calls.append(None)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(llm.engine, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([GOOD, {"prompt_token_ids": [21, 22, 23, 24]}], params)
    monkeypatch.undo()
    assert not llm.engine.has_unfinished() and llm.engine.kv.num_free_pages == free
    again = llm.generate(GOOD, params)
    assert len(again) == 1 and again[0].outputs[0].token_ids == expected


@pytest.mark.parametrize("conversation, message", [
    ([{"role": "developer", "content": "hi"}], "the chat template rejected the messages"),
    ([{"content": "hi"}], "string 'role'"),
    (["hi"], "string 'role'"),
    ([{"role": "user", "content": ["hi"]}], "string 'type'"),
    ([{"role": "user", "content": 5}], "a string or a list of parts"),
    ([], "non-empty list"),
])
def test_a_malformed_chat_is_a_value_error(llm, conversation, message):
    with pytest.raises(ValueError, match=message):
        llm.chat(conversation)
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("options, message", [
    ({"continue_final_message": True}, "cannot both be true"),
    ({"continue_final_message": True, "add_generation_prompt": False}, "no text to continue"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs cannot set tools"),
    ({"chat_template_kwargs": {"eos_token": "x"}}, "chat_template_kwargs cannot set eos_token"),
], ids=["both", "nothing_to_continue", "tools_twice", "special_token"])
def test_chat_options_that_cannot_apply_are_a_value_error(llm, options, message):
    with pytest.raises(ValueError, match=message):
        llm.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": []}], **options)
    assert not llm.engine.has_unfinished()


def test_an_unsupported_dtype_is_a_value_error_before_anything_loads():
    from mmserve import LLM

    for dtype in ("int8", "float16", "float64"):
        with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16 or auto"):
            LLM("tiny", dtype=dtype)


def test_prompts_given_as_a_tuple_are_several_prompts(llm):
    """As vLLM takes any sequence of prompts; a tuple was refused as one malformed prompt."""
    params = SamplingParams(temperature=0, max_tokens=3)
    prompts = (GOOD, {"prompt_token_ids": [21, 22, 23, 24]})
    assert ([o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            == [o.outputs[0].token_ids for o in llm.generate(list(prompts), params)])


def test_each_output_names_its_prompt_text_as_vllm_s_does(llm):
    """vLLM's offline example prints ``output.prompt``: it raised AttributeError here."""
    params = SamplingParams(temperature=0, max_tokens=2)
    outputs = llm.generate(["Hello there", {"prompt": "Good day"}, GOOD], params)
    assert [o.prompt for o in outputs] == ["Hello there", "Good day", None]
