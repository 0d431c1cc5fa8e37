"""``POST /generate``: the native endpoint, token ids in or out, no chat template applied.

In: ``prompt`` (raw text, image placeholders written by the client) or ``prompt_token_ids``,
``images`` (base64 strings or data URLs, one per placeholder, in order), ``videos`` (data URLs, one
per video placeholder, in order; frames sampled as the chat endpoint samples them), ``sampling_params``
(``SamplingParams`` fields, a structured output as SGLang's ``json_schema``, ``regex`` or ``ebnf``) and
``cache_salt`` (as in the OpenAI endpoints). Out: ``token_ids``, ``text``, ``finish_reason`` and ``meta``.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mmserve.sampling_params import SamplingParams
from mmserve.serving.backend import GenerateRequest
from mmserve.serving.router.context import RouterContext, new_request_id
from mmserve.serving.router.errors import InvalidRequest, backend_error_response
from mmserve.serving.router.fields import (PARAMS_FIELDS, check_known, json_object, requested_int, sampling_params,
                                          with_defaults)
from mmserve.serving.router.json_body import json_body
from mmserve.serving.router.media import MediaReader
from mmserve.serving.router.prompts import max_tokens_in_context, prepare
from mmserve.serving.router.relay import collect, unless_disconnected
from mmserve.serving.router.response_format import native_structured_output
from mmserve.tracing import http_parent

ENDPOINT = "generate"
NATIVE_FIELDS = {"prompt", "prompt_token_ids", "images", "videos", "sampling_params", "cache_salt"}
DEFAULT_MAX_TOKENS = SamplingParams().max_tokens


async def generate(request: Request) -> Response:
    router = RouterContext.of(request)
    body = json_object(await json_body(request))
    check_known(body, NATIVE_FIELDS)
    sampling = body.get("sampling_params", {})
    if not isinstance(sampling, dict):
        raise InvalidRequest("sampling_params must be an object", "sampling_params")
    if "structured_output" in sampling:
        raise InvalidRequest("sampling_params takes a structured output as json_schema, regex or ebnf",
                             "sampling_params.structured_output")
    sampling = dict(sampling)
    structured = await native_structured_output(sampling, router.backend)
    prompt = await prepare(lambda: _prompt(body, router.media_reader()), router.model,
                           router.settings.max_model_len, "prompt", body)
    max_tokens = max_tokens_in_context(len(prompt.token_ids), requested_int(sampling, "max_tokens"),
                                       DEFAULT_MAX_TOKENS, router.settings.max_model_len,
                                       "prompt", "sampling_params.max_tokens")
    fields = {"max_tokens": max_tokens, "structured_output": structured}
    params = sampling_params(with_defaults(sampling, router.model.sampling_defaults) | fields,
                             {name: f"sampling_params.{name}" for name in PARAMS_FIELDS},
                             router.model.config.text.vocab_size)
    if params.n != 1:
        raise InvalidRequest("/generate answers one sequence; ask /v1/completions for n of them", "sampling_params.n")
    generate_request = GenerateRequest(new_request_id("gen"), prompt, params)
    arrival = time.monotonic()  # prepared: from here on the server's time (metrics.py)
    parent = http_parent(request.headers)
    events = await unless_disconnected(request, lambda: router.relay(generate_request, ENDPOINT, arrival, parent))
    if events is None:  # it left while queued: its place in the queue is free
        router.metrics.requests.labels(ENDPOINT, "aborted").inc()
        return Response(status_code=499)
    answer = await unless_disconnected(request, lambda: collect(events))
    if answer is None:
        return Response(status_code=499)  # nobody is listening; the request was aborted
    if answer.error is not None:
        return backend_error_response(answer.error, answer.invalid)
    meta = {"request_id": generate_request.request_id, "prompt_tokens": len(prompt.token_ids),
            "completion_tokens": len(answer.token_ids), "stop_reason": answer.stop_reason}
    if params.logprobs is not None:
        meta["logprobs"] = [{"token_id": e.token_id, "logprob": e.logprob,
                             "top": {str(t): lp for t, lp in e.top.items()}} for e in answer.logprobs]
    return JSONResponse({"token_ids": answer.token_ids, "text": answer.text, "finish_reason": answer.finish_reason,
                         "meta": meta})


def _prompt(body: dict[str, Any], reader: MediaReader) -> dict[str, Any]:
    images = body.get("images", [])
    if not isinstance(images, list):
        raise InvalidRequest("images must be a list of base64 strings", "images")
    read = [reader.from_url(data, f"images[{i}]") if isinstance(data, str) and data.startswith("data:")
            else reader.from_base64(data, f"images[{i}]") for i, data in enumerate(images)]
    videos = body.get("videos", [])
    if not isinstance(videos, list):
        raise InvalidRequest("videos must be a list of data URLs", "videos")
    media = {"image": read, "video": [reader.video_from_url(url, f"videos[{i}]") for i, url in enumerate(videos)]}
    prompt = {key: body[key] for key in ("prompt", "prompt_token_ids") if key in body}
    media = {kind: items for kind, items in media.items() if items}
    return prompt | ({"multi_modal_data": media} if media else {})
