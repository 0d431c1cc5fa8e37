"""The on-device sampler: greedy, truncation, seeds, penalties and logprobs.

Every call uses one batch bucket and vocabulary, so `sample` compiles once for the module.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmserve.sampler import (all_allowed_bitmask, apply_penalties, init_penalty_state, load_slot, pack_sampling_batch,
                             padded_token_ids, sample)
from mmserve.sampling_params import MAX_LOGPROBS, SamplingParams

BATCH = 64
VOCAB = 32

# A distribution with clear gaps, so truncation thresholds are far from float rounding.
PROBS = np.array([0.5, 0.3, 0.1, 0.04] + [0.06 / (VOCAB - 4)] * (VOCAB - 4))
LOGITS = np.log(PROBS).astype(np.float32)


def run(logits, params, steps=None, slots=None, penalties=None, rng_seed=0):
    """Samples one step for `params` (rows beyond them are padding); returns numpy outputs."""
    steps = [0] * len(params) if steps is None else steps
    slots = list(range(len(params))) if slots is None else slots
    penalties = init_penalty_state(BATCH, VOCAB) if penalties is None else penalties
    logits = np.broadcast_to(np.asarray(logits, np.float32), (BATCH, VOCAB))
    batch = pack_sampling_batch(params, steps, slots, BATCH)
    output, penalties = sample(jnp.asarray(logits), batch, penalties, jax.random.PRNGKey(rng_seed))
    return jax.tree.map(np.asarray, output), penalties


def tokens_over_steps(logits, params, num_steps, rng_seed=0):
    """[num_steps, len(params)] tokens, each step drawn with the request's step number."""
    return np.stack([run(logits, params, steps=[step] * len(params), rng_seed=rng_seed)[0].token_ids
                     [:len(params)] for step in range(num_steps)])


@pytest.fixture(scope="module")
def random_logits():
    return np.asarray(jax.random.normal(jax.random.PRNGKey(7), (BATCH, VOCAB)) * 3)


def test_greedy_rows_are_exact_argmax(random_logits):
    params = [SamplingParams(temperature=0.0)] * BATCH
    output, _ = run(random_logits, params)
    np.testing.assert_array_equal(output.token_ids, np.argmax(random_logits, axis=-1))


def test_greedy_rows_stay_argmax_beside_sampled_rows(random_logits):
    params = [SamplingParams(temperature=0.0) if row % 2 else SamplingParams(temperature=2.0, top_k=5)
              for row in range(BATCH)]
    output, _ = run(random_logits, params)
    np.testing.assert_array_equal(output.token_ids[1::2], np.argmax(random_logits, axis=-1)[1::2])


@pytest.mark.parametrize("params, allowed", [
    (dict(top_k=3), {0, 1, 2}),
    (dict(top_p=0.75), {0, 1}),
    (dict(min_p=0.15), {0, 1, 2}),
    (dict(top_k=3, top_p=0.95), {0, 1, 2}),  # 0.95 of the top three's renormalized mass
    (dict(top_k=2, min_p=0.5), {0, 1}),
    # a top_p that float32 rounds to 0 (or below the first token's mass) keeps the first token:
    # it kept nothing, and "nothing" wrapped around to the whole vocabulary
    (dict(top_p=1e-46), {0}),
    (dict(top_p=1e-30), {0}),
])
def test_truncation_never_emits_a_masked_token(params, allowed):
    requests = [SamplingParams(seed=seed, **params) for seed in range(BATCH)]
    drawn = tokens_over_steps(LOGITS, requests, num_steps=8)
    assert set(drawn.ravel()) == allowed


def test_untruncated_sampling_reaches_the_tail():
    requests = [SamplingParams(seed=seed, temperature=3.0) for seed in range(BATCH)]
    drawn = tokens_over_steps(LOGITS, requests, num_steps=4)
    assert len(set(drawn.ravel())) > 10


