"""serve.py's command line: every flag documented, a bad engine setting or a missing cluster secret
refused before loading."""

import os
import subprocess
import sys

from mmserve.cluster_credential import SECRET_ENV, SECRET_FILE_ENV
from server_process import REPO, SERVE

FLAGS = ("--role", "--model", "--dtype", "--host", "--port", "--api-key-file", "--page-size", "--num-pages",
         "--kv-cache-bytes", "--max-model-len", "--max-num-seqs", "--max-prefill-tokens", "--max-body-bytes",
         "--request-read-timeout", "--max-image-pixels", "--max-images-per-request")


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


def test_bad_door_limit_is_refused_with_the_reason():
    result = _serve("--role", "colocated", "--max-body-bytes", "0")
    assert result.returncode == 2
    assert "--max-body-bytes: must be > 0" in result.stderr


def test_a_worker_without_the_cluster_secret_refuses_to_start():
    """Before loading anything: it could not prove itself to the router anyway."""
    env = {k: v for k, v in os.environ.items() if k not in (SECRET_ENV, SECRET_FILE_ENV)}
    result = subprocess.run([sys.executable, str(SERVE), "--role", "prefill", "--router-url", "127.0.0.1:1",
                             "--bootstrap", "tcp://127.0.0.1:2"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 2
    assert "no cluster secret" in result.stderr and SECRET_ENV in result.stderr
