"""How one request wants its tokens chosen, in vLLM's shape.

`SamplingParams(...)` validates its values and raises `ValueError` on a bad one (an unknown keyword
is Python's own `TypeError`). Input from outside the process (HTTP bodies, CLI flags) goes through
`SamplingParams.from_dict`, which turns every mistake, unknown keys and wrong types included, into a
`ValueError` that names the field.
"""

import dataclasses
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from mmserve.structured_output.spec import StructuredOutput

log = logging.getLogger(__name__)

# Top-k logprobs are computed for a static count on device; a request may ask for at most this many.
MAX_LOGPROBS = 20
MIN_REPETITION_PENALTY = 1e-6
"""Below it a positive logit divided by the penalty can pass float32's range: inf, then NaN."""
FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32: temperature and repetition_penalty reach the sampler as float32."""

# Every new token is checked against each stop string and token id on the engine's thread: a request
# naming a million of them slowed every other request 100-fold. (OpenAI's API takes 4 stop strings;
# these bounds leave room for templates' many end markers.)
MAX_STOP_STRINGS = 64
MAX_STOP_TOKEN_IDS = 256

MAX_N = 16
MAX_LOGIT_BIAS = 300
"""Most tokens a request's logit_bias may name (the sampler's per-row bias table has this many)."""
LOGIT_BIAS_LIMIT = 100.0
"""OpenAI's range of a logit bias, [-100, 100]; values beyond are clamped to it, as vLLM does."""
"""Most sequences one request may ask for (``n``); each takes a sequence slot of its own."""

# Temperatures below this are treated as greedy, as vLLM does: dividing by them only amplifies noise.
GREEDY_TEMPERATURE = 1e-5

