"""The router's backend over disaggregated workers: picks an encode/prefill/decode triple per
request (by the routing policy, :mod:`mmserve.roles.routing`), gives all three one room id, and
relays the first token from prefill (as soon as it is sampled, while its KV moves to decode), then
the rest from decode, which sends every request's tokens of a step in one message on the router's
token stream to that worker (:mod:`mmserve.roles.token_feed`).

The workers are those of the router's pool (:mod:`mmserve.roles.worker_pool`). The backend's
capacity (what the router's admission lets in at once) is what the live prefill and decode
workers can hold together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator

import grpc

from mmserve.engine.rejected import RequestRejected
from mmserve.roles.token_feed import TokenStreamLost
from mmserve.roles.wire import sampling_to_pb, stop_reason_from_pb, visual_to_pb
from mmserve.roles.decode_claim import DecodeClaim
from mmserve.roles.routing import Choice
from mmserve.roles.worker_pool import ROLES, WorkerHandle, WorkerPool
from mmserve.rpc import worker_pb2 as pb
from mmserve.serving.backend import GenerateRequest, TokenEvent, TokenLogprob
from mmserve.structured_output import AVAILABLE as STRUCTURED_OUTPUT_AVAILABLE
from mmserve.tracing import inject

log = logging.getLogger(__name__)
HEALTH_CHECK_TIMEOUT_S = 2.0
"""How long ``/health`` waits for a worker's account (it answers between two of its steps)."""
LEAST_TIMEOUT_S = 1e-3
"""What a worker is sent for a deadline already past (0 would mean none): it frees the request at once."""


