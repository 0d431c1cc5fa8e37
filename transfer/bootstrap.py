"""The bootstrap registry: senders publish where they listen, receivers look senders up by name.

Entries are leases: a sender re-publishes every heartbeat interval and an entry not renewed
within the heartbeat timeout disappears, so a dead sender is not handed out for long. With a
secret configured (``TransferConfig.secret``) the registry's socket is CurveZMQ and admits only
peers holding it (:mod:`transfer.channel`): nobody else can publish, withdraw or look up.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from transfer import unix_socket
from transfer.channel import Channel, bind_random_port, connecting_socket, listening_socket
from transfer.config import TransferConfig
from transfer.messages import (Codec, Found, Lookup, NotFound, ProtocolError, Publish, Published,
                               RegistryReply, RegistryRequest, SenderEndpoint, Withdraw)

log = logging.getLogger(__name__)


class BootstrapServer:
    """The registry. Drive it with ``progress`` from a loop, or let ``start`` run it on a thread."""

    def __init__(self, config: TransferConfig, port: int = 0, endpoint: str | None = None) -> None:
        """Listens on ``bind_host``: at ``port``, any free port for 0; or at ``endpoint`` (a ZMQ
        endpoint such as ``ipc:///run/dir/bootstrap.sock``: a Unix socket, reached only by who
        may enter its directory)."""
        self.config = config
        socket = listening_socket(zmq.ROUTER, config.max_message_bytes, config.control_keys)
        if endpoint and endpoint.startswith("ipc://"):
            unix_socket.claim(endpoint.removeprefix("ipc://"))
        if endpoint or port:
            socket.bind(endpoint or f"tcp://{config.bind_host}:{port}")
            self.address = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self.address = bind_random_port(socket, config.bind_host)
        self._channel: Channel[RegistryRequest] = Channel(socket, Codec(RegistryRequest, config.max_message_bytes))
        self._entries: dict[str, tuple[SenderEndpoint, float]] = {}
        self._next_prune = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def endpoints(self) -> dict[str, SenderEndpoint]:
        now = time.monotonic()
        return {name: endpoint for name, (endpoint, expiry) in self._entries.items() if expiry > now}

    def progress(self, timeout_s: float = 0.0) -> None:
        if not self._channel.socket.poll(int(timeout_s * 1000)):
            return
        for identity, message in self._channel.receive():
            try:
                reply = self._handle(message)
            except ProtocolError as error:
                reply = error.reply()
            self._channel.send(reply, identity)

    def _handle(self, message: RegistryRequest | ProtocolError) -> RegistryReply:
        if isinstance(message, ProtocolError):
            raise message
        if isinstance(message, Publish):
            now = time.monotonic()
            self._entries[message.endpoint.name] = (message.endpoint, now + self.config.heartbeat_timeout_s)
            self._prune(now)
            return Published(message.endpoint.name)
        if isinstance(message, Withdraw):
            self._entries.pop(message.name, None)
            return Published(message.name)
        endpoint = self.endpoints().get(message.name)
        return NotFound(message.name) if endpoint is None else Found(endpoint)

    def _prune(self, now: float) -> None:
        """Drops expired leases, once per heartbeat interval: a sender killed without a Withdraw
        leaves its entry, and senders come back under new names (a new pod, a new pid)."""
        if now < self._next_prune:
            return
        self._next_prune = now + self.config.heartbeat_interval_s
        for name in [name for name, (_, expiry) in self._entries.items() if expiry <= now]:
            del self._entries[name]

    def start(self) -> BootstrapServer:
        """Serves on a daemon thread (the socket is used by that thread only from now on)."""
        self._thread = threading.Thread(target=self._serve, name="bootstrap", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stop.is_set():
            self.progress(0.05)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._channel.close()


HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
REFUSED_KEYS = ("the registry refused this process's keys at the connection's handshake: is the cluster "
                "secret the same for every process of the deployment?")
_monitors = itertools.count()
"""Names the monitors' inproc endpoints: pyzmq's default name is the socket's descriptor, which a
socket closed a moment before may still hold while libzmq's reaper finishes with it."""


class RegistryClient:
    """One side's conversation with a registry: publishes (senders) or looks up (receivers)."""

    def __init__(self, address: str, config: TransferConfig) -> None:
        self.address = address
        self.config = config
        socket = connecting_socket(zmq.DEALER, config.max_message_bytes, config.control_keys)
        self._handshakes = socket.get_monitor_socket(HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED,
                                                     f"inproc://registry-handshakes-{next(_monitors)}")
        """libzmq's account of the connection's handshakes: one refused (another secret, or none)
        is told in ``error`` at once, where the registry itself never sees a message of ours."""
        socket.connect(address)
        self.channel: Channel[RegistryReply] = Channel(socket, Codec(RegistryReply, config.max_message_bytes))
        self.error: str | None = None
        self._next_publish = 0.0

    def publish(self, endpoint: SenderEndpoint, now: float) -> None:
        """Renews the lease once per heartbeat interval; call it every loop iteration."""
        if now >= self._next_publish:
            self.channel.send(Publish(endpoint))
            self._next_publish = now + self.config.heartbeat_interval_s

    def withdraw(self, name: str) -> None:
        self.channel.send(Withdraw(name))

    def lookup(self, name: str) -> None:
        self.channel.send(Lookup(name))

    def replies(self) -> list[Found | NotFound]:
        """Answers that arrived; a registry error is kept in ``error`` until the registry answers
        again (one refused question, a name too long, must not fail every later room), and a
        handshake the registry refused (another secret) until one succeeds."""
        while self._handshakes.poll(0):
            if recv_monitor_message(self._handshakes)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self.error == REFUSED_KEYS:
                    self.error = None
            elif self.error != REFUSED_KEYS:
                self.error = REFUSED_KEYS
                log.error("registry %s: %s", self.address, self.error)
        answers = []
        for _, reply in self.channel.receive():
            if isinstance(reply, ProtocolError):
                self.error = f"registry sent an unreadable reply: {reply}"
            elif isinstance(reply, (Found, NotFound, Published)):
                self.error = None
                if not isinstance(reply, Published):
                    answers.append(reply)
            else:
                self.error = f"registry refused: {reply.code.value}: {reply.detail}"
                log.error("registry %s: %s", self.address, self.error)
        return answers

    def close(self) -> None:
        if not self.channel.socket.closed:
            self.channel.socket.disable_monitor()
        self._handshakes.close(linger=0)
        self.channel.close()
