"""A router's token stream on a decode worker, over real gRPC on loopback: it opens with an empty
message, a request must name an open stream, one id is one stream, and a router that hangs up
frees every request it sent (nothing else tells decode it left). Decode's Ack says when a refusal
is the client's to fix. A real decode role over a real
bootstrap registry with no prefill behind it, so its requests wait for their KV."""

import concurrent.futures
import json
import queue
import threading
import time

import grpc
import pytest

from mmserve import SamplingParams
from mmserve.engine.config import EngineConfig
from mmserve.roles.decode import DecodeRole, decode_service
from mmserve.roles.token_stream import TokenStream
from mmserve.roles.wire import sampling_to_pb
from mmserve.rpc import worker_pb2 as pb
from mmserve.rpc import worker_pb2_grpc as pb_grpc
from models.qwen3_vl_moe import load_model
from transfer import BootstrapServer, TransferConfig
from waiting import wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def served():
    """(stub, service): a decode worker's gRPC service on loopback, its loop running."""
    transfer = TransferConfig(data_plane="zmq", bootstrap_timeout_s=30.0)
    bootstrap = BootstrapServer(transfer).start()
    engine = EngineConfig(num_pages=32, page_size=16, max_model_len=256, max_num_seqs=4, precompile=False)
    service = decode_service(DecodeRole(load_model("tiny"), engine, transfer, "decode-streams", bootstrap.address))
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(8))
    pb_grpc.add_WorkerServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.WorkerStub(channel), service
    channel.close()
    server.stop(0)
    service.loop.stop()
    bootstrap.close()


@pytest.fixture
def worker(served):
    stub, service = served
    return stub, service.loop.role


def decode_request(request_id: str, room: int, stream_id: str) -> pb.DecodeRequest:
    # prompts of their own: one sharing another's first page would wait for it to land
    return pb.DecodeRequest(request_id=request_id, room=room, token_ids=[100 + room, *range(3, 23)],
                            sampling=sampling_to_pb(SamplingParams(max_tokens=4)), prefill_name="prefill-absent",
                            token_stream=stream_id)


def opened(stub, stream_id: str):
    """The Tokens call, after its first (empty) message: the stream is open."""
    call = stub.Tokens(pb.TokensRequest(stream_id=stream_id), timeout=60)
    assert next(call) == pb.TokenEvents()
    return call


def health(stub) -> dict:
    return json.loads(stub.Check(pb.HealthRequest(), timeout=10).details_json)


def test_a_request_naming_no_open_stream_is_refused_and_holds_nothing(worker):
    stub, role = worker
    pages = health(stub)["free_pages"]
    ack = stub.Decode(decode_request("r", 1, "never-opened"), timeout=10)
    assert not ack.ok and "never-opened" in ack.error
    assert health(stub)["in_flight"] == 0 and health(stub)["free_pages"] == pages


def test_a_prompt_beyond_decodes_context_is_rejected_as_the_clients_and_holds_nothing(worker):
    stub, _ = worker
    stream = opened(stub, "router")
    pages = health(stub)["free_pages"]
    request = decode_request("long", 1, "router")
    request.token_ids[:] = list(range(3, 3 + 300))  # the context holds 256
    ack = stub.Decode(request, timeout=10)
    assert not ack.ok and ack.rejected and "256" in ack.error
    assert health(stub)["in_flight"] == 0 and health(stub)["free_pages"] == pages
    stream.cancel()


def test_an_id_already_open_is_refused(worker):
    stub, _ = worker
    first = opened(stub, "same")
    with pytest.raises(grpc.RpcError) as refused:
        next(stub.Tokens(pb.TokensRequest(stream_id="same"), timeout=10))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    first.cancel()


def test_a_router_hanging_up_frees_its_requests_and_not_another_routers(worker):
    stub, _ = worker
    pages = health(stub)["free_pages"]
    gone, staying = opened(stub, "gone"), opened(stub, "staying")
    for request_id, room, stream_id in (("a", 1, "gone"), ("b", 2, "gone"), ("c", 3, "staying")):
        assert stub.Decode(decode_request(request_id, room, stream_id), timeout=10).ok
    wait_for(lambda: health(stub)["requests"] == {"receiving_kv": 3})
    gone.cancel()
    wait_for(lambda: health(stub)["in_flight"] == 1)
    assert health(stub)["requests"] == {"receiving_kv": 1}
    assert stub.Abort(pb.AbortRequest(request_id="c"), timeout=10).ok
    batch = next(staying)  # the abort's error event, on the stream that named the request
    assert [(e.request_id, e.error) for e in batch.events] == [("c", "aborted")]
    assert health(stub)["in_flight"] == 0 and health(stub)["free_pages"] == pages
    staying.cancel()


def test_events_put_during_a_step_leave_as_one_message_and_none_after_close():
    stream, sent = TokenStream("router"), queue.Queue()
    reader = threading.Thread(target=lambda: [sent.put(b) for b in iter(stream.next_batch, None)])
    reader.start()
    for request_id in ("a", "b", "c"):
        stream.put(pb.TokenEvent(request_id=request_id, token_ids=[7]))
    assert stream.flush() == 3 and stream.flush() == 0
    stream.close()
    stream.put(pb.TokenEvent(request_id="late"))
    assert stream.flush() == 0
    reader.join(timeout=10)
    assert [[e.request_id for e in sent.get_nowait().events]] == [["a", "b", "c"]] and sent.empty()


def test_a_router_hanging_up_while_a_step_runs_stalls_no_other_call(served):
    """gRPC runs a call's done-callbacks on its server's one polling thread: the callback freeing a
    closed stream's requests waited there for the loop to end its step, and meanwhile the worker
    took no call at all (here a second router opening its stream: no step needed)."""
    stub, service = served
    leaving = opened(stub, "leaving")
    busy = service.loop.submit(time.sleep, 3.0)  # a step that takes a while (a compile, say)
    time.sleep(0.2)
    leaving.cancel()
    time.sleep(0.2)  # the cancel reaches the server
    began = time.monotonic()
    opened(stub, "arriving")
    assert time.monotonic() - began < 1.5
    busy.result()
