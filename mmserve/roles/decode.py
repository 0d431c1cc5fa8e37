"""The decode role: reserves KV pages for a request, registers them with the prefill the router
named, receives KV + first token, and decodes it in the continuous batch, streaming tokens back.

Pages are reserved for the prompt and every token the request may generate, so a request here is
never preempted: decode has no prompt embeddings to recompute it from.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading

import numpy as np

from mmserve.distributed.layout import MeshLayout
from mmserve.distributed.lockstep import Lockstep
from mmserve.engine.config import EngineConfig
from mmserve.engine.engine import LLMEngine, StepFailed
from mmserve.engine.output_stream import OutputStream
from mmserve.engine.outputs import RequestOutput
from mmserve.engine.request import Request
from mmserve.roles.fields import kv_fields
from mmserve.roles.wire import event_to_pb, sampling_from_pb
from mmserve.roles.worker import RoleLoop, WorkerService
from mmserve.rpc import worker_pb2 as pb
from mmserve.sampling_params import SamplingParams
from models.qwen3_vl_moe import Model
from transfer.config import TransferConfig
from transfer.messages import TransferMode
from transfer.poll import PollState
from transfer.receiver import Receiver

PROGRESS_S = 0.002
NO_EMBEDDINGS = np.zeros((3, 0), np.int32)


@dataclasses.dataclass
class Incoming:
    request_id: str
    room: int
    prompt_ids: list[int]
    params: SamplingParams
    prefill_name: str
    stream: queue.Queue
    slot: int | None = None

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens


@dataclasses.dataclass
class Outgoing:
    """A decoding request's stream back to the router, and what of its output was sent."""

    queue: queue.Queue
    output: OutputStream


DECODE_PROGRAMS = frozenset({"decode"})
"""Decode only continues requests prefilled elsewhere."""


