"""A video from a request's bytes to the frames Qwen3-VL sees, decoded with PyAV (FFmpeg).

Frames are sampled as Qwen3-VL's video processor samples them (``Processor.sample_frame_indices``:
``fps`` frames a second of the source, clamped to [min_frames, max_frames]), so what the model sees
equals the offline ``LLM`` given the same sampled frames. What a video will cost is known before
a frame is decoded: the container is demuxed first (packets only, cheap) to count its frames, and
its duration, frame size and tokens are charged against the request's limits. Only the sampled
frames are kept, each shrunk at once to the size the processor would give it (when that size is
stable, so processing it again changes nothing), and decoding stops after the last of them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np

from models.qwen3_vl_moe.processor import Processor
from models.qwen3_vl_moe.resize import resize_bicubic_uint8


class BadVideo(ValueError):
    """The bytes are not a video this server can read, or it passes a limit; the message says which."""


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


def read_header(raw: bytes) -> VideoHeader:
    """Counts the video stream's packets (one per frame) and reads its rate and frame size."""
    try:
        with av.open(io.BytesIO(raw), mode="r") as container:
            stream = _video_stream(container)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            width, height = stream.codec_context.width, stream.codec_context.height
            frames = sum(1 for packet in container.demux(stream) if packet.size)
    except av.FFmpegError as error:
        raise BadVideo(f"the data is not a video this server can read: {error}") from None
    if not rate or rate <= 0:
        raise BadVideo("the video has no frame rate")
    if frames == 0 or width < 1 or height < 1:
        raise BadVideo("the video has no frames")
    return VideoHeader(frames, float(rate), width, height)


def decode_sampled_frames(raw: bytes, header: VideoHeader, processor: Processor) -> np.ndarray:
    """The frames the processor samples, [T, H, W, 3] uint8, decoded in one pass that stops after the
    last of them."""
    wanted = processor.sample_frame_indices(header.frames, header.fps)
    size = processor.video_size(len(wanted), header.height, header.width)
    stable = processor.video_size(len(wanted), *size) == size
    keep: dict[int, np.ndarray] = {}
    targets = set(wanted.tolist())
    last = int(wanted[-1])
    try:
        with av.open(io.BytesIO(raw), mode="r") as container:
            stream = _video_stream(container)
            for index, frame in enumerate(container.decode(stream)):
                if index in targets:
                    pixels = frame.to_ndarray(format="rgb24")
                    if pixels.shape[:2] != (header.height, header.width):
                        raise BadVideo("the video's frames change size")
                    keep[index] = resize_bicubic_uint8(pixels[None], *size)[0] if stable and size != pixels.shape[:2] \
                        else pixels
                if index >= last:
                    break
    except av.FFmpegError as error:
        raise BadVideo(f"the video cannot be decoded: {error}") from None
    if len(keep) != len(targets):
        raise BadVideo(f"the video has fewer decodable frames than its {header.frames} packets")
    return np.stack([keep[i] for i in wanted.tolist()])


def _video_stream(container):
    if not container.streams.video:
        raise BadVideo("the data has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream
