"""What the block buffers of each transfer hold, per token.

Embedding mode (encode -> prefill) carries the visual tokens only: each one's embedding and its
deepstack rows (levels x hidden, flattened), so every chunk carries the deepstack of its own
tokens. The prompt's token ids and MRoPE positions are not sent: prefill has the prompt and the
grids, and computes them itself. KV mode (prefill -> decode) carries each prompt token's keys and
values for all layers.
"""

from __future__ import annotations

from models.qwen3_vl_moe.config import ModelConfig
from transfer.fields import Field, field


def embedding_fields(config: ModelConfig, dtype) -> tuple[Field, ...]:
    hidden = config.text.hidden_size
    levels = len(config.vision.deepstack_visual_indexes)
    return field("embeddings", (hidden,), dtype), field("deepstack", (levels * hidden,), dtype)


def kv_fields(config: ModelConfig, dtype) -> tuple[Field, ...]:
    t = config.text
    shape = (t.num_hidden_layers, t.num_key_value_heads, t.head_dim)
    return field("k", shape, dtype), field("v", shape, dtype)
