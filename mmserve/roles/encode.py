"""The encode role: images and videos in, embeddings and deepstack rows out to the prefill that the
router named, through the transfer layer (allocated by the real length, resumed when the
receiver's default allocation is too small)."""

from __future__ import annotations

import threading

import numpy as np

from mmserve.distributed.layout import MeshLayout
from mmserve.distributed.lockstep import Lockstep
from mmserve.engine.config import EngineConfig
from mmserve.engine.encoder import Encoder
from mmserve.engine.rejected import RequestRejected
from mmserve.roles.fields import embedding_fields
from mmserve.roles.outbox import Outbox, Parcel
from mmserve.roles.wire import visual_from_pb
from mmserve.roles.worker import RoleLoop, WorkerService
from mmserve.rpc import worker_pb2 as pb
from models.qwen3_vl_moe import Model
from transfer.config import TransferConfig
from transfer.messages import TransferInfo, TransferMode
from transfer.sender import Sender

PROGRESS_S = 0.005


def vision_encoder(model: Model, engine: EngineConfig, layout: MeshLayout | None,
                   lockstep: Lockstep | None) -> Encoder:
    """The encode role's encoder, its programs compiled (on every process of the role, through the
    lockstep) when ``engine.precompile`` asks."""
    encoder = Encoder(model, engine, layout, lockstep)
    if engine.precompile and encoder.lockstep.is_leader:
        encoder.lockstep.call_and_wait(encoder.run_compile)
    return encoder


class EncodeRole:
    role = "encode"

    def __init__(self, model: Model, engine: EngineConfig, transfer: TransferConfig, name: str, bootstrap: str,
                 layout: MeshLayout | None = None, lockstep: Lockstep | None = None):
        self.name = name
        self._capacity = engine.max_num_seqs
        self.encoder = vision_encoder(model, engine, layout, lockstep)
        self.sender = Sender(transfer, embedding_fields(model.config, model.dtype), name, bootstrap)
        self._outbox = Outbox(self.sender, self._fail)
        self._rooms: dict[int, str] = {}
        self.lock = threading.RLock()
        """Held by whoever touches the sender: the loop thread or the transfer pump."""

    def encode(self, request: pb.EncodeRequest) -> None:
        """Encodes now; the rows wait for sender blocks if the pool is full."""
        images = self.encoder.encode_all([visual_from_pb(v) for v in request.images])
        videos = self.encoder.encode_all([visual_from_pb(v) for v in request.videos])
        parts = [f for f in (images, videos) if f is not None]
        if not parts:
            raise ValueError("an encode request needs at least one image or video")
        embeds = np.concatenate([p[0] for p in parts])
        deepstack = np.concatenate([p[1] for p in parts], axis=1)  # [levels, n, H]
        n = embeds.shape[0]
        if not self.sender.allocator.can_ever_hold(n):
            raise RequestRejected(f"{n} visual tokens exceed the whole encode buffer pool")
        pad = ((0, self.sender.buffers.bucket(n) - n), (0, 0))  # one write program per bucket
        rows = {"embeddings": np.pad(embeds, pad),
                "deepstack": np.pad(np.swapaxes(deepstack, 0, 1).reshape(n, -1), pad)}
        info = TransferInfo(TransferMode.EMBEDDING, n, aux={"image_tokens": 0 if images is None else len(images[0])})
        with self.lock:
            self.sender.add(request.room)
            self._rooms[request.room] = request.request_id
            self._outbox.put(Parcel(request.room, rows, info))

    def step(self) -> None:
        with self.lock:
            self._outbox.flush()
            self.sender.progress(PROGRESS_S)
            for room in [r for r in self._rooms if self.sender.poll(r).terminal]:
                self.sender.forget(room)
                del self._rooms[room]

    def pump(self) -> None:
        with self.lock:
            self.sender.progress(0)

    def abort(self, request_id: str) -> None:
        with self.lock:
            self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        for room, rid in list(self._rooms.items()):
            if rid == request_id:
                self._outbox.drop(room)
                self._fail(room, "aborted by the router")

    def in_flight(self) -> int:
        return len(self._rooms)

    def capacity(self) -> int:
        return self._capacity

    def health(self) -> dict:
        with self.lock:
            return {"free_blocks": self.sender.allocator.available_blocks(), "in_flight": len(self._rooms),
                    "queued": len(self._outbox)}

    def close(self) -> None:
        with self.lock:
            self.sender.close()

    def _fail(self, room: int, reason: str) -> None:
        with self.lock:
            if not self.sender.poll(room).terminal:
                self.sender.abort(room, reason[:500])


class EncodeService(WorkerService):
    def Encode(self, request, context):
        return self.acknowledge(self.loop.role.encode, request)


def encode_service(role: EncodeRole) -> EncodeService:
    return EncodeService(RoleLoop(role).start())
