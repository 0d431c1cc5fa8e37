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


@pytest.mark.parametrize("max_model_len", [48, 256, 300])
def test_a_context_shorter_than_the_prefill_budget_keeps_every_shape_within_it(max_model_len):
    """``--max-model-len 256`` with the default 512-token prefill budget failed while building
    its grid (a 512-token bucket spans more pages than a sequence holds)."""
    config = EngineConfig(max_model_len=max_model_len, page_size=16, max_prefill_tokens=512)
    grid = ProgramGrid.for_model(config, tiny_config())
    shapes = set(grid.prefill_shapes())
    assert all(tokens <= grid.max_chunk_tokens and width <= grid.max_pages for _, tokens, width in shapes)
    longest = max_model_len - 1  # the longest prompt the context takes
    tokens = grid.prefill_tokens(longest)
    assert (1, tokens, grid.prefill_width(tokens)) in shapes
    assert (1, 16, grid.prefill_width(16, context=longest)) in shapes  # its last token, after a cached prefix
