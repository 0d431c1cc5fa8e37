"""The decode role: reserves KV pages for a request, registers them with the prefill the router
named, receives KV + first token, and decodes it in the continuous batch, sending tokens back
from the second on (prefill streamed the first to the router as soon as it sampled it) on the
router's token stream: one message per step for all of that router's requests
(:mod:`mmserve.roles.token_stream`).

Pages are reserved for the prompt and every token the request may generate, so a request here is
never preempted: decode has no prompt embeddings to recompute it from.

Decode keeps a prefix cache of its own: a prompt's pages are keyed as prefill keys them (the router
sends the pictures' content keys), and a prompt whose leading pages decode still holds (the earlier
turns of a chat, generated tokens included) shares them and registers its KV room as holding those
tokens, so prefill sends only the rest. A request whose first page another request is receiving
right now (``n`` siblings, a burst sharing a system prompt) waits for it to land, then shares it.

A request with a structured output starts compiling its grammar as it arrives, so the compile runs
while its pages are reserved and its KV is in flight; the engine holds it (reservation kept, other
requests decoding) until the grammar is ready, feeds the matcher prefill's first token, and only
then lets it sample: the same grammar state the colocated engine would have.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import secrets
import threading

import grpc
import numpy as np
from opentelemetry.context import Context

from mmserve.distributed.layout import MeshLayout
from mmserve.distributed.lockstep import Lockstep
from mmserve.engine.config import EngineConfig
from mmserve.engine.engine import LLMEngine
from mmserve.engine.step_failed import StepFailed
from mmserve.engine.kv_rows import KVRows
from mmserve.engine.output_stream import OutputStream
from mmserve.engine.outputs import RequestOutput
from mmserve.engine.page_hash import PageKeys, prompt_page_keys
from mmserve.engine.rejected import RequestRejected
from mmserve.engine.request import Request
from mmserve.engine.scheduler import Reservation
from mmserve.kv_events import KVEventPublisher
from mmserve.roles.fields import kv_fields, room_rows
from mmserve.roles.request_state import DECODE_TRANSITIONS, DecodeState, RequestTable, RoleRequest, close_room
from mmserve.roles.wire import deadline_from_pb, event_to_pb, prompt_from_pb, sampling_from_pb
from mmserve.roles.role_loop import LoopStopped, RoleLoop
from mmserve.roles.token_stream import TokenStream
from mmserve.roles.worker import PrefixCache, WorkerService
from mmserve.rpc import worker_pb2 as pb
from mmserve.sampling_params import SamplingParams
from mmserve.tracing import role_span
from models.qwen3_vl_moe import Model
from transfer.config import TransferConfig
from transfer.messages import TransferMode
from transfer.poll import PollState
from transfer.receiver import Receiver

NO_EMBEDDINGS = np.zeros((3, 0), np.int32)

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False, kw_only=True)
class DecodeRecord(RoleRequest[DecodeState]):
    """A request in decode, from its page reservation to its last token."""

    TRANSITIONS = DECODE_TRANSITIONS
    INITIAL = frozenset({DecodeState.RESERVING})
    HOPS = {DecodeState.RECEIVING_KV: "receive KV"}

    prompt_ids: list[int]
    params: SamplingParams
    prefill_name: str
    prefill_incarnation: int | None
    """The incarnation of the prefill worker the router picked (None: not said)."""
    stream: TokenStream
    """The router's token stream its events go on: every token, then the end or the error."""
    page_keys: PageKeys | None = None
    """The keys of its pages at this engine's page size (None: prefix caching is off)."""
    reservation: Reservation | None = None
    output: OutputStream | None = None

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens

    @functools.cached_property
    def first_page_key(self) -> bytes | None:
        """The key of its prompt's first page, if it could ever be held (a full page before the
        prompt's last token); None otherwise."""
        if self.page_keys is None:
            return None
        return next(iter(self.page_keys.shareable(len(self.prompt_ids), lambda start, end: self.prompt_ids[start:end])),
                    None)


DECODE_PROGRAMS = frozenset({"decode", "kv_write"})
"""Decode only continues requests prefilled elsewhere, whose KV it writes into its pages."""


