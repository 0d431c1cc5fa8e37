"""Tensors of a ``.safetensors`` file as memory-mapped NumPy views, bfloat16 included.

Sharded loading reads each device's slice of a tensor, never the whole tensor: a view costs no
I/O until it is indexed, and indexing a view (even a transposed one) reads only the pages that
hold the slice. ``safe_open(framework="numpy")`` cannot do this for bf16 checkpoints (NumPy has no
bfloat16), so the format is read here: 8 bytes of header length, a JSON header of
``{key: {dtype, shape, data_offsets}}``, then the raw little-endian data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np

DTYPES = {
    "F64": np.dtype("float64"),
    "F32": np.dtype("float32"),
    "F16": np.dtype("float16"),
    "BF16": jnp.dtype("bfloat16"),
    "I64": np.dtype("int64"),
    "I32": np.dtype("int32"),
    "I16": np.dtype("int16"),
    "I8": np.dtype("int8"),
    "U8": np.dtype("uint8"),
    "BOOL": np.dtype("bool"),
}


class SafetensorsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        self._entries = header
        self._data_start = 8 + header_len
        self._bytes = np.memmap(self.path, dtype=np.uint8, mode="r")

    def keys(self) -> list[str]:
        return list(self._entries)

    def view(self, key: str) -> np.ndarray:
        """The tensor as a read-only view of the mapped file (no bytes read yet)."""
        entry = self._entries[key]
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        dtype = DTYPES[entry["dtype"]]
        size = dtype.itemsize * int(np.prod(entry["shape"], dtype=np.int64))
        if end - begin != size or self._data_start + end > len(self._bytes):
            raise ValueError(f"{self.path}: tensor {key!r} ({entry['dtype']} {entry['shape']}) needs {size} bytes at "
                             f"{begin}..{end}; the file is truncated or damaged")
        raw = self._bytes[self._data_start + begin : self._data_start + end]
        return raw.view(dtype.newbyteorder("<")).reshape(entry["shape"])
