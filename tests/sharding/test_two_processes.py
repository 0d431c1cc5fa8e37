"""Two processes on loopback, 4 CPU devices each, joined by jax.distributed into one 8-device mesh."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from multidevice import HERE, ROOT, device_env
from models.qwen3_vl_moe import load_model
from two_process_worker import PROMPT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_form_one_mesh_and_give_unsharded_logits(shardable_checkpoint, tmp_path):
    reference = tmp_path / "reference.npy"
    np.save(reference, np.asarray(load_model(shardable_checkpoint).forward(PROMPT)))
    env = device_env(4) | {"MMSERVE_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}", "MMSERVE_NUM_PROCESSES": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "two_process_worker.py"), str(shardable_checkpoint), str(reference)],
            env=env | {"MMSERVE_PROCESS_ID": str(rank)}, cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    leader = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert leader["q_proj_processes"] == 2 and leader["q_proj_local_shards"] == 4
    assert leader["max_diff"] < 1e-5
    assert json.loads(outputs[1][0].strip().splitlines()[-1]) is None
