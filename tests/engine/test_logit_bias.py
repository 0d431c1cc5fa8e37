"""OpenAI's logit_bias: added to a row's logits before sampling, that row's only. Greedy, against
transformers' ``SequenceBiasLogitsProcessor`` (single-token biases are the same addition) in fp32;
a ban holds with sampling too; the other rows of a batch are unchanged; logprobs stay the model's."""

import numpy as np
import torch

from mmserve import SamplingParams

STEPS = 8


def prompt(seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 800, 12)]


def test_greedy_with_a_logit_bias_equals_transformers(llm, reference):
    ids = prompt(1)
    free = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=STEPS,
                                                                  ignore_eos=True))[0].outputs[0].token_ids
    bias = {free[0]: -100.0, free[2]: -7.5, 321: 4.0}  # ban the first answer, tilt two more
    with torch.no_grad():
        t_ids = torch.tensor(ids)[None]
        want = reference[0].generate(t_ids, mm_token_type_ids=torch.zeros_like(t_ids, dtype=torch.int32),
                                     max_new_tokens=STEPS, do_sample=False,
                                     sequence_bias={(t,): b for t, b in bias.items()})[0, len(ids):].tolist()
    got = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True,
                                                                 logit_bias=bias))[0].outputs[0].token_ids
    assert got == want and got != free and free[0] not in got


def test_a_bias_is_its_rows_alone_and_leaves_logprobs_raw(llm):
    plain = [{"prompt_token_ids": prompt(2)}, {"prompt_token_ids": prompt(3)}]
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=1)
    alone = llm.generate(plain, params)
    biased = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=1, logit_bias={"77": 100})
    mixed = llm.generate(plain, [params, biased])
    assert mixed[0].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert mixed[1].outputs[0].token_ids == [77] * STEPS
    # the chosen token's logprob is the model's, not the biased one's (which would be ~0)
    assert all(lp.logprob < -0.5 for lp in mixed[1].outputs[0].logprobs)


def test_a_ban_holds_when_sampling(llm):
    ids = prompt(4)
    sampled = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=1.5, seed=9, max_tokens=24,
                                                                     ignore_eos=True))[0].outputs[0].token_ids
    banned = set(sampled)
    again = llm.generate({"prompt_token_ids": ids}, SamplingParams(
        temperature=1.5, seed=9, max_tokens=24, ignore_eos=True, logit_bias={t: -100 for t in banned}))
    assert not banned & set(again[0].outputs[0].token_ids)
