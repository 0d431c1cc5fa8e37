"""Encode decodes a picture only when its embeddings are not cached: the router sends the client's
file each time (each turn of a chat about one picture), the content key names it, and a cached
picture skips decoding; one evicted in between is decoded where it is encoded."""

import io
import threading

import numpy as np
import pytest
from PIL import Image

from mmserve.engine.config import EngineConfig
from mmserve.engine.encoder import Encoder
from mmserve.engine.inputs import EncodedMedia, Visual
from mmserve.roles.encode import decoded
from mmserve.roles.wire import visual_to_pb
from mmserve.rpc import worker_pb2 as pb
from models.qwen3_vl_moe import load_model


@pytest.fixture(scope="module")
def encoder():
    # A 64x64 picture encoded alone keeps its vision call's output alive: the smallest patch bucket's
    # 16 tokens x (1 + 3 deepstack levels) x 64 float32 = 16 KiB; the budget holds one, not two.
    return Encoder(load_model("tiny"), EngineConfig(precompile=False, embedding_cache_bytes=20000))


def picture(encoder: Encoder, seed: int) -> Visual:
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    grid = encoder.model.processor(images=[image])["image_grid_thw"]
    return Visual(grid, source=EncodedMedia("image", buffer.getvalue()))


def request(*visuals: Visual) -> pb.EncodeRequest:
    return pb.EncodeRequest(request_id="r", room=1, images=[visual_to_pb(v, with_source=True) for v in visuals])


def test_a_cached_picture_is_not_decoded_again_and_an_evicted_one_is(encoder):
    first, second = picture(encoder, 1), picture(encoder, 2)
    (decoded_first,) = decoded(request(first), encoder).images
    assert decoded_first.pixel_values is not None
    want = encoder.encode(decoded_first).host()

    (again,) = decoded(request(first), encoder).images
    assert again.pixel_values is None and again.content_key == first.content_key  # held: not decoded
    hits = encoder.cache.hits
    assert all(np.array_equal(a, b) for a, b in zip(encoder.encode(again).host(), want))
    assert encoder.cache.hits == hits + 1

    encoder.encode(decoded(request(second), encoder).images[0])  # the cache holds one: first is evicted
    assert not encoder.holds(first.content_key)
    assert all(np.array_equal(a, b) for a, b in zip(encoder.encode(again).host(), want))  # decoded where encoded


def test_calls_bringing_the_same_file_at_once_decode_it_once(encoder):
    """The ``n`` choices of a request reach encode together, each with the client's file: one
    decodes it, the others take its patches (each call still gets a visual of its own)."""
    image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (1536, 1536, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # ~7 MB: decoding takes long enough for the calls to overlap
    big = Visual(encoder.model.processor(images=[image])["image_grid_thw"], source=EncodedMedia("image", buffer.getvalue()))
    before, start, results = encoder.pictures_decoded, threading.Barrier(6), []

    def call():
        start.wait()
        results.append(decoded(request(big), encoder).images[0])

    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 6 and encoder.pictures_decoded - before == 1
    want = encoder.decoded(big).pixel_values  # decoded again, alone: the same patches
    assert all(r.content_key == big.content_key and np.array_equal(r.pixel_values, want) for r in results)
