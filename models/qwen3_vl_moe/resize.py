"""The sizes transformers resizes images and videos to, and the uint8 bicubic resize its videos go through.

`smart_resize` and `smart_resize_video` are transformers' size rules for Qwen3-VL. `resize_bicubic_uint8`
is torch's CPU antialiased bicubic on uint8 (int16 fixed-point weights), reimplemented in numpy because
PIL's bicubic (22-bit weights) differs from it by one level on up to ~1% of pixels.
"""

import math

import numpy as np


def _require_pixels(height: int, width: int) -> None:
    if min(height, width) < 1:
        raise ValueError(f"a picture needs at least one pixel each way, got {height}x{width}")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The image size transformers resizes to: multiples of `factor`, area within bounds, aspect kept."""
    _require_pixels(height, width)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_video(
    num_frames: int, height: int, width: int, factor: int, temporal_factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """The frame size transformers' Qwen3-VL video processor resizes to: the bounds count every frame."""
    if num_frames < temporal_factor:
        raise ValueError(f"a video needs at least {temporal_factor} frames, got {num_frames}")
    _require_pixels(height, width)
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be at most 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _bicubic_int16_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """torch's antialiased bicubic (a = -0.5) taps for one axis: first input index, int16 weights, precision.

    Computed in float64 in the same order as ATen's `_compute_index_ranges_int16_weights`, then
    quantised with the largest precision that keeps every weight within int16.
    """
    scale = in_size / out_size
    support = 2.0 * max(scale, 1.0)
    invscale = 1.0 / max(scale, 1.0)
    ksize = math.ceil(support) * 2 + 1
    center = scale * (np.arange(out_size) + 0.5)
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    xsize = np.clip(xmax - xmin, 0, ksize)
    taps = np.arange(ksize)
    x = np.abs(((xmin[:, None] + taps).astype(np.float64) - center[:, None] + 0.5) * invscale)
    w = np.where(x < 1.0, (1.5 * x - 2.5) * x * x + 1.0, np.where(x < 2.0, ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0, 0.0))
    w = np.where(taps < xsize[:, None], w, 0.0)
    total = np.zeros(out_size)
    for k in range(ksize):  # sequential sum, as in ATen, so the float64 weights agree to the last bit
        total += w[:, k]
    w = w / total[:, None]
    precision = 0
    while precision < 22 and int(0.5 + w.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = w * (1 << precision)
    weights = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
    return xmin, weights, precision


def _resample_axis(frame: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    in_size = frame.shape[axis]
    xmin, weights, precision = _bicubic_int16_weights(in_size, out_size)
    index = np.minimum(xmin[:, None] + np.arange(weights.shape[1]), in_size - 1)  # taps past the edge weigh 0
    shape = [1] * frame.ndim
    shape[axis] = out_size
    acc = np.full(
        [out_size if a == axis else n for a, n in enumerate(frame.shape)], 1 << (precision - 1), dtype=np.int32
    )
    for k in range(weights.shape[1]):
        acc += np.take(frame, index[:, k], axis=axis).astype(np.int32) * weights[:, k].reshape(shape)
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def resize_bicubic_uint8(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 frames [T, H, W, C] exactly as torch's CPU uint8 bicubic with antialias does.

    Horizontal pass first, rounded to uint8, then vertical, as ATen (and Pillow) order them.
    """
    out = []
    for frame in frames:
        if frame.shape[1] != width:
            frame = _resample_axis(frame, 1, width)
        if frame.shape[0] != height:
            frame = _resample_axis(frame, 0, height)
        out.append(frame)
    return np.stack(out)
