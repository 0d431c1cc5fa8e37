"""Real serve.py processes on loopback: a router and one worker per role, each its own process."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mmserve.cluster_credential import SECRET_ENV
from mmserve.roles.supervisor import PARENT_ENV

SERVE = str(Path(__file__).resolve().parents[2] / "scripts" / "serve.py")
ENGINE_FLAGS = ["--num-pages", "256", "--page-size", "8", "--max-model-len", "512", "--max-prefill-tokens", "128",
                "--no-precompile", "--drain-timeout", "5"]
"""``--no-precompile``: a cluster's workers compile the programs its requests use when they first
run (or load them from the run's shared compilation cache) instead of the whole grid before ready,
which took 25-210 s per cluster on 2 cores. What these clusters test is not start-up: that every
program is compiled before ready is tested on the engine (``tests/engine/test_compile_before_ready.py``)
and through ``serve.py --role all`` (``test_serve_all.py``), which keep it. ``--drain-timeout 5``: a
worker stopped with requests in flight (a test's end, after a router died) gives them 5 s, not 20,
before ``stop`` would kill it."""
ONE_AT_A_TIME = ["--max-num-seqs", "4", "--max-prefill-seqs", "2"]
"""For a cluster asked one request at a time: fewer prefill and decode shapes (a grid of 30 instead of
50), each compiled slowly by a role spanning several processes or devices."""
TRANSFER_ENV = {
    "JAX_PLATFORMS": "cpu",
    SECRET_ENV: "the-roles-tests-share-this-cluster-secret",
    "MMSERVE_BLOCK_SIZE": "16",
    "MMSERVE_DEFAULT_BLOCKS": "2",  # 32 tokens: an image of more visual tokens needs a resume
    "MMSERVE_BUFFER_BLOCKS": "256",
    "MMSERVE_HEARTBEAT_INTERVAL": "0.5",
    "MMSERVE_HEARTBEAT_TIMEOUT": "5",  # a compiling worker still answers: its transfer pump runs apart
    "MMSERVE_BOOTSTRAP_TIMEOUT": "30",
}
STOP_GRACE_S = 15.0
"""How long ``stop`` waits for the processes it sent SIGTERM before it kills them."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class Cluster:
    def __init__(self, model: str, log_dir: Path, role_flags: dict[str, list[str]] | None = None,
                 role_env: dict[str, dict[str, str]] | None = None, role_processes: dict[str, int] | None = None):
        """role_flags/role_env: extra command-line flags and environment per role; role_processes:
        roles that span several processes joined by jax.distributed (``ROLE`` is the leader,
        ``ROLE.1``... its followers)."""
        self.model = model
        self.role_flags = role_flags or {}
        self.role_env = role_env or {}
        self.role_processes = role_processes or {}
        self.log_dir = log_dir
        self.port, self.registry_port, self.bootstrap_port = free_port(), free_port(), free_port()
        self.processes: dict[str, subprocess.Popen] = {}
        """The latest process of each role (``ROLE``, ``ROLE.1``...): the one ``kill`` and ``freeze`` reach."""
        self.started: list[subprocess.Popen] = []
        """Every process the cluster ever started, those a restart replaced in ``processes`` too:
        ``stop`` ends them all."""
        self._logs: list = []
        # A test process that dies (killed by a timeout, say) takes the cluster with it.
        self.env = os.environ | TRANSFER_ENV | {PARENT_ENV: str(os.getpid())}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Cluster:
        self.start_router()
        for role in ("encode", "prefill", "decode"):
            self.start_worker(role)
        self.wait_healthy()
        return self

    def start_router(self, flags: tuple[str, ...] = ()) -> None:
        """The router on the cluster's ports: a router started again (after ``kill``) is found by the
        live workers there."""
        self.start_role("router", ["--port", str(self.port), "--registry-port", str(self.registry_port),
                                   "--bootstrap-port", str(self.bootstrap_port), *flags])

    def start_worker(self, role: str, name: str | None = None) -> None:
        self.start_role(role, ["--name", name or role, "--port", "0", "--router-url", f"127.0.0.1:{self.registry_port}",
                               "--bootstrap", f"tcp://127.0.0.1:{self.bootstrap_port}"])

    def start_role(self, role: str, flags: list[str]) -> None:
        count = self.role_processes.get(role, 1)
        cluster = {"MMSERVE_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "MMSERVE_NUM_PROCESSES": str(count)}
        for rank in range(count):
            key = role if rank == 0 else f"{role}.{rank}"
            env = self.env | self.role_env.get(role, {}) | (cluster | {"MMSERVE_PROCESS_ID": str(rank)} if count > 1 else {})
            log = open(self.log_dir / f"{key}.log", "ab")
            self._logs.append(log)
            process = subprocess.Popen(
                [sys.executable, SERVE, "--role", role, "--model", self.model, *ENGINE_FLAGS, *flags,
                 *self.role_flags.get(role, [])],
                env=env, stdout=log, stderr=subprocess.STDOUT)
            self.started.append(process)
            self.processes[key] = process

    def freeze(self, role: str) -> None:
        """Stops the role's process without ending it (SIGSTOP): what it was sent stays in flight."""
        self.processes[role].send_signal(signal.SIGSTOP)

    def thaw(self, role: str) -> None:
        """Lets a frozen role's process go on (SIGCONT)."""
        self.processes[role].send_signal(signal.SIGCONT)

    def kill(self, role: str) -> None:
        self.processes[role].send_signal(signal.SIGKILL)
        self.processes[role].wait()

    def health(self) -> tuple[int, dict]:
        return get_json(f"{self.url}/health")

    def worker_address(self, role: str) -> str:
        """Where the role's (last started) worker serves gRPC, from its log."""
        return re.findall(rf"{role} worker \S+ serving on (\S+)", (self.log_dir / f"{role}.log").read_text())[-1]

    def roles(self) -> dict[str, list[dict]]:
        """Each role's workers' ``/health`` entries, by role (also while the router says it is unhealthy)."""
        return self.health()[1]["roles"]

    def assert_all_free(self, roles=("encode", "prefill", "decode"), within_s: float = 45) -> None:
        """Every block and page back in its pool and nothing in flight, in every worker of
        ``roles``: at once when aborts get through, at the latest when the transfer layer's
        heartbeat timeout fails what a dead peer left behind."""
        deadline = time.monotonic() + within_s
        while True:
            health = self.roles()
            busy = {role: w for role in roles for w in health[role] if _busy(w)}
            if not busy:
                return
            assert time.monotonic() < deadline, f"still held: {busy}"
            time.sleep(0.5)

    def wait_healthy(self, timeout: float = 480) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for role, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{role} exited with {process.returncode}; see {self.log_dir / role}.log")
            try:
                status, body = self.health()
                if status == 200:
                    return body
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"cluster not healthy after {timeout}s; logs in {self.log_dir}")

    def stop(self) -> None:
        """Ends every process the cluster started (SIGTERM, SIGKILL after STOP_GRACE_S), the ones a
        restart replaced included, and waits for each: none outlives the test."""
        running = [process for process in self.started if process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGCONT)  # a stopped process would not act on the TERM
            process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for process in running:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self._logs:
            log.close()
        self._logs.clear()


def _busy(worker: dict) -> bool:
    """A worker holding blocks, pages or requests (the test clusters' pools are 256 blocks)."""
    full = {"free_blocks": 256, "free_embedding_blocks": 256, "free_kv_blocks": 256}
    if any(worker.get(k, v) != v for k, v in full.items()):
        return True
    return worker.get("free_pages") != worker.get("total_pages") or worker.get("in_flight", 0) > 0
