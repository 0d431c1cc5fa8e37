"""The test helper ``Cluster`` leaves no process behind: ``stop`` ends every process it ever started
(one a restart replaced too), and a test process that dies without stopping it (killed by a
timeout, say) takes its processes with it."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import Cluster
from orphans import assert_die_with, reap

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
STARTED_S = 120
"""Time for a worker to start serving on a busy 2-core machine (nothing to compile: encode, tiny)."""


def _wait_serving(log: Path) -> None:
    deadline = time.monotonic() + STARTED_S
    while "serving on" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, f"the worker did not start: {log.read_text() if log.exists() else ''}"
        time.sleep(0.5)


def test_stop_ends_a_process_that_a_restart_replaced(tmp_path):
    cluster = Cluster("tiny", tmp_path)
    try:
        cluster.start_worker("encode")
        first = cluster.processes["encode"]
        cluster.start_worker("encode", name="encode-again")  # the first is still running
        assert cluster.processes["encode"] is not first and first.poll() is None
    finally:
        cluster.stop()
    assert [process.poll() is not None for process in cluster.started] == [True, True]


def test_a_cluster_dies_with_its_test_process(tmp_path):
    """A test process killed with SIGKILL (no finally, no fixture teardown runs) takes its
    cluster's processes with it."""
    code = (f"import json, sys, time; from pathlib import Path; sys.path.insert(0, {str(HERE)!r}); "
            f"from cluster import Cluster; c = Cluster('tiny', Path({str(tmp_path)!r})); c.start_worker('encode'); "
            "print(json.dumps([p.pid for p in c.started]), flush=True); time.sleep(600)")
    test = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": str(HERE.parents[1])})
    workers = []
    try:
        workers = json.loads(test.stdout.readline())
        _wait_serving(tmp_path / "encode.log")
        assert_die_with(test, workers, "the cluster outlived its test process")
    finally:
        reap(test, workers)
