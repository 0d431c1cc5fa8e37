"""The encode role: images and videos in, embeddings and deepstack rows out to the prefill that the
router named, through the transfer layer (allocated by the real length, resumed when the
receiver's default allocation is too small)."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from mmserve.engine.encoder import Encoder
from mmserve.roles.fields import embedding_fields
from mmserve.roles.wire import visual_from_pb
from mmserve.roles.worker import RoleLoop, WorkerService
from mmserve.rpc import worker_pb2 as pb
from models.qwen3_vl_moe import Model
from transfer.config import TransferConfig
from transfer.messages import TransferInfo, TransferMode
from transfer.sender import Sender

PROGRESS_S = 0.005


@dataclasses.dataclass
class Outgoing:
    room: int
    request_id: str
    rows: dict[str, np.ndarray]
    num_tokens: int
    image_tokens: int


class EncodeRole:
    role = "encode"

    def __init__(self, model: Model, transfer: TransferConfig, name: str, bootstrap: str, cache_size: int = 64):
        self.name = name
        self.encoder = Encoder(model, cache_size)
        self.sender = Sender(transfer, embedding_fields(model.config, model.dtype), name, bootstrap)
        self._outgoing: collections.deque[Outgoing] = collections.deque()
        self._rooms: dict[int, str] = {}

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
            raise ValueError(f"{n} visual tokens exceed the whole encode buffer pool")
        rows = {"embeddings": embeds, "deepstack": np.swapaxes(deepstack, 0, 1).reshape(n, -1)}
        self.sender.add(request.room)
        self._rooms[request.room] = request.request_id
        self._outgoing.append(Outgoing(request.room, request.request_id, rows, n,
                                       0 if images is None else images[0].shape[0]))

    def step(self) -> None:
        while self._outgoing:
            out = self._outgoing[0]
            allocation = self.sender.allocator.alloc(out.num_tokens)
            if allocation is None:
                break
            self._outgoing.popleft()
            bucket = self.sender.buffers.bucket(out.num_tokens)
            padded = {k: np.pad(v, ((0, bucket - v.shape[0]), (0, 0))) for k, v in out.rows.items()}
            self.sender.buffers.write(allocation, 0, padded, num_tokens=out.num_tokens)
            info = TransferInfo(TransferMode.EMBEDDING, out.num_tokens, aux={"image_tokens": out.image_tokens})
            self.sender.send(out.room, allocation, info)
        self.sender.progress(PROGRESS_S)
        for room in [r for r in self._rooms if self.sender.poll(r).terminal]:
            self.sender.forget(room)
            del self._rooms[room]

    def abort(self, request_id: str) -> None:
        for room, rid in list(self._rooms.items()):
            if rid == request_id:
                self._outgoing = collections.deque(o for o in self._outgoing if o.room != room)
                if not self.sender.poll(room).terminal:
                    self.sender.abort(room, "aborted by the router")

    def in_flight(self) -> int:
        return len(self._rooms)

    def health(self) -> dict:
        return {"free_blocks": self.sender.allocator.available_blocks(), "in_flight": len(self._rooms),
                "queued": len(self._outgoing)}

    def close(self) -> None:
        self.sender.close()


class EncodeService(WorkerService):
    def Encode(self, request, context):
        return self.acknowledge(self.loop.role.encode, request)


def encode_service(role: EncodeRole) -> EncodeService:
    return EncodeService(RoleLoop(role).start())
