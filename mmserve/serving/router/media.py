"""Images from requests: ``data:`` URLs, bare base64, and local files inside an allowed directory.

Every failure (not base64, not an image, a path outside the allowed directory, a URL this server
does not fetch) is an ``InvalidRequest`` naming the field, raised before anything is queued.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from mmserve.serving.router.errors import InvalidRequest


def image_from_url(url: str, param: str, allowed_dir: Path | None) -> Image.Image:
    """An ``image_url``'s image: a data URL, a ``file://`` URL or a local path."""
    if not isinstance(url, str) or not url:
        raise InvalidRequest("an image URL must be a non-empty string", param)
    if url.startswith("data:"):
        return _from_data_url(url, param)
    scheme = urlparse(url).scheme
    if scheme == "file":
        return _from_file(Path(unquote(urlparse(url).path)), param, allowed_dir)
    if scheme in ("http", "https"):
        raise InvalidRequest("this server does not fetch images over the network; send a data: URL", param)
    if scheme:
        raise InvalidRequest(f"unsupported image URL scheme {scheme!r}", param)
    return _from_file(Path(url), param, allowed_dir)


def image_from_base64(data: str, param: str) -> Image.Image:
    if not isinstance(data, str):
        raise InvalidRequest("an image must be a base64 string", param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidRequest(f"the image is not valid base64: {error}", param) from None
    return _decode(raw, param)


def _from_data_url(url: str, param: str) -> Image.Image:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise InvalidRequest("a data URL must look like data:image/<type>;base64,<data>", param)
    media_type = header[len("data:"):-len(";base64")]
    if not media_type.startswith("image/"):
        raise InvalidRequest(f"the data URL's media type {media_type!r} is not an image type", param)
    return image_from_base64(payload, param)


def _from_file(path: Path, param: str, allowed_dir: Path | None) -> Image.Image:
    if allowed_dir is None:
        raise InvalidRequest("local image files are disabled on this server (see --allowed-local-media-path); "
                             "send a data: URL", param)
    resolved = path.resolve()
    if not resolved.is_relative_to(allowed_dir.resolve()):
        raise InvalidRequest(f"the image path is outside the allowed directory {str(allowed_dir)!r}", param)
    try:
        raw = resolved.read_bytes()
    except OSError as error:
        raise InvalidRequest(f"cannot read the image file: {error.strerror}", param) from None
    return _decode(raw, param)


def _decode(raw: bytes, param: str) -> Image.Image:
    """Decodes fully now, so a truncated or bogus file fails here and not in the processor."""
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except Image.UnidentifiedImageError:
        raise InvalidRequest("the data is not an image in a format Pillow reads (PNG, JPEG, WebP, ...)",
                             param) from None
    except Exception as error:  # truncated data, a decompression bomb, a broken codec stream
        raise InvalidRequest(f"the image cannot be decoded: {type(error).__name__}: {error}", param) from None
    return image
