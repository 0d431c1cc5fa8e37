"""serve.py's roles, each its own process (as --role all starts them, but with their pids at hand):
resume, concurrency, a killed encode worker, malformed requests, and a process without the
cluster secret refused on every surface. The plain chat cases against --role all are in
test_serve_all.py."""

import base64
import concurrent.futures
import http.client
import io
import json
import socket
import time

import grpc
import openai
import pytest
from PIL import Image

from chaos import router_metric
from cluster_chats import MAX_TOKENS, ask, conversation, expected, image
from cluster import TRANSFER_ENV, Cluster, free_port, get_json
from mmserve import LLM, SamplingParams
from mmserve.cluster_credential import SECRET_ENV, ClusterCredential
from mmserve.rpc import auth
from mmserve.rpc import worker_pb2 as pb
from mmserve.rpc import worker_pb2_grpc as pb_grpc
from transfer import TransferConfig
from transfer.bootstrap import REFUSED_KEYS, RegistryClient

pytestmark = pytest.mark.slow


KV_EVENTS_PORT = free_port()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # The workers compile each program when a request first needs it (cluster.ENGINE_FLAGS): requests
    # beyond their capacity wait up to 10 s for it (test_stalled_readers_...), longer than a burst of
    # new shapes takes to compile (a 3 s wait once lost one of 32 stalled streams to a 503).
    kv_events = ["--kv-events-endpoint", f"tcp://127.0.0.1:{KV_EVENTS_PORT}",
                 "--kv-events-replay-endpoint", f"tcp://127.0.0.1:{KV_EVENTS_PORT + 1}"]
    c = Cluster("tiny", tmp_path_factory.mktemp("cluster_logs"),
                role_flags={"router": ["--queue-timeout", "10"], "prefill": kv_events})
    try:  # a start that fails or times out stops what it started too
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", num_pages=256, page_size=8, max_model_len=512, max_prefill_tokens=128,
               precompile=False)  # a reference for a few answers: it compiles what they need, not the grid


def test_prefill_publishes_the_pages_it_cached(cluster, client):
    """Subscribed with the cluster's key, a router sees prefill store a long prompt's full pages."""
    from mmserve.kv_events import BlockStored, KVEventSubscriber

    keys = ClusterCredential(TRANSFER_ENV[SECRET_ENV].encode()).kv_event_keys
    subscriber = KVEventSubscriber(f"tcp://127.0.0.1:{KV_EVENTS_PORT}", f"tcp://127.0.0.1:{KV_EVENTS_PORT + 1}",
                                   keys)
    try:
        time.sleep(0.5)
        prompt = "Count the pages. " * 12
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
        stored = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not stored:
            stored = [e for _, batch in subscriber.receive(0.5) for e in batch.events if isinstance(e, BlockStored)]
        assert stored, "no BlockStored from prefill"
        assert reply.usage.prompt_tokens // 16 >= len([e for e in stored if e.parent_block_hash is None]) >= 1
        assert all(len(e.token_ids) == e.block_size for e in stored)
    finally:
        subscriber.close()


def test_embedding_longer_than_default_allocation_resumes_and_prefill_starts_on_its_first_chunk(cluster, client,
                                                                                                  llm):
    big = [image(4, (256, 256))]  # 64 visual tokens against a default allocation of 32
    before = _prefill(cluster)
    assert ask(client, "Describe.", big) == expected(llm, "Describe.", big)
    after = _prefill(cluster)
    assert after["embedding_resumes"] == before["embedding_resumes"] + 1
    assert after["early_starts"] == before["early_starts"] + 1


def test_sixteen_concurrent_requests_then_everything_is_free(cluster, client, llm):
    cases = [(f"Question {i}.", [image(10 + i, (64, 64 + 32 * (i % 3)))] * (i % 3 != 0)) for i in range(16)]
    # The openai client builds its pydantic response models on first use, and two threads building
    # the same one at once can fail (PydanticUserError, seen in CI): build both kinds here first.
    ask(client, "Warm up.", [], stream=True)
    ask(client, "Warm up.", [], stream=False)
    before = cluster.roles()["decode"][0]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda c: ask(client, *c, stream=bool(len(c[0]) % 2)), cases))
    assert answers == [expected(llm, *c) for c in cases]
    assert _prefill(cluster)["prefix_cache_hits"] > 0  # the chat template's head
    # Decode sent the router each step's tokens of all its requests as one message.
    after = cluster.roles()["decode"][0]
    events, messages = (after[k] - before[k] for k in ("token_events_sent", "token_messages_sent"))
    assert events >= 16 and messages < events
    cluster.assert_all_free()


