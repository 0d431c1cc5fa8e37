"""The README's main command: ``serve.py --role all`` answers the unmodified openai client exactly
as the colocated engine does, streaming or not, survives any of its processes dying, and stops
every process it started."""

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import numpy as np
import openai
import pytest

from chaos import (DEADLINE_S, free_counts, kill_with_requests_in_flight, router_metric,
                   wait_until_free, wait_until_it_answers)
from cluster import SERVE, free_port, get_json
from mmserve.cluster_credential import SECRET_ENV
from mmserve.roles.supervisor import PARENT_ENV
from cluster_chats import CASES, MAX_TOKENS, ask, conversation, expected, image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def all_log(tmp_path_factory):
    """What ``--role all`` and its processes print, at the default log level."""
    return tmp_path_factory.mktemp("all_logs") / "all.log"


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    """Where every process of ``--role all`` appends its spans."""
    return tmp_path_factory.mktemp("traces") / "spans.jsonl"


@pytest.fixture(scope="module")
def server(all_log, trace_file):
    # 8 sequences, 2 prefilled together: a grid of fewer shapes to compile before ready (and to load
    # again in each process the kill drills restart); the drills' 16 requests run 8 at a time
    with role_all(all_log, "--trace-file", str(trace_file), "--max-num-seqs", "8", "--max-prefill-seqs", "2") as started:
        yield started


@contextlib.contextmanager
def role_all(log, *flags: str):
    """``serve.py --role all`` on the tiny model with ``flags``, once healthy: (process, port). Stops
    it and whatever it started when done, and when its start fails or times out."""
    port = free_port()
    process = subprocess.Popen([sys.executable, SERVE, "--role", "all", "--model", "tiny", "--port", str(port),
                                "--num-pages", "256", "--page-size", "8", "--max-model-len", "512",
                                "--max-prefill-tokens", "128", "--request-timeout", str(DEADLINE_S), *flags],
                               env={k: v for k, v in os.environ.items() if k != SECRET_ENV}
                               | {"JAX_PLATFORMS": "cpu", PARENT_ENV: str(os.getpid())},
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        _wait_healthy(process, port, log)
        yield process, port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # whatever is left in its session (the children keep it, each in a process group of its own)
        subprocess.run(["pkill", "-KILL", "-s", str(process.pid)], check=False)


def _wait_healthy(process, port: int, all_log) -> None:
    deadline = time.monotonic() + 480
    while True:
        assert process.poll() is None, all_log.read_text()[-3000:]
        try:
            if get_json(f"http://127.0.0.1:{port}/health")[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "serve.py --role all did not become healthy"
        time.sleep(1)


def test_role_all_start_up_says_what_each_process_did(server, all_log):
    """Weights loaded and programs compiled, a line each per process; the URL once every role is
    ready; none of the health polls (503 until then) in the access log."""
    ready = f"router INFO ready on http://127.0.0.1:{server[1]}"
    deadline = time.monotonic() + 10  # the router notices readiness on its own next poll
    while ready not in (log := all_log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ready in log, log[-3000:]
    for role in ("encode", "prefill", "decode"):
        assert re.search(rf"{role} INFO weights loaded: tiny \(random weights", log), role
        assert re.search(rf"{role} INFO \w+: \d+ programs compiled, \d+ loaded from the compilation cache", log), role
    assert "GET /health" not in log


@pytest.fixture(scope="module")
def llm():
    from mmserve import LLM

    return LLM("tiny", num_pages=256, page_size=8, max_model_len=512, max_prefill_tokens=128,
               precompile=False)  # a reference for a few answers: it compiles what they need, not the grid


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_role_all_equals_colocated(server, llm, case, stream):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server[1]}/v1", api_key="unused", timeout=120,
                           max_retries=0)
    text, images = CASES[case]
    assert ask(client, text, images, stream) == expected(llm, text, images)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_video_chat_through_the_roles_equals_colocated(server, llm, stream):
    """A ``video_url`` part: decoded and sampled by the router, encoded by encode (deepstack per
    token), prefilled and decoded: the offline engine's answer on the same sampled frames."""
    from mmserve import SamplingParams
    from videos import lossless_video, random_frames, video_data_url

    frames = random_frames(5, 12, 64, 64)
    indices = llm.model.processor.sample_frame_indices(12, 4.0)
    sampled = (frames[indices], {"fps": 4.0, "frames_indices": indices.tolist()})  # vLLM's (frames, metadata)
    want = llm.chat([{"role": "user", "content": [{"type": "video", "video": sampled},
                                                   {"type": "text", "text": "What happens?"}]}],
                    SamplingParams(temperature=0, max_tokens=MAX_TOKENS))[0].outputs[0].text
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server[1]}/v1", api_key="unused", timeout=120,
                           max_retries=0)
    messages = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video_data_url(lossless_video(frames, fps=4))}},
        {"type": "text", "text": "What happens?"}]}]
    reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=MAX_TOKENS,
                                           stream=stream)
    text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream \
        else reply.choices[0].message.content
    assert text == want


