"""Videos for tests: random frames in a lossless codec (FFV1 in Matroska), so the frames the server
decodes are known exactly and can be handed to the offline ``LLM`` as they are."""

from __future__ import annotations

import base64
import io

import av
import numpy as np


def random_frames(seed: int, count: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def lossless_video(frames: np.ndarray, fps: int) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "bgr0"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def video_data_url(raw: bytes) -> str:
    return "data:video/x-matroska;base64," + base64.b64encode(raw).decode()
