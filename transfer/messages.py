"""Typed control messages and the codec that validates them on receipt.

Everything on a control socket is one msgpack-encoded, tagged msgspec Struct: no pickle, no
dicts with string keys. Decoding checks the size cap first, then types and bounds (msgspec
``Meta``), then each Struct's own invariants, so a handler only ever sees well-formed messages
and anything else becomes a ``ProtocolError`` that the handler turns into an ``Error`` reply.
"""

from __future__ import annotations

import enum
from typing import Annotated, Generic, TypeVar

import msgspec

from transfer.block_buffers import Chunk
from transfer.fields import Field, MAX_FIELDS

Id = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
Count = Annotated[int, msgspec.Meta(ge=1, le=1 << 40)]
MAX_NAME_LENGTH = 128
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_LENGTH)]
Text = Annotated[str, msgspec.Meta(max_length=512)]
AuxKey = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
_HOST_PORT = r"(\[[0-9A-Fa-f:.%]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}"
ControlAddress = Annotated[str, msgspec.Meta(max_length=512, pattern=f"^tcp://{_HOST_PORT}\\Z")]
"""A ZMQ endpoint a peer dials: anything else (a mistyped advertise host) made ``connect`` raise in
the receiver's loop."""
DataAddress = Annotated[str, msgspec.Meta(max_length=512, pattern=f"^((tcp://)?{_HOST_PORT}|ipc:///\\S+)\\Z")]
"""A data plane's address: the zmq plane's endpoint (TCP, or a Unix socket in a private directory),
or the jax transfer server's host:port."""
AuxValue = int | float | Text | Annotated[list[int | float], msgspec.Meta(max_length=1024)]


class ErrorCode(enum.Enum):
    MALFORMED = "malformed"
    OVERSIZED = "oversized"
    UNAUTHENTICATED = "unauthenticated"
    UNKNOWN_ROOM = "unknown_room"
    OUT_OF_ORDER = "out_of_order"
    MISMATCH = "mismatch"


class TransferMode(enum.Enum):
    """EMBEDDING: encode -> prefill (embeddings, deepstack, ...). KV: prefill -> decode (pages + first token)."""

    EMBEDDING = "embedding"
    KV = "kv"


class TransferInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a room carries besides its arrays: the real length and the small per-request record.

    ``aux`` holds model-side values the transfer does not interpret (rope delta, grid sizes).
    In KV mode ``first_token`` is the token prefill sampled; embedding mode has none.
    """

    mode: TransferMode
    total_tokens: Count
    aux: Annotated[dict[AuxKey, AuxValue], msgspec.Meta(max_length=64)] = {}
    first_token: Annotated[int, msgspec.Meta(ge=0)] | None = None

    def __post_init__(self) -> None:
        if (self.mode is TransferMode.KV) != (self.first_token is not None):
            raise ValueError("KV mode needs first_token and embedding mode must not have one")


class SenderEndpoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where a sender listens: its control socket and the data plane its arrays are pulled from.

    ``incarnation`` tells this sender from an earlier or later one published under the same name
    (a worker restarted as its pod keeps its name): random per ``Sender``, never 0.
    """

    name: Name
    control: ControlAddress
    data_plane: Name
    data_address: DataAddress
    incarnation: Id = 0


class Publish(msgspec.Struct, frozen=True, tag="publish", forbid_unknown_fields=True):
    endpoint: SenderEndpoint


class Withdraw(msgspec.Struct, frozen=True, tag="withdraw", forbid_unknown_fields=True):
    name: Name


class Lookup(msgspec.Struct, frozen=True, tag="lookup", forbid_unknown_fields=True):
    name: Name


class Published(msgspec.Struct, frozen=True, tag="published", forbid_unknown_fields=True):
    """Acknowledges a Publish or a Withdraw."""

    name: Name


class Found(msgspec.Struct, frozen=True, tag="found", forbid_unknown_fields=True):
    endpoint: SenderEndpoint


class NotFound(msgspec.Struct, frozen=True, tag="not_found", forbid_unknown_fields=True):
    name: Name


