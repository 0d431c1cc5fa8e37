"""The keys of `preprocessor_config.json` and `video_preprocessor_config.json` that change the pixels.

`ImageConfig` and `VideoConfig` read and write them as transformers does (`from_hf` / `to_hf`), with
Qwen3-VL's hub values as defaults, so that a saved config loads into transformers' processors unchanged.
"""

import dataclasses
from collections.abc import Sequence

from PIL import Image


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """The keys of a `preprocessor_config.json` that change the pixels; defaults are Qwen3-VL's hub values."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536  # size["shortest_edge"]: a bound on h * w, not an edge
    max_pixels: int = 16777216  # size["longest_edge"]
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC.value
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    def __post_init__(self):
        if min(self.patch_size, self.temporal_patch_size, self.merge_size) < 1:
            raise ValueError(f"patch sizes must be positive: {self}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0 in self.image_std:
            raise ValueError(f"need 3 image_mean and 3 non-zero image_std values: {self.image_mean}, {self.image_std}")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_hf(cls, config: dict) -> "ImageConfig":
        """Reads HF keys; like `Qwen2VLImageProcessor`, top-level min_pixels / max_pixels override `size`."""
        fields = _pixel_fields(cls, config)
        for key in ("min_pixels", "max_pixels"):
            if config.get(key) is not None:
                fields[key] = config[key]
        return cls(**fields)

    def to_hf(self) -> dict:
        return {
            **_hf_pixel_keys(self),
            "image_processor_type": "Qwen2VLImageProcessor",
            "do_convert_rgb": True,
        }


@dataclasses.dataclass(frozen=True)
class VideoConfig(ImageConfig):
    """The keys of a `video_preprocessor_config.json`; defaults are Qwen3-VL's hub values."""

    min_pixels: int = 4096  # bounds on t * h * w over the sampled frames
    max_pixels: int = 25165824
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 768
    do_sample_frames: bool = True
    """False: every frame of a video file is kept (transformers' ``do_sample_frames``)."""

    @classmethod
    def from_hf(cls, config: dict) -> "VideoConfig":
        fields = _pixel_fields(cls, config)
        for key, kind in (("fps", float), ("min_frames", int), ("max_frames", int), ("max_video_tokens", int)):
            if config.get(key) is not None:
                fields[key] = kind(config[key])
        fields["cap_pixels_per_frame"] = bool(config.get("cap_pixels_per_frame"))
        fields["do_sample_frames"] = bool(config.get("do_sample_frames", True))
        return cls(**fields)

    def to_hf(self) -> dict:
        return {
            **_hf_pixel_keys(self),
            "video_processor_type": "Qwen3VLVideoProcessor",
            "do_convert_rgb": True,
            "do_sample_frames": self.do_sample_frames,
            "fps": self.fps,
            "min_frames": self.min_frames,
            "max_frames": self.max_frames,
            "cap_pixels_per_frame": self.cap_pixels_per_frame,
            "max_video_tokens": self.max_video_tokens,
        }


def _pixel_fields(cls, config: dict) -> dict:
    """The fields images and videos share, from HF keys; absent keys keep `cls`'s defaults."""
    defaults = cls()
    size = config.get("size") or {}
    fields = {
        "min_pixels": size.get("shortest_edge", defaults.min_pixels),
        "max_pixels": size.get("longest_edge", defaults.max_pixels),
    }
    for key in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor", "resample",
                "do_resize", "do_rescale", "do_normalize"):
        if config.get(key) is not None:
            fields[key] = config[key]
    for key in ("image_mean", "image_std"):
        value = config.get(key)
        if value is not None:
            fields[key] = tuple(float(v) for v in (value if isinstance(value, Sequence) else [value] * 3))
    return fields


def _hf_pixel_keys(config: ImageConfig) -> dict:
    return {
        "do_resize": config.do_resize,
        "do_rescale": config.do_rescale,
        "do_normalize": config.do_normalize,
        "size": {"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels},
        "patch_size": config.patch_size,
        "temporal_patch_size": config.temporal_patch_size,
        "merge_size": config.merge_size,
        "image_mean": list(config.image_mean),
        "image_std": list(config.image_std),
        "rescale_factor": config.rescale_factor,
        "resample": config.resample,
        "processor_class": "Qwen3VLProcessor",
    }
