"""The processor equals transformers bit for bit: `Qwen2VLImageProcessorPil` for images and
`Qwen3VLVideoProcessor` for videos, each configured from the files our `save` writes; and a
prompt's ids, placeholders expanded, equal `Qwen3VLProcessor`'s.

torchvision is not installed, and transformers' video processor calls three torchvision kernels.
`hf_video_processor` runs transformers' own video code (frame sampling, smart_resize, the pixel cap,
grouping, fused rescale/normalise, temporal padding, patch order) with those kernels replaced by what
torchvision does on CPU for uint8 RGB frames: `resize` is `torch.nn.functional.interpolate(uint8,
bicubic, antialias=True, align_corners=False)` (its native uint8 path), `normalize` is `sub(mean)`
then `div(std)`, and `grayscale_to_rgb` leaves 3 channels alone.
"""

import dataclasses
import enum
import json
import types

import numpy as np
import pytest
import torch
import transformers.image_processing_backends as hf_backends
import transformers.processing_utils as hf_processing
import transformers.video_processing_utils as hf_video_utils
from PIL import Image
from transformers import PreTrainedTokenizerFast
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

from mmserve.engine.inputs import prepare_prompt
from models.qwen3_vl_moe import load_model
from models.qwen3_vl_moe.processor import Processor
from models.qwen3_vl_moe.processor_config import ImageConfig, VideoConfig
from models.qwen3_vl_moe.resize import resize_bicubic_uint8


class _InterpolationMode(enum.Enum):
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


def _tv_resize(video, size, interpolation, antialias=True):
    frames = video.reshape(-1, *video.shape[-3:])
    out = torch.nn.functional.interpolate(
        frames, size=list(size), mode=interpolation.value, align_corners=False, antialias=antialias
    )
    return out.reshape(*video.shape[:-2], *size)


def _tv_normalize(video, mean, std, inplace=False):
    mean = torch.as_tensor(mean, dtype=video.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=video.dtype).view(-1, 1, 1)
    return (video.sub_(mean) if inplace else video.sub(mean)).div_(std)


@pytest.fixture
def hf_video_processor(monkeypatch, tmp_path):
    """transformers' Qwen3VLVideoProcessor, loaded from the video config our processor saves."""
    tv = types.SimpleNamespace(
        InterpolationMode=_InterpolationMode, resize=_tv_resize, normalize=_tv_normalize,
        grayscale_to_rgb=lambda video: video,
    )
    monkeypatch.setattr(hf_backends, "tvF", tv, raising=False)
    monkeypatch.setattr(hf_video_utils, "tvF", tv, raising=False)
    monkeypatch.setattr(
        hf_backends, "pil_torch_interpolation_mapping", {PILImageResampling.BICUBIC: _InterpolationMode.BICUBIC}
    )

    def build(processor: Processor) -> Qwen3VLVideoProcessor:
        path = tmp_path / "video_processor"
        processor.save(path)
        return Qwen3VLVideoProcessor.from_pretrained(path)

    return build


def hf_image_processor(processor: Processor, path) -> Qwen2VLImageProcessorPil:
    processor.save(path)
    return Qwen2VLImageProcessorPil.from_pretrained(path)


