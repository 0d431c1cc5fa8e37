"""Data plane on ``jax.experimental.transfer``: device memory to device memory, pull-based.

One transfer server per process, bound (address and transport) to the host peers dial
(``TransferConfig.public_host``, a name looked up first: the JAX server publishes the address it
binds, and tells peers its bulk transport's), and
one long-lived connection per peer, since connection setup is where the first pull's time
goes. A pull returns arrays at once and fills them asynchronously; ``done`` looks at their
readiness so the role's event loop never blocks on the network.

The transfer server calls nothing back when a pull lands, so a few threads wait for the pulls'
arrays and write to a pipe that :meth:`JaxTransferPlane.pull_sockets` hands the owner's poll: a
loop waiting for a pull sleeps until it lands instead of waking every millisecond to look
(which cost half a millisecond on average per room, and CPU the other processes of a small
host needed). The threads are kept (starting one per pull cost as much as the poll: ``start``
waits for the new thread to run). A pull that never ends keeps its thread blocked; once all
``LANDING_WATCHERS`` are, later pulls are seen at the owner's next wake-up (its idle timer).
"""

from __future__ import annotations

import datetime
import ipaddress
import queue
import socket
import threading
from collections.abc import Sequence

import jax
import zmq
from jax.experimental import transfer as jax_transfer

from transfer.data_plane import DataPlaneError
from transfer.wake_pipe import WakePipe

LANDING_WATCHERS = 4


class JaxPull:
    def __init__(self, arrays: list[jax.Array]) -> None:
        self._arrays = arrays

    def done(self) -> bool:
        return all(array.is_ready() for array in self._arrays)

    def result(self) -> list[jax.Array]:
        try:
            return [array.block_until_ready() for array in self._arrays]
        except jax.errors.JaxRuntimeError as error:
            raise DataPlaneError(f"pull failed: {error}") from None


class JaxTransferPlane:
    kind = "jax"
    posts_pulls = True

    def __init__(self, host: str, device: jax.Device, *, transfer_size: int = 256 << 20, parallel_copies: int = 8,
                 raw_buffers: bool = False) -> None:
        """Listens on ``host`` (the address peers dial) and publishes the address it bound. The
        server tells a peer where its bulk transport listens, and pulls go there: bound to
        ``0.0.0.0`` (or a host name, which it takes as that) both its address and its transport's
        say ``0.0.0.0``, which a peer on another host dials as itself. So ``host`` is bound as the
        address it resolves to."""
        bind = f"{_ip_literal(host)}:0"
        self._server = jax_transfer.start_transfer_server(
            device.client, bind, [bind], max_num_parallel_copies=parallel_copies, transfer_size=transfer_size,
            use_raw_buffers=raw_buffers)
        self.address = self._server.address()
        self._connections: dict[str, jax_transfer.TransferConnection] = {}
        self._landed = WakePipe()
        """Readable once a pull has landed (or failed) since the last ``collect_pulls``."""
        self._pulls: queue.SimpleQueue[list[jax.Array] | None] = queue.SimpleQueue()
        for i in range(LANDING_WATCHERS):  # daemons: one blocked on a pull that never ends must not hold up exit
            threading.Thread(target=self._watch, name=f"pull-landing-{i}", daemon=True).start()

    def offer(self, uuid: int, arrays: Sequence[jax.Array], timeout_s: float) -> None:
        """The server holds the arrays until pulled; the timeout releases a never-pulled offer,
        which is the only way to withdraw one (the transfer server has no cancel)."""
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        try:
            self._server.await_pull(uuid, list(arrays), timeout=deadline)
        except jax.errors.JaxRuntimeError as error:
            raise DataPlaneError(f"offer {uuid} refused: {error}") from None

    def pull(self, address: str, uuid: int, specs: Sequence[jax.ShapeDtypeStruct]) -> JaxPull:
        try:
            connection = self._connections.get(address)
            if connection is None:
                connection = self._connections[address] = self._server.connect(address)
            arrays = connection.pull(uuid, list(specs))
        except jax.errors.JaxRuntimeError as error:
            self._connections.pop(address, None)
            raise DataPlaneError(f"pull from {address} failed to start: {error}") from None
        self._pulls.put(arrays)
        return JaxPull(arrays)

    def _watch(self) -> None:
        while True:
            arrays = self._pulls.get()
            if arrays is None:
                return
            try:
                for array in arrays:
                    array.block_until_ready()
            except Exception:  # the pull failed: JaxPull.result reports it to the receiver
                pass
            del arrays  # not kept alive until the next pull
            self._landed.wake()

    def forget_peer(self, address: str) -> None:
        """Drops the connection to a peer that died, so a new peer at that address gets a fresh one."""
        self._connections.pop(address, None)

    def offer_sockets(self) -> list[zmq.Socket | int]:
        return []  # the transfer server answers pulls on its own threads

    def serve_offers(self) -> None:
        pass

    def pull_sockets(self) -> list[zmq.Socket | int]:
        return [self._landed.fd]

    def collect_pulls(self) -> None:
        self._landed.drain()

    def close(self) -> None:
        self._connections.clear()
        for _ in range(LANDING_WATCHERS):
            self._pulls.put(None)
        self._landed.close()


def _ip_literal(host: str) -> str:
    """``host`` as an IP address in host:port form (IPv6 in brackets); a name is looked up."""
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        host = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    return f"[{host}]" if ":" in host else host
