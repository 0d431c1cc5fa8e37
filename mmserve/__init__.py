"""mmserve: disaggregated serving of Qwen3-VL-MoE on JAX/XLA.

``LLM`` and ``SamplingParams`` load on first use (PEP 562), so that a server process can make
itself undumpable (:mod:`mmserve.core_dumps`) before jax loads: its environment holds the
cluster secret, readable through ``/proc/PID/environ`` by the user's other processes until then.
"""

from __future__ import annotations

import importlib

_WHERE = {"LLM": "mmserve.llm", "SamplingParams": "mmserve.sampling_params"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'mmserve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
