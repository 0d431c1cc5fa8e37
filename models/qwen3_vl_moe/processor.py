"""Image and video preprocessing for Qwen3-VL: pixels in, flattened patches and (t, h, w) grids out.

The output must equal transformers' so that the vision tower sees the same numbers as the reference:

- images follow `Qwen2VLImageProcessorPil`: PIL bicubic resize of the uint8 RGB image, rescale in
  float64 then cast to float32, normalise in float32;
- videos follow `Qwen3VLVideoProcessor`, whose resize is torchvision's. On CPU that is torch's
  antialiased bicubic on uint8 with int16 fixed-point weights, which differs from PIL's (22-bit
  weights) by one level on up to ~1% of pixels, so it is reimplemented (`resize.resize_bicubic_uint8`)
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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from models.qwen3_vl_moe.processor_config import ImageConfig, VideoConfig
from models.qwen3_vl_moe.resize import resize_bicubic_uint8, smart_resize, smart_resize_video

IMAGE_CONFIG_FILE = "preprocessor_config.json"
VIDEO_CONFIG_FILE = "video_preprocessor_config.json"
NESTED_CONFIG_FILE = "processor_config.json"  # transformers 5 may nest both configs here


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

    def image_size(self, height: int, width: int) -> tuple[int, int]:
        """The size an image of ``height`` x ``width`` is processed at; ValueError when it cannot be."""
        config = self.image
        if not config.do_resize:
            _check_divisible(height, width, config)
            return height, width
        return smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)

    def image_grid(self, height: int, width: int) -> tuple[int, int, int]:
        """The (t, h, w) patch grid of an image of this size, known from its size alone (its header)."""
        height, width = self.image_size(height, width)
        return 1, height // self.patch_size, width // self.patch_size

    def num_tokens_of_image(self, height: int, width: int) -> int:
        """Tokens an image of this size becomes, known from its size alone (before decoding it)."""
        return self.num_image_tokens(self.image_grid(height, width))

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
        """Which of `total_frames` frames at `source_fps` transformers keeps to sample at `video.fps`
        (all of them where the config says not to sample)."""
        if source_fps <= 0:
            raise ValueError(f"a video's frame rate must be positive, got {source_fps}")
        if not self.video.do_sample_frames:
            return np.arange(total_frames, dtype=np.int64)
        count = int(total_frames / source_fps * self.video.fps)
        count = min(max(count, self.video.min_frames), self.video.max_frames, total_frames)
        return np.linspace(0, total_frames - 1, count).round().astype(np.int64)

    def video_timestamps(self, frame_indices, source_fps: float) -> tuple[float, ...]:
        """The seconds transformers' Qwen3-VL processor writes before each temporal patch of a video:
        the mean time of the patch's first and last frame, ``frame_indices`` (the source frames kept)
        padded by repeating the last, as the frames themselves are."""
        indices = [int(i) for i in frame_indices]
        step = self.temporal_patch_size
        if len(indices) % step:
            indices += [indices[-1]] * (step - len(indices) % step)
        seconds = [index / source_fps for index in indices]
        return tuple((seconds[i] + seconds[i + step - 1]) / 2 for i in range(0, len(seconds), step))

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
        height, width = self.image_size(image.height, image.width)
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), resample=Image.Resampling(config.resample))
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

    def video_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        """The size each of ``num_frames`` frames of ``height`` x ``width`` is processed at."""
        config = self.video
        if not config.do_resize:
            _check_divisible(height, width, config)
            return height, width
        max_pixels = config.max_pixels
        if config.cap_pixels_per_frame:
            per_frame = max(min(config.max_video_tokens * config.factor**2, max_pixels // num_frames),
                            int(config.min_pixels * 1.05))
            max_pixels = per_frame * num_frames
        return smart_resize_video(num_frames, height, width, config.factor, config.temporal_patch_size,
                                  config.min_pixels, max_pixels)

    def video_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The (t, h, w) patch grid of ``num_frames`` (already sampled) frames of this size, known
        before decoding."""
        height, width = self.video_size(num_frames, height, width)
        temporal = -(-num_frames // self.temporal_patch_size)
        return temporal, height // self.patch_size, width // self.patch_size

    def num_tokens_of_video(self, num_frames: int, height: int, width: int) -> int:
        """Tokens ``num_frames`` (already sampled) frames of this size become, known before decoding."""
        return self.num_image_tokens(self.video_grid(num_frames, height, width))

    def video_at_size(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(pixel_values_videos, video_grid_thw)`` of one video's frames, already sampled and
        resized to the size :meth:`video_size` gives their source (as a video decoder shrinks each
        sampled frame at once): the size is not computed again from the resized frames, where
        the bounds, which count pixels before rounding, may give another one."""
        patches, grid = self._video(frames, sized=True)
        return patches, np.array([grid], dtype=np.int64)

    def _video(self, frames: np.ndarray, sized: bool = False) -> tuple[np.ndarray, list[int]]:
        config = self.video
        num_frames = frames.shape[0]
        height, width = frames.shape[1:3] if sized else self.video_size(*frames.shape[:3])
        if frames.shape[1:3] != (height, width):
            frames = resize_bicubic_uint8(frames, height, width)
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
