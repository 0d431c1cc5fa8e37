"""Starting a worker (encode, prefill or decode): its credential, its role's processes joined, its
model loaded, then its gRPC service registered with the router; a follower process of a role
spanning several runs what its leader publishes instead."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from mmserve.cluster_credential import ClusterCredential
from mmserve.config_flags import config_from_args
from mmserve.engine.config import EngineConfig
from mmserve.kv_events import KVEventsConfig
from mmserve.roles.launch import (cluster_credential, configure_logging, follow_leader, join_role, load_role_model,
                                  require_free_port, require_free_socket, transfer_config, worker_stop_s)
from transfer.config import TransferConfig
from transfer.messages import MAX_NAME_LENGTH


def serve_worker_role(args: argparse.Namespace, engine: EngineConfig) -> int:
    from mmserve.roles.worker import serve_worker

    if not args.bootstrap or not args.router_url:
        print("serve.py: a worker needs --bootstrap and --router-url", file=sys.stderr)
        return 2
    configure_logging(args.role, args.log_level)
    credential = cluster_credential(args)
    if credential is None:
        return 2
    transfer = transfer_config(args, credential.transfer_key)
    name = args.name or f"{args.role}-{socket.gethostname()}-{os.getpid()}"
    if len(name) > MAX_NAME_LENGTH:  # the registry would refuse every lookup of it
        print(f"serve.py: the worker's name is {len(name)} characters, at most {MAX_NAME_LENGTH} (--name)",
              file=sys.stderr)
        return 2
    if not args.grpc_socket:
        require_free_port(args.host, args.port, "--port")
    else:
        require_free_socket(args.grpc_socket, "--grpc-socket")
    lockstep, layout = join_role(args, credential)
    try:  # whatever ends the leader, its followers are told to stop
        model = load_role_model(args, engine, layout)
        if not lockstep.is_leader:
            return follow_leader(args.role, model, engine, layout, lockstep, transfer,
                                     worker_stop_s(args.drain_timeout))
        service = _role_service(args, model, engine, transfer, name, layout, lockstep, credential)
        serve_worker(service, args.host, args.port, _strip_scheme(args.router_url), credential.grpc_token,
                     model.fingerprint, transfer.advertise_host, args.grpc_socket, args.drain_timeout)
    finally:
        lockstep.close()
    return 0


def _role_service(args, model, engine: EngineConfig, transfer: TransferConfig, name: str, layout, lockstep,
                  credential: ClusterCredential):
    kv_events = config_from_args(KVEventsConfig, args, prefix="").publisher(credential.kv_event_keys)
    if args.role == "encode":
        from mmserve.roles.encode import EncodeRole, encode_service

        return encode_service(EncodeRole(model, engine, transfer, name, args.bootstrap, layout, lockstep))
    if args.role == "prefill":
        from mmserve.roles.prefill import PrefillRole, prefill_service

        return prefill_service(PrefillRole(model, engine, transfer, name, args.bootstrap, layout, lockstep,
                                           kv_events))
    from mmserve.roles.decode import DecodeRole, decode_service

    return decode_service(DecodeRole(model, engine, transfer, name, args.bootstrap, layout, lockstep, kv_events))


def _strip_scheme(url: str) -> str:
    """A gRPC target from a URL: http://HOST:PORT/ -> HOST:PORT; unix:PATH stays as it is."""
    return url if url.startswith("unix:") else url.split("://", 1)[-1].rstrip("/")
