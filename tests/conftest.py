"""Shared by every test folder: pytest puts this folder on sys.path, so ``hf_reference`` (the
transformers reference models and checkpoint writers) imports from any test."""

import gc
import os
import tempfile

import jax
import pytest

from mmserve.engine.warmup import CACHE_ENV


def pytest_configure(config):
    """One compilation cache for the whole run, shared by the servers the tests start, so each
    program of a shape is compiled once per run, in a fresh directory (set the variable to keep
    one across runs).

    Not in this process: it builds engines of a dozen models and configurations, and its
    in-memory caches already share their programs."""
    os.environ.setdefault(CACHE_ENV, tempfile.mkdtemp(prefix="mmserve-jax-cache-"))
    jax.config.update("jax_enable_compilation_cache", False)


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """Frees every compiled program after each test module. XLA:CPU maps each program's code in
    ~170 memory regions, so the hundreds of programs the engines of a whole run compile in this
    one process passed the kernel's vm.max_map_count (65530) and it crashed (segfault or abort
    inside a compile, 45% into the run). Engines kept across modules compile again on use."""
    yield
    gc.collect()
    jax.clear_caches()
    gc.collect()