def test_same_seed_same_tokens_different_seeds_differ():
    uniform = np.zeros(VOCAB, np.float32)
    requests = [SamplingParams(seed=seed) for seed in (11, 11, 12, 2**40 + 11)]
    drawn = tokens_over_steps(uniform, requests, num_steps=12)
    np.testing.assert_array_equal(drawn[:, 0], drawn[:, 1])
    assert not np.array_equal(drawn[:, 0], drawn[:, 2])
    assert not np.array_equal(drawn[:, 0], drawn[:, 3])


@pytest.mark.parametrize("seeded", [
    SamplingParams(seed=1234, temperature=1.5, top_p=0.9),
    SamplingParams(seed=1234, temperature=1.5),  # untruncated, beside truncated neighbours
])
def test_seeded_row_ignores_its_position_and_neighbours(random_logits, seeded):
    row_logits = random_logits[0]
    for step in range(6):
        alone, _ = run(row_logits, [seeded], steps=[step])
        batch_logits = random_logits.copy()
        batch_logits[37] = row_logits
        neighbours = [SamplingParams(temperature=0.7, top_k=4, seed=row) for row in range(BATCH)]
        neighbours[37] = seeded
        steps = [step + row for row in range(BATCH)]
        steps[37] = step
        crowded, _ = run(batch_logits, neighbours, steps=steps, rng_seed=99)
        assert alone.token_ids[0] == crowded.token_ids[37]


@pytest.mark.parametrize("seed", [0, 5, 2**31 + 5])
def test_seeded_draw_uses_fold_in_of_prng_key_and_step(random_logits, seed):
    temperature, step = 0.8, 3
    output, _ = run(random_logits[2], [SamplingParams(seed=seed, temperature=temperature)], steps=[step])
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    uniform = float(jax.random.uniform(key, (), jnp.float32))
    probs = np.exp(random_logits[2].astype(np.float64) / temperature)
    cdf = np.cumsum(probs / probs.sum())
    expected = int(np.searchsorted(cdf, uniform, side="right"))  # the first token whose cdf passes it
    assert output.token_ids[0] == expected


def test_a_seeded_row_draws_the_same_token_in_a_batch_of_any_size():
    """Prefill samples a first token in its batch, colocated in another: the draw of a seeded row
    must not depend on how many rows the program ran (shapes change how a matmul adds up)."""
    vocab, rows = 4096, 16
    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (rows, vocab)) * 2, np.float32)
    params = [SamplingParams(seed=1000 + row, temperature=0.9) for row in range(rows)]
    together = pack_sampling_batch(params, [2] * rows, list(range(rows)), 64)
    batch_logits = jnp.asarray(np.concatenate([logits, np.zeros((64 - rows, vocab), np.float32)]))
    crowd, _ = sample(batch_logits, together, init_penalty_state(64, vocab), jax.random.PRNGKey(0))
    for row in range(rows):
        alone = pack_sampling_batch([params[row]], [2], [0], 1)
        single, _ = sample(jnp.asarray(logits[row:row + 1]), alone, init_penalty_state(1, vocab), jax.random.PRNGKey(0))
        assert int(single.token_ids[0]) == int(crowd.token_ids[row]), row


