"""Shared by every test folder: pytest puts this folder on sys.path, so ``hf_reference`` (the
transformers reference models and checkpoint writers) imports from any test."""

import os
import tempfile

import jax

from mmserve.engine.warmup import CACHE_ENV


def pytest_configure(config):
    """One compilation cache for the whole run, shared by the servers the tests start, so each
    program of a shape is compiled once per run, in a fresh directory (set the variable to keep
    one across runs).

    Not in this process: it builds engines of a dozen models and configurations, its in-memory
    caches already share their programs, and here (never in a server process) XLA:CPU crashed
    three times in five full runs while writing or reading an entry of a cache it shared with
    the servers (docs/status.md)."""
    os.environ.setdefault(CACHE_ENV, tempfile.mkdtemp(prefix="mmserve-jax-cache-"))
    jax.config.update("jax_enable_compilation_cache", False)
