"""Turning a user's prompt into token ids with expanded placeholders and pixel patches (or, for
images and videos the router has only read the headers of, their grids and encoded files).

Prompts come in vLLM's forms: a string, ``{"prompt": str, "multi_modal_data": {...}}`` or
``{"prompt_token_ids": [...], "multi_modal_data": {...}}``. As the Hugging Face processor does,
each single ``<|image_pad|>`` becomes as many image tokens as its image has, and each
``<|video_pad|>`` becomes, per temporal patch, ``<t seconds><|vision_start|>`` + tokens +
``<|vision_end|>`` (replacing the ``<|vision_start|>``/``<|vision_end|>`` around it, if any). A
prompt may carry vLLM's ``cache_salt`` (:mod:`mmserve.engine.page_hash`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from mmserve.engine.page_hash import salted_content_key
from mmserve.engine.rejected import RequestRejected
from models.qwen3_vl_moe import Model
from models.qwen3_vl_moe.media import (BadMedia, decode_image, decode_sampled_frames, open_image, read_video_header,
                                       upright_size)
from models.qwen3_vl_moe.processor import Processor
from models.qwen3_vl_moe.token_count import TooManyTokens

PROMPT_KEYS = {"prompt", "prompt_token_ids", "multi_modal_data", "cache_salt"}
MODALITIES = {"image", "video"}
DEFAULT_VIDEO_FPS = 24.0  # what transformers assumes for pre-sampled frames without metadata


@dataclasses.dataclass(frozen=True)
class EncodedMedia:
    """An image or video file as the client sent it (JPEG, PNG, MP4, ...): what travels from the
    router to the encode role, decoded only where its pixels are processed."""

    kind: str  # "image" or "video"
    data: bytes

    def __post_init__(self):
        if self.kind not in MODALITIES:
            raise ValueError(f"a medium is one of {sorted(MODALITIES)}, got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class Visual:
    """One image or one video: its grid, and either its patches (ready for the vision tower) or the
    encoded file they come from, its grid read from the header (``with_pixels`` decodes it). The
    prefill role holds grids alone: its features come from encode.

    ``content_key`` names what its embeddings are computed from: a sha256 of the encoded file and
    grid (or, for pixels given directly, of the patches and grid), made where the visual is first
    read and carried with it (decoded, sent to encode and prefill), so equal keys mean equal
    embeddings in every process: the prefix cache keys pages by it, the router routes by it and the
    embedding cache looks it up before anything is decoded. The same picture sent once as a file
    and once as pixels gets two keys: a cache miss, never a wrong hit."""

    grid_thw: np.ndarray  # [1, 3]
    pixel_values: np.ndarray | None = None  # [patches, C*T*P*P]
    source: EncodedMedia | None = None
    content_key: bytes = b""
    timestamps: tuple[float, ...] | None = None
    """A video's seconds before each temporal patch in the prompt, from its source's frame rate and
    the frames sampled (``Processor.video_timestamps``); None: its frames were given as they are, at
    the 24 fps transformers assumes then."""

    def __post_init__(self):
        if self.pixel_values is not None and self.source is not None:
            raise ValueError("a Visual carries its pixels or its encoded source, not both")
        if not self.content_key:
            if self.pixel_values is None and self.source is None:
                raise ValueError("a Visual with neither pixels nor an encoded source needs its content_key")
            object.__setattr__(self, "content_key", _content_key(self.grid_thw, self.pixel_values, self.source))


def _content_key(grid_thw: np.ndarray, pixels: np.ndarray | None, source: EncodedMedia | None) -> bytes:
    digest = hashlib.sha256(np.ascontiguousarray(grid_thw, np.int64).tobytes())
    if source is not None:
        digest.update(b"file:" + source.kind.encode() + b":")
        digest.update(source.data)
    else:
        rows = np.ascontiguousarray(pixels)
        digest.update(f"patches:{rows.dtype.str}:{rows.shape}:".encode())
        digest.update(rows.tobytes())
    return digest.digest()


def with_pixels(visual: Visual, processor: Processor) -> Visual:
    """The visual with its patches: an encoded source is decoded and processed (CPU work: call it off
    any event loop or device loop). A file that cannot be decoded is the client's to fix
    (``RequestRejected``); a grid other than the header gave is this server's inconsistency."""
    if visual.pixel_values is not None:
        return visual
    if visual.source is None:
        raise ValueError("this visual has only its grid: neither pixels nor an encoded file to decode")
    kind, raw = visual.source.kind, visual.source.data
    try:  # the grid the file's header gives, checked before a pixel is decoded: only what was charged is
        if kind == "image":
            grid = processor.image_grid(*upright_size(open_image(raw)))
        else:
            header = read_video_header(raw)
            grid = processor.video_grid(len(processor.sample_frame_indices(header.frames, header.fps)),
                                        header.height, header.width)
    except (ValueError, Image.DecompressionBombError) as error:  # BadMedia, a size the processor refuses
        raise RequestRejected(str(error)) from None
    if not np.array_equal([grid], visual.grid_thw):
        raise ValueError(f"the {kind}'s header gives the patch grid {list(grid)}, but the request carries "
                         f"{np.asarray(visual.grid_thw)[0].tolist()} (are the router's and this worker's "
                         "processor settings the same?)")
    try:
        if kind == "image":
            out = processor(images=[decode_image(raw)])
            pixels, grid = out["pixel_values"], out["image_grid_thw"]
        else:
            pixels, grid = processor.video_at_size(decode_sampled_frames(raw, header, processor))
    except BadMedia as error:
        raise RequestRejected(str(error)) from None
    return Visual(grid, pixels, content_key=visual.content_key, timestamps=visual.timestamps)