def test_draws_follow_the_distribution_and_never_take_a_masked_token():
    """200,000 draws of one row over 1,000 tokens (3 of them masked by a grammar): each token's
    frequency within 5 standard deviations of its probability, the masked ones never drawn."""
    vocab, draws = 1000, 200_000
    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (vocab,)) * 2, np.float32)
    allowed = np.ones(vocab, bool)
    allowed[[0, 517, vocab - 1]] = False
    bitmask = all_allowed_bitmask(1, vocab).view(np.uint32)
    for token in np.flatnonzero(~allowed):
        bitmask[0, token // 32] &= ~np.uint32(1 << (token % 32))
    bitmask = bitmask.view(np.int32)
    batch_rows = 500
    counts = np.zeros(vocab, np.int64)
    penalties = init_penalty_state(batch_rows, vocab)
    tile = jnp.asarray(np.broadcast_to(logits, (batch_rows, vocab)))
    mask = jnp.asarray(np.broadcast_to(bitmask.reshape(1, -1), (batch_rows, bitmask.size)))
    params = [SamplingParams(temperature=1.0)] * batch_rows
    for call in range(draws // batch_rows):
        batch = pack_sampling_batch(params, [0] * batch_rows, list(range(batch_rows)), batch_rows)
        batch = batch._replace(valid=np.zeros(batch_rows, bool))  # nothing counted: every call draws alike
        output, penalties = sample(tile, batch, penalties, jax.random.PRNGKey(11), call, mask)
        counts += np.bincount(np.asarray(output.token_ids), minlength=vocab)
    probs = np.where(allowed, np.exp(logits.astype(np.float64)), 0.0)
    probs /= probs.sum()
    assert counts[~allowed].sum() == 0
    spread = np.sqrt(draws * probs * (1 - probs))
    assert np.all(np.abs(counts - draws * probs) <= 5 * spread + 1)


def test_unseeded_rows_follow_the_engine_key():
    uniform = np.zeros(VOCAB, np.float32)
    requests = [SamplingParams()] * BATCH
    first = run(uniform, requests, rng_seed=1)[0].token_ids
    again = run(uniform, requests, rng_seed=1)[0].token_ids
    other = run(uniform, requests, rng_seed=2)[0].token_ids
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def penalties_reference(logits, counts, prompt_mask, repetition, presence, frequency):
    """vLLM's formulas, written out per element."""
    result = logits.copy()
    for row, col in np.ndindex(logits.shape):
        value = result[row, col]
        if prompt_mask[row, col] or counts[row, col] > 0:
            value = value / repetition[row] if value > 0 else value * repetition[row]
        value -= frequency[row] * np.float32(counts[row, col])
        value -= presence[row] * np.float32(counts[row, col] > 0)
        result[row, col] = value
    return result


def test_penalties_match_vllm_formulas(random_logits):
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 3, (BATCH, VOCAB)) * (rng.random((BATCH, VOCAB)) < 0.3)
    prompt_mask = rng.random((BATCH, VOCAB)) < 0.3
    repetition = rng.uniform(0.5, 2.0, BATCH).astype(np.float32)
    presence = rng.uniform(-2, 2, BATCH).astype(np.float32)
    frequency = rng.uniform(-2, 2, BATCH).astype(np.float32)
    penalized = apply_penalties(jnp.asarray(random_logits), jnp.asarray(counts, jnp.int32),
                                jnp.asarray(prompt_mask), jnp.asarray(repetition),
                                jnp.asarray(presence), jnp.asarray(frequency))
    expected = penalties_reference(random_logits, counts, prompt_mask, repetition, presence, frequency)
    np.testing.assert_allclose(np.asarray(penalized), expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(expected, random_logits)


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0])
def test_a_huge_repetition_penalty_under_a_grammar_draws_an_allowed_token(temperature):
    """Every allowed token penalized (in the prompt) with a penalty near float32's largest: their
    negative logits times it overflowed to -inf, tying with the masked tokens, and a row of nothing
    but -inf drew token 0, which the grammar forbids."""
    logits = -np.abs(np.asarray(jax.random.normal(jax.random.PRNGKey(4), (VOCAB,)), np.float32)) - 4  # x 1e38: < -3.4e38
    allowed = [3, 4, 5]
    bitmask = np.zeros((1, 1), np.uint32)
    for token in allowed:
        bitmask[0, 0] |= np.uint32(1 << token)
    mask = jnp.asarray(np.broadcast_to(bitmask.view(np.int32), (BATCH, 1)))
    penalties = init_penalty_state(BATCH, VOCAB)
    params = [SamplingParams(temperature=temperature, repetition_penalty=1e38, seed=row) for row in range(BATCH)]
    for row in range(BATCH):
        penalties = load_slot(penalties, row, padded_token_ids(allowed), padded_token_ids([]))
    batch = pack_sampling_batch(params, [0] * BATCH, list(range(BATCH)), BATCH)
    output, _ = sample(jnp.asarray(np.broadcast_to(logits, (BATCH, VOCAB))), batch, penalties,
                       jax.random.PRNGKey(0), 0, mask)
    assert set(np.asarray(output.token_ids).tolist()) <= set(allowed)


