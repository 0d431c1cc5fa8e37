"""The prefill role: receives a prompt's visual embeddings from encode (text-only prompts need
none, nor a prompt whose pictures lie in pages its prefix cache holds), prefills it, samples the
first token, streams that token to the router at once (the client's first event; decode streams the
rest), and sends KV + first token to the decode the router named. One loop drives both directions:
the embedding receiver and the KV sender."""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
from collections.abc import Callable, Sequence

from opentelemetry.context import Context

from mmserve.distributed.layout import MeshLayout
from mmserve.distributed.lockstep import Lockstep
from mmserve.engine.config import EngineConfig
from mmserve.engine.engine import LLMEngine
from mmserve.engine.step_failed import StepFailed
from mmserve.engine.inputs import PreparedPrompt
from mmserve.engine.output_stream import OutputStream
from mmserve.engine.outputs import RequestOutput
from mmserve.engine.visual_rows import VisualRows
from mmserve.engine.warmup import compile_programs
from mmserve.kv_events import KVEventPublisher
from mmserve.roles.fields import embedding_fields, kv_fields, room_rows
from mmserve.roles.kv_shipment import KVShipment
from mmserve.roles.outbox import Outbox
from mmserve.roles.request_state import PREFILL_TRANSITIONS, PrefillState, RequestTable, RoleRequest, close_room
from mmserve.roles.wire import deadline_from_pb, event_to_pb, prompt_from_pb, sampling_from_pb
from mmserve.roles.role_loop import RoleLoop
from mmserve.roles.worker import PrefixCache, WorkerService
from mmserve.rpc import worker_pb2 as pb
from mmserve.sampling_params import SamplingParams
from mmserve.stop import FinishReason
from mmserve.tracing import role_span
from models.qwen3_vl_moe import Model
from transfer.config import TransferConfig
from transfer.data_plane import open_data_plane
from transfer.messages import TransferInfo, TransferMode
from transfer.poll import PollState
from transfer.receiver import Receiver
from transfer.receiver_room import Landed
from transfer.sender import Sender

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False, kw_only=True)
class PrefillRecord(RoleRequest[PrefillState]):
    """A prompt in prefill, from its embeddings' arrival to its KV's departure."""

    TRANSITIONS = PREFILL_TRANSITIONS
    INITIAL = frozenset({PrefillState.WAITING_FOR_EMBEDDINGS, PrefillState.PREFILLING})
    HOPS = {PrefillState.WAITING_FOR_EMBEDDINGS: "receive embeddings", PrefillState.AWAITING_DECODE: "await decode",
            PrefillState.SENDING_KV: "send KV"}

    prompt: PreparedPrompt
    params: SamplingParams
    stream: queue.Queue
    """The router's Prefill call: the first token's event, or the error that ended the request before it."""
    first_sent: bool = False
    receiving: bool = False
    """Its embedding room is open: rows are still to come (the prompt may be prefilling already)."""
    chunks_given: int = 0
    """Embedding chunks handed to the engine so far."""
    kv: TransferInfo | None = None
    """Its KV room's record (length, first token), once the prompt is done."""


PREFILL_PROGRAMS = frozenset({"prefill", "kv_read"})
"""Prefill runs prompts (embeddings arrive from encode) and reads their KV for decode."""


