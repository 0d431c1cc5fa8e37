"""The encode role: images and videos in (the client's encoded files, decoded and processed here),
embeddings and deepstack rows out to the prefill that the router named, through the transfer layer
(allocated by the real length, resumed when the receiver's default allocation is too small)."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time

from opentelemetry import trace
from opentelemetry.context import Context

from mmserve.distributed.layout import MeshLayout
from mmserve.distributed.lockstep import Lockstep
from mmserve.engine.compile_stats import compile_count
from mmserve.engine.config import EngineConfig
from mmserve.engine.encoder import Encoder
from mmserve.engine.inputs import Visual
from mmserve.engine.rejected import RequestRejected
from mmserve.engine.visual_rows import VisualRows, total_rows
from mmserve.engine.warmup import compile_programs
from mmserve.roles.fields import embedding_fields
from mmserve.roles.outbox import Outbox, Parcel, Run
from mmserve.roles.request_state import ENCODE_TRANSITIONS, EncodeState, RequestTable, RoleRequest, close_room
from mmserve.roles.wire import deadline_from_pb, visual_from_pb
from mmserve.roles.role_loop import RoleLoop
from mmserve.roles.worker import PrefixCache, WorkerService
from mmserve.rpc import worker_pb2 as pb
from mmserve.tracing import role_span, tracer
from models.qwen3_vl_moe import Model
from transfer.config import TransferConfig
from transfer.messages import TransferInfo, TransferMode
from transfer.poll import PollState
from transfer.sender import Sender

log = logging.getLogger(__name__)


def vision_encoder(model: Model, engine: EngineConfig, layout: MeshLayout | None,
                   lockstep: Lockstep | None) -> Encoder:
    """The encode role's encoder, its programs compiled (on every process of the role, through the
    lockstep) when ``engine.precompile`` asks."""
    encoder = Encoder(model, engine, layout, lockstep)
    if engine.precompile and encoder.lockstep.is_leader:
        encoder.lockstep.call_and_wait(encoder.run_compile)
    return encoder


@dataclasses.dataclass(frozen=True)
class EncodeJob:
    """An encode request with its images and videos decoded into patches (but those the encoder
    holds already), in prompt order."""

    request_id: str
    room: int
    images: list[Visual]
    videos: list[Visual]
    deadline: float = math.inf
    """``time.monotonic()`` past which the role fails the request by itself."""


def decoded(request: pb.EncodeRequest, encoder: Encoder) -> EncodeJob:
    """Decodes and processes the client's files the router forwarded (``with_pixels``: CPU work, kept
    off the role's loop), but for those whose embeddings the encoder holds already (by content
    key: a picture asked about again is not decoded again), once for all the calls bringing the
    same file at once (``n`` choices: ``Encoder.decoded``); a file that will not decode is
    ``RequestRejected``, a grid other than the router's a plain ``ValueError``."""
    def ready(visual: Visual) -> Visual:
        return visual if encoder.holds(visual.content_key) else encoder.decoded(visual)

    deadline = deadline_from_pb(request.timeout_s)  # on arrival: decoding the files counts against it
    return EncodeJob(request.request_id, request.room,
                     [ready(visual_from_pb(v, "image")) for v in request.images],
                     [ready(visual_from_pb(v, "video")) for v in request.videos], deadline)


@dataclasses.dataclass(eq=False, kw_only=True)
class EncodeRecord(RoleRequest[EncodeState]):
    """A request's pictures on their way through the vision tower, then their rows to prefill."""

    TRANSITIONS = ENCODE_TRANSITIONS
    INITIAL = frozenset({EncodeState.QUEUED})
    HOPS = {EncodeState.SENDING: "send embeddings"}

    job: EncodeJob | None = None
    """Its pictures, until they are encoded."""