class DisaggregatedBackend:
    supports_structured_output = STRUCTURED_OUTPUT_AVAILABLE
    """The schema travels typed to prefill (which samples the first token under its grammar) and to
    decode (whose matcher takes that token before it samples on). Workers are expected to have
    the grammar library where the router has it."""

    def __init__(self, pool: WorkerPool):
        self.pool = pool
        self._active: dict[str, list[WorkerHandle]] = {}
        self._aborting: set[asyncio.Task] = set()
        self._claims: dict[str, DecodeClaim] = {}
        """Admitted requests' decode workers and KV, by request id, until they end."""

    def capacity(self) -> int:
        """Requests the live prefill and decode workers hold together (encode queues its images)."""
        return min(self.pool.capacity("prefill"), self.pool.capacity("decode"))

    def kv_capacity(self) -> int | None:
        """Tokens of KV the largest live decode worker reserves requests from (None: none says)."""
        decode = [w for w in self.pool.live("decode") if w.kv_pages]
        return max(w.kv_pages * w.kv_page_size for w in decode) if decode else None

    def kv_claim(self, request: GenerateRequest) -> DecodeClaim | None:
        """The decode worker the request will run on, picked now among those with room for its KV
        by this router's count, and those pages counted there at once (so that the next request
        admitted sees them); None while no live decode worker has room. A request no worker
        would take (none is up, none's context holds its prompt) gets a claim of no worker:
        ``generate`` answers it with the reason."""
        reserved = _reserved_tokens(request)
        try:
            choice = self.pool.pick("decode", request.prompt, kv_tokens=reserved, need_room=True)
        except (LookupError, RequestRejected):
            choice = _NOWHERE
        if choice is None:
            return None
        claim = DecodeClaim(choice.worker, reserved, lambda: self._claims.pop(request.request_id, None))
        self._claims[request.request_id] = claim
        return claim

    def kv_demand(self, request: GenerateRequest) -> int:
        """The tokens of KV decode reserves for the request: prompt + max_tokens, in whole pages."""
        page = max((w.kv_page_size for w in self.pool.live("decode")), default=0) or 1
        return -(-_reserved_tokens(request) // page) * page

    def unavailable(self, request: GenerateRequest) -> str | None:
        """Names the first role the request needs with no live worker (encode only for pictures)."""
        needs = ROLES if request.prompt.images or request.prompt.videos else ("prefill", "decode")
        return next((f"no {role} worker is up" for role in needs if not self.pool.live(role)), None)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        visual = bool(request.prompt.images or request.prompt.videos)
        reserved = _reserved_tokens(request)
        claim = self._claims.get(request.request_id)
        if claim is not None and claim.worker is not None and \
                not any(w is claim.worker for w in self.pool.live("decode")):
            claim.release()  # its worker is leaving, or was dropped, since admission: picked again
            claim = None
        try:
            decode = claim.worker if claim is not None and claim.worker is not None else \
                self.pool.pick("decode", request.prompt, kv_tokens=reserved).worker
            prefill_choice = self.pool.pick("prefill", request.prompt)
            prefill = prefill_choice.worker
            encode = self.pool.pick("encode").worker if visual else None
        except LookupError as error:
            yield TokenEvent(request.request_id, [], error=str(error))
            return
        except RequestRejected as error:  # no live worker's context holds the prompt
            yield TokenEvent(request.request_id, [], error=str(error), invalid=True)
            return
        room = secrets.randbits(63)  # unguessable: a room id is all a transfer's peers share
        workers = [w for w in (encode, prefill, decode) if w is not None]
        self._active[request.request_id] = workers
        # Workers whose in_flight counts the request: encode and prefill only until the first
        # event, when their part is done (the KV prefill still sends is in its own heartbeat's
        # count), so that an answer being decoded does not keep them busy to the routing policy.
        # A claim counts the request on decode itself, pages and in_flight, from admission on.
        claimed = claim is not None and claim.worker is decode
        counted = [w for w in workers if not (claimed and w is decode)]
        for w in counted:
            w.in_flight += 1
        upstream = [w for w in counted if w is not decode]
        kv_pages = 0 if claimed else decode.kv_pages_for(reserved)
        decode.kv_reserved += kv_pages
        try:
            # Encode starts with prefill unless prefill may hold the pictures cached (it holds a
            # leading page of the prompt, a later turn): then its ack says whether encode is needed.
            encode_early = encode is not None and not prefill_choice.matched_pages
            async with contextlib.aclosing(self._run(request, room, encode, prefill, decode, encode_early)) as events:
                async for event in events:  # closed with this one when the caller stops listening
                    if upstream:  # the first event: encode's and prefill's parts are done
                        for w in upstream:
                            w.in_flight -= 1
                            counted.remove(w)
                        upstream = []
                    yield event
        finally:
            for w in counted:
                w.in_flight -= 1
            decode.kv_reserved -= kv_pages
            del self._active[request.request_id]

    async def _run(self, request, room, encode, prefill, decode, encode_early: bool) -> AsyncIterator[TokenEvent]:
        """With ``encode_early`` encode and prefill are called at once, and decode once prefill
        has taken the request; otherwise decode, then prefill, then encode if prefill's ack
        says it needs the pictures.

        Encode called at once with prefill rather than after its ack saves a round trip; its
        request is aborted when prefill's ack says it holds the pictures. Decode (which reserves
        its pages and registers for the KV) is off the first token's path. When encode has work
        to do, decode's call waits for prefill's ack: called first, its worker woke and ran with
        encode's and prefill's and delayed them on a host of few cores, and it still registers
        long before prefill has the KV (encode's work comes first). When prefill starts
        computing at once (a later turn, a text prompt), decode is called first, as its call
        would otherwise compete with prefill's forward and register after prefill read its KV
        (which then goes through the sender's pool). The first token comes from prefill's
        stream, the rest from decode's token stream.

        Decode learns that a request ended early (the client left, the first token finished it,
        another role failed) from an Abort: its token stream is shared, so no call of the
        request's own ends. When the caller stops listening (the client left, or its stream was
        cut), every worker is aborted: decode and encode once their calls are answered (an abort
        that overtook the request would find nothing); prefill at once, and it aborts the request
        itself when its stream is hung up before the first token (the ack may not be back)."""
        p, rid = request.prompt, request.request_id
        trace_context = inject()  # the router's span for this request: each role's span is its child
        subscription = None

        def encode_call():
            return encode.stub.Encode(pb.EncodeRequest(
                request_id=rid, room=room, images=[visual_to_pb(v, with_source=True) for v in p.images],
                videos=[visual_to_pb(v, with_source=True) for v in p.videos],
                timeout_s=_seconds_left(request.deadline)), metadata=trace_context)

        async def decode_call():
            nonlocal subscription
            subscription = await decode.feed.subscribe(rid)
            if ended:  # the request ended while the stream opened: nothing closes it but this
                subscription.close()
                return None
            return await decode.stub.Decode(pb.DecodeRequest(
                request_id=rid, room=room, token_ids=p.token_ids, sampling=sampling_to_pb(request.params),
                prefill_name=prefill.name, prefill_incarnation=prefill.incarnation,
                images=[visual_to_pb(v, with_source=False) for v in p.images],
                videos=[visual_to_pb(v, with_source=False) for v in p.videos],
                timeout_s=_seconds_left(request.deadline), token_stream=subscription.stream_id,
                cache_salt=p.cache_salt or ""),
                metadata=trace_context)

        early = asyncio.ensure_future(encode_call()) if encode_early else None
        deciding = None if encode_early else _started(decode_call())
        decode_ended = False  # decode ended the request itself
        others_told = False  # encode and prefill were aborted; decode is, once its call is answered (below)
        ended = False  # _run is over (its finally ran): a subscription opened after it is closed at once

        async def let_others_go():
            nonlocal others_told
            await self._abort_all_but(decode, rid)
            others_told = True
        current = prefill
        prefilling = prefill.stub.Prefill(pb.PrefillRequest(
            request_id=rid, room=room, token_ids=p.token_ids, sampling=sampling_to_pb(request.params),
            images=[visual_to_pb(v, with_source=False) for v in p.images],
            videos=[visual_to_pb(v, with_source=False) for v in p.videos],
            encode_name=encode.name if encode else "", encode_incarnation=encode.incarnation if encode else 0,
            timeout_s=_seconds_left(request.deadline), cache_salt=p.cache_salt or ""),
            metadata=trace_context)
        try:
            ack = await _next(prefilling, "ack")
            if ack.ok and deciding is None:
                deciding = _started(decode_call())
            if ack.ok and ack.pictures_held and early is not None:
                await _settled(early)  # taken (or failed) first, so that the abort finds it
                await _abort_on(encode, rid)
            elif ack.ok and encode is not None and not ack.pictures_held:
                current = encode
                if early is None:  # a task of its own, so that a cancel here leaves it to settle and be aborted
                    early = asyncio.ensure_future(encode_call())
                ack = await asyncio.shield(early)
            elif early is not None:
                await _settled(early)  # prefill refused: the abort below must find encode's request
            if not ack.ok:
                await let_others_go()
                yield TokenEvent(rid, [], error=ack.error, invalid=ack.rejected)
                return
            current = prefill
            first = await _next(prefilling, "first")
            if first.error:
                await let_others_go()
                yield TokenEvent(rid, [], error=first.error)
                return
            text = first.text_delta
            yield _event(first, text)
            if first.finish_reason:  # decode and prefill are let go below
                return
            current = decode
            taken = await deciding
            if not taken.ok:
                await let_others_go()
                yield TokenEvent(rid, [], error=taken.error, invalid=taken.rejected)
                return
            async for event in subscription.events():
                text += event.text_delta
                if event.finish_reason or event.error:
                    decode_ended = True
                yield _event(event, text)
                if decode_ended:
                    return
        except (grpc.RpcError, TokenStreamLost) as error:
            if error.unavailable if isinstance(error, TokenStreamLost) else error.code() is grpc.StatusCode.UNAVAILABLE:
                await self.pool.forget(current)
            if early is not None:
                await _settled(early)
            await let_others_go()
            yield TokenEvent(rid, [], error=str(error) if isinstance(error, TokenStreamLost) else
                             f"{current.role} worker {current.name} failed: {error.code().name}: {error.details()}")
        except grpc.aio.UsageError:  # dropped as unreachable (its channel closing) while we used it
            if early is not None:
                await _settled(early)
            await let_others_go()
            yield TokenEvent(rid, [], error=f"{current.role} worker {current.name} was dropped as unreachable")
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # the client left: decode and encode are aborted below, prefill aborts it itself
            # grpc cancelled the call itself: the worker's channel was closed after its grace period
            await let_others_go()
            yield TokenEvent(rid, [], error=f"{current.role} worker {current.name} was dropped while serving")
        finally:
            ended = True
            prefilling.cancel()
            if subscription is not None:
                subscription.close()
            if deciding is not None and not decode_ended:  # decode holds it (or is about to): free it there
                self._in_background(_abort_after(deciding, decode, rid))
            # the caller left, or the first token ended the request: prefill may hold the KV for a
            # decode that never registers (a decode still reserving tells prefill nothing)
            if not (decode_ended or others_told):
                self._in_background(_abort_on(prefill, rid))
                if early is not None:
                    self._in_background(_abort_after(early, encode, rid))

    def _in_background(self, coroutine) -> None:
        """Runs an abort that must happen even though the request's task is being cancelled."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._aborting.add(task)
        task.add_done_callback(self._aborting.discard)

    async def _abort_all_but(self, decode: WorkerHandle, request_id: str) -> None:
        """Aborts the request on its workers but ``decode``, which ``_run`` aborts once its Decode
        call is answered: an abort that overtook the request would find nothing there, and decode
        would then hold its reservation until its waiting timeout."""
        for worker in self._active.get(request_id, []):
            if worker is not decode:
                await _abort_on(worker, request_id)

    async def abort(self, request_id: str) -> bool:
        """Aborts the request on every worker it went to; True when there were any."""
        workers = self._active.get(request_id, [])
        for worker in workers:
            await _abort_on(worker, request_id)
        return bool(workers)

    async def health(self) -> dict:
        """Every live worker's own account, asked of all at once: a worker answers between two of
        its steps, so asked in turn a busy cluster's answers added up past a probe's timeout."""
        workers = {role: self.pool.live(role) for role in ROLES}
        answers = iter(await asyncio.gather(*(_checked(w) for role in ROLES for w in workers[role])))
        roles = {role: [next(answers) for _ in workers[role]] for role in ROLES}
        healthy = all(any("error" not in d for d in roles[r]) for r in ROLES)
        return {"healthy": healthy, "roles": roles}

    def metrics(self) -> dict[str, float]:
        out = {f"workers_{role}": float(len(self.pool.live(role))) for role in ROLES}
        out["in_flight"] = float(len(self._active))
        out["worker_restarts"] = float(self.pool.restarts)
        out["prefix_routed_requests"] = float(self.pool.prefix_routed)
        return out


_NOWHERE = Choice(None, 0)
"""A claim's pick when no decode worker would take the request (``generate`` says why)."""


async def _checked(worker: WorkerHandle) -> dict:
    try:
        reply = await worker.stub.Check(pb.HealthRequest(), timeout=HEALTH_CHECK_TIMEOUT_S)
        return {"name": worker.name, **json.loads(reply.details_json)}
    except grpc.RpcError as error:
        return {"name": worker.name, "error": error.code().name}
    except grpc.aio.UsageError:  # dropped as unreachable while we asked
        return {"name": worker.name, "error": "UNAVAILABLE"}


async def _abort_on(worker: WorkerHandle, request_id: str) -> None:
    try:
        await worker.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=10)
    except (grpc.RpcError, grpc.aio.UsageError):  # UsageError: the pool closed a dead worker's channel
        log.warning("could not abort %s on %s", request_id, worker.name)


