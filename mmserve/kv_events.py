"""KV cache events: what a worker's prefix cache stored and evicted, published for routers.

The shape is vLLM's (and SGLang's, which follows it): each publication is an ``EventBatch`` of
``BlockStored`` (block hashes, the parent block's hash, the block's token ids, block size,
medium) and ``BlockRemoved`` events, msgpack-encoded (msgspec, tagged arrays), sent on a ZMQ PUB
socket as three frames ``[topic, sequence number (8 bytes big-endian), payload]``. A subscriber
that sees a gap in the sequence numbers asks the replay socket (ROUTER) for everything from the
first number it missed, by sending those 8 bytes; it gets ``[sequence, payload]`` pairs for each
buffered batch from there on, then ``[-1, b""]``. When the batches it asks for have left the
buffer (a router joining a worker that has run for a while), it gets a snapshot instead: one
batch ``[AllBlocksCleared, BlockStored of every block the cache holds]`` numbered as the last
batch it covers, which a subscriber applies as it would any batch (vLLM's included), and the
batches after it. A block is announced once, when it is cached: without the snapshot a router
that missed the announcement of a long-held block (a shared system prompt's) would never learn
of it. A publisher that started over at the same endpoints (its numbers go back) is reported to
the subscriber's caller (:class:`EventsLost`), whose picture of the worker's cache is then wrong
until it starts over.

Events carry token ids (prompt text, in effect), so both sockets are encrypted and authenticated
with CurveZMQ (libzmq's own): the publisher's key pair and the one client key it accepts are
derived from the cluster secret, so only processes holding it can subscribe. A block's hash is the
page key of :mod:`mmserve.engine.page_hash` (32 bytes), which also covers the pictures in the page.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time

import msgspec
import zmq

from transfer.curve import CurveKeys, admit_only_the_client, curve_client, curve_server

TOPIC = b"kv-events"
REPLAY_SEND_TIMEOUT_MS = 5000
END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base of the events; the tag names the kind on the wire."""


class BlockStored(KVCacheEvent):
    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[bytes]
    medium: str | None = None


class AllBlocksCleared(KVCacheEvent):
    """The worker's cache is empty: published first by every publisher (a worker restarted at the
    same endpoints starts empty), and understood from vLLM workers, which send it on a reset."""


Event = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None


class _SnapshotBatch(msgspec.Struct, array_like=True):
    """An ``EventBatch`` on the wire, its events already encoded (a snapshot's stored blocks)."""

    ts: float
    events: list[msgspec.Raw]


class BlockStoredHashes(BlockStored, tag="BlockStored"):
    """A ``BlockStored`` as a subscriber that needs only the hashes decodes it: its token ids stay
    encoded (a view of the payload), not a Python int each (~6x the bytes they take on the wire)."""

    token_ids: msgspec.Raw


class _HashesBatch(EventBatch):
    events: list[BlockStoredHashes | BlockRemoved | AllBlocksCleared]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(EventBatch)
_hashes_decoder = msgspec.msgpack.Decoder(_HashesBatch)
_CLEARED = msgspec.Raw(_encoder.encode(AllBlocksCleared()))


def starts_over(batch: EventBatch) -> bool:
    """The batch describes the cache from scratch: a publisher's first, or a snapshot."""
    return bool(batch.events) and isinstance(batch.events[0], AllBlocksCleared)


@dataclasses.dataclass(frozen=True)
class KVEventsConfig:
    """Where a worker publishes its KV events; off unless both endpoints are given."""

    kv_events_endpoint: str | None = None
    """ZMQ endpoint the PUB socket binds, e.g. tcp://127.0.0.1:5570 (default: none: no events)"""
    kv_events_replay_endpoint: str | None = None
    """ZMQ endpoint of the replay socket (ROUTER), e.g. tcp://127.0.0.1:5571; needed with
    --kv-events-endpoint"""
    kv_events_buffer: int = 10_000
    """event batches kept for replays"""
    kv_events_buffer_bytes: int = 64 << 20
    """bytes of event batches kept for replays, at most (a batch holds its pages' token ids, so
    its size follows the prompts')"""

    def __post_init__(self) -> None:
        if bool(self.kv_events_endpoint) != bool(self.kv_events_replay_endpoint):
            raise ValueError("kv_events_endpoint and kv_events_replay_endpoint go together")
        if self.kv_events_buffer < 1:
            raise ValueError(f"kv_events_buffer must be >= 1, got {self.kv_events_buffer}")
        if self.kv_events_buffer_bytes < 1:
            raise ValueError(f"kv_events_buffer_bytes must be >= 1, got {self.kv_events_buffer_bytes}")

    @property
    def enabled(self) -> bool:
        return bool(self.kv_events_endpoint)

    def publisher(self, keys: CurveKeys) -> KVEventPublisher | None:
        if not self.enabled:
            return None
        return KVEventPublisher(self.kv_events_endpoint, self.kv_events_replay_endpoint, keys, self.kv_events_buffer,
                                self.kv_events_buffer_bytes)


