"""An engine whose context is shorter than its prefill budget (``--max-model-len 100`` beside the
default 512 prefill tokens) prefills a prompt near its context and answers as transformers does
(it failed to pick the prompt's page width; its grid is checked in test_program_grid.py). A request
with ``max_tokens=None`` (vLLM's "as many as the context leaves") generates up to the context."""

import numpy as np
import torch

from mmserve import LLM, SamplingParams

STEPS = 8


def test_a_context_shorter_than_the_prefill_budget_answers_as_transformers(reference):
    model, checkpoint = reference
    llm = LLM(checkpoint, max_model_len=100, page_size=8, num_pages=64, max_num_seqs=2, max_prefill_seqs=2,
              precompile=False)  # the grid itself: test_program_grid.py
    assert llm.engine.config.max_prefill_tokens > llm.engine.config.max_model_len
    ids = [int(t) for t in np.random.default_rng(5).integers(0, 800, 100 - STEPS - 1)]
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True))
    with torch.no_grad():
        want = model.generate(torch.tensor(ids)[None], max_new_tokens=STEPS, do_sample=False)[0, len(ids):].tolist()
    assert out[0].outputs[0].token_ids == want
    unbounded = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    out = unbounded[0].outputs[0]
    assert len(ids) + len(out.token_ids) == 100 and out.finish_reason == "length"
    assert out.token_ids[:STEPS] == want
