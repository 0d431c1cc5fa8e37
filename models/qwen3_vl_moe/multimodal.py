"""Placing visual embeddings and deepstack rows at the placeholder tokens of a prompt.

This runs on the host in NumPy: prompt lengths vary, and device ops over varying shapes would
compile once per length.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from models.qwen3_vl_moe.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class VisualPlacement:
    """Dense per-token visual inputs of one prompt: zero rows at text tokens."""

    embeds: np.ndarray  # [S, H]
    mask: np.ndarray  # [S] bool
    deepstack: np.ndarray  # [levels, S, H]


def place_visual(
    input_ids,
    config: ModelConfig,
    image=None,
    video=None,
) -> VisualPlacement | None:
    """image/video: (embeds [n, H], deepstack [levels, n, H]) for all images/videos of the prompt,
    in prompt order (host or device arrays). Returns None for a text-only prompt."""
    ids = np.asarray(input_ids).reshape(-1)
    parts = [(config.image_token_id, image, "image"), (config.video_token_id, video, "video")]
    hidden = config.text.hidden_size
    levels = len(config.vision.deepstack_visual_indexes)
    embeds = np.zeros((ids.shape[0], hidden), np.float32)
    deepstack = np.zeros((levels, ids.shape[0], hidden), np.float32)
    mask = np.zeros(ids.shape, bool)
    for token, features, name in parts:
        where = np.flatnonzero(ids == token)
        count = 0 if features is None else features[0].shape[0]
        if where.size != count:
            raise ValueError(f"prompt has {where.size} {name} placeholder tokens but {count} {name} embeddings")
        if count:
            embeds[where] = np.asarray(features[0], np.float32)
            deepstack[:, where] = np.asarray(features[1], np.float32)
            mask[where] = True
    if not mask.any():
        return None
    return VisualPlacement(embeds=embeds, mask=mask, deepstack=deepstack)
