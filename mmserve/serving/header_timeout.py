"""uvicorn's h11 protocol with a header timeout: a connection must complete each request's line
and headers within ``HEADER_TIMEOUT_S`` of opening, or of the previous response, else it is closed.

uvicorn bounds neither (its keep-alive timer is armed only after a response and disarmed by any
byte), so a client that trickles its headers, or never finishes them, held a connection and a file
descriptor forever (slow-loris). nginx's ``client_header_timeout`` is the model, 60 s there; a
request to this API sends its headers in one packet. The same timer covers the rest of a body
the app has already answered (a 413 before the body was read), which uvicorn would otherwise read
and discard for as long as the client sends.

It also bounds how long a client may leave written data unread: a connection that has taken
nothing for ``WRITE_STALL_S`` while data waits for it is aborted. uvicorn writes a whole response
into the transport and its keep-alive timer (like ours) closes gracefully, which waits for that
data to leave, so a client that never read held its connection and the response's memory for
good (an 8 MB completion, or hundreds of pipelined requests' answers, per connection). "Taken"
is what the peer acknowledged (Linux's ``TCP_INFO``), at least ``MIN_TAKEN`` bytes (or all that
waits) per ``WRITE_STALL_S``: the transport's own buffer shrinks only when the kernel's buffers
(several MB) have room again, so judged by it alone a client reading slower than those buffers
drain in ``WRITE_STALL_S`` was cut while it read; and a client taking a segment now and then
must not hold a large answer for good. The transport's buffer shrinking counts too, and is the
only measure where TCP_INFO does not say (another OS, a Unix socket).

Passed to uvicorn as ``Config(http=HeaderTimeoutProtocol)``: a subclass, through uvicorn's own
hook for protocol classes.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0
WRITE_STALL_S = 30.0
"""As the router's ``stream_stall_timeout_s`` by default: the same patience with a client that stops reading."""
MIN_TAKEN = 64 << 10
"""Bytes a client must acknowledge per ``WRITE_STALL_S`` (when that much waits) to keep its connection:
~2 KB/s at the default."""


TCP_INFO_BYTES_ACKED = 120
"""Offset of ``tcpi_bytes_acked`` (u64, Linux 4.1 and later) in ``struct tcp_info``."""


def acked_bytes(transport: asyncio.Transport) -> int | None:
    """Bytes the peer has acknowledged on this TCP connection; None where the platform or the
    socket does not say."""
    if not sys.platform.startswith("linux"):  # other systems' tcp_info differ (FreeBSD has TCP_INFO too)
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_BYTES_ACKED + 8)
    except (OSError, ValueError):  # closed meanwhile (uvloop's socket then has no descriptor)
        return None
    return struct.unpack_from("=Q", info, TCP_INFO_BYTES_ACKED)[0] if len(info) >= TCP_INFO_BYTES_ACKED + 8 else None


class HeaderTimeoutProtocol(H11Protocol):
    header_timeout_s = HEADER_TIMEOUT_S
    """Seconds the client has; a subclass (``with_timeout``) sets another."""
    write_stall_s = WRITE_STALL_S

    _header_timer: asyncio.TimerHandle | None = None
    _write_timer: asyncio.TimerHandle | None = None
    _unsent = 0
    _acked: int | None = None

    @classmethod
    def with_timeout(cls, seconds: float, write_stall_s: float = WRITE_STALL_S) -> type[HeaderTimeoutProtocol]:
        return type(cls.__name__, (cls,), {"header_timeout_s": seconds, "write_stall_s": write_stall_s})

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
        self._watch_writes()  # what the response left unsent must leave

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_writes()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().connection_lost(exc)

    def _watch_writes(self) -> None:
        if self._write_timer is None and self.transport.get_write_buffer_size() > 0:
            self._unsent = self.transport.get_write_buffer_size()
            self._acked = acked_bytes(self.transport)
            self._write_timer = self.loop.call_later(self.write_stall_s, self._check_writes)

    def _check_writes(self) -> None:
        self._write_timer = None
        unsent = self.transport.get_write_buffer_size()
        acked = acked_bytes(self.transport)
        took = unsent < self._unsent or (acked is not None and self._acked is not None
                                         and acked - self._acked >= min(unsent, MIN_TAKEN))
        if unsent and not took:  # the client took (next to) nothing for write_stall_s
            self.transport.abort()
        else:
            self._watch_writes()

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