class PrefillRole(KVShipment):
    role = "prefill"

    def __init__(self, model: Model, engine: EngineConfig, transfer: TransferConfig, name: str, bootstrap: str,
                 layout: MeshLayout | None = None, lockstep: Lockstep | None = None,
                 kv_events: KVEventPublisher | None = None):
        self.name = name
        self.model = model
        self.bootstrap = bootstrap
        # One data plane serves both directions: embeddings in, KV out.
        self._plane = open_data_plane(transfer)
        self.receiver = Receiver(transfer, embedding_fields(model.config, model.dtype), data_plane=self._plane)
        rows = room_rows(transfer, engine)  # embeddings arrive and KV leaves in the transfer's buckets
        self.engine = LLMEngine(model, engine, on_finish=self._ship, layout=layout, lockstep=lockstep,
                                programs=PREFILL_PROGRAMS, kv_events=kv_events,
                                arriving_rows=rows, kv_read_rows=rows)
        self.sender = Sender(transfer, kv_fields(model.config, model.dtype), name, bootstrap, data_plane=self._plane)
        if engine.precompile:  # the transfer's programs too: nothing compiles on a first request
            compile_programs(self.sender.programs(engine.max_model_len), "transfer")
        self._requests: RequestTable[PrefillRecord] = RequestTable(self._release)
        self._outbox = Outbox(self.sender, self._fail_room)
        self.embedding_resumes = 0
        self.early_starts = 0
        """Prompts whose prefill started before their last embedding chunk landed."""
        self.pictures_held = 0
        """Prompts with pictures taken on cached pages, with no embeddings (encode not needed)."""
        self.lock = threading.RLock()
        """Held by whoever touches the receiver or the sender: the loop thread or the transfer pump."""

    def prefill(self, request: pb.PrefillRequest, stream: queue.Queue, trace_parent: Context | None = None) -> dict:
        """Takes a prompt; ``{"pictures_held": True}`` (for the Ack) when it needs no embeddings
        because the engine holds every picture's pages cached (an earlier turn about them): then
        no embedding room is opened, and the router calls no encode worker. ``stream`` gets the
        first token's event, or the error that ended the request before it."""
        with self.lock:
            return {"pictures_held": self._prefill(request, stream, trace_parent)}

    def _prefill(self, request: pb.PrefillRequest, stream: queue.Queue, trace_parent: Context | None) -> bool:
        params = sampling_from_pb(request.sampling)
        prompt = prompt_from_pb(request)
        if bool(request.encode_name) != bool(prompt.images or prompt.videos):
            raise ValueError("a prompt with images or videos needs an encode worker, and only such a prompt")
        self.engine.check_fits(len(prompt.token_ids), params)
        self._requests.check_new(request.request_id, request.room)
        held = bool(request.encode_name) and self.engine.add_request_on_cached_pictures(
            prompt, self._first_only(params), request.request_id)
        self.pictures_held += held
        state = PrefillState.WAITING_FOR_EMBEDDINGS if request.encode_name and not held else PrefillState.PREFILLING
        record = self._requests.add(PrefillRecord(request_id=request.request_id, room=request.room, state=state,
                                                  prompt=prompt, params=params, stream=stream,
                                                  receiving=state is PrefillState.WAITING_FOR_EMBEDDINGS,
                                                  deadline=deadline_from_pb(request.timeout_s),
                                                  span=role_span("prefill", request.request_id, trace_parent)))
        try:
            self.sender.add(request.room)
            if self.sender.poll(request.room) is PollState.FAILED:  # decode declined it before it came here
                raise ValueError(self.sender.failure(request.room))
            if state is PrefillState.WAITING_FOR_EMBEDDINGS:
                self.receiver.add(request.room, self.bootstrap, request.encode_name, TransferMode.EMBEDDING,
                                  request.encode_incarnation or None, expected_tokens=self._visual_rows(prompt))
        except Exception as error:
            self._requests.finish(record.request_id, PrefillState.FAILED, f"could not open its rooms: {error}")
            raise
        if not request.encode_name:
            self._start(record, dict)
        return held

    def step(self) -> None:
        self._requests.fail_overdue()
        with self.lock:
            self._receive()
        if self.engine.has_unfinished():
            try:  # every request finishes at its first token, which _ship streams
                self.engine.step()
            except StepFailed as failure:
                for request_id in failure.request_ids:
                    self._requests.finish(request_id, PrefillState.FAILED, str(failure))
        with self.lock:
            self._send()
            # the last schedule's word, stale once nothing runs (the prompt that waited was aborted)
            if self.engine.short_of_pages and self.engine.has_unfinished():
                self._read_kept(spill=True)

    def pump(self) -> None:
        with self.lock:
            self.receiver.progress(0)
            self._outbox.flush()  # a registration read here stages the KV waiting for it, as a step's end would

    def sockets(self) -> list:
        return self.receiver.sockets() + self.sender.sockets()

    def wait_limit_s(self) -> float:
        if self.engine.has_runnable():
            return 0.0
        return math.inf  # a landing pull wakes the loop (its data plane's descriptor is among the sockets)

    def _receive(self) -> None:
        """Starts a prompt on its first embedding chunk and gives the engine each later one as it
        lands: a room that arrives in several chunks (a large picture, a small receiver pool) is
        prefilled up to the rows that have arrived meanwhile."""
        self.receiver.progress(0)
        for record in [r for r in self._requests if r.receiving]:
            state = self.receiver.poll(record.room)
            if state is PollState.FAILED:
                self._requests.finish(record.request_id, PrefillState.FAILED,
                                      f"embeddings did not arrive: {self.receiver.failure(record.room)}")
                continue
            info, chunks = self.receiver.landed(record.room)
            complete = state is PollState.SUCCESS
            if len(chunks) == record.chunks_given:
                continue
            record.chunks_given = len(chunks)
            if complete:
                self.receiver.take(record.room)  # the embedding room is gone
                record.receiving = False
                self.embedding_resumes += len(chunks) > 1
            if record.state is PrefillState.WAITING_FOR_EMBEDDINGS:
                record.link_hop(info.aux)
                record.move(PrefillState.PREFILLING)
                self.early_starts += not complete
                self._start(record, lambda: self._features(info, chunks), rows_arriving=not complete)
                continue
            if record.state is not PrefillState.PREFILLING:
                continue  # it finished on pages cached meanwhile: nothing reads the rest of its rows
            try:
                self.engine.rows_arrived(record.request_id, self._features(info, chunks), complete)
            except Exception as error:
                self._requests.finish(record.request_id, PrefillState.FAILED, f"its embeddings do not fit: {error}")

    def _send(self) -> None:
        self._read_kept()
        self._outbox.flush()  # reads the sender's socket too
        for record in self._requests:
            state = self.sender.poll(record.room)
            if state is PollState.SUCCESS:
                self._requests.finish(record.request_id, PrefillState.DONE)
            elif state is PollState.FAILED:
                # Decode never came, aborted or died, whatever this request is doing now: nobody
                # will take its KV, so it ends here and frees what it holds (the engine's pages too).
                self._requests.finish(record.request_id, PrefillState.FAILED, self.sender.failure(record.room))

    def abort(self, request_id: str) -> None:
        with self.lock:
            self._requests.finish(request_id, PrefillState.FAILED, "aborted by the router")

    def _release(self, record: PrefillRecord, was: PrefillState) -> None:
        """Frees what a request held in state ``was``; the KV room's abort tells decode why."""
        if not record.first_sent:
            record.stream.put(pb.TokenEvent(request_id=record.request_id,
                                            error=record.reason or "prefill ended it before its first token"))
        with self.lock:
            if record.receiving:
                close_room(self.receiver, record.room, record.reason)
            if was is PrefillState.PREFILLING:
                self.engine.abort(record.request_id)
            self.engine.release_kv(record.request_id)  # kept for a decode that never came
            self._outbox.drop(record.room)
            close_room(self.sender, record.room, record.reason)

    def in_flight(self) -> int:
        return len(self._requests)

    def kv_reserve(self) -> tuple[int, int]:
        return 0, 0

    def max_model_len(self) -> int:
        return min(self.engine.max_sequence_tokens, self.sender.allocator.total_tokens + 1)

    def incarnation(self) -> int:
        return self.sender.incarnation

    def capacity(self) -> int:
        return self.engine.config.max_num_seqs

    def prefix_cache(self) -> PrefixCache | None:
        return PrefixCache.of(self.engine)

    def health(self) -> dict:
        with self.lock:
            return self._health()

    def _health(self) -> dict:
        return self.engine.stats() | {
            "free_embedding_blocks": self.receiver.allocator.available_blocks(),
            "free_kv_blocks": self.sender.allocator.available_blocks(), "kv_rooms_staged": self.sender.staged_rooms,
            "in_flight": len(self._requests), "requests": self._requests.counts(),
            "embedding_resumes": self.embedding_resumes, "early_starts": self.early_starts,
            "pictures_held": self.pictures_held, "embedding_pulls_posted": self.receiver.posting.made,
            "embedding_posted_pulls_taken": self.receiver.posting.taken}

    def close(self) -> None:
        with self.lock:
            self.receiver.close()
            self.sender.close()
            self._plane.close()

    def _start(self, record: PrefillRecord, features: Callable[[], dict], rows_arriving: bool = False) -> None:
        """Prefill samples exactly the first token; decode continues from it. A prompt the engine
        refuses, or whose embeddings do not fit it, fails alone."""
        try:
            self.engine.add_request(record.prompt, self._first_only(record.params), record.request_id,
                                    features=features(), rows_arriving=rows_arriving)
        except Exception as error:
            self._requests.finish(record.request_id, PrefillState.FAILED, f"prefill refused it: {error}")

    def _visual_rows(self, prompt: PreparedPrompt) -> int:
        """The rows encode sends for the prompt's pictures: its embedding room's length."""
        count = self.engine.model.processor.num_image_tokens
        return sum(count(v.grid_thw[0]) for v in prompt.images + prompt.videos)

    @staticmethod
    def _first_only(params: SamplingParams) -> SamplingParams:
        """Prefill samples the first token only. Under ``min_tokens`` no stop string may end the
        request at it, as none would in one engine (the first token is kept from being a stop
        token either way)."""
        return dataclasses.replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1),
                                   stop=() if params.min_tokens else params.stop)

    @staticmethod
    def _features(info: TransferInfo, chunks: Sequence[Landed]) -> dict[str, list[VisualRows]]:
        """The chunks landed so far (on device, as the transfer left them) as runs of the images'
        rows and runs of the videos' (the room carries every image's rows, then every video's)."""
        split = int(info.aux["image_tokens"])
        features = {"image": [], "video": []}
        for chunk in chunks:
            rows = VisualRows(chunk.arrays["embeddings"], chunk.arrays["deepstack"], 0, chunk.count)
            images = min(max(split - chunk.offset, 0), chunk.count)
            features["image"].append(rows.take(0, images))
            features["video"].append(rows.take(images, chunk.count - images))
        return features

    def _stream_first(self, record: PrefillRecord, output: RequestOutput) -> None:
        """Streams the first token to the router as decode would have streamed it (decode streams
        from the second token on). Prefill's engine stops every request after its first token
        (``max_tokens=1``); that "length" finish is the request's own only when the request may
        generate one token (decode caps ``max_tokens`` at the context left, as the engine here
        does): otherwise the event is an unfinished request's, its text held back as far as a
        stop string could still reach."""
        completion = output.outputs[0]
        may_generate = min(record.params.max_tokens, self.engine.config.max_model_len - len(record.prompt.token_ids))
        if completion.finish_reason == FinishReason.LENGTH and may_generate > 1:
            output = dataclasses.replace(output, finished=False, outputs=[
                dataclasses.replace(completion, finish_reason=None, stop_reason=None)])
        record.stream.put(event_to_pb(record.request_id, OutputStream(record.params).delta(output)))
        record.first_sent = True  # after the put: an event that failed to build leaves the error to _release


class PrefillService(WorkerService):
    def Prefill(self, request, context):
        """The Ack, then the first token's event (or the error that ended the request before it).

        A router that hangs up before it has the first token has given the request up (the client
        left, or its deadline passed): prefill aborts it here. The router's own abort cannot be
        relied on for this: sent before the ack came back, it may pass the request on its way in,
        and decode, whose abort would fail prefill's KV room, may never have been called."""
        stream: queue.Queue = queue.Queue()
        ack = self.acknowledge(lambda message, trace: self.loop.role.prefill(message, stream, trace), request, context)
        delivered = not ack.ok
        try:
            yield pb.PrefillEvent(ack=ack)
            if ack.ok and context.add_callback(lambda: stream.put(None)):  # False: it has hung up already
                event = stream.get()  # None: the router hung up
                if event is not None:
                    yield pb.PrefillEvent(first=event)
                    delivered = True
        finally:  # also where gRPC drops this generator, the call cancelled at a yield
            if not delivered:
                self.abandoned(request.request_id)


def prefill_service(role: PrefillRole) -> PrefillService:
    return PrefillService(RoleLoop(role).start())
