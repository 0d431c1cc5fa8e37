"""Running a role as a worker process: one loop thread owns the role (:mod:`mmserve.roles.role_loop`),
a gRPC server feeds it. The worker announces itself to the router's
registry and repeats it as a heartbeat carrying its load (capacity and requests held), so a
restarted worker is picked up again and the router admits what its workers can hold.

Stopping, it tells the router first (it registers as ``leaving``, and goes on so while it stops), so
nothing new reaches it. Given SIGTERM (an orchestrator replacing it) it then drains: the requests it
holds run to their end, for up to ``--drain-timeout`` or until a second signal, before its calls are
cut; Ctrl-C stops it at once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc

from mmserve.engine.rejected import RequestRejected
from mmserve.rpc import auth
from mmserve.rpc import worker_pb2 as pb
from mmserve.rpc import worker_pb2_grpc as pb_grpc
from mmserve.roles.role_loop import LoopStopped, RoleLoop
from mmserve.roles.supervisor import mark_ready
from mmserve.tracing import extract

log = logging.getLogger(__name__)
REGISTER_INTERVAL_S = 1.0
MAX_MESSAGE_BYTES = 256 * 2**20
CONTROL_THREADS = 16
REGISTRY_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 1000), ("grpc.min_reconnect_backoff_ms", 1000),
                            ("grpc.max_reconnect_backoff_ms", 1000)]
"""The worker's channel to its router tries to reconnect every second, as it registers: with gRPC's
default backoff (doubling to 120 s) a router back after a few minutes' outage was found up to two
minutes later (a review: 122 s, against 1.0 s with these)."""
UNREACHABLE_SAID_S = 10.0
"""How long a worker tries to register with a router it cannot reach before it says so (a router
starting up takes a few seconds; a wrong --router-url never answers)."""
STOP_GRACE_S = 1.0
"""How long a stopping worker lets its open calls end by themselves before it cancels them."""
LEAVE_S = 5.0
"""How long a stopping worker waits for its registration as ``leaving`` to reach the router."""
LEAVING_INTERVAL_S = 0.1
"""How often a leaving worker registers (as leaving): each answer says what is still routed to it."""
DRAIN_POLL_S = 0.05
DRAIN_SETTLE_S = 0.5
"""How long a draining worker holding nothing waits for calls routed to it when its router has not
answered since it said it was leaving (none given, or unreachable); an answer says how many."""


@dataclasses.dataclass
class RouterWord:
    """What the router last answered a leaving worker: the requests it has routed to the worker
    that have not ended (None: no answer since the worker said it was leaving, or its last try
    failed: a router gone, as when a whole deployment stops, routes nothing more). Written by the
    registering thread, read by the drain."""

    routed: int | None = None


class Role(Protocol):
    role: str
    name: str

    lock: threading.RLock
    """Held around everything that touches the role's transfer sockets (they are not thread-safe)."""

    def step(self) -> None:
        """One round of work: transfers, engine step; never waits for the network."""

    def sockets(self) -> list:
        """The transfer sockets whose readiness gives ``step`` work, for the loop's idle wait."""

    def wait_limit_s(self) -> float:
        """How long the loop may sleep for lack of events: 0 while there is compute to do, else
        inf (every transfer event, a landed pull included, makes one of ``sockets`` readable)."""

    def pump(self) -> None:
        """Transfer progress only (heartbeats, pulls), safe to call from another thread while
        ``step`` runs a long engine step or a compile."""

    def health(self) -> dict[str, Any]: ...

    def in_flight(self) -> int:
        """Requests held now; read from the heartbeat thread (a length, safe without the loop)."""

    def capacity(self) -> int:
        """Requests it can hold at once; the router admits no more than its workers' capacity."""

    def prefix_cache(self) -> PrefixCache | None:
        """Its KV pages' size and where it publishes their events (prefill, decode); None for encode."""

    def kv_reserve(self) -> tuple[int, int]:
        """(pages, tokens per page) it reserves whole requests from (decode: prompt + max_tokens,
        up front); (0, 0) where it reserves none. The router admits no more than fits."""

    def max_model_len(self) -> int:
        """The context it holds (prefill, decode: its engine's max_model_len, or one past the
        tokens of KV its transfer pool holds if fewer; a prompt must be shorter), 0 where it holds
        none (encode). The router sends a prompt only where it fits, and refuses one that fits
        nowhere with a 400 (a prompt whose KV could never be sent failed only after prefill)."""

    def incarnation(self) -> int:
        """Random per process, never 0: the incarnation of its transfer sender (encode, prefill) or
        its own (decode). The router passes it to the receiving role with each request, so a room
        opened with a worker that has restarted since fails at once."""

    def abort(self, request_id: str) -> None: ...

    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class PrefixCache:
    """What a worker tells the router about its prefix cache, for cache-aware routing."""

    page_size: int
    events_endpoint: str = ""
    """its KV events' PUB endpoint ("": it publishes none), as the router must dial it"""
    replay_endpoint: str = ""

    @classmethod
    def of(cls, engine) -> PrefixCache:
        """An :class:`~mmserve.engine.engine.LLMEngine`'s page size and KV event endpoints."""
        events = engine.kv_events
        return cls(engine.config.page_size, events.endpoint if events else "", events.replay_endpoint if events else "")

    def dialled_at(self, host: str) -> PrefixCache:
        """The endpoints with a wildcard bind address (0.0.0.0, ``*``) replaced by ``host``, the
        address the worker advertises."""
        return dataclasses.replace(self, events_endpoint=_dialled(self.events_endpoint, host),
                                   replay_endpoint=_dialled(self.replay_endpoint, host))


