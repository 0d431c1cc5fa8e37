"""The zmq data plane with the deployment's secret is CurveZMQ, as the control sockets are: a
process holding the secret pulls an offer; one without it, or with another secret, is refused at
the handshake and the offer stays where it is. Without a secret (a library user's choice) it is
plain ZMQ. Real planes on loopback, in this process."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfer import TransferConfig
from transfer.data_plane import open_data_plane


def _config(secret: str) -> TransferConfig:
    return TransferConfig(data_plane="zmq", secret=secret)


def _pull(sender, receiver, uuid: int, arrays, wait_s: float):
    """Offers ``arrays`` on ``sender`` and pulls them from ``receiver``: the pulled arrays, or None
    when nothing came back within ``wait_s``."""
    sender.offer(uuid, arrays, timeout_s=30)
    pending = receiver.pull(sender.address, uuid, [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays])
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        sender.serve_offers()
        if pending.done():
            return pending.result()
        time.sleep(0.01)
    return None


@pytest.fixture
def arrays():
    return [jnp.arange(24, dtype=jnp.float32).reshape(4, 6), jnp.ones((3,), jnp.int32)]


@pytest.mark.parametrize("secret", ["s" * 32, ""], ids=["curve", "plain"])
def test_a_peer_with_the_same_secret_pulls_the_offer(arrays, secret):
    sender, receiver = open_data_plane(_config(secret)), open_data_plane(_config(secret))
    try:
        pulled = _pull(sender, receiver, 7, arrays, wait_s=10)
        assert pulled is not None
        for got, want in zip(pulled, arrays, strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("other", ["", "t" * 32], ids=["no_secret", "another_secret"])
def test_a_peer_without_the_secret_gets_nothing_and_the_offer_stays(arrays, other):
    sender, outsider, member = (open_data_plane(_config(s)) for s in ("s" * 32, other, "s" * 32))
    try:
        assert _pull(sender, outsider, 7, arrays, wait_s=1.5) is None
        pending = member.pull(sender.address, 7, [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays])
        deadline = time.monotonic() + 10
        while not pending.done():
            assert time.monotonic() < deadline, "the offer was taken by the outsider's pull"
            sender.serve_offers()
            time.sleep(0.01)
        np.testing.assert_array_equal(np.asarray(pending.result()[0]), np.asarray(arrays[0]))
    finally:
        for plane in (sender, outsider, member):
            plane.close()
