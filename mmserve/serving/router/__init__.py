"""The HTTP router: the OpenAI-compatible API in front of a ``Backend``."""

from mmserve.serving.router.app import build_app
from mmserve.serving.router.settings import RouterSettings

__all__ = ["RouterSettings", "build_app"]
