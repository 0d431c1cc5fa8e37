"""A server process can leave no core file (nor a core piped to a crash handler) holding its secrets."""

import subprocess
import sys

PROBE = """
import ctypes, resource
from mmserve.core_dumps import forbid_core_dumps
forbid_core_dumps()
print(resource.getrlimit(resource.RLIMIT_CORE), ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))  # 3: PR_GET_DUMPABLE
"""


def test_forbid_sets_no_core_size_and_not_dumpable():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["(0,", "0)", "0"]


BEFORE_JAX = """
import ctypes, importlib.abc, runpy, sys
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "jax" and not seen:
            seen.append(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))  # 3: PR_GET_DUMPABLE, as jax starts loading
        return None
sys.meta_path.insert(0, Watch())
sys.argv = ["serve.py", "--help"]
try:
    runpy.run_path(sys.argv_path, run_name="__main__")
except SystemExit:
    pass
print("dumpable when jax loaded:", seen)
"""


def test_serve_is_undumpable_before_jax_loads():
    """A server's environment holds the cluster secret, which the user's other processes could read
    in /proc/PID/environ while it was dumpable: through jax's import (seconds), before it was not."""
    from pathlib import Path

    serve = Path(__file__).resolve().parents[2] / "scripts" / "serve.py"
    probe = BEFORE_JAX.replace("sys.argv_path", repr(str(serve)))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "dumpable when jax loaded: [0]" in out, out[-500:]
