"""A request's stream of deltas, as the colocated backend and the decode role send it: joined, the
deltas are exactly the final output (tokens, logprobs, text), the text shown only ever grows, and
no text that a stop string later cuts is ever shown."""

import pytest

from mmserve import SamplingParams
from mmserve.engine.output_stream import OutputStream


def _stream(llm, prompt: str, params: SamplingParams):
    prepared = llm.engine.prepare(prompt)
    request_id = llm.engine.add_request(prepared, params)
    stream, deltas = OutputStream(params), []
    while llm.engine.has_unfinished():
        for output in llm.engine.step():
            assert output.request_id == request_id
            deltas.append(stream.delta(output))
            final = output
    return deltas, final.outputs[0]


@pytest.mark.parametrize("stop", [False, True, "long"], ids=["length", "stop_string", "long_stop_string"])
def test_joined_deltas_are_the_final_output(llm, stop):
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=2)
    free = _stream(llm, "Once upon a time", params)[1]
    if stop is True:  # stop two characters into the free output's second half: text must be held back
        params = SamplingParams(temperature=0, max_tokens=16, logprobs=2,
                                stop=(free.text[len(free.text) // 2:][:2],))
    elif stop == "long":  # half as long as the text, never matched: what is shown only grows
        params = SamplingParams(temperature=0, max_tokens=16, logprobs=2, stop=("\u2603" * (len(free.text) // 2),))
    deltas, final = _stream(llm, "Once upon a time", params)
    assert [t for d in deltas for t in d.token_ids] == final.token_ids
    assert [lp.token_id for d in deltas for lp in d.logprobs] == final.token_ids
    assert "".join(d.text_delta for d in deltas) == final.text == deltas[-1].text
    for before, after in zip(deltas, deltas[1:]):
        assert after.text.startswith(before.text)
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == (final.finish_reason, final.stop_reason)
    if stop is True:
        assert final.finish_reason == "stop" and final.stop_reason == params.stop[0]