def test_one_trace_follows_a_request_through_every_role(server, trace_file):
    """The router's span for a request, and encode's, prefill's and decode's spans for it as its
    children, in one trace, each from its own process (the context crossed in gRPC metadata),
    with the vision tower and each side of each transfer as their children."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server[1]}/v1", api_key="unused", timeout=120,
                           max_retries=0)
    reply = client.chat.completions.create(model="tiny", messages=conversation("Trace me.", [image(11, (64, 64))],
                                                                               as_url=True), max_tokens=4)
    deadline = time.monotonic() + 30  # each process exports its spans every few seconds
    while True:
        spans = [json.loads(line) for line in trace_file.read_text().splitlines()] if trace_file.exists() else []
        mine = {s["resource"]["attributes"]["service.name"]: s for s in spans
                if s["attributes"].get("mmserve.request_id") == reply.id}
        if len(mine) == 4 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(mine) == {"mmserve-router", "mmserve-encode", "mmserve-prefill", "mmserve-decode"}, sorted(mine)
    router = mine["mmserve-router"]
    assert router["attributes"]["mmserve.outcome"] == "finished"
    assert "first token" in [e["name"] for e in router["events"]]
    for role in ("encode", "prefill", "decode"):
        span = mine[f"mmserve-{role}"]
        assert span["context"]["trace_id"] == router["context"]["trace_id"], role
        assert span["parent_id"] == router["context"]["span_id"], role
        assert span["events"][-1]["name"] == "done", role
    assert [e["name"] for e in mine["mmserve-decode"]["events"]] == ["receiving_kv", "decoding", "done"]
    hops = {"encode": {"vision tower", "send embeddings"}, "prefill": {"receive embeddings", "send KV"},
            "decode": {"receive KV"}}  # each transfer a span of its own, on both sides
    for role, names in hops.items():
        span_id = mine[f"mmserve-{role}"]["context"]["span_id"]
        assert {s["name"] for s in spans if s["parent_id"] == span_id} == names, role
    by_parent = {(s["parent_id"], s["name"]): s for s in spans}

    def hop(role: str, name: str) -> dict:
        return by_parent[(mine[f"mmserve-{role}"]["context"]["span_id"], name)]

    for receiving, sending in ((("prefill", "receive embeddings"), ("encode", "send embeddings")),
                               (("decode", "receive KV"), ("prefill", "send KV"))):
        # the transfer's own message carried the sending side's context: the receiving side links to it
        assert [link["context"]["span_id"] for link in hop(*receiving)["links"]] == [
            hop(*sending)["context"]["span_id"]], receiving


def test_a_later_turn_about_a_picture_asks_prefill_before_encode(server):
    """``--role all``'s prefill and decode publish KV events, so the router knows prefill holds a
    chat's first turn: the second turn goes to prefill alone (it holds the picture's pages),
    and encode is never called for it, not even to be aborted."""
    url = f"http://127.0.0.1:{server[1]}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
    messages = conversation("Describe it.", [image(23, (64, 64))], as_url=True)
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)

    def accepted() -> int:
        return get_json(f"{url}/health")[1]["roles"]["encode"][0]["accepted"]

    encoded, routed = accepted(), router_metric(url, "mmserve_backend_prefix_routed_requests")
    time.sleep(2)  # prefill's events for turn 1 reach the router's index (loopback: milliseconds)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And what else?"}]
    second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    assert second.choices[0].finish_reason == "length"
    assert router_metric(url, "mmserve_backend_prefix_routed_requests") == routed + 1
    assert accepted() == encoded


SAMPLING = {
    "seeded": {"temperature": 0.9, "top_p": 0.9, "seed": 1234},
    "penalties": {"temperature": 0.7, "seed": 7, "presence_penalty": 1.0, "frequency_penalty": 0.5,
                  "repetition_penalty": 1.3},
    "logprobs": {"temperature": 0, "logprobs": 3},
    "stop_string": {"temperature": 0, "stop": "STOP"},  # STOP: replaced by a piece of the free output
    "stop_token": {"temperature": 0, "stop_token_ids": "STOP"},
    "logit_bias": {"temperature": 0.8, "seed": 5, "logit_bias": {"42": 5, "300": -100, "7": 3}},
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("name", sorted(SAMPLING))
def test_sampling_through_the_roles_equals_colocated(server, llm, name, stream):
    """Seeds, penalties, logprobs, stop strings, stop tokens and logit biases give, through encode -> prefill ->
    decode, what the colocated engine gives: text, finish and stop reason (a token's id stays an
    int), logprobs; streamed text (the tiny model's random tokens are often partial UTF-8) is the
    whole text, with no replacement characters the whole text lacks."""
    from mmserve import SamplingParams

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server[1]}/v1", api_key="unused", timeout=120,
                           max_retries=0)
    images = [image(9, (64, 64))]
    fields = dict(SAMPLING[name], max_tokens=12)
    if "STOP" in fields.values():  # stop where the unconstrained greedy output has a piece / a token
        free = llm.chat(conversation("Tell me.", images, as_url=False), SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
        fields["stop"] = [free.text[len(free.text) // 2:][:2]] if name == "stop_string" else None
        fields["stop_token_ids"] = [free.token_ids[5]] if name == "stop_token" else None
        fields = {k: v for k, v in fields.items() if v is not None}
    reference = llm.chat(conversation("Tell me.", images, as_url=False), SamplingParams(**fields))[0].outputs[0]
    api = {k: v for k, v in fields.items() if k not in ("logprobs", "top_k", "repetition_penalty", "stop_token_ids")}
    extra = {k: fields[k] for k in ("repetition_penalty", "stop_token_ids") if k in fields}
    if "logprobs" in fields:
        api |= {"logprobs": True, "top_logprobs": fields["logprobs"]}
    reply = client.chat.completions.create(model="tiny", messages=conversation("Tell me.", images, as_url=True),
                                           stream=stream, extra_body=extra, **api)
    if stream:
        chunks = [c for c in reply if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        last = chunks[-1].choices[0]
        token_logprobs = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    else:
        last = reply.choices[0]
        text = last.message.content
        token_logprobs = last.logprobs.content if last.logprobs else []
    assert text == reference.text
    assert "\ufffd" not in text or "\ufffd" in reference.text
    assert (last.finish_reason, last.model_extra.get("stop_reason")) == (reference.finish_reason,
                                                                         reference.stop_reason)
    if "logprobs" in fields:
        assert [lp.logprob for lp in token_logprobs] == pytest.approx([lp.logprob for lp in reference.logprobs],
                                                                      abs=1e-4)
        np.testing.assert_allclose([sorted(t.logprob for t in lp.top_logprobs) for lp in token_logprobs],
                                   [sorted(lp.top.values()) for lp in reference.logprobs], atol=1e-4)


def _children(process) -> dict[str, int]:
    """pid of each role ``--role all`` runs now."""
    out = {}
    for pid in subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split():
        argv = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")
        if "--role" in argv:  # not a dead child the supervisor has yet to reap (its cmdline is empty)
            out[argv[argv.index("--role") + 1]] = int(pid)
    return out


@pytest.mark.parametrize("role", ["decode", "prefill", "encode", "router"])
def test_role_all_heals_after_any_process_is_killed(server, llm, role):
    """kill -9 with 16 requests in flight: each ends (answered or refused) within its deadline, the
    dead process is started again, the deployment answers again without a person, and nothing
    stays held."""
    process, port = server
    url = f"http://127.0.0.1:{port}"
    before = free_counts(url)
    victim = _children(process)[role]
    took = kill_with_requests_in_flight(url, lambda: os.kill(victim, signal.SIGKILL))
    wait_until_it_answers(url, llm, f"its {role} was killed")
    assert process.poll() is None and _children(process)[role] != victim
    wait_until_free(url, before)
    if role != "router":  # a new router starts its counters from zero
        assert router_metric(url, "mmserve_backend_worker_restarts") > 0
    assert max(took) < DEADLINE_S, f"requests outlived their deadline: {sorted(took)}"


def test_a_killed_routers_port_stays_open_and_a_client_meanwhile_is_answered_by_the_next(server):
    """The supervisor binds the HTTP port once and each router serves on it: killed, the router's
    port was closed (refused) until the next one bound it, for any local user to take meanwhile
    (one did, and read the API key of the next request); with --port 0 it came back elsewhere."""
    process, port = server
    victim = _children(process)["router"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not _dead(victim):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("GET", "/v1/models")  # no router listens now: it waits in the backlog
        assert connection.getresponse().status == 200
    finally:
        connection.close()
    assert _children(process)["router"] != victim


def _dead(pid: int) -> bool:
    """Ended: reaped, or a zombie its parent has yet to reap."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_role_all_hands_its_secret_down_in_the_environment_not_argv(server):
    """Every child holds the same generated secret, and no command line shows it."""
    process, _ = server
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 4
    secrets_seen = set()
    for pid in children:
        if os.geteuid() != 0:  # a non-dumpable process's environ is root's alone (mmserve/core_dumps.py)
            with pytest.raises(PermissionError):
                open(f"/proc/{pid}/environ", "rb").read()
            continue
        environ = dict(item.split("=", 1) for item in
                       open(f"/proc/{pid}/environ", "rb").read().decode().split("\0") if "=" in item)
        secret = environ[SECRET_ENV]
        secrets_seen.add(secret)
        assert secret not in open(f"/proc/{pid}/cmdline", "rb").read().decode()
    assert os.geteuid() != 0 or (len(secrets_seen) == 1 and len(secrets_seen.pop()) >= 32)


def _children_argv(process) -> list[list[str]]:
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    return [open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0") for pid in children]


def _flag(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_role_all_keeps_its_grpc_surfaces_on_unix_sockets_only_its_user_can_reach(server):
    """A loopback TCP port is open to every local user, who could take it while it is free (a
    child restarting) and collect the token each worker sends with every call; a Unix socket in a
    0700 directory is this user's alone."""
    process, _ = server
    argvs = _children_argv(process)
    router = next(a for a in argvs if _flag(a, "--role") == "router")
    workers = [a for a in argvs if _flag(a, "--role") != "router"]
    registry = _flag(router, "--registry-socket")
    directory = os.path.dirname(registry)
    assert os.stat(directory).st_mode & 0o777 == 0o700 and os.stat(directory).st_uid == os.getuid()
    assert stat.S_ISSOCK(os.stat(registry).st_mode) and "--registry-port" not in router
    assert {_flag(a, "--router-url") for a in workers} == {f"unix:{registry}"}
    for argv in workers:
        assert os.path.dirname(_flag(argv, "--grpc-socket")) == directory
        assert stat.S_ISSOCK(os.stat(_flag(argv, "--grpc-socket")).st_mode)


def test_bytes_any_local_process_writes_to_role_all_s_tcp_ports_kill_none_of_its_processes(server, llm):
    """jax's transfer server aborts its process on a packet it does not expect (jaxlib's LOG(FATAL)),
    and it listened on loopback TCP, which every local user reaches: 64 zero bytes killed encode,
    prefill and decode, and again each time they were started again. ``--role all``'s data plane
    is on a Unix socket in its private directory now; what is left on TCP (the router's HTTP port,
    the CurveZMQ sockets) refuses such bytes and carries on."""
    process, port = server
    if os.geteuid() != 0:
        pytest.skip("the sockets of a non-dumpable process (mmserve/core_dumps.py) are root's alone to list")
    children = set(subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split())
    ports = {p for pid in children for p in _tcp_listen_ports(pid)}
    assert port in ports and len(ports) > 1
    for target in ports:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", target), timeout=2) as connection:
            connection.sendall(bytes(64))
            time.sleep(0.05)
    time.sleep(2)
    assert set(subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()) \
        == children, "a process of --role all died (and was started again)"
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0)
    text, images = CASES["one_image"]
    assert ask(client, text, images) == expected(llm, text, images)


def _tcp_listen_ports(pid: str) -> set[int]:
    """The TCP ports process ``pid`` listens on (its sockets' inodes in /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_no_process_of_role_all_writes_a_core_file_holding_its_secret(server):
    process, _ = server
    pids = [process.pid, *map(int, subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                                  text=True).stdout.split())]
    assert len(pids) == 5
    for pid in pids:
        limits = open(f"/proc/{pid}/limits").read()
        assert re.search(r"^Max core file size\s+0\s+0\s", limits, re.M), limits


def test_role_all_stops_every_process_it_started(server):
    """SIGHUP (its terminal closing), as SIGTERM: the children are stopped and the socket directory
    removed (killed with it undrained by the kernel, they left it behind)."""
    process, _ = server
    sockets = os.path.dirname(_flag(next(a for a in _children_argv(process) if "--registry-socket" in a),
                                    "--registry-socket"))
    process.send_signal(signal.SIGHUP)
    assert process.wait(timeout=60) == 0
    left = subprocess.run(["pgrep", "-s", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert left == [], "serve.py --role all left processes behind"
    assert not os.path.exists(sockets)


def test_role_all_starts_the_workers_it_is_told_and_a_shared_prefix_goes_to_one(tmp_path):
    """``--workers prefill=2,decode=2``: four workers register under their own names, and chats
    sharing a long system prompt all reach the worker of each role that holds it (cache-aware
    routing, the default policy), whose prefix cache then serves it."""
    system = "You answer questions about pictures carefully, plainly and in full sentences. " * 4
    # --no-precompile: five workers loading the grid on two cores took 50 s; start-up is tested above
    with role_all(tmp_path / "workers.log", "--workers", "prefill=2,decode=2", "--no-precompile") as (process, port):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        for i, question in enumerate(("What is red?", "What is blue?", "What is green?")):
            client.chat.completions.create(model="tiny", max_tokens=4, messages=[
                {"role": "system", "content": system}, {"role": "user", "content": question}])
            if i == 0:
                time.sleep(1.0)  # the first chat's KV events reach the router's index
        roles = get_json(f"http://127.0.0.1:{port}/health")[1]["roles"]
        assert sorted(w["name"] for w in roles["encode"]) == ["encode"]
        for role in ("prefill", "decode"):
            workers = roles[role]
            assert sorted(w["name"] for w in workers) == [f"{role}-0", f"{role}-1"]
            assert sorted(w["prefix_cache_hits"] > 0 for w in workers) == [False, True], workers
