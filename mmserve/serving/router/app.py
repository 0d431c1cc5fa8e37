"""The router's ASGI app: OpenAI-compatible endpoints, ``/generate``, ``/health`` and ``/metrics``
in front of any ``Backend`` (the colocated engine or a disaggregated triple)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import logging
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mmserve.sampling_params import checked_defaults
from mmserve.serving.backend import Backend
from mmserve.serving.router.admission import Admission, Overloaded
from mmserve.serving.router.auth import ApiKeyGuard
from mmserve.serving.router.body_guard import BodyGuard
from mmserve.serving.router.chat import chat_completions
from mmserve.serving.router.completions import completions
from mmserve.serving.router.context import RouterContext
from mmserve.serving.router.errors import InvalidRequest, invalid_request_response, server_error_response
from mmserve.serving.router.internal_addresses import redact
from mmserve.serving.router.metrics import RouterMetrics
from mmserve.serving.router.native import generate
from mmserve.serving.router.settings import RouterSettings
from models.qwen3_vl_moe import Model

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/generate": "generate"}
log = logging.getLogger(__name__)


def build_app(backend: Backend, model: Model, settings: RouterSettings,
              on_shutdown: Callable[[], None] | None = None) -> Starlette:
    """``model`` supplies the tokenizer, processor and config that prepare requests; ``on_shutdown``
    runs when the server stops (the colocated backend stops its engine thread there)."""
    model = dataclasses.replace(model, sampling_defaults=checked_defaults(model.sampling_defaults))
    if model.sampling_defaults:
        log.info("sampling fields a request leaves out take the checkpoint's generation_config.json: %s",
                 ", ".join(f"{k}={v}" for k, v in model.sampling_defaults.items()))
    metrics = RouterMetrics(backend.metrics)
    admission = Admission(backend.capacity, settings.max_queued_requests, settings.queue_timeout_s,
                          backend.kv_capacity)
    metrics.watch_admission(admission)
    router = RouterContext(backend, model, settings, metrics, admission)
    started = int(time.time())

    async def models(request: Request) -> Response:
        card = {"id": settings.model_name, "object": "model", "created": started, "owned_by": "mmserve",
                "max_model_len": settings.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    async def health(request: Request) -> Response:
        try:
            details = await backend.health()
        except Exception as error:
            details = {"healthy": False, "error": f"{type(error).__name__}: {error}"}
        return JSONResponse(details, 200 if details.get("healthy") else 503)

    async def metrics(request: Request) -> Response:
        return Response(router.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def rejected(request: Request, error: InvalidRequest) -> Response:
        outcome = "overloaded" if isinstance(error, Overloaded) else "rejected"
        router.metrics.requests.labels(_endpoint(request), outcome).inc()
        return invalid_request_response(error)

    async def not_routed(request: Request, error: HTTPException) -> Response:
        """No such path (404) or a method the path does not take (405), in OpenAI's shape; not
        counted, since a label per unknown path would grow without bound."""
        return invalid_request_response(InvalidRequest(f"{error.detail}: {request.method} {request.url.path}",
                                                       status=error.status_code, headers=error.headers))

    async def client_left(request: Request, error: ClientDisconnect) -> Response:
        log.info("%s %s: the client left before sending its whole body", request.method, request.url.path)
        router.metrics.requests.labels(_endpoint(request), "aborted").inc()
        return Response(status_code=499)  # nobody reads it

    def refused_key(path: str) -> None:
        router.metrics.requests.labels(ENDPOINTS.get(path, "other"), "rejected").inc()

    async def failed(request: Request, error: Exception) -> Response:
        # Starlette re-raises after this answer, so the server's log shows the traceback.
        router.metrics.requests.labels(_endpoint(request), "error").inc()
        return server_error_response(redact(f"internal error: {type(error).__name__}: {error}"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if getattr(backend, "supports_structured_output", False):
            # Checking a schema imports xgrammar (~3 s, torch with it): before serving, not in
            # the first structured request.
            await asyncio.to_thread(importlib.import_module, "xgrammar")
        yield
        if on_shutdown is not None:
            on_shutdown()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/generate", generate, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        middleware=[Middleware(ApiKeyGuard, api_key=settings.api_key, on_refused=refused_key),
                    Middleware(BodyGuard, max_bytes=settings.max_body_bytes, timeout=settings.request_read_timeout)],
        exception_handlers={InvalidRequest: rejected, HTTPException: not_routed, ClientDisconnect: client_left,
                            Exception: failed},
        lifespan=lifespan,
    )
    app.state.router = router
    return app


def _endpoint(request: Request) -> str:
    return ENDPOINTS.get(request.url.path, "other")