def noise_image(rng, width, height, mode="RGB") -> Image.Image:
    """Uniform noise: the hardest content for a resize to get bit-exact."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def noise_video(rng, frames, height, width) -> np.ndarray:
    return rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def assert_identical(ours: dict, reference) -> None:
    assert set(ours) == set(reference.keys())
    for key in ours:
        expected = np.asarray(reference[key])
        assert ours[key].dtype == expected.dtype, key
        np.testing.assert_array_equal(ours[key], expected, err_msg=key)


SMALL_IMAGES = Processor.default().with_pixel_limits(min_pixels=32 * 32, max_pixels=256 * 256)


@pytest.mark.parametrize(
    "processor, size, grid",
    [
        (Processor.default(), (30, 20), (1, 14, 20)),  # upscaled to 65536 pixels
        (SMALL_IMAGES, (2000, 1500), (1, 12, 18)),  # downscaled: 3M pixels, bound 65536
        (SMALL_IMAGES, (37, 301), (1, 18, 2)),  # odd aspect, tall
        (SMALL_IMAGES, (301, 37), (1, 2, 18)),  # odd aspect, wide
    ],
    ids=["upscaled", "downscaled", "odd-aspect-tall", "odd-aspect-wide"],
)
def test_image_equals_transformers(processor, size, grid, tmp_path, rng):
    image = noise_image(rng, *size)
    ours = processor(images=image)
    assert_identical(ours, hf_image_processor(processor, tmp_path)(images=image, return_tensors="np"))
    assert ours["image_grid_thw"].tolist() == [list(grid)]
    assert ours["pixel_values"].shape == (np.prod(grid), 3 * 2 * 16 * 16)


def test_several_images_of_different_sizes_and_modes_equal_transformers(tmp_path, rng):
    """One call, concatenated in order; transparency composited onto white, grey expanded to RGB."""
    images = [
        noise_image(rng, 64, 48),
        noise_image(rng, 33, 90, "RGBA"),
        noise_image(rng, 100, 100, "L"),
        noise_image(rng, 500, 120),
    ]
    ours = SMALL_IMAGES(images=images)
    assert_identical(ours, hf_image_processor(SMALL_IMAGES, tmp_path)(images=images, return_tensors="np"))
    assert len(ours["image_grid_thw"]) == 4
    assert len(ours["pixel_values"]) == ours["image_grid_thw"].prod(axis=1).sum()


def test_checkpoint_config_values_are_honoured(tmp_path, rng):
    """A Qwen2-VL-style preprocessor_config.json: patch 14, CLIP mean/std, legacy min/max_pixels keys."""
    config = {
        "min_pixels": 3136, "max_pixels": 40000, "size": {"shortest_edge": 1, "longest_edge": 2},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processor = Processor.from_dir(tmp_path)
    assert (processor.patch_size, processor.image.min_pixels, processor.image.max_pixels) == (14, 3136, 40000)
    images = [noise_image(rng, 250, 190), noise_image(rng, 20, 20)]
    reference = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)(images=images, return_tensors="np")
    assert_identical(processor(images=images), reference)


@pytest.mark.parametrize("flags", [{"do_rescale": False}, {"do_normalize": False}, {"do_resize": False}])
def test_preprocessing_switches_equal_transformers(flags, hf_video_processor, tmp_path, rng):
    processor = Processor(ImageConfig(**flags), VideoConfig(**flags))
    image, video = noise_image(rng, 96, 64), noise_video(rng, 4, 64, 96)
    ours = processor(images=image)
    assert_identical(ours, hf_image_processor(processor, tmp_path)(images=image, return_tensors="np"))
    ours = processor(videos=[video])
    reference = hf_video_processor(processor)(videos=[video], do_sample_frames=False, return_tensors="np")
    assert_identical(ours, reference)


def test_num_image_tokens_for_640x480():
    processor = Processor.default()
    grid = processor(images=Image.new("RGB", (640, 480)))["image_grid_thw"][0]
    assert grid.tolist() == [1, 30, 40]
    assert processor.num_image_tokens(grid) == 300


@pytest.mark.parametrize("size", [(640, 480), (33, 1000), (5000, 4000)])
def test_tokens_of_an_image_are_known_from_its_size_alone(size):
    processor = Processor.default()
    grid = processor(images=Image.new("RGB", size))["image_grid_thw"][0]
    assert processor.num_tokens_of_image(size[1], size[0]) == processor.num_image_tokens(grid)


@pytest.mark.parametrize("bad", ["photo.png", np.zeros((8, 8, 3), np.uint8), [Image.new("RGB", (8, 8)), None], []])
def test_non_image_input_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="image"):
        Processor.default()(images=bad)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((4, 8, 8, 3), np.uint8), [np.zeros((4, 8, 8, 3), np.float32)], [np.zeros((4, 8, 8), np.uint8)],
     [["frame"]], [[Image.new("RGB", (8, 8)), Image.new("RGB", (9, 8))]]],
    ids=["bare-array", "float", "no-channels", "strings", "mixed-sizes"],
)
def test_non_video_input_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="video"):
        Processor.default()(videos=bad)


def test_save_then_from_dir_round_trips(tmp_path):
    processor = Processor(
        ImageConfig(patch_size=14, min_pixels=1000, max_pixels=99999, image_mean=(0.1, 0.2, 0.3)),
        VideoConfig(patch_size=14, min_pixels=500, max_pixels=777777, fps=1.5, max_frames=64,
                    cap_pixels_per_frame=True),
    )
    processor.save(tmp_path)
    assert Processor.from_dir(tmp_path) == processor


def test_missing_configs_fall_back_to_qwen3_vl_hub_values(tmp_path):
    assert Processor.from_dir(tmp_path) == Processor.default()
    default = Processor.default()
    assert (default.image.min_pixels, default.image.max_pixels) == (65536, 16777216)
    assert (default.video.min_pixels, default.video.max_pixels) == (4096, 25165824)


def test_nested_processor_config_takes_precedence(tmp_path):
    """transformers 5 reads processor_config.json's nested entries before the separate files."""
    Processor.default().save(tmp_path)
    nested = {"image_processor": {"size": {"shortest_edge": 1024, "longest_edge": 4096}},
              "video_processor": {"fps": 4}}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    processor = Processor.from_dir(tmp_path)
    assert (processor.image.min_pixels, processor.image.max_pixels, processor.video.fps) == (1024, 4096, 4)


