"""The router's pool of workers: the Registry service they register at and repeat it as a heartbeat
carrying their capacity and load, and what the router knows of each. A worker not heard from for
``WORKER_TIMEOUT_S`` is left out of routing until it registers again, and forgotten (its channel,
token stream, KV event feed and index) after ``WORKER_FORGET_S``: workers come and go under new
names (a new pod, a new pid), and a router that kept them all would hold them for good. One
registering under a known name at a new address or incarnation was restarted, and replaces the
old one. A worker stopping says so (``Registration.leaving``) and is routed nothing new from then
on, though the requests it holds run to their end.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time

import grpc

from mmserve.engine.inputs import PreparedPrompt
from mmserve.engine.rejected import RequestRejected
from mmserve.roles.prefix_index import KVEventFeed
from mmserve.roles.routing import Choice, WorkerChooser
from mmserve.roles.token_feed import TokenFeed
from mmserve.roles.worker import MAX_MESSAGE_BYTES
from mmserve.rpc import auth
from mmserve.rpc import worker_pb2 as pb
from mmserve.rpc import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
WORKER_TIMEOUT_S = 5.0
WORKER_FORGET_S = 60.0
NAMES_REMEMBERED = 4096
"""Names whose last address and incarnation are kept to count restarts, the most recent ones."""
CLOSE_GRACE_S = 30.0  # longer than any call's own timeout here (abort 10 s, health 2 s)
ROLES = ("encode", "prefill", "decode")


@dataclasses.dataclass
class WorkerHandle:
    role: str
    name: str
    address: str
    stub: pb_grpc.WorkerStub
    channel: grpc.aio.Channel
    last_seen: float
    capacity: int = 1
    """Requests it holds at once, as it reports in each heartbeat."""
    reported_in_flight: int = 0
    """Requests it held at its last heartbeat (this router's and any other's)."""
    in_flight: int = 0
    """Requests this router has sent it that have not ended."""
    page_size: int = 0
    """Tokens per KV page (prefill and decode), as it reports; the router's page keys use it."""
    incarnation: int = 0
    """Its process's incarnation, as it reports: sent with each request to the role receiving from it."""
    kv_pages: int = 0
    kv_page_size: int = 0
    """Decode: the KV pages it reserves whole requests from and tokens per page, as it reports (0: none)."""
    kv_reserved: int = 0
    """Pages this router's requests in flight there have reserved."""
    max_model_len: int = 0
    """Prefill and decode: the context it holds, as it reports (0: unbounded)."""
    feed: TokenFeed | None = None
    """Decode: this router's token stream on it."""
    leaving: bool = False
    """It is stopping (its last registration said so): nothing new goes to it."""

    def kv_pages_for(self, tokens: int) -> int:
        return -(-tokens // self.kv_page_size) if self.kv_page_size else 0

    @property
    def load(self) -> float:
        return max(self.in_flight, self.reported_in_flight) / self.capacity


class WorkerPool(pb_grpc.RegistryServicer):
    def __init__(self, token: str, chooser: WorkerChooser, feed: KVEventFeed | None = None, *, model_fingerprint: str):
        """token: the cluster's gRPC token, checked on registration (``serve_registry``) and sent
        on every call to a worker. ``chooser`` picks a worker per request; ``feed`` (cache-aware
        routing) follows the KV events of each worker that advertises them. A worker whose
        ``model_fingerprint`` (``Model.fingerprint``) is not the router's is refused: the router
        tokenizes and counts placeholders for its own model, and another model's worker would
        answer those ids with its own vocabulary's tokens."""
        self.token = token
        self.model_fingerprint = model_fingerprint
        self.chooser = chooser
        self.feed = feed
        self.prefix_routed = 0
        """Requests sent to a prefill worker holding at least one of their pages."""
        self.workers: dict[str, WorkerHandle] = {}
        self.restarts = 0
        """Workers that registered again under their name at a new address: restarted (by
        ``--role all``, Kubernetes or a person) after they died."""
        self._incarnations: collections.OrderedDict[str, tuple[str, int]] = collections.OrderedDict()
        """The last (address, incarnation) of the ``NAMES_REMEMBERED`` names registered most
        recently, forgotten workers' too."""
        self._closing: set[asyncio.Task] = set()
        self._refused: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        """(name, fingerprint) of workers refused for serving another model, already logged."""

    def _retire(self, worker: WorkerHandle) -> None:
        """Closes a dropped or replaced worker's channel after a grace period, in the background:
        closing at once would cancel the calls still in flight on it (an abort, a health check,
        a token stream), and they end by themselves against a dead peer."""
        task = asyncio.get_running_loop().create_task(worker.channel.close(grace=CLOSE_GRACE_S))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        if self.feed is not None and self.workers.get(worker.name) in (None, worker):
            self.feed.unfollow(worker.name)

    async def Register(self, request, context):
        if request.role not in ROLES:
            return pb.Ack(ok=False, error=f"unknown role {request.role!r}")
        if request.model_fingerprint != self.model_fingerprint:
            if (request.name, request.model_fingerprint) not in self._refused:  # said once, not every heartbeat
                self._refused[(request.name, request.model_fingerprint)] = None
                while len(self._refused) > NAMES_REMEMBERED:
                    self._refused.popitem(last=False)
                log.warning("%s worker %s at %s refused: it serves another model (fingerprint %.12s, the router's %.12s)",
                            request.role, request.name, request.grpc_address, request.model_fingerprint or "none",
                            self.model_fingerprint)
            return pb.Ack(ok=False, error=f"the router serves another model (fingerprint {self.model_fingerprint:.12}"
                                          f", this worker's {request.model_fingerprint or 'none':.12}): start both "
                                          "with the same --model")
        self._forget_silent()  # on every heartbeat: after a scale-down nobody new may register
        current = self.workers.get(request.name)
        known = self._incarnations.get(request.name)
        if current is None or current.address != request.grpc_address or current.incarnation != request.incarnation:
            if current is not None:
                self._retire(current)
            if known is not None and known != (request.grpc_address, request.incarnation):
                self.restarts += 1
            self._incarnations[request.name] = (request.grpc_address, request.incarnation)
            self._incarnations.move_to_end(request.name)
            while len(self._incarnations) > NAMES_REMEMBERED:
                self._incarnations.popitem(last=False)
            channel = auth.async_channel(request.grpc_address, self.token, options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
            stub = pb_grpc.WorkerStub(channel)
            current = WorkerHandle(request.role, request.name, request.grpc_address, stub, channel, time.monotonic(),
                                   incarnation=request.incarnation,
                                   feed=TokenFeed(stub, request.name) if request.role == "decode" else None)
            self.workers[request.name] = current
            log.info("%s worker %s registered at %s", request.role, request.name, request.grpc_address)
        current.last_seen = time.monotonic()
        if request.leaving and not current.leaving:
            log.info("%s worker %s is stopping: nothing new goes to it", request.role, request.name)
        current.leaving = request.leaving
        current.capacity, current.reported_in_flight = max(request.capacity, 1), request.in_flight
        current.page_size = request.page_size
        current.kv_pages, current.kv_page_size = request.kv_pages, request.kv_page_size
        current.max_model_len = request.max_model_len
        if self.feed is not None and request.kv_events_endpoint:
            self.feed.follow(request.name, request.kv_events_endpoint, request.kv_events_replay_endpoint)
        # A leaving worker drains until nothing routed here is on its way to it (a request that
        # picked it before it said so may call it only after a slow prefill has answered).
        return pb.Ack(ok=True, routed=current.in_flight if current.leaving else 0)

    def _forget_silent(self) -> None:
        """Forgets the workers not heard from for ``WORKER_FORGET_S``, with their feeds and index
        (each registration looks, a heartbeat too)."""
        now = time.monotonic()
        for worker in [w for w in self.workers.values() if now - w.last_seen > WORKER_FORGET_S]:
            del self.workers[worker.name]
            self._retire(worker)
            log.warning("%s worker %s at %s silent for %.0f s: forgotten", worker.role, worker.name, worker.address,
                        now - worker.last_seen)

    async def forget(self, worker: WorkerHandle) -> None:
        """Drops a worker that cannot be reached; it is back as soon as it registers again."""
        if self.workers.get(worker.name) is worker:
            del self.workers[worker.name]
            self._retire(worker)
            log.warning("%s worker %s at %s is unreachable: dropped", worker.role, worker.name, worker.address)

    def live(self, role: str) -> list[WorkerHandle]:
        now = time.monotonic()
        return [w for w in self.workers.values()
                if w.role == role and not w.leaving and now - w.last_seen < WORKER_TIMEOUT_S]

    def pick(self, role: str, prompt: PreparedPrompt | None = None, kv_tokens: int = 0,
             need_room: bool = False) -> Choice | None:
        """The live worker of ``role`` the routing policy chooses for ``prompt``, among those with
        room for ``kv_tokens`` of KV by this router's count, if any has (else among all of them,
        or None with ``need_room``), with the prompt's leading pages it holds as far as the index
        knows. Only workers whose context holds the prompt are chosen; RequestRejected when live
        workers of ``role`` exist and none does (before anything is sent: decode's own refusal
        would reach the client only after the first token)."""
        live = self.live(role)
        if prompt is not None:
            holding = [w for w in live if not w.max_model_len or len(prompt.token_ids) < w.max_model_len]
            if live and not holding:
                raise RequestRejected(
                    f"the prompt has {len(prompt.token_ids)} tokens; the {role} workers' context holds "
                    f"{max(w.max_model_len for w in live)} (prompt plus at least one generated token; "
                    f"their transfer buffers count too)")
            live = holding
        roomy = [w for w in live if w.kv_pages - w.kv_reserved >= w.kv_pages_for(kv_tokens)]
        if need_room and live and not roomy:
            return None
        choice = self.chooser.choose(role, roomy or live, prompt)
        if choice.matched_pages and role == "prefill":
            self.prefix_routed += 1
        return choice

    def capacity(self, role: str) -> int:
        return sum(w.capacity for w in self.live(role))


async def serve_registry(pool: WorkerPool, host: str, port: int, unix_socket: str | None = None) -> grpc.aio.Server:
    """The worker registry, on ``host:port`` or the Unix socket ``unix_socket``; only callers
    holding the pool's cluster token may register."""
    server = grpc.aio.server(interceptors=[auth.AsyncTokenCheck(pool.token)])
    pb_grpc.add_RegistryServicer_to_server(pool, server)
    server.add_insecure_port(f"unix:{unix_socket}" if unix_socket else f"{host}:{port}")
    await server.start()
    return server
