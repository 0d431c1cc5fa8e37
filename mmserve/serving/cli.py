"""``scripts/serve.py``'s command line: one parser for every role, one launcher per role.

``colocated`` serves the OpenAI-compatible router over one in-process engine; the disaggregated
roles (encode, prefill, decode, router, all) are launched by ``mmserve.roles.launch``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path

from mmserve.engine.config import EngineConfig
from mmserve.engine.warmup import CACHE_ENV, default_cache_dir, use_compilation_cache
from mmserve.serving.router.settings import RouterSettings
from models.qwen3_vl_moe.moe_dispatch import STRATEGIES as MOE_STRATEGIES
from mmserve.roles.launch import add_arguments as add_role_arguments
from mmserve.roles.launch import configure_logging, follow_leader, join_role, load_role_model

ROLES = ("encode", "prefill", "decode", "router", "colocated", "all")
API_KEY_ENV = "MMSERVE_API_KEY"
USAGE_EXIT = 2  # argparse's status for a command line it refuses
STARTUP_FAILURE = 3  # uvicorn's status when the server did not start
ENGINE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
ROUTER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RouterSettings)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve.py", description="Serve Qwen3-VL-MoE: one role of the "
                                "disaggregated pipeline, or the whole of it behind an OpenAI-compatible API.")
    p.add_argument("--role", choices=ROLES, default="all",
                   help="what this process runs: encode (vision tower), prefill, decode, router (the HTTP "
                        "front), colocated (all three stages in this process, no transfer, with the HTTP "
                        "API), or all (one process of each role on loopback plus the router)")

    model = p.add_argument_group("model")
    model.add_argument("--model", default="tiny",
                       help="'tiny' (built-in random weights, offline), a Hugging Face checkpoint directory "
                            "or an orbax directory written by Model.save_orbax")
    model.add_argument("--dtype", default="float32", help="parameter and compute dtype: float32 or bfloat16")
    model.add_argument("--moe-dispatch", default="auto", choices=("auto", *MOE_STRATEGIES),
                       help="how MoE layers send tokens to their experts: auto picks grouped on an unsharded "
                            "CPU model and ragged_dot elsewhere (default: auto)")
    model.add_argument("--served-model-name", default=None,
                       help="the name clients pass as 'model' and /v1/models lists (default: --model)")

    http = p.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    http.add_argument("--port", type=int, default=8000, help="TCP port of the HTTP API")
    http.add_argument("--api-key-file", type=Path, default=None,
                      help=f"require 'Authorization: Bearer <key>' on /v1/* and /generate, the key read from this file "
                           f"(default: the key in ${API_KEY_ENV}; neither: no key). Never the key itself on the "
                           f"command line, which every local user can read")
    http.add_argument("--allowed-local-media-path", type=Path, default=None,
                      help="let requests name images by local path or file:// URL inside this directory "
                           "(default: local files are refused)")
    http.add_argument("--max-body-bytes", type=positive(int), default=ROUTER_DEFAULTS["max_body_bytes"],
                      help="largest request body; a larger one gets a 413, a chunked one as soon as it passes "
                           "the limit (default: %(default)s, 32 MiB)")
    http.add_argument("--request-read-timeout", type=positive(float), default=ROUTER_DEFAULTS["request_read_timeout"],
                      help="seconds a client has to send its whole body once its headers are in; then a 408 and "
                           "the connection is closed (default: %(default)s)")
    http.add_argument("--max-image-pixels", type=positive(int), default=ROUTER_DEFAULTS["max_image_pixels"],
                      help="most pixels (width x height) an image may have, read from its header before it is "
                           "decoded; more is a 400 (default: %(default)s, twice the Qwen3-VL processor's bound)")
    http.add_argument("--max-images-per-request", type=positive(int),
                      default=ROUTER_DEFAULTS["max_images_per_request"],
                      help="most images one request may carry; more is a 400 (default: %(default)s)")
    http.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                      help="server log verbosity")

    admission = p.add_argument_group("admission (how much the router lets in, and for how long)")
    admission.add_argument("--max-queued-requests", type=int, default=ROUTER_DEFAULTS["max_queued_requests"],
                           help="requests that may wait for capacity once the workers hold all they can; beyond "
                                "them a request gets 429 with Retry-After (default: %(default)s)")
    admission.add_argument("--queue-timeout", type=float, default=ROUTER_DEFAULTS["queue_timeout_s"],
                           help="seconds a request may wait for capacity before it gets 503 with Retry-After "
                                "(default: %(default)s)")
    admission.add_argument("--request-timeout", type=float, default=ROUTER_DEFAULTS["request_timeout_s"],
                           help="seconds a request may take from admission to its last token; then it is aborted "
                                "in every role and answered with an error; 0: no limit (default: %(default)s)")
    admission.add_argument("--stream-stall-timeout", type=float, default=ROUTER_DEFAULTS["stream_stall_timeout_s"],
                           help="seconds a streaming client may leave its full buffer unread before its request is "
                                "cut and its slot freed (default: %(default)s)")

    engine = p.add_argument_group("engine (KV cache and batching)")
    engine.add_argument("--page-size", type=int, default=ENGINE_DEFAULTS["page_size"], help="tokens per KV page")
    engine.add_argument("--num-pages", type=int, default=ENGINE_DEFAULTS["num_pages"],
                        help="KV pages in the cache, page 0 being scratch (default: as many as --kv-cache-bytes holds)")
    engine.add_argument("--kv-cache-bytes", type=int, default=ENGINE_DEFAULTS["kv_cache_bytes"],
                        help="memory for the KV cache when --num-pages is not given")
    engine.add_argument("--max-model-len", type=int, default=ENGINE_DEFAULTS["max_model_len"],
                        help="longest sequence, prompt plus output; longer requests get a 400")
    engine.add_argument("--max-num-seqs", type=int, default=ENGINE_DEFAULTS["max_num_seqs"],
                        help="most sequences decoding at once")
    engine.add_argument("--max-prefill-tokens", type=int, default=ENGINE_DEFAULTS["max_prefill_tokens"],
                        help="token budget of one prefill step; longer prompts are prefilled in chunks")
    engine.add_argument("--max-prefill-seqs", type=int, default=ENGINE_DEFAULTS["max_prefill_seqs"],
                        help="most prompts in one prefill step")
    engine.add_argument("--no-precompile", dest="precompile", action="store_false",
                        help="compile programs on first use instead of compiling every shape bucket before "
                             "serving (faster start, multi-second stalls on the first requests of each shape)")
    engine.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                        help="recompute every prompt instead of reusing the KV pages of a prefix (a system "
                             "prompt, an earlier turn about the same image) that an earlier request computed")
    engine.add_argument("--compilation-cache", default=default_cache_dir(),
                        help=f"directory of jax's persistent compilation cache, so a restart loads compiled "
                             f"programs instead of compiling them; '' turns it off (default: ${CACHE_ENV} or "
                             f"%(default)s)")
    add_role_arguments(p)
    return p


def positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type: a number of ``kind`` above zero."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n int' if kind is int else ' number'}: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    use_compilation_cache(args.compilation_cache)
    return LAUNCHERS[args.role](args)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(page_size=args.page_size, num_pages=args.num_pages, kv_cache_bytes=args.kv_cache_bytes,
                        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                        max_prefill_tokens=args.max_prefill_tokens, max_prefill_seqs=args.max_prefill_seqs,
                        precompile=args.precompile, enable_prefix_caching=args.enable_prefix_caching)


def router_settings(args: argparse.Namespace, max_model_len: int) -> RouterSettings:
    return RouterSettings(model_name=args.served_model_name or args.model, max_model_len=max_model_len,
                          api_key=api_key(args), allowed_local_media_path=args.allowed_local_media_path,
                          max_queued_requests=args.max_queued_requests, queue_timeout_s=args.queue_timeout,
                          request_timeout_s=args.request_timeout or None,
                          stream_stall_timeout_s=args.stream_stall_timeout,
                          max_body_bytes=args.max_body_bytes, request_read_timeout=args.request_read_timeout,
                          max_image_pixels=args.max_image_pixels, max_images_per_request=args.max_images_per_request)


def api_key(args: argparse.Namespace) -> str | None:
    """The HTTP API key: ``--api-key-file``'s content, else $MMSERVE_API_KEY, else none."""
    if args.api_key_file is not None:
        return args.api_key_file.read_text().strip() or None
    return os.environ.get(API_KEY_ENV) or None


