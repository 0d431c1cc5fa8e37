"""The optional API key: ``Authorization: Bearer <key>`` on the generating endpoints.

``/health`` and ``/metrics`` stay open for probes and scrapers; they reveal no prompts or outputs.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from mmserve.serving.router.errors import error_body

API_KEY_ENV = "MMSERVE_API_KEY"
"""Where a server finds its HTTP API key when ``--api-key-file`` is not given."""

GUARDED_PREFIXES = ("/v1/", "/generate")


class ApiKeyGuard:
    def __init__(self, app: ASGIApp, api_key: str | None, on_refused: Callable[[str], None] = lambda path: None):
        """``on_refused(path)``: counts a request refused for its key (a 401 is a rejection at the door)."""
        self.app = app
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()
        self._on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is not None and scope["type"] == "http" and scope["path"].startswith(GUARDED_PREFIXES):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = error_body("Incorrect or missing API key (send Authorization: Bearer <key>)",
                                  "invalid_request_error", None, "invalid_api_key")
                self._on_refused(scope["path"])
                await JSONResponse(body, 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)
