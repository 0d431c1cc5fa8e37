"""Prefill then decode through the paged KV cache equals the no-cache forward on the whole sequence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hf_reference import image_prompt, random_patches
from models.qwen3_vl_moe import stages
from models.qwen3_vl_moe.kv_cache import KVCache
from models.qwen3_vl_moe.multimodal import place_visual
from models.qwen3_vl_moe.rope_index import decode_positions, get_rope_index

PAGE = 4
MAX_PAGES = 12


def _sequences(model, rng):
    grids = np.array([[1, 4, 6]])
    patches = random_patches(rng, grids)
    return [
        dict(prompt=image_prompt(rng, grids), grids=grids, patches=patches, image=model.encode(patches, grids)),
        dict(prompt=list(rng.integers(0, 1000, 5)), grids=None, patches=None, image=None),
        dict(prompt=list(rng.integers(0, 1000, 13)), grids=None, patches=None, image=None),
    ]


def test_batched_prefill_and_decode_match_forward(base_model, rng):
    model, config = base_model, base_model.config
    seqs = _sequences(model, rng)
    steps = 6
    for s in seqs:
        s["continuation"] = list(rng.integers(0, 1000, steps))
        s["reference"] = np.asarray(model.forward(s["prompt"] + s["continuation"], s["patches"], s["grids"]))

    # Non-contiguous, interleaved pages: sequence b owns pages b+1, b+1+3, ... in reverse order.
    num_pages = 3 * MAX_PAGES + 1
    tables = np.zeros((3, MAX_PAGES), np.int32)
    for b in range(3):
        tables[b] = (np.arange(MAX_PAGES) * 3 + b + 1)[::-1]
    cache = KVCache.create(config.text, num_pages, PAGE)

    t = max(len(s["prompt"]) for s in seqs)
    ids = np.zeros((3, t), np.int32)
    positions = np.zeros((3, 3, t), np.int32)
    embeds = np.zeros((3, t, config.text.hidden_size), np.float32)
    mask = np.zeros((3, t), bool)
    deepstack = np.zeros((len(config.vision.deepstack_visual_indexes), 3, t, config.text.hidden_size), np.float32)
    for b, s in enumerate(seqs):
        n = len(s["prompt"])
        ids[b, :n] = s["prompt"]
        pos, s["delta"] = get_rope_index(s["prompt"], config, s["grids"])
        positions[b, :, :n] = pos
        placed = place_visual(s["prompt"], config, s["image"])
        if placed is not None:
            embeds[b, :n], mask[b, :n], deepstack[:, b, :n] = placed.embeds, placed.mask, placed.deepstack
    lengths = np.array([len(s["prompt"]) for s in seqs], np.int32)
    logits, cache = _prefill(model.module, model.params, ids, positions, cache, tables, np.zeros(3, np.int32),
                             lengths, embeds, mask, deepstack)
    for b, s in enumerate(seqs):
        np.testing.assert_allclose(logits[b], s["reference"][lengths[b] - 1], atol=1e-4)

    context = lengths.copy()
    for step in range(steps):
        tokens = np.array([s["continuation"][step] for s in seqs], np.int32)
        pos = decode_positions(context, np.array([s["delta"] for s in seqs]))
        logits, cache = _decode(model.module, model.params, tokens, pos, cache, tables, context)
        for b, s in enumerate(seqs):
            np.testing.assert_allclose(logits[b], s["reference"][context[b]], atol=1e-4)
        context += 1


def test_chunked_prefill_continues_the_cache(base_model, rng):
    model, config = base_model, base_model.config
    prompt = list(rng.integers(0, 1000, 11))
    reference = np.asarray(model.forward(prompt))
    cache = KVCache.create(config.text, 8, PAGE)
    table = np.array([[5, 2, 7, 1, 0, 0]], np.int32)
    pos, _ = get_rope_index(prompt, config)
    for start, end in ((0, 6), (6, 11)):
        chunk = np.zeros((1, 8), np.int32)
        chunk[0, : end - start] = prompt[start:end]
        chunk_pos = np.zeros((1, 3, 8), np.int32)
        chunk_pos[0, :, : end - start] = pos[:, start:end]
        logits, cache = _prefill(model.module, model.params, chunk, chunk_pos, cache, table,
                                 np.array([start], np.int32), np.array([end - start], np.int32))
        np.testing.assert_allclose(logits[0], reference[end - 1], atol=1e-4)


def test_padding_rows_write_nothing(base_model):
    config = base_model.config
    cache = KVCache.create(config.text, 4, PAGE)
    before = np.asarray(cache.k)
    _, cache = _decode(base_model.module, base_model.params, np.array([3, 4], np.int32),
                       np.zeros((2, 3), np.int32), cache, np.array([[1], [2]], np.int32), np.array([-1, -1], np.int32))
    np.testing.assert_array_equal(np.asarray(cache.k), before)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _prefill(module, params, ids, positions, cache, tables, starts, lengths, embeds=None, mask=None, deepstack=None):
    return stages.prefill(module, params, ids, positions, cache, tables, starts, lengths,
                          None if embeds is None else jnp.asarray(embeds), mask, deepstack)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _decode(module, params, tokens, positions, cache, tables, context):
    return stages.decode(module, params, tokens, positions, cache, tables, context)