def _dialled(endpoint: str, host: str) -> str:
    scheme, sep, rest = endpoint.partition("://")
    bound, colon, port = rest.rpartition(":")
    if not sep or not colon or bound not in ("0.0.0.0", "*", "[::]", "::"):
        return endpoint
    return f"{scheme}://{host}:{port}"


class WorkerService(pb_grpc.WorkerServicer):
    """The gRPC face of a role; request-specific calls are provided by the role's own servicer."""

    def __init__(self, loop: RoleLoop):
        self.loop = loop

    def acknowledge(self, fn: Callable, request, context: grpc.ServicerContext) -> pb.Ack:
        """Runs ``fn(request, trace_parent)`` on the loop (the router's trace context, from the call's
        metadata); a request the role refuses is answered with its reason, ``rejected`` when the
        refusal is the client's to fix. What ``fn`` returns (a dict, or None) fills the Ack's
        other fields.

        A caller that hung up while the request was being taken (the client left the router) will
        not hear of it, and its abort may have come before the request did, finding nothing: the
        role aborts the request itself, or it would hold it until a deadline or a room's timeout."""
        try:
            fields = self.loop.call(fn, request, extract(context.invocation_metadata()))
        except ValueError as error:
            return pb.Ack(ok=False, error=str(error), rejected=isinstance(error, RequestRejected))
        if not context.is_active():
            self.abandoned(request.request_id)
        return pb.Ack(ok=True, **(fields or {}))

    def abandoned(self, request_id: str) -> None:
        """Frees a request its caller gave up on without an abort that could find it."""
        try:
            self.loop.call(self.loop.role.abort, request_id)
        except LoopStopped:
            pass  # the worker is stopping: it frees everything as it closes

    def Abort(self, request, context):
        self.loop.call(self.loop.role.abort, request.request_id)
        return pb.Ack(ok=True)

    def Check(self, request, context):
        role = self.loop.role
        details = self.loop.call(role.health)
        return pb.Health(healthy=True, role=role.role, name=role.name, details_json=json.dumps(details))



