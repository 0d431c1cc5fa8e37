"""The error an engine step raises when it fails part-way (a device program, a finish hook, a grammar)."""

from __future__ import annotations

from mmserve.engine.outputs import RequestOutput


class StepFailed(RuntimeError):
    """A step raised; the requests it ran were aborted (their state was mid-update)."""

    def __init__(self, request_ids: list[str], cause: Exception, outputs: list[RequestOutput] | None = None):
        super().__init__(f"engine step failed: {type(cause).__name__}: {cause}")
        self.request_ids = request_ids
        self.outputs = outputs or []
        """What the step produced for its other requests before it failed (a request it finished
        among them is gone from the engine): the caller delivers them as a step's outputs."""