def test_neutral_penalties_leave_logits_bit_identical(random_logits):
    counts = jnp.ones((BATCH, VOCAB), jnp.int32)
    penalized = apply_penalties(jnp.asarray(random_logits), counts, jnp.ones((BATCH, VOCAB), bool),
                                jnp.ones(BATCH), jnp.zeros(BATCH), jnp.zeros(BATCH))
    np.testing.assert_array_equal(np.asarray(penalized), random_logits)


def test_repetition_penalty_reaches_greedy_through_the_prompt_slot():
    logits = np.zeros(VOCAB, np.float32)
    logits[[3, 5]] = [2.0, 1.5]
    penalties = load_slot(init_penalty_state(BATCH, VOCAB), 9, padded_token_ids([3, 4]),
                          padded_token_ids([]))
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0)]
    output, _ = run(logits, params, slots=[9], penalties=penalties)
    assert output.token_ids[0] == 5


def test_frequency_penalty_grows_with_each_sampled_token():
    logits = np.zeros(VOCAB, np.float32)
    logits[[3, 5]] = [2.0, 1.0]
    params = [SamplingParams(temperature=0.0, frequency_penalty=0.6)]
    penalties = init_penalty_state(BATCH, VOCAB)
    drawn = []
    for step in range(3):
        output, penalties = run(logits, params, steps=[step], slots=[4], penalties=penalties)
        drawn.append(int(output.token_ids[0]))
    # 3 scores 2.0, then 1.4 (still ahead of 1.0), then 0.8: token 5 takes over.
    assert drawn == [3, 3, 5]


def test_sampled_tokens_are_counted_in_their_slots_and_padding_is_not():
    logits = np.zeros(VOCAB, np.float32)
    logits[7] = 5.0
    output, penalties = run(logits, [SamplingParams(temperature=0.0)] * 2, slots=[10, 20])
    counts = np.asarray(penalties.output_counts)
    assert counts[10, 7] == counts[20, 7] == 1
    assert counts.sum() == 2


def test_load_slot_sets_prompt_tokens_and_output_counts():
    penalties = init_penalty_state(BATCH, VOCAB)
    penalties = load_slot(penalties, 3, padded_token_ids([1, 2, 2]), padded_token_ids([5, 5, 6]))
    assert set(np.flatnonzero(np.asarray(penalties.prompt_mask[3]))) == {1, 2}
    counts = np.asarray(penalties.output_counts)
    assert counts[3, 5] == 2 and counts[3, 6] == 1 and counts.sum() == 3
    penalties = load_slot(penalties, 3, padded_token_ids([0]), padded_token_ids([]))
    assert np.asarray(penalties.output_counts).sum() == 0
    assert set(np.flatnonzero(np.asarray(penalties.prompt_mask))) == {3 * VOCAB}


def test_logprobs_are_log_softmax_of_the_raw_logits(random_logits):
    """Every row's, once one row asks (the rows that did not ask are not read)."""
    params = [SamplingParams(seed=row, temperature=0.5, top_k=4, repetition_penalty=1.3,
                             logprobs=5 if row == 3 else None) for row in range(BATCH)]
    penalties = load_slot(init_penalty_state(BATCH, VOCAB), 0, padded_token_ids([0, 1, 2]),
                          padded_token_ids([3]))
    output, _ = run(random_logits, params, penalties=penalties)
    expected = np.asarray(jax.nn.log_softmax(jnp.asarray(random_logits), axis=-1))
    rows = np.arange(BATCH)
    np.testing.assert_allclose(output.logprobs, expected[rows, output.token_ids], rtol=1e-6)
    assert output.top_token_ids.shape == (BATCH, MAX_LOGPROBS)
    np.testing.assert_array_equal(output.top_token_ids, np.argsort(-expected, axis=-1)[:, :MAX_LOGPROBS])
    np.testing.assert_allclose(output.top_logprobs, -np.sort(-expected, axis=-1)[:, :MAX_LOGPROBS],
                               rtol=1e-6)


