"""Decode's own prefix cache: a request prefilled elsewhere reserves the pages of the longest prefix
decode still holds (a chat's earlier turns, their generated tokens included), receives KV rows for
the rest of its prompt only, and generates exactly what an engine without any cache generates.

One engine plays prefill (its KV rows read as the prefill role reads them), another plays decode
(``reserve`` with the prompt's page keys at its own page size, then ``admit_prefilled`` with the
rows past the held tokens, as the receiver hands them over); the reference is an engine with the
cache off."""

import dataclasses

import numpy as np
import pytest

from conftest import random_image
from hf_reference import IMAGE_ID, VISION_END, VISION_START
from mmserve import LLM, SamplingParams
from mmserve.engine.buckets import bucket
from mmserve.engine.config import EngineConfig
from mmserve.engine.engine import LLMEngine
from mmserve.engine.kv_rows import KVRows
from mmserve.engine.page_hash import prompt_page_keys
from mmserve.engine.request import Request
from models.qwen3_vl_moe import load_model

PREFILL_PAGE, DECODE_PAGE = 8, 16  # decode keys pages at its own size
IMAGE = [VISION_START, IMAGE_ID, VISION_END]
NO_POSITIONS = np.zeros((3, 0), np.int32)
PARAMS = {"greedy": SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
          "seeded": SamplingParams(temperature=1.0, top_k=50, seed=7, repetition_penalty=1.5, max_tokens=12,
                                    ignore_eos=True)}


def text(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 800, n)]


class Split:
    def __init__(self, checkpoint):
        config = EngineConfig(num_pages=256, max_model_len=512, max_prefill_tokens=64, precompile=False)
        self.shipped = {}
        model = load_model(checkpoint)
        self.prefill = LLMEngine(model, dataclasses.replace(config, page_size=PREFILL_PAGE), on_finish=self._ship)
        self.decode = LLMEngine(model, dataclasses.replace(config, page_size=DECODE_PAGE))
        self.ids = iter(range(10**6))

    def _ship(self, request, page_table):
        rows = self.prefill.runner.read_kv(page_table, request.num_computed, bucket(request.num_computed, 16))
        self.shipped[request.request_id] = (request, *rows)

    def generate(self, prompt, params: SamplingParams) -> tuple[list[int], int]:
        """(output tokens, prompt tokens decode held already) of one prompt through the split."""
        rid = f"r{next(self.ids)}"
        self.prefill.add_request(prompt, dataclasses.replace(params, max_tokens=1), rid)
        while rid not in self.shipped:
            self.prefill.step()
        prefilled, k, v = self.shipped.pop(rid)
        prepared = self.decode.prepare(prompt)
        keys = prompt_page_keys(prepared, self.decode.model, DECODE_PAGE)
        ids = prepared.token_ids
        reservation = self.decode.reserve(rid, len(ids) + params.max_tokens, ids, keys)
        held = reservation.held_tokens
        request = Request(rid, list(ids), params, NO_POSITIONS, prefilled.rope_delta, None, num_computed=len(ids),
                          page_keys=keys)
        first = (prefilled.output_ids[0], None, None, None)
        output = self.decode.admit_prefilled(request, reservation, [KVRows(k[held:], v[held:], held, len(ids) - held)],
                                             first)
        while not output.finished:
            output = next((o for o in self.decode.step() if o.request_id == rid), output)
        return output.outputs[0].token_ids, held

    def assert_nothing_held(self):
        kv = self.decode.kv
        assert not self.decode.has_unfinished()
        assert kv.num_free_pages == self.decode.runner.num_pages - 1
        assert kv.num_evictable_pages == kv.num_cached_pages + kv.num_tail_pages and kv.num_cached_pages > 0


@pytest.fixture(scope="module")
def split(reference):
    return Split(reference[1])


@pytest.fixture(scope="module")
def off(reference):
    return LLM(reference[1], num_pages=256, page_size=PREFILL_PAGE, max_model_len=512, max_prefill_tokens=64,
               enable_prefix_caching=False, precompile=False)


