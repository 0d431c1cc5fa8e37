"""The chaos drill on separate roles, each its own serve.py as Kubernetes would run them: kill -9 of
encode, prefill, decode or the router with 16 requests in flight. Every request ends within the
router's deadline; the test then starts the dead process again, as a Deployment would, and the
router takes it back without anyone telling it (a restarted worker registers, a restarted router
is found by the live workers); every pool is back to its starting free counts.
(``--role all``, which restarts its processes itself: test_serve_all.py.)"""

import concurrent.futures
import signal
import subprocess
import time

import openai
import pytest

from chaos import (DEADLINE_S, free_counts, kill_with_requests_in_flight, router_metric,
                   wait_until_free, wait_until_it_answers)
from cluster import Cluster
from mmserve import LLM
from mmserve.roles.worker_pool import WORKER_TIMEOUT_S
from cluster_chats import conversation, image
from waiting import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster("tiny", tmp_path_factory.mktemp("kill_logs"), role_flags={"router": ["--request-timeout", str(DEADLINE_S)]})
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", num_pages=256, page_size=8, max_model_len=512, max_prefill_tokens=128,
               precompile=False)  # a reference for a few answers: it compiles what they need, not the grid


@pytest.mark.parametrize("role", ["decode", "prefill", "encode", "router"])
def test_a_killed_role_started_again_is_taken_back_and_nothing_stays_held(cluster, llm, role):
    before = free_counts(cluster.url)
    restarts = router_metric(cluster.url, "mmserve_backend_worker_restarts")
    took = kill_with_requests_in_flight(cluster.url, lambda: cluster.kill(role))
    if role == "router":
        cluster.start_router()
    else:
        cluster.start_worker(role)  # under its name, at a new address, as a StatefulSet's pod comes back
    wait_until_it_answers(cluster.url, llm, f"{role} was killed and started again")
    wait_until_free(cluster.url, before)
    if role != "router":  # a new router starts its counters from zero
        assert router_metric(cluster.url, "mmserve_backend_worker_restarts") == restarts + 1
    assert max(took) < DEADLINE_S, f"requests outlived their deadline: {sorted(took)}"


def test_an_interrupted_worker_exits_though_its_calls_are_open(cluster, llm):
    """Ctrl-C (SIGINT) on decode, which holds the router's token stream open: the worker
    exits, and started again it is taken back. (Its open calls' threads kept the interpreter from
    exiting, for good: a supervisor never saw it die, and the role was lost.)"""
    wait_until_it_answers(cluster.url, llm, "before")  # the router's token stream is open from its first request
    decode = cluster.processes["decode"]
    decode.send_signal(signal.SIGINT)
    try:
        decode.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("an interrupted decode worker is still running 30 s later")
    cluster.start_worker("decode")
    wait_until_it_answers(cluster.url, llm, "decode was interrupted and started again")


def test_a_worker_given_sigterm_stops_cleanly_and_leaves_the_registry_at_once(cluster, llm):
    """Kubernetes stops a pod with SIGTERM: the worker ends as on Ctrl-C (exit status 0), its sender
    withdrawn from the bootstrap registry at once (it died on the signal, and receivers learnt of
    it only when its lease ran out)."""
    from mmserve.cluster_credential import SECRET_ENV, ClusterCredential
    from transfer import TransferConfig
    from transfer.bootstrap import RegistryClient
    from transfer.messages import Found

    from cluster import TRANSFER_ENV

    wait_until_it_answers(cluster.url, llm, "before")
    key = ClusterCredential(TRANSFER_ENV[SECRET_ENV].encode()).transfer_key
    registry = RegistryClient(f"tcp://127.0.0.1:{cluster.bootstrap_port}", TransferConfig(secret=key))

    def named() -> bool:
        registry.lookup("prefill")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for answer in registry.replies():
                return isinstance(answer, Found)
            time.sleep(0.02)
        raise TimeoutError("the registry did not answer")

    try:
        assert named()
        prefill = cluster.processes["prefill"]
        prefill.send_signal(signal.SIGTERM)
        assert prefill.wait(timeout=30) == 0
        assert not named(), "the stopped prefill is still in the registry"  # its lease had seconds left
    finally:
        registry.close()
    cluster.start_worker("prefill")
    wait_until_it_answers(cluster.url, llm, "prefill was stopped and started again")


DRAINED = 3
DRAINED_TOKENS = 480
"""Answers decode holds when it is told to stop (as many as its 256 test pages reserve at once),
each long enough
to outlast the second that its calls had to end before it drained."""


