"""Videos for tests: random frames in a lossless codec (FFV1 in Matroska), so the frames the server
decodes are known exactly and can be handed to the offline ``LLM`` as they are."""

from __future__ import annotations

import base64
import io
from fractions import Fraction

import av
import numpy as np


def random_frames(seed: int, count: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def lossless_video(frames: np.ndarray, fps: int) -> bytes:
    return encoded_video(frames, fps)


def encoded_video(frames: np.ndarray, fps: int, container: str = "matroska", codec: str = "ffv1",
                  pix_fmt: str = "bgr0", title: str | None = None) -> bytes:
    """``frames`` ([T, H, W, 3] uint8) in ``container`` and ``codec`` (lossless by default)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        if title is not None:
            out.metadata["title"] = title
        stream = out.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def video_with_hidden_frames(frames: np.ndarray, fps: int, hidden: int) -> bytes:
    """``frames`` as an H.264 MP4 whose first ``hidden`` frames come before its presentation starts
    (negative timestamps, an edit list), as a cut without re-encoding (``ffmpeg -ss 2 -c copy``)
    writes it: decoders decode them for the frames after, and return only those."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"bframes": "0", "keyint": "1000"}
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts = index - hidden
            for packet in stream.encode(picture):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def video_data_url(raw: bytes) -> str:
    return "data:video/x-matroska;base64," + base64.b64encode(raw).decode()


def _h264_annexb(width: int, height: int, count: int) -> list[bytes]:
    """``count`` black H.264 frames of this size, each packet carrying its parameter sets."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "bframes": "0", "keyint": "1000", "crf": "51", "scenecut": "0",
                          "repeat-headers": "1"}
        frame = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
        packets = []
        for pts in range(count):
            frame.pts = pts
            packets += [bytes(p) for p in stream.encode(frame)]
        packets += [bytes(p) for p in stream.encode()]
    return packets


def _nal_units(annexb: bytes) -> list[bytes]:
    return [unit.rstrip(b"\x00") for unit in annexb.split(b"\x00\x00\x01") if unit.rstrip(b"\x00")]


def _length_prefixed(annexb: bytes) -> bytes:
    return b"".join(len(unit).to_bytes(4, "big") + unit for unit in _nal_units(annexb))


def size_switching_video(count: int, fps: int, small_at: set[int], big: tuple[int, int]) -> bytes:
    """An MP4 whose header, and frames ``small_at``, are 64x64, and whose other frames are ``big``
    (each carrying its own parameter sets): a file whose header undersells what decoding it costs."""
    small_frame = _h264_annexb(64, 64, 1)[0]
    big_key, big_next = _h264_annexb(*big, 2)[:2]
    template_buffer = io.BytesIO()
    with av.open(template_buffer, "w", format="mp4") as template:
        stream = template.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.options = {"preset": "ultrafast", "bframes": "0", "crf": "51"}
        frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
        frame.pts = 0
        for packet in [*stream.encode(frame), *stream.encode()]:
            template.mux(packet)
    template_buffer.seek(0)
    small, big_key, big_next = (_length_prefixed(x) for x in (small_frame, big_key, big_next))
    out_buffer = io.BytesIO()
    with av.open(template_buffer) as source, av.open(out_buffer, "w", format="mp4") as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        stream.time_base = Fraction(1, fps)
        previous_big = False
        for index in range(count):
            if index in small_at:
                data, previous_big = small, False
            elif not previous_big:
                data, previous_big = big_key, True
            else:
                data = big_next
            packet = av.Packet(data)
            packet.stream, packet.time_base = stream, Fraction(1, fps)
            packet.pts = packet.dts = index
            packet.is_keyframe = data is not big_next
            out.mux(packet)
    return out_buffer.getvalue()