class PostedPull(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The uuid a receiver pulls a room's first chunk under, before it is offered: the tokens
    ``[start_token, start_token + num_tokens)``, the whole rest of the room, in one chunk."""

    uuid: Id
    num_tokens: Count


class Register(msgspec.Struct, frozen=True, tag="register", forbid_unknown_fields=True):
    """The receiver's half of the handshake: who it is, what it expects, how much room it holds.

    ``incarnation``, when given, is the sender incarnation the room was opened with; another
    incarnation of that sender (it restarted since) refuses the room at once rather than taking
    it for an early registration, since it will never send it.

    ``start_token``: the receiver already holds the room's first tokens (decode found that prefix
    in its own cache), so the sender offers from there; it must leave at least one token to send.

    ``posted``: the receiver knows the room's length and will pull its first chunk under this
    uuid as soon as the sender answers ``Registered``, before the chunk is offered. The sender
    offers that chunk under it when the chunk is the one posted, and otherwise (another length,
    or the room ends first) offers zero rows of the posted size under it, so that no posted pull
    is left waiting: a pull cannot be cancelled.
    """

    room: Id
    mode: TransferMode
    block_size: Count
    fields: Annotated[tuple[Field, ...], msgspec.Meta(min_length=1, max_length=MAX_FIELDS)]
    capacity_tokens: Count
    incarnation: Id | None = None
    start_token: Id = 0
    posted: PostedPull | None = None

    def __post_init__(self) -> None:
        if self.posted is not None and self.posted.num_tokens > self.capacity_tokens:
            raise ValueError(f"a pull posted for {self.posted.num_tokens} tokens, more than the "
                             f"{self.capacity_tokens} the first chunk may carry")


class Registered(msgspec.Struct, frozen=True, tag="registered", forbid_unknown_fields=True):
    room: Id


class Ready(msgspec.Struct, frozen=True, tag="ready", forbid_unknown_fields=True):
    """A chunk is offered on the data plane under ``uuid``; pull it, then answer ``Pulled``."""

    room: Id
    uuid: Id
    chunk: Chunk
    info: TransferInfo

    def __post_init__(self) -> None:
        c = self.chunk
        if c.offset < 0 or c.num_tokens < 1 or c.padded_tokens < c.num_tokens:
            raise ValueError(f"bad chunk {c}")
        if c.offset + c.num_tokens > self.info.total_tokens:
            raise ValueError(f"chunk {c} runs past the {self.info.total_tokens} tokens of the room")


class Pulled(msgspec.Struct, frozen=True, tag="pulled", forbid_unknown_fields=True):
    room: Id
    uuid: Id


class Resume(msgspec.Struct, frozen=True, tag="resume", forbid_unknown_fields=True):
    """The receiver holds ``from_token`` tokens and has allocated ``capacity_tokens`` more."""

    room: Id
    from_token: Count
    capacity_tokens: Count


class Abort(msgspec.Struct, frozen=True, tag="abort", forbid_unknown_fields=True):
    room: Id
    reason: Text = ""


class Decline(msgspec.Struct, frozen=True, tag="decline", forbid_unknown_fields=True):
    """The receiver will never take the room: its request ended before it registered (decode
    dropped a request still waiting for pages). The sender ends the room at once instead of
    holding its rows until the bootstrap timeout; a room its role has not added yet is
    remembered as ended, so the role's ``add`` gives it FAILED. Refused for a room another
    receiver registered for."""

    room: Id
    reason: Text = ""


class Heartbeat(msgspec.Struct, frozen=True, tag="heartbeat", forbid_unknown_fields=True):
    seq: Id


class HeartbeatAck(msgspec.Struct, frozen=True, tag="heartbeat_ack", forbid_unknown_fields=True):
    seq: Id


class Error(msgspec.Struct, frozen=True, tag="error", forbid_unknown_fields=True):
    code: ErrorCode
    detail: Text
    room: Id | None = None


RegistryRequest = Publish | Withdraw | Lookup
RegistryReply = Published | Found | NotFound | Error
ToSender = Register | Pulled | Resume | Abort | Decline | Heartbeat | Error
ToReceiver = Registered | Ready | Abort | HeartbeatAck | Error

M = TypeVar("M")


class ProtocolError(Exception):
    """A control message that must be answered with an ``Error`` and otherwise ignored."""

    def __init__(self, code: ErrorCode, detail: str, room: int | None = None) -> None:
        super().__init__(f"{code.value}: {detail}")
        self.code = code
        self.detail = detail[:500]
        self.room = room

    def reply(self) -> Error:
        return Error(self.code, self.detail, self.room)


class Codec(Generic[M]):
    """Encodes any message; decodes only the union one endpoint accepts, within the size cap."""

    def __init__(self, accepts: object, max_bytes: int) -> None:
        self._decoder = msgspec.msgpack.Decoder(accepts)
        self._encoder = msgspec.msgpack.Encoder()
        self.max_bytes = max_bytes

    def encode(self, message: msgspec.Struct) -> bytes:
        return self._encoder.encode(message)

    def decode(self, data: bytes) -> M:
        if len(data) > self.max_bytes:
            raise ProtocolError(ErrorCode.OVERSIZED, f"{len(data)} bytes > cap {self.max_bytes}")
        try:
            return self._decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise ProtocolError(ErrorCode.MALFORMED, str(error)) from None
