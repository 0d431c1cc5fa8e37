"""Running the HTTP API under uvicorn, for the colocated server and the router alike: health polls
stay out of the access log, and one line says where the API is ready once ``/health`` would
answer 200 (the router's only when a worker of every role has registered).

uvicorn's connection-level limits, stated here rather than left to its defaults: h11 (pinned, so
that installing httptools does not silently swap in a parser without a header cap) refuses a
request line plus headers larger than ``MAX_HEADER_BYTES`` with a 400 and closes the connection;
a connection idle for ``KEEP_ALIVE_S`` after a response is closed, and one whose request line and
headers are not complete within ``header_timeout.HEADER_TIMEOUT_S`` too. What uvicorn does not
bound (the number of open connections) is in docs/security.md; the body's size and arrival time
are the router's (``router.body_guard``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvicorn
from starlette.applications import Starlette

from mmserve.serving.backend import Backend
from mmserve.serving.header_timeout import HEADER_TIMEOUT_S, WRITE_STALL_S, HeaderTimeoutProtocol

log = logging.getLogger("mmserve")
T = TypeVar("T")

HEALTH_PATH = "/health"
READY_POLL_S = 0.5
MAX_HEADER_BYTES = 16 * 1024  # h11's default, as nginx's large_client_header_buffers allows per line
KEEP_ALIVE_S = 5
GRACEFUL_SHUTDOWN_S = 5


class HealthPollFilter(logging.Filter):
    """Drops uvicorn's access lines for ``/health``: load balancers, supervisors and the demo poll
    it every second, and its 503s while the roles start are expected, not errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args  # uvicorn's access record: (client, method, path?query, http version, status)
        return not (isinstance(args, tuple) and len(args) == 5 and str(args[2]).split("?")[0] == HEALTH_PATH)


def uvicorn_config(app: Starlette, host: str, port: int, log_level: str, header_timeout_s: float = HEADER_TIMEOUT_S,
                   write_stall_s: float = WRITE_STALL_S) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          http=HeaderTimeoutProtocol.with_timeout(header_timeout_s, write_stall_s),
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_keep_alive=KEEP_ALIVE_S,
                          timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Runs ``main`` on uvloop where it is installed (a dependency on Linux and macOS), else on
    asyncio's own loop. The router's loop spends most of its time writing SSE chunks to client
    sockets and reading its workers' gRPC streams, which uvloop does in C: `--role all` streamed
    9-10% more tokens/s at concurrency 16 on the tiny model, colocated 2-4% (docs/status.md)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def serve_http(app: Starlette, backend: Backend, host: str, port: int, log_level: str,
                     on_listening: Callable[[], None] | None = None, listener: socket.socket | None = None) -> bool:
    """Serves ``app`` until a signal stops it, logging ``ready on http://host:port`` once; False
    when the server never started (its port taken, say). ``on_listening``: called once it listens;
    ``listener``: a socket listening already, served instead of binding ``host:port``."""
    server = uvicorn.Server(uvicorn_config(app, host, port, log_level))
    access = logging.getLogger("uvicorn.access")  # after Config, which configures uvicorn's loggers
    if not any(isinstance(f, HealthPollFilter) for f in access.filters):
        access.addFilter(HealthPollFilter())
    announcer = asyncio.create_task(_announce_ready(server, backend, f"http://{host}:{port}", on_listening))
    try:
        await server.serve(sockets=[listener] if listener is not None else None)
    finally:
        announcer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await announcer
    return server.started


async def _announce_ready(server: uvicorn.Server, backend: Backend, given: str,
                          on_listening: Callable[[], None] | None) -> None:
    while not server.started:
        await asyncio.sleep(READY_POLL_S)
    url = listening_url(server) or given  # given: a server already stopping has closed its sockets
    if on_listening is not None:
        on_listening()
    if not await _healthy(backend):
        log.info("listening on %s, not ready: /health answers 503 until every stage is up", url)
        while not await _healthy(backend):
            await asyncio.sleep(READY_POLL_S)
    log.info("ready on %s", url)


def listening_url(server: uvicorn.Server) -> str | None:
    """The address the server listens on, as a client writes it: the port it was given, not
    ``--port 0``'s 0, and an IPv6 host in brackets; None once its sockets are closed."""
    sockets = [sock for listener in server.servers for sock in listener.sockets]
    if not sockets:
        return None
    host, port = sockets[0].getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _healthy(backend: Backend) -> bool:
    try:
        return bool((await backend.health()).get("healthy"))
    except Exception:  # /health answers 503 for the same reason: not ready yet
        return False
