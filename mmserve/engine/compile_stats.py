"""Counts XLA compilations in this process, from JAX's own monitoring events."""

from jax import monitoring

_EVENT = "/jax/core/compile/backend_compile_duration"
_count = 0


def _listener(event: str, duration: float, **kwargs) -> None:
    global _count
    if event == _EVENT:
        _count += 1


monitoring.register_event_duration_secs_listener(_listener)


def compile_count() -> int:
    return _count