@dataclasses.dataclass(frozen=True)
class PreparedPrompt:
    token_ids: list[int]
    images: list[Visual]
    videos: list[Visual]
    cache_salt: str | None = None
    """Only prompts with the same salt share cached KV pages (:mod:`mmserve.engine.page_hash`)."""


def prepare_prompt(prompt: Any, model: Model, max_tokens: int | None = None) -> PreparedPrompt:
    """Validates and expands one prompt; raises ValueError with the reason when it is malformed.

    ``max_tokens``: the most tokens a prompt may have. A text or id list with more raises
    TooManyTokens, a text counted only as far as the limit (a client's megabytes of text are never
    tokenized whole)."""
    if isinstance(prompt, str):
        prompt = {"prompt": prompt}
    if not isinstance(prompt, Mapping):
        raise ValueError(f"a prompt is a str or a dict, got {type(prompt).__name__}")
    unknown = set(prompt) - PROMPT_KEYS
    if unknown:
        raise ValueError(f"unknown prompt field(s): {sorted(unknown)}")
    if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
        raise ValueError("a prompt needs exactly one of 'prompt' and 'prompt_token_ids'")
    salt = prompt.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt or not _encodable(salt)):
        raise ValueError("'cache_salt' must be a non-empty string (of valid text) if given")
    if "prompt" in prompt:
        if not isinstance(prompt["prompt"], str):
            raise ValueError("'prompt' must be a string")
        ids = model.tokenizer.encode(prompt["prompt"], max_tokens=max_tokens)
        vocab = model.config.text.vocab_size
        if ids and max(ids) >= vocab:  # its embedding row does not exist: NaN logits, token 0 for good
            token = model.tokenizer.decode([max(ids)], skip_special_tokens=False)
            raise ValueError(f"the text holds token {max(ids)} ({token!r}), outside the model's vocabulary (size "
                             f"{vocab}): this checkpoint's tokenizer and config disagree")
    else:
        given = prompt["prompt_token_ids"]
        if max_tokens is not None and isinstance(given, (list, tuple)) and len(given) > max_tokens:
            raise TooManyTokens(len(given), max_tokens, exact=True)
        ids = _token_ids(given, model.config.text.vocab_size)
    data = prompt.get("multi_modal_data") or {}
    if not isinstance(data, Mapping) or set(data) - MODALITIES:
        raise ValueError(f"multi_modal_data takes the keys {sorted(MODALITIES)}")
    images = [_image(model, x) for x in _as_list(data.get("image"))]
    videos = [_video(model, x) for x in _videos(data.get("video"))]
    ids = _expand(ids, model.config.image_token_id, images, lambda v: _image_tokens(model, v), "image")
    ids = _expand(ids, model.config.video_token_id, videos, lambda v: _video_tokens(model, v), "video",
                  wrapper=(model.config.vision_start_token_id, model.config.vision_end_token_id))
    if not ids:
        raise ValueError("the prompt is empty")
    if salt is not None:
        images, videos = ([dataclasses.replace(v, content_key=salted_content_key(v.content_key, salt)) for v in kind]
                          for kind in (images, videos))
    return PreparedPrompt(ids, images, videos, salt)


