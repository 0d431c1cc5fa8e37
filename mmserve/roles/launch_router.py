"""Starting the router: the transfer bootstrap registry, the worker registry, the index of what each
worker holds, and the HTTP API over the workers that register."""

from __future__ import annotations

import argparse
import asyncio
import functools
import signal

from mmserve.config_flags import config_from_args
from mmserve.engine.config import EngineConfig
from mmserve.roles.launch import (LISTENER_FD_ENV, STARTUP_FAILURE, cluster_credential, configure_logging,
                                  model_errors_said, require_free_port, require_free_socket, stop_on_sigterm,
                                  transfer_config)
from mmserve.roles.routing import RoutingConfig
from mmserve.roles.supervisor import Liveness, mark_ready


def serve_router(args: argparse.Namespace, engine: EngineConfig, settings) -> int:
    from mmserve.roles.prefix_index import KVEventFeed, PrefixIndex
    from mmserve.roles.router_backend import DisaggregatedBackend
    from mmserve.roles.worker_pool import WorkerPool, serve_registry
    from mmserve.roles.routing import WorkerChooser
    from mmserve.serving.http_server import run_event_loop, serve_http
    from mmserve.serving.router import build_app
    from models.qwen3_vl_moe import load_model
    import zmq

    from transfer.bootstrap import BootstrapServer
    from transfer.unix_socket import SocketInUse

    configure_logging("router", args.log_level)
    credential = cluster_credential(args)
    if credential is None:
        return 2
    transfer = transfer_config(args, credential.transfer_key)
    listener = inherited_listener()
    if listener is None:
        require_free_port(args.host, args.port, "--port")
    if not args.registry_socket:
        require_free_port(args.registry_host or args.host, args.registry_port, "--registry-port")
    else:
        require_free_socket(args.registry_socket, "--registry-socket")
    where = f"ipc://{args.bootstrap_socket}" if args.bootstrap_socket else None
    try:
        bootstrap = BootstrapServer(transfer, port=args.bootstrap_port, endpoint=where).start()
    except (zmq.ZMQError, SocketInUse) as error:
        flag = f"--bootstrap-socket {args.bootstrap_socket}" if where else f"--bootstrap-port {args.bootstrap_port}"
        raise SystemExit(f"serve.py: the transfer bootstrap registry cannot listen on {flag}: {error}") from None
    with model_errors_said(args.model):
        frontend = load_model(args.model, dtype=args.dtype, weights=False)
    index = PrefixIndex()
    feed = KVEventFeed(index, credential.kv_event_keys)
    chooser = WorkerChooser(config_from_args(RoutingConfig, args, prefix=""), index, functools.partial(
        _prompt_pages, frontend))
    pool = WorkerPool(credential.grpc_token, chooser, feed, model_fingerprint=frontend.fingerprint)
    backend = DisaggregatedBackend(pool)
    app = build_app(backend, frontend, settings, on_shutdown=feed.close)

    async def keep_alive() -> None:  # a supervising --role all restarts a router whose loop stopped turning
        liveness = Liveness()
        while True:
            liveness.renew()
            await asyncio.sleep(Liveness.INTERVAL_S)

    async def main() -> bool:
        registry = await serve_registry(pool, args.registry_host or args.host, args.registry_port, args.registry_socket)
        alive = asyncio.create_task(keep_alive())
        try:
            return await serve_http(app, backend, args.host, args.port, args.log_level, on_listening=mark_ready,
                                    listener=listener)
        finally:
            alive.cancel()
            await registry.stop(grace=1)

    # SIGTERM ends the router through its finally blocks, as it does a worker (``join_role``): the
    # HTTP server re-raises the signal once it has shut down, and a process killed by it flushes
    # nothing (the trace's last spans were lost).
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        started = run_event_loop(main())
    finally:
        bootstrap.close()
    return 0 if started else STARTUP_FAILURE  # (a port taken, the app's start-up failing: as colocated's)


def inherited_listener():
    """The HTTP listening socket a supervising ``--role all`` bound for its routers, if any."""
    import os
    import socket

    fd = os.environ.get(LISTENER_FD_ENV)
    return socket.socket(fileno=int(fd)) if fd else None


def _prompt_pages(model, prompt, page_size: int) -> list[bytes]:
    """The keys of a prompt's full KV pages, as a prefill worker with ``page_size`` computes them."""
    from mmserve.engine.page_hash import prompt_page_keys

    return prompt_page_keys(prompt, model, page_size).first(
        len(prompt.token_ids) // page_size, lambda start, end: prompt.token_ids[start:end])
