"""``SamplingParams(n=...)`` offline, as vLLM's ``LLM.generate`` answers it: one output per prompt
with n completions, the i-th sampled as the prompt alone with seed + i would be."""

import pytest

from mmserve import SamplingParams

PROMPTS = [{"prompt_token_ids": [11, 12, 13]}, {"prompt_token_ids": [21, 22, 23, 24]}]


def test_n_sequences_of_a_prompt_are_one_output_each_seeded_as_its_sibling(llm):
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=5, n=3)
    outputs = llm.generate(PROMPTS, params)
    assert len(outputs) == 2
    for prompt, output in zip(PROMPTS, outputs):
        assert output.prompt_token_ids == prompt["prompt_token_ids"] and output.finished
        assert [c.index for c in output.outputs] == [0, 1, 2]
        alone = [llm.generate(prompt, SamplingParams(temperature=1.0, max_tokens=6, seed=5 + i))[0].outputs[0].token_ids
                 for i in range(3)]
        assert [c.token_ids for c in output.outputs] == alone
        assert len({tuple(ids) for ids in alone}) == 3  # seeds 5, 6, 7 draw different sequences
    assert not llm.engine.has_unfinished()


def test_an_engine_request_is_one_sequence(llm):
    free = llm.engine.kv.num_free_pages
    with pytest.raises(ValueError, match="one sequence, got n=2"):
        llm.engine.add_request(PROMPTS[0], SamplingParams(n=2))
    assert not llm.engine.has_unfinished() and llm.engine.kv.num_free_pages == free
    with pytest.raises(ValueError, match=r"n must be in \[1, 16\]"):
        SamplingParams(n=0)
