"""A loop that sleeps on a receiver's sockets wakes when a pull lands, on either data plane: it
need not wake on a timer to look (a role's loop sleeps until then)."""

from __future__ import annotations

import dataclasses
import time

import pytest
import zmq

from conftest import drive
from transfer import PollState, Receiver, Sender, TransferMode
from transfer_payload import KV_FIELDS, send_rows

pytestmark = pytest.mark.timeout(60)
SLEEP_S = 10.0


@pytest.mark.parametrize("plane", ["jax", "zmq"])
def test_a_landed_pull_wakes_a_loop_sleeping_on_the_receivers_sockets(config, bootstrap, plane):
    config = dataclasses.replace(config, data_plane=plane)
    sender = Sender(config, KV_FIELDS, "prefill-0", bootstrap.address)
    receiver = Receiver(config, KV_FIELDS)
    try:
        tokens = 13
        send_rows(sender, config, 1, tokens)
        receiver.add(1, bootstrap.address, "prefill-0", TransferMode.KV, sender.incarnation)
        # the sender answers the registration and offers the chunk; the receiver starts pulling it
        drive([sender, receiver], lambda: receiver.poll(1) is PollState.TRANSFERRING)
        start = time.monotonic()
        while receiver.poll(1) is PollState.TRANSFERRING and time.monotonic() - start < SLEEP_S:
            poller = zmq.Poller()  # as a process holding both would sleep (the zmq plane's sender serves pulls)
            for socket in receiver.sockets() + sender.sockets():
                poller.register(socket, zmq.POLLIN)
            poller.poll(SLEEP_S * 1000)
            receiver.progress(0)
            sender.progress(0)
        assert receiver.poll(1) is PollState.SUCCESS
        assert time.monotonic() - start < SLEEP_S / 2, "the landing did not wake the poll"
        assert receiver.take(1).num_tokens == tokens
    finally:
        receiver.close()
        sender.close()