class DecodeRole:
    role = "decode"

    def __init__(self, model: Model, engine: EngineConfig, transfer: TransferConfig, name: str, bootstrap: str,
                 layout: MeshLayout | None = None, lockstep: Lockstep | None = None,
                 kv_events: KVEventPublisher | None = None):
        self.name = name
        self.bootstrap = bootstrap
        self.receiver = Receiver(transfer, kv_fields(model.config, model.dtype))
        self.engine = LLMEngine(model, engine, layout=layout, lockstep=lockstep, programs=DECODE_PROGRAMS,
                                kv_events=kv_events, arriving_rows=room_rows(transfer, engine))
        self._incarnation = 1 + secrets.randbits(62)
        self._requests: RequestTable[DecodeRecord] = RequestTable(self._release)
        self.lock = threading.RLock()
        """Held by whoever touches the receiver: the loop thread or the transfer pump."""
        self.kv_tokens_received = 0
        """Prompt tokens whose KV arrived from prefill (those held already in the cache not counted)."""
        self._unflushed: set[TokenStream] = set()
        """Token streams with events put since the last flush."""
        self.token_events_sent = 0
        self.token_messages_sent = 0
        """Events put on token streams, and the messages that carried them (one per stream per step)."""

    def decode(self, request: pb.DecodeRequest, stream: TokenStream, trace_parent: Context | None = None) -> None:
        if stream.closed:
            raise ValueError(f"the token stream {stream.stream_id!r} has closed")
        params = sampling_from_pb(request.sampling)
        max_len = self.engine.max_sequence_tokens  # the context, or the whole cache when that holds less
        if len(request.token_ids) >= max_len:
            raise RequestRejected(f"the prompt has {len(request.token_ids)} tokens; the context holds {max_len}")
        cap = min(params.max_tokens, max_len - len(request.token_ids))
        params = dataclasses.replace(params, max_tokens=cap, min_tokens=min(params.min_tokens, cap))
        page_keys = self._page_keys(request)
        self._requests.check_new(request.request_id, request.room)  # before its span opens: refused, none ends it
        if params.structured_output is not None:
            params.structured_output.check()
            self.engine.grammars.submit(params.structured_output)
        self._requests.add(DecodeRecord(request_id=request.request_id, room=request.room,
                                        state=DecodeState.RESERVING, prompt_ids=list(request.token_ids),
                                        params=params, prefill_name=request.prefill_name,
                                        prefill_incarnation=request.prefill_incarnation or None, stream=stream,
                                        page_keys=page_keys,
                                        deadline=deadline_from_pb(request.timeout_s),
                                        span=role_span("decode", request.request_id, trace_parent)))

    def _page_keys(self, request: pb.DecodeRequest) -> PageKeys | None:
        """The prompt's page keys as prefill computes them, at this engine's page size; ValueError
        when its pictures do not fill its placeholders."""
        if not self.engine.config.enable_prefix_caching:
            return None
        prompt = prompt_from_pb(request)
        return prompt_page_keys(prompt, self.engine.model, self.engine.config.page_size)

    def step(self) -> None:
        try:
            self._step()
        finally:
            self._flush()

    def _step(self) -> None:
        self._requests.fail_overdue()
        with self.lock:
            arrived = self._receive()
        for record, received in arrived:
            self._admit(record, received)
        if self.engine.has_unfinished():
            try:
                outputs = self.engine.step()
            except StepFailed as failure:
                for output in failure.outputs:  # rows the step dealt with before it failed (finished ones)
                    self._emit(output)
                for request_id in failure.request_ids:
                    self._requests.finish(request_id, DecodeState.FAILED, str(failure))
                return
            for output in outputs:
                self._emit(output)

    def _put(self, record: DecodeRecord, event: pb.TokenEvent) -> None:
        record.stream.put(event)
        self._unflushed.add(record.stream)

    def _flush(self) -> None:
        """Sends what this step (or call) put on each token stream, one message per stream."""
        for stream in self._unflushed:
            if count := stream.flush():
                self.token_events_sent += count
                self.token_messages_sent += 1
        self._unflushed.clear()

    def pump(self) -> None:
        with self.lock:
            self.receiver.progress(0)

    def sockets(self) -> list:
        return self.receiver.sockets()

    def wait_limit_s(self) -> float:
        if self.engine.has_unfinished():
            return 0.0
        return math.inf  # a landing pull wakes the loop (its data plane's descriptor is among the sockets)

    def _receive(self) -> list[tuple[DecodeRecord, object]]:
        """Registers reserved requests with their prefill; returns the ones whose KV arrived."""
        arriving = {record.first_page_key for record in self._requests.in_state(DecodeState.RECEIVING_KV)} - {None}
        for record in self._requests.in_state(DecodeState.RESERVING):  # in arrival order
            if record.first_page_key in arriving:
                continue  # a request with the same first page is receiving it: share it once it has landed
            reservation = self.engine.reserve(record.request_id, record.reserved_tokens, record.prompt_ids,
                                              record.page_keys)
            if reservation is None:
                break
            record.reservation = reservation
            record.move(DecodeState.RECEIVING_KV)
            arriving |= {record.first_page_key} - {None}
            try:
                self.receiver.add(record.room, self.bootstrap, record.prefill_name, TransferMode.KV,
                                  record.prefill_incarnation, start_token=reservation.held_tokens,
                                  expected_tokens=len(record.prompt_ids))
            except Exception as error:
                self._requests.finish(record.request_id, DecodeState.FAILED, f"could not open its KV room: {error}")
        self.receiver.progress(0)
        arrived = []
        for record in self._requests.in_state(DecodeState.RECEIVING_KV):
            state = self.receiver.poll(record.room)
            if state is PollState.SUCCESS:
                received = self.receiver.take(record.room)  # the KV room is gone
                self.kv_tokens_received += received.num_tokens - received.start_token
                record.link_hop(received.info.aux)
                arrived.append((record, received))
            elif state is PollState.FAILED:
                self._requests.finish(record.request_id, DecodeState.FAILED,
                                      f"KV transfer failed: {self.receiver.failure(record.room)}")
        return arrived

    def abort(self, request_id: str) -> None:
        with self.lock:
            self._requests.finish(request_id, DecodeState.FAILED, "aborted")
        self._flush()

    def drop_stream(self, stream: TokenStream) -> None:
        """The router that opened ``stream`` left (or hung up on it): its requests are freed."""
        for record in [r for r in self._requests if r.stream is stream]:
            with self.lock:
                self._requests.finish(record.request_id, DecodeState.FAILED, "the router's token stream closed")
        self._flush()

    def _release(self, record: DecodeRecord, was: DecodeState) -> None:
        """Frees what a request held in state ``was``; a failed request's stream gets the reason."""
        with self.lock:
            if was is DecodeState.RESERVING:
                self._decline(record)
            elif was is DecodeState.RECEIVING_KV:
                close_room(self.receiver, record.room, record.reason)
                self.engine.cancel_reservation(record.request_id, record.reservation.slot)
            elif was is DecodeState.DECODING:
                self.engine.abort(record.request_id)  # frees its reservation; a no-op once it finished there
        if record.state is DecodeState.FAILED:
            self._put(record, pb.TokenEvent(request_id=record.request_id, error=record.reason))

    def _decline(self, record: DecodeRecord) -> None:
        """Tells prefill that a request it may be holding KV for will never register its room (the
        router's token stream closed, its deadline passed): without a word, prefill would keep
        that KV until its room's bootstrap timeout."""
        try:
            self.receiver.decline(record.room, self.bootstrap, record.prefill_name, record.prefill_incarnation,
                                  record.reason)
        except Exception:  # prefill's room then ends at its bootstrap timeout, as before
            log.warning("could not tell prefill %s that request %s is gone", record.prefill_name,
                        record.request_id, exc_info=True)

    def in_flight(self) -> int:
        return len(self._requests)

    def kv_reserve(self) -> tuple[int, int]:
        return self.engine.kv.num_reservable_pages, self.engine.kv.page_size

    def max_model_len(self) -> int:
        return min(self.engine.max_sequence_tokens, self.receiver.allocator.total_tokens + 1)

    def incarnation(self) -> int:
        return self._incarnation

    def capacity(self) -> int:
        return self.engine.config.max_num_seqs

    def prefix_cache(self) -> PrefixCache | None:
        return PrefixCache.of(self.engine)

    def health(self) -> dict:
        with self.lock:
            return self._health()

    def _health(self) -> dict:
        return self.engine.stats() | {"free_kv_blocks": self.receiver.allocator.available_blocks(),
                                      "kv_tokens_received": self.kv_tokens_received,
                                      "token_events_sent": self.token_events_sent,
                                      "token_messages_sent": self.token_messages_sent,
                                      "kv_pulls_posted": self.receiver.posting.made,
                                      "kv_posted_pulls_taken": self.receiver.posting.taken,
                                      "in_flight": len(self._requests), "requests": self._requests.counts()}

    def close(self) -> None:
        with self.lock:
            self.receiver.close()

    def _admit(self, record: DecodeRecord, received) -> None:
        """Takes a request whose KV arrived into the batch; one whose KV or first token cannot
        be used fails alone."""
        try:
            info = received.info
            aux = info.aux
            request = Request(record.request_id, record.prompt_ids, record.params, NO_EMBEDDINGS,
                              int(aux["rope_delta"]), None, num_computed=len(record.prompt_ids),
                              page_keys=record.page_keys)
            first = (info.first_token, aux.get("logprob"), aux.get("top_ids"), aux.get("top_logprobs"))
            kv = [KVRows(c.arrays["k"], c.arrays["v"], c.offset, c.count) for c in received.chunks]
            record.output = OutputStream(record.params)
            # From here the reservation is the engine's, freed by it if it refuses the rows: a
            # failure before leaves the record RECEIVING_KV, whose release cancels the reservation.
            record.move(DecodeState.DECODING)
            output = self.engine.admit_prefilled(request, record.reservation, kv, first)
        except Exception as error:
            self._requests.finish(record.request_id, DecodeState.FAILED, f"could not admit its KV: {error}")
            return
        if output is not None:  # None: it waits for its grammar; a later engine step emits its first token
            self._emit(output)

    def _emit(self, output: RequestOutput) -> None:
        """Streams what is new; the first token's event went to the router from prefill, as an
        unfinished request's (its text held back as far as a stop string could reach), so here it
        only advances the stream past that, and when the token ends the request (decode's own
        length cap, which may be below prefill's) carries the end and the text held back."""
        record = self._requests[output.request_id]
        if len(output.outputs[0].token_ids) == 1:
            record.output.delta(dataclasses.replace(output, finished=False))  # what prefill streamed
            if not output.finished:
                return
        delta = record.output.delta(output)
        self._put(record, event_to_pb(output.request_id, delta))
        if output.finished:
            self._requests.finish(output.request_id, DecodeState.DONE)


