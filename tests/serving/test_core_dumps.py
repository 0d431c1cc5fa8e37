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
