"""What the block buffers of each transfer hold, per token.

Embedding mode (encode -> prefill) carries the visual tokens only: each one's embedding and its
deepstack rows (levels x hidden, flattened), so every chunk carries the deepstack of its own
tokens. The prompt's token ids and MRoPE positions are not sent: prefill has the prompt and the
grids, and computes them itself. KV mode (prefill -> decode) carries each prompt token's keys and
values for all layers.
"""

from __future__ import annotations

from mmserve.engine.config import EngineConfig
from models.qwen3_vl_moe.config import ModelConfig
from transfer.block_buffers import bucket_list
from transfer.config import TransferConfig
from transfer.fields import Field, field


def embedding_fields(config: ModelConfig, dtype) -> tuple[Field, ...]:
    hidden = config.text.hidden_size
    levels = len(config.vision.deepstack_visual_indexes)
    return field("embeddings", (hidden,), dtype), field("deepstack", (levels * hidden,), dtype)


def kv_fields(config: ModelConfig, dtype) -> tuple[Field, ...]:
    t = config.text
    shape = (t.num_hidden_layers, t.num_key_value_heads, t.head_dim)
    return field("k", shape, dtype), field("v", shape, dtype)


def room_rows(transfer: TransferConfig, engine: EngineConfig) -> list[int]:
    """The row counts a room's tokens are padded to (the transfer's buckets; a room holds at most
    a prompt): the shapes a worker's engine compiles, on every process of the role alike, the
    programs for that take rows arriving in a room (visual rows on prefill, KV on decode) or read
    rows to send in one (prefill's KV reads, offered as they are)."""
    return bucket_list(engine.max_model_len, transfer.block_size, transfer.buffer_blocks)
