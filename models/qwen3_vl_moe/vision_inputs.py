"""Host-side, grid-dependent inputs of the vision tower.

Everything here depends only on the (t, h, w) grids, not on pixels, so it is computed once on the
host in NumPy and handed to the jitted tower as plain arrays. That keeps the tower's shapes static
(one compile per patch-count bucket) whatever mix of image sizes a batch holds.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from models.qwen3_vl_moe.config import VisionConfig


@dataclasses.dataclass(frozen=True)
class VisionInputs:
    """Per-patch tables, in the processor's merge-block patch order.

    interp_idx/interp_weight: 4 bilinear taps into the learned position table (align_corners=True).
    rope_pos: (row, col) of each patch for the 2-D rotary embedding.
    segment_ids: attention is confined to patches sharing a segment (one per image, one per frame).
    """

    interp_idx: np.ndarray  # [N, 4] int32
    interp_weight: np.ndarray  # [N, 4] float32
    rope_pos: np.ndarray  # [N, 2] int32
    segment_ids: np.ndarray  # [N] int32

    @property
    def num_patches(self) -> int:
        return int(self.segment_ids.shape[0])

    def padded(self, num_patches: int) -> VisionInputs:
        """Pads to a bucket; padding patches form one segment of their own and get no position."""
        pad = num_patches - self.num_patches
        if pad < 0:
            raise ValueError(f"cannot pad {self.num_patches} patches down to {num_patches}")
        last = int(self.segment_ids.max(initial=-1)) + 1
        return VisionInputs(
            interp_idx=np.pad(self.interp_idx, ((0, pad), (0, 0))),
            interp_weight=np.pad(self.interp_weight, ((0, pad), (0, 0))),
            rope_pos=np.pad(self.rope_pos, ((0, pad), (0, 0))),
            segment_ids=np.pad(self.segment_ids, (0, pad), constant_values=last),
        )


def _block_order_rows_cols(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each patch of an h x w grid listed in merge-block order."""
    rows = np.arange(h).reshape(h // merge, merge, 1, 1)
    cols = np.arange(w).reshape(1, 1, w // merge, merge)
    rows = np.broadcast_to(rows, (h // merge, merge, w // merge, merge)).transpose(0, 2, 1, 3)
    cols = np.broadcast_to(cols, (h // merge, merge, w // merge, merge)).transpose(0, 2, 1, 3)
    return rows.reshape(-1), cols.reshape(-1)


def _bilinear_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two taps and weights per target index, matching F.interpolate(bilinear, align_corners=True)."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    taps = floor.astype(np.int64)[:, None] + np.arange(2)
    weights = np.clip(1.0 - np.abs(src[:, None] - floor[:, None] - np.arange(2)), 0.0, None)
    return np.clip(taps, 0, side - 1), weights.astype(np.float32)


def vision_inputs(grid_thw: np.ndarray, config: VisionConfig) -> VisionInputs:
    """Builds the tables for images/videos with the given grids, in the order they are packed."""
    side = int(config.num_position_embeddings**0.5)
    merge = config.spatial_merge_size
    idx, weight, pos, seg = [], [], [], []
    segment = 0
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3).tolist():
        if h % merge or w % merge:
            raise ValueError(f"grid {(t, h, w)} is not a multiple of spatial_merge_size {merge}")
        rows, cols = _block_order_rows_cols(h, w, merge)
        r_taps, r_w = _bilinear_taps(rows, h, side)
        c_taps, c_w = _bilinear_taps(cols, w, side)
        frame_idx = (r_taps[:, :, None] * side + c_taps[:, None, :]).reshape(-1, 4)
        frame_w = (r_w[:, :, None] * c_w[:, None, :]).reshape(-1, 4)
        for _ in range(t):
            idx.append(frame_idx)
            weight.append(frame_w)
            pos.append(np.stack([rows, cols], axis=-1))
            seg.append(np.full(h * w, segment))
            segment += 1
    if not idx:
        raise ValueError("no grids given")
    return VisionInputs(
        interp_idx=np.concatenate(idx).astype(np.int32),
        interp_weight=np.concatenate(weight).astype(np.float32),
        rope_pos=np.concatenate(pos).astype(np.int32),
        segment_ids=np.concatenate(seg).astype(np.int32),
    )
