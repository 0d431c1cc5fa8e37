"""``scripts/serve.py``'s command line: one parser for every role, one launcher per role.

``colocated`` serves the OpenAI-compatible router over one in-process engine; the disaggregated
roles (encode, prefill, decode, router, all) are launched by ``mmserve.roles.launch_worker``, ``launch_router`` and ``launch_all``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from mmserve.core_dumps import forbid_core_dumps
from mmserve.config_flags import DefaultsHelpFormatter, add_config_flags, config_from_args, tcp_port
from mmserve.distributed.mesh import MeshShape
from mmserve.distributed.multihost import cluster_from_args
from mmserve.engine.config import EngineConfig
from mmserve.engine.warmup import CACHE_ENV, default_cache_dir, use_compilation_cache
from mmserve.kv_events import KVEventsConfig
from mmserve.roles.routing import RoutingConfig
from mmserve.serving.router.settings import RouterSettings
from mmserve.tracing import TracingConfig, configure_tracing
from models.qwen3_vl_moe.model import AUTO_DTYPE, DTYPES
from models.qwen3_vl_moe.moe_dispatch import STRATEGIES as MOE_STRATEGIES
from mmserve.roles.launch import add_arguments as add_role_arguments
from mmserve.roles.launch import (STARTUP_FAILURE, configure_logging, follow_leader, join_role, load_role_model,
                                  require_free_port, transfer_config)
from mmserve.roles.supervisor import die_with_parent
from mmserve.serving.router.auth import API_KEY_ENV

ROLES = ("encode", "prefill", "decode", "router", "colocated", "all")
ROUTER_FIXED = ("model_name", "max_model_len", "api_key")
"""RouterSettings fields that are not flags: from --served-model-name, the engine, --api-key-file."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve.py", formatter_class=DefaultsHelpFormatter, description="Serve Qwen3-VL-MoE: one role of the "
                                "disaggregated pipeline, or the whole of it behind an OpenAI-compatible API.")
    p.add_argument("--role", choices=ROLES, default="all",
                   help="what this process runs: encode (vision tower), prefill, decode, router (the HTTP "
                        "front), colocated (all three stages in this process, no transfer, with the HTTP "
                        "API), or all (one process of each role on loopback plus the router)")

    model = p.add_argument_group("model")
    model.add_argument("--model", default="tiny",
                       help="'tiny' (built-in random weights, offline), a Hugging Face checkpoint directory "
                            "or an orbax directory written by Model.save_orbax")
    model.add_argument("--dtype", default=AUTO_DTYPE, choices=(AUTO_DTYPE, *DTYPES),
                       help="parameter and compute dtype; auto: the checkpoint's (bfloat16 for a bfloat16 or "
                       "float16 one, else float32; tiny: float32)")
    model.add_argument("--moe-dispatch", default="auto", choices=("auto", *MOE_STRATEGIES),
                       help="how MoE layers send tokens to their experts: auto picks grouped on an unsharded "
                            "CPU model and ragged_dot elsewhere; dense and gathered are for checks (default: auto)")
    model.add_argument("--served-model-name", default=None,
                       help="the name clients pass as 'model' and /v1/models lists (default: --model)")

    http = p.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    http.add_argument("--port", type=tcp_port, default=8000,
                      help="TCP port of the HTTP API (router, colocated, all); a worker's gRPC service (encode, prefill, "
                           "decode; 0: any free port)")
    http.add_argument("--api-key-file", type=Path, default=None,
                      help=f"require 'Authorization: Bearer <key>' on /v1/* and /generate, the key read from this file "
                           f"(default: the key in ${API_KEY_ENV}; neither: no key). Never the key itself on the "
                           f"command line, which every local user can read")
    http.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                      help="server log verbosity")

    add_config_flags(p, RouterSettings, "the router's limits and admission", prefix="router_", skip=ROUTER_FIXED)
    add_config_flags(p, EngineConfig, "engine (KV cache and batching)", prefix="engine_")
    p.add_argument("--compilation-cache", default=default_cache_dir(),
                   help=f"directory of jax's persistent compilation cache, so a restart loads compiled "
                        f"programs instead of compiling them; '' turns it off (default: ${CACHE_ENV} or "
                        f"%(default)s)")
    add_config_flags(p, TracingConfig, "tracing (OpenTelemetry: one trace per request across the roles)",
                     prefix="tracing_")
    add_role_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    die_with_parent()  # started by --role all (or a test): ends with its parent, kill -9 included
    forbid_core_dumps()  # before any secret is read
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # a value the configs refuse is a usage error, said before anything starts
        router_settings(args, engine_config(args).max_model_len)
        kv_events = config_from_args(KVEventsConfig, args, prefix="")
        config_from_args(RoutingConfig, args, prefix="")
        config_from_args(TracingConfig, args, prefix="tracing_")
        transfer_config(args, "")
        cluster_from_args(args)
        if args.mesh and MeshShape.parse(args.mesh).data > 1:
            raise ValueError(f"--mesh {args.mesh}: the data axis does not split a role's batch yet, so each data "
                             "replica would run every step whole; run more workers of the role instead "
                             "(--workers, more pods)")
    except (ValueError, OSError) as error:  # OSError: an --api-key-file that cannot be read
        parser.error(str(error))
    if kv_events.enabled and args.role not in ("prefill", "decode"):
        parser.error("KV events are published by prefill and decode workers: give --kv-events-endpoint to each")
    use_compilation_cache(args.compilation_cache)
    if args.role != "all":  # --role all's processes each trace themselves, with these same flags
        configure_tracing(config_from_args(TracingConfig, args, prefix="tracing_"), f"mmserve-{args.role}")
    try:
        return LAUNCHERS[args.role](args)
    except KeyboardInterrupt:  # Ctrl-C, even while loading or compiling: no traceback
        interrupted()


