"""A connection must complete each request's line and headers within the header timeout, or it is
closed (slow-loris); once the headers are in, the timer is off: a slow body and a kept-alive
connection's next request are not cut by it. Over a real uvicorn server in this process with the
router's own server configuration, a 1 s timeout."""

import json
import socket
import time

import pytest

from mmserve.serving.backend import TokenEvent
from mmserve.serving.router import RouterSettings, build_app
from models.qwen3_vl_moe import load_model
from scripted_backend import ScriptedBackend, ThreadedServer

TIMEOUT_S = 1.0
CHAT = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"


@pytest.fixture(scope="module")
def served():
    backend = ScriptedBackend()
    backend.script = [TokenEvent("", [12], text="abc", finish_reason="stop")]
    server = ThreadedServer(build_app(backend, load_model("tiny", weights=False), RouterSettings("tiny", 256)),
                            header_timeout_s=TIMEOUT_S)
    yield server, backend
    server.stop()


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _closed_after(sock: socket.socket, trickle: bytes = b"") -> float:
    """Sends ``trickle`` a byte every 0.2 s (while the server lets it) and returns when the server
    closed the connection, in seconds from now."""
    start = time.monotonic()
    sock.settimeout(0.2)
    for byte in trickle:
        try:
            sock.sendall(bytes([byte]))
            if sock.recv(1024) == b"":
                return time.monotonic() - start
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - start
    sock.settimeout(10)
    while sock.recv(1024) != b"":
        pass
    return time.monotonic() - start


def _answer(sock: socket.socket) -> bytes:
    """One whole response on a kept-alive connection (the router's answers carry Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return head


def test_a_connection_that_never_finishes_its_headers_is_closed(served):
    server, backend = served
    seen = len(backend.requests)
    with _connect(server.url) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        assert TIMEOUT_S - 0.2 < _closed_after(sock) < TIMEOUT_S + 3
    with _connect(server.url) as sock:  # nothing sent at all
        assert _closed_after(sock) < TIMEOUT_S + 3
    assert len(backend.requests) == seen


def test_headers_trickled_a_byte_at_a_time_are_cut_at_the_timeout_not_kept_alive_by_each_byte(served):
    server, _ = served
    with _connect(server.url) as sock:
        took = _closed_after(sock, HEAD % len(CHAT) * 4)  # ~20 s of bytes at this pace
        assert took < TIMEOUT_S + 3


def test_once_the_headers_are_in_a_slow_body_and_the_next_request_are_not_cut(served):
    server, backend = served
    with _connect(server.url) as sock:
        sock.sendall(HEAD % len(CHAT))
        for part in (CHAT[:10], CHAT[10:]):  # the body over twice the header timeout
            time.sleep(TIMEOUT_S * 1.2)
            sock.sendall(part)
        assert _answer(sock).startswith(b"HTTP/1.1 200")
        time.sleep(TIMEOUT_S / 2)  # kept alive; the next request's headers come in time
        sock.sendall(HEAD % len(CHAT) + CHAT)
        assert _answer(sock).startswith(b"HTTP/1.1 200")


def test_a_client_that_stops_reading_its_answer_is_cut_off():
    """uvicorn writes a whole answer into the transport, and its keep-alive timer (like ours) closes
    gracefully, waiting for that data to leave: a client that never read held the connection and
    the answer's memory for good. Now what it has not taken for the write stall timeout is dropped."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    body = b"x" * (20 << 20)
    app = Starlette(routes=[Route("/big", lambda request: Response(body))])
    server = ThreadedServer(app, header_timeout_s=TIMEOUT_S, write_stall_s=1.0)
    try:
        host, port = server.url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(4)  # reads nothing
        received, start = 0, time.monotonic()
        sock.settimeout(10)
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        sock.close()
        assert received < len(body), "the whole answer waited for a client that did not read"
        assert time.monotonic() - start < 5
    finally:
        server.stop()


def test_a_client_reading_slowly_is_not_cut_off():
    """A client that reads a large answer steadily but slower than the kernel's socket buffers
    drain in the write stall timeout: the transport's own buffer does not shrink for longer than
    that (the kernel takes more only once its buffers, grown to megabytes while the client read
    fast, have room again), and the check judged by it cut the client while it read. Judged by
    what the peer acknowledged, it reads on."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    body = b"x" * (48 << 20)
    app = Starlette(routes=[Route("/big", lambda request: Response(body))])
    # 2 s: the reader's kernel acknowledges in bursts ~0.6 s apart, which a busy host stretched past
    # 1 s (a CI run, 2026-12-08); the old check still cuts it, the kernel's megabytes taking ~8 s
    server = ThreadedServer(app, header_timeout_s=TIMEOUT_S, write_stall_s=2.0)
    try:
        for attempt in range(2):  # again only where this process itself stalled (a busy host), below
            received, stalled = _read_slowly_then_all(server.url, len(body))
            if received >= len(body) or stalled < 0.5:
                break
        assert received >= len(body), f"the answer was cut: {received} of {len(body)} bytes"
    finally:
        server.stop()


def _read_slowly_then_all(url: str, size: int) -> tuple[int, float]:
    """(bytes received, the longest this reader went without reading beyond its own pauses)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    received = 0
    while received < (16 << 20):  # fast at first: the kernel grows its buffers to megabytes
        received += len(sock.recv(1 << 20))
    start = last = time.monotonic()
    stalled = 0.0
    while time.monotonic() - start < 4:  # then ~500 KB/s, read steadily (the peer's kernel
        chunk = sock.recv(32 << 10)  # acknowledges in bursts, ~300 KB apart here: ~0.6 s)
        assert chunk, f"cut after {received} bytes, {time.monotonic() - start:.1f} s into the slow reads"
        received += len(chunk)
        time.sleep(0.06)
        now = time.monotonic()
        stalled, last = max(stalled, now - last - 0.06), now
    while chunk := sock.recv(1 << 20):  # the rest at once: a cut answer ends early (the kernel
        received += len(chunk)  # still delivers what it had taken, then the connection's end)
        now = time.monotonic()
        stalled, last = max(stalled, now - last), now
        if received >= size:
            break
    sock.close()
    return received, stalled
