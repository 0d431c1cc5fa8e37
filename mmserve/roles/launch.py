"""Starting the disaggregated roles from ``serve.py``'s arguments: the flags, and what every role's
process does the same way (its logging, the cluster's credential, joining the role's other
processes, loading the model). Each kind of process starts in its own module: a worker
(:mod:`mmserve.roles.launch_worker`), the router (:mod:`mmserve.roles.launch_router`), and
``--role all``, which starts both kinds as child processes (:mod:`mmserve.roles.launch_all`).

The router hosts two small registries besides the HTTP API: the transfer bootstrap registry (ZMQ,
``--bootstrap-port``) where senders publish their endpoints, and the worker registry (gRPC,
``--registry-port``) where workers announce themselves. A worker serves its gRPC Worker service
on ``--port`` and is pointed at both registries with
``--router-url HOST:REGISTRY_PORT`` and ``--bootstrap tcp://HOST:BOOTSTRAP_PORT``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time

from mmserve.cluster_credential import ClusterCredential, MissingCredential
from mmserve.config_flags import add_config_flags, config_from_args, seconds, tcp_port
from mmserve.distributed.multihost import add_cluster_flags
from mmserve.engine.config import EngineConfig
from mmserve.kv_events import KVEventsConfig
from mmserve.roles.routing import RoutingConfig
from transfer.config import ENV as TRANSFER_ENV
from transfer.config import SECRET_FIELDS, TransferConfig

log = logging.getLogger("mmserve")
STARTUP_FAILURE = 3  # uvicorn's status when the server did not start; --role all's when a process cannot start
WORKER_ROLES = ("encode", "prefill", "decode")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("disaggregation")
    group.add_argument("--router-url", default=None,
                       help="worker (required): the router's worker registry it registers at, HOST:PORT (the router's "
                            "--registry-port) or unix:PATH (its --registry-socket)")
    group.add_argument("--bootstrap", default=None,
                       help="worker (required): the transfer bootstrap registry, tcp://HOST:PORT (the router's "
                            "--bootstrap-port) or ipc://PATH (its --bootstrap-socket)")
    group.add_argument("--registry-port", type=tcp_port, default=50051,
                       help="router: gRPC port where workers register")
    group.add_argument("--registry-host", default=None,
                       help="router: address the worker registry listens on (default: --host)")
    group.add_argument("--registry-socket", default=None, metavar="PATH",
                       help="router: a Unix socket the worker registry listens on instead of --registry-host/"
                            "--registry-port (workers: --router-url unix:PATH); --role all puts its own in a "
                            "directory only its user can enter")
    group.add_argument("--grpc-socket", default=None, metavar="PATH",
                       help="worker: a Unix socket its gRPC service listens on instead of --host/--port")
    group.add_argument("--bootstrap-port", type=tcp_port, default=5557,
                       help="router: ZMQ port of the transfer bootstrap registry")
    group.add_argument("--bootstrap-socket", default=None, metavar="PATH",
                       help="router: a Unix socket the transfer bootstrap registry listens on instead of "
                            "--bootstrap-port (workers: --bootstrap ipc://PATH); --role all puts its own beside "
                            "the worker registry's")
    group.add_argument("--workers", type=worker_counts, default="encode=1,prefill=1,decode=1", metavar="ROLE=N,...",
                       help="--role all: how many workers of each role it starts, e.g. prefill=2,decode=2 (a role "
                            "not named gets one); the router routes between them (--routing-policy)")
    group.add_argument("--name", default=None, help="worker: its unique name (default ROLE-HOSTNAME-PID: in a pod the hostname is the pod's "
                            "name, and PIDs repeat across containers)")
    group.add_argument("--drain-timeout", type=seconds, default=20.0, metavar="SECONDS",
                       help="worker: given SIGTERM, it tells the router to send it nothing new and lets the "
                            "requests it holds finish for up to this long before it stops (keep it below the "
                            "orchestrator's grace period: Kubernetes' terminationGracePeriodSeconds is 30 s by "
                            "default); Ctrl-C, and --role all as a whole, stop at once")
    group.add_argument("--mesh", default=None,
                       help="this role's device mesh, e.g. data=1,model=4,expert=2 (product = device count); "
                            "default: one device")
    group.add_argument("--cluster-secret-file", default=None,
                       help="router and workers: a file holding the deployment's shared secret (a mounted Kubernetes "
                            "Secret); default $MMSERVE_CLUSTER_SECRET_FILE, else the secret itself in "
                            "$MMSERVE_CLUSTER_SECRET. Required: calls between the processes are authenticated with "
                            "it. --role all makes its own")
    add_config_flags(parser, KVEventsConfig, "KV events (what the prefix cache stored and evicted, for routers)",
                     prefix="")
    add_config_flags(parser, RoutingConfig, "routing (which worker the router sends each request to)", prefix="")
    add_cluster_flags(parser)
    add_config_flags(parser, TransferConfig, "transfer (moving embeddings and KV between roles)", prefix="transfer_",
                     skip=SECRET_FIELDS, env=TRANSFER_ENV)


def worker_counts(text: str) -> dict[str, int]:
    """``--workers``: "prefill=2,decode=2" -> workers per role, one for a role not named."""
    counts = dict.fromkeys(WORKER_ROLES, 1)
    for item in filter(None, (part.strip() for part in text.split(","))):
        role, _, count = item.partition("=")
        if role not in counts or not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(
                f"{item!r}: expected ROLE=N with ROLE one of {', '.join(WORKER_ROLES)} and N >= 1")
        counts[role] = int(count)
    return counts


def transfer_config(args: argparse.Namespace, key: str) -> TransferConfig:
    """The flags that were given, over the MMSERVE_* environment, over the defaults; the key from
    the cluster credential."""
    return config_from_args(TransferConfig, args, prefix="transfer_", base=TransferConfig.from_env(), secret=key)


def configure_logging(process: str, level: str) -> None:
    """This process's lines at ``level``, each naming the process (``--role all`` interleaves four)."""
    # force: importing orbax (through absl) has already configured the root logger at WARNING
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s {process} %(levelname)s %(message)s", force=True)
    # jax logs every platform it probed and lacks ("Unable to initialize backend 'tpu'") at INFO;
    # the weights line names the devices this process does use.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


