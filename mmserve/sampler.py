"""Batched token sampling on device, in one jitted program.

Order of operations, as in vLLM v1:
1. logprobs: log_softmax of the raw model logits, before penalties and temperature (vLLM's default,
   `logprobs_mode="raw_logprobs"`), so they describe the model, not the request's settings;
2. penalties: repetition over prompt and output tokens, presence and frequency over output tokens;
3. the grammar mask: tokens a row's grammar forbids get -inf (`token_bitmask`, one bit per token);
4. greedy rows: the argmax of the masked logits;
5. other rows: temperature, min-p, top-k, top-p, then one draw from the row's categorical
   distribution by its inverse CDF, from one uniform number per row (`_inverse_cdf`).

Logprobs stay those of the model: a grammar changes which token is chosen, not what the model
thought of it. They are computed only when a row of the batch asks for them (a `lax.cond`, so one
program serves both): with a real vocabulary the log_softmax and top-k over it cost more than the
rest of the sampler (batch 32, 151,936 tokens, this CPU: about 45 of 66 ms).

Randomness: a row with a seed draws its uniform with `fold_in(PRNGKey(seed), step)` (threefry), where `step`
is the number of tokens its request has generated so far. Its draw depends on nothing else in the
batch, so it survives reordering, preemption with recompute, and the prefill -> decode hand-off.
Rows without a seed draw with `fold_in(fold_in(rng_key, call), row)`: the engine passes its one key
and the number of its calls so far, folded in here, inside the program (an eager `fold_in` on the
host costs more than the whole sampler on CPU).

Penalty state: the prompt's token set and the counts of output tokens live on device as
[num_slots, vocab] arrays, indexed by a slot a request keeps for its lifetime (the batch may be
reordered between steps). `sample` adds the tokens it draws to the counts in place (the state is
donated), so the decode loop sends nothing back to the device; only the outputs leave it.
"""

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmserve.sampling_params import GREEDY_TEMPERATURE, MAX_LOGIT_BIAS, MAX_LOGPROBS, SamplingParams

# A host-side batch holds numpy arrays; inside `sample` they are jax arrays.
Array = jax.Array | np.ndarray

_PRNG_IMPL = "threefry2x32"


class SamplingBatch(NamedTuple):
    """Per-row sampling settings, each an array of the batch bucket's length B."""

    temperature: Array  # f32; 0 on greedy rows
    top_k: Array  # i32; 0 = off
    top_p: Array  # f32; 1 = off
    min_p: Array  # f32; 0 = off
    repetition_penalty: Array  # f32; 1 = off
    presence_penalty: Array  # f32; 0 = off
    frequency_penalty: Array  # f32; 0 = off
    seed: Array  # u32[B, 2]: the threefry key data of PRNGKey(seed)
    seeded: Array  # bool; False draws from the engine's key
    step: Array  # i32; tokens the row's request has generated so far
    slot: Array  # i32; the request's row in PenaltyState
    logprobs: Array  # bool; the row's request asks for logprobs
    valid: Array  # bool; False on padding rows, whose draws are not counted
    bias_ids: Array | None = None  # i32[B, MAX_LOGIT_BIAS]: the tokens of the row's logit_bias (0 past them)
    bias_values: Array | None = None  # f32[B, MAX_LOGIT_BIAS]: their biases (0 past them: adds nothing)
    """None when no row has a logit_bias (pack_sampling_batch): the runner then passes zeros it keeps
    on device, so a step without one copies none (a [rows, 300] table each way)."""


class PenaltyState(NamedTuple):
    """What penalties need to know of each slot's request."""

    output_counts: jax.Array  # i32[num_slots, vocab]: occurrences of each token in the output
    prompt_mask: jax.Array  # bool[num_slots, vocab]: token appears in the prompt


