"""The prefill role: receives a prompt's visual embeddings from encode (text-only prompts need
none), prefills it, samples the first token, and sends KV + first token to the decode the router
named. One loop drives both directions: the embedding receiver and the KV sender."""

from __future__ import annotations

import dataclasses
import threading

import jax
import numpy as np

from mmserve.distributed.layout import MeshLayout
from mmserve.distributed.lockstep import Lockstep
from mmserve.engine.config import EngineConfig
from mmserve.engine.engine import LLMEngine, StepFailed
from mmserve.engine.inputs import PreparedPrompt
from mmserve.engine.request import Request
from mmserve.roles.fields import embedding_fields, kv_fields
from mmserve.roles.outbox import Outbox, Parcel
from mmserve.roles.wire import sampling_from_pb, visual_from_pb
from mmserve.roles.worker import RoleLoop, WorkerService
from mmserve.rpc import worker_pb2 as pb
from mmserve.sampling_params import SamplingParams
from models.qwen3_vl_moe import Model
from transfer.config import TransferConfig
from transfer.data_plane import open_data_plane
from transfer.messages import TransferInfo, TransferMode
from transfer.poll import PollState
from transfer.receiver import Receiver
from transfer.sender import Sender

PROGRESS_S = 0.002


@dataclasses.dataclass
class Pending:
    """A prompt waiting for its embeddings."""

    request_id: str
    prompt: PreparedPrompt
    params: SamplingParams


PREFILL_PROGRAMS = frozenset({"prefill", "kv_read"})
"""Prefill runs prompts (embeddings arrive from encode) and reads their KV for decode."""


