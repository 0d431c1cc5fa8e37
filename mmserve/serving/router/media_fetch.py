"""Images and videos named by ``http(s)://`` URLs, fetched by the router from allowed hosts only.

A server that fetches whatever URL a client names can be made to reach anything it can reach
(its cloud's metadata service, internal APIs: server-side request forgery), so nothing is fetched
unless ``--allowed-media-domains`` names the host, exactly as the URL spells it; a redirect is
followed only to an allowed host too. A fetch is bounded like a body: at most ``--max-body-bytes``
(read no further), within ``--media-fetch-timeout`` seconds in all (as vLLM's image fetch timeout):
a socket's timeout bounds each read, not the whole, so at the deadline the fetch's connections
(its redirects' too) are shut, ending whatever read waits (a host trickling its headers or body a
byte at a time held a prompt's thread for as long as it liked). Not bounded by it: the host name's
lookup, which the system's resolver does. Any failure is a 400 naming the field. The prompt is
built in a worker thread, so a blocking fetch holds that thread, not the event loop.
"""

from __future__ import annotations

import http.client
import socket
import threading
import urllib.error
import urllib.request
from urllib.parse import urlparse

from mmserve.serving.router.errors import InvalidRequest
from mmserve.serving.router.settings import RouterSettings

CHUNK_BYTES = 1 << 16


def allowed_hosts(settings: RouterSettings) -> frozenset[str]:
    spec = settings.allowed_media_domains or ""
    return frozenset(host.strip().lower() for host in spec.split(",") if host.strip())


def fetch_media(url: str, settings: RouterSettings, kind: str, param: str) -> bytes:
    hosts = allowed_hosts(settings)
    _check_host(url, hosts, kind, param)
    connections = _Connections()
    opener = urllib.request.build_opener(_AllowedRedirects(hosts, kind, param), _HTTP(connections),
                                         _HTTPS(connections))
    request = urllib.request.Request(url, headers={"User-Agent": "mmserve"})
    limit = settings.max_body_bytes
    watchdog = threading.Timer(settings.media_fetch_timeout_s, connections.shut)
    watchdog.daemon = True
    watchdog.start()
    try:
        with opener.open(request, timeout=settings.media_fetch_timeout_s) as reply:
            try:
                data = bytearray()
                while chunk := reply.read1(min(CHUNK_BYTES, limit + 1 - len(data))):  # what has come
                    data += chunk
                    if len(data) > limit:
                        raise InvalidRequest(f"the {kind} at {url} is larger than a request body may be ({limit} "
                                             "bytes; see --max-body-bytes)", param)
            finally:
                connections.stop()  # before the sockets close: no shutdown after this
            if connections.expired.is_set():  # shut while the body was read: maybe cut short
                raise TimeoutError
            return bytes(data)
    except urllib.error.HTTPError as error:
        raise InvalidRequest(f"fetching the {kind} at {url} failed: HTTP {error.code}", param) from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as error:
        if connections.expired.is_set():
            raise InvalidRequest(f"fetching the {kind} at {url} took longer than {settings.media_fetch_timeout_s} "
                                 "s (see --media-fetch-timeout)", param) from None
        reason = getattr(error, "reason", error)
        raise InvalidRequest(f"could not fetch the {kind} at {url}: {reason}", param) from None
    finally:
        connections.stop()
        watchdog.cancel()


class _Connections:
    """The sockets one fetch opens (a redirect opens another), shut at its deadline: reads waiting on
    them end at once (the response reads from the socket after its connection object let it go)."""

    def __init__(self):
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.expired = threading.Event()
        self._stopped = False

    def http(self, host, **kwargs) -> http.client.HTTPConnection:
        return self._track(http.client.HTTPConnection(host, **kwargs))

    def https(self, host, **kwargs) -> http.client.HTTPSConnection:
        return self._track(_HTTPSConnection(host, connections=self, **kwargs))

    def _track(self, connection):
        create = connection._create_connection  # http.client's hook for the TCP connection

        def created(*args, **kwargs):
            sock = create(*args, **kwargs)
            self.record(sock)
            return sock

        connection._create_connection = created
        return connection

    def record(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired.is_set() and not self._stopped:
                _shut(sock)

    def shut(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self.expired.set()
            for sock in self._sockets:
                _shut(sock)

    def stop(self) -> None:
        """The fetch is over: its sockets are about to close (and their descriptors to be reused)."""
        with self._lock:
            self._stopped = True


class _HTTPSConnection(http.client.HTTPSConnection):
    """Records its TLS socket as well as the TCP one, before the handshake: wrapping detaches the TCP
    socket object, so shutting it would leave the TLS socket's reads waiting."""

    def __init__(self, host, *, connections: _Connections, **kwargs):
        super().__init__(host, **kwargs)
        self._connections = connections

    def connect(self):
        http.client.HTTPConnection.connect(self)  # TCP (and a proxy tunnel's CONNECT)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._tunnel_host or self.host,
                                              do_handshake_on_connect=False)
        self._connections.record(self.sock)
        self.sock.do_handshake()


def _shut(sock: socket.socket) -> None:
    try:  # the socket's own shutdown, a TLS socket's too (``SSLSocket.shutdown`` would drop its TLS state)
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # closed already, or detached (a TCP socket a TLS one took over)
        pass


class _HTTP(urllib.request.HTTPHandler):
    def __init__(self, connections: _Connections):
        super().__init__()
        self._connections = connections

    def http_open(self, req):
        return self.do_open(self._connections.http, req)


class _HTTPS(urllib.request.HTTPSHandler):
    def __init__(self, connections: _Connections):
        super().__init__()
        self._connections = connections

    def https_open(self, req):
        return self.do_open(self._connections.https, req, context=self._context)


def _check_host(url: str, hosts: frozenset[str], kind: str, param: str) -> None:
    """The URL's host must be allowed. A URL with userinfo or a backslash before its host is refused
    outright: ``urlparse`` and urllib read its host differently (``http://a\\@b/``: b to the check,
    a to the connection), so the host checked need not be the one dialled."""
    if not hosts:
        raise InvalidRequest(f"this server does not fetch {kind}s over the network (see --allowed-media-domains); "
                             "send a data: URL", param)
    parsed = urlparse(url)
    if "@" in parsed.netloc or "\\" in parsed.netloc:
        raise InvalidRequest(f"a {kind} URL may not carry credentials or a backslash before its path", param)
    host = (parsed.hostname or "").lower()
    if host not in hosts:
        raise InvalidRequest(f"this server does not fetch {kind}s from {host!r} (see --allowed-media-domains)", param)


class _AllowedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to an allowed host, and never reads its body: urllib reads a
    redirect's whole body into memory before following it (however large a host makes it)."""

    def __init__(self, hosts: frozenset[str], kind: str, param: str):
        self.hosts, self.kind, self.param = hosts, kind, param

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlparse(newurl).scheme not in ("http", "https"):
            raise InvalidRequest(f"the {self.kind} URL redirects to an unsupported URL", self.param)
        _check_host(newurl, self.hosts, self.kind, self.param)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            fp.close()  # what urllib reads of it next is then nothing
        return new
