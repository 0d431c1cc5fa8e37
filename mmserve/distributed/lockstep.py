"""Lockstep: every process of a multi-host role runs the same device programs in the same order.

In JAX's multi-controller runtime each process launches each program over the global mesh itself,
with the same shapes and the same host inputs; XLA's collectives then join them. Only the leader
(process 0) schedules, so each call into a device program goes through ``Lockstep.call``, given
the bound method itself (``lockstep.call(self.run_prefill, ids=...)``, so a reader follows a call
by its name): the leader publishes it (its target's bound name, the method's name and its host
inputs) to the followers over a ``LeaderChannel`` and then runs it; a follower's ``follow`` runs what it receives, in order, on its
own copy of the same targets (the runner and the encoder, built the same way), until the leader
closes. With one process there is no channel and ``call`` is a plain method call: nothing is
copied to the host.

A call that does not reach a follower leaves the processes out of step for good, so it ends the
role (:mod:`mmserve.distributed.lockstep_channel`): a follower whose connection drops, or that
finds a call missing, raises ``LockstepBroken`` out of ``follow`` (its process exits, and JAX's
distributed runtime then stops the others); a leader that cannot publish exits at once
(``on_broken``), since its device state no longer matches its followers' and every later call
would fail; a supervisor (``--role all``, Kubernetes) starts the role again.

So does a program that raises on a role spanning processes, on whichever process it raises: the
others may have run it (its collectives then wait for ever for this one's half, or pair with the
next program's and compute garbage), and nothing tells one process how another's call ended. A
failure of one process alone is real: the leader holds the transfer buffers, so its devices run
out of memory first. What a program checks of its inputs the caller checks before the call.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import numpy as np
import zmq

from mmserve.distributed.lockstep_channel import (ChannelDropped, FollowerChannel, LeaderChannel, decode_call,
                                                  encode_call)

log = logging.getLogger(__name__)
WAIT_TIMEOUT_S = 3600.0
BROKEN_EXIT_STATUS = 4
"""The leader's exit status when a call could not reach its followers."""


class LockstepBroken(RuntimeError):
    """A call was lost between the leader and a follower: the processes are out of step for good."""


def _exit_process(reason: str) -> None:
    """Ends the leader's process now: not through its finally blocks, whose device work (failing
    transfer rooms, a last step) would itself go through the broken lockstep."""
    log.critical("%s; exiting (status %d) so that the role is started again in step", reason, BROKEN_EXIT_STATUS)
    logging.shutdown()
    os._exit(BROKEN_EXIT_STATUS)


class Lockstep:
    def __init__(self, channel: LeaderChannel | FollowerChannel | None = None,
                 on_broken: Callable[[str], None] = _exit_process):
        """``on_broken(reason)``: what the leader does when it cannot publish a call (by default it
        exits); a call raises ``LockstepBroken`` if it returns."""
        self._channel = channel
        self._on_broken = on_broken
        self._published = 0
        self._targets: dict[str, object] = {}
        # One call at a time, published in the order it runs, whichever thread makes it; close
        # takes it too, so a stop never lands between the sends of one call.
        self._lock = threading.Lock()
        self._closed = False

    @property
    def is_leader(self) -> bool:
        return not isinstance(self._channel, FollowerChannel)

    @property
    def spans_processes(self) -> bool:
        return self._channel is not None

    def bind(self, name: str, target: object) -> None:
        """Names a target whose methods the leader calls through ``call``; each process binds its
        own copy under the same name."""
        self._targets[name] = target

    def call(self, program: Callable, **inputs):
        """Runs ``program(**inputs)`` (a method of a bound target) here and, first, on every
        follower, on its own copy of the target.

        Inputs are host values or arrays the leader can read (NumPy, ints, None, its own device
        arrays); across processes every process, the leader too, runs on their NumPy copies.
        """
        return self._call(program, inputs, answer=False)

    def _address(self, program: Callable) -> tuple[str, str]:
        """(the bound name of the program's target, the method's name): what a follower looks up."""
        owner = getattr(program, "__self__", None)
        for name, target in self._targets.items():
            if target is owner:
                return name, program.__name__
        raise ValueError(f"{program!r} is not a method of a target bound to this lockstep")

    def _call(self, program: Callable, inputs: dict, answer: bool):
        target, method = self._address(program)
        if not self.is_leader:
            raise RuntimeError("a follower runs only what the leader publishes")
        with self._lock:
            if self._closed:
                raise RuntimeError("the lockstep is closed: the followers have been told to stop")
            if self._channel is not None:
                # The leader runs on the very values it sent: its own device arrays could not be
                # placed on the other processes' devices.
                inputs = {k: _host(v) for k, v in inputs.items()}
                # Numbered only once encoded: a call that fails to encode (or is interrupted there)
                # is sent to nobody and run by nobody, and must not leave a gap in the numbers.
                payload = encode_call(target, method, inputs, answer, self._published + 1)
                self._published += 1
                try:
                    self._channel.publish(payload)
                except zmq.ZMQError as error:
                    reason = f"lockstep call {self._published} ({target}.{method}) could not reach the followers: {error}"
                    self._on_broken(reason)
                    raise LockstepBroken(reason) from None
                try:
                    return program(**inputs)
                except Exception as error:
                    reason = f"lockstep call {self._published} ({target}.{method}) failed on the leader: {error!r}"
                    self._on_broken(reason)
                    raise LockstepBroken(reason) from error
            return program(**inputs)

    def call_and_wait(self, program: Callable, timeout_s: float = WAIT_TIMEOUT_S) -> None:
        """Runs ``program()`` on every process and returns once all of them have finished it: for
        work whose length differs between processes (compiling, where one may find its programs
        in the cache and another not), which the next collective must not wait on."""
        self._call(program, {}, answer=True)
        if self._channel is not None:
            self._channel.wait_for_done(timeout_s)

    def follow(self) -> None:
        """A follower's whole life: run each published call until the leader closes."""
        if self.is_leader:
            raise RuntimeError("the leader does not follow")
        expected = 1
        while (payload := self._receive()) is not None:
            call = decode_call(payload)
            if call.seq != expected:
                raise LockstepBroken(f"lockstep call {call.seq} ({call.target}.{call.method}) arrived when call "
                                     f"{expected} was due: the leader's calls {expected}-{call.seq - 1} were lost on "
                                     "the way (the connection dropped), so this process is out of step for good")
            expected += 1
            try:
                getattr(self._targets[call.target], call.method)(**call.inputs)
            except Exception as error:
                raise LockstepBroken(f"lockstep call {call.seq} ({call.target}.{call.method}) failed on this process: "
                                     f"{error!r}; the others may have run it, so this process is out of step "
                                     "for good") from error
            if call.answer:
                self._channel.done()

    def _receive(self) -> bytes | None:
        try:
            return self._channel.receive()
        except ChannelDropped:
            raise LockstepBroken("the connection to the leader dropped: the calls queued on it are lost, so this "
                                 "process is out of step for good") from None

    def readable(self, tree, layout):
        """Outputs the leader will read, from inside a call: replicated over ``layout``'s mesh when
        the role spans processes (every process runs the call, so the collective is joined); as
        they are otherwise."""
        return layout.replicate(tree) if self.spans_processes else tree

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._channel is not None:
                self._channel.close()


def _host(value):
    """What the wire carries: None, Python scalars, or NumPy arrays (NumPy scalars such as
    float64, a float subclass, become 0-d arrays)."""
    if value is None or type(value) in (int, float, bool) or isinstance(value, np.ndarray):
        return value
    return np.asarray(value)
