"""Internal addresses out of what a client reads.

A failure inside the cluster (a transfer room, a worker's gRPC call) is described with the peer
it happened with: useful in the workers' and the router's logs, but a client learns the cluster's
hosts and ports from it. The router keeps the reason in its answer (a 500's message says what
failed) with each address replaced by ``<internal address>``, and logs the full text.
"""

from __future__ import annotations

import re

REPLACEMENT = "<internal address>"
_ADDRESS = re.compile(
    r"(?:tcp|ipc|inproc|unix|grpc|https?)://\S+"  # zmq endpoints, URLs
    r"|unix:\S+"  # gRPC unix targets
    r"|ipv[46]:\S+"  # gRPC peers (ipv4:10.0.0.5:50051)
    r"|\[[0-9A-Fa-f:.%\w]*:[0-9A-Fa-f:.%\w]*\](?::\d+)?"  # [IPv6]:port
    r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"  # IPv4[:port]
    r"|\b[A-Za-z][\w-]*(?:\.[\w-]+)*:\d{2,5}\b"  # host[.domain]:port
    r"|(?<![\w/])/(?:tmp|run|var)/\S+"  # socket paths
)


def redact(text: str) -> str:
    return _ADDRESS.sub(REPLACEMENT, text)
