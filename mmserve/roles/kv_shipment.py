"""How a prefilled prompt's KV leaves for decode: the prefill role's half that sends.

A mixin of :class:`~mmserve.roles.prefill.PrefillRole`, kept apart so that the role's file is its
loop and its receiving half: these methods use the role's engine, sender, outbox, request table
(``_requests``), ``lock`` and ``_stream_first``. The engine calls :meth:`_ship` as a prompt
finishes at its first token; the role's loop calls :meth:`_read_kept` between steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import msgspec

from mmserve.engine.outputs import RequestOutput
from mmserve.engine.request import Request
from mmserve.roles.outbox import Parcel
from mmserve.roles.request_state import PrefillState
from transfer.messages import TransferInfo, TransferMode

if TYPE_CHECKING:
    from mmserve.roles.prefill import PrefillRecord

log = logging.getLogger(__name__)


class KVShipment:
    def _ship(self, request: Request, page_table: list[int]) -> None:
        """Called as the request finishes at its first token, before its pages are freed: streams
        that token to the router, then copies the KV out (the token does not wait for the copy:
        ~0.7 ms of a first token's ~16 on this CPU's ``--role all``). Only a PREFILLING record has
        a request in the engine (leaving that state aborts it there).

        The copy reads only the tokens decode does not hold, which decode's registration says.
        When none has come yet, the KV is read whole at once, unless the prompt began with pages
        found in prefill's prefix cache: decode may hold those too, and it holds back the
        registration of a request sharing its first page with one still receiving until that
        one has landed. Such a request's pages are kept (AWAITING_DECODE) and read once the
        registration comes (:meth:`_read_kept`): read whole now, the sender would write the
        rows into its pool and read the part decode lacks back out of it (two more copies).
        Kept for every request, the common one (nothing shared) would wait for its read until
        the step running when the registration came ends (concurrency 16 lost ~20% of its
        tokens/s on 2 cores)."""
        record = self._requests[request.request_id]
        self._stream_first(record, RequestOutput.of(request))
        aux = {"rope_delta": request.rope_delta}
        if request.logprobs:
            first = request.logprobs[0]
            aux |= {"logprob": first.logprob, "top_ids": list(first.top), "top_logprobs": list(first.top.values())}
        record.kv = TransferInfo(TransferMode.KV, request.num_computed, aux=aux, first_token=request.output_ids[0])
        with self.lock:  # a registration waiting on the socket says what decode holds
            self.sender.progress(0)
            registered = self.sender.receiver_holds(record.room) is not None
        if registered or request.num_cached_tokens < self.engine.config.page_size:
            record.move(PrefillState.SENDING_KV)
            self._read(record, lambda rows, start: self.engine.runner.read_kv(page_table, record.kv.total_tokens,
                                                                               rows, start))
        else:
            record.move(PrefillState.AWAITING_DECODE)
            self.engine.keep_kv(request.request_id)

    def _read_kept(self, spill: bool = False) -> None:
        """Reads the kept KV of every request whose decode has registered since (the loop
        thread, between steps: the engine's cache is not in use). ``spill``: the engine is short
        of pages, so the oldest kept request's KV is read whole, its decode or not, and its pages
        let go (the sender writes the rows into its pool, as it must for a decode holding some);
        kept pages would otherwise wait for decode while decode waits, for another request's KV,
        on a prompt that waits for those pages."""
        kept = self._requests.in_state(PrefillState.AWAITING_DECODE)
        if kept:
            self.sender.progress(0)  # registrations that came since
        for record in kept:
            if self.sender.receiver_holds(record.room) is None and not spill:
                continue
            spill = False
            record.move(PrefillState.SENDING_KV)
            try:
                self._read(record, lambda rows, start: self.engine.read_kept_kv(
                    record.request_id, record.kv.total_tokens, rows, start))
            finally:
                self.engine.release_kv(record.request_id)

    def _read(self, record: PrefillRecord, read_kv: Callable) -> None:
        """Reads the tokens of the request's KV that decode does not hold into rows of their own and
        puts them in the outbox. A copy that fails fails the KV room (and so the request, whose
        decode tells the router)."""
        n = record.kv.total_tokens
        if not self.sender.allocator.can_ever_hold(n):  # waiting for blocks would never help
            self._fail_room(record.room, f"its KV of {n} tokens exceeds the whole sender pool")
            return
        held = self.sender.receiver_holds(record.room) or 0
        start = held if held < n else 0  # a decode holding everything fails the room (nothing to send)
        try:  # in the transfer's bucket, as the sender offers a room that goes in one chunk
            rows = self.sender.buffers.bucket(n - start)
            k, v = jax.device_put(read_kv(rows, start), self.sender.buffers.sharding)
        except Exception as error:
            log.exception("reading the KV of %s failed", record.request_id)
            self._fail_room(record.room, f"could not read its KV: {error}")
            return
        info = msgspec.structs.replace(record.kv, aux=record.kv.aux | record.hop_carrier())
        with self.lock:  # an abort on another thread may have ended it meanwhile, dropping its parcels
            if record.state is PrefillState.SENDING_KV:
                self._outbox.put(Parcel(record.room, info, rows={"k": k, "v": v}, rows_start=start))

    def _fail_room(self, room: int, reason: str) -> None:
        """The room fails, and its request with it (at the next poll of the sender's rooms)."""
        with self.lock:
            if not self.sender.poll(room).terminal:
                self.sender.abort(room, reason[:500])
