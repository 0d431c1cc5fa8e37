"""best_of: which candidates are the best, and which requests for them are refused."""

import pytest

from mmserve import SamplingParams
from mmserve.serving.backend import TokenLogprob
from mmserve.serving.router.best_of import best, requested_best_of, scored
from mmserve.serving.router.errors import InvalidRequest
from mmserve.serving.router.relay import Answer


def answer(*logprobs: float) -> Answer:
    return Answer(token_ids=list(range(len(logprobs))),
                  logprobs=[TokenLogprob(i, lp, {}) for i, lp in enumerate(logprobs)])


def test_the_most_likely_answers_come_first_by_their_summed_logprobs():
    answers = [answer(-1.0, -1.0), answer(-0.5), answer(-0.1, -0.1, -0.1), answer(-3.0)]
    assert best(answers, 2) == [2, 1]
    assert best(answers, 4) == [2, 1, 0, 3]


def test_a_tie_goes_to_the_earlier_candidate():
    assert best([answer(-1.0), answer(-0.5, -0.5), answer(-1.0)], 3) == [0, 1, 2]


def test_candidates_are_asked_for_their_chosen_tokens_logprobs_and_keep_what_was_asked():
    assert scored(SamplingParams(seed=3)).logprobs == 0
    assert scored(SamplingParams(seed=3)).seed == 3
    assert scored(SamplingParams(logprobs=5)).logprobs == 5


@pytest.mark.parametrize(("body", "n", "stream", "expected"), [
    ({}, 1, False, 1), ({}, 3, True, 3), ({"best_of": 4}, 2, False, 4), ({"best_of": 2}, 2, True, 2)])
def test_best_of_defaults_to_n(body, n, stream, expected):
    assert requested_best_of(body, n, stream) == expected


@pytest.mark.parametrize(("body", "n", "stream", "reason"), [
    ({"best_of": 1}, 2, False, "best_of must be an integer in [n, 16]"),
    ({"best_of": 17}, 1, False, "best_of must be an integer in [n, 16]"),
    ({"best_of": "3"}, 1, False, "best_of must be an integer"),
    ({"best_of": True}, 1, False, "best_of must be an integer"),
    ({"best_of": 3}, 1, True, "cannot be streamed")])
def test_a_best_of_below_n_above_the_limit_or_streamed_is_refused(body, n, stream, reason):
    with pytest.raises(InvalidRequest, match=reason.replace("[", r"\[").replace("]", r"\]")):
        requested_best_of(body, n, stream)
