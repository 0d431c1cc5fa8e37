"""A worker finds its router again within about a second of the router's return, however long it
was away: gRPC's default reconnect backoff doubles up to 120 s (a review: a router back after a
three-minute outage was reached 122 s later)."""

import time
from concurrent import futures

import grpc
import pytest

from mmserve.roles.worker import REGISTRY_CHANNEL_OPTIONS
from mmserve.rpc import auth

pytestmark = pytest.mark.slow
DOWN_S = 11.0  # the default backoff's tries fall at about 1, 2.6, 5.2, 9.4, 16 s: ~5 s late here


def test_the_registry_channel_reconnects_within_a_second_of_the_routers_return(tmp_path):
    address = f"unix:{tmp_path / 'router.sock'}"
    channel = auth.channel(address, "token", options=REGISTRY_CHANNEL_OPTIONS)
    call = channel.unary_unary("/mmserve.rpc.Registry/Probe", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
    start, server, up_at = time.monotonic(), None, None
    try:
        while True:
            if server is None and time.monotonic() - start > DOWN_S:
                server = grpc.server(futures.ThreadPoolExecutor(1))
                server.add_insecure_port(address)
                server.start()
                up_at = time.monotonic()
            try:
                call(b"", timeout=2)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:  # reached it (it has no such method)
                    break
            time.sleep(0.2)
        assert time.monotonic() - up_at < 2.5
    finally:
        channel.close()
        if server is not None:
            server.stop(0)
