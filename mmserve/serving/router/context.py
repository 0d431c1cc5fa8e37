"""What every handler needs, kept on the app: the backend, the model's front end, settings, metrics."""

from __future__ import annotations

import dataclasses
import uuid

from starlette.requests import Request

from mmserve.serving.backend import Backend
from mmserve.serving.router.media import ImageReader
from mmserve.serving.router.metrics import RouterMetrics
from mmserve.serving.router.settings import RouterSettings
from models.qwen3_vl_moe import Model


@dataclasses.dataclass(frozen=True)
class RouterContext:
    """model: only its config, tokenizer and processor are used; the router never runs it."""

    backend: Backend
    model: Model
    settings: RouterSettings
    metrics: RouterMetrics

    @staticmethod
    def of(request: Request) -> RouterContext:
        return request.app.state.router

    def image_reader(self) -> ImageReader:
        """A fresh reader for one request's images, charged against that request's limits."""
        return ImageReader(self.settings, self.model.processor)

    def token_text(self, token_id: int, as_id: bool) -> str:
        """How a token is named in logprobs; ``token_id:N`` (vLLM's form) when the client asks for ids."""
        return f"token_id:{token_id}" if as_id else self.model.tokenizer.decode([token_id], skip_special_tokens=False)


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