def tokens(llm, prompt, params) -> list[int]:
    return llm.generate(prompt, params)[0].outputs[0].token_ids


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_a_second_turn_receives_only_what_decode_does_not_hold(split, off, sampling):
    params = PARAMS[sampling]
    seed = {"greedy": 0, "seeded": 1000}[sampling]  # each its own content: neither finds the other's pages
    image = random_image(60 + seed, (96, 128))  # 12 image tokens
    turn1 = {"prompt_token_ids": text(61 + seed, 21) + IMAGE + text(62, 30),
             "multi_modal_data": {"image": image}}
    answer, held = split.generate(turn1, params)
    assert held == 0 and answer == tokens(off, turn1, params)
    ids = split.decode.prepare(turn1).token_ids
    turn2 = {"prompt_token_ids": turn1["prompt_token_ids"] + answer + text(63, 9), "multi_modal_data": {"image": image}}
    got, held = split.generate(turn2, params)
    # Turn 1's prompt (written as it arrived) and its answer (written as decoded, but for the last
    # token, which never got its KV) are decode's own pages now: full pages cached, the partial
    # last one kept as a tail, so that only turn 2's new tokens arrive.
    assert (len(ids) + len(answer) - 1) % DECODE_PAGE  # else the case could not tell a tail from a full page
    assert held == len(ids) + len(answer) - 1
    assert got == tokens(off, turn2, params)
    split.assert_nothing_held()


def test_the_same_text_about_another_picture_holds_only_the_pages_before_it(split, off):
    params = PARAMS["greedy"]
    ids = text(70, DECODE_PAGE + 5) + IMAGE + text(71, 40)  # the image starts in decode's page 1
    a = {"prompt_token_ids": ids, "multi_modal_data": {"image": random_image(72, (96, 128))}}
    b = {"prompt_token_ids": ids, "multi_modal_data": {"image": random_image(73, (96, 128))}}
    want_a, want_b = tokens(off, a, params), tokens(off, b, params)
    assert want_a != want_b  # else the case could not tell a wrongly shared page
    assert split.generate(a, params) == (want_a, 0)
    assert split.generate(b, params) == (want_b, DECODE_PAGE)
    got, held = split.generate(a, params)
    assert got == want_a and held > 3 * DECODE_PAGE
    split.assert_nothing_held()


def test_a_cancelled_reservation_gives_back_the_cached_pages_it_shared(split):
    params = PARAMS["greedy"]
    prompt = {"prompt_token_ids": text(80, 3 * DECODE_PAGE + 2)}
    split.generate(prompt, params)
    prepared = split.decode.prepare(prompt)
    keys = prompt_page_keys(prepared, split.decode.model, DECODE_PAGE)
    kv = split.decode.kv
    cached, evictable, tails = kv.num_cached_pages, kv.num_evictable_pages, kv.num_tail_pages
    for _ in range(2):  # a cancelled reservation gives back the tail it took: the next one finds it
        reservation = split.decode.reserve("cancelled", len(prepared.token_ids) + 4, prepared.token_ids, keys)
        # The 3 full pages and the first token of the 4th (the last token is always sent), from the
        # partial last page the first run left.
        assert reservation.held_tokens == 3 * DECODE_PAGE + 1
        assert kv.num_evictable_pages == evictable - 4  # held by the reservation, not evictable
        split.decode.cancel_reservation("cancelled", reservation.slot)
        assert (kv.num_cached_pages, kv.num_tail_pages) == (cached, tails)
    assert split.generate(prompt, params)[1] == 3 * DECODE_PAGE + 1
    split.assert_nothing_held()


@pytest.mark.parametrize("fault", ["short", "gap"])
def test_rows_the_engine_refuses_give_their_reservation_back(split, fault):
    """The reservation is the engine's once offered: KV rows that end before the prompt does, or
    leave a gap, are refused with a ValueError and the pages and slot they were to fill are free
    again, so the same request id can reserve anew and run."""
    params = PARAMS["greedy"]
    prompt = {"prompt_token_ids": text(90 + len(fault), 2 * DECODE_PAGE + 5)}
    ids = split.decode.prepare(prompt).token_ids
    kv, slots = split.decode.kv, len(split.decode.scheduler._free_slots)
    free = kv.num_free_pages
    reservation = split.decode.reserve("refused", len(ids) + params.max_tokens, ids, None)
    k, v = split.decode.runner.read_kv(kv.page_table("refused"), len(ids), bucket(len(ids), 16))  # rows of the right shape
    runs = ([KVRows(k, v, 0, len(ids) - 1)] if fault == "short" else
            [KVRows(k, v, 0, 8), KVRows(k, v, 9, len(ids) - 9)])
    request = Request("refused", list(ids), params, NO_POSITIONS, 0, None, num_computed=len(ids))
    with pytest.raises(ValueError, match="KV rows"):
        split.decode.admit_prefilled(request, reservation, runs, (1, None, None, None))
    assert (kv.num_free_pages, len(split.decode.scheduler._free_slots)) == (free, slots)
    assert "refused" not in kv and not split.decode.has_unfinished()
    split.decode.cancel_reservation("refused", split.decode.reserve("refused", len(ids), ids, None).slot)
    split.assert_nothing_held()
