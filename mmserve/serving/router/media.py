"""Images and videos from requests: ``data:`` URLs, bare base64 (images), local files inside an
allowed directory, and http(s) URLs of allowed hosts (``media_fetch.py``).

Every failure (not base64, not an image or video, a path outside the allowed directory, a URL this
server does not fetch) is an ``InvalidRequest`` naming the field, raised before anything is queued.

A ``MediaReader`` reads one request's images and videos and charges each against the request's
limits from their headers alone: the number of images and of videos, the pixels of an image or a
video frame, a video's duration, and the tokens they will take, which alone may not exceed the
context (a video's frames are counted from its packets, ``models/qwen3_vl_moe/media.py``). The
router decodes no pixel: each medium becomes a ``Visual`` holding the client's encoded bytes and the
grid its header gives, and is decoded where it is processed (the encode role; in colocated mode the
backend's worker thread). An image's structure is still checked at the door (``verify_image``), so
most broken files are a 400 here; one that passes and still fails to decode is refused by whoever
decodes it, and that is a 400 too.
"""

from __future__ import annotations

import base64
import binascii
import stat
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image

from mmserve.engine.inputs import EncodedMedia, Visual
from mmserve.serving.router.errors import InvalidRequest
from mmserve.serving.router.media_fetch import fetch_media
from mmserve.serving.router.settings import RouterSettings
from models.qwen3_vl_moe.media import BadMedia, BadVideo, open_image, read_video_header, upright_size, verify_image
from models.qwen3_vl_moe.processor import Processor


class MediaReader:
    def __init__(self, settings: RouterSettings, processor: Processor):
        self.settings = settings
        self.processor = processor
        self.count = {"image": 0, "video": 0}
        self.tokens = 0

    def from_url(self, url: str, param: str) -> Visual:
        """An ``image_url``'s image: a data URL, a ``file://`` URL or a local path."""
        return self._image(self._read_url(url, "image", param), param)

    def video_from_url(self, url: str, param: str) -> Visual:
        """A ``video_url``'s video: a data URL, a ``file://`` URL or a local path."""
        raw = self._read_url(url, "video", param)
        try:
            header = read_video_header(raw, self.settings.max_video_frames)
            sampled = self.processor.sample_frame_indices(header.frames, header.fps)
            if header.frames > self.settings.max_video_frames:
                raise BadVideo(f"the video has more than {self.settings.max_video_frames} frames, the most this server "
                               "accepts (see --max-video-frames)")
            if header.seconds > self.settings.max_video_seconds:
                raise BadVideo(f"the video lasts {header.seconds:.1f} s, more than this server accepts "
                               f"({self.settings.max_video_seconds} s; see --max-video-seconds)")
            if header.width * header.height > self.settings.max_image_pixels:
                raise BadVideo(f"the video's frames ({header.width}x{header.height}) have more pixels than this "
                               f"server accepts ({self.settings.max_image_pixels}; see --max-image-pixels)")
            decoded = (int(sampled[-1]) + 1) * header.width * header.height
            if decoded > self.settings.max_video_decode_pixels:
                raise BadVideo(f"decoding the video would read {decoded} pixels (its frames up to the last one "
                               f"sampled), more than this server accepts ({self.settings.max_video_decode_pixels}; "
                               "see --max-video-decode-pixels)")
            grid = self.processor.video_grid(len(sampled), header.height, header.width)
        except ValueError as error:  # BadVideo, or a size the processor refuses
            raise InvalidRequest(str(error), param) from None
        self._charge_tokens(self.processor.num_image_tokens(grid), "video", param)
        return Visual(np.array([grid]), source=EncodedMedia("video", raw),
                      timestamps=self.processor.video_timestamps(sampled, header.fps))

    def from_base64(self, data: str, param: str) -> Visual:
        self._count("image", param)
        return self._image(self._base64(data, "image", param), param)

    def _read_url(self, url: str, kind: str, param: str) -> bytes:
        if not isinstance(url, str) or not url:
            raise InvalidRequest(f"an {kind} URL must be a non-empty string", param)
        if url.startswith("data:"):
            return self._from_data_url(url, kind, param)
        scheme = urlparse(url).scheme
        if scheme == "file":
            return self._from_file(Path(unquote(urlparse(url).path)), kind, param)
        if scheme in ("http", "https"):
            self._count(kind, param)
            return fetch_media(url, self.settings, kind, param)
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
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop (Python before 3.13)
            raise InvalidRequest(f"cannot read the {kind} file: {error}", param) from None
        if not resolved.is_relative_to(allowed_dir.resolve()):
            raise InvalidRequest(f"the {kind} path is outside the allowed directory {str(allowed_dir)!r}", param)
        self._count(kind, param)
        try:
            if not stat.S_ISREG(resolved.stat().st_mode):  # a FIFO or a device would block or never end
                raise InvalidRequest(f"the {kind} path is not a regular file", param)
            with resolved.open("rb") as file:
                raw = file.read(self.settings.max_body_bytes + 1)
            if len(raw) > self.settings.max_body_bytes:
                raise InvalidRequest(f"the {kind} file is larger than a request body may be "
                                     f"({self.settings.max_body_bytes} bytes; see --max-body-bytes)", param)
            return raw
        except OSError as error:
            raise InvalidRequest(f"cannot read the {kind} file: {error.strerror}", param) from None

    def _count(self, kind: str, param: str) -> None:
        self.count[kind] += 1
        limit = self.settings.max_images_per_request if kind == "image" else self.settings.max_videos_per_request
        if self.count[kind] > limit:
            raise InvalidRequest(f"a request may carry at most {limit} {kind}s (see --max-{kind}s-per-request)", param)

    def _image(self, raw: bytes, param: str) -> Visual:
        """Reads the header, charges its size, and checks the file's structure, without decoding it."""
        try:
            image = open_image(raw)
        except Image.DecompressionBombError:
            raise self._too_many_pixels(None, param) from None
        except BadMedia as error:
            raise InvalidRequest(str(error), param) from None
        if image.width * image.height > self.settings.max_image_pixels:
            raise self._too_many_pixels(f"{image.width}x{image.height}", param)
        try:
            grid = self.processor.image_grid(*upright_size(image))
        except ValueError as error:  # an aspect ratio the processor refuses
            raise InvalidRequest(f"the image cannot be processed: {error}", param) from None
        self._charge_tokens(self.processor.num_image_tokens(grid), "image", param)
        try:
            verify_image(raw)
        except BadMedia as error:
            raise InvalidRequest(str(error), param) from None
        return Visual(np.array([grid]), source=EncodedMedia("image", raw))

    def _charge_tokens(self, tokens: int, kind: str, param: str) -> None:
        self.tokens += tokens
        if self.tokens > self.settings.max_model_len:
            raise InvalidRequest(f"This model's maximum context length is {self.settings.max_model_len} tokens, and "
                                 f"the images and videos up to this {kind} alone take {self.tokens} tokens", param,
                                 "context_length_exceeded")

    def _too_many_pixels(self, size: str | None, param: str) -> InvalidRequest:
        return InvalidRequest(f"the image{f' ({size})' if size else ''} has more pixels than this server accepts "
                              f"({self.settings.max_image_pixels}; see --max-image-pixels)", param)
