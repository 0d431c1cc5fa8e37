"""``n > 1``: one OpenAI request answered with n choices, each its own engine request.

The siblings share the prompt (with prefix caching on, later siblings may reuse the pages of the
first) and differ only in their random stream: with a ``seed``, sibling i samples with ``seed +
i`` (as vLLM does), so an answer is reproducible choice by choice; without one each draws its own.
Their event streams are merged as they come, each event tagged with its choice's index; the merge
reads at most one event ahead per sibling, so a client that stops reading still fills each
sibling's own bounded buffer and is cut as any stalled reader is (``relay.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from mmserve.serving.backend import GenerateRequest, TokenEvent

_END = object()


def sibling_requests(request: GenerateRequest, n: int) -> list[GenerateRequest]:
    """``request`` itself when n is 1; otherwise n requests ``<id>-<i>``, each with its sibling's
    params (``SamplingParams.sibling``: seeded seed + i)."""
    if n == 1:
        return [request]
    return [dataclasses.replace(request, request_id=f"{request.request_id}-{i}", params=request.params.sibling(i))
            for i in range(n)]


async def merged(streams: list[AsyncIterator[TokenEvent]]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice index, event) from every stream, in arrival order, until all have ended."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))

    async def pump(index: int, stream: AsyncIterator[TokenEvent]) -> None:
        async for event in stream:
            await queue.put((index, event))
        await queue.put((index, _END))

    tasks = [asyncio.get_running_loop().create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(streams)
        while running:
            index, event = await queue.get()
            if event is _END:
                running -= 1
            else:
                yield index, event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
