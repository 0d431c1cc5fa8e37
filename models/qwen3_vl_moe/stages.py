"""The three stages the engine jits, as pure functions of (params, inputs, cache).

``model`` (a :class:`Qwen3VLMoe`, hashable) is meant to be bound statically; every array argument
has a static shape for a given bucket. The cache argument is the one to donate.
"""

from __future__ import annotations

import jax.numpy as jnp

from models.qwen3_vl_moe.kv_cache import KVCache
from models.qwen3_vl_moe.modeling import Qwen3VLMoe


def encode(model: Qwen3VLMoe, params, patches, interp_idx, interp_weight, rope_pos, segment_ids):
    """Vision tower: patches [N, C*T*P*P] -> (embeddings [N/4, H], deepstack [levels, N/4, H])."""
    return model.apply(
        {"params": params}, patches, interp_idx, interp_weight, rope_pos, segment_ids, method=Qwen3VLMoe.encode
    )


def input_embeddings(model: Qwen3VLMoe, params, input_ids, mm_embeds=None, mm_mask=None):
    """Token embeddings with visual embeddings placed where ``mm_mask`` is set."""
    embeds = model.apply({"params": params}, input_ids, method=Qwen3VLMoe.embed)
    if mm_embeds is None:
        return embeds
    return jnp.where(mm_mask[..., None], mm_embeds.astype(embeds.dtype), embeds)


def run_decoder(model, params, embeds, positions, cache, page_tables, starts, lengths, deepstack=None):
    """Decoder over chunks -> (normed hidden [B, T, H], cache)."""
    return model.apply(
        {"params": params}, embeds, positions, cache, page_tables, starts, lengths, deepstack,
        method=Qwen3VLMoe.decoder,
    )


def logits(model: Qwen3VLMoe, params, hidden):
    return model.apply({"params": params}, hidden, method=Qwen3VLMoe.logits)


def prefill(
    model: Qwen3VLMoe,
    params,
    input_ids,
    positions,
    cache: KVCache,
    page_tables,
    starts,
    lengths,
    mm_embeds=None,
    mm_mask=None,
    deepstack=None,
):
    """One chunk of prompt per row -> (logits at each row's last real token [B, V], cache).

    input_ids [B, T]; positions [B, 3, T]; page_tables [B, max_pages]; starts [B] tokens already
    cached; lengths [B] real tokens in this chunk. mm_embeds [B, T, H] with mm_mask [B, T] put
    visual embeddings in place; deepstack [levels, B, T, H] is zero at text tokens.
    """
    embeds = input_embeddings(model, params, input_ids, mm_embeds, mm_mask)
    hidden, cache = run_decoder(model, params, embeds, positions, cache, page_tables, starts, lengths, deepstack)
    last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    return logits(model, params, last), cache


def decode(model: Qwen3VLMoe, params, input_ids, positions, cache: KVCache, page_tables, context_lens):
    """One token per row -> (logits [B, V], cache).

    input_ids [B]; positions [B, 3]; context_lens [B] tokens already cached (the new token is
    written at that index); a row with context_lens < 0 is padding and writes nothing.
    """
    starts = jnp.maximum(context_lens, 0)
    lengths = (context_lens >= 0).astype(jnp.int32)
    embeds = input_embeddings(model, params, input_ids[:, None])
    hidden, cache = run_decoder(model, params, embeds, positions[:, :, None], cache, page_tables, starts, lengths)
    return logits(model, params, hidden[:, 0]), cache
