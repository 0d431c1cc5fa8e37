"""The bootstrap registry: publish, look up, leases expire, only holders of the secret connect."""

from __future__ import annotations

import dataclasses
import time

import msgspec
import pytest

from conftest import drive
from transfer import BootstrapServer
from transfer.bootstrap import REFUSED_KEYS, RegistryClient
from transfer.messages import Found, NotFound, SenderEndpoint

pytestmark = pytest.mark.timeout(30)

ENDPOINT = SenderEndpoint("encode-0", "tcp://127.0.0.1:5000", "jax", "127.0.0.1:5001")


@pytest.fixture
def registry_config(config):
    return dataclasses.replace(config, secret="s3cret", heartbeat_interval_s=0.1, heartbeat_timeout_s=0.5)


@pytest.fixture
def server(registry_config):
    server = BootstrapServer(registry_config).start()
    yield server
    server.close()


def answer(client: RegistryClient, name: str):
    client.lookup(name)
    answers = []
    drive([], lambda: answers.extend(client.replies()) or bool(answers) or client.error is not None)
    return answers[0] if answers else None


def test_published_sender_is_found_and_unknown_names_are_not(server, registry_config):
    publisher, looker = RegistryClient(server.address, registry_config), RegistryClient(server.address, registry_config)
    publisher.publish(ENDPOINT, time.monotonic())
    drive([], lambda: "encode-0" in server.endpoints())
    assert answer(looker, "encode-0") == Found(ENDPOINT)
    assert answer(looker, "decode-9") == NotFound("decode-9")
    publisher.withdraw("encode-0")
    drive([], lambda: "encode-0" not in server.endpoints())
    publisher.close()
    looker.close()


def test_lease_expires_unless_renewed(server, registry_config):
    publisher = RegistryClient(server.address, registry_config)
    publisher.publish(ENDPOINT, time.monotonic())
    drive([], lambda: "encode-0" in server.endpoints())
    renew_until = time.monotonic() + 1.0
    while time.monotonic() < renew_until:
        publisher.publish(ENDPOINT, time.monotonic())
        publisher.replies()
        time.sleep(0.02)
    assert "encode-0" in server.endpoints(), "renewed lease outlives the heartbeat timeout"
    drive([], lambda: "encode-0" not in server.endpoints(), timeout=5)
    publisher.close()


def test_expired_leases_are_dropped_not_only_hidden(server, registry_config):
    """Senders killed without a Withdraw, under names never used again (a new pod, a new pid):
    each left its entry in the registry for good."""
    publisher = RegistryClient(server.address, registry_config)
    for i in range(200):
        publisher.publish(msgspec.structs.replace(ENDPOINT, name=f"encode-{i}"), float(i))  # each its own lease
    drive([], lambda: len(server.endpoints()) == 200)
    time.sleep(registry_config.heartbeat_timeout_s + 0.1)  # every lease runs out
    publisher.publish(msgspec.structs.replace(ENDPOINT, name="encode-new"), 1000.0)
    drive([], lambda: "encode-new" in server.endpoints())
    assert len(server._entries) == 1  # noqa: SLF001: what it holds, not only what it answers
    publisher.close()


@pytest.mark.parametrize("key", ["guess", ""])
def test_a_client_without_the_key_can_neither_publish_nor_look_up(server, registry_config, key):
    """Keys from another secret, or none: the registry's socket refuses the connection at its
    handshake, so nothing is registered and nothing is learnt, and the client says why (the
    registry never sees a message of it to answer)."""
    publisher = RegistryClient(server.address, registry_config)
    publisher.publish(ENDPOINT, time.monotonic())
    drive([], lambda: "encode-0" in server.endpoints())
    intruder = RegistryClient(server.address, dataclasses.replace(registry_config, secret=key))
    intruder.publish(msgspec.structs.replace(ENDPOINT, name="evil"), time.monotonic())
    intruder.lookup("encode-0")
    answers = []
    drive([], lambda: bool(answers.extend(intruder.replies())) or intruder.error is not None)
    assert intruder.error == REFUSED_KEYS
    time.sleep(0.5)  # a few more of its reconnections, each refused
    assert answers + intruder.replies() == [] and intruder.error == REFUSED_KEYS
    assert "evil" not in server.endpoints()
    publisher.publish(ENDPOINT, time.monotonic())  # (the fixture's leases last 0.5 s)
    assert answer(publisher, "encode-0") == Found(ENDPOINT)  # the registry serves its own as before
    intruder.close()
    publisher.close()


def test_one_refused_lookup_does_not_fail_the_next(server, registry_config):
    """A question the registry refuses (a name longer than names may be) is that question's error:
    it used to stay in the client for good, failing every later room looked up through it."""
    client = RegistryClient(server.address, registry_config)
    try:
        assert answer(client, "x" * 200) is None and "malformed" in client.error
        client.lookup("nobody")
        answers = []
        drive([], lambda: bool(answers.extend(client.replies()) or answers))
        assert isinstance(answers[0], NotFound) and client.error is None
    finally:
        client.close()


@pytest.mark.parametrize("control, data_address", [
    ("not-an-endpoint", "127.0.0.1:5001"), ("tcp://http://host:5000", "127.0.0.1:5001"),
    ("tcp://127.0.0.1:5000", "garbage"), ("tcp://127.0.0.1:5000\n", "127.0.0.1:5001"),
], ids=["control_no_scheme", "control_two_schemes", "data_address", "trailing_newline"])
def test_an_endpoint_that_is_not_an_address_is_refused_and_never_found(server, registry_config, control,
                                                                      data_address):
    """A sender published with an address a receiver cannot dial (a mistyped advertise host) was
    handed to every receiver looking it up, whose connect then raised out of its loop: at
    bootstrap, at every heartbeat, in abort and close (leaving the other rooms' blocks held)."""
    publisher, looker = RegistryClient(server.address, registry_config), RegistryClient(server.address, registry_config)
    try:
        publisher.publish(msgspec.structs.replace(ENDPOINT, control=control, data_address=data_address),
                          time.monotonic())
        drive([], lambda: publisher.replies() == [] and publisher.error is not None)
        assert "malformed" in publisher.error and server.endpoints() == {}
        assert answer(looker, "encode-0") == NotFound("encode-0")
    finally:
        publisher.close()
        looker.close()


def test_a_registry_on_a_unix_socket_serves_who_holds_the_secret(registry_config, tmp_path):
    """``--role all`` puts its registry on a Unix socket in a directory only its user enters (a
    loopback TCP port could be taken first by another local user); the secret's keys still apply."""
    server = BootstrapServer(registry_config, endpoint=f"ipc://{tmp_path}/bootstrap.sock").start()
    publisher, looker = RegistryClient(server.address, registry_config), RegistryClient(server.address, registry_config)
    intruder = RegistryClient(server.address, dataclasses.replace(registry_config, secret="another"))
    try:
        assert server.address == f"ipc://{tmp_path}/bootstrap.sock"
        publisher.publish(ENDPOINT, time.monotonic())
        drive([], lambda: "encode-0" in server.endpoints())
        assert answer(looker, "encode-0") == Found(ENDPOINT)
        assert answer(intruder, "encode-0") is None and intruder.error == REFUSED_KEYS
    finally:
        for client in (publisher, looker, intruder):
            client.close()
        server.close()


def test_a_unix_socket_a_live_registry_holds_is_not_taken_over(registry_config, tmp_path):
    """ZMQ removes the file at a path it binds: a second registry given a live one's path took it
    over without a word (new peers reached it, the first one's never again). A file left by a
    registry that died is bound over."""
    import socket

    from transfer.unix_socket import SocketInUse

    path = tmp_path / "bootstrap.sock"
    server = BootstrapServer(registry_config, endpoint=f"ipc://{path}").start()
    try:
        with pytest.raises(SocketInUse, match="another server is listening"):
            BootstrapServer(registry_config, endpoint=f"ipc://{path}")
    finally:
        server.close()
    stale = tmp_path / "stale.sock"
    socket.socket(socket.AF_UNIX).bind(str(stale))  # the file stays; nobody listens on it
    BootstrapServer(registry_config, endpoint=f"ipc://{stale}").close()
