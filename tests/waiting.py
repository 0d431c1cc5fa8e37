"""Waiting in a test for something another thread or process does."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], bool], limit_s: float = 10.0, what: str = "condition not reached",
             poll_s: float = 0.02) -> None:
    """Returns once ``condition()`` holds; fails the test with ``what`` after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(poll_s)
