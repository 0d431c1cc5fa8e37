"""What libzmq itself says of a connection's CurveZMQ handshake, for tests that a peer without the
deployment's keys is refused (its messages never read) rather than answered."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable

import zmq
from zmq.utils.monitor import recv_monitor_message

_names = itertools.count()
FAILED = {zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL}


def handshake_refused(socket: zmq.Socket, parties: Iterable = (), timeout: float = 10.0,
                      reconnect: str | None = None) -> bool:
    """Watches ``socket``'s connections (a ZMQ monitor): True once a handshake of one failed, False
    if one succeeded; the in-process ``parties`` (senders, receivers) make progress meanwhile.
    ``reconnect``: the endpoint a connecting socket dialled before the watch began, dialled again
    under it (libzmq gives up on a peer after a protocol mismatch, so a handshake that failed
    before the monitor started may never be tried again)."""
    parties = list(parties)
    monitor = socket.get_monitor_socket(addr=f"inproc://test-handshakes-{next(_names)}")
    if reconnect is not None:
        socket.disconnect(reconnect)
        socket.connect(reconnect)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError("no handshake seen")
            for party in parties:
                party.progress(0.002)
            while monitor.poll(0 if parties else 10):
                event = recv_monitor_message(monitor)["event"]
                if event in FAILED or event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    return event in FAILED
    finally:
        socket.disable_monitor()
        monitor.close()
