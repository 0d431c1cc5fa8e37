"""Roles spanning two processes joined by jax.distributed on loopback, as on two hosts: each process
has its own CPU devices and the role's mesh spans both. Only the leader talks to the router and
the transfer layer; its follower runs the same programs in lockstep. Output equals the one-device
engine, token for token."""

import subprocess

import openai
import pytest

from cluster import ONE_AT_A_TIME, Cluster
from test_disaggregated import _assert_all_free, ask, expected, image

pytestmark = pytest.mark.slow
FOUR_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
EIGHT_DEVICE_MESH = ["--mesh", "data=1,model=4,expert=2", *ONE_AT_A_TIME]  # 2 processes x 4 devices
CASES = {"text": [], "image": [image(1, (64, 64))], "image_with_resume": [image(4, (256, 256))]}


@pytest.fixture(scope="module")
def llm():
    from mmserve import LLM

    return LLM("tiny", num_pages=256, page_size=8, max_model_len=512, max_prefill_tokens=128,
               precompile=False)  # a reference for a few answers: it compiles what they need, not the grid


@pytest.fixture(scope="module")
def colocated(tmp_path_factory):
    c = Cluster("tiny", tmp_path_factory.mktemp("multihost_colocated"), {"colocated": EIGHT_DEVICE_MESH},
                {"colocated": FOUR_DEVICES}, {"colocated": 2})
    try:  # a start that fails or times out stops what it started too
        c.start_role("colocated", ["--port", str(c.port)])
        c.wait_healthy()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def disaggregated(tmp_path_factory):
    """Every worker role on two processes: encode on 2 x 1 device, prefill and decode on 2 x 4."""
    flags = {"encode": ["--mesh", "model=2", *ONE_AT_A_TIME], "prefill": EIGHT_DEVICE_MESH, "decode": EIGHT_DEVICE_MESH}
    env = {"encode": ONE_DEVICE, "prefill": FOUR_DEVICES, "decode": FOUR_DEVICES}
    c = Cluster("tiny", tmp_path_factory.mktemp("multihost_roles"), flags, env,
                {"encode": 2, "prefill": 2, "decode": 2})
    try:  # a start that fails or times out stops what it started too
        yield c.start()
    finally:
        c.stop()


def _client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", timeout=600, max_retries=0)


@pytest.mark.parametrize("images", list(CASES.values()), ids=list(CASES))
def test_roles_spanning_two_processes_equal_one_device(disaggregated, llm, images):
    assert ask(_client(disaggregated), "Describe.", images) == expected(llm, "Describe.", images)


def test_roles_spanning_two_processes_free_everything(disaggregated):
    _assert_all_free(disaggregated)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("images", [CASES["text"], CASES["image"]], ids=["text", "image"])
def test_colocated_spanning_two_processes_equals_one_device(colocated, llm, images, stream):
    assert ask(_client(colocated), "Describe.", images, stream) == expected(llm, "Describe.", images)


def test_follower_stops_when_its_leader_stops(colocated):
    leader, follower = colocated.processes["colocated"], colocated.processes["colocated.1"]
    leader.terminate()
    assert leader.wait(timeout=30) == 0
    try:
        assert follower.wait(timeout=30) == 0
    except subprocess.TimeoutExpired:
        pytest.fail("the follower outlived its leader by 30 s")
