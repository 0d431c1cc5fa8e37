"""What the router must know besides its backend: the served name, the context length, access, and
the limits on what a request may make it read or decode."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from mmserve.serving.router.reasoning_parser import PARSERS as REASONING_PARSERS

MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class RouterSettings:
    """What the router needs besides its backend. The fields from ``max_body_bytes`` on are
    ``serve.py`` flags (their docstrings are the help, :mod:`mmserve.config_flags`): the door's
    limits, each refused with a 4xx before the router holds more than it allows, and admission
    (``admission.py``, ``relay.py``); ``reasoning_parser`` shapes chat answers."""

    model_name: str
    """the one name ``model`` may take in requests (``/v1/models`` lists it)"""
    max_model_len: int
    """the backend's context (prompt + output); longer requests are refused with a 400 here, before
    any backend work"""
    api_key: str | None = None
    """when set, ``/v1/*`` and ``/generate`` need ``Authorization: Bearer <api_key>``"""
    allowed_local_media_path: Path | None = None
    """let requests name images by local path or file:// URL inside this directory; none: local files
    are refused, since a client must not make the server open arbitrary paths"""
    allowed_media_domains: str | None = None
    """comma-separated hosts whose http(s) image and video URLs the router fetches (a redirect only to
    one of them too); none: URLs are refused, since a client must not make the server reach arbitrary
    hosts"""
    media_fetch_timeout_s: float = 10.0
    """seconds a fetch of an allowed http(s) image or video may take in all"""
    reasoning_parser: str | None = None
    """split a thinking model's chat answers into reasoning_content (what it writes inside <think> ...
    </think>) and content, as vLLM's and SGLang's flag does: qwen3 (Qwen3-VL's Thinking checkpoints);
    none: the answer is content as written"""
    max_body_bytes: int = 32 * MIB
    """largest request body; a larger one gets a 413, a chunked one as soon as it passes the limit"""
    request_read_timeout: float = 30.0
    """seconds a client has to send its whole body once its headers are in; then a 408 and the
    connection is closed"""
    max_image_pixels: int = 2 * 4096 * 4096
    """most pixels (width x height) an image may have, read from its header before it is decoded; more
    is a 400. Twice the Qwen3-VL processor's own bound, so a 24 MP photo passes and is resized down"""
    max_images_per_request: int = 16
    """most images one request may carry; more is a 400"""
    max_videos_per_request: int = 2
    """most videos one request may carry; more is a 400"""
    max_video_seconds: float = 600.0
    """longest video a request may carry, in seconds (its frames counted before any is decoded); longer
    is a 400. Each video frame is also held to --max-image-pixels"""
    max_video_frames: int = 18000
    """most frames a video may have (counted before any is decoded; ten minutes at 30 fps); more is
    a 400. Decoding reads every frame up to the last one sampled, so this bounds a video's decoding
    time whatever its frame rate"""
    max_video_decode_pixels: int = 16 * 1024**3
    """most pixels decoding a video may read: its frames up to the last one sampled, times their size
    (read from the header); more is a 400. The default is ~4.6 minutes of 1080p at 30 fps: frames
    cost their decoding whether sampled or not, so a long video of large frames, however small its
    file, would otherwise hold a decoding thread for minutes"""
    max_queued_requests: int = 256
    """requests that may wait for capacity once the workers hold all they can; beyond them a request
    gets 429 with Retry-After"""
    queue_timeout_s: float = 60.0
    """seconds a request may wait for capacity before it gets 503 with Retry-After"""
    request_timeout_s: float = 600.0
    """seconds a request may take from admission to its last token; then it is aborted in every role
    and answered with an error; 0: no limit"""
    stream_stall_timeout_s: float = 30.0
    """seconds a streaming client may leave its full buffer unread before its request is cut and its
    slot freed"""

    def __post_init__(self):
        for name in ("max_body_bytes", "max_image_pixels", "max_images_per_request", "max_videos_per_request",
                     "max_video_frames", "max_video_decode_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("request_read_timeout", "queue_timeout_s", "stream_stall_timeout_s", "max_video_seconds",
                     "media_fetch_timeout_s"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be > 0 and finite, got {getattr(self, name)}")
        if self.allowed_local_media_path is not None and not Path(self.allowed_local_media_path).is_dir():
            raise ValueError(f"allowed_local_media_path {self.allowed_local_media_path} is not a directory")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, got "
                             f"{self.reasoning_parser!r}")
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if not 0 <= self.request_timeout_s < math.inf:  # nan fails too
            raise ValueError(f"request_timeout_s must be >= 0 and finite (0: none), got {self.request_timeout_s}")