class DecodeService(WorkerService):
    """Decode's gRPC face: ``Tokens`` opens a router's token stream, ``Decode`` takes a request whose
    events go on the stream it names."""

    def __init__(self, loop: RoleLoop):
        super().__init__(loop)
        self._streams: dict[str, TokenStream] = {}
        self._streams_lock = threading.Lock()

    def Tokens(self, request, context):
        stream = TokenStream(request.stream_id)
        with self._streams_lock:
            if not request.stream_id or request.stream_id in self._streams:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              "a token stream needs a stream_id no other open stream on this worker has")
            self._streams[request.stream_id] = stream
        if not context.add_callback(lambda: self._stream_gone(stream)):  # it has hung up already
            self._stream_gone(stream)
            return
        yield pb.TokenEvents()  # open: the router may send requests naming it
        while (batch := stream.next_batch()) is not None:
            yield batch

    def _stream_gone(self, stream: TokenStream) -> None:
        """The router hung up (or left): the stream's requests free whatever they hold, on the
        loop, not waited for here (gRPC runs this on its server's polling thread)."""
        with self._streams_lock:
            if self._streams.get(stream.stream_id) is stream:
                del self._streams[stream.stream_id]
        stream.close()
        try:
            freed = self.loop.submit(self.loop.role.drop_stream, stream)
        except LoopStopped:
            return  # the worker is stopping: it frees everything as it closes
        freed.add_done_callback(_log_failure)

    def Decode(self, request, context):
        with self._streams_lock:
            stream = self._streams.get(request.token_stream)
        if stream is None:
            return pb.Ack(ok=False, error=f"no token stream {request.token_stream!r} is open on this decode worker")
        return self.acknowledge(lambda req, parent: self.loop.role.decode(req, stream, parent), request, context)


def decode_service(role: DecodeRole) -> DecodeService:
    return DecodeService(RoleLoop(role).start())


def _log_failure(done) -> None:
    if done.exception() is not None and not isinstance(done.exception(), LoopStopped):
        log.error("freeing a closed token stream's requests failed", exc_info=done.exception())
