"""Shared by every test folder: pytest puts this folder on sys.path, so ``hf_reference`` (the
transformers reference models and checkpoint writers) imports from any test."""

import gc
import os
import shutil
import signal
import tempfile
from pathlib import Path

import jax
import pytest

from mmserve.engine.warmup import CACHE_ENV, use_compilation_cache


REPO = Path(__file__).resolve().parents[1]
NO_OPTIMIZATIONS_ENV = "JAX_DISABLE_MOST_OPTIMIZATIONS"
_OWN_CACHE: list[str | None] = [None]


def _true(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def pytest_configure(config):
    """The servers and peers the tests start import this checkout's code, whatever an editable
    install points at (a clone's tests once ran another tree's servers, or none at all).

    One compilation cache for the whole run, shared by the servers the tests start, so each
    program of a shape is compiled once per run, in a fresh directory (set the variable to keep
    one across runs). Under pytest-xdist (``-n 2``) the controller makes it before it starts its
    workers, which inherit the variable and share it.

    This process uses it too (as ``LLM`` does by default): it frees every compiled program after
    each module (below), so an engine kept across modules, or one of the same shapes built again,
    loads its programs from there instead of compiling them again. (A half-written entry that a
    process reads while another writes it is an error jax reports as a warning, then compiles.)"""
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    # XLA compiles the tests' programs with its cheapest optimisation level, here and in the servers
    # they start: the tiny models run in microseconds, compiling them is most of the suite's time
    # (16.5 min instead of 19-21). The model's parity with transformers runs optimised, as served
    # (tests/models/conftest.py). JAX_DISABLE_MOST_OPTIMIZATIONS=false runs everything optimised.
    os.environ.setdefault(NO_OPTIMIZATIONS_ENV, "true")
    jax.config.update("jax_disable_most_optimizations", _true(os.environ[NO_OPTIMIZATIONS_ENV]))
    if CACHE_ENV not in os.environ:  # this run's own, removed when it ends (pytest_unconfigure)
        os.environ[CACHE_ENV] = _OWN_CACHE[0] = tempfile.mkdtemp(prefix="mmserve-jax-cache-")
    use_compilation_cache(os.environ[CACHE_ENV])


def pytest_unconfigure(config):
    """Each run's compiled programs (tens to hundreds of MB) were left in /tmp for good."""
    if _OWN_CACHE[0]:
        shutil.rmtree(_OWN_CACHE[0], ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """Frees every compiled program after a test module once this process maps many regions.
    XLA:CPU maps each program's code in ~170 memory regions, so the hundreds of programs the
    engines of a whole run compile in this one process passed the kernel's vm.max_map_count
    (65530) and it crashed (segfault or abort inside a compile, 45% into the run). Engines kept
    across modules then load their programs again on use."""
    yield
    if _mapped_regions() > MAX_MAPPED_REGIONS:
        gc.collect()
        jax.clear_caches()
        gc.collect()


MAX_MAPPED_REGIONS = 24_000
"""Past this many memory mappings (~140 programs) the compiled programs go after a module; below,
they stay for the next modules (the engine tests share one engine, whose programs were loaded
again from the compilation cache in every module when they went after each)."""


def _mapped_regions() -> int:
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:  # not Linux: no count, so free them each time
        return MAX_MAPPED_REGIONS + 1


def pytest_sessionfinish(session, exitstatus):
    """Every fixture has been torn down by now: a ``serve.py`` this process started and still runs
    was left by a test (its servers would die with this process anyway, MMSERVE_PARENT_PID, but
    the leak is a bug to name). Each is named, killed, and the run fails."""
    left = _serve_children()
    if left:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_sep("=", "serve.py processes left running after every fixture's teardown (killed now)",
                               red=True)
            for pid, argv in left.items():
                reporter.write_line(f"  {pid}: {argv[:300]}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _serve_children() -> dict[int, str]:
    """This process's live children running scripts/serve.py: pid -> command line."""
    me, found = os.getpid(), {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rpartition(")")[2].split()[:2]
            argv = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(ppid) == me and state not in ("Z", "X") and "serve.py" in argv:
            found[int(stat.parent.name)] = argv
    return found
