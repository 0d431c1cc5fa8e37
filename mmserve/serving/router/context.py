"""What every handler needs, kept on the app: the backend, the model's front end, settings, metrics."""

from __future__ import annotations

import dataclasses
import uuid

from opentelemetry.context import Context
from starlette.requests import Request

from mmserve.serving.backend import Backend, GenerateRequest
from mmserve.serving.router.admission import Admission, Overloaded
from mmserve.serving.router.media import MediaReader
from mmserve.serving.router.metrics import RouterMetrics
from mmserve.serving.router.relay import Relay, RelayLimits
from mmserve.serving.router.settings import RouterSettings
from models.qwen3_vl_moe import Model


@dataclasses.dataclass(frozen=True)
class RouterContext:
    """model: only its config, tokenizer and processor are used; the router never runs it."""

    backend: Backend
    model: Model
    settings: RouterSettings
    metrics: RouterMetrics
    admission: Admission

    @staticmethod
    def of(request: Request) -> RouterContext:
        return request.app.state.router

    async def relay(self, request: GenerateRequest, endpoint: str, arrival: float,
                    trace_parent: Context | None = None) -> Relay:
        """Admits the request (or raises ``Overloaded``, a 429/503) and starts it in the backend
        (its span a child of ``trace_parent``, the client's, when it sent one)."""
        if (missing := self.backend.unavailable(request)) is not None:
            raise Overloaded(f"{missing}; retry later", 503)
        ticket = await self.admission.admit(self.backend.kv_demand(request), lambda: self.backend.kv_claim(request))
        if (missing := self.backend.unavailable(request)) is not None:  # a worker left while it queued
            ticket.release()
            raise Overloaded(f"{missing}; retry later", 503)
        limits = RelayLimits(self.settings.request_timeout_s or None, self.settings.stream_stall_timeout_s)
        return Relay(self.backend, request, self.metrics, endpoint, arrival, ticket, limits, trace_parent)

    def media_reader(self) -> MediaReader:
        """A fresh reader for one request's images and videos, charged against that request's limits."""
        return MediaReader(self.settings, self.model.processor)

    def token_text(self, token_id: int, as_id: bool) -> str:
        """How a token is named in logprobs; ``token_id:N`` (vLLM's form) when the client asks for ids."""
        return f"token_id:{token_id}" if as_id else self.model.tokenizer.decode([token_id], skip_special_tokens=False)


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
