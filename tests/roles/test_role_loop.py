"""The role loop sleeps while its role is idle and wakes at once for a call or a socket's message.

The role here is a minimal one (a zmq socket pair and a counter), so that the loop's waiting is
seen alone: with the idle wait made 10 s long, anything answered within a second was woken.
"""

import os
import threading
import time

import pytest
import zmq

from mmserve.roles import role_loop
from mmserve.roles.role_loop import RoleLoop


class SocketRole:
    role = "test"

    def __init__(self, busy_steps: int = 0):
        self.lock = threading.RLock()
        context = zmq.Context.instance()
        self.inside = context.socket(zmq.PAIR)
        self.outside = context.socket(zmq.PAIR)
        port = self.inside.bind_to_random_port("tcp://127.0.0.1")
        self.outside.connect(f"tcp://127.0.0.1:{port}")
        self.steps = 0
        self.busy_steps = busy_steps
        self.received: list[tuple[bytes, float]] = []
        self.pumps = 0

    def step(self) -> None:
        self.steps += 1
        with self.lock:
            while self.inside.poll(0):
                self.received.append((self.inside.recv(), time.monotonic()))

    def pump(self) -> None:
        self.pumps += 1

    def sockets(self) -> list:
        return [self.inside]

    def wait_limit_s(self) -> float:
        return 0.0 if self.steps < self.busy_steps else float("inf")

    def close(self) -> None:
        self.inside.close(linger=0)
        self.outside.close(linger=0)


def send_and_time(role: SocketRole, message: bytes) -> float:
    """Sends ``message`` to the role; seconds until its step took it (the test fails after 3 s)."""
    sent = time.monotonic()
    role.outside.send(message)
    deadline = sent + 3.0
    while not role.received and time.monotonic() < deadline:
        time.sleep(0.005)
    assert role.received and role.received[0][0] == message, "the role never took the message"
    return role.received[0][1] - sent


@pytest.fixture
def long_idle_wait(monkeypatch):
    monkeypatch.setattr(role_loop, "IDLE_WAIT_S", 10.0)


def test_an_idle_loop_sleeps_instead_of_stepping(long_idle_wait):
    """Once idle, the loop neither steps nor pumps: a loop polling on a tick would step ~60 times in
    0.3 s (5 ms), or thousands (none). The first 0.3 s are left out: on a loaded host the pump may
    catch the loop's first steps and wake it after each (it cannot tell whether it read news)."""
    role = SocketRole()
    loop = RoleLoop(role).start()
    time.sleep(0.3)
    steps, pumps = role.steps, role.pumps
    time.sleep(0.3)
    later_steps, later_pumps = role.steps - steps, role.pumps - pumps
    loop.stop()
    assert later_steps == 0, f"an idle role was stepped {later_steps} times in 0.3 s"
    assert later_pumps == 0, "the pump ran while the loop was idle"


def test_an_idle_loop_costs_under_three_percent_of_a_core():
    """With the default timer wake-up, an idle worker must not take the cores from the one doing the
    work (``--role all`` runs three workers and a router on the same cores). A 5 ms idle tick and a
    pump waking every 2 ms cost this loop about 7% of a core; now it is about 1%."""
    role = SocketRole()
    loop = RoleLoop(role).start()
    time.sleep(0.3)
    threads = (loop._thread, loop._pump)  # their own CPU: the test process's other threads count for nothing
    start = sum(thread_cpu_s(t) for t in threads)
    time.sleep(1.0)
    used = sum(thread_cpu_s(t) for t in threads) - start
    loop.stop()
    assert used < 0.03, f"an idle loop used {used * 1000:.0f} ms of CPU in 1 s"


def thread_cpu_s(thread) -> float:
    """A thread's user and system CPU seconds so far (Linux's per-thread clock in /proc)."""
    fields = open(f"/proc/self/task/{thread.native_id}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_call_wakes_an_idle_loop(long_idle_wait):
    role = SocketRole()
    loop = RoleLoop(role).start()
    time.sleep(0.1)  # asleep by now
    start = time.monotonic()
    assert loop.call(lambda x: x + 1, 41) == 42
    assert time.monotonic() - start < 1.0
    loop.stop()


def test_a_message_on_a_role_socket_wakes_an_idle_loop(long_idle_wait):
    role = SocketRole()
    loop = RoleLoop(role).start()
    time.sleep(0.1)
    delay = send_and_time(role, b"ready")
    loop.stop()
    assert delay < 1.0, "the message waited for the idle timeout"


def test_a_busy_role_is_stepped_back_to_back(long_idle_wait):
    role = SocketRole(busy_steps=200)
    loop = RoleLoop(role).start()
    deadline = time.monotonic() + 5.0
    while role.steps < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    loop.stop()
    assert role.steps >= 200


def test_stop_wakes_an_idle_loop(long_idle_wait):
    role = SocketRole()
    loop = RoleLoop(role).start()
    time.sleep(0.1)
    start = time.monotonic()
    loop.stop()
    assert time.monotonic() - start < 1.0


class PumpingRole(SocketRole):
    """A role whose pump reads its socket (as a worker's pump reads transfer messages and landed
    pulls) and whose step takes what the pump read; its second step is long."""

    def __init__(self):
        super().__init__(busy_steps=2)
        self.arrived: list[bytes] = []

    def step(self) -> None:
        self.steps += 1
        with self.lock:
            self.received += [(message, time.monotonic()) for message in self.arrived]
            self.arrived.clear()
        if self.steps == 2:
            time.sleep(0.3)

    def pump(self) -> None:
        with self.lock:
            while self.inside.poll(0):
                self.arrived.append(self.inside.recv())


def test_news_the_pump_read_during_a_step_is_taken_before_the_loop_sleeps(long_idle_wait):
    """A message arrives during a long step, after that step looked; the pump reads it, so the
    socket is quiet when the loop goes to sleep: the loop must look again rather than sleep
    through it until its idle timer."""
    role = PumpingRole()
    loop = RoleLoop(role).start()
    deadline = time.monotonic() + 2.0
    while role.steps < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.1)  # inside the long second step
    delay = send_and_time(role, b"landed")
    loop.stop()
    assert role.arrived == []
    assert delay < 1.0, "the loop slept through what its pump read"


def test_a_call_to_a_stopped_loop_is_refused_instead_of_waiting_forever():
    """As a worker stops, a gRPC thread may still free a request its caller hung up on."""
    loop = RoleLoop(SocketRole()).start()
    assert loop.call(lambda: "ran") == "ran"
    loop.stop()
    with pytest.raises(role_loop.LoopStopped):
        loop.call(lambda: "never")


class FailingRole(SocketRole):
    def step(self) -> None:
        super().step()
        raise RuntimeError("the device is gone")


def test_a_step_that_keeps_failing_is_tried_less_and_less_often_and_calls_are_still_answered():
    """It was tried again at once, for good: a core spun and the log grew by ~80,000 tracebacks a second."""
    role = FailingRole()
    loop = RoleLoop(role).start()
    try:
        time.sleep(1.0)
        assert loop.call(lambda: "answered") == "answered"
        assert 3 <= role.steps <= 12  # 10 ms, then doubling: ~7 tries in the first second
    finally:
        loop.stop()