@contextlib.contextmanager
def model_errors_said(model: str, program: str = "serve.py"):
    """A checkpoint that cannot be loaded (missing, damaged, a config this code cannot serve) ends
    the process with one line naming it and why, not a traceback from deep in the loader."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError) as error:
        log.debug("loading %s failed", model, exc_info=True)
        detail = f"{type(error).__name__}: {error}" if not isinstance(error, (ValueError, OSError)) else str(error)
        raise SystemExit(f"{program}: cannot load the model {model!r}: {detail}") from None


def load_role_model(args: argparse.Namespace, engine: EngineConfig, layout):
    """The role's model (its parameters in their shards under ``layout``), and one line saying
    what was loaded, onto which devices, in how long; one line and exit where the model cannot
    load or cannot do what ``engine`` asks."""
    import jax

    from models.qwen3_vl_moe import load_model

    start = time.monotonic()
    with model_errors_said(args.model):
        model = load_model(args.model, dtype=args.dtype, shardings=layout.params if layout else None,
                           moe_dispatch=args.moe_dispatch)
        engine.check_model(model.config)
    parameters = sum(leaf.size for leaf in jax.tree.leaves(model.params))
    devices = layout.mesh.devices.size if layout else 1
    what = "tiny (random weights: it answers gibberish)" if args.model == "tiny" else args.model
    log.info("weights loaded: %s, %s parameters in %s on %d %s device(s), in %.1f s", what, _amount(parameters),
             model.dtype.name, devices, jax.default_backend(), time.monotonic() - start)
    if layout is not None and (idle := layout.idle_axes(jax.tree.map(lambda leaf: leaf.sharding, model.params))):
        log.warning("the mesh axis %s splits no parameter of this model (its sizes do not divide): each of its "
                    "devices holds a whole copy, and does the same work (docs/sharding.md)", ", ".join(idle))
    return model


def _amount(n: int) -> str:
    return f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def join_role(args: argparse.Namespace, credential: ClusterCredential | None = None):
    """(Lockstep, MeshLayout or None) of this process's role: joins the role's other processes
    (``--coordinator-address``/``--num-processes``/``--process-id`` or the environment) into one
    JAX runtime and opens the leader's channel to them, keyed by the cluster's ``credential``
    (loaded here when not given and the role spans processes). Call before anything else uses JAX."""
    import jax

    from mmserve.distributed.lockstep import Lockstep
    from mmserve.distributed.lockstep_channel import open_channel
    from mmserve.distributed.multihost import cluster_from_args, initialize, leader_host

    cluster = cluster_from_args(args)
    initialize(cluster)
    keys = None
    if jax.process_count() > 1:
        credential = credential or cluster_credential(args)
        if credential is None:
            raise SystemExit(2)
        keys = credential.lockstep_keys
    lockstep = Lockstep(open_channel(leader_host(cluster), keys))
    layout = mesh_layout(args)
    if lockstep.spans_processes and layout is None:
        raise SystemExit("serve.py: a role spanning several processes needs --mesh over all their devices")
    # SIGTERM (Kubernetes stopping a pod, --role all stopping its children) ends the process through
    # its finally blocks, as Ctrl-C does: a worker ends its calls, fails its transfer rooms with a
    # word to their peers and withdraws from the bootstrap registry (instead of leaving them to
    # time out), a leader tells its followers to stop.
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    return lockstep, layout


def stop_on_sigterm(*_) -> None:
    """Ends the process through its finally blocks, once: a second SIGTERM (``--role all`` stopping
    its children after a Ctrl-C that reached them too) raised again inside the clean-up it began."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not sys.is_finalizing():
        sys.exit(0)


