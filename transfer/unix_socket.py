"""A Unix socket path a listener may take: ZMQ and gRPC both remove the file at a path they bind,
so a second server given the path of a live one took it over without a word (new connections went
to it, the first server's peers never reached it again). On TCP the same mistake fails to bind."""

from __future__ import annotations

import contextlib
import socket


class SocketInUse(OSError):
    pass


def claim(path: str) -> None:
    """Raises :class:`SocketInUse` when a server is listening at ``path``; a file left by one that
    died (nobody accepts) may be bound over."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:  # no file, not a socket, or nobody listening: the bind decides
        return
    finally:
        with contextlib.suppress(OSError):
            probe.close()
    raise SocketInUse(f"another server is listening at {path}")
