"""The compiled-grammar cache and the checked-spec memory hold what a request sent only as long as
it is in use: they keep digests, not a schema's text (a client's megabytes of description stayed in
memory after their requests ended, 256 of them), and compiled grammars up to a memory budget."""

import gc
import tracemalloc

import pytest

from mmserve.structured_output import grammars as grammars_module
from mmserve.structured_output.grammars import Grammars
from mmserve.structured_output.spec import StructuredOutput
from models.qwen3_vl_moe.tiny_tokenizer import TINY_SPECIAL_IDS, build_tiny_tokenizer


@pytest.fixture(scope="module")
def grammars():
    made = Grammars(build_tiny_tokenizer(), 1011, [TINY_SPECIAL_IDS["<|im_end|>"]])
    yield made
    made.close()


def described(i: int, size: int) -> StructuredOutput:
    """A schema whose text is ``size`` characters of description, which the grammar ignores."""
    return StructuredOutput.from_schema({"type": "object", "description": f"{i}:" + "x" * size})


def test_schemas_leave_no_text_behind_once_compiled(grammars):
    spec = described(-1, 10)
    spec.check()
    grammars.submit(spec).result()
    del spec
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(8):
            spec = described(i, 1 << 20)
            spec.check()
            grammars.submit(spec).result()
            del spec
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 1 << 20, f"{kept} bytes kept after 8 schemas of 1 MiB each"


def test_compiled_grammars_are_kept_up_to_a_memory_budget(grammars, monkeypatch):
    consts = [StructuredOutput.from_schema({"const": f"{i}" + "y" * 20_000}) for i in range(5)]
    one = grammars.submit(consts[0]).result().memory_size_bytes
    assert one > 1 << 20  # the premise: each is megabytes
    monkeypatch.setattr(grammars_module, "MAX_CACHED_GRAMMAR_BYTES", int(2.5 * one))
    futures = [grammars.submit(spec) for spec in consts]
    for future in futures:
        future.result()
    assert grammars.cached_bytes <= 2.5 * one
    assert grammars.submit(consts[-1]) is futures[-1]  # the newest stay cached
    assert grammars.submit(consts[0]) is not futures[0]  # the oldest went, and compile again