# Seeds are reduced to 64 bits (two's complement), the width of a threefry key.
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request.

    temperature: 0 (below `GREEDY_TEMPERATURE`) means greedy: the argmax of the penalized logits.
    top_k: keep the k most likely tokens; -1 or 0 turns it off.
    top_p: keep the smallest set of tokens whose probability reaches top_p; 1 turns it off.
    min_p: drop tokens less likely than min_p times the most likely one; 0 turns it off.
    seed: makes the request's samples reproducible, whatever else is in the batch; None, or -1
        as in vLLM, for none.
    repetition_penalty: >1 discourages tokens already in the prompt or the output (vLLM's formula).
    presence_penalty, frequency_penalty: in [-2, 2]; subtracted once per token present in the
        output, and once per occurrence in the output.
    stop_token_ids, stop: the request finishes on one of these tokens or strings; a stop string
        is cut from the output text, and so is a stop token's (or end-of-sequence token's) text,
        unless ``include_stop_str_in_output``.
    max_tokens: the most tokens to generate; None, as in vLLM, for as many as the context leaves
        (the engine fills it in as the request is added).
    min_tokens: the fewest (vLLM's): until the output has that many tokens, end-of-sequence
        (even with ``ignore_eos``) and the stop token ids cannot be drawn, and a stop string ends
        it only in a later token's text. At most max_tokens. A grammar that is complete (a
        structured output) still ends it.
    logprobs: None for no logprobs; k returns the chosen token's logprob and the top k.
    ignore_eos: keep generating past the end-of-sequence token.
    logit_bias: added to the logits of these token ids before sampling (OpenAI's, clamped to
        [-100, 100]; -100 bans a token, +100 all but forces it); a mapping of id to bias, or
        (id, bias) pairs, at most MAX_LOGIT_BIAS; kept as pairs sorted by id. Logprobs stay the model's.
    structured_output: what the output must follow (a JSON schema, a regular expression, a list of
        choices, an EBNF grammar: :class:`StructuredOutput`); a grammar masks the tokens that
        would break it, and the request stops when the grammar is complete.
    n: how many sequences to generate for the prompt (vLLM's): ``LLM.generate`` and the HTTP API
        run each as a request of its own (:meth:`sibling`); an engine request is one sequence.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    structured_output: StructuredOutput | None = None
    n: int = 1
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(_as_float(value)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            object.__setattr__(self, name, _as_float(value))
        for name in ("top_k", "max_tokens", "min_tokens", "seed", "logprobs", "n"):
            if name in ("top_k", "min_tokens", "n") or getattr(self, name) is not None:
                object.__setattr__(self, name, _int(name, getattr(self, name)))
        if self.seed == -1:  # vLLM's "no seed", which clients send: it was a fixed seed here
            object.__setattr__(self, "seed", None)
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutput):
            raise ValueError(f"structured_output must be a StructuredOutput, got {self.structured_output!r}")
        object.__setattr__(self, "stop_token_ids", _token_ids(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        object.__setattr__(self, "stop", _stop_strings(self.stop))

        if not 0.0 <= self.temperature <= FLOAT32_MAX:  # the sampler divides by it in float32
            raise ValueError(f"temperature must be >= 0 and finite in float32 (<= {FLOAT32_MAX:.4g}), "
                             f"got {self.temperature}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or >= 1, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not _SEED_MIN <= self.seed <= _SEED_MAX:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= FLOAT32_MAX:
            raise ValueError(f"repetition_penalty must be >= {MIN_REPETITION_PENALTY} and finite in float32 "
                             f"(<= {FLOAT32_MAX:.4g}), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (or None: up to the context), got {self.max_tokens}")
        if self.min_tokens < 0 or self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens ({self.max_tokens})], got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {self.n}")

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "SamplingParams":
        """Builds params from untrusted input; every problem is a ValueError naming the field."""
        if not isinstance(fields, Mapping):
            raise ValueError(f"sampling params must be a mapping, got {type(fields).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in fields if key not in known)
        if unknown:
            raise ValueError(f"unknown sampling field(s): {', '.join(unknown)}")
        return cls(**fields)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def stop_ids_held(self, eos_token_ids) -> list[int]:
        """The token ids ``min_tokens`` keeps from being drawn: end-of-sequence (with
        ``ignore_eos`` too, as vLLM's and transformers' minimum) and the stop token ids."""
        return sorted(set(self.stop_token_ids) | set(eos_token_ids))

    def sibling(self, i: int) -> "SamplingParams":
        """The params of the i-th of the ``n`` sequences: one sequence, and with a ``seed`` its own
        (seed + i, as vLLM's; seed - i where seed + i is past the seed range or is -1, "no
        seed"), so an answer is reproducible sequence by sequence; without one each draws its own."""
        seed = self.seed
        if seed is not None:
            seed = seed + i if seed + i <= _SEED_MAX and seed + i != -1 else seed - i
        return dataclasses.replace(self, n=1, seed=seed)

    @property
    def has_penalties(self) -> bool:
        """Whether any penalty is not neutral (neutral ones leave the logits bit-identical)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _as_float(value: int | float) -> float:
    """An int too large for a float is infinite, which the range checks then refuse by name."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _int(name: str, value: Any) -> int:
    """``value`` as a Python int: ints and numpy's integers, not bools."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return int(value)


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """Pairs of (token id, bias) sorted by id, from a mapping (JSON's keys are strings of digits) or
    pairs; each bias clamped to [-LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT]."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        pairs = list(value)
    else:
        raise ValueError(f"logit_bias must map token ids to numbers, got {value!r:.80}")
    if len(pairs) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias may name at most {MAX_LOGIT_BIAS} tokens, got {len(pairs)}")
    bias: dict[int, float] = {}
    for token, amount in pairs:
        if isinstance(token, str) and token.isascii() and token.isdigit():
            token = int(token)
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {token!r:.40}")
        if isinstance(amount, bool) or not isinstance(amount, numbers.Real) or math.isnan(_as_float(amount)):
            raise ValueError(f"logit_bias values must be numbers, got {amount!r:.40}")
        bias[int(token)] = min(max(_as_float(amount), -LOGIT_BIAS_LIMIT), LOGIT_BIAS_LIMIT)
    return tuple(sorted(bias.items()))


def _token_ids(values: Any) -> tuple[int, ...]:
    if values is None:
        return ()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"stop_token_ids must be a list of ints, got {values!r}")
    if len(values) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"stop_token_ids may name at most {MAX_STOP_TOKEN_IDS} tokens, got {len(values)}")
    values = tuple(_int("stop_token_ids", value) for value in values)
    for value in values:
        if value < 0:
            raise ValueError(f"stop_token_ids must be >= 0, got {value}")
    return values


def _stop_strings(values: Any) -> tuple[str, ...]:
    """Accepts None, one string or a list of them, as the OpenAI API does."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = (values,)
    if not isinstance(values, Sequence) or not all(isinstance(value, str) for value in values):
        raise ValueError(f"stop must be a string or a list of strings, got {values!r}")
    if len(values) > MAX_STOP_STRINGS:
        raise ValueError(f"stop may list at most {MAX_STOP_STRINGS} strings, got {len(values)}")
    if any(value == "" for value in values):
        raise ValueError("stop strings must not be empty")
    return tuple(values)


def checked_defaults(defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling values a checkpoint recommends (``Model.sampling_defaults``) that are valid
    here; each other one is left out with a warning (kept, it would refuse every request leaving
    that field out, naming a field the client never sent)."""
    kept = {}
    for name, value in defaults.items():
        try:
            SamplingParams.from_dict({name: value})
        except ValueError as error:
            log.warning("generation_config.json's %s=%r is not used: %s", name, value, error)
            continue
        kept[name] = value
    return kept
