"""Serving: the request types every backend speaks, the colocated backend, the HTTP router."""
