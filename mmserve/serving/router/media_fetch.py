"""Images and videos named by ``http(s)://`` URLs, fetched by the router from allowed hosts only.

A server that fetches whatever URL a client names can be made to reach anything it can reach
(its cloud's metadata service, internal APIs: server-side request forgery), so nothing is fetched
unless ``--allowed-media-domains`` names the host, exactly as the URL spells it; a redirect is
followed only to an allowed host too. A fetch is bounded like a body: at most ``--max-body-bytes``
(read no further), within ``--media-fetch-timeout`` seconds in all (as vLLM's image fetch timeout;
checked after each read, and each read may wait that long: a host trickling a byte every few
seconds held a prompt's thread for as long as it liked). Any failure is a 400 naming the field. The prompt is built in a worker thread, so a blocking fetch
holds that thread, not the event loop.
"""

from __future__ import annotations

import time
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
    opener = urllib.request.build_opener(_AllowedRedirects(hosts, kind, param))
    request = urllib.request.Request(url, headers={"User-Agent": "mmserve"})
    limit = settings.max_body_bytes
    deadline = time.monotonic() + settings.media_fetch_timeout_s
    try:
        with opener.open(request, timeout=settings.media_fetch_timeout_s) as reply:
            data = bytearray()
            while chunk := reply.read1(min(CHUNK_BYTES, limit + 1 - len(data))):  # what has come, not a full chunk
                data += chunk
                if len(data) > limit:
                    raise InvalidRequest(f"the {kind} at {url} is larger than a request body may be ({limit} bytes; "
                                         "see --max-body-bytes)", param)
                if time.monotonic() > deadline:
                    raise InvalidRequest(f"fetching the {kind} at {url} took longer than {settings.media_fetch_timeout_s} "
                                         "s (see --media-fetch-timeout)", param)
            return bytes(data)
    except urllib.error.HTTPError as error:
        raise InvalidRequest(f"fetching the {kind} at {url} failed: HTTP {error.code}", param) from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise InvalidRequest(f"could not fetch the {kind} at {url}: {reason}", param) from None


def _check_host(url: str, hosts: frozenset[str], kind: str, param: str) -> None:
    host = (urlparse(url).hostname or "").lower()
    if not hosts:
        raise InvalidRequest(f"this server does not fetch {kind}s over the network (see --allowed-media-domains); "
                             "send a data: URL", param)
    if host not in hosts:
        raise InvalidRequest(f"this server does not fetch {kind}s from {host!r} (see --allowed-media-domains)", param)


class _AllowedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, hosts: frozenset[str], kind: str, param: str):
        self.hosts, self.kind, self.param = hosts, kind, param

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlparse(newurl).scheme not in ("http", "https"):
            raise InvalidRequest(f"the {self.kind} URL redirects to an unsupported URL", self.param)
        _check_host(newurl, self.hosts, self.kind, self.param)
        return super().redirect_request(req, fp, code, msg, headers, newurl)