def test_logprobs_are_not_computed_when_no_row_asks(random_logits):
    """The log_softmax and top-k over the vocabulary are skipped (they cost more than the rest of
    the sampler with a real vocabulary); the tokens drawn are the same either way."""
    asking = [SamplingParams(seed=row, temperature=0.7, logprobs=2 if row == 0 else None) for row in range(BATCH)]
    silent = [SamplingParams(seed=row, temperature=0.7) for row in range(BATCH)]
    with_logprobs, _ = run(random_logits, asking)
    without, _ = run(random_logits, silent)
    np.testing.assert_array_equal(with_logprobs.token_ids, without.token_ids)
    assert np.all(with_logprobs.logprobs < 0)
    assert not without.logprobs.any() and not without.top_logprobs.any() and not without.top_token_ids.any()


def test_pack_pads_rows_as_greedy_uncounted_padding():
    batch = pack_sampling_batch([SamplingParams(seed=-2, top_k=-1)], [4], [2], batch_size=4)
    assert batch.valid.tolist() == [True, False, False, False]
    assert batch.logprobs.tolist() == [False] * 4
    assert batch.temperature.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert batch.top_k.tolist() == [0] * 4
    assert batch.seed[0].tolist() == [0xFFFFFFFF, 0xFFFFFFFE]
    with pytest.raises(ValueError, match="do not fit"):
        pack_sampling_batch([SamplingParams()] * 5, [0] * 5, list(range(5)), batch_size=4)


def test_a_token_masked_to_minus_infinity_is_never_drawn_where_the_sums_round_up():
    """The block prefix sums come from a tree of additions, not monotone to the last bit: a block
    whose tokens are all masked (a grammar's) can end an ulp above the block before it, and a
    uniform landing in that gap picked it, drawing the next block's first token, masked too (or one
    past the vocabulary). Rows of Qwen3-VL's vocabulary with a few thousand tokens allowed, at
    uniforms jax.random.uniform really returns (k * 2**-23) that land in such gaps."""
    from mmserve.sampler import _inverse_cdf, _prefix_sums

    vocab = 151936
    block = 1 << max(3, (vocab.bit_length() + 1) // 2)
    blocks = -(-vocab // block)
    rng = np.random.default_rng(0)
    drawn = []
    for _ in range(40):
        allowed = np.zeros(vocab, bool)
        allowed[rng.choice(vocab, size=rng.integers(2, 3000), replace=False)] = True
        logits = jnp.asarray(np.where(allowed, rng.normal(size=(1, vocab)) * 3, -np.inf).astype(np.float32))
        weights = jnp.pad(jnp.exp(logits - jnp.max(logits)), ((0, 0), (0, blocks * block - vocab)))
        sums = np.asarray(weights.reshape(blocks, block).sum(-1))
        mass = np.asarray(_prefix_sums(jnp.asarray(sums)[None]))[0]
        gaps = [c for c in range(1, blocks) if sums[c] == 0 and mass[c] > mass[c - 1]]
        landing = (u for c in gaps for k in [int(np.floor(mass[c - 1] / mass[-1] * 2**23))]
                   for u in (np.float32(k + d) * np.float32(2**-23) for d in range(-4, 8))
                   if mass[c - 1] <= min(u * mass[-1], np.nextafter(mass[-1], np.float32(0))) < mass[c])
        u = next(landing, None)
        if u is not None:
            token = int(_inverse_cdf(logits, jnp.asarray([u], jnp.float32))[0])
            drawn.append(token < vocab and bool(allowed[token]))
        if len(drawn) >= 3:
            break
    assert len(drawn) == 3 and all(drawn)
