"""The sampling a checkpoint's authors recommend: ``generation_config.json``'s sampling keys.

Qwen3-VL's Instruct checkpoints ship ``temperature 0.7, top_p 0.8, top_k 20``; vLLM (its
``--generation-config auto``, the default) and transformers' ``generate`` both sample with them
when a request does not say otherwise. Only the keys both know are taken; ``do_sample`` is not
(vLLM does not read it either: a request's temperature decides).
"""

from __future__ import annotations

import json
from pathlib import Path

FILE = "generation_config.json"
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(path: Path) -> dict[str, float | int]:
    """The checkpoint's recommended sampling, by ``SamplingParams`` field ({} without the file)."""
    file = Path(path) / FILE
    if not file.is_file():
        return {}
    config = json.loads(file.read_text(encoding="utf-8"))
    return {key: config[key] for key in SAMPLING_KEYS
            if isinstance(config.get(key), (int, float)) and not isinstance(config.get(key), bool)}
