"""Compiling a process's whole program grid before it serves, with a progress bar and one summary
line, and jax's persistent compilation cache that makes the next start fast."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
from tqdm import tqdm

from mmserve.engine.compile_stats import cache_hit_count, compile_count

log = logging.getLogger("mmserve")

CACHE_ENV = "MMSERVE_COMPILATION_CACHE"


def default_cache_dir() -> str:
    """``$MMSERVE_COMPILATION_CACHE``, else ``$XDG_CACHE_HOME/mmserve/jax`` (``~/.cache/...``)."""
    if CACHE_ENV in os.environ:
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return str(Path(base) / "mmserve" / "jax")


def use_compilation_cache(path: str | None) -> None:
    """Keeps every compiled program in ``path`` (jax's persistent cache; '' or None: off), so a
    restart loads them instead of compiling. Process-wide; call before the first compile."""
    if not path:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def compile_programs(programs: Sequence[Callable[[], None]], what: str) -> None:
    """Runs each compiling callable, showing progress on a terminal, then logs how many programs
    XLA compiled, how many came from the persistent cache, and how long it all took."""
    start, compiled, loaded = time.monotonic(), compile_count(), cache_hit_count()
    for program in tqdm(programs, desc=f"compiling {what}", unit="step", disable=None, leave=False):
        program()
    loaded = cache_hit_count() - loaded
    log.info("%s: %d programs compiled, %d loaded from the compilation cache, in %.1f s", what,
             compile_count() - compiled - loaded, loaded, time.monotonic() - start)
    warn_if_near_map_limit()


MAP_LIMIT = Path("/proc/sys/vm/max_map_count")


def warn_if_near_map_limit() -> None:
    """XLA:CPU maps each compiled program's code in ~170 memory regions; a process past the
    kernel's ``vm.max_map_count`` crashes in its next compile or allocation. Warns at half of it
    (Linux only), so a big bucket grid is a log line and not a crash later."""
    try:
        limit = int(MAP_LIMIT.read_text())
        with open("/proc/self/maps", "rb") as maps:
            used = sum(1 for _ in maps)
    except (OSError, ValueError):
        return
    if used > limit // 2:
        log.warning("this process has %d memory mappings of the kernel's limit of %d (vm.max_map_count); "
                    "compiled programs take ~170 each: raise the limit (sysctl -w vm.max_map_count=262144) "
                    "or shrink the bucket grid (--max-num-seqs, --max-prefill-tokens, --max-prefill-seqs)",
                    used, limit)
