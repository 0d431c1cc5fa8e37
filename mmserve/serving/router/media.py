"""Images from requests: ``data:`` URLs, bare base64, and local files inside an allowed directory.

Every failure (not base64, not an image, a path outside the allowed directory, a URL this server
does not fetch) is an ``InvalidRequest`` naming the field, raised before anything is queued.

An ``ImageReader`` reads one request's images and charges each against the request's limits from
its header alone, before a pixel is decoded: the number of images, the pixels of each, and the
tokens they will take, which alone may not exceed the context. So the most a request makes the
router decode and process is bounded by those limits, whatever the header of an image claims.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from mmserve.serving.router.errors import InvalidRequest
from mmserve.serving.router.settings import RouterSettings
from models.qwen3_vl_moe.processor import Processor

# What OpenAI takes, plus BMP; Pillow's other readers (EPS runs Ghostscript, and the rarer formats
# see the least scrutiny) stay closed to requests.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


class ImageReader:
    def __init__(self, settings: RouterSettings, processor: Processor):
        self.settings = settings
        self.processor = processor
        self.count = 0
        self.tokens = 0

    def from_url(self, url: str, param: str) -> Image.Image:
        """An ``image_url``'s image: a data URL, a ``file://`` URL or a local path."""
        if not isinstance(url, str) or not url:
            raise InvalidRequest("an image URL must be a non-empty string", param)
        if url.startswith("data:"):
            return self._from_data_url(url, param)
        scheme = urlparse(url).scheme
        if scheme == "file":
            return self._from_file(Path(unquote(urlparse(url).path)), param)
        if scheme in ("http", "https"):
            raise InvalidRequest("this server does not fetch images over the network; send a data: URL", param)
        if scheme:
            raise InvalidRequest(f"unsupported image URL scheme {scheme!r}", param)
        return self._from_file(Path(url), param)

    def from_base64(self, data: str, param: str) -> Image.Image:
        if not isinstance(data, str):
            raise InvalidRequest("an image must be a base64 string", param)
        self._count(param)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as error:
            raise InvalidRequest(f"the image is not valid base64: {error}", param) from None
        return self._decode(raw, param)

    def _from_data_url(self, url: str, param: str) -> Image.Image:
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InvalidRequest("a data URL must look like data:image/<type>;base64,<data>", param)
        media_type = header[len("data:"):-len(";base64")]
        if not media_type.startswith("image/"):
            raise InvalidRequest(f"the data URL's media type {media_type!r} is not an image type", param)
        return self.from_base64(payload, param)

    def _from_file(self, path: Path, param: str) -> Image.Image:
        allowed_dir = self.settings.allowed_local_media_path
        if allowed_dir is None:
            raise InvalidRequest("local image files are disabled on this server (see --allowed-local-media-path); "
                                 "send a data: URL", param)
        resolved = path.resolve()
        if not resolved.is_relative_to(allowed_dir.resolve()):
            raise InvalidRequest(f"the image path is outside the allowed directory {str(allowed_dir)!r}", param)
        self._count(param)
        try:
            raw = resolved.read_bytes()
        except OSError as error:
            raise InvalidRequest(f"cannot read the image file: {error.strerror}", param) from None
        return self._decode(raw, param)

    def _count(self, param: str) -> None:
        self.count += 1
        if self.count > self.settings.max_images_per_request:
            raise InvalidRequest(f"a request may carry at most {self.settings.max_images_per_request} images "
                                 "(see --max-images-per-request)", param)

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
            self.tokens += self.processor.num_tokens_of_image(height, width)
        except ValueError as error:  # an aspect ratio the processor refuses
            raise InvalidRequest(f"the image cannot be processed: {error}", param) from None
        if self.tokens > self.settings.max_model_len:
            raise InvalidRequest(f"This model's maximum context length is {self.settings.max_model_len} tokens, and "
                                 f"the images up to this one alone take {self.tokens} tokens", param,
                                 "context_length_exceeded")

    def _too_many_pixels(self, size: str | None, param: str) -> InvalidRequest:
        return InvalidRequest(f"the image{f' ({size})' if size else ''} has more pixels than this server accepts "
                              f"({self.settings.max_image_pixels}; see --max-image-pixels)", param)