def follow_leader(role: str, model, engine: EngineConfig, layout, lockstep, transfer: TransferConfig | None = None,
                  leader_stop_s: float = 0.0) -> int:
    """A non-leader process of a multi-host role: it builds the device state the leader builds (in
    the same order) and runs the programs the leader publishes until the leader stops. ``transfer``
    (prefill and decode) says what shapes the leader's arriving rows take, whose programs it
    compiles too. ``leader_stop_s``: how long the leader may go on serving once given SIGTERM
    (a worker's drain, the HTTP server's graceful shutdown), which a follower given SIGTERM too
    outlasts (:func:`follow_through_stop`); 0: it exits at once."""
    if role == "encode":
        from mmserve.roles.encode import vision_encoder

        vision_encoder(model, engine, layout, lockstep)
    else:
        from mmserve.engine.engine import ALL_PROGRAMS, LLMEngine
        from mmserve.roles.decode import DECODE_PROGRAMS
        from mmserve.roles.fields import room_rows
        from mmserve.roles.prefill import PREFILL_PROGRAMS

        programs = {"prefill": PREFILL_PROGRAMS, "decode": DECODE_PROGRAMS}.get(role, ALL_PROGRAMS)
        rows = room_rows(transfer, engine) if transfer is not None else ()
        LLMEngine(model, engine, layout=layout, lockstep=lockstep, programs=programs, arriving_rows=rows,
                  kv_read_rows=rows)
    from mmserve.distributed.lockstep import BROKEN_EXIT_STATUS, LockstepBroken

    if leader_stop_s > 0:
        follow_through_stop(leader_stop_s + FOLLOWER_MARGIN_S)
    try:
        lockstep.follow()
    except LockstepBroken as error:
        # Exiting through the interpreter would wait in jax's shutdown barrier for a leader that
        # may sit in a collective for this process's half: both would hang. Gone at once, this
        # process fails that collective, and the leader exits in turn.
        log.critical("%s; exiting (status %d) so that the role is started again in step", error, BROKEN_EXIT_STATUS)
        logging.shutdown()
        os._exit(BROKEN_EXIT_STATUS)
    return 0


FOLLOWER_MARGIN_S = 10.0
"""What a follower given SIGTERM allows beyond the time its leader may take to stop."""
FOLLOWER_GAVE_UP_STATUS = 5
"""A follower's exit status when its leader did not stop within the time allowed after SIGTERM."""