def test_a_worker_given_sigterm_is_sent_nothing_new_and_finishes_what_it_holds(cluster, llm):
    """An orchestrator replacing decode sends it SIGTERM in the middle of three long answers: the
    router stops sending it requests at once (a chat asked then is refused for want of a decode
    worker, long before the worker's heartbeats would have run out), the three are answered in
    full, and the worker exits 0 once they are. (It used to cut them off after a second, and the
    router kept routing to it until its lease ran out.)"""
    wait_until_it_answers(cluster.url, llm, "before")
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", timeout=DEADLINE_S, max_retries=0)

    def answer(i: int):
        reply = client.chat.completions.create(
            model="tiny", messages=conversation(f"Tell story {i}.", [], as_url=True), max_tokens=DRAINED_TOKENS,
            temperature=0, extra_body={"ignore_eos": True})
        return reply.choices[0].finish_reason, reply.usage.completion_tokens

    decode = cluster.processes["decode"]
    with concurrent.futures.ThreadPoolExecutor(DRAINED) as pool:
        # once before: the workers compile programs on first use here (--no-precompile), which
        # would make the drained answers outlast the drain
        assert list(pool.map(answer, range(DRAINED))) == [("length", DRAINED_TOKENS)] * DRAINED
        answers = [pool.submit(answer, i) for i in range(DRAINED)]
        deadline = time.monotonic() + 30
        while free_counts(cluster.url)[("decode", "decode")]["in_flight"] < DRAINED:
            assert time.monotonic() < deadline and not any(a.done() for a in answers), "the answers never ran together"
            time.sleep(0.02)
        decode.send_signal(signal.SIGTERM)
        told = time.monotonic()
        while router_metric(cluster.url, "mmserve_backend_workers_decode") > 0:
            assert time.monotonic() - told < WORKER_TIMEOUT_S / 2, "the router still routes to the stopping worker"
            time.sleep(0.02)
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="tiny", messages=conversation("Anyone?", [], as_url=True),
                                           max_tokens=4)
        assert refused.value.status_code == 503 and "no decode worker" in str(refused.value)
        assert [a.result(timeout=DEADLINE_S) for a in answers] == [("length", DRAINED_TOKENS)] * DRAINED
    assert decode.wait(timeout=30) == 0
    cluster.start_worker("decode")
    wait_until_it_answers(cluster.url, llm, "decode was stopped and started again")


def stop_decode_with_a_chat_on_its_way(cluster, pool, text: str, seed: int, max_tokens: int):
    """Prefill stopped (SIGSTOP, the caller thaws it), an image chat sent from ``pool`` (the router
    picks decode for it, and calls decode only once prefill has taken it), then decode given
    SIGTERM, once the router has the chat; returns the chat's future once the router has heard
    that decode is stopping."""
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", timeout=DEADLINE_S, max_retries=0)
    cluster.freeze("prefill")
    asked = pool.submit(client.chat.completions.create, model="tiny", max_tokens=max_tokens, temperature=0,
                        messages=conversation(text, [image(seed, (64, 64))], as_url=True),
                        extra_body={"ignore_eos": True})
    wait_for(lambda: router_metric(cluster.url, "mmserve_backend_in_flight") == 1, 30, "the router did not take the chat")
    cluster.processes["decode"].send_signal(signal.SIGTERM)
    wait_for(lambda: router_metric(cluster.url, "mmserve_backend_workers_decode") == 0, WORKER_TIMEOUT_S / 2,
             "the router did not hear that decode is stopping")
    return asked


def test_a_chat_routed_to_decode_before_it_was_told_to_stop_is_answered(cluster, llm):
    """SIGTERM reaches decode after the router picked it for a chat but before it called it, and
    prefill is stopped for longer than a drain used to wait for such calls. Decode, holding
    nothing, drains until the router answers its leaving registration with nothing routed to it;
    the chat is answered in full and decode exits 0 after it. (It waited half a second for such
    calls, then stopped: the chat got UNAVAILABLE from decode after its first token.)"""
    wait_until_it_answers(cluster.url, llm, "before")
    decode = cluster.processes["decode"]
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            asked = stop_decode_with_a_chat_on_its_way(cluster, pool, "Late for decode?", 424242, 24)
            time.sleep(1.5)  # three times the half second decode waited for calls on their way
            cluster.thaw("prefill")
            reply = asked.result(timeout=DEADLINE_S)
    finally:
        cluster.thaw("prefill")
    assert (reply.choices[0].finish_reason, reply.usage.completion_tokens) == ("length", 24)
    assert decode.wait(timeout=30) == 0
    cluster.start_worker("decode")
    wait_until_it_answers(cluster.url, llm, "decode was stopped and started again")


def test_a_leaving_worker_whose_router_died_stops_without_waiting_out_its_drain(cluster, llm):
    """Decode, told to stop while a chat is routed to it (prefill stopped, so the chat never
    comes), hears from the router that one request is on its way, and waits; then the router is
    killed. A dead router routes nothing more: decode stops within a second or two, not at its
    drain timeout (5 s here), which the old count held it to (as when a whole deployment stops)."""
    wait_until_it_answers(cluster.url, llm, "before")
    decode = cluster.processes["decode"]
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            stop_decode_with_a_chat_on_its_way(cluster, pool, "Nobody answers.", 434343, 4)
            time.sleep(0.6)  # past the half second it waits when it hears nothing
            assert decode.poll() is None, "decode stopped with a request routed to it"
            cluster.kill("router")
            killed = time.monotonic()
            assert decode.wait(timeout=30) == 0
            took = time.monotonic() - killed
            assert took < 3, f"decode waited {took:.1f} s for a dead router: its drain's time"
    finally:
        cluster.thaw("prefill")
    cluster.start_router()
    cluster.start_worker("decode")
    wait_until_it_answers(cluster.url, llm, "router and decode were started again")