def _encodable(text: str) -> bool:
    """Whether ``text`` is valid Unicode (no lone surrogate, which UTF-8 cannot encode)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _token_ids(ids: Any, vocab_size: int) -> list[int]:
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool)
                                                     for i in ids):  # JSON's true is no token id
        raise ValueError("'prompt_token_ids' must be a list of ints")
    bad = [int(i) for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {vocab_size})")
    return [int(i) for i in ids]


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _videos(value) -> list:
    """One video is a [T, H, W, 3] array, a list of PIL frames, either with its metadata (vLLM's
    ``(frames, {"fps": ..., "frames_indices": [...]})``) or a Visual; anything else is a list of
    videos."""
    if value is None:
        return []
    if isinstance(value, (np.ndarray, Visual)) or (
            isinstance(value, list) and value and isinstance(value[0], Image.Image)) or (
            isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], Mapping)):
        return [value]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _image(model: Model, image) -> Visual:
    if isinstance(image, Visual):  # read already (the router reads headers, see serving/router/media.py)
        return _of_kind(image, "image")
    out = model.processor(images=[image])
    return Visual(out["image_grid_thw"], out["pixel_values"])


def _video(model: Model, video) -> Visual:
    if isinstance(video, Visual):
        return _of_kind(video, "video")
    video, fps, indices = _video_metadata(video)
    out = model.processor(videos=[video])
    return Visual(out["video_grid_thw"], out["pixel_values_videos"],
                  timestamps=model.processor.video_timestamps(indices, fps))


def _video_metadata(video) -> tuple[Any, float, Sequence[int]]:
    """(frames, source fps, the source's index of each frame) of a video given as its frames, or as
    vLLM's ``(frames, metadata)`` with the metadata's ``fps`` and ``frames_indices`` (transformers'
    names): the prompt's timestamps come from them, as transformers' processor writes them. Frames
    given alone are frames 0..n-1 at 24 fps, as transformers assumes then."""
    if not (isinstance(video, tuple) and len(video) == 2 and isinstance(video[1], Mapping)):
        return video, DEFAULT_VIDEO_FPS, range(len(video))
    frames, metadata = video
    fps = metadata.get("fps", DEFAULT_VIDEO_FPS)
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not 0 < fps < math.inf:
        raise ValueError(f"a video's metadata fps must be a positive number, got {fps!r}")
    indices = metadata.get("frames_indices", range(len(frames)))
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence | np.ndarray) \
            or len(indices) != len(frames) or not all(isinstance(i, numbers.Integral) and i >= 0 for i in indices):
        raise ValueError(f"a video's metadata frames_indices must be one index >= 0 per frame ({len(frames)})")
    return frames, float(fps), indices


def _of_kind(visual: Visual, kind: str) -> Visual:
    if visual.source is not None and visual.source.kind != kind:
        raise ValueError(f"an encoded {visual.source.kind} was given as an {kind}")
    return visual


def _image_tokens(model: Model, image: Visual) -> list[int]:
    return [model.config.image_token_id] * model.processor.num_image_tokens(image.grid_thw[0])


def _video_tokens(model: Model, video: Visual) -> list[int]:
    t, h, w = (int(x) for x in video.grid_thw[0])
    per_frame = h * w // model.processor.merge_size**2
    step = model.processor.temporal_patch_size
    stamps = video.timestamps or model.processor.video_timestamps(range(t * step), DEFAULT_VIDEO_FPS)
    if len(stamps) != t:
        raise ValueError(f"a video of {t} temporal patches has {len(stamps)} timestamps")
    out: list[int] = []
    for seconds in stamps:
        out += model.tokenizer.encode(f"<{seconds:.1f} seconds>")
        out += [model.config.vision_start_token_id] + [model.config.video_token_id] * per_frame
        out += [model.config.vision_end_token_id]
    return out


def _expand(ids: list[int], placeholder: int, items: list[Visual], tokens_of, name: str,
            wrapper: tuple[int, int] | None = None) -> list[int]:
    """Replaces the i-th single placeholder with the tokens of item i; with ``wrapper`` (a video's:
    its tokens wrap every frame in vision start/end already), a placeholder between the wrapper's
    two tokens (the chat template's ``<|vision_start|><|video_pad|><|vision_end|>``) is replaced
    with them, as transformers' processor and vLLM do: kept, they put one more pair around all
    the frames, which the model never saw in training."""
    count = ids.count(placeholder)
    if count != len(items):
        raise ValueError(f"the prompt has {count} {name} placeholder(s) but {len(items)} {name}(s) were given")
    out: list[int] = []
    at = 0
    for item in items:  # list.index finds each placeholder in C (a loop over every token: 0.35 ms for 1,200)
        found = ids.index(placeholder, at)
        wrapped = wrapper is not None and at < found and found + 1 < len(ids) and \
            (ids[found - 1], ids[found + 1]) == wrapper
        out += ids[at:found - wrapped]
        if out and out[-1] == placeholder:  # the model would read the two runs as one picture's
            raise ValueError(f"two {name}s' placeholders are next to each other in the prompt: each {name} needs "
                             "other tokens between its placeholder and the one before")
        out += tokens_of(item)
        at = found + 1 + wrapped
    out += ids[at:]
    return out
