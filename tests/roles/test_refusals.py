"""A role's refusals say whose fault they are: a prompt its KV cache cannot hold is the client's
(the router answers 400), a request the router should never have sent is the server's (500).
A real prefill role over a real bootstrap registry, called as its gRPC servicer is."""

import pytest

from mmserve import SamplingParams
from mmserve.engine.config import EngineConfig
from mmserve.roles.prefill import PrefillRole, prefill_service
from mmserve.roles.wire import sampling_to_pb
from mmserve.rpc import worker_pb2 as pb
from models.qwen3_vl_moe import load_model
from transfer import BootstrapServer, TransferConfig


@pytest.fixture(scope="module")
def service():
    config = TransferConfig(data_plane="zmq")
    bootstrap = BootstrapServer(config).start()
    engine = EngineConfig(num_pages=4, page_size=16, max_model_len=512, precompile=False)  # refusals compile nothing
    role = PrefillRole(load_model("tiny"), engine, config, "prefill-refusals", bootstrap.address)
    svc = prefill_service(role)
    yield svc
    svc.loop.stop()  # closes the role too
    bootstrap.close()


def _prefill(service, room: int, token_ids, **fields) -> pb.Ack:
    request = pb.PrefillRequest(request_id=f"r{room}", room=room, token_ids=token_ids,
                                sampling=sampling_to_pb(SamplingParams()), **fields)
    [event] = service.Prefill(request, CallWithoutMetadata())  # a refusal ends the stream at the Ack
    return event.ack


class CallWithoutMetadata:
    """What the servicer reads of grpc's ServicerContext here: a call's metadata (none: no trace)."""

    def invocation_metadata(self):
        return ()


def test_a_prompt_beyond_the_kv_cache_is_rejected_as_the_clients_and_holds_nothing(service):
    ack = _prefill(service, 1, list(range(3, 103)))  # 100 tokens; 3 pages of 16 hold 48
    assert not ack.ok and ack.rejected and "KV pages" in ack.error
    health = service.loop.call(service.loop.role.health)
    assert health["in_flight"] == 0 and health["free_pages"] == health["total_pages"]
    assert health["free_kv_blocks"] == TransferConfig().buffer_blocks


def test_a_request_the_router_should_not_send_is_refused_as_the_servers(service):
    ack = _prefill(service, 2, list(range(3, 13)), encode_name="encode-0")  # no images, yet an encoder
    assert not ack.ok and not ack.rejected and "encode worker" in ack.error
