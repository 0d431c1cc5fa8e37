"""Starting the disaggregated roles from ``serve.py``'s arguments.

The router hosts two small registries besides the HTTP API: the transfer bootstrap registry (ZMQ,
``--bootstrap-port``) where senders publish their endpoints, and the worker registry (gRPC,
``--registry-port``) where workers announce themselves. A worker serves its gRPC Worker service
on ``--port`` and is pointed at both registries with
``--router-url HOST:REGISTRY_PORT`` and ``--bootstrap tcp://HOST:BOOTSTRAP_PORT``. ``all`` starts
the router and the workers (one of each role unless ``--workers`` says more) as child processes on
loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

from mmserve.cluster_credential import SECRET_FILE_ENV, ClusterCredential, MissingCredential
from mmserve.config_flags import add_config_flags, config_from_args, tcp_port
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
                            "--bootstrap-port)")
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
    group.add_argument("--workers", type=worker_counts, default="encode=1,prefill=1,decode=1", metavar="ROLE=N,...",
                       help="--role all: how many workers of each role it starts, e.g. prefill=2,decode=2 (a role "
                            "not named gets one); the router routes between them (--routing-policy)")
    group.add_argument("--name", default=None, help="worker: its unique name (default ROLE-HOSTNAME-PID: in a pod the hostname is the pod's "
                            "name, and PIDs repeat across containers)")
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


def worker_names(counts: dict[str, int]) -> list[tuple[str, str]]:
    """(role, name) of each worker ``--role all`` starts: the role's name for a role's only worker,
    ROLE-I for several."""
    return [(role, role if n == 1 else f"{role}-{i}") for role, n in counts.items() for i in range(n)]


def transfer_config(args: argparse.Namespace, key: str) -> TransferConfig:
    """The flags that were given, over the MMSERVE_* environment, over the defaults; the key from
    the cluster credential."""
    return config_from_args(TransferConfig, args, prefix="transfer_", base=TransferConfig.from_env(), secret=key)


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
    if not args.grpc_socket:
        require_free_port(args.host, args.port, "--port")
    lockstep, layout = join_role(args, credential)
    try:  # whatever ends the leader, its followers are told to stop
        model = load_role_model(args, engine, layout)
        if not lockstep.is_leader:
            return follow_leader(args.role, model, engine, layout, lockstep, transfer)
        service = _role_service(args, model, engine, transfer, name, layout, lockstep, credential)
        serve_worker(service, args.host, args.port, _strip_scheme(args.router_url), credential.grpc_token,
                     model.fingerprint, transfer.advertise_host, args.grpc_socket)
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


def configure_logging(process: str, level: str) -> None:
    """This process's lines at ``level``, each naming the process (``--role all`` interleaves four)."""
    # force: importing orbax (through absl) has already configured the root logger at WARNING
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s {process} %(levelname)s %(message)s", force=True)
    # jax logs every platform it probed and lacks ("Unable to initialize backend 'tpu'") at INFO;
    # the weights line names the devices this process does use.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