def interrupted() -> None:
    """Ends a process stopped by Ctrl-C before it served, at once (status 130): what the stop
    unwound is done, and the interpreter's own shutdown, with XLA's compiler threads still at
    work, crashed the process now and then (SIGSEGV)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return config_from_args(EngineConfig, args, prefix="engine_")


def router_settings(args: argparse.Namespace, max_model_len: int) -> RouterSettings:
    return config_from_args(RouterSettings, args, prefix="router_", model_name=args.served_model_name or args.model,
                            max_model_len=max_model_len, api_key=api_key(args))


def api_key(args: argparse.Namespace) -> str | None:
    """The HTTP API key: ``--api-key-file``'s content, else $MMSERVE_API_KEY, else none."""
    if args.api_key_file is not None:
        key = args.api_key_file.read_text().strip()
        if not key:  # read as "no key", it turned authentication off
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
        return key
    return os.environ.get(API_KEY_ENV) or None


def serve_colocated(args: argparse.Namespace) -> int:
    """The HTTP API over one engine in this process: the reference the disaggregated roles must equal."""
    from mmserve.serving.colocated import ColocatedBackend
    from mmserve.serving.http_server import GRACEFUL_SHUTDOWN_S, run_event_loop, serve_http
    from mmserve.serving.router import build_app

    config = engine_config(args)
    configure_logging("colocated", args.log_level)
    require_free_port(args.host, args.port, "--port")
    lockstep, layout = join_role(args)
    try:  # whatever ends the leader, its followers are told to stop
        model = load_role_model(args, config, layout)
        if not lockstep.is_leader:
            return follow_leader("colocated", model, config, layout, lockstep, leader_stop_s=GRACEFUL_SHUTDOWN_S)
        backend = ColocatedBackend(model, config, layout, lockstep)
        app = build_app(backend, model, router_settings(args, config.max_model_len), on_shutdown=backend.close)
        started = run_event_loop(serve_http(app, backend, args.host, args.port, args.log_level))
    finally:
        lockstep.close()
    return 0 if started else STARTUP_FAILURE


def serve_worker(args: argparse.Namespace) -> int:
    """encode, prefill or decode: a worker that registers with the router (mmserve.roles)."""
    from mmserve.roles.launch_worker import serve_worker_role

    return serve_worker_role(args, engine_config(args))


def serve_router(args: argparse.Namespace) -> int:
    """The HTTP API over the registered encode/prefill/decode workers."""
    from mmserve.roles.launch_router import serve_router as launch_router

    config = engine_config(args)
    return launch_router(args, config, router_settings(args, config.max_model_len))


def serve_all(args: argparse.Namespace) -> int:
    """One process of each role on loopback plus the router: the whole pipeline on one machine."""
    from mmserve.roles.launch_all import serve_all as launch_all

    return launch_all(args, sys.argv[1:], engine_config(args))


LAUNCHERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "encode": serve_worker,
    "prefill": serve_worker,
    "decode": serve_worker,
    "router": serve_router,
    "colocated": serve_colocated,
    "all": serve_all,
}
