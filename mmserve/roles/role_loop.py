"""The thread that owns a role: calls from gRPC threads, steps, and waiting for the next event.

The role (engine, transfer sender/receiver) is not thread-safe, so every gRPC call becomes a
command executed on the loop thread between steps. While the role has compute to do the loop
steps back to back; when it has none, it sleeps until something arrives: a control message or
data on one of the role's transfer sockets, or a call from a gRPC thread (which writes to a wake
pipe the same poll watches). It never sleeps on a fixed tick, because each hop of a request
(the router's call, the embedding room, the KV room) would pay that tick.

A second thread pumps the transfer layer under the role's lock while a step runs (a long engine
step, a compile), so heartbeats and pulls go on; an idle loop reads its sockets itself, and the
pump sleeps with it.

An idle worker costs next to nothing: the loop wakes for timers (deadlines, transfer timeouts,
heartbeats, registry lookups) every ``IDLE_WAIT_S``, and the pump not at all. On a few shared
cores that matters: with a 5 ms idle tick and a 2 ms pump tick each idle worker took about 7% of
a core, which the three workers of ``--role all`` took from the one doing the work.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import zmq

from mmserve.roles.supervisor import Liveness
from transfer.wake_pipe import WakePipe

log = logging.getLogger(__name__)
PUMP_INTERVAL_S = 0.002
IDLE_WAIT_S = 0.05
FAILED_STEP_BACKOFF_S = 0.01
MAX_FAILED_STEP_BACKOFF_S = 1.0
"""A step that failed is tried again after 10 ms, doubling while it keeps failing, at most 1 s."""
"""The longest an idle loop sleeps with no event: how late deadlines, transfer timeouts, heartbeats
(1 s apart by default) and registry lookups (retried every 50 ms) may be looked at."""


class LoopStopped(RuntimeError):
    """A call made to a loop that has stopped."""


class RoleLoop:
    def __init__(self, role) -> None:
        self.role = role
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._calls = threading.Lock()
        """Held while a call is queued and while the stopped loop refuses the rest, so none waits forever."""
        self._closed = False
        self._wake = WakePipe()
        self._stepping = False
        self._awake = threading.Event()
        """Clear while the loop sleeps in its poll: the pump, with nothing to pump, sleeps too."""
        self._awake.set()
        self._liveness = Liveness()
        """Renewed as the loop turns: a supervising ``--role all`` restarts a worker whose loop stopped."""
        self._thread = threading.Thread(target=self._run, name=f"{role.role}-loop", daemon=True)
        self._pump = threading.Thread(target=self._pump_forever, name=f"{role.role}-transfer", daemon=True)

    def start(self) -> RoleLoop:
        self._thread.start()
        self._pump.start()
        return self

    def call(self, fn: Callable, *args) -> Any:
        """Runs ``fn(*args)`` on the loop thread and returns its result (or raises its error);
        ``LoopStopped`` once the loop has stopped (a gRPC thread freeing a request its caller hung
        up on, as the worker shuts down, must not wait for a loop that will never run it)."""
        return self.submit(fn, *args).result()

    def submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Queues ``fn(*args)`` for the loop thread without waiting for it (for a thread that must
        not block: gRPC runs a call's done-callbacks on its server's one polling thread, and every
        call of the worker waited while one of them waited for a step to end); ``LoopStopped``
        once the loop has stopped."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._calls:
            if self._closed:
                raise LoopStopped(f"the {self.role.role} worker's loop has stopped")
            self._inbox.put((fn, args, future))
            self._wake.wake()
        return future

    def stop(self) -> None:
        self._stop.set()
        self._awake.set()
        self._wake.wake()
        self._thread.join(timeout=10)
        self._pump.join(timeout=10)

    def _pump_forever(self) -> None:
        """Pumps only while a step runs (an idle loop waits on the sockets itself). What it read
        (a landed pull, a message) is news the running step may already have looked past, and the
        socket it came on is no longer readable: so it wakes the loop, which looks again before it
        sleeps. (It woke the loop only when the step had ended meanwhile, and a worker slept
        through a landing the pump had read during a step until its idle timer.)"""
        while not self._stop.is_set():
            self._awake.wait()
            if self._stepping:
                self._liveness.renew()  # a long step (a compile on first use) is no hung loop
                try:
                    self.role.pump()
                except Exception:
                    log.exception("%s transfer pump failed", self.role.role)
                self._wake.wake()
            self._stop.wait(PUMP_INTERVAL_S)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._liveness.renew()
            while True:
                try:
                    fn, args, future = self._inbox.get_nowait()
                except queue.Empty:
                    break
                try:
                    future.set_result(fn(*args))
                except Exception as error:  # handed to the caller's thread, which reports it
                    future.set_exception(error)
            try:
                self._stepping = True
                self.role.step()
                self._stepping = False
                limit_s = min(self.role.wait_limit_s(), IDLE_WAIT_S)
                if limit_s > 0 and self._inbox.empty():
                    self._wait(limit_s)
                failures = 0
            except Exception:
                self._stepping = False
                failures += 1
                log.exception("%s step failed%s", self.role.role, f" ({failures} in a row)" if failures > 1 else "")
                # Not at once again: a step failing for good (a device lost) would spin a core
                # and flood the log. Calls and the pump go on meanwhile.
                self._stop.wait(min(FAILED_STEP_BACKOFF_S * 2 ** (failures - 1), MAX_FAILED_STEP_BACKOFF_S))
        with self._calls:
            self._closed = True
        while not self._inbox.empty():
            self._inbox.get_nowait()[2].set_exception(LoopStopped(f"the {self.role.role} worker's loop has stopped"))
        self._pump.join()  # the pump works the role's sockets: it stops before they close
        self.role.close()
        self._wake.close()

    def _wait(self, limit_s: float) -> None:
        """Sleeps until a socket of the role is readable, a call arrives, or ``limit_s``.

        Under the role's lock: zmq sockets are not thread-safe, and the pump reads the same ones."""
        poller = zmq.Poller()
        poller.register(self._wake.fd, zmq.POLLIN)
        self._awake.clear()
        try:
            with self.role.lock:
                for socket in self.role.sockets():
                    poller.register(socket, zmq.POLLIN)
                poller.poll(max(1, round(limit_s * 1000)))
        finally:
            self._awake.set()
        self._wake.drain()