def test_a_second_turn_moves_only_the_kv_decode_does_not_hold(cluster, client, llm):
    """Decode keeps the pages of turn 1 (its prompt as it arrived, its answer as decoded): turn 2's
    KV room starts past them, so only the new tokens' KV moves; prefill holds the picture's pages,
    so turn 2 needs no embeddings and encode is not called; the answer is the offline one."""
    first = conversation("Describe the picture in a few words.", [image(50, (64, 64))], as_url=True)
    reply = client.chat.completions.create(model="tiny", messages=first, max_tokens=MAX_TOKENS, temperature=0)
    answer = reply.choices[0].message.content
    follow_up = [{"role": "assistant", "content": answer}, {"role": "user", "content": "And its colours?"}]
    roles = cluster.roles()
    before, encoded = roles["decode"][0], roles["encode"][0]["accepted"]
    second = client.chat.completions.create(model="tiny", messages=first + follow_up, max_tokens=MAX_TOKENS,
                                            temperature=0)
    roles = cluster.roles()
    after = roles["decode"][0]
    assert roles["encode"][0]["accepted"] == encoded
    held = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    moved = after["kv_tokens_received"] - before["kv_tokens_received"]
    assert held >= reply.usage.prompt_tokens // 8 * 8 > 0  # decode's pages are 8 tokens (cluster.py)
    assert held + moved == second.usage.prompt_tokens
    offline = conversation("Describe the picture in a few words.", [image(50, (64, 64))], as_url=False)
    want = llm.chat(offline + follow_up, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))[0].outputs[0].text
    assert second.choices[0].message.content == want
    cluster.assert_all_free()


def test_a_cache_salt_keeps_each_salts_pages_apart_on_prefill_and_decode(cluster, client, llm):
    """vLLM's ``cache_salt`` reaches both workers: a second turn salted differently from the first
    finds none of its pages on prefill or decode (all its KV moves), one salted alike finds them
    on both; every answer is the offline one."""
    first = conversation("Name the picture's main colour.", [image(52, (64, 64))], as_url=True)
    salted = {"cache_salt": "tenant a"}
    reply = client.chat.completions.create(model="tiny", messages=first, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body=salted)
    follow_up = [{"role": "assistant", "content": reply.choices[0].message.content},
                 {"role": "user", "content": "And the second?"}]
    offline = conversation("Name the picture's main colour.", [image(52, (64, 64))], as_url=False)
    want = llm.chat(offline + follow_up, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))[0].outputs[0].text
    for salt, found in (("tenant b", False), ("tenant a", True)):
        roles = cluster.roles()
        before_decode, before_prefill = roles["decode"][0], roles["prefill"][0]
        second = client.chat.completions.create(model="tiny", messages=first + follow_up, max_tokens=MAX_TOKENS,
                                                temperature=0, extra_body={"cache_salt": salt})
        roles = cluster.roles()
        held = roles["decode"][0]["prefix_cache_hits"] - before_decode["prefix_cache_hits"]
        moved = roles["decode"][0]["kv_tokens_received"] - before_decode["kv_tokens_received"]
        reused = roles["prefill"][0]["prefix_cache_hits"] - before_prefill["prefix_cache_hits"]
        assert (salt, held > 0, reused > 0) == (salt, found, found)
        assert held + moved == second.usage.prompt_tokens
        assert second.choices[0].message.content == want
    cluster.assert_all_free()


def test_siblings_receive_their_shared_prompt_once(cluster, client, llm):
    """n=3: the siblings arrive at decode together; the first receives the prompt's KV, the others
    wait for it to land and share its full pages, receiving only the last page's tokens. Each
    choice is the offline answer seeded seed + i."""
    messages = conversation("Tell three different short stories about this picture.", [image(51, (64, 64))],
                            as_url=True)
    before = cluster.roles()["decode"][0]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, n=3, seed=5,
                                           temperature=1.0)
    after = cluster.roles()["decode"][0]
    prompt = reply.usage.prompt_tokens
    held = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    moved = after["kv_tokens_received"] - before["kv_tokens_received"]
    assert held == 2 * ((prompt - 1) // 8 * 8) > 0
    assert held + moved == 3 * prompt
    offline = conversation("Tell three different short stories about this picture.", [image(51, (64, 64))],
                           as_url=False)
    want = [llm.chat(offline, SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=5 + i))[0].outputs[0].text
            for i in range(3)]
    assert [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)] == want
    cluster.assert_all_free()


