"""Converting between the gRPC messages of worker.proto and the engine's types."""

from __future__ import annotations

import json
import math
import time

import numpy as np

from mmserve.engine.inputs import EncodedMedia, PreparedPrompt, Visual
from mmserve.engine.output_stream import OutputDelta
from mmserve.rpc import worker_pb2 as pb
from mmserve.sampling_params import SamplingParams
from mmserve.structured_output import StructuredOutput


def visual_to_pb(visual: Visual, with_source: bool) -> pb.Visual:
    """The grid and content key, and with ``with_source`` the client's encoded file as it came
    (encode decodes it; prefill needs the grid and key alone)."""
    if with_source and visual.source is None:
        raise ValueError("images and videos travel to encode as the client's encoded files")
    return pb.Visual(grid_thw=[int(x) for x in visual.grid_thw.reshape(-1)],
                     encoded=visual.source.data if with_source else b"", content_key=visual.content_key)


def visual_from_pb(message: pb.Visual, kind: str) -> Visual:
    """``kind``: "image" or "video", the list the message came in."""
    grid = np.asarray(message.grid_thw, np.int64).reshape(1, 3)
    if len(message.content_key) != 32:
        raise ValueError(f"a visual needs its 32-byte content key, got {len(message.content_key)} bytes")
    return Visual(grid, source=EncodedMedia(kind, message.encoded) if message.encoded else None,
                  content_key=message.content_key)


def prompt_from_pb(request: pb.PrefillRequest | pb.DecodeRequest) -> PreparedPrompt:
    """The prompt a prefill or decode request carries: token ids, pictures (grids and content keys),
    cache salt."""
    return PreparedPrompt(list(request.token_ids), [visual_from_pb(v, "image") for v in request.images],
                          [visual_from_pb(v, "video") for v in request.videos], request.cache_salt or None)


def sampling_to_pb(params: SamplingParams) -> pb.Sampling:
    """The plain fields as JSON; the structured output (a schema or structural tag every role
    compiles into the same grammar) as its own typed message."""
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in params.__dict__.items()
              if k != "structured_output"}
    message = pb.Sampling(json=json.dumps(fields))
    if params.structured_output is not None:
        setattr(message.structured_output, params.structured_output.kind, params.structured_output.text)
    return message


def sampling_from_pb(message: pb.Sampling) -> SamplingParams:
    fields = json.loads(message.json)
    if isinstance(fields, dict) and message.HasField("structured_output"):
        spec = message.structured_output
        fields["structured_output"] = StructuredOutput(spec.json_schema, spec.structural_tag, spec.regex, spec.grammar)
    return SamplingParams.from_dict(fields)


def deadline_from_pb(timeout_s: float) -> float:
    """The request's deadline on this process's clock, from the seconds it had left when the router
    sent it (0: none). The time the message spent on the way is not counted."""
    return time.monotonic() + timeout_s if timeout_s > 0 else math.inf


def event_to_pb(request_id: str, delta: OutputDelta) -> pb.TokenEvent:
    """One stream event: only what is new (tokens, logprobs, text), so a stream costs O(its length)
    on the wire."""
    event = pb.TokenEvent(request_id=request_id, token_ids=delta.token_ids, text_delta=delta.text_delta,
                          finish_reason=delta.finish_reason or "")
    if isinstance(delta.stop_reason, str):
        event.stop_string = delta.stop_reason
    elif delta.stop_reason is not None:
        event.stop_token_id = delta.stop_reason
    for lp in delta.logprobs or []:
        event.logprobs.append(pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                              top_ids=list(lp.top), top_logprobs=list(lp.top.values())))
    return event


def stop_reason_from_pb(event: pb.TokenEvent) -> int | str | None:
    """The stop token's id (an int) or the stop string, as the engine gave it; None otherwise."""
    which = event.WhichOneof("stop_reason")
    return None if which is None else getattr(event, which)
