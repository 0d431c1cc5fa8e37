"""http(s) image URLs: fetched only from the hosts --allowed-media-domains names (a redirect only to
one of them), bounded by --max-body-bytes; every refusal a 400 naming the field, nothing queued.
A real HTTP server on loopback serves the pictures; the router runs in this process over a
scripted backend, which shows what reached it."""

import http.server
import io
import threading
import time

import pytest

from mmserve.serving.backend import TokenEvent
from mmserve.serving.router import RouterSettings, build_app
from models.qwen3_vl_moe import load_model
from scripted_backend import ScriptedBackend, ThreadedServer
from served_model import random_image
from server_process import request

LIMIT = 200_000


def _png(seed: int, size=(64, 64)) -> bytes:
    out = io.BytesIO()
    random_image(seed, size).save(out, "PNG", compress_level=0)
    return out.getvalue()


PICTURE = _png(1)
REDIRECT_BODY = 256 << 20
FILES = {"/one.png": PICTURE, "/huge.png": _png(2, (400, 400))}  # ~480 KB, over LIMIT


class Pictures(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802: the standard library's name
        if self.path.startswith("/redirect-to/"):
            self.send_response(302)
            self.send_header("Location", "http://" + self.path.removeprefix("/redirect-to/"))
            self.end_headers()
        elif self.path == "/redirect-with-a-body":  # a redirect whose body is far larger than any picture
            self.send_response(302)
            self.send_header("Location", "/one.png")
            self.send_header("Content-Length", str(REDIRECT_BODY))
            self.end_headers()
            try:
                for _ in range(REDIRECT_BODY >> 16):
                    self.wfile.write(bytes(1 << 16))
            except OSError:
                pass  # the client left without reading it
        elif self.path == "/trickle.png":  # a byte every 0.2 s: each read is quick, the whole never ends
            self.send_response(200)
            self.send_header("Content-Length", str(len(PICTURE)))
            self.end_headers()
            for byte in PICTURE:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
        elif self.path == "/trickle-headers.png":  # its headers a byte every 0.2 s: no read waits long
            head = (b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Padding: " + b"p" * 40 +
                    f"\r\nContent-Length: {len(PICTURE)}\r\n\r\n".encode())
            for byte in head:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
            self.wfile.write(PICTURE)
        elif self.path in FILES:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(FILES[self.path])))
            self.end_headers()
            self.wfile.write(FILES[self.path])
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def pictures():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pictures)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture(scope="module")
def served():
    backend = ScriptedBackend()
    backend.script = [TokenEvent("", [12], text="abc", finish_reason="stop")]
    settings = RouterSettings("tiny", 512, allowed_media_domains="127.0.0.1", max_body_bytes=LIMIT)
    server = ThreadedServer(build_app(backend, load_model("tiny", weights=False), settings))
    yield server, backend
    server.stop()


def chat(url: str) -> dict:
    return {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}]}


def test_a_picture_of_an_allowed_host_is_fetched_and_sent_on_as_the_file_it_is(served, pictures):
    server, backend = served
    status, body = request("POST", f"{server.url}/v1/chat/completions", chat(f"http://{pictures}/one.png"))
    assert status == 200, body
    (image,) = backend.requests[-1].prompt.images
    assert image.source.data == PICTURE


@pytest.mark.parametrize("path, reason", [
    ("http://localhost:{port}/one.png", "does not fetch images from 'localhost'"),
    ("http://{host}/redirect-to/localhost:{port}/one.png", "does not fetch images from 'localhost'"),
    ("http://{host}/missing.png", "HTTP 404"),
    ("http://{host}/huge.png", f"larger than a request body may be ({LIMIT} bytes"),
    ("http://127.0.0.1:1/one.png", "could not fetch the image"),
    # the allowed-hosts check read b as the host, urllib a (no such URL reached a host not allowed)
    ("http://localhost:{port}\\@{host}/one.png", "may not carry credentials or a backslash"),
    ("http://user:secret@{host}/one.png", "may not carry credentials or a backslash"),
])
def test_what_is_not_fetched_is_a_400_naming_the_field(served, pictures, path, reason):
    server, backend = served
    seen = len(backend.requests)
    url = path.format(host=pictures, port=pictures.split(":")[1])
    status, body = request("POST", f"{server.url}/v1/chat/completions", chat(url))
    assert status == 400 and reason in body["error"]["message"], body
    assert body["error"]["param"].startswith("messages[0].content[0]")
    assert len(backend.requests) == seen


def test_an_https_host_trickling_its_headers_is_given_up_on_at_the_fetch_timeout(tmp_path, monkeypatch):
    """Wrapping a socket in TLS detaches the TCP socket object: shutting that one at the deadline left
    the TLS socket's reads waiting as long as the host trickled."""
    import socket
    import ssl

    import trustme

    from mmserve.serving.router.errors import InvalidRequest
    from mmserve.serving.router.media_fetch import fetch_media

    authority = trustme.CA()
    authority.cert_pem.write_to_path(tmp_path / "ca.pem")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))  # the default context trusts this CA alone
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    listener = socket.create_server(("127.0.0.1", 0))

    def trickle():
        connection, _ = listener.accept()
        with server_context.wrap_socket(connection, server_side=True) as tls:
            tls.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"p" * 40 + b"\r\nContent-Length: 3\r\n\r\nabc":
                try:
                    tls.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.2)

    threading.Thread(target=trickle, daemon=True).start()
    settings = RouterSettings("tiny", 512, allowed_media_domains="127.0.0.1", media_fetch_timeout_s=1.0)
    started = time.monotonic()
    try:
        with pytest.raises(InvalidRequest, match="took longer than 1.0 s"):
            fetch_media(f"https://127.0.0.1:{listener.getsockname()[1]}/x.png", settings, "image", "image_url")
        assert time.monotonic() - started < 3
    finally:
        listener.close()


@pytest.mark.parametrize("path", ["/trickle.png", "/trickle-headers.png"], ids=["body", "headers"])
def test_a_host_trickling_its_answer_is_given_up_on_at_the_fetch_timeout(pictures, path):
    """A socket's timeout bounds each read: a host trickling its headers (before the body is read at
    all) held the prompt's thread for as long as they lasted."""
    backend = ScriptedBackend()
    settings = RouterSettings("tiny", 512, allowed_media_domains="127.0.0.1", media_fetch_timeout_s=1.0)
    server = ThreadedServer(build_app(backend, load_model("tiny", weights=False), settings))
    try:
        started = time.monotonic()
        status, body = request("POST", f"{server.url}/v1/chat/completions", chat(f"http://{pictures}{path}"))
        assert status == 400 and "took longer than 1.0 s" in body["error"]["message"], body
        assert time.monotonic() - started < 3
        assert backend.requests == []
    finally:
        server.stop()


def test_the_body_of_a_redirect_is_not_read(pictures):
    """urllib reads a redirect's whole body into memory before it follows the redirect: an allowed
    host answering with gigabytes under a 302 took that much of the router's memory."""
    import tracemalloc

    from mmserve.serving.router.media_fetch import fetch_media

    settings = RouterSettings("tiny", 512, allowed_media_domains="127.0.0.1", max_body_bytes=LIMIT)
    tracemalloc.start()
    try:
        fetched = fetch_media(f"http://{pictures}/redirect-with-a-body", settings, "image", "image_url")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fetched == PICTURE
    assert peak < 4 * LIMIT, f"peak {peak >> 20} MiB"