class SamplerOutput(NamedTuple):
    """The logprob fields are zeros when no row of the batch asked for logprobs."""

    token_ids: jax.Array  # i32[B]
    logprobs: jax.Array  # f32[B]: raw logprob of the chosen token
    top_token_ids: jax.Array  # i32[B, K], K = min(MAX_LOGPROBS, vocab), most likely first
    top_logprobs: jax.Array  # f32[B, K]


def pack_sampling_batch(params: Sequence[SamplingParams], steps: Sequence[int],
                        slots: Sequence[int], batch_size: int) -> SamplingBatch:
    """Lays out the requests of one batch as numpy arrays padded to `batch_size` rows.

    steps[i] is the number of tokens request i has generated so far, slots[i] its PenaltyState row.
    Padding rows are greedy, with no penalties, and are not counted.
    """
    count = len(params)
    if not len(steps) == len(slots) == count:
        raise ValueError(f"got {count} params, {len(steps)} steps and {len(slots)} slots")
    if count > batch_size:
        raise ValueError(f"{count} requests do not fit a batch of {batch_size}")
    padding = batch_size - count

    def column(values, dtype, pad):
        return np.array(list(values) + [pad] * padding, dtype=dtype)

    seeds = [0 if p.seed is None else p.seed % 2**64 for p in params]
    int32_max = np.iinfo(np.int32).max
    bias_ids = bias_values = None
    if any(p.logit_bias for p in params):
        bias_ids, bias_values = no_logit_bias(batch_size)
        for row, p in enumerate(params):
            if p.logit_bias:
                ids, values = zip(*p.logit_bias)
                bias_ids[row, :len(ids)], bias_values[row, :len(ids)] = ids, values
    return SamplingBatch(
        temperature=column((0.0 if p.is_greedy else p.temperature for p in params), np.float32, 0.0),
        top_k=column((min(max(p.top_k, 0), int32_max) for p in params), np.int32, 0),
        top_p=column((p.top_p for p in params), np.float32, 1.0),
        min_p=column((p.min_p for p in params), np.float32, 0.0),
        repetition_penalty=column((p.repetition_penalty for p in params), np.float32, 1.0),
        presence_penalty=column((p.presence_penalty for p in params), np.float32, 0.0),
        frequency_penalty=column((p.frequency_penalty for p in params), np.float32, 0.0),
        seed=column(([s >> 32, s & 0xFFFFFFFF] for s in seeds), np.uint32, [0, 0]).reshape(-1, 2),
        seeded=column((p.seed is not None for p in params), np.bool_, False),
        step=column(steps, np.int32, 0),
        slot=column(slots, np.int32, 0),
        logprobs=column((p.logprobs is not None for p in params), np.bool_, False),
        valid=column([True] * count, np.bool_, False),
        bias_ids=bias_ids,
        bias_values=bias_values,
    )


