"""The colocated backend decodes a file once for the requests bringing it at once (the ``n``
choices of one request), each still getting a prompt of its own; a file that will not decode
fails every one of them the same way."""

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from mmserve.engine.config import EngineConfig
from mmserve.engine.encoder import Encoder
from mmserve.engine.inputs import EncodedMedia, PreparedPrompt, Visual, with_pixels
from mmserve.engine.rejected import RequestRejected
from mmserve.serving.picture_decodes import PictureDecodes
from models.qwen3_vl_moe import load_model


@pytest.fixture(scope="module")
def encoder():
    return Encoder(load_model("tiny"), EngineConfig(precompile=False))


def picture(encoder: Encoder, seed: int, side: int = 256) -> Visual:
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Visual(encoder.model.processor(images=[image])["image_grid_thw"], source=EncodedMedia("image", buffer.getvalue()))


def test_prompts_bringing_the_same_file_at_once_decode_it_once(encoder):
    decodes = PictureDecodes(encoder)
    shared, other = picture(encoder, 1), picture(encoder, 2)
    prompts = [PreparedPrompt([1, 2, 3], [shared], []) for _ in range(6)] + [PreparedPrompt([4], [shared, other], [])]
    before = encoder.pictures_decoded

    async def all_at_once():
        return await asyncio.gather(*(decodes.with_pixels(p) for p in prompts))

    try:
        out = asyncio.run(all_at_once())
    finally:
        decodes.close()
    assert encoder.pictures_decoded - before == 2  # one per distinct file
    want = {v.content_key: with_pixels(v, encoder.model.processor).pixel_values for v in (shared, other)}
    for prompt, done in zip(prompts, out):
        assert done.token_ids == prompt.token_ids and [v.content_key for v in done.images] == \
            [v.content_key for v in prompt.images]
        assert all(np.array_equal(v.pixel_values, want[v.content_key]) for v in done.images)


def test_a_file_that_will_not_decode_fails_every_prompt_bringing_it(encoder):
    good = picture(encoder, 3)
    broken = Visual(good.grid_thw, source=EncodedMedia("image", good.source.data[:200]))  # truncated
    decodes = PictureDecodes(encoder)

    async def both():
        return await asyncio.gather(*(decodes.with_pixels(PreparedPrompt([1], [broken], [])) for _ in range(2)),
                                    return_exceptions=True)

    try:
        outcomes = asyncio.run(both())
    finally:
        decodes.close()
    assert all(isinstance(outcome, RequestRejected) for outcome in outcomes)


def test_a_picture_whose_embeddings_are_cached_is_not_decoded(encoder):
    """A later turn about a picture: its embeddings are in the engine's cache, so it goes on as the
    client's file, and the engine uses the cached rows (or decodes it, evicted by then)."""
    seen, fresh = picture(encoder, 4, side=64), picture(encoder, 5, side=64)
    encoder.encode(encoder.decoded(seen))
    decodes = PictureDecodes(encoder)
    before = encoder.pictures_decoded
    try:
        done = asyncio.run(decodes.with_pixels(PreparedPrompt([1], [seen, fresh], [])))
    finally:
        decodes.close()
    assert encoder.pictures_decoded - before == 1
    assert done.images[0].pixel_values is None and done.images[0].content_key == seen.content_key
    assert done.images[1].pixel_values is not None


def test_a_decode_whose_clients_all_left_before_it_started_is_dropped(encoder):
    """A client sending pictures and leaving at once, over and over, freed its admission slot each
    time while every decode stayed queued behind the pool's threads."""
    decodes = PictureDecodes(encoder, threads=1)
    first, queued = picture(encoder, 20, side=1536), [picture(encoder, 30 + i) for i in range(4)]
    before = encoder.pictures_decoded

    async def leave_while_queued():
        busy = asyncio.ensure_future(decodes.with_pixels(PreparedPrompt([1], [first], [])))
        await asyncio.sleep(0.01)  # the pool's only thread takes the first
        left = [asyncio.ensure_future(decodes.with_pixels(PreparedPrompt([1], [v], []))) for v in queued]
        await asyncio.sleep(0.01)  # each queued behind it
        assert not busy.done() and len(decodes._running) == 5  # noqa: SLF001
        for task in left:
            task.cancel()
        await busy
        again = await decodes.with_pixels(PreparedPrompt([1], [queued[0]], []))  # asked again later: decoded
        await asyncio.sleep(0.2)
        return again

    try:
        again = asyncio.run(leave_while_queued())
    finally:
        decodes.close()
    assert again.images[0].pixel_values is not None
    assert encoder.pictures_decoded - before == 2  # the first, and the one asked again; the others never
