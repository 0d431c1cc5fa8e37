"""CurveZMQ (libzmq's own encryption and authentication) for the ZMQ sockets that carry requests'
data between a deployment's processes: the transfer layer's control and registry sockets, the KV
events and a multi-host role's lockstep channel.

Each surface has one key pair for its server side and one for the clients it admits, both derived
from a shared secret (mmserve's ``ClusterCredential``), so only processes holding the secret can
connect: a peer without the client key is refused at the handshake, before any message of it is
read, and a client checks that its server holds the server key. A server socket's context runs a
ZAP handler admitting that one client key and no other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac

import zmq
import zmq.auth.thread
from zmq.utils import z85


@dataclasses.dataclass(frozen=True)
class CurveKeys:
    """A server's key pair and the one client key pair it admits (z85), from a 32-byte seed per side."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def derive(cls, server_seed: bytes, client_seed: bytes) -> CurveKeys:
        server_secret, client_secret = z85.encode(server_seed[:32]), z85.encode(client_seed[:32])
        return cls(zmq.curve_public(server_secret), server_secret, zmq.curve_public(client_secret), client_secret)

    @classmethod
    def from_secret(cls, secret: bytes, surface: str) -> CurveKeys:
        """A surface's key pairs from a shared secret (HMAC-SHA256 of the surface's name and side),
        so that no surface's keys reveal the secret or another surface's keys."""
        def seed(side: str) -> bytes:
            return hmac.new(secret, f"{surface}-{side}".encode(), hashlib.sha256).digest()
        return cls.derive(seed("server"), seed("client"))


def admit_only_the_client(context: zmq.Context, keys: CurveKeys) -> zmq.auth.thread.ThreadAuthenticator:
    """Starts ``context``'s ZAP handler, admitting ``keys``' client key only; stop it when done.
    Give the servers a context of their own: the handler answers for every socket in it."""
    authenticator = zmq.auth.thread.ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve_callback("*", credentials_provider=_OnlyKey(keys.client_public))
    return authenticator


def curve_server(socket: zmq.Socket, keys: CurveKeys) -> zmq.Socket:
    socket.curve_server = True
    socket.curve_secretkey = keys.server_secret
    socket.curve_publickey = keys.server_public
    return socket


def curve_client(socket: zmq.Socket, keys: CurveKeys) -> zmq.Socket:
    socket.curve_serverkey = keys.server_public
    socket.curve_publickey = keys.client_public
    socket.curve_secretkey = keys.client_secret
    return socket


class _OnlyKey:
    """ZAP: admits only one client key."""

    def __init__(self, allowed: bytes):
        self._allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        """``key``: the client's public key, z85-encoded."""
        return key == self._allowed
