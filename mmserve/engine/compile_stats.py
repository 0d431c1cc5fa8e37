"""Counts XLA compilations in this process, and programs loaded from jax's persistent compilation
cache instead, from JAX's own monitoring events. A program loaded from the cache counts in both
(jax times the lookup as a backend compile)."""

from jax import monitoring

_COMPILED = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_counts = {_COMPILED: 0, _CACHE_HIT: 0}


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event == _COMPILED:
        _counts[_COMPILED] += 1


def _on_event(event: str, **kwargs) -> None:
    if event == _CACHE_HIT:
        _counts[_CACHE_HIT] += 1


monitoring.register_event_duration_secs_listener(_on_duration)
monitoring.register_event_listener(_on_event)


def compile_count() -> int:
    return _counts[_COMPILED]


def cache_hit_count() -> int:
    return _counts[_CACHE_HIT]