def worker_stop_s(drain_timeout_s: float) -> float:
    """How long a worker's leader may go on after SIGTERM: its word to the router, its drain and its
    calls' end (``mmserve.roles.worker``); 0 when it does not drain (its calls are cut at once)."""
    from mmserve.roles.worker import LEAVE_S, STOP_GRACE_S

    return LEAVE_S + drain_timeout_s + STOP_GRACE_S if drain_timeout_s > 0 else 0.0


def follow_through_stop(limit_s: float) -> None:
    """Makes SIGTERM leave a follower following. An orchestrator stops a role's processes together
    (Kubernetes stops every pod of a LeaderWorkerSet group at once): the leader finishes its
    requests (a worker's drain, the HTTP server's graceful shutdown) through programs every
    process must run, so a follower that exited on the signal would cut them off. It goes on until
    the leader closes the lockstep (which ends ``follow``), or until a second signal; ``limit_s``
    after the first it gives up, exiting with ``FOLLOWER_GAVE_UP_STATUS`` from a timer thread (the
    main thread may be stuck in a collective with a leader that died)."""

    def give_up():
        log.error("the leader did not stop within %.0f s of SIGTERM; exiting", limit_s)
        logging.shutdown()
        os._exit(FOLLOWER_GAVE_UP_STATUS)

    def terminated(*_):
        signal.signal(signal.SIGTERM, stop_on_sigterm)
        log.info("stopping: following the leader until it stops (up to %.0f s; a second signal ends it now)",
                 limit_s)
        timer = threading.Timer(limit_s, give_up)
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, terminated)


def mesh_layout(args: argparse.Namespace):
    """The role's device mesh from ``--mesh`` (None: one device, nothing sharded)."""
    if not args.mesh:
        return None
    from mmserve.distributed.layout import MeshLayout
    from mmserve.distributed.mesh import make_mesh

    try:
        return MeshLayout(make_mesh(args.mesh))
    except ValueError as error:  # more or fewer devices than the mesh asks for
        raise SystemExit(f"serve.py: --mesh {args.mesh}: {error}") from None


def cluster_credential(args: argparse.Namespace) -> ClusterCredential | None:
    """The deployment's credential (``--cluster-secret-file`` or the environment); None, after
    saying why on stderr, when there is none."""
    try:
        return ClusterCredential.load(args.cluster_secret_file)
    except (MissingCredential, OSError, ValueError) as error:
        print(f"serve.py: {error}", file=sys.stderr)
        return None


def require_free_socket(path: str, flag: str) -> None:
    """One line and exit when a server already listens on the Unix socket ``path`` (binding it
    would take the path over from that server, without a word)."""
    from transfer.unix_socket import SocketInUse, claim

    try:
        claim(path)
    except SocketInUse as error:
        raise SystemExit(f"serve.py: {flag} {path} is not free: {error}") from None


LISTENER_FD_ENV = "MMSERVE_HTTP_LISTENER_FD"
"""The file descriptor of an HTTP listening socket a supervising ``--role all`` bound for its router
(:func:`http_listener`): each router it starts serves on it instead of binding ``--port`` again."""


def http_listener(host: str, port: int, flag: str) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one), inheritable by a child; one
    line and exit when it is taken. ``--role all`` binds its router's port once, for good: a router
    started again serves on the same socket, so the port never changes (``--port 0`` picked a new
    one at each restart) and is never free for another local user to take (one did, and read the
    API key of the next request), and a client's connection made meanwhile waits in its backlog."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(LISTEN_BACKLOG)
    except OSError as error:
        raise SystemExit(f"serve.py: {flag} {port} on {host} is not free: {error.strerror or error}") from None
    listener.set_inheritable(True)
    return listener


LISTEN_BACKLOG = 2048  # uvicorn's own default


def require_free_port(host: str, port: int, flag: str) -> None:
    """One line and exit when ``host:port`` is taken, said before minutes of loading and compiling
    (a listener bound later would only fail then, with a traceback); port 0 is always free."""
    if not port:
        return
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is free
            probe.bind((host, port))
    except OSError as error:
        raise SystemExit(f"serve.py: {flag} {port} on {host} is not free: {error.strerror or error}") from None
