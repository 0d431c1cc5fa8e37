"""Roles spanning two processes joined by jax.distributed on loopback, as on two hosts: each process
has its own CPU devices and the role's mesh spans both. Only the leader talks to the router and
the transfer layer; its follower runs the same programs in lockstep. Output equals the one-device
engine, token for token."""

import concurrent.futures
import signal
import subprocess
import time

import openai
import pytest

from cluster import ONE_AT_A_TIME, Cluster
from mmserve.serving.http_server import GRACEFUL_SHUTDOWN_S
from chaos import free_counts
from cluster_chats import ask, conversation, expected, image

pytestmark = pytest.mark.slow
FOUR_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
EIGHT_DEVICE_MESH = ["--mesh", "data=1,model=4,expert=2", *ONE_AT_A_TIME]  # 2 processes x 4 devices
DRAIN_S = 120
"""Decode's --drain-timeout here: far beyond what the drained answers take (a few seconds), so that
only a drain that does not happen fails the test."""
TOKENS = 32
"""Each drained answer's length: both are still decoding when the SIGTERM comes (a step of this
mesh takes ~80 ms here), and 300 took a minute more of the suite's time."""
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
    flags = {"encode": ["--mesh", "model=2", *ONE_AT_A_TIME], "prefill": EIGHT_DEVICE_MESH,
             "decode": [*EIGHT_DEVICE_MESH, "--drain-timeout", str(DRAIN_S)]}
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
    disaggregated.assert_all_free()


def test_a_role_spanning_two_processes_given_sigterm_drains_what_it_holds(disaggregated):
    """Kubernetes stops every pod of a multi-host role at once: the leader drains its requests
    through programs its follower must run too, so the follower, given the same SIGTERM, goes on
    until the leader is done (it used to exit at once, and the leader's answers were cut off).
    Decode is gone afterwards: the last test of this cluster."""
    client = _client(disaggregated)

    def answer(i: int):
        reply = client.chat.completions.create(
            model="tiny", messages=conversation(f"Tell story {i}.", [], as_url=False), max_tokens=TOKENS,
            temperature=0, extra_body={"ignore_eos": True})
        return reply.choices[0].finish_reason, reply.usage.completion_tokens

    leader, follower = disaggregated.processes["decode"], disaggregated.processes["decode.1"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert list(pool.map(answer, range(2))) == [("length", TOKENS)] * 2  # the programs they need, compiled
        decode_health = next(w for w in disaggregated.health()[1]["roles"]["decode"])
        assert decode_health["overlapped_decode_steps"] > 0  # decode steps overlap across the two processes
        answers = [pool.submit(answer, i) for i in range(2)]
        deadline = time.monotonic() + 60
        while free_counts(disaggregated.url)[("decode", "decode")]["in_flight"] < 2:
            assert time.monotonic() < deadline and not any(a.done() for a in answers), "the answers never ran together"
            time.sleep(0.02)
        for process in (leader, follower):
            process.send_signal(signal.SIGTERM)
        assert [a.result(timeout=DRAIN_S + 30) for a in answers] == [("length", TOKENS)] * 2
    assert leader.wait(timeout=30) == 0
    assert follower.wait(timeout=30) == 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("images", [CASES["text"], CASES["image"]], ids=["text", "image"])
def test_colocated_spanning_two_processes_equals_one_device(colocated, llm, images, stream):
    assert ask(_client(colocated), "Describe.", images, stream) == expected(llm, "Describe.", images)


def test_colocated_spanning_two_processes_given_sigterm_finishes_what_it_holds(colocated):
    """Both processes given SIGTERM with an answer streaming: the leader's HTTP server finishes it
    (its graceful shutdown) through programs the follower must run too, so the follower goes on
    until the leader has stopped (it used to exit at once, and the answer was cut off). The
    role is started again for the next test."""
    client = _client(colocated)

    def answer():
        return [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model="tiny", messages=conversation("Tell a story.", [], as_url=False), max_tokens=6,
            temperature=0, stream=True, extra_body={"ignore_eos": True}) if chunk.choices]

    answer()  # the programs it needs, compiled
    began = time.monotonic()
    whole = answer()
    took = time.monotonic() - began
    assert took < GRACEFUL_SHUTDOWN_S - 1, f"the answer took {took:.1f} s: too long to finish in the leader's shutdown"
    leader, follower = colocated.processes["colocated"], colocated.processes["colocated.1"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(answer)
        deadline = time.monotonic() + 30
        while colocated.health()[1].get("running", 0) < 1:
            assert time.monotonic() < deadline and not streaming.done(), "the answer never started"
            time.sleep(0.01)
        for process in (leader, follower):
            process.send_signal(signal.SIGTERM)
        assert "".join(streaming.result(timeout=60)) == "".join(whole)
    assert leader.wait(timeout=30) == 0
    assert follower.wait(timeout=30) == 0
    colocated.start_role("colocated", ["--port", str(colocated.port)])
    colocated.wait_healthy()


def test_follower_stops_when_its_leader_stops(colocated):
    leader, follower = colocated.processes["colocated"], colocated.processes["colocated.1"]
    leader.terminate()
    assert leader.wait(timeout=30) == 0
    try:
        assert follower.wait(timeout=30) == 0
    except subprocess.TimeoutExpired:
        pytest.fail("the follower outlived its leader by 30 s")
