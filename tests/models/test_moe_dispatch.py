"""Every MoE dispatch strategy equals transformers' sparse MoE block (fp32), on prefill- and
decode-sized batches, with routing ties, experts nobody picks and every token on the same experts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

from models.qwen3_vl_moe.config import TextConfig
from models.qwen3_vl_moe.moe import SparseMoeBlock
from models.qwen3_vl_moe.moe_dispatch import STRATEGIES, capacity_for, choose, dispatch

TOL = 2e-5
HIDDEN, EXPERTS, TOP_K, INTER = 32, 8, 2, 24


def hf_block(routing: str, seed: int = 0) -> Qwen3VLMoeTextSparseMoeBlock:
    config = Qwen3VLMoeTextConfig(hidden_size=HIDDEN, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                  moe_intermediate_size=INTER)
    torch.manual_seed(seed)
    block = Qwen3VLMoeTextSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        router, experts = block.gate.weight, block.experts
        if routing == "ties":  # experts 0 and 1 score alike for every token and compute alike
            router[1] = router[0]
            experts.gate_up_proj[1] = experts.gate_up_proj[0]
            experts.down_proj[1] = experts.down_proj[0]
        elif routing == "unused_experts":  # experts 4..7 never win: feature 0 is >= 1 (see inputs)
            router[4:] = 0
            router[4:, 0] = -1000.0
        elif routing == "all_on_two":  # every token picks experts 2 and 3: their groups are the whole batch
            router[:] = 0
            router[2:4, 0] = torch.tensor([50.0, 40.0])
    return block


def ours(block: Qwen3VLMoeTextSparseMoeBlock, strategy: str, valid=None):
    experts = block.experts
    params = {"gate": block.gate.weight.detach().numpy().T,
              "gate_up_proj": experts.gate_up_proj.detach().numpy().transpose(0, 2, 1),
              "down_proj": experts.down_proj.detach().numpy().transpose(0, 2, 1)}
    config = TextConfig(hidden_size=HIDDEN, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                        moe_intermediate_size=INTER)
    module = SparseMoeBlock(config, jnp.float32, strategy)
    run = jax.jit(lambda p, x: module.apply({"params": p}, x, valid))
    return lambda x: run(params, x)


def inputs(tokens: int, routing: str) -> np.ndarray:
    x = np.random.default_rng(tokens).normal(size=(1, tokens, HIDDEN)).astype(np.float32)
    if routing in ("unused_experts", "all_on_two"):
        x[..., 0] = np.abs(x[..., 0]) + 1  # the router's first column decides
    return x


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("routing", ["random", "ties", "unused_experts", "all_on_two"])
@pytest.mark.parametrize("tokens", [1, 2, 5, 96])
def test_strategy_equals_transformers(strategy, routing, tokens):
    block = hf_block(routing)
    x = inputs(tokens, routing)
    with torch.no_grad():
        want = block(torch.from_numpy(x)).numpy()
    got = np.asarray(ours(block, strategy)(x))
    assert np.abs(got - want).max() < TOL


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("tokens", [2, 5, 96])
def test_padding_tokens_reach_no_expert(strategy, tokens):
    """Tokens marked invalid (a padded batch's padding) come out zero; the others are unchanged."""
    block = hf_block("all_on_two")
    x = inputs(tokens, "all_on_two")
    valid = np.random.default_rng(tokens).random((1, tokens)) < 0.6
    valid[0, :2] = True, False  # at least one of each
    with torch.no_grad():
        want = block(torch.from_numpy(x)).numpy()
    got = np.asarray(ours(block, strategy, valid)(x))
    assert np.abs(got[valid] - want[valid]).max() < TOL
    assert not got[~valid].any()
    assert not np.asarray(ours(block, strategy, np.zeros((1, tokens), bool))(x)).any()


def test_grouped_covers_both_of_its_paths():
    """96 tokens x 2 choices over 8 experts: a batched pass of 24 rows per expert, and the rows
    past it (the 'all_on_two' case puts all 96 on each of two experts) in overflow tiles; five
    tokens: tiles only (one or two go to ``gathered``)."""
    assert capacity_for(96, TOP_K, EXPERTS) == 24
    assert capacity_for(5, TOP_K, EXPERTS) == 0


@pytest.mark.parametrize("strategy", ["grouped", "gathered"])
def test_an_empty_batch_gives_an_empty_output(strategy):
    x = np.zeros((0, HIDDEN), np.float32)
    top = np.zeros((0, TOP_K), np.int32)
    out = dispatch(strategy, x, top, top.astype(np.float32), np.zeros((EXPERTS, HIDDEN, 2 * INTER), np.float32),
                   np.zeros((EXPERTS, INTER, HIDDEN), np.float32))
    assert out.shape == (0, HIDDEN)


def test_auto_picks_grouped_only_on_an_unsharded_cpu_model():
    assert choose("auto", "cpu", sharded=False) == "grouped"
    assert choose("auto", "cpu", sharded=True) == "ragged_dot"
    assert choose("auto", "tpu", sharded=False) == "ragged_dot"
    assert choose("dense", "tpu", sharded=False) == "dense"
    with pytest.raises(ValueError, match="unknown MoE dispatch"):
        choose("fastest", "cpu", sharded=False)
