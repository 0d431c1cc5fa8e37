"""The colocated backend's picture and video decoding: in threads of its own, once per file in flight.

The router hands the backend each request's encoded files; decoding them is CPU work for neither
the event loop nor the engine's thread, so it runs in a small pool (a few long videos hold those
threads, never the event loop's default executor, which every request passes through). The ``n``
choices of one request bring the same file at once: the first starts its decode and the others
await that one (an asyncio future per content key, on the event loop) instead of each queueing a
decode of its own behind it in the pool (a 4096x4096 JPEG with ``n=16``: 1.6 s against 0.25 s at
``n=1``, docs/status.md). A picture whose embeddings the engine's cache holds (a later turn of a
chat about it) is not decoded at all, as on the encode role. A decode whose every waiter has left
(clients gone) before it started is dropped from the pool's queue: a client sending and leaving
over and over would otherwise queue decodes without end, its admission slot freed each time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses

from mmserve.engine.encoder import Encoder
from mmserve.engine.inputs import PreparedPrompt, Visual

MEDIA_THREADS = 2


@dataclasses.dataclass
class _Decode:
    future: asyncio.Future[Visual]
    waiters: int = 0


class PictureDecodes:
    def __init__(self, encoder: Encoder, threads: int = MEDIA_THREADS) -> None:
        self._encoder = encoder
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="media-decode")
        self._running: dict[bytes, _Decode] = {}
        """Decodes in flight by content key; touched on the event loop only."""

    async def with_pixels(self, prompt: PreparedPrompt) -> PreparedPrompt:
        """The prompt with every picture's patches; a file that will not decode raises as
        ``with_pixels`` does (``RequestRejected``, a ValueError)."""
        images = await asyncio.gather(*(self._decoded(v) for v in prompt.images))
        videos = await asyncio.gather(*(self._decoded(v) for v in prompt.videos))
        return dataclasses.replace(prompt, images=list(images), videos=list(videos))

    async def _decoded(self, visual: Visual) -> Visual:
        if visual.pixel_values is not None or self._encoder.holds(visual.content_key):
            return visual  # cached embeddings: not decoded (the engine decodes it if evicted by then)
        key = visual.content_key
        decode = self._running.get(key)
        if decode is None or decode.future.cancelled():  # (one dropped a moment ago is not joined)
            future = asyncio.get_running_loop().run_in_executor(self._pool, self._encoder.decoded, visual)
            decode = self._running[key] = _Decode(future)
            future.add_done_callback(
                lambda done: self._running.pop(key) if key in self._running and self._running[key].future is done
                else None)
        decode.waiters += 1
        try:
            out = await asyncio.shield(decode.future)  # a client leaving stops its own wait, not the others'
        finally:
            decode.waiters -= 1
            if not decode.waiters and not decode.future.done():
                decode.future.cancel()  # nobody waits: dropped if not started (one started runs to its end)
        return Visual(out.grid_thw, out.pixel_values, content_key=key, timestamps=visual.timestamps)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
