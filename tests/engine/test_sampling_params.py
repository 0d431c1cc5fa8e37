"""SamplingParams validates itself; from_dict turns every mistake into a ValueError."""

import pytest

from mmserve.sampling_params import MAX_LOGPROBS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, SamplingParams


def test_defaults_are_vllms():
    params = SamplingParams()
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (1.0, 0, 1.0, 0.0)
    assert (params.max_tokens, params.logprobs, params.seed, params.ignore_eos) == (16, None, None, False)
    assert not params.is_greedy


def test_a_seed_of_minus_one_is_no_seed_as_in_vllm():
    """Clients send -1 for "random"; it was a fixed seed, so every such request drew the same tokens."""
    assert SamplingParams(seed=-1).seed is None and SamplingParams.from_dict({"seed": -1}).seed is None
    assert SamplingParams(seed=-2).seed == -2


def test_zero_temperature_is_greedy():
    assert SamplingParams(temperature=0).is_greedy


def test_stop_lists_become_tuples_and_a_single_stop_string_is_accepted():
    params = SamplingParams(stop="###", stop_token_ids=[7, 8])
    assert params.stop == ("###",)
    assert params.stop_token_ids == (7, 8)
    assert hash(params) == hash(SamplingParams(stop=["###"], stop_token_ids=(7, 8)))


@pytest.mark.parametrize("fields, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(temperature=10**400), "temperature"),
    (dict(presence_penalty=-10**400), "presence_penalty"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=float("nan")), "min_p"),
    (dict(seed=2**64), "seed"),
    (dict(seed="1"), "seed"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=1e-45), "repetition_penalty"),  # logits / penalty: inf, then NaN, then token 0
    (dict(temperature=1e39), "temperature"),  # finite in Python, inf in float32: a masked -inf / inf is NaN
    (dict(repetition_penalty=1e39), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-5), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=MAX_LOGPROBS + 1), "logprobs"),
    (dict(stop_token_ids=[1, -1]), "stop_token_ids"),
    (dict(stop_token_ids="12"), "stop_token_ids"),
    (dict(stop=[""]), "stop"),
    (dict(stop=[1]), "stop"),
    (dict(stop=[f"<{i}>" for i in range(MAX_STOP_STRINGS + 1)]), "at most 64 strings"),
    (dict(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1))), "at most 256 tokens"),
    (dict(ignore_eos="yes"), "ignore_eos"),
    (dict(include_stop_str_in_output=1), "include_stop_str_in_output"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
])
def test_bad_values_raise_value_error_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)
    with pytest.raises(ValueError, match=message):
        SamplingParams.from_dict(fields)


def test_from_dict_rejects_unknown_fields_by_name():
    with pytest.raises(ValueError, match="unknown sampling field.*best_of.*top_q"):
        SamplingParams.from_dict({"temperature": 0.5, "top_q": 0.9, "best_of": 2})


def test_constructor_rejects_unknown_fields_with_type_error():
    with pytest.raises(TypeError):
        SamplingParams(top_q=0.9)


def test_from_dict_accepts_json_shapes():
    params = SamplingParams.from_dict(
        {"temperature": 0, "max_tokens": 8, "stop": None, "stop_token_ids": [2], "logprobs": 5,
         "seed": -3})
    assert params.is_greedy and params.max_tokens == 8 and params.stop == ()
    assert params.stop_token_ids == (2,) and params.logprobs == 5 and params.seed == -3


def test_from_dict_rejects_a_non_mapping():
    with pytest.raises(ValueError, match="mapping"):
        SamplingParams.from_dict([("temperature", 1.0)])


def test_numpy_numbers_are_taken_as_the_python_numbers_they_hold():
    import numpy as np

    params = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), seed=np.int64(7), max_tokens=np.int32(4),
                            stop_token_ids=[np.int64(5)], logprobs=np.int16(2))
    assert (params.temperature, params.top_k, params.seed, params.max_tokens, params.stop_token_ids,
            params.logprobs) == (0.5, 3, 7, 4, (5,), 2)
    assert all(type(v) is int for v in (params.top_k, params.seed, params.max_tokens, params.logprobs,
                                         *params.stop_token_ids))
    for bad in ({"top_k": np.bool_(True)}, {"seed": np.float64(1.0)}, {"stop_token_ids": [np.bool_(False)]}):
        with pytest.raises(ValueError, match="must be an int"):
            SamplingParams(**bad)


def test_min_tokens_holds_end_of_sequence_back_with_ignore_eos_too():
    """As vLLM's minimum and transformers' ``min_new_tokens``: ``ignore_eos`` does not make
    end-of-sequence drawable before ``min_tokens``."""
    assert SamplingParams(min_tokens=2, ignore_eos=True, stop_token_ids=[9]).stop_ids_held({2}) == [2, 9]