class DecodeRole:
    role = "decode"

    def __init__(self, model: Model, engine: EngineConfig, transfer: TransferConfig, name: str, bootstrap: str,
                 layout: MeshLayout | None = None, lockstep: Lockstep | None = None):
        self.name = name
        self.bootstrap = bootstrap
        self.engine = LLMEngine(model, engine, layout=layout, lockstep=lockstep, programs=DECODE_PROGRAMS)
        self.receiver = Receiver(transfer, kv_fields(model.config, model.dtype))
        self._prealloc: collections.deque[Incoming] = collections.deque()
        self._transfers: dict[int, Incoming] = {}
        self._streams: dict[str, Outgoing] = {}
        self.lock = threading.RLock()
        """Held by whoever touches the receiver: the loop thread or the transfer pump."""

    def decode(self, request: pb.DecodeRequest, stream: queue.Queue) -> None:
        params = sampling_from_pb(request.sampling)
        max_len = self.engine.config.max_model_len
        if len(request.token_ids) >= max_len:
            raise ValueError(f"the prompt has {len(request.token_ids)} tokens; the context holds {max_len}")
        params = dataclasses.replace(params, max_tokens=min(params.max_tokens, max_len - len(request.token_ids)))
        self._prealloc.append(Incoming(request.request_id, request.room, list(request.token_ids), params,
                                       request.prefill_name, stream))

    def step(self) -> None:
        with self.lock:
            arrived = self._receive()
        for incoming, received in arrived:
            self._admit(incoming, received)
        if self.engine.has_unfinished():
            try:
                outputs = self.engine.step()
            except StepFailed as failure:
                for request_id in failure.request_ids:
                    self._streams.pop(request_id).queue.put(pb.TokenEvent(request_id=request_id, error=str(failure)))
                return
            for output in outputs:
                self._emit(output)

    def pump(self) -> None:
        with self.lock:
            self.receiver.progress(0)

    def _receive(self) -> list[tuple[Incoming, object]]:
        """Registers reserved requests with their prefill; returns the ones whose KV arrived."""
        while self._prealloc:
            incoming = self._prealloc[0]
            incoming.slot = self.engine.reserve(incoming.request_id, incoming.reserved_tokens)
            if incoming.slot is None:
                break
            self._prealloc.popleft()
            self.receiver.add(incoming.room, self.bootstrap, incoming.prefill_name, TransferMode.KV)
            self._transfers[incoming.room] = incoming
        self.receiver.progress(PROGRESS_S if not self.engine.has_unfinished() else 0)
        arrived = []
        for room, incoming in list(self._transfers.items()):
            state = self.receiver.poll(room)
            if state is PollState.SUCCESS:
                del self._transfers[room]
                arrived.append((incoming, self.receiver.take(room)))
            elif state is PollState.FAILED:
                del self._transfers[room]
                self.engine.cancel_reservation(incoming.request_id, incoming.slot)
                incoming.stream.put(pb.TokenEvent(request_id=incoming.request_id,
                                                  error=f"KV transfer failed: {self.receiver.failure(room)}"))
                self.receiver.forget(room)
        return arrived

    def abort(self, request_id: str) -> None:
        with self.lock:
            self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        for incoming in list(self._prealloc):
            if incoming.request_id == request_id:
                self._prealloc.remove(incoming)
                incoming.stream.put(pb.TokenEvent(request_id=request_id, error="aborted"))
        for room, incoming in list(self._transfers.items()):
            if incoming.request_id == request_id:
                del self._transfers[room]
                self.receiver.abort(room, "aborted by the router")
                self.receiver.forget(room)
                self.engine.cancel_reservation(request_id, incoming.slot)
                incoming.stream.put(pb.TokenEvent(request_id=request_id, error="aborted"))
        if request_id in self._streams:
            stream = self._streams.pop(request_id).queue
            self.engine.abort(request_id)
            stream.put(pb.TokenEvent(request_id=request_id, error="aborted"))

    def in_flight(self) -> int:
        return len(self._prealloc) + len(self._transfers) + len(self._streams)

    def capacity(self) -> int:
        return self.engine.config.max_num_seqs

    def health(self) -> dict:
        with self.lock:
            return self._health()

    def _health(self) -> dict:
        return self.engine.stats() | {"free_kv_blocks": self.receiver.allocator.available_blocks(),
                                      "prealloc_queue": len(self._prealloc), "transfers": len(self._transfers)}

    def close(self) -> None:
        with self.lock:
            self.receiver.close()

    def _admit(self, incoming: Incoming, received) -> None:
        info = received.info
        aux = info.aux
        request = Request(incoming.request_id, incoming.prompt_ids, incoming.params, NO_EMBEDDINGS,
                          int(aux["rope_delta"]), None, num_computed=len(incoming.prompt_ids))
        first = (info.first_token, aux.get("logprob"), aux.get("top_ids"), aux.get("top_logprobs"))
        self._streams[incoming.request_id] = Outgoing(incoming.stream, OutputStream(incoming.params))
        self._emit(self.engine.admit_prefilled(request, incoming.slot, received.arrays["k"], received.arrays["v"],
                                               first))

    def _emit(self, output: RequestOutput) -> None:
        out = self._streams[output.request_id]
        if output.finished:
            del self._streams[output.request_id]
        out.queue.put(event_to_pb(output.request_id, out.output.delta(output)))


class DecodeService(WorkerService):
    def Decode(self, request, context):
        stream: queue.Queue = queue.Queue()
        try:
            self.loop.call(self.loop.role.decode, request, stream)
        except ValueError as error:
            yield pb.TokenEvent(request_id=request.request_id, error=str(error))
            return
        context.add_callback(lambda: self._client_gone(request.request_id, stream))
        while True:
            event = stream.get()
            if event is None:
                return
            yield event
            if event.finish_reason or event.error:
                return

    def _client_gone(self, request_id: str, stream: queue.Queue) -> None:
        """The router hung up (or the call ended): free whatever the request still holds."""
        self.loop.call(self.loop.role.abort, request_id)
        stream.put(None)


def decode_service(role: DecodeRole) -> DecodeService:
    return DecodeService(RoleLoop(role).start())
