"""Fallback data plane: array bytes as zero-copy ZMQ frames, for backends without a transfer server.

The sender's arrays go out as raw buffers (``copy=False``: on CPU a view of device memory,
on an accelerator one device-to-host copy) behind a small typed header; the receiver checks
every frame's size against the shapes it declared, views the frames as numpy arrays without
copying and places them on its device. No pickle and no Python lists touch the bytes.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import stat
import time
from collections.abc import Sequence

import jax
import msgspec
import numpy as np
import zmq

from transfer.channel import bind_random_port
from transfer.data_plane import DataPlaneError
from transfer.messages import Id, Text

REQUEST_BYTES = 256


class DataRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    uuid: Id


class DataReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    uuid: Id
    ok: bool
    detail: Text = ""


_request_decoder = msgspec.msgpack.Decoder(DataRequest)
_reply_decoder = msgspec.msgpack.Decoder(DataReply)
_encoder = msgspec.msgpack.Encoder()


class ZmqPull:
    def __init__(self, plane: ZmqDataPlane, specs: Sequence[jax.ShapeDtypeStruct]) -> None:
        self._plane = plane
        self.specs = list(specs)
        self.arrays: list[jax.Array] | None = None
        self.error: str | None = None

    def done(self) -> bool:
        self._plane.collect_pulls()
        return self.arrays is not None or self.error is not None

    def result(self) -> list[jax.Array]:
        if self.error is not None:
            raise DataPlaneError(self.error)
        if self.arrays is None:
            raise DataPlaneError("pull still in flight")
        return self.arrays

    def complete(self, frames: list[zmq.Frame]) -> None:
        if len(frames) != len(self.specs):
            self.error = f"{len(frames)} buffers for {len(self.specs)} declared arrays"
            return
        arrays = []
        for frame, spec in zip(frames, self.specs, strict=True):
            dtype = np.dtype(spec.dtype)
            expected = int(np.prod(spec.shape, dtype=np.int64)) * dtype.itemsize
            if len(frame.buffer) != expected:
                self.error = f"buffer of {len(frame.buffer)} bytes for {spec.shape} {dtype}"
                return
            host = np.frombuffer(frame.buffer, dtype=dtype).reshape(spec.shape)
            arrays.append(jax.device_put(host, spec.sharding))
        self.arrays = arrays


def socket_path(directory: str, pid: int) -> str:
    """A new Unix socket path for process ``pid``'s plane in ``directory``."""
    return os.path.join(directory, f"data-{pid}-{secrets.token_hex(4)}.sock")


def remove_sockets_of(directory: str, pid: int) -> list[str]:
    """Unlinks the socket files process ``pid``'s planes left in ``directory`` (a process killed
    with SIGKILL closes nothing); returns their paths. For the one that started ``pid``, once it
    has ended."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(directory), f"data-{pid}-*.sock")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    return removed


class ZmqDataPlane:
    kind = "zmq"
    posts_pulls = False  # a pull of an uuid not offered yet is answered "no such offer"

    def __init__(self, host: str, advertise_host: str = "", directory: str = "") -> None:
        """Listens on ``host`` (a free TCP port), or on a Unix socket of its own in ``directory``."""
        context = zmq.Context.instance()
        self._server = context.socket(zmq.ROUTER)
        self._server.setsockopt(zmq.LINGER, 0)
        self._server.setsockopt(zmq.MAXMSGSIZE, REQUEST_BYTES)
        if directory:
            _check_private(directory)
            self.address = f"ipc://{socket_path(directory, os.getpid())}"
            self._server.bind(self.address)
        else:
            self.address = bind_random_port(self._server, host, advertise_host)
        self._offers: dict[int, tuple[list[jax.Array], float]] = {}
        self._clients: dict[str, zmq.Socket] = {}
        self._pulls: dict[tuple[str, int], ZmqPull] = {}

    def offer(self, uuid: int, arrays: Sequence[jax.Array], timeout_s: float) -> None:
        self._offers[uuid] = (list(arrays), time.monotonic() + timeout_s)

    def pull(self, address: str, uuid: int, specs: Sequence[jax.ShapeDtypeStruct]) -> ZmqPull:
        client = self._clients.get(address)
        if client is None:
            client = zmq.Context.instance().socket(zmq.DEALER)
            client.setsockopt(zmq.LINGER, 0)
            try:
                client.connect(address)
            except zmq.ZMQError as error:
                client.close(linger=0)
                raise DataPlaneError(f"cannot connect to {address}: {error}") from None
            self._clients[address] = client
        pending = self._pulls[(address, uuid)] = ZmqPull(self, specs)
        client.send(_encoder.encode(DataRequest(uuid)))
        return pending

    def forget_peer(self, address: str) -> None:
        client = self._clients.pop(address, None)
        if client is not None:
            client.close(linger=0)
        for key in [key for key in self._pulls if key[0] == address]:
            self._pulls.pop(key).error = f"peer {address} forgotten"

    def offer_sockets(self) -> list[zmq.Socket]:
        return [self._server]

    def serve_offers(self) -> None:
        now = time.monotonic()
        for uuid in [u for u, (_, deadline) in self._offers.items() if now > deadline]:
            del self._offers[uuid]
        self._serve()

    def pull_sockets(self) -> list[zmq.Socket]:
        return list(self._clients.values())

    def collect_pulls(self) -> None:
        for address, client in self._clients.items():
            self._collect(address, client)

    def _serve(self) -> None:
        while True:
            try:
                identity, *request = self._server.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                if len(request) != 1:
                    raise msgspec.DecodeError("one request frame expected")
                uuid = _request_decoder.decode(request[0]).uuid
            except (msgspec.DecodeError, msgspec.ValidationError) as error:
                self._server.send_multipart([identity, _encoder.encode(DataReply(0, False, str(error)[:500]))])
                continue
            offered = self._offers.pop(uuid, None)
            if offered is None:
                self._server.send_multipart([identity, _encoder.encode(DataReply(uuid, False, "no such offer"))])
                continue
            buffers = [np.asarray(array).reshape(-1).view(np.uint8) for array in offered[0]]
            self._server.send_multipart([identity, _encoder.encode(DataReply(uuid, True)), *buffers], copy=False)

    def _collect(self, address: str, client: zmq.Socket) -> None:
        while True:
            try:
                header, *frames = client.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                reply = _reply_decoder.decode(header.bytes)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            pending = self._pulls.pop((address, reply.uuid), None)
            if pending is None:
                continue
            if reply.ok:
                pending.complete(frames)
            else:
                pending.error = f"peer refused pull {reply.uuid}: {reply.detail}"

    def close(self) -> None:
        for client in self._clients.values():
            client.close(linger=0)
        self._clients.clear()
        self._server.close(linger=0)


def _check_private(directory: str) -> None:
    """The plane's Unix socket keeps other users out only in a directory they cannot enter."""
    info = os.stat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise ValueError(f"{directory}: the data plane's directory must be a directory of this user's, mode 0700")