class PrefillRole:
    role = "prefill"

    def __init__(self, model: Model, engine: EngineConfig, transfer: TransferConfig, name: str, bootstrap: str,
                 layout: MeshLayout | None = None, lockstep: Lockstep | None = None):
        self.name = name
        self.model = model
        self.bootstrap = bootstrap
        self.engine = LLMEngine(model, engine, on_finish=self._ship, layout=layout, lockstep=lockstep,
                                programs=PREFILL_PROGRAMS)
        # One data plane serves both directions: embeddings in, KV out.
        self._plane = open_data_plane(transfer)
        self.receiver = Receiver(transfer, embedding_fields(model.config, model.dtype), data_plane=self._plane)
        self.sender = Sender(transfer, kv_fields(model.config, model.dtype), name, bootstrap, data_plane=self._plane)
        self._pending: dict[int, Pending] = {}
        self._room_of: dict[str, int] = {}
        self._outbox = Outbox(self.sender, self._fail)
        self.embedding_resumes = 0
        self.lock = threading.RLock()
        """Held by whoever touches the receiver or the sender: the loop thread or the transfer pump."""

    def prefill(self, request: pb.PrefillRequest) -> None:
        with self.lock:
            self._prefill(request)

    def _prefill(self, request: pb.PrefillRequest) -> None:
        params = sampling_from_pb(request.sampling)
        prompt = PreparedPrompt(list(request.token_ids), [visual_from_pb(v) for v in request.images],
                                [visual_from_pb(v) for v in request.videos])
        if bool(request.encode_name) != bool(prompt.images or prompt.videos):
            raise ValueError("a prompt with images or videos needs an encode worker, and only such a prompt")
        self.engine.check_fits(len(prompt.token_ids), params)
        self.sender.add(request.room)
        self._room_of[request.request_id] = request.room
        pending = Pending(request.request_id, prompt, params)
        if request.encode_name:
            self.receiver.add(request.room, self.bootstrap, request.encode_name, TransferMode.EMBEDDING)
            self._pending[request.room] = pending
        else:
            self._start(pending, {})

    def step(self) -> None:
        with self.lock:
            self._receive()
        if self.engine.has_unfinished():
            try:
                self.engine.step()
            except StepFailed as failure:
                for request_id in failure.request_ids:
                    if request_id in self._room_of:
                        self._fail(self._room_of[request_id], str(failure))
        with self.lock:
            self._send()

    def pump(self) -> None:
        with self.lock:
            self.receiver.progress(0)
            self.sender.progress(0)

    def _receive(self) -> None:
        self.receiver.progress(PROGRESS_S)
        for room, pending in list(self._pending.items()):
            state = self.receiver.poll(room)
            if state is PollState.SUCCESS:
                del self._pending[room]
                received = self.receiver.take(room)
                self.embedding_resumes += received.chunks > 1
                self._start(pending, self._features(pending, received))
            elif state is PollState.FAILED:
                del self._pending[room]
                self._fail(room, f"embeddings did not arrive: {self.receiver.failure(room)}")
                self.receiver.forget(room)

    def _send(self) -> None:
        self._outbox.flush()
        self.sender.progress(PROGRESS_S)
        for request_id, room in list(self._room_of.items()):
            if room not in self._pending and self.sender.poll(room).terminal:
                # A room that failed (decode never came, aborted, died) while its prompt is still
                # in the engine: nobody will take that KV, so the prompt stops here too. (After a
                # successful send the request has already left the engine: a no-op.)
                self.engine.abort(request_id)
                self.sender.forget(room)
                del self._room_of[request_id]

    def abort(self, request_id: str) -> None:
        with self.lock:
            self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        room = self._room_of.get(request_id)
        if room is None:
            return
        if room in self._pending:
            del self._pending[room]
            self.receiver.abort(room, "aborted by the router")
            self.receiver.forget(room)
        self.engine.abort(request_id)
        self._outbox.drop(room)
        self._fail(room, "aborted by the router")

    def in_flight(self) -> int:
        return len(self._room_of)

    def capacity(self) -> int:
        return self.engine.config.max_num_seqs

    def health(self) -> dict:
        with self.lock:
            return self._health()

    def _health(self) -> dict:
        return self.engine.stats() | {
            "free_embedding_blocks": self.receiver.allocator.available_blocks(),
            "free_kv_blocks": self.sender.allocator.available_blocks(),
            "waiting_for_embeddings": len(self._pending), "in_flight": len(self._room_of),
            "embedding_resumes": self.embedding_resumes}

    def close(self) -> None:
        with self.lock:
            self.receiver.close()
            self.sender.close()
            self._plane.close()

    def _start(self, pending: Pending, features: dict) -> None:
        """Prefill samples exactly the first token; decode continues from it."""
        first_only = dataclasses.replace(pending.params, max_tokens=1)
        try:
            self.engine.add_request(pending.prompt, first_only, pending.request_id, features=features)
        except ValueError as error:
            self._fail(self._room_of[pending.request_id], str(error))

    def _features(self, pending: Pending, received) -> dict:
        """Splits the received visual rows back into image and video (embeddings, deepstack)."""
        n = received.num_tokens
        embeds = np.asarray(received.arrays["embeddings"])[:n]
        levels = len(self.model.config.vision.deepstack_visual_indexes)
        deepstack = np.swapaxes(np.asarray(received.arrays["deepstack"])[:n].reshape(n, levels, -1), 0, 1)
        split = int(received.info.aux["image_tokens"])
        out = {}
        if pending.prompt.images:
            out["image"] = (embeds[:split], deepstack[:, :split])
        if pending.prompt.videos:
            out["video"] = (embeds[split:], deepstack[:, split:])
        return out

    def _ship(self, request: Request, page_table: list[int]) -> None:
        """Called as the request finishes, before its pages are freed: copy its KV out."""
        room = self._room_of[request.request_id]
        n = request.num_computed
        k, v = jax.device_put(self.engine.runner.read_kv(page_table, n), self.sender.buffers.sharding)
        aux = {"rope_delta": request.rope_delta}
        if request.logprobs:
            first = request.logprobs[0]
            aux |= {"logprob": first.logprob, "top_ids": list(first.top), "top_logprobs": list(first.top.values())}
        info = TransferInfo(TransferMode.KV, n, aux=aux, first_token=request.output_ids[0])
        self._outbox.put(Parcel(room, {"k": k, "v": v}, info))

    def _fail(self, room: int, reason: str) -> None:
        """Tells decode (through the KV room) that this request will not come."""
        with self.lock:
            if not self.sender.poll(room).terminal:
                self.sender.abort(room, reason[:500])


class PrefillService(WorkerService):
    def Prefill(self, request, context):
        return self.acknowledge(self.loop.role.prefill, request)


def prefill_service(role: PrefillRole) -> PrefillService:
    return PrefillService(RoleLoop(role).start())
