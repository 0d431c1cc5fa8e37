"""plan_memory sizes the real Qwen3-VL-30B-A3B from its config alone."""

import subprocess
import sys

from multidevice import ROOT
from mmserve.distributed.memory_plan import plan_memory
from mmserve.distributed.mesh import MeshShape
from models.qwen3_vl_moe.config import ModelConfig

REAL_CONFIG = ROOT / "deploy" / "configs" / "qwen3-vl-30b-a3b-instruct.json"
GIB = 2**30


def test_real_config_has_31_07b_parameters_538_6m_in_vision():
    plan = plan_memory(ModelConfig.from_file(REAL_CONFIG), MeshShape(model=4, expert=2))
    assert round(plan.param_count / 1e9, 2) == 31.07
    assert round(plan.part("vision").elements / 1e6, 1) == 538.6
    assert plan.part("text").total_bytes + plan.part("vision").total_bytes == 2 * plan.param_count


def test_experts_split_over_expert_and_kv_replicated_past_four_ways():
    config = ModelConfig.from_file(REAL_CONFIG)
    tp4 = plan_memory(config, MeshShape(model=4), kv_tokens=4096)
    tp4_ep2 = plan_memory(config, MeshShape(model=4, expert=2), kv_tokens=4096)
    tp8 = plan_memory(config, MeshShape(model=8), kv_tokens=4096)
    kv_bytes = 2 * 48 * 4096 * 4 * 128 * 2
    assert tp4.part("kv_cache").total_bytes == kv_bytes
    assert tp4.part("kv_cache").device_bytes == kv_bytes // 4
    assert tp8.part("kv_cache").device_bytes == kv_bytes  # 4 KV heads cannot split 8 ways
    assert tp4_ep2.part("text").device_bytes < 0.6 * tp4.part("text").device_bytes


def test_script_prints_the_table():
    out = subprocess.run(
        [sys.executable, "scripts/plan_memory.py", "--model", str(REAL_CONFIG), "--mesh", "data=1,model=4,expert=4",
         "--kv-tokens", "131072", "--device-gib", "16"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    assert "mesh data=1,model=4,expert=4 (16 devices), bfloat16" in out
    assert "31.071B" in out and "538.6M" in out
    assert "KV cache, 131,072 tokens" in out and "left of 16 GiB per device" in out


def test_script_says_what_is_wrong_in_one_line():
    """Each was a traceback: a missing path, a bad mesh, a page size of 0 (ZeroDivisionError)."""
    for flags, reason in ((["--model", "/nonexistent", "--mesh", "model=1"], "No such file or directory"),
                          (["--model", "tiny", "--mesh", "model=x"], "bad size 'x'"),
                          (["--model", "tiny", "--mesh", "model=1", "--page-size", "0"], "must be >= 1")):
        done = subprocess.run([sys.executable, "scripts/plan_memory.py", *flags], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode != 0 and reason in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_mesh_axis_that_splits_no_parameter_is_named():
    """Such an axis replicates the whole model on its devices (legal, seldom meant): serve.py warns."""
    from mmserve.distributed.layout import MeshLayout
    from mmserve.distributed.memory_plan import _abstract_params

    config = ModelConfig.from_file(REAL_CONFIG)
    params = _abstract_params(config, "bfloat16")
    for mesh, idle in ((MeshShape(model=4, expert=2), []), (MeshShape(model=4, expert=3), ["expert"]),
                       (MeshShape(model=7, expert=2), ["model"])):
        layout = MeshLayout(mesh.abstract())
        assert layout.idle_axes(layout.params(config, params)) == idle, mesh
