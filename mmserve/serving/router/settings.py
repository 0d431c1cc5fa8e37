"""What the router must know besides its backend: the served name, the context length, access."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class RouterSettings:
    """model_name: the one name ``model`` may take in requests (``/v1/models`` lists it).
    max_model_len: the backend's context (prompt + output); longer requests are refused with a 400
    here, before any backend work. api_key: when set, ``/v1/*`` and ``/generate`` need
    ``Authorization: Bearer <api_key>``. allowed_local_media_path: images may be named by local path
    or ``file://`` URL only inside this directory; None refuses local files, since a client must not
    make the server open arbitrary paths.

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