def serve_worker(service: WorkerService, host: str, port: int, router: str | None, token: str,
                 model_fingerprint: str, advertise_host: str = "", unix_socket: str | None = None,
                 drain_timeout_s: float = 0.0) -> None:
    """Serves until interrupted, registering with the router's registry at ``router`` under the
    address the router dials: ``advertise_host`` (a pod IP) when given, else ``host``, or the Unix
    socket ``unix_socket`` it listens on instead when given; as a worker of the model
    ``model_fingerprint`` (``Model.fingerprint``). Calls in either direction carry the cluster
    ``token``; calls without it are refused. Ended by SIGTERM (``SystemExit``), it lets the
    requests it holds finish for up to ``drain_timeout_s`` once the router has been told it is
    leaving."""
    role = service.loop.role
    # a thread per request the role holds (a Prefill stream keeps its thread; on decode, the routers' token
    # streams keep one each) and some for control calls
    threads = concurrent.futures.ThreadPoolExecutor(max_workers=role.capacity() + CONTROL_THREADS)
    server = grpc.server(threads, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)], interceptors=[auth.TokenCheck(token)])
    pb_grpc.add_WorkerServicer_to_server(service, server)
    if unix_socket:
        server.add_insecure_port(f"unix:{unix_socket}")
        address = f"unix:{unix_socket}"
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
        address = f"{advertise_host or host}:{bound}"
    server.start()
    log.info("%s worker %s serving on %s", role.role, role.name, address)
    leaving, left, stop = threading.Event(), threading.Event(), threading.Event()
    word = RouterWord()
    registering = None
    if router:
        registering = threading.Thread(target=_register_forever, daemon=True,
                                       args=(router, token, role, address, model_fingerprint, leaving, left, stop,
                                             word))
        registering.start()
    terminated = False
    try:
        server.wait_for_termination()
    except SystemExit:  # SIGTERM (launch.py): an orchestrator stopping this worker, which drains
        terminated = True
        raise
    finally:
        # Stopping already: a second signal (Ctrl-C reaches the whole process group, then the
        # supervisor's SIGTERM follows) would interrupt the stop below halfway and leave grpc's
        # serving thread raising on a server shutting down.
        _ignore_signals()
        leaving.set()  # the heartbeats say so from now on (at once): the router sends nothing new
        if registering is not None:
            left.wait(LEAVE_S)
        if terminated and drain_timeout_s > 0:
            cut = threading.Event()
            _on_signals(cut.set)  # a second signal (Ctrl-C, another SIGTERM) ends the drain
            try:
                _drain(role, drain_timeout_s, cut, word)
            finally:
                _ignore_signals()
        stop.set()
        # The calls still open first (a router's token stream, a Prefill waiting for its first
        # token), while the loop can still free what they hold: their threads would keep the
        # interpreter from exiting (it joins them), and a supervisor would never see this one die.
        server.stop(grace=STOP_GRACE_S).wait()
        service.loop.stop()


def _drain(role: Role, timeout_s: float, cut: threading.Event, word: RouterWord) -> None:
    """Waits for the requests the role holds to end, and for those its router routed here before
    it heard the worker was leaving (they may still be on their way: decode is called once prefill
    has answered), up to ``timeout_s`` or until ``cut``. Without an answer from the router, calls
    it sent just before it heard get ``DRAIN_SETTLE_S`` to arrive."""
    now = time.monotonic()
    deadline, settled, said = now + timeout_s, now + min(DRAIN_SETTLE_S, timeout_s), False
    while time.monotonic() < deadline and not cut.is_set():
        held, routed = role.in_flight(), word.routed
        if not held and (routed == 0 or (routed is None and time.monotonic() >= settled)):
            return
        if held and not said:
            log.info("%s worker %s stopping: draining %d requests (up to %.0f s; a second signal cuts it short)",
                     role.role, role.name, held, timeout_s)
            said = True
        time.sleep(DRAIN_POLL_S)
    if role.in_flight():
        log.warning("%s worker %s: %d requests still held after draining (%s); cutting them off", role.role,
                    role.name, role.in_flight(), "a second signal" if cut.is_set() else f"{timeout_s:.0f} s")


