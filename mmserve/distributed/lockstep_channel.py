"""The leader-to-followers channel of a multi-host role: ZMQ ROUTER on the leader, DEALER on each
follower, calls encoded with msgspec (arrays as dtype, shape and raw bytes).

The followers learn the leader's endpoint from JAX itself (``broadcast_one_to_all`` at start-up),
and the leader waits until every follower has said hello, so no call is published into the void.
Each follower's routing id is its process index: the leader takes hellos from those ids only, and
a follower that reconnects keeps its id (ROUTER_HANDOVER: the new connection takes it over).
ROUTER_MANDATORY makes a vanished follower an error on the leader instead of a silent drop.

A call lost on the way cannot be run again later (the leader has run it; the next collective would
pair different programs), so a broken channel ends the role instead of serving on out of step:
ZMQ reconnects a dropped TCP connection by itself, and what the leader had queued on the old one
is gone without an error on either side. A follower whose connection drops stops at once (a
socket monitor sees it): waiting for the gap to show in the next call's number would wait for
ever when the leader, having run the lost call, sits in its collective for the follower's half.
Each call carries its sequence number all the same, and a follower that sees a gap stops
(``Lockstep.follow``); a publish the leader cannot deliver (a follower unreachable) stops the
leader; ZMTP heartbeats close a connection that went silent (a half-open one after a reset)
rather than leaving it to look alive.

The calls carry requests' token ids and pictures, so the channel is CurveZMQ, with keys from the
cluster secret (:mod:`transfer.curve`): only a process holding it can say hello, and nobody else
reads the calls (anyone on the network could otherwise take a follower's place, and the calls).
The leader listens on the host it advertises when that is an address, else on every interface.
"""

from __future__ import annotations

import ipaddress
import time

import jax.numpy as jnp
import msgspec
import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from transfer.curve import CurveKeys, admit_only_the_client, curve_client, curve_server

HELLO = b"hello"
STOP = b"stop"
DONE = b"done"
ENDPOINT_BYTES = 512
HELLO_TIMEOUT_S = 120.0
POLL_MS = 1000
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 10_000
LAST_MESSAGE_MS = 200
"""How long a follower whose connection dropped still looks for a message read before the drop
(the leader's STOP, as it closes)."""
LEADER_RECEIVES_BYTES = 4096
"""The most a message to the leader holds: followers send only HELLO and DONE (the CurveZMQ
handshake's commands, a few hundred bytes, go through the same limit)."""


class ChannelDropped(ConnectionError):
    """The follower's connection to the leader dropped: calls queued on it may be lost."""


class WireArray(msgspec.Struct, array_like=True):
    dtype: str  # the name, e.g. "bfloat16": NumPy's dtype.str of ml_dtypes types is an opaque "<V2"
    shape: tuple[int, ...]
    data: bytes


class WireCall(msgspec.Struct, array_like=True):
    target: str
    method: str
    inputs: dict[str, WireArray | int | float | bool | None]
    answer: bool = False  # the follower says DONE once it has run the call
    seq: int = 0  # 1, 2, ... in the order the leader runs them: a gap is a lost call


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(WireCall)


def encode_call(target: str, method: str, inputs: dict, answer: bool = False, seq: int = 0) -> bytes:
    return _encoder.encode(WireCall(target, method, {k: _to_wire(v) for k, v in inputs.items()}, answer, seq))


def decode_call(payload: bytes) -> WireCall:
    """The call with its inputs as NumPy arrays and Python values."""
    call = _decoder.decode(payload)
    return msgspec.structs.replace(call, inputs={k: _from_wire(v) for k, v in call.inputs.items()})


def _heartbeats(socket: zmq.Socket) -> zmq.Socket:
    socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    socket.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
    return socket


def _to_wire(value):
    if isinstance(value, np.ndarray):
        # C order, keeping 0-d arrays 0-d (unlike ascontiguousarray), in this machine's byte order:
        # the wire names the dtype, not its byte order
        value = np.require(value, value.dtype.newbyteorder("="), requirements="C")
        return WireArray(value.dtype.name, value.shape, value.tobytes())
    return value


def _from_wire(value):
    if isinstance(value, WireArray):
        return np.frombuffer(value.data, jnp.dtype(value.dtype)).reshape(value.shape)
    return value


