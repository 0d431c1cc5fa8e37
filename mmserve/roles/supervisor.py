"""Keeping ``serve.py --role all``'s processes alive: one that exits is started again after a
backoff, while the others go on serving.

A restarted worker registers with the router under its old name (the router drops the dead
address for the new one) and a restarted router is found again by the live workers, which
re-register every second; the transfer layer fails the rooms a dead peer held at its heartbeat
timeout. So the deployment heals without a person, whichever process died.

Children never outlive the supervisor: each is started with PARENT_ENV naming it, and
:func:`die_with_parent` (the first thing ``serve.py`` does) has the kernel kill the child when the
supervisor dies, even by SIGKILL, which no handler of its own sees.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
STABLE_S = 60.0
"""A process that served this long (from when it said it was ready) before it died counts as
healthy again: its next restart waits only FIRST_BACKOFF_S. One that keeps dying sooner waits twice
as long each time, up to MAX_BACKOFF_S."""
START_FAILURES = 5
"""A child whose last this-many runs in a row each died before saying it serves cannot start (a
checkpoint it cannot load, a port it cannot bind, a cache that does not fit): everything stops and
``run`` returns False, instead of restarting it for good behind a /health that says 503 forever.
By readiness, not by time since the start: a start-up longer than STABLE_S (loading and compiling
a large checkpoint) that failed every time was counted healthy, and restarted every second for
ever. Whether an earlier run served does not matter (it did, and a port taken since kept it from
ever starting again, retried every 30 s for good); a run that served and dies is restarted, however
often."""
LIVENESS_S = 60.0
"""A child that said it serves and has not renewed its ready file (:class:`Liveness`) for this long
is hung (stopped, a hung host, a loop that no longer turns): it is killed, and started again as a
dead one is. It used to be left as it was: the router stopped routing to it and its streams failed
after ~90 s, but nothing brought it back."""
STOP_GRACE_S = 10.0
"""How long the children have, all together, to end after SIGTERM before they are killed."""
POLL_S = 0.5
PARENT_ENV = "MMSERVE_PARENT_PID"
"""The pid of the process a ``serve.py`` must not outlive (set by the supervisor for its children,
and by the tests for the servers they start); unset: it lives on its own."""
READY_ENV = "MMSERVE_READY_FILE"
"""A file a supervised child creates once it serves (:func:`mark_ready`): a worker registered with
the router, the router's HTTP server listening."""
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclasses.dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    quick_deaths: int = 0  # deaths in a row, each before STABLE_S
    restart_at: float | None = None
    failed_starts: int = 0  # runs in a row that died before they said they serve
    ready_file: str = ""
    ready_at: float | None = None  # when the supervisor saw this run's ready file