@contextlib.contextmanager
def model_errors_said(model: str):
    """A checkpoint that cannot be loaded (missing, damaged, a config this code cannot serve) ends
    the process with one line naming it and why, not a traceback from deep in the loader."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError) as error:
        log.debug("loading %s failed", model, exc_info=True)
        detail = f"{type(error).__name__}: {error}" if not isinstance(error, (ValueError, OSError)) else str(error)
        raise SystemExit(f"serve.py: cannot load the model {model!r}: {detail}") from None


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
             args.dtype, devices, jax.default_backend(), time.monotonic() - start)
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
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return lockstep, layout


def follow_leader(role: str, model, engine: EngineConfig, layout, lockstep, transfer: TransferConfig | None = None
                  ) -> int:
    """A non-leader process of a multi-host role: it builds the device state the leader builds (in
    the same order) and runs the programs the leader publishes until the leader stops. ``transfer``
    (prefill and decode) says what shapes the leader's arriving rows take, whose programs it
    compiles too."""
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
    lockstep.follow()
    return 0


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

    configure_logging("router", args.log_level)
    credential = cluster_credential(args)
    if credential is None:
        return 2
    transfer = transfer_config(args, credential.transfer_key)
    require_free_port(args.host, args.port, "--port")
    if not args.registry_socket:
        require_free_port(args.registry_host or args.host, args.registry_port, "--registry-port")
    try:
        bootstrap = BootstrapServer(transfer, port=args.bootstrap_port).start()
    except zmq.ZMQError as error:
        raise SystemExit(f"serve.py: the transfer bootstrap registry cannot listen on --bootstrap-port "
                         f"{args.bootstrap_port}: {error}") from None
    with model_errors_said(args.model):
        frontend = load_model(args.model, dtype=args.dtype, weights=False)
    index = PrefixIndex()
    feed = KVEventFeed(index, credential.kv_event_keys)
    chooser = WorkerChooser(config_from_args(RoutingConfig, args, prefix=""), index, functools.partial(
        _prompt_pages, frontend))
    pool = WorkerPool(credential.grpc_token, chooser, feed, model_fingerprint=frontend.fingerprint)
    backend = DisaggregatedBackend(pool)
    app = build_app(backend, frontend, settings, on_shutdown=feed.close)

    async def main() -> None:
        registry = await serve_registry(pool, args.registry_host or args.host, args.registry_port, args.registry_socket)
        try:
            await serve_http(app, backend, args.host, args.port, args.log_level)
        finally:
            await registry.stop(grace=1)

    # SIGTERM ends the router through its finally blocks, as it does a worker (``join_role``): the
    # HTTP server re-raises the signal once it has shut down, and a process killed by it flushes
    # nothing (the trace's last spans were lost).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        run_event_loop(main())
    finally:
        bootstrap.close()
    return 0


def _prompt_pages(model, prompt, page_size: int) -> list[bytes]:
    """The keys of a prompt's full KV pages, as a prefill worker with ``page_size`` computes them."""
    from mmserve.engine.page_hash import prompt_page_keys

    return prompt_page_keys(prompt, model, page_size).first(
        len(prompt.token_ids) // page_size, lambda start, end: prompt.token_ids[start:end])


def all_commands(args: argparse.Namespace, argv: list[str], sockets: str,
                 bootstrap_port: int) -> dict[str, list[str]]:
    """``--role all``'s child processes, by name: the router and the workers. Only the router's
    HTTP port listens where ``--host`` says. The worker registry and the workers' gRPC services
    listen on Unix sockets in the directory ``sockets``, which only this user can enter: a TCP port
    on loopback is open to every local user, who could take one while it is free (a child
    restarting) and collect the token the workers send with every call. The transfer's bootstrap
    registry and KV events stay on loopback TCP (their messages are signed or encrypted). The
    secret is not among the flags: the children get it in their environment."""
    base = [sys.executable, os.path.abspath(sys.argv[0]),
            *_without(_without(_without(argv, "--role"), "--cluster-secret-file"), "--workers")]
    registry = os.path.join(sockets, "registry.sock")
    worker = base + ["--router-url", f"unix:{registry}", "--bootstrap",
                     f"tcp://127.0.0.1:{bootstrap_port}", "--port", "0", "--host", "127.0.0.1"]
    commands = {"router": base + ["--role", "router", "--registry-socket", registry,
                                  "--registry-host", "127.0.0.1", "--bootstrap-port", str(bootstrap_port)]}
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
    loopback, each started again if it dies (:mod:`mmserve.roles.supervisor`); SIGTERM or Ctrl-C
    stops them all."""
    from mmserve.roles.supervisor import Supervisor

    from models.qwen3_vl_moe import load_model

    configure_logging("all", args.log_level)
    require_free_port(args.host, args.port, "--port")  # before any child: the router would fail on it, restarted
    with model_errors_said(args.model):  # before any child: each would fail on it, and be restarted
        engine.check_model(load_model(args.model, dtype=args.dtype, weights=False).config)
    sockets = tempfile.mkdtemp(prefix="mmserve-")  # mode 0700: this user's processes only
    commands = all_commands(args, argv, sockets, _free_port())
    env = os.environ | ClusterCredential.generate().environment()
    env.pop(SECRET_FILE_ENV, None)
    supervisor = Supervisor(commands, env).start()
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stop())
    started = True
    try:
        started = supervisor.run()
    except KeyboardInterrupt:
        pass
    finally:
        supervisor.stop()
        shutil.rmtree(sockets, ignore_errors=True)
    if not started:
        print(f"serve.py: the {supervisor.failed} process could not start; see its log above", file=sys.stderr)
        return STARTUP_FAILURE
    return 0


def cluster_credential(args: argparse.Namespace) -> ClusterCredential | None:
    """The deployment's credential (``--cluster-secret-file`` or the environment); None, after
    saying why on stderr, when there is none."""
    try:
        return ClusterCredential.load(args.cluster_secret_file)
    except (MissingCredential, OSError, ValueError) as error:
        print(f"serve.py: {error}", file=sys.stderr)
        return None


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _strip_scheme(url: str) -> str:
    """A gRPC target from a URL: http://HOST:PORT/ -> HOST:PORT; unix:PATH stays as it is."""
    return url if url.startswith("unix:") else url.split("://", 1)[-1].rstrip("/")
