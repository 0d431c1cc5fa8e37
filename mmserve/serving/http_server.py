"""The HTTP server the router runs in, the same for ``--role colocated`` and ``--role router``.

uvicorn's connection-level limits, stated here rather than left to its defaults: h11 (pinned, so
that installing httptools does not silently swap in a parser without a header cap) refuses a
request line plus headers larger than ``MAX_HEADER_BYTES`` with a 400 and closes the connection,
and a connection idle for ``KEEP_ALIVE_S`` after a response is closed. What uvicorn does not bound
(the time to send the headers, the number of open connections) is in docs/security.md; the body's
size and arrival time are the router's (``router.body_guard``).
"""

from __future__ import annotations

import uvicorn
from starlette.types import ASGIApp

MAX_HEADER_BYTES = 16 * 1024  # h11's default, as nginx's large_client_header_buffers allows per line
KEEP_ALIVE_S = 5
GRACEFUL_SHUTDOWN_S = 5


def http_server(app: ASGIApp, host: str, port: int, log_level: str) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, http="h11",
                                         h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                                         timeout_keep_alive=KEEP_ALIVE_S,
                                         timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
