"""uvicorn's h11 protocol with a header timeout: a connection must complete each request's line
and headers within ``HEADER_TIMEOUT_S`` of opening, or of the previous response, else it is closed.

uvicorn bounds neither (its keep-alive timer is armed only after a response and disarmed by any
byte), so a client that trickles its headers, or never finishes them, held a connection and a file
descriptor forever (slow-loris). nginx's ``client_header_timeout`` is the model, 60 s there; a
request to this API sends its headers in one packet. The same timer covers the rest of a body
the app has already answered (a 413 before the body was read), which uvicorn would otherwise read
and discard for as long as the client sends.

Passed to uvicorn as ``Config(http=HeaderTimeoutProtocol)``: a subclass, through uvicorn's own
hook for protocol classes.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0


class HeaderTimeoutProtocol(H11Protocol):
    header_timeout_s = HEADER_TIMEOUT_S
    """Seconds the client has; a subclass (``with_timeout``) sets another."""

    _header_timer: asyncio.TimerHandle | None = None

    @classmethod
    def with_timeout(cls, seconds: float) -> type[HeaderTimeoutProtocol]:
        return type(cls.__name__, (cls,), {"header_timeout_s": seconds})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE and self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # the headers are in: the app's own limits (body, deadline) take over

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the next request's headers, or the rest of a body already answered

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _timed_out(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()
