"""Images and videos from requests: ``data:`` URLs, bare base64 (images), and local files inside an
allowed directory.

Every failure (not base64, not an image or video, a path outside the allowed directory, a URL this
server does not fetch) is an ``InvalidRequest`` naming the field, raised before anything is queued.

A ``MediaReader`` reads one request's images and videos and charges each against the request's
limits before a pixel is decoded: the number of images and of videos, the pixels of an image or a
video frame, a video's duration, and the tokens they will take, which alone may not exceed the
context. So the most a request makes the router decode and process is bounded by those limits,
whatever a header claims (a video's frames are counted from its packets, ``video.py``).
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image

from mmserve.serving.router.errors import InvalidRequest
from mmserve.serving.router.settings import RouterSettings
from mmserve.serving.router.video import BadVideo, decode_sampled_frames, read_header
from models.qwen3_vl_moe.processor import Processor

# What OpenAI takes, plus BMP; Pillow's other readers (EPS runs Ghostscript, and the rarer formats
# see the least scrutiny) stay closed to requests.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


class MediaReader:
    def __init__(self, settings: RouterSettings, processor: Processor):
        self.settings = settings
        self.processor = processor
        self.count = {"image": 0, "video": 0}
        self.tokens = 0

    def from_url(self, url: str, param: str) -> Image.Image:
        """An ``image_url``'s image: a data URL, a ``file://`` URL or a local path."""
        return self._decode(self._read_url(url, "image", param), param)

    def video_from_url(self, url: str, param: str) -> np.ndarray:
        """A ``video_url``'s sampled frames, [T, H, W, 3] uint8: a data URL, a ``file://`` URL or a
        local path."""
        raw = self._read_url(url, "video", param)
        try:
            header = read_header(raw)
            sampled = len(self.processor.sample_frame_indices(header.frames, header.fps))
            if header.seconds > self.settings.max_video_seconds:
                raise BadVideo(f"the video lasts {header.seconds:.1f} s, more than this server accepts "
                               f"({self.settings.max_video_seconds} s; see --max-video-seconds)")
            if header.width * header.height > self.settings.max_image_pixels:
                raise BadVideo(f"the video's frames ({header.width}x{header.height}) have more pixels than this "
                               f"server accepts ({self.settings.max_image_pixels}; see --max-image-pixels)")
            self._charge_tokens(self.processor.num_tokens_of_video(sampled, header.height, header.width), "video",
                                param)
            return decode_sampled_frames(raw, header, self.processor)
        except ValueError as error:  # BadVideo, or a size the processor refuses
            raise InvalidRequest(str(error), param) from None

    def from_base64(self, data: str, param: str) -> Image.Image:
        self._count("image", param)
        return self._decode(self._base64(data, "image", param), param)

    def _read_url(self, url: str, kind: str, param: str) -> bytes:
        if not isinstance(url, str) or not url:
            raise InvalidRequest(f"an {kind} URL must be a non-empty string", param)
        if url.startswith("data:"):
            return self._from_data_url(url, kind, param)
        scheme = urlparse(url).scheme
        if scheme == "file":
            return self._from_file(Path(unquote(urlparse(url).path)), kind, param)
        if scheme in ("http", "https"):
            raise InvalidRequest(f"this server does not fetch {kind}s over the network; send a data: URL", param)
        if scheme:
            raise InvalidRequest(f"unsupported {kind} URL scheme {scheme!r}", param)
        return self._from_file(Path(url), kind, param)

    def _base64(self, data: str, kind: str, param: str) -> bytes:
        if not isinstance(data, str):
            raise InvalidRequest(f"an {kind} must be a base64 string", param)
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as error:
            raise InvalidRequest(f"the {kind} is not valid base64: {error}", param) from None

    def _from_data_url(self, url: str, kind: str, param: str) -> bytes:
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InvalidRequest(f"a data URL must look like data:{kind}/<type>;base64,<data>", param)
        media_type = header[len("data:"):-len(";base64")]
        if not media_type.startswith(f"{kind}/"):
            raise InvalidRequest(f"the data URL's media type {media_type!r} is not an {kind} type", param)
        self._count(kind, param)
        return self._base64(payload, kind, param)

    def _from_file(self, path: Path, kind: str, param: str) -> bytes:
        allowed_dir = self.settings.allowed_local_media_path
        if allowed_dir is None:
            raise InvalidRequest(f"local {kind} files are disabled on this server (see --allowed-local-media-path); "
                                 "send a data: URL", param)
        resolved = path.resolve()
        if not resolved.is_relative_to(allowed_dir.resolve()):
            raise InvalidRequest(f"the {kind} path is outside the allowed directory {str(allowed_dir)!r}", param)
        self._count(kind, param)
        try:
            if resolved.stat().st_size > self.settings.max_body_bytes:
                raise InvalidRequest(f"the {kind} file is larger than a request body may be "
                                     f"({self.settings.max_body_bytes} bytes; see --max-body-bytes)", param)
            return resolved.read_bytes()
        except OSError as error:
            raise InvalidRequest(f"cannot read the {kind} file: {error.strerror}", param) from None

    def _count(self, kind: str, param: str) -> None:
        self.count[kind] += 1
        limit = self.settings.max_images_per_request if kind == "image" else self.settings.max_videos_per_request
        if self.count[kind] > limit:
            raise InvalidRequest(f"a request may carry at most {limit} {kind}s (see --max-{kind}s-per-request)", param)

    def _decode(self, raw: bytes, param: str) -> Image.Image:
        """Opens the header, charges its size, then decodes fully now, so a truncated or bogus file
        fails here and not in the processor."""
        try:
            image = Image.open(io.BytesIO(raw), formats=FORMATS)
        except Image.DecompressionBombError:
            raise self._too_many_pixels(None, param) from None
        except Image.UnidentifiedImageError:
            raise InvalidRequest(f"the data is not an image in a format this server reads ({', '.join(FORMATS)})",
                                 param) from None
        except Exception as error:  # a header Pillow recognises but cannot parse
            raise InvalidRequest(f"the image cannot be decoded: {type(error).__name__}: {error}", param) from None
        self._charge(image.width, image.height, param)
        try:
            image.load()
        except Exception as error:  # truncated data, a broken codec stream
            raise InvalidRequest(f"the image cannot be decoded: {type(error).__name__}: {error}", param) from None
        return image

    def _charge(self, width: int, height: int, param: str) -> None:
        if width * height > self.settings.max_image_pixels:
            raise self._too_many_pixels(f"{width}x{height}", param)
        try:
            tokens = self.processor.num_tokens_of_image(height, width)
        except ValueError as error:  # an aspect ratio the processor refuses
            raise InvalidRequest(f"the image cannot be processed: {error}", param) from None
        self._charge_tokens(tokens, "image", param)

    def _charge_tokens(self, tokens: int, kind: str, param: str) -> None:
        self.tokens += tokens
        if self.tokens > self.settings.max_model_len:
            raise InvalidRequest(f"This model's maximum context length is {self.settings.max_model_len} tokens, and "
                                 f"the images and videos up to this {kind} alone take {self.tokens} tokens", param,
                                 "context_length_exceeded")

    def _too_many_pixels(self, size: str | None, param: str) -> InvalidRequest:
        return InvalidRequest(f"the image{f' ({size})' if size else ''} has more pixels than this server accepts "
                              f"({self.settings.max_image_pixels}; see --max-image-pixels)", param)
