"""Block buffers moved between disaggregated roles: embeddings encode -> prefill, KV prefill -> decode.

See docs/transfer.md. The package knows nothing of models: what moves is declared as fields.

The names below load on first use (PEP 562), so that importing one leaf module of the package
(``transfer.curve``, which every ZMQ surface of mmserve uses) does not load the sender, the
receiver and jax with it.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "Allocation": "allocator", "AllocationError": "allocator", "BlockAllocator": "allocator",
    "BlockBuffers": "block_buffers", "Chunk": "block_buffers", "bucket_tokens": "block_buffers",
    "BootstrapServer": "bootstrap", "TransferConfig": "config",
    "DataPlane": "data_plane", "DataPlaneError": "data_plane", "open_data_plane": "data_plane",
    "Field": "fields", "field": "fields", "TransferInfo": "messages", "TransferMode": "messages",
    "PollState": "poll", "Receiver": "receiver", "Received": "receiver_room", "Sender": "sender",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'transfer' has no attribute {name!r}")
    return getattr(importlib.import_module(f"transfer.{module}"), name)