def serve_colocated(args: argparse.Namespace) -> int:
    """The HTTP API over one engine in this process: the reference the disaggregated roles must equal."""
    from mmserve.serving.colocated import ColocatedBackend
    from mmserve.serving.http_server import serve_http
    from mmserve.serving.router import build_app

    try:
        config = engine_config(args)
    except ValueError as error:
        print(f"serve.py: error: {error}", file=sys.stderr)
        return USAGE_EXIT
    configure_logging("colocated", args.log_level)
    lockstep, layout = join_role(args)
    try:  # whatever ends the leader, its followers are told to stop
        model = load_role_model(args, layout)
        if not lockstep.is_leader:
            return follow_leader("colocated", model, config, layout, lockstep)
        backend = ColocatedBackend(model, config, layout, lockstep)
        app = build_app(backend, model, router_settings(args, config.max_model_len), on_shutdown=backend.close)
        started = asyncio.run(serve_http(app, backend, args.host, args.port, args.log_level))
    finally:
        lockstep.close()
    return 0 if started else STARTUP_FAILURE


def serve_worker(args: argparse.Namespace) -> int:
    """encode, prefill or decode: a worker that registers with the router (mmserve.roles)."""
    from mmserve.roles.launch import serve_worker_role

    return serve_worker_role(args, engine_config(args))


def serve_router(args: argparse.Namespace) -> int:
    """The HTTP API over the registered encode/prefill/decode workers."""
    from mmserve.roles.launch import serve_router as launch_router

    config = engine_config(args)
    return launch_router(args, config, router_settings(args, config.max_model_len))


def serve_all(args: argparse.Namespace) -> int:
    """One process of each role on loopback plus the router: the whole pipeline on one machine."""
    from mmserve.roles.launch import serve_all as launch_all

    return launch_all(args, sys.argv[1:])


LAUNCHERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "encode": serve_worker,
    "prefill": serve_worker,
    "decode": serve_worker,
    "router": serve_router,
    "colocated": serve_colocated,
    "all": serve_all,
}
