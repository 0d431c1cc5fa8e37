"""Errors as the OpenAI API shapes them: ``{"error": {"message", "type", "param", "code"}}``.

Anything wrong with what the client sent raises ``InvalidRequest`` before the backend sees the
request, so a rejected request changes nothing on the server.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import JSONResponse


class InvalidRequest(Exception):
    """The client's mistake: answered 400 with the reason (or another 4xx ``status``, with ``headers``
    such as ``Allow`` or ``Connection: close``)."""

    type_ = "invalid_request_error"
    """The error body's ``type``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status
        self.headers = headers


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def invalid_request_response(error: InvalidRequest) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.type_, error.param, error.code), error.status, error.headers)


def server_error_response(message: str, status: int = 500) -> JSONResponse:
    return JSONResponse(error_body(message, "server_error", None, status), status)


def backend_error_response(message: str, invalid: bool) -> JSONResponse:
    """A request the backend failed: 400 when it refused the request as given, else 500."""
    return invalid_request_response(InvalidRequest(message)) if invalid else server_error_response(message)
