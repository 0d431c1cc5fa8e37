"""The cluster token on every gRPC call between the router and the workers, with grpc's own
interceptors: clients add ``authorization: Bearer <token>`` to each call's metadata, servers
refuse a call without the right one (UNAUTHENTICATED) before any servicer runs.

The token is derived from the cluster credential (:mod:`mmserve.cluster_credential`). It proves
membership, not confidentiality: the channels are plain TCP, so the network between a
deployment's processes (loopback, a pod network) is trusted not to be sniffed.
"""

from __future__ import annotations

import collections
import hmac

import grpc

HEADER = "authorization"
DENIED = "missing or wrong cluster token"


def _bearer(token: str) -> str:
    return f"Bearer {token}"


def _authorized(metadata, expected: bytes) -> bool:
    given = next((value for key, value in metadata or () if key == HEADER), "")
    return hmac.compare_digest(given.encode() if isinstance(given, str) else given, expected)


class TokenCheck(grpc.ServerInterceptor):
    """A synchronous server's gate (the workers)."""

    def __init__(self, token: str):
        self._expected = _bearer(token).encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or _authorized(handler_call_details.invocation_metadata, self._expected):
            return handler

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)

        make = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.unary_unary_rpc_method_handler
        return make(deny, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


class AsyncTokenCheck(grpc.aio.ServerInterceptor):
    """An asyncio server's gate (the router's worker registry)."""

    def __init__(self, token: str):
        self._expected = _bearer(token).encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or _authorized(handler_call_details.invocation_metadata, self._expected):
            return handler

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)

        return grpc.unary_unary_rpc_method_handler(deny, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                            "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _AddToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self._header = (HEADER, _bearer(token))

    def _with_token(self, details):
        return _CallDetails(details.method, details.timeout, [*(details.metadata or ()), self._header],
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_token(client_call_details), request)


class _AsyncToken:
    def __init__(self, token: str):
        self._token = _bearer(token)

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(HEADER, self._token)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)


# Two classes, not one with both methods: grpc.aio files an interceptor under the first kind it
# matches, so one object would never see the unary-stream calls (Prefill, Tokens).
class _AsyncUnaryToken(_AsyncToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._with_token(client_call_details), request)


class _AsyncStreamToken(_AsyncToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._with_token(client_call_details), request)


def channel(target: str, token: str, options=None) -> grpc.Channel:
    """A synchronous channel whose every call carries the token."""
    return grpc.intercept_channel(grpc.insecure_channel(target, options=options), _AddToken(token))


def async_channel(target: str, token: str, options=None) -> grpc.aio.Channel:
    """An asyncio channel whose every call carries the token."""
    return grpc.aio.insecure_channel(target, options=options,
                                     interceptors=[_AsyncUnaryToken(token), _AsyncStreamToken(token)])
