"""Killing a process with SIGKILL and checking that the processes it started died with it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that never comes, in a container, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def assert_die_with(parent: subprocess.Popen, pids: list[int], what: str, timeout_s: float = 10) -> None:
    """Kills ``parent`` with SIGKILL; each of ``pids`` must be gone within ``timeout_s``."""
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + timeout_s
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids), what


def reap(parent: subprocess.Popen, pids: list[int]) -> None:
    """Whatever a failed check left: the parent and every child still running."""
    parent.kill()
    parent.wait()
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
