"""The program grid: every shape a step can take is compiled, and a continuation attends over the
pages it needs (within a few buckets), not over ``max_model_len``."""

import pytest

from mmserve.engine.config import EngineConfig
from mmserve.engine.program_grid import CONTINUATION_WIDTH_STEP, ProgramGrid
from models.qwen3_vl_moe.tiny import tiny_config

CONFIG = EngineConfig(max_model_len=2048, page_size=16, max_prefill_tokens=512)


@pytest.fixture(scope="module")
def grid():
    return ProgramGrid.for_model(CONFIG, tiny_config())


@pytest.mark.parametrize("tokens", [16, 64, 512])
def test_a_continuation_runs_a_compiled_width_covering_its_context_and_not_much_more(grid, tokens):
    shapes = set(grid.prefill_shapes())
    for context in range(tokens + 1, CONFIG.max_model_len + 1, 7):
        width = grid.prefill_width(tokens, context)
        needed = -(-context // CONFIG.page_size)
        assert (1, tokens, width) in shapes
        assert needed <= width <= max(CONTINUATION_WIDTH_STEP * needed, grid.page_width(tokens))


def test_a_second_turn_of_a_short_chat_does_not_attend_over_the_whole_context(grid):
    assert grid.prefill_width(64, context=100) < grid.max_pages // 4
    assert grid.prefill_width(64, context=CONFIG.max_model_len) == grid.max_pages


def test_a_step_starting_at_token_zero_keeps_its_one_width(grid):
    assert grid.prefill_width(128) == grid.page_width(128)
