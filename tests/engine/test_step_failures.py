"""A step whose work raises part-way, after the model ran: the rows it had dealt with stay dealt with
(their outputs come with the failure), the row that raised and those after it fail, and every
request of the step lets go of its pages and slot, whatever raised (a finish hook: the prefill
role's, which ships the KV; or the read of a row). Before, a raising finish hook left the step's
other prompts holding their pages and slots with nothing left to compute (a prefill engine then
stepped them for ever) and the finished one scheduled again."""

import dataclasses

import pytest

from mmserve import SamplingParams
from mmserve.engine.engine import LLMEngine
from mmserve.engine.step_failed import StepFailed

PROMPTS = ["Describe a quiet harbour at dawn.", "Name three prime numbers.", "Say hello."]
FIRST_ONLY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def _engine(llm, **kwargs) -> LLMEngine:
    return LLMEngine(llm.model, dataclasses.replace(llm.engine.config, precompile=False), **kwargs)


def _assert_nothing_held(engine: LLMEngine):
    assert not engine.has_unfinished() and not engine.has_runnable()
    assert engine.kv.num_free_pages == engine.runner.num_pages - 1  # cached pages nobody holds count as free
    slots = [engine.reserve(f"slot-{i}", 1) for i in range(engine.config.max_num_seqs)]
    assert None not in slots, "a slot was not given back"
    for i, reservation in enumerate(slots):
        engine.cancel_reservation(f"slot-{i}", reservation.slot)


def test_a_finish_hook_raising_fails_the_rest_of_its_prefill_step_and_frees_it(llm):
    shipped = []

    def ship(request, page_table):
        shipped.append(request.request_id)
        if len(shipped) == 2:
            raise RuntimeError("the sender refused the KV")

    engine = _engine(llm, on_finish=ship, programs=frozenset({"prefill", "kv_read"}))
    ids = [engine.add_request(prompt, FIRST_ONLY, f"r{i}") for i, prompt in enumerate(PROMPTS)]
    with pytest.raises(StepFailed) as raised:
        while engine.has_unfinished():
            engine.step()
    assert shipped == ids[:2]  # all three prefilled in one step; the second's hook raised
    failure = raised.value
    assert failure.request_ids == ids[1:]
    assert [o.request_id for o in failure.outputs] == ids[:1] and failure.outputs[0].finished
    _assert_nothing_held(engine)


def test_a_row_raising_in_a_decode_read_hands_on_the_rows_before_it(llm, monkeypatch):
    engine = _engine(llm)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (2, 6, 6)]
    ids = [engine.add_request(prompt, sp, f"d{i}") for i, (prompt, sp) in enumerate(zip(PROMPTS, params))]
    while len(engine.scheduler.running) < 3 or any(r.num_computed < r.num_tokens - 1 for r in engine.scheduler.running):
        engine.step()  # every prompt prefilled: the next steps decode all three in one batch
    append = engine._append  # noqa: SLF001

    def appending(request, row, placeholder=False):
        if request.request_id == ids[2]:
            raise RuntimeError("a row that cannot be read")
        return append(request, row, placeholder=placeholder)

    monkeypatch.setattr(engine, "_append", appending)
    with pytest.raises(StepFailed) as raised:
        while engine.has_unfinished():
            engine.step()
    failure = raised.value
    assert sorted(failure.request_ids) == ids[1:]  # the rows still running fail with the one that raised
    assert [(o.request_id, o.finished) for o in failure.outputs] == [(ids[0], True)]  # finished in that read
    _assert_nothing_held(engine)
