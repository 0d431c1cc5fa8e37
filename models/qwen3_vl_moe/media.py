"""Images and videos from the files clients send (JPEG, PNG, MP4, ...) to what the processor takes.

The router reads only headers (a size, a video's frame count) to know a visual's grid and cost;
the pixels are decoded where they are processed (the encode role, the colocated backend's worker
thread), from the same bytes with these same functions, so both sides agree.

Videos are decoded with PyAV (FFmpeg). Frames are sampled as Qwen3-VL's video processor samples
them (``Processor.sample_frame_indices``: ``fps`` frames a second of the source, clamped to
[min_frames, max_frames]), so what the model sees equals the offline ``LLM`` given the same sampled
frames. What a video will cost is known before a frame is decoded: the container is demuxed
(packets only, cheap) to count its frames. Only the sampled frames are kept, each shrunk at once to
the size the processor gives the source's frames, and decoding stops after the last of them.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image

from models.qwen3_vl_moe.processor import Processor
from models.qwen3_vl_moe.resize import resize_bicubic_uint8

# What OpenAI takes, plus BMP; Pillow's other readers (EPS runs Ghostscript, and the rarer formats
# see the least scrutiny) stay closed to requests.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_JPEG_SCANS = 64
"""A progressive JPEG's scans, at most (encoders write about 10): each scan is a pass over the whole
image, so a file of thousands of tiny scans costs minutes of decoding for a picture worth a
fraction of a second."""
_MARKER = re.compile(rb"\xff[^\x00\x01\xd0-\xd7\xff]")
"""A marker with a length (or EOI): not a stuffed FF 00, a restart, TEM, nor a fill byte before one."""
_SOS, _EOI = 0xDA, 0xD9


def jpeg_scans(raw: bytes, stop: int) -> int:
    """The scans (SOS markers) of a JPEG's first image, counted up to ``stop``: its marker segments
    are walked by their lengths (an APP segment or a thumbnail holding FF DA is skipped whole), the
    scans' data by a search for the next marker, and what follows its end (EOI: a phone's
    motion-photo video, a second MPO picture) is not looked at. Pillow parses the segments only
    up to the first scan."""
    scans, at = 0, 2  # past SOI
    while scans < stop and (found := _MARKER.search(raw, at)) is not None:
        at = found.start()
        marker = raw[at + 1]
        if marker == _EOI:
            break
        scans += marker == _SOS
        at += 2 + max(int.from_bytes(raw[at + 2:at + 4], "big"), 2)  # the segment's header, by its length
    return scans
VIDEO_CONTAINERS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi"
"""FFmpeg demuxers a client's video may be read with (its ``format_whitelist``): MP4/QuickTime,
Matroska/WebM, AVI. Left to probe every demuxer, FFmpeg reads a playlist of files (``ffconcat``:
the server's own files, their text decoded into frames the model reads back) or a session
description that binds UDP ports and waits for packets (SDP) from a few bytes of text. No other
input is opened from within one (``protocol_whitelist``): a container naming another file or URL
fails."""
_VIDEO_OPTIONS = {"format_whitelist": VIDEO_CONTAINERS, "protocol_whitelist": "none"}


class BadMedia(ValueError):
    """The bytes are not an image or video this server can read; the message says why."""


class BadVideo(BadMedia):
    """The bytes are not a video this server can read, or it passes a limit; the message says which."""


def open_image(raw: bytes) -> Image.Image:
    """The image with only its header read (size, mode). Pillow's ``DecompressionBombError`` (a
    header claiming absurdly many pixels) is left to the caller, which names its own limit."""
    try:
        image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
        if image.format in ("JPEG", "MPO") and jpeg_scans(raw, MAX_JPEG_SCANS + 1) > MAX_JPEG_SCANS:
            raise BadMedia(f"the JPEG has more than {MAX_JPEG_SCANS} scans, the most this server decodes")
        return image
    except (Image.DecompressionBombError, BadMedia):
        raise
    except Image.UnidentifiedImageError:
        raise BadMedia(f"the data is not an image in a format this server reads ({', '.join(IMAGE_FORMATS)})") \
            from None
    except Exception as error:  # a header Pillow recognises but cannot parse
        raise BadMedia(f"the image cannot be decoded: {type(error).__name__}: {error}") from None


_ORIENTATION = 0x0112
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
"""How to turn an image stored with an EXIF orientation upright (Pillow's ``ImageOps.exif_transpose``)."""


def orientation(image: Image.Image) -> int:
    """The orientation (1-8) the file's header gives (1: none, or unreadable), as transformers'
    ``load_image`` reads it (``ImageOps.exif_transpose``: the EXIF tag, else XMP's
    ``tiff:Orientation``), without decoding the pixels, so the router (which reads headers only)
    and the worker (which decodes) agree on it. ``Image.getexif`` of the base class: a PNG's own
    decodes the pixels first (to find an eXIf chunk after them, which is then not seen here)."""
    try:
        value = Image.Image.getexif(image).get(_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: the image as stored
        return 1
    return value if value in _UPRIGHT else 1


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) once upright, as transformers' ``load_image`` turns a file upright."""
    transposed = orientation(image) in (5, 6, 7, 8)
    return (image.width, image.height) if transposed else (image.height, image.width)


def verify_image(raw: bytes) -> None:
    """Pillow's cheap check of the file's structure without decoding its pixels (a PNG's chunks and
    their checksums, a truncated file): catches most broken files at the door."""
    try:
        open_image(raw).verify()
    except BadMedia:
        raise
    except Exception as error:
        raise BadMedia(f"the image cannot be decoded: {type(error).__name__}: {error}") from None


def decode_image(raw: bytes) -> Image.Image:
    """The whole image decoded, so a truncated or bogus file fails here and not in the processor,
    and turned upright by its EXIF orientation, as transformers' ``load_image`` does (a phone's
    photo is stored sideways with orientation 6)."""
    try:
        image = open_image(raw)
        turn = _UPRIGHT.get(orientation(image))
        image.load()
        if turn is not None:
            image = image.transpose(turn)
    except BadMedia:
        raise
    except Exception as error:  # truncated data, a broken codec stream, a decompression bomb
        raise BadMedia(f"the image cannot be decoded: {type(error).__name__}: {error}") from None
    return image


@dataclass(frozen=True)
class VideoHeader:
    """What a video is, read without decoding a frame."""

    frames: int
    fps: float
    width: int
    height: int

    @property
    def seconds(self) -> float:
        return self.frames / self.fps


def read_video_header(raw: bytes, max_frames: int | None = None) -> VideoHeader:
    """Counts the video stream's packets (one per frame) and reads its rate and frame size. With
    ``max_frames`` the count stops past it (a caller refusing such a video need not demux the rest).
    Packets marked to be discarded (frames before a cut that kept them only for decoding the next:
    an edit list) are not counted: decoders decode them and return none of them."""
    try:
        with _open_video(raw) as container:
            stream = _video_stream(container)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            width, height = stream.codec_context.width, stream.codec_context.height
            frames = 0
            for packet in container.demux(stream):
                frames += 1 if packet.size and not packet.is_discard else 0
                if max_frames is not None and frames > max_frames:
                    break
    except (av.FFmpegError, UnicodeDecodeError) as error:  # PyAV decodes the container's tags as UTF-8
        raise BadVideo(f"the data is not a video this server can read: {error}") from None
    if not rate or rate <= 0:
        raise BadVideo("the video has no frame rate")
    if frames == 0 or width < 1 or height < 1:
        raise BadVideo("the video has no frames")
    return VideoHeader(frames, float(rate), width, height)


def decode_sampled_frames(raw: bytes, header: VideoHeader, processor: Processor) -> np.ndarray:
    """The frames the processor samples, [T, H, W, 3] uint8, each resized at once to the size the
    processor gives the source's frames (``Processor.video_at_size`` takes them as they are: only
    the sampled frames, at that size, are ever held), decoded in one pass that stops after the last
    of them."""
    keep: dict[int, np.ndarray] = {}
    try:
        wanted = processor.sample_frame_indices(header.frames, header.fps)
        size = processor.video_size(len(wanted), header.height, header.width)
        targets = set(wanted.tolist())
        last = int(wanted[-1])
        with _open_video(raw) as container:
            stream = _video_stream(container)
            for index, frame in enumerate(container.decode(stream)):
                # every frame, not only the sampled ones: the header's size is what the router held to
                # its pixel limit, and larger frames between the sampled ones would cost their decoding
                if (frame.height, frame.width) != (header.height, header.width):
                    raise BadVideo("the video's frames change size")
                if index in targets:
                    pixels = frame.to_ndarray(format="rgb24")
                    keep[index] = resize_bicubic_uint8(pixels[None], *size)[0] if size != pixels.shape[:2] else pixels
                if index >= last:
                    break
    except BadMedia:
        raise
    except Exception as error:  # as for images: whatever a bogus stream makes PyAV or the resize raise
        raise BadVideo(f"the video cannot be decoded: {type(error).__name__}: {error}") from None
    if len(keep) != len(targets):
        raise BadVideo(f"the video has fewer decodable frames than its {header.frames} packets")
    return np.stack([keep[i] for i in wanted.tolist()])


def _open_video(raw: bytes):
    return av.open(io.BytesIO(raw), mode="r", options=_VIDEO_OPTIONS)


def _video_stream(container):
    if not container.streams.video:
        raise BadVideo("the data has no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # PyAV has no decoder for it
        raise BadVideo("the video's codec is not one this server can decode")
    stream.thread_type = "AUTO"
    return stream
