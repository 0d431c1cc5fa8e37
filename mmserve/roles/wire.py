"""Converting between the gRPC messages of worker.proto and the engine's types."""

from __future__ import annotations

import json

import numpy as np

from mmserve.engine.inputs import Visual
from mmserve.engine.outputs import RequestOutput
from mmserve.rpc import worker_pb2 as pb
from mmserve.sampling_params import SamplingParams


def visual_to_pb(visual: Visual, with_pixels: bool) -> pb.Visual:
    pixels = np.ascontiguousarray(visual.pixel_values, np.float32)
    return pb.Visual(pixel_values=pixels.tobytes() if with_pixels else b"", num_patches=pixels.shape[0],
                     patch_dim=pixels.shape[1], grid_thw=[int(x) for x in visual.grid_thw.reshape(-1)])


def visual_from_pb(message: pb.Visual) -> Visual:
    grid = np.asarray(message.grid_thw, np.int64).reshape(1, 3)
    if message.pixel_values:
        pixels = np.frombuffer(message.pixel_values, np.float32).reshape(message.num_patches, message.patch_dim)
    else:
        pixels = np.zeros((0, message.patch_dim), np.float32)
    return Visual(pixels, grid)


def sampling_to_pb(params: SamplingParams) -> pb.Sampling:
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in params.__dict__.items()}
    return pb.Sampling(json=json.dumps(fields))


def sampling_from_pb(message: pb.Sampling) -> SamplingParams:
    return SamplingParams.from_dict(json.loads(message.json))


def event_from_output(output: RequestOutput, sent_tokens: int, text: str, sent_chars: int) -> pb.TokenEvent:
    """The tokens of ``output`` past the first ``sent_tokens``, and ``text`` (the output text that is
    safe to show now) past its first ``sent_chars`` characters, as one stream event: each event
    carries only what is new, so a stream costs O(its length) on the wire."""
    completion = output.outputs[0]
    event = pb.TokenEvent(request_id=output.request_id, token_ids=completion.token_ids[sent_tokens:],
                          text_delta=text[sent_chars:], finish_reason=completion.finish_reason or "")
    if isinstance(completion.stop_reason, str):
        event.stop_string = completion.stop_reason
    elif completion.stop_reason is not None:
        event.stop_token_id = completion.stop_reason
    for lp in (completion.logprobs or [])[sent_tokens:]:
        event.logprobs.append(pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                              top_ids=list(lp.top), top_logprobs=list(lp.top.values())))
    return event


def stop_reason_from_pb(event: pb.TokenEvent) -> int | str | None:
    """The stop token's id (an int) or the stop string, as the engine gave it; None otherwise."""
    which = event.WhichOneof("stop_reason")
    return None if which is None else getattr(event, which)
