"""Field sets and deterministic payloads shared by the tests and their helper processes.

Both sides of a transfer derive a room's data from its room id, so a receiver in another
process can check every row bit-exactly without the data crossing any channel but ours.
"""

from __future__ import annotations

import hashlib

import numpy as np

from transfer import TransferInfo, TransferMode, bucket_tokens, field

HIDDEN = 16
LEVELS = 3

EMBEDDING_FIELDS = (
    field("embeddings", (HIDDEN,), "float32"),
    field("deepstack", (LEVELS * HIDDEN,), "bfloat16"),
    field("fill_ids", (), "int32"),
    field("mrope_positions", (3,), "int32"),
)

KV_FIELDS = (
    field("k", (2, 2, 8), "bfloat16"),
    field("v", (2, 2, 8), "bfloat16"),
)

FIELD_SETS = {"embedding": EMBEDDING_FIELDS, "kv": KV_FIELDS}


def payload(fields, room: int, num_tokens: int) -> dict[str, np.ndarray]:
    """Distinct values in every row of every field, so a dropped or shifted row shows."""
    rng = np.random.default_rng(room)
    out = {}
    for f in fields:
        shape = (num_tokens, *f.shape)
        if np.issubdtype(f.np_dtype, np.integer):
            out[f.name] = rng.integers(0, 1 << 30, shape).astype(f.np_dtype)
        else:
            out[f.name] = rng.standard_normal(shape).astype(f.np_dtype)
    return out


def padded_payload(fields, room: int, num_tokens: int, block_size: int) -> dict[str, np.ndarray]:
    """The payload with zero rows up to its bucket, as an engine hands over bucketed outputs:
    writes then compile once per bucket instead of once per length."""
    rows = bucket_tokens(num_tokens, block_size)
    return {name: np.concatenate([a, np.zeros((rows - num_tokens, *a.shape[1:]), a.dtype)])
            for name, a in payload(fields, room, num_tokens).items()}


def digests(arrays: dict[str, np.ndarray], num_tokens: int) -> dict[str, str]:
    return {name: hashlib.sha256(np.ascontiguousarray(np.asarray(a)[:num_tokens]).tobytes()).hexdigest()
            for name, a in sorted(arrays.items())}


def send_rows(sender, config, room: int, tokens: int, start: int = 0, fields=KV_FIELDS) -> None:
    """Hands ``sender`` room ``room``'s payload of ``fields`` from token ``start`` on as arrays of
    their own (as prefill gives its KV): padded to their bucket, zero past the total."""
    allocation = sender.allocator.alloc(tokens)
    rows = {name: a[start:] for name, a in payload(fields, room, tokens).items()}
    padding = bucket_tokens(tokens - start, config.block_size) - (tokens - start)
    rows = {name: np.concatenate([a, np.zeros((padding, *a.shape[1:]), a.dtype)]) for name, a in rows.items()}
    sender.send(room, allocation, TransferInfo(TransferMode.KV, tokens, first_token=7), rows=rows, rows_start=start)


def send_pooled(sender, config, room: int, tokens: int, fields=KV_FIELDS) -> None:
    """Hands ``sender`` room ``room``'s payload of ``fields``, written in its pool first."""
    allocation = sender.allocator.alloc(tokens)
    sender.buffers.write(allocation, 0, padded_payload(fields, room, tokens, config.block_size), num_tokens=tokens)
    sender.send(room, allocation, TransferInfo(TransferMode.KV, tokens, first_token=7))