def no_logit_bias(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The bias table of ``rows`` rows that biases nothing."""
    return np.zeros((rows, MAX_LOGIT_BIAS), np.int32), np.zeros((rows, MAX_LOGIT_BIAS), np.float32)


def init_penalty_state(num_slots: int, vocab_size: int) -> PenaltyState:
    return PenaltyState(
        output_counts=jnp.zeros((num_slots, vocab_size), jnp.int32),
        prompt_mask=jnp.zeros((num_slots, vocab_size), jnp.bool_),
    )


def padded_token_ids(token_ids: Sequence[int], size: int | None = None) -> np.ndarray:
    """Pads ids with -1 to ``size`` (default: the next power of two, at least 16), so that
    `load_slot` compiles once per size; the engine passes one fixed size."""
    size = size or max(16, 1 << max(len(token_ids) - 1, 0).bit_length())
    if len(token_ids) > size:
        raise ValueError(f"{len(token_ids)} ids do not fit {size}")
    padded = np.full(size, -1, np.int32)
    padded[:len(token_ids)] = token_ids
    return padded


@functools.partial(jax.jit, donate_argnames=("penalties",))
def load_slot(penalties: PenaltyState, slot: jax.Array, prompt_token_ids: jax.Array,
              output_token_ids: jax.Array) -> PenaltyState:
    """Points `slot` at a request: its prompt and the tokens it has generated so far.

    Called on admission, and again when a request resumes after preemption or arrives from prefill.
    Id arrays are padded with -1 (see `padded_token_ids`).
    """
    vocab = penalties.output_counts.shape[1]

    def dropping_padding(ids):
        return jnp.where(ids < 0, vocab, ids)

    prompt_row = jnp.zeros(vocab, jnp.bool_).at[dropping_padding(prompt_token_ids)].set(True, mode="drop")
    counts_row = jnp.zeros(vocab, jnp.int32).at[dropping_padding(output_token_ids)].add(1, mode="drop")
    return PenaltyState(
        output_counts=penalties.output_counts.at[slot].set(counts_row),
        prompt_mask=penalties.prompt_mask.at[slot].set(prompt_row),
    )


def apply_penalties(logits: jax.Array, output_counts: jax.Array, prompt_mask: jax.Array,
                    repetition_penalty: jax.Array, presence_penalty: jax.Array,
                    frequency_penalty: jax.Array) -> jax.Array:
    """vLLM's penalties. Neutral values (1, 0, 0) leave a row's logits bit-identical. A large
    repetition penalty's product is held to float32's finite range: at -inf a penalized token
    would tie with the tokens a grammar masks (a row of nothing but -inf draws token 0)."""
    in_output = output_counts > 0
    repetition = jnp.where(prompt_mask | in_output, repetition_penalty[:, None], 1.0)
    lowest = jnp.finfo(jnp.float32).min
    logits = jnp.where(logits > 0, logits / repetition, jnp.maximum(logits * repetition, lowest))
    logits = logits - frequency_penalty[:, None] * output_counts
    return logits - presence_penalty[:, None] * in_output


def bitmask_words(vocab_size: int) -> int:
    """Int32 words per row of a token bitmask (xgrammar's layout: token t is bit t % 32 of word t // 32)."""
    return -(-vocab_size // 32)


def all_allowed_bitmask(rows: int, vocab_size: int) -> np.ndarray:
    return np.full((rows, bitmask_words(vocab_size)), -1, np.int32)


def allowed_tokens(token_bitmask: jax.Array, vocab_size: int) -> jax.Array:
    """bool[B, vocab] from an i32[B, words] bitmask."""
    bits = (token_bitmask[:, :, None] >> jnp.arange(32, dtype=token_bitmask.dtype)) & 1  # no gather
    return bits.reshape(token_bitmask.shape[0], -1)[:, :vocab_size].astype(jnp.bool_)


@functools.partial(jax.jit, donate_argnames=("penalties",))
def sample(logits: jax.Array, batch: SamplingBatch, penalties: PenaltyState, rng_key: jax.Array,
           call: jax.Array | int = 0, token_bitmask: jax.Array | None = None) -> tuple[SamplerOutput, PenaltyState]:
    """Draws one token per row of `logits` [B, vocab] and counts it in the row's penalty slot.

    rng_key: a threefry key (jax.random.PRNGKey or jax.random.key), and call: a number never used
    with it before; only rows without a seed use them. token_bitmask: i32[B, bitmask_words(vocab)], the tokens each row
    may draw (all bits set on rows without a grammar, which leaves their logits bit-identical);
    None: no mask at all.
    """
    logits = logits.astype(jnp.float32)
    penalized = apply_penalties(
        logits, penalties.output_counts[batch.slot], penalties.prompt_mask[batch.slot],
        batch.repetition_penalty, batch.presence_penalty, batch.frequency_penalty)
    if batch.bias_ids is not None:  # logit_bias, after the penalties (0 adds nothing)
        penalized = penalized.at[jnp.arange(logits.shape[0])[:, None], batch.bias_ids].add(batch.bias_values)
    if token_bitmask is not None:
        penalized = jnp.where(allowed_tokens(token_bitmask, logits.shape[-1]), penalized, -jnp.inf)

    greedy = batch.temperature < GREEDY_TEMPERATURE
    greedy_ids = jnp.argmax(penalized, axis=-1)
    drawn_ids = jax.lax.cond(
        jnp.all(greedy),
        lambda: greedy_ids,
        lambda: _draw(penalized, batch, greedy, _row_keys(batch, jax.random.fold_in(rng_key, call))))
    token_ids = jnp.where(greedy, greedy_ids, drawn_ids).astype(jnp.int32)

    chosen, top_token_ids, top_logprobs = jax.lax.cond(jnp.any(batch.logprobs & batch.valid), _raw_logprobs,
                                                       _no_logprobs, logits, token_ids)
    output = SamplerOutput(token_ids=token_ids, logprobs=chosen, top_token_ids=top_token_ids,
                           top_logprobs=top_logprobs)
    counted = penalties.output_counts.at[batch.slot, token_ids].add(batch.valid.astype(jnp.int32))
    return output, penalties._replace(output_counts=counted)


def _raw_logprobs(logits: jax.Array, token_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The chosen tokens' logprobs and each row's most likely tokens, from the raw logits."""
    raw = jax.nn.log_softmax(logits, axis=-1)
    top_logprobs, top_token_ids = jax.lax.top_k(raw, min(MAX_LOGPROBS, logits.shape[-1]))
    return jnp.take_along_axis(raw, token_ids[:, None], axis=-1)[:, 0], top_token_ids.astype(jnp.int32), top_logprobs


def _no_logprobs(logits: jax.Array, token_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    rows, k = logits.shape[0], min(MAX_LOGPROBS, logits.shape[-1])
    return (jnp.zeros(rows, jnp.float32), jnp.zeros((rows, k), jnp.int32), jnp.zeros((rows, k), jnp.float32))


def _row_keys(batch: SamplingBatch, rng_key: jax.Array) -> jax.Array:
    def fold(key_data, data):
        key = jax.random.wrap_key_data(key_data, impl=_PRNG_IMPL)
        return jax.random.key_data(jax.random.fold_in(key, data))

    if jnp.issubdtype(rng_key.dtype, jax.dtypes.prng_key):
        rng_key = jax.random.key_data(rng_key)
    rows = jnp.arange(batch.seed.shape[0])
    seeded = jax.vmap(fold)(batch.seed, batch.step)
    unseeded = jax.vmap(fold, in_axes=(None, 0))(rng_key, rows)
    return jax.random.wrap_key_data(jnp.where(batch.seeded[:, None], seeded, unseeded), impl=_PRNG_IMPL)


def _draw(logits: jax.Array, batch: SamplingBatch, greedy: jax.Array, keys: jax.Array) -> jax.Array:
    temperature = jnp.where(greedy, 1.0, batch.temperature)
    # held to float32's range (a penalized logit at its lowest, divided by a temperature below 1,
    # would be -inf, as a grammar's masked tokens are: a row of them draws token 0); those stay -inf
    scaled = jnp.maximum(logits / temperature[:, None], jnp.finfo(jnp.float32).min)
    logits = jnp.where(logits == -jnp.inf, logits, scaled)
    logits = _apply_min_p(logits, batch.min_p)
    truncating = ~greedy & ((batch.top_k > 0) | (batch.top_p < 1.0))
    logits = jax.lax.cond(jnp.any(truncating),
                          lambda x: _apply_top_k_top_p(x, batch.top_k, batch.top_p),
                          lambda x: x, logits)
    uniform = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(keys)
    return _inverse_cdf(logits, uniform)


def _inverse_cdf(logits: jax.Array, uniform: jax.Array) -> jax.Array:
    """Row i's token whose share of the probability mass (softmax of its logits) holds
    ``uniform[i]`` in [0, 1): a draw from the row's distribution with one random number.

    A Gumbel-max draw needs a random number per token, which at a real vocabulary costs more than
    everything else in the sampler on CPU (batch 32, 151,936 tokens: ~270 ms a call). The search
    runs in two levels, blocks of about sqrt(vocab) tokens, then the tokens of the chosen block,
    so each prefix sum is short (XLA:CPU's cumsum is quadratic in the row's length). At each level
    the pick is the first block (token) with mass whose end passes the target, else the last with
    mass: a token masked to -inf is never drawn. (The tree's sums are not monotone to the last bit:
    a block of masked tokens can end an ulp above the one before it, and a target in that gap once
    picked it, drawing the next block's first token, masked too; ~2e-8 of draws at 151,936 tokens.)
    A row with no mass at all (every token masked) draws token 0."""
    rows, vocab = logits.shape
    block = 1 << max(3, (vocab.bit_length() + 1) // 2)
    blocks = -(-vocab // block)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.pad(weights, ((0, 0), (0, blocks * block - vocab))).reshape(rows, blocks, block)
    sums = weights.sum(axis=-1)
    mass = _prefix_sums(sums)  # [rows, blocks]: the mass up to each block's end
    target = jnp.minimum(uniform * mass[:, -1], _just_below(mass[:, -1]))
    chosen = _first_with_mass(mass > target[:, None], sums > 0)
    before = jnp.where(chosen > 0, jnp.take_along_axis(mass, jnp.maximum(chosen - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    inside_weights = jnp.take_along_axis(weights, chosen[:, None, None], axis=1)[:, 0]  # [rows, block]
    inside = _prefix_sums(inside_weights)
    rest = jnp.minimum(jnp.maximum(target - before, 0.0), _just_below(inside[:, -1]))
    return chosen * block + _first_with_mass(inside > rest[:, None], inside_weights > 0)


def _first_with_mass(passes: jax.Array, has_mass: jax.Array) -> jax.Array:
    """Per row, the first index where ``passes`` and ``has_mass`` both hold; else the last with
    mass; else 0."""
    length = passes.shape[-1]
    hit = passes & has_mass
    last = length - 1 - jnp.argmax(has_mass[:, ::-1], axis=-1)
    fallback = jnp.where(jnp.any(has_mass, axis=-1), last, 0)
    return jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), fallback)


def _prefix_sums(x: jax.Array) -> jax.Array:
    """Inclusive prefix sums along the last axis, by a fixed tree of additions: a row's sums do not
    depend on the batch it is in (a matmul's could: its blocking depends on the shapes), so a seeded
    row draws the same token in every batch, on prefill as in colocated."""
    return jax.lax.associative_scan(jnp.add, x, axis=-1)


def _just_below(x: jax.Array) -> jax.Array:
    return jnp.nextafter(x, jnp.zeros_like(x))


def _apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Drops tokens with p < min_p * p_max, compared in log space; min_p = 0 drops nothing."""
    floor = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(min_p)[:, None]
    return jnp.where(logits < floor, -jnp.inf, logits)


def _apply_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keeps the top k tokens, then the smallest prefix of them whose probability reaches top_p.

    Both keep a prefix of the sorted row, so one threshold logit per row applies them; tokens tied
    with the threshold are kept, as in vLLM. A row with both off is returned untouched.
    """
    vocab = logits.shape[-1]
    rank = jnp.arange(vocab)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    in_top_k = rank[None, :] < k[:, None]
    descending = jnp.where(in_top_k, jnp.flip(jnp.sort(logits, axis=-1), axis=-1), -jnp.inf)
    probs = jax.nn.softmax(descending, axis=-1)
    # The mass strictly before each rank, built from one cumsum so that it never decreases.
    mass_before = jnp.concatenate([jnp.zeros_like(probs[:, :1]), jnp.cumsum(probs, axis=-1)[:, :-1]],
                                  axis=-1)
    in_top_p = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    kept = jnp.maximum(jnp.sum(in_top_k & in_top_p, axis=-1), 1)  # a top_p float32 rounds to 0 keeps one
    threshold = jnp.take_along_axis(descending, kept[:, None] - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)
