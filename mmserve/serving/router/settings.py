"""What the router must know besides its backend: the served name, the context length, access, and
the limits on what a request may make it read or decode."""

from __future__ import annotations

import dataclasses
from pathlib import Path

MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class RouterSettings:
    """model_name: the one name ``model`` may take in requests (``/v1/models`` lists it).
    max_model_len: the backend's context (prompt + output); longer requests are refused with a 400
    here, before any backend work. api_key: when set, ``/v1/*`` and ``/generate`` need
    ``Authorization: Bearer <api_key>``. allowed_local_media_path: images may be named by local path
    or ``file://`` URL only inside this directory; None refuses local files, since a client must not
    make the server open arbitrary paths.

    The door's limits, each refused with a 4xx before the router holds more than it allows:
    max_body_bytes: the largest request body (413). request_read_timeout: seconds a client has to
    send its whole body once its headers are in (408). max_image_pixels: the most pixels one image
    may have, read from its header before it is decoded (400); twice the Qwen3-VL processor's own
    bound, so a 24 MP photo passes and is resized down. max_images_per_request: 400 beyond it.

    Admission (``admission.py``, ``relay.py``): max_queued_requests wait for capacity at most
    queue_timeout_s each (beyond them: 429 / 503 with Retry-After); request_timeout_s bounds a
    request from admission to its last token (None: no deadline); stream_stall_timeout_s is how
    long a stream's client may leave a full buffer unread before the request is cut."""

    model_name: str
    max_model_len: int
    api_key: str | None = None
    allowed_local_media_path: Path | None = None
    max_queued_requests: int = 256
    queue_timeout_s: float = 60.0
    request_timeout_s: float | None = 600.0
    stream_stall_timeout_s: float = 30.0
    max_body_bytes: int = 32 * MIB
    request_read_timeout: float = 30.0
    max_image_pixels: int = 2 * 4096 * 4096
    max_images_per_request: int = 16

    def __post_init__(self):
        for name in ("max_body_bytes", "max_image_pixels", "max_images_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.request_read_timeout > 0:
            raise ValueError(f"request_read_timeout must be > 0, got {self.request_read_timeout}")
