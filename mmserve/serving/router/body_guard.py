"""The request body's door: at most ``max_body_bytes`` of it, all of it within ``request_read_timeout``.

A middleware around the app's ``receive``. The declared Content-Length is checked before a byte of
the body is read (so a client that sent ``Expect: 100-continue`` never uploads it); the bytes are
then counted as they arrive, so a chunked upload is refused as soon as it passes the cap and no
handler ever holds more than the cap of one body. The whole body must arrive within the timeout of
the request's start (its headers received), else 408 and the connection is closed: a client that
trickles its body holds no handler longer than that. Both raise ``InvalidRequest`` inside the
handler that reads, so they are answered and counted like every refused request.

A 413 leaves the connection open, so a client still sending its body reads the answer (the
server discards the rest); the time a connection may take to send its headers is the HTTP
server's business, not this middleware's (docs/security.md).
"""

from __future__ import annotations

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mmserve.serving.router.errors import InvalidRequest


class BodyGuard:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _GuardedBody(receive, _content_length(scope), self.max_bytes, anyio.current_time() + self.timeout,
                            self.timeout)
        await self.app(scope, body.receive, send)


class _GuardedBody:
    """One request's ``receive``: limits apply until the last body message, then it passes through
    (handlers keep receiving afterwards to notice a client that hangs up)."""

    def __init__(self, receive: Receive, declared: int | None, max_bytes: int, deadline: float, timeout: float):
        self.inner = receive
        self.declared = declared
        self.max_bytes = max_bytes
        self.deadline = deadline
        self.timeout = timeout
        self.received = 0
        self.complete = False

    async def receive(self) -> Message:
        if self.complete:
            return await self.inner()
        if self.declared is not None and self.declared > self.max_bytes:
            raise self._too_large()
        with anyio.CancelScope(deadline=self.deadline) as waiting:
            message = await self.inner()
        if waiting.cancelled_caught:
            raise InvalidRequest(f"the request body did not arrive within {self.timeout:g} s "
                                 "(see --request-read-timeout)", status=408, headers={"Connection": "close"})
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.max_bytes:
                raise self._too_large()
            self.complete = not message.get("more_body", False)
        return message

    def _too_large(self) -> InvalidRequest:
        return InvalidRequest(f"the request body is larger than this server accepts ({self.max_bytes} bytes; "
                              "see --max-body-bytes)", status=413)


def _content_length(scope: Scope) -> int | None:
    """The declared length (the HTTP server has already refused a malformed one), None when chunked."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value)
    return None
