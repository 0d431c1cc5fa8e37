"""The data plane interface: a sender offers a chunk's arrays, a receiver pulls them.

Pull-based (docs/transfer.md): the sender never connects to the receiver; it offers arrays
under a uuid and the receiver, told the uuid and shapes on the control plane, pulls them
straight into its own device memory. Two implementations sit behind this interface:

- ``JaxTransferPlane`` ("jax"): ``jax.experimental.transfer``, device to device.
- ``ZmqDataPlane`` ("zmq"): raw buffer bytes as zero-copy ZMQ frames, for backends whose
  transfer server cannot start.

``open_data_plane`` picks one: "auto" takes the ZMQ plane on a Unix socket when the config names
a private directory for it (``data_plane_dir``: one host, whose other users must not reach the
plane), else tries the transfer server on the local backend and falls back to ZMQ only if it
fails to start.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import jax
import zmq

from transfer.config import TransferConfig

log = logging.getLogger(__name__)


class DataPlaneError(RuntimeError):
    """A pull failed: the peer died, dropped the offer, or sent something other than declared."""


class PendingPull(Protocol):
    def done(self) -> bool:
        """True once the arrays arrived or the pull failed; never blocks."""

    def result(self) -> list[jax.Array]:
        """The pulled arrays, ready on device; raises DataPlaneError if the pull failed."""


class DataPlane(Protocol):
    kind: str
    address: str
    posts_pulls: bool
    """A pull may be made before its offer and lands once the offer comes (jax's transfer server
    holds it): a receiver that knows a room's length pulls it as it registers (``PostedPull``)."""

    def offer(self, uuid: int, arrays: Sequence[jax.Array], timeout_s: float) -> None:
        """Holds ``arrays`` for one pull under ``uuid``; dropped after ``timeout_s`` if never pulled.

        Raises DataPlaneError if the plane cannot take the offer."""

    def pull(self, address: str, uuid: int, specs: Sequence[jax.ShapeDtypeStruct]) -> PendingPull:
        """Starts pulling the arrays a peer offered under ``uuid``, shaped and placed as ``specs``."""

    def forget_peer(self, address: str) -> None:
        """Drops what is cached for a peer that died, so a new peer at that address starts fresh."""

    def offer_sockets(self) -> list[zmq.Socket | int]:
        """Sockets whose readiness means a peer asks for an offer: the sender's poller watches them."""

    def serve_offers(self) -> None:
        """Answers peers' pulls of this side's offers and drops expired offers, without blocking:
        the sender's half of the plane."""

    def pull_sockets(self) -> list[zmq.Socket | int]:
        """Sockets (or file descriptors) whose readiness means one of this side's pulls has
        landed, for the receiver's poller; the list may change as peers come and go."""

    def collect_pulls(self) -> None:
        """Completes this side's pulls without blocking: the receiver's half. It consumes the
        readiness of :meth:`pull_sockets`, so only the receiver, which looks at its pulls right
        after, calls it (a sender sharing the plane that consumed it would leave a landed pull
        unseen until the receiver's loop woke for something else)."""

    def close(self) -> None: ...


def open_data_plane(config: TransferConfig, device: jax.Device | None = None) -> DataPlane:
    from transfer.jax_plane import JaxTransferPlane
    from transfer.zmq_plane import ZmqDataPlane

    device = device or jax.local_devices()[0]
    if config.data_plane == "zmq" or config.data_plane == "auto" and config.data_plane_dir:
        return ZmqDataPlane(config.bind_host, config.advertise_host, config.data_plane_dir)
    try:
        return JaxTransferPlane(config.public_host, device, transfer_size=config.jax_transfer_size,
                                parallel_copies=config.jax_parallel_copies, raw_buffers=config.jax_raw_buffers)
    except Exception as error:
        if config.data_plane == "jax":
            raise
        log.warning("jax transfer server unavailable on %s (%s); using the zmq data plane",
                    device.platform, error)
        return ZmqDataPlane(config.bind_host, config.advertise_host)
