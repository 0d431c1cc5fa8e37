"""``--role all``: the router and the workers as child processes on one host, each started again if
it dies."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping

from mmserve.cluster_credential import SECRET_FILE_ENV, ClusterCredential
from mmserve.engine.config import EngineConfig
from mmserve.roles.launch import (LISTENER_FD_ENV, STARTUP_FAILURE, configure_logging, http_listener,
                                  model_errors_said)
from mmserve.serving.router.auth import API_KEY_ENV


def worker_names(counts: dict[str, int]) -> list[tuple[str, str]]:
    """(role, name) of each worker ``--role all`` starts: the role's name for a role's only worker,
    ROLE-I for several."""
    return [(role, role if n == 1 else f"{role}-{i}") for role, n in counts.items() for i in range(n)]


def all_commands(args: argparse.Namespace, argv: list[str], sockets: str) -> dict[str, list[str]]:
    """``--role all``'s child processes, by name: the router and the workers. Only the router's
    HTTP port listens where ``--host`` says. The worker registry, the workers' gRPC services and
    the transfer's bootstrap registry listen on Unix sockets in the directory ``sockets``, which
    only this user can enter: a TCP port on loopback is open to every local user, who could take
    one while it is free (a child restarting) and collect the token the workers send with every
    call (the bootstrap registry's CurveZMQ keeps others out, but one who took its port first
    would keep the server from starting). So does the data plane that moves embeddings and KV
    (the zmq plane, unless ``--data-plane jax`` is asked for: the jax transfer server listens on
    loopback TCP and aborts its process on a malformed packet, which any local user can send).
    The KV events and the transfer's control sockets stay on loopback TCP, CurveZMQ, on ports
    chosen as they bind. The secret is not among the flags: the children get it in their
    environment."""
    base = [sys.executable, os.path.abspath(sys.argv[0]),
            *_without(_without(_without(argv, "--role"), "--cluster-secret-file"), "--workers")]
    registry, bootstrap = os.path.join(sockets, "registry.sock"), os.path.join(sockets, "bootstrap.sock")
    # --drain-timeout 0: stopped, the whole server stops at once (its router with the workers), as vLLM's does
    worker = base + ["--router-url", f"unix:{registry}", "--bootstrap", f"ipc://{bootstrap}",
                     "--port", "0", "--host", "127.0.0.1", "--drain-timeout", "0", "--data-plane-dir", sockets]
    commands = {"router": base + ["--role", "router", "--registry-socket", registry,
                                  "--registry-host", "127.0.0.1", "--bootstrap-socket", bootstrap]}
    workers = worker_names(args.workers)
    commands |= {name: worker + ["--role", role, "--name", name, "--grpc-socket", os.path.join(sockets, f"{name}.sock")]
                 for role, name in workers}
    # Prefill and decode publish KV events (loopback, any free port, CurveZMQ keys from this run's
    # secret) so that the router knows which prompts prefill holds: a later turn of a chat then
    # asks prefill before encode instead of encoding its picture again for nothing.
    events = ["--kv-events-endpoint", "tcp://127.0.0.1:*", "--kv-events-replay-endpoint", "tcp://127.0.0.1:*"]
    for role, name in workers:
        if role in ("prefill", "decode"):
            commands[name] += events
    return commands


def serve_all(args: argparse.Namespace, argv: list[str], engine: EngineConfig) -> int:
    """The router and the workers (``--workers``; one per role by default), as child processes on
    loopback, each started again if it dies (:mod:`mmserve.roles.supervisor`); SIGTERM, Ctrl-C or
    SIGHUP stops them all, a second one at once."""
    from mmserve.roles.supervisor import Supervisor
    from transfer.zmq_plane import remove_sockets_of

    from models.qwen3_vl_moe import load_model

    configure_logging("all", args.log_level)
    listener = http_listener(args.host, args.port, "--port")  # before any child; the router's for good
    with model_errors_said(args.model):  # before any child: each would fail on it, and be restarted
        engine.check_model(load_model(args.model, dtype=args.dtype, weights=False).config)
    remove_stale_socket_dirs(tempfile.gettempdir())
    sockets = tempfile.mkdtemp(prefix=f"{SOCKET_DIR_PREFIX}{os.getpid()}-")  # mode 0700: this user's processes only
    try:
        commands = all_commands(args, argv, sockets)
        env, own = child_environments(os.environ, ClusterCredential.generate().environment())
        own.setdefault("router", {})[LISTENER_FD_ENV] = str(listener.fileno())
        # a worker killed with SIGKILL leaves its data plane's socket file: removed as it is restarted
        supervisor = Supervisor(commands, env, sockets, own, on_exit=lambda pid: remove_sockets_of(sockets, pid),
                                pass_fds={"router": (listener.fileno(),)})
        # A second one kills the children at once. SIGHUP (the terminal or ssh session closing)
        # stops them as SIGTERM does: the children, in process groups of their own, do not get it,
        # and were SIGKILLed undrained when the supervisor died of it.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda *_: supervisor.request_stop())
        try:
            started = supervisor.start().run()
        finally:
            supervisor.stop()
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
        listener.close()
    if not started:
        print(f"serve.py: the {supervisor.failed} process could not start; see its log above", file=sys.stderr)
        return STARTUP_FAILURE
    return 0


SOCKET_DIR_PREFIX = "mmserve-"
"""A ``--role all`` server's socket directory is SOCKET_DIR_PREFIX + its pid + "-" + random."""
_SOCKET_DIR = re.compile(re.escape(SOCKET_DIR_PREFIX) + r"(\d+)-[A-Za-z0-9_]+")


def remove_stale_socket_dirs(parent: str) -> list[str]:
    """Removes the socket directories in ``parent`` that this user's ``--role all`` servers left
    when they were killed (SIGKILL, a power cut: no clean-up ran), those whose server's pid is no
    longer running; returns their paths. A pid used again since only leaves its directory for a
    later start to remove."""
    removed = []
    for entry in os.scandir(parent):
        match = _SOCKET_DIR.fullmatch(entry.name)
        if (not match or not entry.is_dir(follow_symlinks=False)
                or entry.stat(follow_symlinks=False).st_uid != os.getuid()):
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # running (or another user's process: not ours to judge)
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


def child_environments(environ: Mapping[str, str], credential: Mapping[str, str]
                       ) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """The environment every child gets (this run's cluster secret, not a secret file's path), and
    what the router alone gets besides: the HTTP API key, which no worker uses."""
    env = dict(environ) | dict(credential)
    env.pop(SECRET_FILE_ENV, None)
    key = env.pop(API_KEY_ENV, None)
    return env, ({"router": {API_KEY_ENV: key}} if key else {})


def _without(argv: list[str], flag: str) -> list[str]:
    """argv less ``flag`` and its value (either form: ``--flag value`` or ``--flag=value``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out