def _ignore_signals() -> None:
    _on_signals(signal.SIG_IGN)


def _on_signals(handler) -> None:
    """SIGINT and SIGTERM call ``handler`` (a callable of no arguments, or ``signal.SIG_IGN``)."""
    if threading.current_thread() is threading.main_thread():
        action = handler if handler is signal.SIG_IGN else (lambda *_: handler())
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, action)


def _register_forever(router: str, token: str, role: Role, address: str, model_fingerprint: str,
                      leaving: threading.Event, left: threading.Event, stop: threading.Event,
                      word: RouterWord) -> None:
    """Registers every ``REGISTER_INTERVAL_S`` until ``stop``; from ``leaving`` on (at once), as
    leaving, setting ``left`` once it has tried to say so, and going on saying so every
    ``LEAVING_INTERVAL_S`` while the worker drains: a router that missed it hears it again, one
    still hearing the worker keeps it (and the calls it has open there) rather than forgetting a
    silent worker, and each answer tells the drain what is still routed here (``word``)."""
    cache = role.prefix_cache()
    if cache is not None:  # a worker on a Unix socket is on the router's host
        cache = cache.dialled_at("127.0.0.1" if address.startswith("unix:") else address.rpartition(":")[0])
    kv_pages, kv_page_size = role.kv_reserve()

    def registration(leaving: bool = False) -> pb.Registration:
        return pb.Registration(
            role=role.role, name=role.name, grpc_address=address, capacity=role.capacity(),
            in_flight=role.in_flight(), page_size=cache.page_size if cache else 0,
            kv_events_endpoint=cache.events_endpoint if cache else "",
            kv_events_replay_endpoint=cache.replay_endpoint if cache else "",
            incarnation=role.incarnation(), kv_pages=kv_pages, kv_page_size=kv_page_size,
            max_model_len=role.max_model_len(), model_fingerprint=model_fingerprint, leaving=leaving)

    refusal, unreachable_since = "", time.monotonic()  # each problem said once, not every heartbeat
    registered = False
    with auth.channel(router, token, options=REGISTRY_CHANNEL_OPTIONS) as channel:
        registry = pb_grpc.RegistryStub(channel)
        while not stop.is_set():
            now_leaving = leaving.is_set()
            try:
                ack = registry.Register(registration(now_leaving), timeout=2)
                if refusal == "unreachable":
                    log.info("router %s reached", router)
                if not ack.ok and ack.error != refusal:
                    log.error("router %s refused the registration: %s", router, ack.error)
                refusal, unreachable_since = ("" if ack.ok else ack.error), None
                if now_leaving and ack.ok:
                    word.routed = ack.routed
                if ack.ok and not registered:  # serving: a supervising --role all counts its run from here
                    registered = True
                    mark_ready()
            except grpc.RpcError as error:
                if now_leaving:  # an old count would hold the drain for its whole timeout
                    word.routed = None
                if error.code() is grpc.StatusCode.UNAUTHENTICATED:
                    if refusal != "secret":
                        log.error("router %s refused the registration: not the cluster's secret", router)
                    refusal = "secret"
                else:
                    log.debug("router %s not reachable: %s", router, error.code())
                    unreachable_since = unreachable_since or time.monotonic()
                    if refusal != "unreachable" and time.monotonic() - unreachable_since > UNREACHABLE_SAID_S:
                        log.warning("router %s not reachable for %.0f s (%s): is --router-url right, and the router "
                                    "up?", router, time.monotonic() - unreachable_since, error.code().name)
                        refusal = "unreachable"
            if now_leaving:
                left.set()
                stop.wait(LEAVING_INTERVAL_S)
            else:
                leaving.wait(REGISTER_INTERVAL_S)
