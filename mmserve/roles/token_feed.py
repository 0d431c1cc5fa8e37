"""The router's end of its token stream on one decode worker (:mod:`mmserve.roles.token_stream` is
decode's): one ``Tokens`` call carries every event of every request this router sent that worker,
a message per decode step; a reader task hands each event to its request's queue.

The stream is opened on first use and opened again (under a new id) after it ends. A request
subscribes before its ``Decode`` call names the stream, so no event of it can come first; when the
stream ends, every request still subscribed gets :class:`TokenStreamLost`, as a request's own
stream used to end with the worker's failure.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable

import grpc

from mmserve.rpc import worker_pb2 as pb
from mmserve.rpc import worker_pb2_grpc as pb_grpc


class TokenStreamLost(Exception):
    """The decode worker's token stream ended while a request still waited for its events."""

    def __init__(self, message: str, unavailable: bool = False):
        super().__init__(message)
        self.unavailable = unavailable
        """The worker could not be reached (it died, or its address is gone)."""


class Subscription:
    """One request's share of the stream: the events decode sends for it, in order."""

    def __init__(self, stream_id: str, queue: asyncio.Queue, close: Callable[[], None]):
        self.stream_id = stream_id
        self._queue = queue
        self.close = close
        """Stops taking the request's events (those still coming are dropped)."""

    async def events(self) -> AsyncIterator[pb.TokenEvent]:
        """Decode's events for the request; raises TokenStreamLost if the stream ends first."""
        while True:
            item = await self._queue.get()
            if isinstance(item, TokenStreamLost):
                raise TokenStreamLost(str(item), item.unavailable)  # each request raises its own
            yield item


class _OpenStream:
    def __init__(self, stream_id: str):
        self.stream_id = stream_id
        self.opened: asyncio.Future = asyncio.get_running_loop().create_future()
        self.opened.add_done_callback(lambda f: f.cancelled() or f.exception())  # seen, even with no waiter left
        self.waiting: dict[str, asyncio.Queue] = {}
        self.reader: asyncio.Task | None = None


class TokenFeed:
    def __init__(self, stub: pb_grpc.WorkerStub, worker_name: str):
        self._stub = stub
        self._name = worker_name
        self._stream: _OpenStream | None = None

    async def subscribe(self, request_id: str) -> Subscription:
        """Opens the stream if it is not open, and takes ``request_id``'s events from now on.
        Raises TokenStreamLost when the stream cannot be opened."""
        stream = self._stream
        if stream is None:
            stream = self._stream = _OpenStream(secrets.token_hex(16))
            stream.reader = asyncio.get_running_loop().create_task(self._read(stream))
        await asyncio.shield(stream.opened)
        if stream.reader.done():  # ended between its opening and this request
            raise TokenStreamLost(f"decode worker {self._name}'s token stream ended")
        queue: asyncio.Queue = asyncio.Queue()
        stream.waiting[request_id] = queue
        return Subscription(stream.stream_id, queue, lambda: stream.waiting.pop(request_id, None))

    async def _read(self, stream: _OpenStream) -> None:
        call = self._stub.Tokens(pb.TokensRequest(stream_id=stream.stream_id))
        lost = TokenStreamLost(f"decode worker {self._name} ended its token stream")
        try:
            if await call.read() is grpc.aio.EOF:
                return
            stream.opened.set_result(None)
            while (batch := await call.read()) is not grpc.aio.EOF:
                for event in batch.events:
                    queue = stream.waiting.get(event.request_id)
                    if queue is not None:
                        queue.put_nowait(event)
        except grpc.RpcError as error:
            lost = TokenStreamLost(f"decode worker {self._name} failed: {error.code().name}: {error.details()}",
                                   unavailable=error.code() is grpc.StatusCode.UNAVAILABLE)
        except grpc.aio.UsageError:
            lost = TokenStreamLost(f"decode worker {self._name} was dropped as unreachable")
        except asyncio.CancelledError:  # the worker's channel closed (dropped), or the router stops
            lost = TokenStreamLost(f"decode worker {self._name} was dropped while serving")
            raise
        finally:
            if self._stream is stream:
                self._stream = None
            if not stream.opened.done():
                stream.opened.set_exception(lost)
            for queue in stream.waiting.values():
                queue.put_nowait(lost)
            stream.waiting.clear()
            call.cancel()
