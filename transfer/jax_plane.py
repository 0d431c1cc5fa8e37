"""Data plane on ``jax.experimental.transfer``: device memory to device memory, pull-based.

One transfer server per process, bound (address and transport) to the host peers dial
(``TransferConfig.public_host``: the JAX server publishes the address it binds), and
one long-lived connection per peer, since connection setup is where the first pull's time
goes. A pull returns arrays at once and fills them asynchronously; ``done`` polls their
readiness so the role's event loop never blocks on the network.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import jax
import zmq
from jax.experimental import transfer as jax_transfer

from transfer.data_plane import DataPlaneError


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

    def __init__(self, host: str, device: jax.Device) -> None:
        bind = f"{host}:0"
        self._server = jax_transfer.start_transfer_server(device.client, bind, [bind])
        self.address = self._server.address()
        self._connections: dict[str, jax_transfer.TransferConnection] = {}

    def offer(self, uuid: int, arrays: Sequence[jax.Array], timeout_s: float) -> None:
        """The server holds the arrays until pulled; the timeout releases a never-pulled offer,
        which is the only way to withdraw one (the transfer server has no cancel)."""
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        try:
            self._server.await_pull(uuid, list(arrays), timeout=deadline)
        except jax.errors.JaxRuntimeError as error:
            raise DataPlaneError(f"offer {uuid} refused: {error}") from None

    def pull(self, address: str, uuid: int, specs: Sequence[jax.ShapeDtypeStruct]) -> JaxPull:
        connection = self._connections.get(address)
        if connection is None:
            connection = self._connections[address] = self._server.connect(address)
        try:
            return JaxPull(connection.pull(uuid, list(specs)))
        except jax.errors.JaxRuntimeError as error:
            self._connections.pop(address, None)
            raise DataPlaneError(f"pull from {address} failed to start: {error}") from None

    def forget_peer(self, address: str) -> None:
        """Drops the connection to a peer that died, so a new peer at that address gets a fresh one."""
        self._connections.pop(address, None)

    def sockets(self) -> list[zmq.Socket]:
        return []

    def progress(self) -> None:
        pass

    def close(self) -> None:
        self._connections.clear()