def _started(coroutine) -> asyncio.Task:
    """A call's task whose failure, if nobody awaits it, is not reported as never retrieved."""
    task = asyncio.ensure_future(coroutine)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


async def _abort_after(deciding: asyncio.Future, decode: WorkerHandle, request_id: str) -> None:
    """Aborts the request on decode once its Decode call has been answered (an abort arriving
    before the request would find nothing, and the request would then run to its end)."""
    await _settled(deciding)
    await _abort_on(decode, request_id)


async def _next(prefilling, kind: str):
    """The next message of prefill's stream, which must be of ``kind`` ("ack", then "first")."""
    message = await prefilling.read()
    if message is not grpc.aio.EOF and message.WhichOneof("kind") == kind:
        return getattr(message, kind)
    error = f"prefill's stream ended without its {kind}"
    return pb.Ack(ok=False, error=error) if kind == "ack" else pb.TokenEvent(error=error)


async def _settled(call) -> None:
    """Waits for a call whose answer no longer matters, whatever it ends with: an error, or its
    own cancellation (the request's task was cancelled while it awaited the call, which cancels
    the call's task too; the abort that follows must still go). A cancel of the caller's own task
    goes on up."""
    try:
        await call
    except (grpc.RpcError, grpc.aio.UsageError, TokenStreamLost):
        pass
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():
            raise


def _seconds_left(deadline: float | None) -> float:
    """The request's deadline as a worker is sent it: seconds left (0: none)."""
    return 0.0 if deadline is None else max(deadline - time.monotonic(), LEAST_TIMEOUT_S)


def _event(message: pb.TokenEvent, text: str) -> TokenEvent:
    """The router's event from decode's: ``text`` is the stream's text so far, deltas joined."""
    logprobs = [TokenLogprob(lp.token_id, lp.logprob, dict(zip(lp.top_ids, lp.top_logprobs)))
                for lp in message.logprobs] or None
    return TokenEvent(message.request_id, list(message.token_ids), logprobs=logprobs,
                      finish_reason=message.finish_reason or None, stop_reason=stop_reason_from_pb(message),
                      text=text, error=message.error or None)


def _reserved_tokens(request: GenerateRequest) -> int:
    """What decode reserves KV for, up front: the prompt and every token the request may generate."""
    return len(request.prompt.token_ids) + request.params.max_tokens