class Supervisor:
    def __init__(self, commands: Mapping[str, list[str]], env: Mapping[str, str], ready_dir: str,
                 own_env: Mapping[str, Mapping[str, str]] | None = None,
                 on_exit: Callable[[int], object] | None = None,
                 pass_fds: Mapping[str, tuple[int, ...]] | None = None):
        """``ready_dir``: where each child's ready file goes (a directory only this user reads);
        ``own_env``: by child name, what that child's environment has besides ``env``; ``on_exit``
        is called with a child's pid once it has ended (to remove what it could not);
        ``pass_fds``: by child name, file descriptors its every run inherits."""
        self.children = {name: Child(name, argv, ready_file=os.path.join(ready_dir, f"ready-{i}"))
                         for i, (name, argv) in enumerate(commands.items())}
        self._env = dict(env)
        self._own_env = {name: dict(extra) for name, extra in (own_env or {}).items()}
        self._on_exit = on_exit
        self._pass_fds = {name: tuple(fds) for name, fds in (pass_fds or {}).items()}
        self._stopping = False
        self.failed: str | None = None
        """The child that could not start (START_FAILURES), once the supervisor gave up on it."""

    def start(self) -> Supervisor:
        for child in self.children.values():
            self._spawn(child, time.monotonic())
        return self

    def check(self, now: float) -> None:
        """Notices children that exited and starts those whose backoff has passed."""
        for child in self.children.values():
            if child.ready_at is None and child.process is not None and os.path.exists(child.ready_file):
                child.ready_at = now
            if (child.ready_at is not None and child.restart_at is None and child.process.poll() is None
                    and _seconds_since_renewed(child.ready_file) > LIVENESS_S):
                log.error("%s (pid %d) has not said it is alive for %.0f s: killing it, to start it again",
                          child.name, child.process.pid, LIVENESS_S)
                child.process.kill()
                child.process.wait()
            if child.restart_at is None and child.process is not None and child.process.poll() is not None:
                if self._on_exit is not None:
                    self._on_exit(child.process.pid)
                quick = child.ready_at is None or now - child.ready_at < STABLE_S
                backoff = self._back_off(child, now, quick)
                child.failed_starts = child.failed_starts + 1 if child.ready_at is None else 0
                if child.failed_starts >= START_FAILURES:
                    log.error("%s exited with status %s, %d times in a row, each before it could serve: it cannot "
                              "start (its log above says why); stopping", child.name, child.process.returncode,
                              child.failed_starts)
                    self.failed, self._stopping = child.name, True
                    return
                log.warning("%s exited with status %s; starting it again in %.0f s", child.name,
                            child.process.returncode, backoff)
            if child.restart_at is not None and now >= child.restart_at and not self._stopping:
                child.restarts += 1
                try:
                    self._spawn(child, now)
                except OSError as error:  # no fork (memory, pids), the executable gone: the others serve on
                    backoff = self._back_off(child, now, quick=True)
                    log.error("%s could not be started again (%s); trying again in %.0f s", child.name, error,
                              backoff)

    @staticmethod
    def _back_off(child: Child, now: float, quick: bool) -> float:
        """Schedules the child's next start, later the more often it died (or failed to start) quickly."""
        child.quick_deaths = child.quick_deaths + 1 if quick else 1
        backoff = min(FIRST_BACKOFF_S * 2 ** (child.quick_deaths - 1), MAX_BACKOFF_S)
        child.restart_at = now + backoff
        return backoff

    def run(self) -> bool:
        """Supervises until ``request_stop`` (a signal handler's): True; or until a child cannot
        start: False (``failed`` names it). The caller then calls ``stop``."""
        while not self._stopping:
            self.check(time.monotonic())
            time.sleep(POLL_S)
        return self.failed is None

    def request_stop(self) -> None:
        """For a signal handler: the first signal ends ``run`` (which then stops the children in
        order); one while they are being stopped kills them at once."""
        if self._stopping:
            self._kill()
        self._stopping = True

    def stop(self) -> None:
        """SIGTERM to every child, then STOP_GRACE_S for all of them together (a child busy in native
        code, compiling say, runs no handler: each waited its own grace in turn, past what
        ``docker stop`` and Kubernetes allow), then SIGKILL to what is left."""
        self._stopping = True
        running = self._running()
        for process in running:
            process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for process in running:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                process.kill()
                try:
                    process.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:  # stuck in the kernel (a device call): left to init
                    log.error("process %d did not end after SIGKILL", process.pid)

    def _kill(self) -> None:
        for process in self._running():
            process.kill()

    def _running(self) -> list[subprocess.Popen]:
        return [c.process for c in self.children.values() if c.process is not None and c.process.poll() is None]

    def _spawn(self, child: Child, now: float) -> None:
        try:
            os.unlink(child.ready_file)  # the last run's
        except FileNotFoundError:
            pass
        # From this (the main) thread: PR_SET_PDEATHSIG fires when the thread that forked the child ends.
        # A process group of its own: a terminal's Ctrl-C (SIGINT to the foreground group) reaches
        # the supervisor alone, which stops the children with SIGTERM; each child also took the
        # SIGINT, and one still importing died of it with a KeyboardInterrupt traceback.
        child.process = subprocess.Popen(child.argv, env=self._env | self._own_env.get(child.name, {}) | {
            PARENT_ENV: str(os.getpid()), READY_ENV: child.ready_file}, process_group=0,
            pass_fds=self._pass_fds.get(child.name, ()))
        child.started_at, child.restart_at, child.ready_at = now, None, None
        log.info("%s started (pid %d)", child.name, child.process.pid)


def mark_ready(environ: Mapping[str, str] = os.environ) -> None:
    """Tells a supervising ``--role all`` this process serves (nothing when none supervises it)."""
    path = environ.get(READY_ENV)
    if path:
        try:
            with open(path, "w"):
                pass
        except OSError as error:  # the caller serves on: only the supervisor's restart backoff is off
            log.warning("could not mark this process ready in %s: %s", path, error)


class Liveness:
    """Renews a supervised child's ready file (its mtime), at most once a second, from the thread
    whose turning means the child serves: a worker's role loop, the router's event loop. Nothing
    when no ``--role all`` supervises this process, or before it said it serves."""

    INTERVAL_S = 1.0

    def __init__(self, environ: Mapping[str, str] = os.environ):
        self._path = environ.get(READY_ENV)
        self._next = 0.0

    def renew(self) -> None:
        if not self._path or (now := time.monotonic()) < self._next:
            return
        self._next = now + self.INTERVAL_S
        with contextlib.suppress(OSError):  # not ready yet (no file): nothing to renew
            os.utime(self._path)


def _seconds_since_renewed(path: str) -> float:
    try:
        return time.time() - os.stat(path).st_mtime
    except OSError:  # gone: its next run's start removed it
        return 0.0


def die_with_parent(environ: Mapping[str, str] = os.environ) -> None:
    """When PARENT_ENV is set: this process is SIGKILLed as soon as that parent dies, however it
    dies (a parent killed with -9 runs no cleanup of its own, so its children would serve on,
    orphaned, holding their ports and memory). Linux: PR_SET_PDEATHSIG, from the kernel; elsewhere
    a thread that watches the parent's pid. Exits at once if the parent is already gone (it died
    while this process was starting). Call it first thing, from the main thread."""
    value = environ.get(PARENT_ENV)
    if not value:
        return
    parent = int(value)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    else:
        threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    if os.getppid() != parent:  # checked after asking: a parent that died before is not signalled for
        raise SystemExit(f"serve.py: its parent (pid {parent}) is gone; not starting")


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGKILL)