SMALL_VIDEOS = Processor.default().with_pixel_limits(video_max_pixels=4 * 128 * 128)


def test_videos_equal_transformers(hf_video_processor, rng):
    """Upscaled with an odd frame count (padded by repeating the last frame), downscaled, and PIL frames."""
    frames = [noise_image(rng, 37, 301) for _ in range(6)]
    videos = [noise_video(rng, 9, 50, 70), noise_video(rng, 4, 300, 400)]
    ours = SMALL_VIDEOS(videos=[*videos, frames])
    # transformers takes one input format per call; it stacks PIL frames into an array itself.
    as_array = np.stack([np.asarray(frame) for frame in frames])
    reference = hf_video_processor(SMALL_VIDEOS)(
        videos=[*videos, as_array], do_sample_frames=False, return_tensors="np"
    )
    assert_identical(ours, reference)
    assert ours["video_grid_thw"][0, 0] == 5  # 9 frames -> 10 -> 5 temporal patches


def test_video_frame_sampling_equals_transformers(hf_video_processor, rng):
    video = noise_video(rng, 30, 40, 60)
    ours = SMALL_VIDEOS(videos=[video], video_fps=10.0)
    reference = hf_video_processor(SMALL_VIDEOS)(
        videos=[video], video_metadata=[{"total_num_frames": 30, "fps": 10.0}], return_tensors="np"
    )
    assert_identical(ours, reference)
    assert SMALL_VIDEOS.sample_frame_indices(30, 10.0).tolist() == [0, 6, 12, 17, 23, 29]


def test_a_config_that_does_not_sample_frames_keeps_every_frame_as_transformers(hf_video_processor, rng, tmp_path):
    """``do_sample_frames: false`` in the video config: transformers keeps all 30 frames, where they
    were sampled down to 6 here (the key was not read)."""
    dataclasses.replace(SMALL_VIDEOS, video=dataclasses.replace(SMALL_VIDEOS.video, do_sample_frames=False)).save(tmp_path)
    processor = Processor.from_dir(tmp_path)
    video = noise_video(rng, 30, 40, 60)
    ours = processor(videos=[video], video_fps=10.0)
    reference = hf_video_processor(processor)(
        videos=[video], video_metadata=[{"total_num_frames": 30, "fps": 10.0}], return_tensors="np"
    )
    assert_identical(ours, reference)
    assert processor.sample_frame_indices(30, 10.0).tolist() == list(range(30))


