"""Typed control messages: round trips, one TransferInfo for both modes, rejection on decode."""

from __future__ import annotations

import msgspec
import pytest

from transfer import TransferInfo, TransferMode, field
from transfer.block_buffers import Chunk
from transfer.messages import (Abort, Codec, Error, ErrorCode, Found, Heartbeat, HeartbeatAck, Lookup, NotFound,
                               ProtocolError, Publish, Published, Pulled, Ready, Register, Registered, RegistryReply,
                               RegistryRequest, Resume, SenderEndpoint, ToReceiver, ToSender, Withdraw)
from transfer_payload import EMBEDDING_FIELDS

ENDPOINT = SenderEndpoint("encode-0", "tcp://127.0.0.1:5000", "jax", "127.0.0.1:5001")
EMBEDDING = TransferInfo(TransferMode.EMBEDDING, 300, {"rope_delta": -7, "grid_thw": [1, 16, 16]})
KV = TransferInfo(TransferMode.KV, 300, first_token=151643)

ROUND_TRIPS = [
    (ToSender, Register(1, TransferMode.KV, 16, EMBEDDING_FIELDS, 1024)),
    (ToSender, Pulled(1, 99)), (ToSender, Resume(1, 256, 64)), (ToSender, Abort(1, "why")),
    (ToSender, Heartbeat(3)), (ToSender, Error(ErrorCode.MISMATCH, "no", 1)),
    (ToReceiver, Registered(1)), (ToReceiver, Ready(1, 99, Chunk(0, 256, 256), EMBEDDING)),
    (ToReceiver, Ready(2, 98, Chunk(256, 44, 48), KV)), (ToReceiver, HeartbeatAck(3)),
    (RegistryRequest, Publish(ENDPOINT)), (RegistryRequest, Lookup("encode-0")),
    (RegistryRequest, Withdraw("encode-0")), (RegistryReply, Found(ENDPOINT)),
    (RegistryReply, NotFound("x")), (RegistryReply, Published("x")),
]


@pytest.mark.parametrize("union,message", ROUND_TRIPS, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(union, message):
    codec = Codec(union, 1 << 16)
    assert codec.decode(codec.encode(message)) == message


def test_transfer_info_ties_first_token_to_kv_mode():
    with pytest.raises(ValueError):
        TransferInfo(TransferMode.KV, 10)
    with pytest.raises(ValueError):
        TransferInfo(TransferMode.EMBEDDING, 10, first_token=3)


def test_encoding_is_msgpack_not_pickle():
    data = Codec(ToReceiver, 1 << 16).encode(Ready(1, 2, Chunk(0, 1, 4), KV))
    assert msgspec.msgpack.decode(data)["type"] == "ready"


@pytest.mark.parametrize("raw,code", [
    (b"", ErrorCode.MALFORMED),
    (msgspec.msgpack.encode({"type": "ready", "room": 1, "uuid": 2, "chunk": {"offset": 0, "num_tokens": 5,
     "padded_tokens": 4}, "info": {"mode": "embedding", "total_tokens": 5}}), ErrorCode.MALFORMED),
    (msgspec.msgpack.encode({"type": "ready", "room": 1, "uuid": 2, "chunk": {"offset": 4, "num_tokens": 4,
     "padded_tokens": 4}, "info": {"mode": "embedding", "total_tokens": 5}}), ErrorCode.MALFORMED),
    (msgspec.msgpack.encode({"type": "registered", "room": 1, "extra": 1}), ErrorCode.MALFORMED),
    (msgspec.msgpack.encode({"type": "registered", "room": 2 ** 63}), ErrorCode.MALFORMED),
    (b"\x00" * 2000, ErrorCode.OVERSIZED),
])
def test_decode_rejects_with_the_code_to_answer(raw, code):
    with pytest.raises(ProtocolError) as caught:
        Codec(ToReceiver, 1000).decode(raw)
    assert caught.value.code is code and caught.value.reply().code is code


def test_field_declarations_are_validated_on_the_wire():
    good = msgspec.to_builtins(Register(1, TransferMode.KV, 4, (field("k", (2, 8), "bfloat16"),), 4))
    codec = Codec(ToSender, 1 << 16)
    assert codec.decode(msgspec.msgpack.encode(good)).fields[0].shape == (2, 8)
    for bad in ({"name": "k", "shape": [2, 8], "dtype": "object"}, {"name": "k", "shape": [0], "dtype": "int8"},
                {"name": "bad name!", "shape": [1], "dtype": "int8"}):
        with pytest.raises(ProtocolError):
            codec.decode(msgspec.msgpack.encode({**good, "fields": [bad]}))
