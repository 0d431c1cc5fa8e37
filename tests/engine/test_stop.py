"""Stop checks: eos, stop token ids, stop strings (cut from the text) and max_tokens."""

from mmserve.sampling_params import SamplingParams
from mmserve.stop import Finish, FinishReason, check_stop, streamable_text

EOS = 2


def feed(params, pieces, eos_token_ids=(EOS,)):
    """Feeds (token, text) pieces one at a time, as a detokenizer would; returns the finish."""
    token_ids, text = [], ""
    for token_id, piece in pieces:
        token_ids.append(token_id)
        text += piece
        finish = check_stop(params, eos_token_ids, token_ids, text, len(piece))
        if finish is not None:
            return finish, len(token_ids)
    return None, len(token_ids)


def test_eos_stops_without_its_text():
    finish, used = feed(SamplingParams(), [(5, "Hi"), (EOS, "</s>"), (6, "!")])
    assert finish == Finish(FinishReason.STOP, "Hi", None)
    assert used == 2


def test_ignore_eos_goes_on_to_the_length_limit():
    finish, used = feed(SamplingParams(ignore_eos=True, max_tokens=3), [(EOS, "a"), (EOS, "b"), (EOS, "c")])
    assert finish == Finish(FinishReason.LENGTH, "abc", None)
    assert used == 3


def test_stop_token_id_stops_and_reports_the_token():
    finish, _ = feed(SamplingParams(stop_token_ids=[9]), [(5, "x"), (9, "<stop>")])
    assert finish == Finish(FinishReason.STOP, "x", 9)


def test_stop_string_split_across_tokens_is_cut_from_the_text():
    pieces = [(1, "The answer"), (1, " is 4"), (1, "2.\n\n"), (1, "#"), (1, "## Next")]
    finish, used = feed(SamplingParams(stop=["###"]), pieces)
    assert finish == Finish(FinishReason.STOP, "The answer is 42.\n\n", "###")
    assert used == 5


def test_earliest_of_several_stop_strings_wins():
    finish, _ = feed(SamplingParams(stop=["cd", "bc"]), [(1, "a"), (1, "bcd")])
    assert finish == Finish(FinishReason.STOP, "a", "bc")


def test_stop_string_seen_in_earlier_text_is_not_matched_again():
    params = SamplingParams(stop=["end"])
    assert check_stop(params, (EOS,), [1, 1], "the end and more", len(" and more")) is None


def test_stop_string_beats_length_on_the_same_token():
    finish, _ = feed(SamplingParams(stop=["!"], max_tokens=2), [(1, "hi"), (1, " there!")])
    assert finish == Finish(FinishReason.STOP, "hi there", "!")


def test_max_tokens_finishes_with_length():
    finish, used = feed(SamplingParams(max_tokens=2), [(1, "a"), (1, "b"), (1, "c")])
    assert finish == Finish(FinishReason.LENGTH, "ab", None)
    assert used == 2


def test_streaming_holds_back_a_possible_stop_string_prefix():
    params = SamplingParams(stop=["STOP", "x"])
    assert streamable_text(params, "Hello ST") == "Hello"
    assert streamable_text(SamplingParams(), "Hello ST") == "Hello ST"


def test_streaming_shows_nothing_while_the_text_is_shorter_than_a_stop_string():
    params = SamplingParams(stop=["\nObservation:"])  # 13 characters: 12 held back
    shown = [streamable_text(params, "The answer is 42."[:n]) for n in range(18)]
    assert shown[:13] == [""] * 13 and shown[13:] == ["T", "Th", "The", "The ", "The a"]


def test_include_stop_str_in_output_keeps_the_stop_string_and_the_stop_tokens_text():
    """vLLM's ``include_stop_str_in_output``: the text ends with the stop string (what followed it
    in the same token still cut), and a stop token's text stays."""
    params = SamplingParams(stop=["###"], include_stop_str_in_output=True)
    finish, used = feed(params, [(1, "The answer"), (1, " is 4"), (1, "2.\n\n#"), (1, "## Next")])
    assert finish == Finish(FinishReason.STOP, "The answer is 42.\n\n###", "###") and used == 4
    finish, _ = feed(SamplingParams(stop_token_ids=[9], include_stop_str_in_output=True), [(5, "x"), (9, "<stop>")])
    assert finish == Finish(FinishReason.STOP, "x<stop>", 9)


def test_a_served_stop_string_is_kept_with_include_stop_str_in_output(llm):
    """On the engine: the greedy answer cut at a stop string taken from its own middle, the stop
    string kept when asked, and the same tokens either way."""
    prompt = {"prompt_token_ids": list(range(40, 60))}
    whole = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    stop = whole.text[len(whole.text) // 2:][:3]
    assert len(stop) == 3
    cut = whole.text.index(stop)
    outs = [llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                                                include_stop_str_in_output=keep))[0].outputs[0]
            for keep in (False, True)]
    assert [o.text for o in outs] == [whole.text[:cut], whole.text[:cut + len(stop)]]
    assert outs[0].token_ids == outs[1].token_ids and outs[0].stop_reason == outs[1].stop_reason == stop


def test_nothing_ends_the_output_before_min_tokens():
    """vLLM's ``min_tokens`` (v1): a stop token (which the sampler keeps from being drawn until
    then) ends the output from its ``min_tokens``-th token on, a stop string only in a later
    token's text."""
    params = SamplingParams(stop=["."], stop_token_ids=[9], min_tokens=3)
    finish, used = feed(params, [(1, "a."), (9, "<s>"), (1, "b."), (1, "c."), (1, "d")])
    assert finish == Finish(FinishReason.STOP, "a.<s>b.c", ".") and used == 4
    finish, used = feed(params, [(1, "a"), (1, "b"), (9, "<s>"), (1, "c")])
    assert finish == Finish(FinishReason.STOP, "ab", 9) and used == 3
