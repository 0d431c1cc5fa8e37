"""A streamed chunk as the client reads it: ``data: <json>`` and a blank line, the JSON valid and
equal to what was sent, non-ASCII text as is, numpy scalars (the engine's logprobs) as numbers."""

import json

import numpy as np
import pytest

from mmserve.serving.router.relay import sse


def test_a_chunk_is_one_event_of_valid_json_equal_to_the_chunk():
    chunk = {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": "héllo, 世界"},
                                              "logprobs": {"content": [{"logprob": np.float64(-0.25),
                                                                        "top": np.float32(-1.5), "id": np.int64(7)}]},
                                              "finish_reason": None}]}
    event = sse(chunk)
    assert event.startswith("data: ") and event.endswith("\n\n") and event.count("\n") == 2
    assert "héllo, 世界" in event
    assert json.loads(event[len("data: "):]) == json.loads(json.dumps(chunk, default=lambda v: v.item()))
    assert sse("[DONE]") == "data: [DONE]\n\n"


def test_what_json_cannot_say_is_refused_not_written():
    with pytest.raises(TypeError):
        sse({"value": object()})