class LeaderChannel:
    def __init__(self, advertise_host: str, num_followers: int, keys: CurveKeys):
        self._context = zmq.Context()  # its own: the ZAP handler answers for every socket of a context
        self._auth = admit_only_the_client(self._context, keys)
        self._socket = _heartbeats(curve_server(self._context.socket(zmq.ROUTER), keys))
        self._socket.setsockopt(zmq.SNDHWM, 0)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._socket.setsockopt(zmq.LINGER, 5000)
        self._socket.setsockopt(zmq.MAXMSGSIZE, LEADER_RECEIVES_BYTES)
        bind = _bind_host(advertise_host)
        self._socket.setsockopt(zmq.IPV6, int(bind.startswith("[")))  # an IPv6 coordinator address ([::1])
        port = self._socket.bind_to_random_port(f"tcp://{bind}")
        self.endpoint = f"tcp://{_bracketed(advertise_host)}:{port}"
        self._expected = {routing_id(i) for i in range(1, num_followers + 1)}
        self._followers: list[bytes] = []

    def wait_for_followers(self, timeout_s: float = HELLO_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self._followers) < len(self._expected):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self._followers)} of {len(self._expected)} followers said hello "
                                   f"to {self.endpoint} within {timeout_s:.0f} s")
            if self._socket.poll(POLL_MS):
                identity, message = self._receive()
                if message == HELLO and identity in self._expected and identity not in self._followers:
                    self._followers.append(identity)

    def publish(self, payload: bytes) -> None:
        for identity in self._followers:
            self._socket.send_multipart([identity, payload], copy=False)

    def wait_for_done(self, timeout_s: float) -> None:
        """Until every follower has said DONE (to a call published with ``answer``)."""
        deadline = time.monotonic() + timeout_s
        done: set[bytes] = set()
        while len(done) < len(self._followers):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(done)} of {len(self._followers)} followers finished within {timeout_s:.0f} s")
            if self._socket.poll(POLL_MS):
                identity, message = self._receive()
                if message == DONE and identity in self._followers:
                    done.add(identity)

    def _receive(self) -> tuple[bytes, bytes | None]:
        """(a follower's routing id, its message); None for a message of another shape, which no
        follower of this channel sends."""
        frames = self._socket.recv_multipart()
        return (frames[0], frames[1]) if len(frames) == 2 else (frames[0], None)

    def close(self) -> None:
        if self._socket.closed:
            return
        for identity in self._followers:
            try:
                self._socket.send_multipart([identity, STOP])
            except zmq.ZMQError:
                pass
        self._socket.close()
        self._auth.stop()
        self._context.term()


def _bind_host(advertise_host: str) -> str:
    """The advertised host when it is an address of this machine's (loopback, an IP); else every
    interface (a name such as a Kubernetes service's, which a socket cannot bind)."""
    try:
        ipaddress.ip_address(advertise_host.strip("[]"))
    except ValueError:
        return "127.0.0.1" if advertise_host == "localhost" else "*"
    return _bracketed(advertise_host)


def _bracketed(host: str) -> str:
    """A host as a ZMQ endpoint writes it: an IPv6 address in brackets."""
    host = host.strip("[]")
    return f"[{host}]" if ":" in host else host


class FollowerChannel:
    def __init__(self, endpoint: str, process_index: int, keys: CurveKeys):
        self._socket = _heartbeats(curve_client(zmq.Context.instance().socket(zmq.DEALER), keys))
        self._socket.setsockopt(zmq.ROUTING_ID, routing_id(process_index))
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.IPV6, int("[" in endpoint))
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._socket.connect(endpoint)
        self._socket.send(HELLO)

    def receive(self) -> bytes | None:
        """The next call, or None once the leader has stopped; ``ChannelDropped`` when the
        connection drops first (ZMQ would connect again, but what was queued on it is lost)."""
        while True:
            ready = dict(self._poller.poll())
            if self._socket in ready or (self._monitor in ready and self._socket.poll(LAST_MESSAGE_MS)):
                payload = self._socket.recv()
                return None if payload == STOP else payload
            if self._monitor in ready and recv_monitor_message(self._monitor)["event"] == zmq.EVENT_DISCONNECTED:
                raise ChannelDropped("the connection to the leader dropped")

    def done(self) -> None:
        self._socket.send(DONE)

    def close(self) -> None:
        self._socket.disable_monitor()
        self._monitor.close()
        self._socket.close()


def routing_id(process_index: int) -> bytes:
    return f"follower-{process_index}".encode()


def open_channel(advertise_host: str, keys: CurveKeys | None) -> LeaderChannel | FollowerChannel | None:
    """Collective over all processes of the role (call it at the same point on each): the leader
    binds, every process learns its endpoint (``advertise_host``: how the others reach process 0),
    followers connect. ``keys``: the cluster's (``ClusterCredential.lockstep_keys``). None with
    one process."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return None
    if keys is None:
        raise ValueError("a role spanning several processes needs the cluster's lockstep keys")
    leader = None
    endpoint = np.zeros(ENDPOINT_BYTES, np.uint8)
    if jax.process_index() == 0:
        leader = LeaderChannel(advertise_host, jax.process_count() - 1, keys)
        raw = leader.endpoint.encode()
        endpoint[:len(raw)] = np.frombuffer(raw, np.uint8)
    try:
        endpoint = bytes(multihost_utils.broadcast_one_to_all(endpoint)).rstrip(b"\0").decode()
        if leader is not None:
            leader.wait_for_followers()
            return leader
    except BaseException:
        if leader is not None:
            leader.close()
        raise
    return FollowerChannel(endpoint, jax.process_index(), keys)