def test_video_pixel_cap_equals_transformers(hf_video_processor, rng):
    processor = Processor(video=VideoConfig(cap_pixels_per_frame=True, max_video_tokens=16))
    video = noise_video(rng, 4, 200, 300)
    ours = processor(videos=[video])
    assert_identical(ours, hf_video_processor(processor)(videos=[video], do_sample_frames=False, return_tensors="np"))
    assert ours["video_grid_thw"].tolist() == [[2, 6, 8]]


def test_one_frame_video_is_rejected():
    with pytest.raises(ValueError, match="at least 2 frames"):
        Processor.default()(videos=[np.zeros((1, 64, 64, 3), np.uint8)])


def test_bicubic_resize_equals_torch_uint8_antialias(rng):
    """The resize alone, on sizes where fixed-point rounding differs from Pillow's: up, down, mixed, 1 px."""
    sizes = [(20, 30, 64, 96), (301, 37, 320, 64), (500, 700, 224, 320), (1, 5, 32, 64), (33, 999, 64, 32)]
    sizes += [tuple(rng.integers(1, 300, 4)) for _ in range(20)]
    for height, width, new_height, new_width in sizes:
        frames = noise_video(rng, 2, height, width)
        reference = torch.nn.functional.interpolate(
            torch.from_numpy(frames).permute(0, 3, 1, 2), size=[new_height, new_width], mode="bicubic",
            align_corners=False, antialias=True,
        ).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(resize_bicubic_uint8(frames, new_height, new_width), reference)


def test_a_prompts_ids_with_images_and_videos_equal_transformers(hf_video_processor, monkeypatch, tmp_path, rng):
    """The whole prompt, placeholders expanded, equals Qwen3VLProcessor's ids for the same text,
    tokenizer and pictures: each video frame gets its timestamp and its own vision start/end pair,
    and the template's pair around a video's placeholder goes (kept, it put one more pair around
    all the frames, which the model never saw in training; transformers and vLLM drop it). A bare
    placeholder is replaced alone, as in transformers."""
    model = load_model("tiny", weights=False)
    # transformers checks the video processor's class through a mapping that imports torchvision
    monkeypatch.setattr(hf_processing.ProcessorMixin, "check_argument_for_proper_class", lambda *args: None)
    reference = Qwen3VLProcessor(
        image_processor=hf_image_processor(model.processor, tmp_path / "images"),
        video_processor=hf_video_processor(model.processor),
        tokenizer=PreTrainedTokenizerFast(tokenizer_object=model.tokenizer.backend, eos_token="<|im_end|>",
                                          pad_token="<|endoftext|>"))
    wrapped = "<|vision_start|>{}<|vision_end|>"
    text = (f"<|im_start|>user\nCompare {wrapped.format('<|image_pad|>')} with {wrapped.format('<|video_pad|>')}"
            f"and{wrapped.format('<|video_pad|>')}, then <|video_pad|> too.<|im_end|>\n<|im_start|>assistant\n")
    image = noise_image(rng, 50, 37)
    videos = [noise_video(rng, 4, 48, 64), noise_video(rng, 6, 40, 60), noise_video(rng, 2, 32, 32)]
    metadata = [{"fps": 2.0, "frames_indices": [0, 3, 5, 9], "total_num_frames": 10},
                {"fps": 24.0, "frames_indices": list(range(6)), "total_num_frames": 6},
                {"fps": 4.0, "frames_indices": [1, 2], "total_num_frames": 3}]
    ours = prepare_prompt({"prompt": text, "multi_modal_data": {
        "image": image, "video": [(video, meta) for video, meta in zip(videos, metadata)]}}, model).token_ids
    theirs = reference(text=[text], images=[image], videos=videos, video_metadata=metadata,
                       do_sample_frames=False)["input_ids"][0]
    assert ours == list(theirs)
