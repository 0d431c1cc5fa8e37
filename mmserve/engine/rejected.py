"""The one error that is the client's to fix."""


class RequestRejected(ValueError):
    """A well-formed request this server cannot take as given: longer than the context or the KV
    cache, visual input larger than the encode buffers. Answered with HTTP 400; every other error
    of a backend (a protocol mismatch between router and worker, a lost peer) is the server's."""
