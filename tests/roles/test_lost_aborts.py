"""A request whose router can no longer abort it is still freed at its deadline, by each role on its
own: the router sends every worker the time left, and each role fails what passes it.

Decode is stopped (SIGSTOP) before the request comes, so prefill prefills it and its KV waits for
a decode that does not register; then the router is stopped too, so no abort can reach anyone.
Prefill frees the request at the deadline (10 s), long before its KV room's bootstrap timeout
(30 s) would; let go, decode frees it too (prefill's room has ended: it is told so when it
registers), the router answers the client with the deadline's error, and every pool is full again."""

import concurrent.futures
import json
import time

import openai
import pytest

from cluster import TRANSFER_ENV, Cluster
from mmserve.cluster_credential import SECRET_ENV, ClusterCredential
from mmserve.rpc import auth
from mmserve.rpc import worker_pb2 as pb
from mmserve.rpc import worker_pb2_grpc as pb_grpc
from cluster_chats import ask
from waiting import wait_for

pytestmark = pytest.mark.slow
DEADLINE_S = 10.0
BOOTSTRAP_TIMEOUT_S = float(TRANSFER_ENV["MMSERVE_BOOTSTRAP_TIMEOUT"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster("tiny", tmp_path_factory.mktemp("lost_abort_logs"),
                role_flags={"router": ["--request-timeout", str(DEADLINE_S)]})
    try:
        yield c.start()
    finally:
        c.stop()


def worker_health(cluster: Cluster, role: str) -> dict:
    """Asked of the worker itself (the router may be stopped), with the cluster's token."""
    token = ClusterCredential(TRANSFER_ENV[SECRET_ENV].encode()).grpc_token
    with auth.channel(cluster.worker_address(role), token) as channel:
        return json.loads(pb_grpc.WorkerStub(channel).Check(pb.HealthRequest(), timeout=10).details_json)


def test_every_role_frees_a_request_past_its_deadline_when_no_abort_can_come(cluster):
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", timeout=120, max_retries=0)
    pages = worker_health(cluster, "prefill")["free_pages"]
    cluster.freeze("decode")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        asked = pool.submit(ask, client, "Nobody will take my KV.", [])
        wait_for(lambda: worker_health(cluster, "prefill")["requests"] == {"sending_kv": 1}, DEADLINE_S / 2,
                 "prefill did not prefill the request", poll_s=0.2)
        cluster.freeze("router")
        wait_for(lambda: worker_health(cluster, "prefill")["in_flight"] == 0, BOOTSTRAP_TIMEOUT_S,
                 "prefill kept the request", poll_s=0.2)
        freed = time.monotonic() - started
        assert DEADLINE_S - 1 < freed < BOOTSTRAP_TIMEOUT_S - 5, f"freed after {freed:.1f} s: not by the deadline"
        assert worker_health(cluster, "prefill")["free_pages"] == pages
        cluster.thaw("decode")
        cluster.thaw("router")
        with pytest.raises(openai.APIError, match="deadline"):
            asked.result(timeout=60)
    cluster.wait_healthy(timeout=60)  # the workers registered again with the router
    cluster.assert_all_free()
