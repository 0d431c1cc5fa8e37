"""3-D MRoPE positions of a prompt (``get_rope_index``) and the rope delta for decode.

Text tokens advance all three axes together. A run of visual tokens for one image (or one video
frame; frames are separated by timestamp text) of merged grid (h, w) gets t = cur, h = cur + row,
w = cur + col, then ``cur`` advances by max(h, w). After the prompt, token ``i`` of the sequence
sits at position ``i + rope_delta`` on every axis.
"""

from __future__ import annotations

import itertools

import numpy as np

from models.qwen3_vl_moe.config import ModelConfig


def get_rope_index(
    input_ids,
    config: ModelConfig,
    image_grid_thw=None,
    video_grid_thw=None,
) -> tuple[np.ndarray, int]:
    """input_ids [S] -> (positions [3, S] int32, rope_delta)."""
    ids = np.asarray(input_ids).reshape(-1)
    merge = config.vision.spatial_merge_size
    kind = np.zeros(ids.shape, np.int64)
    kind[ids == config.image_token_id] = 1
    kind[ids == config.video_token_id] = 2
    grids = {
        1: iter(np.asarray(image_grid_thw).reshape(-1, 3).tolist() if image_grid_thw is not None else []),
        2: iter(_frames(video_grid_thw)),
    }
    parts, cur = [], 0
    for modality, run in itertools.groupby(kind.tolist()):
        n = len(list(run))
        if modality == 0:
            parts.append(np.broadcast_to(np.arange(cur, cur + n), (3, n)))
            cur += n
            continue
        grid = next(grids[modality], None)
        if grid is None:
            raise ValueError("more runs of visual placeholder tokens than grids given")
        _, h, w = grid[0], grid[1] // merge, grid[2] // merge
        if n != h * w:
            raise ValueError(f"a run of {n} visual tokens does not match grid {grid} ({h * w} tokens)")
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        parts.append(np.stack([np.full(n, cur), cur + rows.reshape(-1), cur + cols.reshape(-1)]))
        cur += max(h, w)
    positions = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
    delta = int(positions.max() + 1 - ids.shape[0]) if ids.size else 0
    return positions.astype(np.int32), delta


def _frames(video_grid_thw) -> list[list[int]]:
    """Each video frame (temporal patch) is its own visual run, with grid (1, h, w)."""
    if video_grid_thw is None:
        return []
    return [[1, h, w] for t, h, w in np.asarray(video_grid_thw).reshape(-1, 3).tolist() for _ in range(t)]


def decode_positions(cache_positions, rope_delta) -> np.ndarray:
    """Positions [..., 3] of tokens at the given cache positions, after a prompt with rope_delta."""
    pos = np.asarray(cache_positions) + np.asarray(rope_delta)
    return np.repeat(pos[..., None], 3, axis=-1).astype(np.int32)
