"""ColocatedBackend's promises without a compile: every stream ends with an event, whatever the
engine does (raise in a step, refuse a request, stop); encoded images are decoded before the engine.
Each backend is built with ``precompile=False``: none of these runs a program, and compiling the
whole grid before serving cost this module 5 minutes."""

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from mmserve import SamplingParams
from mmserve.engine.config import EngineConfig
from mmserve.engine.engine import LLMEngine
from mmserve.engine.inputs import EncodedMedia, Visual, prepare_prompt
from mmserve.serving.backend import GenerateRequest
from mmserve.serving.colocated import ColocatedBackend
from models.qwen3_vl_moe import load_model


@pytest.fixture(scope="module")
def model():
    return load_model("tiny")


def _request(model, request_id: str) -> GenerateRequest:
    return GenerateRequest(request_id, prepare_prompt("Hello there", model), SamplingParams(max_tokens=4))


async def _events(backend, request):
    return [event async for event in backend.generate(request)]


def test_a_step_that_raises_ends_every_stream_with_an_error(model, monkeypatch):
    def broken_step(self):
        raise RuntimeError("device lost")

    monkeypatch.setattr(LLMEngine, "step", broken_step)
    backend = ColocatedBackend(model, EngineConfig(num_pages=32, precompile=False))

    async def run():
        return await asyncio.gather(*(_events(backend, _request(model, f"r{i}")) for i in range(3)))

    for events in asyncio.run(asyncio.wait_for(run(), 30)):
        assert len(events) == 1 and "device lost" in events[0].error
    health = asyncio.run(backend.health())
    assert health["healthy"] is False and "device lost" in health["engine"]
    late = asyncio.run(asyncio.wait_for(_events(backend, _request(model, "late")), 30))
    assert "device lost" in late[0].error
    assert backend.metrics()["engine_alive"] == 0
    # the router's door asks this first: a 503 with Retry-After, not an admitted request's 500
    assert "device lost" in backend.unavailable(_request(model, "next"))


def test_a_refused_request_gets_the_reason_and_the_engine_goes_on(model, monkeypatch):
    monkeypatch.setattr(LLMEngine, "step", lambda self: [])  # requests stay queued: nothing finishes
    backend = ColocatedBackend(model, EngineConfig(num_pages=32, precompile=False))

    async def run():
        first = asyncio.ensure_future(_events(backend, _request(model, "same")))
        await asyncio.sleep(0.5)
        duplicate = await _events(backend, _request(model, "same"))
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        return duplicate

    duplicate = asyncio.run(asyncio.wait_for(run(), 30))
    assert "already in use" in duplicate[0].error
    assert not duplicate[0].invalid, "request ids come from the router: a clash is the server's fault"
    assert asyncio.run(backend.health())["healthy"] is True
    backend.close()


def test_close_ends_open_streams(model, monkeypatch):
    monkeypatch.setattr(LLMEngine, "step", lambda self: [])
    backend = ColocatedBackend(model, EngineConfig(num_pages=32, precompile=False))

    async def run():
        stream = asyncio.ensure_future(_events(backend, _request(model, "open")))
        await asyncio.sleep(0.5)
        await asyncio.get_running_loop().run_in_executor(None, backend.close)
        return await stream

    events = asyncio.run(asyncio.wait_for(run(), 30))
    assert events[-1].error == "the server is shutting down"
    assert backend.unavailable(_request(model, "next")) == "the server is shutting down"


def test_a_prompt_that_fits_the_context_but_not_the_kv_cache_is_refused_as_invalid(model):
    """The router answers such a refusal with a 400 (the client's fault), not a 500."""
    config = EngineConfig(num_pages=4, page_size=16, max_model_len=512, precompile=False)
    backend = ColocatedBackend(model, config)
    prompt = prepare_prompt("word " * 100, model)
    assert 3 * 16 < len(prompt.token_ids) < config.max_model_len
    events = asyncio.run(asyncio.wait_for(_events(backend, GenerateRequest("long", prompt, SamplingParams())), 30))
    assert len(events) == 1 and events[0].invalid and "KV pages" in events[0].error
    assert asyncio.run(backend.health())["free_pages"] == 3
    backend.close()


def test_an_encoded_image_is_decoded_before_the_engine_and_a_broken_one_is_refused(model, monkeypatch):
    """The router hands on the client's bytes; the backend decodes them off the engine's thread, so
    the engine sees the same patches the offline path makes, and a file that only fails when decoded
    (a truncated JPEG) is refused as the client's fault (a 400), the engine untouched."""
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    prompt = {"prompt": "<|vision_start|><|image_pad|><|vision_end|>"}
    want = prepare_prompt(prompt | {"multi_modal_data": {"image": [Image.open(io.BytesIO(jpeg))]}}, model)
    grid = want.images[0].grid_thw
    seen = []
    monkeypatch.setattr(LLMEngine, "add_request", lambda self, prompt, *args: seen.append(prompt) or "x")
    backend = ColocatedBackend(model, EngineConfig(num_pages=32, precompile=False))

    def request(raw: bytes) -> GenerateRequest:
        image = Visual(grid, source=EncodedMedia("image", raw))
        return GenerateRequest("r", prepare_prompt(prompt | {"multi_modal_data": {"image": [image]}}, model),
                               SamplingParams(max_tokens=1))

    async def run():
        task = asyncio.ensure_future(_events(backend, request(jpeg)))
        refused = await _events(backend, request(jpeg[:len(jpeg) // 2]))
        await asyncio.sleep(0.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return refused

    refused = asyncio.run(asyncio.wait_for(run(), 30))
    assert len(refused) == 1 and refused[0].invalid and "cannot be decoded" in refused[0].error
    (engine_prompt,) = seen
    assert engine_prompt.token_ids == want.token_ids
    assert np.array_equal(engine_prompt.images[0].pixel_values, want.images[0].pixel_values)
    backend.close()
