"""The cluster token on gRPC, with real servers on loopback: calls of every shape (unary, server
stream; sync and asyncio clients and servers) get through with the token and are refused
(UNAUTHENTICATED, the servicer never runs) without it or with another."""

import asyncio
import concurrent.futures

import grpc
import pytest

from mmserve.rpc import auth
from mmserve.rpc import worker_pb2 as pb
from mmserve.rpc import worker_pb2_grpc as pb_grpc

TOKEN = "right-token"


class Worker(pb_grpc.WorkerServicer):
    def __init__(self):
        self.calls = 0

    def Tokens(self, request, context):
        self.calls += 1
        yield pb.TokenEvents(events=[pb.TokenEvent(request_id=request.stream_id)])

    def Check(self, request, context):
        self.calls += 1
        return pb.Health(details_json="{}")


class Registry(pb_grpc.RegistryServicer):
    def __init__(self):
        self.calls = 0

    async def Register(self, request, context):
        self.calls += 1
        return pb.Ack(ok=True)


@pytest.fixture
def worker():
    servicer = Worker()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(4), interceptors=[auth.TokenCheck(TOKEN)])
    pb_grpc.add_WorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


def test_async_client_with_the_token_reaches_a_worker_and_others_do_not(worker):
    address, servicer = worker

    async def calls(make_channel):
        async with make_channel() as channel:  # an asyncio channel belongs to the loop it is made in
            stub = pb_grpc.WorkerStub(channel)
            health = await stub.Check(pb.HealthRequest(), timeout=10)
            events = [e for b in [b async for b in stub.Tokens(pb.TokensRequest(stream_id="r"), timeout=10)]
                      for e in b.events]
            return health, events

    health, events = asyncio.run(calls(lambda: auth.async_channel(address, TOKEN)))
    assert health.details_json == "{}" and [e.request_id for e in events] == ["r"]
    assert servicer.calls == 2
    for channel in (lambda: grpc.aio.insecure_channel(address), lambda: auth.async_channel(address, "wrong")):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            asyncio.run(calls(channel))
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert servicer.calls == 2


def test_sync_client_stream_is_refused_without_the_token(worker):
    address, servicer = worker
    with auth.channel(address, TOKEN) as channel:
        [batch] = pb_grpc.WorkerStub(channel).Tokens(pb.TokensRequest(stream_id="s"))
        assert [e.request_id for e in batch.events] == ["s"]
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            list(pb_grpc.WorkerStub(channel).Tokens(pb.TokensRequest(stream_id="s"), timeout=10))
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert servicer.calls == 1


def test_async_registry_takes_only_token_holders():
    async def scenario():
        servicer = Registry()
        server = grpc.aio.server(interceptors=[auth.AsyncTokenCheck(TOKEN)])
        pb_grpc.add_RegistryServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        registration = pb.Registration(role="decode", name="d", grpc_address="127.0.0.1:9")
        codes = []
        for channel in (auth.async_channel(f"127.0.0.1:{port}", TOKEN), grpc.aio.insecure_channel(f"127.0.0.1:{port}"),
                        auth.async_channel(f"127.0.0.1:{port}", "wrong")):
            async with channel:
                try:
                    await pb_grpc.RegistryStub(channel).Register(registration, timeout=10)
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as error:
                    codes.append(error.code())
        await server.stop(0)
        return codes, servicer.calls

    codes, calls = asyncio.run(scenario())
    assert codes == [grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED]
    assert calls == 1
