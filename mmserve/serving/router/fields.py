"""The request fields the OpenAI endpoints share: model, n, stream, max_tokens and sampling.

OpenAI rejects an argument it does not know; so does this router, listing per endpoint what it
accepts. Besides OpenAI's sampling fields it takes vLLM's extensions (top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids, include_stop_str_in_output, min_tokens,
return_tokens_as_token_ids), which the ``openai``
client sends through ``extra_body``. A null value means the field is absent, as OpenAI treats it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mmserve.sampling_params import MAX_N, SamplingParams
from mmserve.serving.router.errors import InvalidRequest
from mmserve.serving.router.settings import RouterSettings

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "ignore_eos", "stop_token_ids",
                   "include_stop_str_in_output", "min_tokens", "logit_bias")
COMMON_FIELDS = {"model", "n", "stream", "stream_options", "user", "return_tokens_as_token_ids", "cache_salt",
                 *SAMPLING_FIELDS}
PARAMS_FIELDS = {field.name for field in dataclasses.fields(SamplingParams)}


@dataclasses.dataclass(frozen=True)
class CommonFields:
    """What every OpenAI endpoint reads the same way; ``sampling`` still lacks max_tokens and logprobs."""

    stream: bool
    include_usage: bool
    tokens_as_ids: bool
    sampling: dict[str, Any]
    n: int = 1
    continuous_usage: bool = False
    """vLLM's ``stream_options.continuous_usage_stats`` (with ``include_usage``): every chunk carries
    the usage so far, not only the last."""


def json_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    return without_nulls(body)


def without_nulls(value: Mapping[str, Any]) -> dict[str, Any]:
    """``value`` without its null fields: a null means absent, in the body and in the objects in it
    (messages, tool calls, tools), which the ``openai`` client's ``model_dump()`` of a reply fills
    with nulls (``refusal``, ``audio``, ``function_call``...)."""
    return {key: item for key, item in value.items() if item is not None}


def check_known(body: Mapping[str, Any], allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise InvalidRequest(f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")


def common_fields(body: Mapping[str, Any], settings: RouterSettings,
                  defaults: Mapping[str, Any] | None = None) -> CommonFields:
    """``defaults``: the checkpoint's recommended sampling (``Model.sampling_defaults``), for the
    sampling fields the request leaves out or sends as null, as vLLM's ``--generation-config auto``."""
    model = body.get("model", settings.model_name)
    if model != settings.model_name:
        raise InvalidRequest(f"The model {model!r} does not exist; this server serves {settings.model_name!r}",
                             "model", "model_not_found")
    if "user" in body and not isinstance(body["user"], str):
        raise InvalidRequest(f"user must be a string, got {body['user']!r}", "user")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise InvalidRequest(f"n must be an integer in [1, {MAX_N}], got {n!r}", "n")
    stream = _bool(body, "stream")
    options = body.get("stream_options", {})
    if "stream_options" in body and not stream:
        raise InvalidRequest("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise InvalidRequest("stream_options takes only include_usage and continuous_usage_stats", "stream_options")
    include_usage, continuous = _bool(options, "include_usage"), _bool(options, "continuous_usage_stats")
    return CommonFields(stream, include_usage, _bool(body, "return_tokens_as_token_ids"),
                        with_defaults({name: body[name] for name in SAMPLING_FIELDS if name in body}, defaults), n,
                        include_usage and continuous)


def with_defaults(sampling: Mapping[str, Any], defaults: Mapping[str, Any] | None) -> dict[str, Any]:
    """A request's sampling fields over the checkpoint's recommended ones (a null is no value)."""
    return dict(defaults or {}) | {name: value for name, value in sampling.items() if value is not None}


def requested_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidRequest(f"{name} must be an integer, got {value!r}", name)
    return value


def sampling_params(fields: Mapping[str, Any], param_names: Mapping[str, str] | None = None,
                    vocab_size: int | None = None) -> SamplingParams:
    """``SamplingParams.from_dict`` with its ValueError as a 400; its messages start with the field
    name, which ``param_names`` maps back to the request's own name when they differ. A logit_bias
    naming a token past ``vocab_size`` is a 400 too."""
    try:
        params = SamplingParams.from_dict(fields)
    except ValueError as error:
        first = str(error).split(" ", 1)[0]
        param = first if first in PARAMS_FIELDS else None
        raise InvalidRequest(str(error), (param_names or {}).get(param, param)) from None
    if vocab_size is not None and params.logit_bias and params.logit_bias[-1][0] >= vocab_size:
        raise InvalidRequest(f"logit_bias names token {params.logit_bias[-1][0]}, outside the model's vocabulary "
                             f"(size {vocab_size})", (param_names or {}).get("logit_bias", "logit_bias"))
    return params


def _bool(body: Mapping[str, Any], name: str) -> bool:
    """``name``'s value; absent and null are false (a null inside an object too, as at the top level)."""
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be a boolean, got {value!r}", name)
    return value
