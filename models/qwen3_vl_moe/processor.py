"""Image and video preprocessing for Qwen3-VL: pixels in, flattened patches and (t, h, w) grids out.

The output must equal transformers' so that the vision tower sees the same numbers as the reference:

- images follow `Qwen2VLImageProcessorPil`: PIL bicubic resize of the uint8 RGB image, rescale in
  float64 then cast to float32, normalise in float32;
- videos follow `Qwen3VLVideoProcessor`, whose resize is torchvision's. On CPU that is torch's
  antialiased bicubic on uint8 with int16 fixed-point weights, which differs from PIL's (22-bit
  weights) by one level on up to ~1% of pixels, so it is reimplemented here (`resize_bicubic_uint8`)
  rather than borrowed from PIL. Its rescale and normalise are fused: (x - 255 mean) / (255 std).

Patches come out in merge-block order, rows (t, h / m, w / m, m, m) and contents (C, T, P, P), which is
the order the patch embedding and the spatial merger expect.

Videos are lists of frames that have already been decoded. They are used as given unless the caller
passes the source frame rate (`video_fps`); then frames are sampled as transformers samples them:
`int(n / video_fps * fps)` frames, clamped to [min_frames, max_frames] and to n, at
`linspace(0, n - 1, k).round()`. (transformers assumes 24 fps when it has no metadata; we do not guess.)
"""

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_CONFIG_FILE = "preprocessor_config.json"
VIDEO_CONFIG_FILE = "video_preprocessor_config.json"
NESTED_CONFIG_FILE = "processor_config.json"  # transformers 5 may nest both configs here


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

    @classmethod
    def from_hf(cls, config: dict) -> "VideoConfig":
        fields = _pixel_fields(cls, config)
        for key, kind in (("fps", float), ("min_frames", int), ("max_frames", int), ("max_video_tokens", int)):
            if config.get(key) is not None:
                fields[key] = kind(config[key])
        fields["cap_pixels_per_frame"] = bool(config.get("cap_pixels_per_frame"))
        return cls(**fields)

    def to_hf(self) -> dict:
        return {
            **_hf_pixel_keys(self),
            "video_processor_type": "Qwen3VLVideoProcessor",
            "do_convert_rgb": True,
            "do_sample_frames": True,
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


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The image size transformers resizes to: multiples of `factor`, area within bounds, aspect kept."""
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


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers makes it: transparency is composited onto white, not dropped."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _patchify(frames: np.ndarray, config: ImageConfig) -> np.ndarray:
    """[T, H, W, C] with T a multiple of the temporal patch -> rows in merge-block order, contents (C, T, P, P)."""
    t, h, w, c = frames.shape
    p, m, tp = config.patch_size, config.merge_size, config.temporal_patch_size
    blocks = frames.reshape(t // tp, tp, h // p // m, m, p, w // p // m, m, p, c)
    blocks = blocks.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return np.ascontiguousarray(blocks).reshape(t * h * w // (tp * p * p), c * tp * p * p)


def _check_divisible(height: int, width: int, config: ImageConfig):
    if height % config.factor or width % config.factor:
        raise ValueError(f"with do_resize off, sizes must be multiples of {config.factor}, got {height}x{width}")


@dataclasses.dataclass(frozen=True)
class Processor:
    """Turns PIL images and decoded videos into the vision tower's inputs."""

    image: ImageConfig = ImageConfig()
    video: VideoConfig = VideoConfig()

    def __post_init__(self):
        image, video = self.image, self.video
        shared = ("patch_size", "temporal_patch_size", "merge_size")
        if any(getattr(image, key) != getattr(video, key) for key in shared):
            raise ValueError(f"image and video configs must agree on {shared}: one patch embedding serves both")

    @property
    def patch_size(self) -> int:
        return self.image.patch_size

    @property
    def temporal_patch_size(self) -> int:
        return self.image.temporal_patch_size

    @property
    def merge_size(self) -> int:
        return self.image.merge_size

    @classmethod
    def default(cls) -> "Processor":
        return cls()

    def with_pixel_limits(
        self, min_pixels: int | None = None, max_pixels: int | None = None, *,
        video_min_pixels: int | None = None, video_max_pixels: int | None = None,
    ) -> "Processor":
        """A copy with other resize bounds (images bound h * w; videos bound t * h * w); None keeps a bound."""

        def bounded(config, low, high):
            low = config.min_pixels if low is None else low
            high = config.max_pixels if high is None else high
            return dataclasses.replace(config, min_pixels=low, max_pixels=high)

        return Processor(
            bounded(self.image, min_pixels, max_pixels), bounded(self.video, video_min_pixels, video_max_pixels)
        )

    @classmethod
    def from_dir(cls, path) -> "Processor":
        """Reads configs with transformers' precedence; Qwen3-VL's hub values fill whatever is absent.

        Images: processor_config.json["image_processor"], else preprocessor_config.json.
        Videos: processor_config.json["video_processor"], else video_preprocessor_config.json,
        else preprocessor_config.json (as transformers falls back).
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"not a directory: {path}")
        nested = _read_json(path / NESTED_CONFIG_FILE) or {}
        image = nested.get("image_processor") or _read_json(path / IMAGE_CONFIG_FILE) or {}
        video = (
            nested.get("video_processor")
            or _read_json(path / VIDEO_CONFIG_FILE)
            or _read_json(path / IMAGE_CONFIG_FILE)
            or {}
        )
        return cls(ImageConfig.from_hf(image), VideoConfig.from_hf(video))

    def save(self, path):
        """Writes preprocessor_config.json and video_preprocessor_config.json as transformers writes them."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, config in ((IMAGE_CONFIG_FILE, self.image), (VIDEO_CONFIG_FILE, self.video)):
            (path / name).write_text(json.dumps(config.to_hf(), indent=2, sort_keys=True) + "\n")

    def num_image_tokens(self, grid_thw) -> int:
        """Tokens the merger emits for one image or video grid."""
        t, h, w = (int(v) for v in grid_thw)
        return t * h * w // self.merge_size**2

    def __call__(self, images=None, videos=None, video_fps=None) -> dict[str, np.ndarray]:
        """images: a PIL image or a list of them. videos: a list of videos, each a list of PIL frames
        or a uint8 array [T, H, W, 3]. video_fps: the videos' source frame rate (one number, or one
        per video) to sample frames at `self.video.fps`; None keeps every frame given.
        """
        out = {}
        if images is not None:
            out["pixel_values"], out["image_grid_thw"] = self._images(images)
        if videos is not None:
            out["pixel_values_videos"], out["video_grid_thw"] = self._videos(videos, video_fps)
        return out

    def sample_frame_indices(self, total_frames: int, source_fps: float) -> np.ndarray:
        """Which of `total_frames` frames at `source_fps` transformers keeps to sample at `video.fps`."""
        if source_fps <= 0:
            raise ValueError(f"a video's frame rate must be positive, got {source_fps}")
        count = int(total_frames / source_fps * self.video.fps)
        count = min(max(count, self.video.min_frames), self.video.max_frames, total_frames)
        return np.linspace(0, total_frames - 1, count).round().astype(np.int64)

    def _images(self, images) -> tuple[np.ndarray, np.ndarray]:
        images = [images] if isinstance(images, Image.Image) else list(images)
        if not images:
            raise ValueError("images is empty")
        patches, grids = [], []
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise ValueError(f"images[{i}] is a {type(image).__name__}, expected a PIL.Image.Image")
            frame, grid = self._image(_to_rgb(image))
            patches.append(frame)
            grids.append(grid)
        return np.concatenate(patches), np.array(grids, dtype=np.int64)

    def _image(self, image: Image.Image) -> tuple[np.ndarray, list[int]]:
        config = self.image
        if config.do_resize:
            height, width = smart_resize(image.height, image.width, config.factor, config.min_pixels,
                                         config.max_pixels)
            image = image.resize((width, height), resample=Image.Resampling(config.resample))
        else:
            _check_divisible(image.height, image.width, config)
        pixels = np.asarray(image)
        if config.do_rescale:
            pixels = pixels.astype(np.float64) * config.rescale_factor
        pixels = pixels.astype(np.float32)
        if config.do_normalize:
            pixels = (pixels - np.float32(config.image_mean)) / np.float32(config.image_std)
        frames = np.broadcast_to(pixels, (config.temporal_patch_size, *pixels.shape))
        grid = [1, image.height // config.patch_size, image.width // config.patch_size]
        return _patchify(frames, config), grid

    def _videos(self, videos, video_fps) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(videos, np.ndarray) or not isinstance(videos, Sequence) or not videos:
            raise ValueError("videos must be a non-empty list of videos (lists of PIL frames or [T, H, W, 3] arrays)")
        fps = video_fps if isinstance(video_fps, Sequence) else [video_fps] * len(videos)
        if len(fps) != len(videos):
            raise ValueError(f"{len(videos)} videos but {len(fps)} frame rates")
        patches, grids = [], []
        for i, (video, source_fps) in enumerate(zip(videos, fps)):
            frames = _video_frames(video, i)
            if source_fps is not None:
                frames = frames[self.sample_frame_indices(len(frames), source_fps)]
            video_patches, grid = self._video(frames)
            patches.append(video_patches)
            grids.append(grid)
        return np.concatenate(patches), np.array(grids, dtype=np.int64)

    def _video(self, frames: np.ndarray) -> tuple[np.ndarray, list[int]]:
        config = self.video
        num_frames, height, width = frames.shape[:3]
        if config.do_resize:
            max_pixels = config.max_pixels
            if config.cap_pixels_per_frame:
                per_frame = max(min(config.max_video_tokens * config.factor**2, max_pixels // num_frames),
                                int(config.min_pixels * 1.05))
                max_pixels = per_frame * num_frames
            height, width = smart_resize_video(num_frames, height, width, config.factor,
                                               config.temporal_patch_size, config.min_pixels, max_pixels)
            if frames.shape[1:3] != (height, width):
                frames = resize_bicubic_uint8(frames, height, width)
        else:
            _check_divisible(height, width, config)
        pixels = _fused_rescale_normalize(frames, config)
        if pad := -num_frames % config.temporal_patch_size:
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
        grid = [len(pixels) // config.temporal_patch_size, height // config.patch_size, width // config.patch_size]
        return _patchify(pixels, config), grid


def _fused_rescale_normalize(frames: np.ndarray, config: VideoConfig) -> np.ndarray:
    """The video processor's float32 arithmetic: rescale folded into mean and std when both apply."""
    mean, std = np.float32(config.image_mean), np.float32(config.image_std)
    pixels = frames.astype(np.float32)
    if config.do_normalize:
        if config.do_rescale:
            inverse = np.float32(1.0 / config.rescale_factor)
            mean, std = mean * inverse, std * inverse
        return (pixels - mean) / std
    if config.do_rescale:
        return pixels * np.float32(config.rescale_factor)
    return pixels


def _video_frames(video, index: int) -> np.ndarray:
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"videos[{index}] must be a uint8 array [T, H, W, 3], got {video.dtype} {video.shape}")
        return video
    if isinstance(video, Sequence) and video and all(isinstance(frame, Image.Image) for frame in video):
        frames = [np.asarray(_to_rgb(frame)) for frame in video]
        if len({frame.shape for frame in frames}) != 1:
            raise ValueError(f"videos[{index}] has frames of different sizes")
        return np.stack(frames)
    raise ValueError(f"videos[{index}] is a {type(video).__name__}: expected a list of PIL frames or a uint8 array")


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None