def test_min_tokens_and_a_kept_stop_string_equal_one_engine(cluster, client, llm):
    """Prefill samples the first token alone: under ``min_tokens`` it may not be a stop token, nor
    end the request on a stop string (it would in one engine only from ``min_tokens`` on); decode
    holds the stop tokens back for the rest. The greedy answer's first token made its stop token
    and its first text its stop string: served, as offline, the answer goes on past both."""
    prompt = "Count to five."
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    fields = {"min_tokens": 3, "stop_token_ids": [free.token_ids[0]], "include_stop_str_in_output": True}
    if free.text[:2].strip():
        fields["stop"] = [free.text[:2]]
    want = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8, **fields))[0].outputs[0]
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, extra_body=fields)
    assert reply.choices[0].text == want.text and reply.usage.completion_tokens == len(want.token_ids) >= 3
    cluster.assert_all_free()


def test_siblings_ended_by_their_first_token_leave_nothing_held(cluster, client):
    """n=3 with max_tokens=1: the first token ends every choice while the later siblings still wait
    on decode for the first one's pages; prefill, which holds each one's KV for a decode that
    never registers, is told at once (it used to hold them until the room's bootstrap timeout)."""
    messages = conversation("One word about this picture.", [image(52, (64, 64))], as_url=True)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, n=3, seed=5,
                                           temperature=1.0)
    assert [c.finish_reason for c in reply.choices] == ["length"] * 3
    cluster.assert_all_free(within_s=4)  # the bootstrap timeout here is 30 s, the heartbeats' 5 s


def test_stalled_readers_holding_every_slot_do_not_hang_a_normal_request(cluster, client):
    """32 streams (decode's max_num_seqs), each more than its socket buffers hold (20 logprobs a
    token), whose clients never read: the next request is answered, or refused within the queue
    timeout, never left hanging (the router reads decode's streams into bounded buffers, so no
    worker thread waits on a stalled client); once the stalled clients leave, everything is free."""
    host, port = cluster.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 40,
                       "logprobs": True, "top_logprobs": 20, "ignore_eos": True, "stream": True}).encode()
    finished = 'mmserve_requests_total{endpoint="chat",outcome="finished"}'
    before = router_metric(cluster.url, finished)
    stalled = []
    for _ in range(32):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        stalled.append(sock)
    try:
        deadline = time.monotonic() + 120  # decode compiles its batch sizes' programs as the streams arrive
        while router_metric(cluster.url, finished) < before + 32:  # decoded to the end, though nobody reads
            assert time.monotonic() < deadline, "the stalled requests did not all finish"
            time.sleep(0.2)
        started = time.monotonic()
        try:
            answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi."}],
                                                    max_tokens=MAX_TOKENS)
            assert answer.choices[0].message.content is not None
        except openai.APIStatusError as refused:
            assert refused.status_code in (429, 503), refused
        assert time.monotonic() - started < 15
    finally:  # a failure above leaves no stalled stream to the tests after it
        for sock in stalled:
            sock.close()
    cluster.assert_all_free()


def test_killed_encode_fails_its_requests_and_a_restarted_one_serves(cluster, client, llm):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        cluster.freeze("encode")  # the two requests reach it and stay in flight there until it dies
        doomed = [pool.submit(ask, client, "Look.", [image(30 + i, (128, 192))]) for i in range(2)]
        text = pool.submit(ask, client, "Just text.", [])
        time.sleep(1)
        cluster.kill("encode")
        started = time.monotonic()
        doomed.append(pool.submit(ask, client, "Look again.", [image(40, (64, 64))]))
        for future in doomed:
            with pytest.raises(openai.APIStatusError):
                future.result(timeout=60)
        assert time.monotonic() - started < 45
        assert text.result(timeout=60) == expected(llm, "Just text.", [])
    cluster.assert_all_free(roles=("prefill", "decode"))
    deadline = time.monotonic() + 30  # the router drops encode when a call fails, or when its heartbeats stop
    while cluster.roles()["encode"]:
        assert time.monotonic() < deadline, "the router still counts the dead encode worker"
        time.sleep(0.5)
    with pytest.raises(openai.APIStatusError) as refused:  # a picture with no encoder: retry later, not a failure
        ask(client, "Anyone?", [image(41, (64, 64))])
    assert refused.value.status_code == 503 and refused.value.response.headers["Retry-After"]
    assert "no encode worker is up" in str(refused.value)
    assert ask(client, "Just text.", []) == expected(llm, "Just text.", [])

    cluster.start_worker("encode", name="encode-restarted")
    deadline = time.monotonic() + 180
    while not any(w["name"] == "encode-restarted" and "error" not in w for w in cluster.roles()["encode"]):
        assert time.monotonic() < deadline, "the restarted encode worker did not register"
        time.sleep(1)
    assert ask(client, "Again.", [image(5, (64, 64))]) == expected(llm, "Again.", [image(5, (64, 64))])


