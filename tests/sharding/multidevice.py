"""Helpers of the sharding tests: multi-device tests run in subprocesses with their own CPU device count.

``--xla_force_host_platform_device_count`` only takes effect before JAX creates its CPU client,
and the other test folders share this pytest process (and may already have created it with one
device). So the tests that need 8 devices start a worker with the flag in its environment, and
the tests that need none (rules, plans, manifests) run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
TESTS = ROOT / "tests"

# Splittable on every test mesh: 8 heads, 4 KV heads (split 4-way, replicated 8-way), 8 experts.
SHARDABLE_TEXT = dict(num_attention_heads=8, num_key_value_heads=4, num_experts=8)


def device_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_worker(script: str, *args, devices: int, timeout: float = 300) -> dict:
    """Runs ``tests/sharding/<script>`` with ``devices`` CPU devices; returns the JSON it prints last."""
    proc = subprocess.run(
        [sys.executable, str(HERE / script), *map(str, args)],
        env=device_env(devices), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