class KVEventPublisher:
    """Publishes batches on ``endpoint`` and answers replays on ``replay_endpoint`` (a thread of its
    own, so a subscriber is answered whether or not the engine is stepping); keeps the last
    ``buffer_batches`` for replays, within ``buffer_bytes``, and each block the cache holds (one
    encoded ``BlockStored``, ~100 bytes plus its token ids: bounded by the cache's pages) for the
    snapshot that answers a replay reaching back past the buffer."""

    def __init__(self, endpoint: str, replay_endpoint: str, keys: CurveKeys, buffer_batches: int = 10_000,
                 buffer_bytes: int = 64 << 20):
        self._context = zmq.Context()
        self._auth = admit_only_the_client(self._context, keys)
        self._pub = self._server_socket(zmq.PUB, keys)
        self._pub.bind(endpoint)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._replay = self._server_socket(zmq.ROUTER, keys)
        # A ROUTER drops what passes a peer's high-water mark without a word (a replay of the
        # whole buffer is 10x the default mark): mandatory routing makes a send wait for room
        # instead, and fail on a subscriber that is gone or stuck (the send timeout).
        self._replay.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._replay.setsockopt(zmq.SNDTIMEO, REPLAY_SEND_TIMEOUT_MS)
        self._replay.bind(replay_endpoint)
        self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self._buffer: collections.deque[tuple[int, bytes]] = collections.deque()
        self._held: dict[bytes, tuple[bytes | None, msgspec.Raw]] = {}
        """The blocks stored and not removed since the last ``AllBlocksCleared``: each one's parent
        and the ``BlockStored`` of it alone, in the order they were stored."""
        self._buffer_batches, self._buffer_bytes, self._buffered_bytes = buffer_batches, buffer_bytes, 0
        self._lock = threading.Lock()
        self._seq = -1
        self._closed = threading.Event()
        self.publish([AllBlocksCleared()])  # first: a replay answered before it would find no batch at all
        self._thread = threading.Thread(target=self._serve_replays, name="kv-events replay", daemon=True)
        self._thread.start()

    def publish(self, events: list[Event]) -> None:
        if not events:
            return
        payload = _encoder.encode(EventBatch(time.time(), events))
        with self._lock:
            self._hold(events)
            self._seq += 1
            self._buffer.append((self._seq, payload))
            self._buffered_bytes += len(payload)
            while len(self._buffer) > self._buffer_batches or (
                    self._buffered_bytes > self._buffer_bytes and len(self._buffer) > 1):
                self._buffered_bytes -= len(self._buffer.popleft()[1])
            seq = self._seq
        self._pub.send_multipart([TOPIC, seq.to_bytes(8, "big", signed=True), payload])

    def _hold(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                hashes, size = event.block_hashes, event.block_size
                for i, block in enumerate(hashes):
                    parent = event.parent_block_hash if i == 0 else hashes[i - 1]
                    alone = event if len(hashes) == 1 else BlockStored(
                        [block], parent, event.token_ids[i * size:(i + 1) * size], size, event.lora_id, event.medium)
                    self._held[block] = (parent, msgspec.Raw(_encoder.encode(alone)))
            elif isinstance(event, BlockRemoved):
                for block in event.block_hashes:
                    self._held.pop(block, None)
            elif isinstance(event, AllBlocksCleared):
                self._held.clear()

    def buffered(self) -> tuple[int, int]:
        """Batches and bytes held for replays."""
        with self._lock:
            return len(self._buffer), self._buffered_bytes

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self._pub.close(linger=0)
        self._auth.stop()
        self._context.term()

    def _server_socket(self, kind: int, keys: CurveKeys) -> zmq.Socket:
        return curve_server(self._context.socket(kind), keys)

    def _serve_replays(self) -> None:
        poller = zmq.Poller()
        poller.register(self._replay, zmq.POLLIN)
        while not self._closed.is_set():
            if not poller.poll(100):
                continue
            frames = self._replay.recv_multipart()
            identity, start = frames[0], frames[-1]
            if len(start) != 8:
                continue  # not a request: ignored
            first = int.from_bytes(start, "big", signed=True)
            with self._lock:
                held = None
                if first < self._buffer[0][0]:  # gone from the buffer: the cache as it is now instead
                    held, covered = dict(self._held), self._seq
                else:
                    batches = [(seq, payload) for seq, payload in self._buffer if seq >= first]
            if held is not None:  # encoded outside the lock, which the engine's publish takes
                batches = [(covered, _encoder.encode(_SnapshotBatch(time.time(), [_CLEARED, *_parents_first(held)])))]
            try:
                for seq, payload in batches:
                    self._replay.send_multipart([identity, b"", seq.to_bytes(8, "big", signed=True), payload])
                self._replay.send_multipart([identity, b"", END_OF_REPLAY, b""])
            except zmq.ZMQError:  # gone (EHOSTUNREACH) or not reading (EAGAIN): it asks again
                continue
        self._replay.close(linger=0)


def _parents_first(held: dict[bytes, tuple[bytes | None, msgspec.Raw]]) -> list[msgspec.Raw]:
    """The held blocks' ``BlockStored``, each after its parent when the parent is held: a parent
    evicted and stored again comes after its children in storing order, and a subscriber that
    builds a tree (a radix index) drops a block whose parent it has not seen."""
    out, placed = [], set()
    for block in held:
        chain = []
        while block is not None and block in held and block not in placed:
            placed.add(block)
            chain.append(block)
            block = held[block][0]
        out.extend(held[b][1] for b in reversed(chain))
    return out


class EventsLost(Exception):
    """Batches were lost for good (a publisher that started over at the same endpoints, or a
    replay missing some): what was known of the worker's cache is wrong. ``batches`` are those
    received after the loss, in order, to apply once that is forgotten."""

    def __init__(self, reason: str, batches: list[tuple[int, EventBatch]]):
        super().__init__(reason)
        self.batches = batches


class KVEventSubscriber:
    """Receives a publisher's batches in order: a gap in the sequence numbers is filled from the
    replay socket before the batch that revealed it is handed on."""

    def __init__(self, endpoint: str, replay_endpoint: str, keys: CurveKeys, replay_timeout_s: float = 2.0,
                 token_ids: bool = True):
        """``token_ids=False``: each ``BlockStored`` comes as a :class:`BlockStoredHashes`, its token
        ids left encoded, for a subscriber that reads only the hashes (the router's index): a
        replay of a full buffer then takes about its bytes in memory, not ~6x."""
        self._decode = _decoder.decode if token_ids else _hashes_decoder.decode
        self._context = zmq.Context()
        self._keys = keys
        self._sub = self._client_socket(zmq.SUB, keys)
        self._sub.setsockopt(zmq.SUBSCRIBE, TOPIC)
        self._sub.connect(endpoint)
        self._replay_endpoint = replay_endpoint
        self._replay = self._replay_socket()
        self.replay_timeout_s = replay_timeout_s
        """How long a replay may go quiet between two of its messages."""
        self.last_seq = -1
        self.replays = 0

    def receive(self, timeout_s: float) -> list[tuple[int, EventBatch]]:
        """The next batches (with their sequence numbers), gap filled; [] after ``timeout_s``.
        A gap reaching back past the publisher's buffer is filled by a snapshot, a batch that
        starts over (``AllBlocksCleared`` first) numbered as the last batch it covers, which may
        be past the batches handed on after it: applied again on the snapshot, they leave the
        picture it gave once the last of them is applied. Raises EventsLost when a gap cannot be
        filled, TimeoutError when the replay does not answer (the batch that showed the gap is
        asked for again with the next one)."""
        if not self._sub.poll(int(timeout_s * 1000)):
            return []
        _, seq_bytes, payload = self._sub.recv_multipart()
        seq = int.from_bytes(seq_bytes, "big", signed=True)
        lost = None
        if seq <= self.last_seq:  # a PUB socket never repeats itself: a new publisher started from 0
            lost, self.last_seq = f"the publisher started over at {seq} after {self.last_seq}", -1
        first = self.last_seq + 1
        out = self.replay(first, self.replay_timeout_s, before=seq) if seq > first else []
        fresh = [i for i, (_, batch) in enumerate(out) if starts_over(batch)]
        if fresh:  # what came before it no longer matters
            out = out[fresh[-1]:]
            first = out[0][0] + 1
            out = out[:1] + [(s, b) for s, b in out[1:] if first <= s < seq]
            got = [s for s, _ in out[1:]]
        else:
            out = [(s, b) for s, b in out if first <= s < seq]
            got = [s for s, _ in out]
        if got != list(range(first, seq)):
            lost = lost or f"batches {first}..{seq - 1} were missing from the publisher's replay"
        out.append((seq, self._decode(payload)))
        self.last_seq = seq
        if lost is not None:
            raise EventsLost(lost, out)
        return out

    def replay(self, first: int, timeout_s: float, before: int | None = None) -> list[tuple[int, EventBatch]]:
        """The publisher's buffered batches from ``first`` on (each replay message within
        ``timeout_s``); with ``before``, those numbered from it on are read but not decoded (the
        PUB socket hands them on), but for the answer's first (a snapshot covering them)."""
        self.replays += 1
        self._replay.send_multipart([b"", first.to_bytes(8, "big", signed=True)])
        out, answered = [], False
        while self._replay.poll(int(timeout_s * 1000)):
            _, seq_bytes, payload = self._replay.recv_multipart()
            if seq_bytes == END_OF_REPLAY:
                return out
            seq = int.from_bytes(seq_bytes, "big", signed=True)
            if before is None or seq < before or not answered:
                out.append((seq, self._decode(payload)))
            answered = True
        # The rest of this answer may still come: a new socket, so no later replay reads it as its own.
        self._replay.close(linger=0)
        self._replay = self._replay_socket()
        raise TimeoutError(f"no end of replay within {timeout_s} s")

    def _replay_socket(self) -> zmq.Socket:
        socket = self._client_socket(zmq.DEALER, self._keys)
        socket.connect(self._replay_endpoint)
        return socket

    def close(self) -> None:
        self._sub.close(linger=0)
        self._replay.close(linger=0)
        self._context.term()

    def _client_socket(self, kind: int, keys: CurveKeys) -> zmq.Socket:
        return curve_client(self._context.socket(kind), keys)