def truncated(picture: Image.Image, kind: str) -> str:
    """An image whose header reads but whose data stops halfway: a JPEG passes the router's cheap
    check (encode refuses it when it decodes), a PNG fails it (its chunks are checked)."""
    buf = io.BytesIO()
    picture.save(buf, format=kind)
    return f"data:image/{kind.lower()};base64," + base64.b64encode(buf.getvalue()[:buf.tell() // 2]).decode()


@pytest.mark.parametrize("content, reason", [
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], "base64"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"text").decode()}}],
     "image"),
    ([{"type": "image_url", "image_url": {"url": truncated(image(20, (128, 128)), "JPEG")}}],
     "the image cannot be decoded: .*truncated"),
    ([{"type": "image_url", "image_url": {"url": truncated(image(21, (128, 128)), "PNG")}}],
     "the image cannot be decoded"),
], ids=["bad_base64", "not_an_image", "truncated_jpeg", "truncated_png"])
def test_malformed_image_gets_400_and_changes_nothing(cluster, client, content, reason):
    with pytest.raises(openai.BadRequestError, match=reason):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], max_tokens=2)
    cluster.assert_all_free()


def _prefill(cluster) -> dict:
    return cluster.roles()["prefill"][0]


def test_clients_leaving_early_leave_nothing_held(cluster, client):
    """Clients that hang up a few ms into an image chat (before or after prefill has taken it, while
    encode holds it...): every role frees what the request held at once, not when a room's
    bootstrap timeout (30 s here) gives up on a peer that will never come. (The router's abort
    once reached only decode: prefill's KV then waited for a decode that was never called.)"""
    # One chat of these shapes first: a loop compiling them on first use would hold the leaving
    # requests' aborts past the 8 s allowed below.
    ask(client, "Who stayed?", [image(199, (96, 96))])
    def leave_after(i: int) -> None:  # a picture never sent before: encode is called with prefill
        body = {"model": "tiny", "max_tokens": 64, "messages": conversation("Who left?", [image(200 + i, (96, 96))], True)}
        connection = http.client.HTTPConnection("127.0.0.1", cluster.port, timeout=0.002 * (i + 1))
        try:
            connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            connection.getresponse().read()
        except TimeoutError:
            pass
        finally:
            connection.close()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(leave_after, range(32)))
    cluster.assert_all_free(within_s=8)


def test_health_names_every_role(cluster):
    status, body = get_json(f"{cluster.url}/health")
    assert status == 200 and body["healthy"]
    assert all(body["roles"][r] for r in ("encode", "prefill", "decode"))


def _refused(call) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_a_process_without_the_cluster_secret_is_refused_everywhere_and_changes_nothing(cluster, client, llm):
    """No token, or one derived from another secret: the worker registry, every worker RPC and
    the transfer bootstrap registry refuse it, register nothing and tell it nothing."""
    other = ClusterCredential(b"not-the-cluster-secret-at-all-0123456789")
    assert other.secret.decode() != TRANSFER_ENV[SECRET_ENV]
    impostor = pb.Registration(role="decode", name="impostor", grpc_address="127.0.0.1:9")
    for channel in (grpc.insecure_channel(f"127.0.0.1:{cluster.registry_port}"),
                    auth.channel(f"127.0.0.1:{cluster.registry_port}", other.grpc_token)):
        with channel:
            _refused(lambda: pb_grpc.RegistryStub(channel).Register(impostor, timeout=10))
    for role in ("encode", "prefill", "decode"):
        with grpc.insecure_channel(cluster.worker_address(role)) as channel:
            stub = pb_grpc.WorkerStub(channel)
            _refused(lambda: stub.Check(pb.HealthRequest(), timeout=10))
            _refused(lambda: stub.Abort(pb.AbortRequest(request_id="someone-else"), timeout=10))
    with grpc.insecure_channel(cluster.worker_address("decode")) as channel:
        _refused(lambda: list(pb_grpc.WorkerStub(channel).Tokens(pb.TokensRequest(stream_id="x"), timeout=10)))
        _refused(lambda: pb_grpc.WorkerStub(channel).Decode(pb.DecodeRequest(request_id="x", room=1), timeout=10))
    for key in ("", other.transfer_key):  # refused at the connection's handshake: nothing is read
        intruder = RegistryClient(f"tcp://127.0.0.1:{cluster.bootstrap_port}", TransferConfig(secret=key))
        intruder.lookup("prefill")
        answers, deadline = [], time.monotonic() + 10
        while intruder.error is None and not answers and time.monotonic() < deadline:
            answers.extend(intruder.replies())
            time.sleep(0.01)
        assert answers == [] and intruder.error == REFUSED_KEYS
        intruder.close()
    assert "impostor" not in {w["name"] for workers in cluster.roles().values() for w in workers}
    assert ask(client, "Still mine.", []) == expected(llm, "Still mine.", [])
