"""Bad input raises a clear ValueError, changes nothing, and the engine serves the next request."""

import pytest

from hf_reference import IMAGE_ID, VISION_END, VISION_START
from mmserve import SamplingParams

GOOD = {"prompt_token_ids": [11, 12, 13]}


@pytest.mark.parametrize("prompt, params, message", [
    ({"prompt_token_ids": [1, VISION_START, IMAGE_ID, VISION_END], "multi_modal_data": {"image": b"not an image"}},
     {}, "PIL"),
    ({"prompt_token_ids": list(range(600))}, {}, "context"),
    ({"prompt": "word " * 2_000_000}, {}, r"the prompt has at least \d+ tokens; the context holds 512"),
    ({"prompt_token_ids": [1, IMAGE_ID, 2, IMAGE_ID], "multi_modal_data": {"image": []}}, {}, "placeholder"),
    (GOOD, {"max_tokens": -1}, "max_tokens"),
    (GOOD, {"temprature": 0.5}, "unknown sampling field"),
    ({"prompt_token_ids": [1, 5000]}, {}, "vocabulary"),
    ({"prompt_token_ids": [True, False]}, {}, "list of ints"),  # JSON's booleans are ints to Python
    ({"prompt": "hi", "prompt_token_ids": [1]}, {}, "exactly one"),
    # the test checkpoint's tokenizer has 1,011 tokens for a vocabulary of 1,000: this one had no
    # embedding row, and the answer was NaN logits and token 0 for good
    ({"prompt": "hi <|im_start|>"}, {}, r"token 1001 \('<\|im_start\|>'\), outside the model's vocabulary"),
])
def test_bad_input_raises_and_engine_serves_next(llm, prompt, params, message):
    free = llm.engine.kv.num_free_pages
    with pytest.raises(ValueError, match=message):
        llm.generate([GOOD, prompt], SamplingParams.from_dict({"temperature": 0, "max_tokens": 3} | params))
    assert not llm.engine.has_unfinished()
    assert llm.engine.kv.num_free_pages == free
    out = llm.generate(GOOD, SamplingParams(temperature=0, max_tokens=3))[0]
    assert len(out.outputs[0].token_ids) == 3
