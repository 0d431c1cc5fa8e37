"""Placing visual embeddings and deepstack rows at the placeholder tokens of a prompt."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from models.qwen3_vl_moe.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class VisualPlacement:
    """Dense per-token visual inputs of one prompt: zero rows at text tokens."""

    embeds: jnp.ndarray  # [S, H]
    mask: np.ndarray  # [S] bool
    deepstack: jnp.ndarray  # [levels, S, H]


def place_visual(
    input_ids,
    config: ModelConfig,
    image=None,
    video=None,
) -> VisualPlacement | None:
    """image/video: (embeds [n, H], deepstack [levels, n, H]) for all images/videos of the prompt,
    in prompt order. Returns None for a text-only prompt."""
    ids = np.asarray(input_ids).reshape(-1)
    parts = [(config.image_token_id, image, "image"), (config.video_token_id, video, "video")]
    hidden = config.text.hidden_size
    levels = len(config.vision.deepstack_visual_indexes)
    embeds = jnp.zeros((ids.shape[0], hidden), jnp.float32)
    deepstack = jnp.zeros((levels, ids.shape[0], hidden), jnp.float32)
    mask = np.zeros(ids.shape, bool)
    for token, features, name in parts:
        where = np.flatnonzero(ids == token)
        count = 0 if features is None else features[0].shape[0]
        if where.size != count:
            raise ValueError(f"prompt has {where.size} {name} placeholder tokens but {count} {name} embeddings")
        if count:
            embeds = embeds.at[where].set(features[0].astype(jnp.float32))
            deepstack = deepstack.at[:, where].set(features[1].astype(jnp.float32))
            mask[where] = True
    if not mask.any():
        return None
    return VisualPlacement(embeds=embeds, mask=mask, deepstack=deepstack)
