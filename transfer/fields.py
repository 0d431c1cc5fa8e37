"""Generic declaration of what a block buffer holds: a name, a per-token shape and a dtype.

The transfer package knows nothing of models; embeddings, deepstack rows, fill ids, MRoPE
positions and KV pages are all just fields. A ``Field`` is also a wire type: the receiver
sends its fields in the handshake and the sender refuses a room whose fields differ, so the
two sides can never disagree about the shapes they pull.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import numpy as np

import jax.numpy as jnp

DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "float16", "bfloat16", "float32")
"""32 bits at most: jax silently narrows 64-bit arrays unless x64 is enabled."""
MAX_FIELDS = 32
MAX_RANK = 6

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_.]*\Z")]
Dim = Annotated[int, msgspec.Meta(ge=1, le=1 << 24)]


class Field(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One array per token: the pool holds ``[num_blocks * block_size, *shape]`` of ``dtype``."""

    name: Name
    shape: Annotated[tuple[Dim, ...], msgspec.Meta(max_length=MAX_RANK)]
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"field {self.name!r}: dtype {self.dtype!r} is not one of {DTYPES}")

    @property
    def np_dtype(self) -> np.dtype:
        return jnp.dtype(self.dtype)


def field(name: str, shape: tuple[int, ...] | list[int], dtype: str | np.dtype) -> Field:
    """Builds a Field from any dtype spelling (``jnp.float32``, ``"float32"``, ``np.int32``)."""
    return Field(name, tuple(int(d) for d in shape), jnp.dtype(dtype).name)


def check_fields(fields: tuple[Field, ...]) -> None:
    if not 1 <= len(fields) <= MAX_FIELDS:
        raise ValueError(f"need 1..{MAX_FIELDS} fields, got {len(fields)}")
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        raise ValueError(f"field names must be unique: {names}")