class EncodeRole:
    role = "encode"

    def __init__(self, model: Model, engine: EngineConfig, transfer: TransferConfig, name: str, bootstrap: str,
                 layout: MeshLayout | None = None, lockstep: Lockstep | None = None):
        self.name = name
        self._capacity = engine.max_num_seqs
        self.encoder = vision_encoder(model, engine, layout, lockstep)
        self.sender = Sender(transfer, embedding_fields(model.config, model.dtype), name, bootstrap)
        if engine.precompile:  # the transfer's programs too: nothing compiles on a first request
            compile_programs(self.sender.programs(engine.max_model_len, self.encoder.output_rows()),
                             "transfer")
        self._outbox = Outbox(self.sender, self._fail_room)
        self._requests: RequestTable[EncodeRecord] = RequestTable(self._release)
        self.lock = threading.RLock()
        """Held by whoever touches the sender: the loop thread or the transfer pump."""
        self.vision_calls = 0
        """Steps that ran the vision tower (each over every request queued then)."""
        self.accepted = 0
        """Encode requests taken (a prompt whose pictures prefill holds cached sends none)."""

    def encode(self, request: EncodeJob, trace_parent: Context | None = None) -> None:
        """Queues the request's pictures for the next step's vision calls, which encode every queued
        request's together; refuses at once what could never be sent."""
        self._requests.check_new(request.request_id, request.room)
        if not request.images and not request.videos:
            raise ValueError("an encode request needs at least one image or video")
        tokens = sum(self._tokens(v) for v in request.images + request.videos)
        if not self.sender.allocator.can_ever_hold(tokens):
            raise RequestRejected(f"{tokens} visual tokens exceed the whole encode buffer pool")
        with self.lock:
            self._requests.add(EncodeRecord(request_id=request.request_id, room=request.room, state=EncodeState.QUEUED,
                                            deadline=request.deadline,
                                            span=role_span("encode", request.request_id, trace_parent), job=request))
            self.sender.add(request.room)
            self.accepted += 1

    def _tokens(self, visual: Visual) -> int:
        return self.encoder.model.processor.num_image_tokens(visual.grid_thw[0])

    def _encode_queued(self) -> None:
        """Runs the vision tower once over every queued request's pictures, then hands each request's
        rows to the outbox. A picture that will not decode fails its own request only."""
        ready = []
        for record in self._requests.in_state(EncodeState.QUEUED):
            try:
                ready.append((record, [self.encoder.decodable(v) for v in record.job.images],
                              [self.encoder.decodable(v) for v in record.job.videos]))
            except Exception as error:  # its own request fails; the others encode (ValueError: the client's file)
                if not isinstance(error, ValueError):
                    log.exception("decoding the pictures of %s failed", record.request_id)
                self._requests.finish(record.request_id, EncodeState.FAILED, str(error))
        if not ready:
            return
        start = time.time_ns()
        try:
            features = iter(self.encoder.encode_many([v for _, images, videos in ready for v in images + videos]))
        except Exception as error:
            for record, _, _ in ready:
                self._requests.finish(record.request_id, EncodeState.FAILED, f"the vision tower failed: {error}")
            raise
        end, self.vision_calls = time.time_ns(), self.vision_calls + 1
        for record, images, videos in ready:
            tower = tracer.start_span("vision tower", context=trace.set_span_in_context(record.span), start_time=start,
                                      attributes={"requests": len(ready)})
            tower.end(end_time=end)
            self._send(record, [next(features) for _ in images], [next(features) for _ in videos])

    def _send(self, record: EncodeRecord, images: list[VisualRows], videos: list[VisualRows]) -> None:
        """Queues the request's rows, images then videos, as they lie in the vision calls' outputs
        on device: the outbox writes each run into the room's blocks (no host copy)."""
        runs = [Run({"embeddings": rows.embeddings, "deepstack": rows.deepstack}, rows.start, rows.count)
                for rows in images + videos]
        with self.lock:
            if record.state is not EncodeState.QUEUED:
                return  # ended (an abort, its deadline) while the vision tower ran
            record.move(EncodeState.SENDING)
            record.job = None
            info = TransferInfo(TransferMode.EMBEDDING, total_rows(images + videos),
                                aux={"image_tokens": total_rows(images), **record.hop_carrier()})
            self._outbox.put(Parcel(record.room, info, runs))

    def step(self) -> None:
        with self.lock:
            self._requests.fail_overdue()  # before the vision calls: an overdue request is not encoded
        self._encode_queued()
        with self.lock:
            self._outbox.flush()  # reads the sender's socket too
            for record in self._requests:
                state = self.sender.poll(record.room)
                if state is PollState.SUCCESS:
                    self._requests.finish(record.request_id, EncodeState.DONE)
                elif state is PollState.FAILED:
                    self._requests.finish(record.request_id, EncodeState.FAILED, self.sender.failure(record.room))

    def pump(self) -> None:
        with self.lock:
            self._outbox.flush()  # a registration read here stages the rows waiting for it, as a step's end would

    def sockets(self) -> list:
        return self.sender.sockets()

    def wait_limit_s(self) -> float:
        return 0.0 if any(True for _ in self._requests.in_state(EncodeState.QUEUED)) else math.inf

    def abort(self, request_id: str) -> None:
        with self.lock:
            self._requests.finish(request_id, EncodeState.FAILED, "aborted by the router")

    def _release(self, record: EncodeRecord, was: EncodeState) -> None:
        """Drops the rows if they still wait for blocks and ends the room (an abort tells prefill why)."""
        with self.lock:
            self._outbox.drop(record.room)
            close_room(self.sender, record.room, record.reason)

    def in_flight(self) -> int:
        return len(self._requests)

    def kv_reserve(self) -> tuple[int, int]:
        return 0, 0

    def max_model_len(self) -> int:
        return 0

    def incarnation(self) -> int:
        return self.sender.incarnation

    def capacity(self) -> int:
        return self._capacity

    def prefix_cache(self) -> PrefixCache | None:
        return None

    def health(self) -> dict:
        with self.lock:
            return {"free_blocks": self.sender.allocator.available_blocks(), "in_flight": len(self._requests),
                    "requests": self._requests.counts(), "queued": len(self._outbox), "accepted": self.accepted,
                    "embedding_cache_hits": self.encoder.cache.hits, "embedding_cache_misses": self.encoder.cache.misses,
                    "embedding_cache_bytes": self.encoder.cache.bytes, "pictures_decoded": self.encoder.pictures_decoded,
                    "compiles": compile_count()}

    def close(self) -> None:
        with self.lock:
            self.sender.close()

    def _fail_room(self, room: int, reason: str) -> None:
        """The outbox could not stage a room's rows: the room fails, and its request with it."""
        with self.lock:
            if not self.sender.poll(room).terminal:
                self.sender.abort(room, reason[:500])


class EncodeService(WorkerService):
    def Encode(self, request, context):
        """Decodes the request's files here, in this call's gRPC thread (one per call, so requests
        decode in parallel and the loop keeps stepping), then encodes them on the loop."""
        try:
            job = decoded(request, self.loop.role.encoder)
        except ValueError as error:
            return pb.Ack(ok=False, error=str(error), rejected=isinstance(error, RequestRejected))
        return self.acknowledge(self.loop.role.encode, job, context)


def encode_service(role: EncodeRole) -> EncodeService:
    return EncodeService(RoleLoop(role).start())
