"""serve.py's command line: every flag documented, a bad engine setting refused before loading."""

import subprocess
import sys

from server_process import REPO, SERVE

FLAGS = ("--role", "--model", "--dtype", "--host", "--port", "--api-key", "--page-size", "--num-pages",
         "--kv-cache-bytes", "--max-model-len", "--max-num-seqs", "--max-prefill-tokens")


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SERVE), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_help_documents_every_flag():
    result = _serve("--help")
    assert result.returncode == 0
    for flag in FLAGS:
        assert flag in result.stdout, flag
    for role in ("encode", "prefill", "decode", "router", "colocated", "all"):
        assert role in result.stdout


def test_bad_engine_setting_is_refused_with_the_reason():
    result = _serve("--role", "colocated", "--page-size", "0")
    assert result.returncode == 2
    assert "page_size must be >= 1" in result.stderr
