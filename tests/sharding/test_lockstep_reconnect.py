"""A lockstep channel whose TCP connection drops: ZMQ reconnects by itself, and the calls queued on
the old connection are gone without an error. The processes are then out of step for good, so the
break must end the role, never let a follower run on past a lost call (as it once did, silently).

The follower's connection goes through a small proxy in the test, which stalls and then resets it
(what a network blip or a conntrack reset does).

The follower stops as its connection drops, not at the next call: the leader, having run the lost
call, waits in that call's collectives for the follower's half, and publishes nothing more."""

import dataclasses
import socket
import threading
import time

import pytest

from mmserve.cluster_credential import ClusterCredential
from mmserve.distributed.lockstep import Lockstep, LockstepBroken
from mmserve.distributed.lockstep_channel import FollowerChannel, LeaderChannel

KEYS = ClusterCredential.generate().lockstep_keys


class Proxy:
    """Forwards one port to another; ``stall`` holds what goes to the follower, ``reset`` drops
    every connection with a TCP reset. New connections are forwarded as before."""

    def __init__(self, target_port: int):
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self.stalled = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target))
            except OSError:  # the leader has closed: the follower is still trying
                client.close()
                continue
            self._pairs.append((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source, sink, to_follower):
        try:
            while data := source.recv(65536):
                while to_follower and self.stalled.is_set():
                    time.sleep(0.001)
                sink.sendall(data)
        except OSError:
            pass

    def reset(self):
        pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")  # close with RST
                s.close()
        self.stalled.clear()

    def close(self):
        self._listener.close()
        self.reset()


class Counter:
    def __init__(self):
        self.ran = []

    def step(self, n):
        self.ran.append(int(n))


@dataclasses.dataclass
class ProxiedPair:
    """A leader and a follower whose connection goes through a ``Proxy``, the follower following
    on a thread; ``breaks``: the leader's (its process would exit), ``raised``: the follower's."""

    proxy: Proxy
    leader: Lockstep
    follower: Lockstep
    mine: Counter
    theirs: Counter
    thread: threading.Thread
    breaks: list
    raised: list


@pytest.fixture
def pair():
    leader_channel = LeaderChannel("127.0.0.1", 1, KEYS)
    proxy = Proxy(int(leader_channel.endpoint.rsplit(":", 1)[1]))
    follower = Lockstep(FollowerChannel(f"tcp://127.0.0.1:{proxy.port}", 1, KEYS))
    leader_channel.wait_for_followers(timeout_s=10)
    breaks, raised = [], []
    leader = Lockstep(leader_channel, on_broken=breaks.append)
    mine, theirs = Counter(), Counter()
    leader.bind("r", mine)
    follower.bind("r", theirs)

    def follow():
        try:
            follower.follow()
        except LockstepBroken as error:
            raised.append(error)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    yield ProxiedPair(proxy, leader, follower, mine, theirs, thread, breaks, raised)
    leader.close()
    thread.join(timeout=5)
    if not thread.is_alive():
        follower.close()
    proxy.close()


@pytest.mark.parametrize("stall", [True, False], ids=["stalled-then-reset", "reset"])
def test_a_dropped_connection_ends_the_role_and_no_call_runs_out_of_step(pair, stall):
    proxy, leader, mine, theirs, thread = pair.proxy, pair.leader, pair.mine, pair.theirs, pair.thread
    breaks, raised = pair.breaks, pair.raised
    for n in range(1, 400):
        if n == 20 and stall:
            proxy.stalled.set()
        if n == 40:
            proxy.reset()
        try:
            leader.call(mine.step, n=n)
        except LockstepBroken:
            break  # the leader's process would have exited (on_broken)
        if raised:
            break
        time.sleep(0.005)
    assert breaks or raised, "the channel broke and neither side noticed"
    # Had the leader gone on (its process exits instead), its next call would reach the
    # follower once reconnected, and the follower would stop there rather than run it.
    deadline = time.monotonic() + 10
    while not raised and time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            leader.call(mine.step, n=0)
        except LockstepBroken:
            pass  # not reconnected yet
        thread.join(timeout=0.5)
    assert raised and ("were lost on the way" in str(raised[0]) or "connection to the leader dropped" in
                       str(raised[0]))
    assert theirs.ran == list(range(1, len(theirs.ran) + 1)), "the follower ran on past a lost call"
    assert len(theirs.ran) < len(mine.ran)  # calls were lost: what made the break fatal


def test_a_follower_whose_connection_drops_stops_though_no_call_follows(pair):
    """The leader sends three calls and then nothing (its process sits in the third's collective):
    the follower, which lost the third with its connection, stops within seconds; it waited in
    its receive for ever (both processes alive, the channel reconnected, heartbeats passing)."""
    proxy, leader, mine, theirs, thread, raised = (pair.proxy, pair.leader, pair.mine, pair.theirs, pair.thread,
                                                   pair.raised)
    for n in (1, 2):
        leader.call(mine.step, n=n)
    deadline = time.monotonic() + 10
    while theirs.ran != [1, 2]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proxy.stalled.set()
    leader.call(mine.step, n=3)
    time.sleep(0.2)
    proxy.reset()
    thread.join(timeout=15)
    assert raised and "connection to the leader dropped" in str(raised[0])
    assert theirs.ran == [1, 2]
