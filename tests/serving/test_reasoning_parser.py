"""``--reasoning-parser qwen3``: a thinking answer's text inside <think> ... </think> is its
reasoning, the rest its content; whether the answer starts inside the block is read from the
prompt; streamed in pieces cut anywhere, the split is the whole answer's."""

import pytest

from mmserve.serving.router.reasoning_parser import ReasoningParser, Split, opens_thinking, split_reasoning

CASES = [
    # (the prompt opened the block, answer, reasoning, content)
    (True, "Two apples and one more.</think>\n\nThree.", "Two apples and one more.", "\n\nThree."),
    (True, "Cut short while thinking", "Cut short while thinking", ""),
    (True, "</think>Straight on.", "", "Straight on."),
    (True, "a < b and </thin is not the end</think>x", "a < b and </thin is not the end", "x"),
    (False, "<think>Let me see.</think>Yes.", "Let me see.", "Yes."),
    (False, "\n <think>Hm.</think>\nNo.", "Hm.", "\nNo."),
    (False, "No thinking here.", "", "No thinking here."),
    (False, "  <thin", "", "  <thin"),
    (False, "Later <think>is just text</think>", "", "Later <think>is just text</think>"),
    (False, "", "", ""),
    (True, "one</think>two</think>three", "one", "two</think>three"),
]


@pytest.mark.parametrize("opened, text, reasoning, content", CASES)
def test_whole_answer(opened, text, reasoning, content):
    assert split_reasoning(text, opened) == Split(reasoning, content)


@pytest.mark.parametrize("opened, text, reasoning, content", CASES)
def test_streamed_in_pieces_cut_anywhere_gives_the_whole_answer(opened, text, reasoning, content):
    for cut in range(len(text) + 1):
        parser = ReasoningParser(opened)
        got = parser.feed(text[:cut]).add(parser.feed(text[cut:])).add(parser.finish())
        assert got == Split(reasoning, content), cut
    parser = ReasoningParser(opened)
    got = Split()
    for character in text:
        got = got.add(parser.feed(character))
    assert got.add(parser.finish()) == Split(reasoning, content)


def test_reasoning_streams_before_the_block_closes():
    parser = ReasoningParser(True)
    assert parser.feed("First I count") == Split("First I count", "")
    assert parser.feed(" the legs.</th") == Split(" the legs.", "")  # "</th" may be the tag
    assert parser.feed("ink>Four.") == Split("", "Four.")


@pytest.mark.parametrize("tail, opened", [
    ("<|im_start|>assistant\n<think>\n", True),  # Qwen3-VL Thinking's generation prompt
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),  # thinking turned off in the prompt
    ("<|im_start|>assistant\n", False),  # an Instruct model's
    ("<think>old</think> then <think>\nagain", True),
])
def test_the_prompt_says_whether_the_answer_starts_inside_the_block(tail, opened):
    assert opens_thinking(tail) is opened
