"""The lockstep channel on loopback: a leader and a follower in one process, real ZMQ sockets.

The processes-spanning roles that use it are in tests/roles/test_multihost.py.
"""

import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest
import zmq

from mmserve.cluster_credential import ClusterCredential
from mmserve.distributed.lockstep import Lockstep, LockstepBroken
from mmserve.distributed.lockstep_channel import FollowerChannel, LeaderChannel, decode_call, encode_call
from transfer.curve import curve_client

KEYS = ClusterCredential.generate().lockstep_keys


class Recorder:
    def __init__(self, delay: float = 0.0):
        self.calls = []
        self.delay = delay

    fail_next = False

    def add(self, a, b, scale):
        self.calls.append(("add", a, b, scale))
        if self.fail_next:
            raise MemoryError("only this process ran out of memory")
        return a + (0 if b is None else b) * scale

    def slow(self):
        time.sleep(self.delay)
        self.calls.append(("slow",))

    def fail(self):
        self.calls.append(("fail",))
        raise ValueError("same error on every process")


def test_calls_round_trip_every_dtype_shape_and_none():
    inputs = {"f": np.arange(12, dtype=np.float32).reshape(3, 4), "i": np.array(7, np.int32),
              "b": np.array([True, False]), "u": np.arange(4, dtype=np.uint32).reshape(2, 2)[:, ::-1],
              "bf16": np.asarray(jnp.linspace(-2, 2, 6, dtype=jnp.bfloat16)).reshape(2, 3), "none": None, "n": 5,
              "big_endian": np.arange(4, dtype=">i4")}
    call = decode_call(encode_call("runner", "run_x", inputs, seq=3))
    assert (call.target, call.method, call.answer, call.seq) == ("runner", "run_x", False, 3)
    out = call.inputs
    assert out["none"] is None and out["n"] == 5
    for name in ("f", "i", "b", "u", "bf16", "big_endian"):
        assert out[name].dtype == inputs[name].dtype.newbyteorder("=") and out[name].shape == inputs[name].shape
        np.testing.assert_array_equal(out[name], inputs[name])


class Following(threading.Thread):
    """A follower's ``follow`` on a thread, keeping what it raised."""

    def __init__(self, follower: Lockstep):
        super().__init__()
        self.follower, self.raised = follower, None

    def run(self):
        try:
            self.follower.follow()
        except Exception as error:
            self.raised = error


@pytest.fixture
def pair():
    """(leader, its target, the follower's target, the follower's thread, the leader's breaks)."""
    leader_channel = LeaderChannel("127.0.0.1", 1, KEYS)
    follower = Lockstep(FollowerChannel(leader_channel.endpoint, 1, KEYS))
    leader_channel.wait_for_followers(timeout_s=10)
    breaks = []
    leader = Lockstep(leader_channel, on_broken=breaks.append)  # recorded: a real leader's process exits
    mine, theirs = Recorder(), Recorder(delay=0.5)
    leader.bind("r", mine)
    follower.bind("r", theirs)
    thread = Following(follower)
    thread.start()
    yield leader, mine, theirs, thread, breaks
    leader.close()
    thread.join(timeout=10)
    follower.close()


def test_follower_runs_the_leaders_calls_in_order_on_the_same_values(pair):
    leader, mine, theirs, thread, _ = pair
    results = [leader.call(mine.add, a=np.full(3, i, np.float32), b=None if i % 2 else np.ones(3, np.float32),
                           scale=i) for i in range(5)]
    np.testing.assert_array_equal(results[2], [4, 4, 4])
    leader.close()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the follower did not stop when the leader closed"
    assert thread.raised is None
    assert len(theirs.calls) == len(mine.calls) == 5
    for (_, a1, b1, s1), (_, a2, b2, s2) in zip(mine.calls, theirs.calls):
        np.testing.assert_array_equal(a1, a2)
        assert (b1 is None) == (b2 is None) and s1 == s2


def test_a_call_that_fails_ends_the_leader_and_the_follower(pair):
    """Neither process can know how the other's call ended (one may have run its collectives and
    wait for the other's half for ever), so a failure inside a program ends both: the leader
    exits (``on_broken``), the follower stops following."""
    leader, mine, theirs, thread, breaks = pair
    with pytest.raises(LockstepBroken, match="failed on the leader: ValueError"):
        leader.call(mine.fail)
    assert len(breaks) == 1 and "r.fail" in breaks[0]
    thread.join(timeout=10)
    assert isinstance(thread.raised, LockstepBroken) and "failed on this process: ValueError" in str(thread.raised)


def test_a_call_that_fails_on_the_follower_alone_ends_it(pair):
    leader, mine, theirs, thread, breaks = pair
    theirs.fail_next = True
    leader.call(mine.add, a=np.ones(1), b=None, scale=1)
    thread.join(timeout=10)
    assert isinstance(thread.raised, LockstepBroken) and "failed on this process" in str(thread.raised)
    assert not breaks


def test_a_program_that_fails_in_one_process_raises_as_it_is():
    lockstep, target = Lockstep(), Recorder()
    lockstep.bind("r", target)
    with pytest.raises(ValueError, match="same error"):
        lockstep.call(target.fail)


def test_call_and_wait_returns_once_the_slower_follower_has_finished(pair):
    """What keeps a leader that found its programs in the cache from entering a collective while a
    follower still compiles."""
    leader, mine, theirs, thread, _ = pair
    leader.call_and_wait(mine.slow)
    assert mine.calls == theirs.calls == [("slow",)]


def test_leader_gives_up_on_followers_that_never_come():
    channel = LeaderChannel("127.0.0.1", 1, KEYS)
    with pytest.raises(TimeoutError, match="0 of 1 followers"):
        channel.wait_for_followers(timeout_s=1)
    channel.close()


@pytest.mark.parametrize("host", ["[::1]", "::1"])
def test_a_follower_reaches_a_leader_on_an_ipv6_address(host):
    """A coordinator address such as [::1]:8476 names the leader's host: the channel used to bind
    every IPv4 interface and never hear the follower, which waited out jax's shutdown barrier."""
    channel = LeaderChannel(host, 1, KEYS)
    assert channel.endpoint.startswith("tcp://[::1]:")
    follower = FollowerChannel(channel.endpoint, 1, KEYS)
    channel.wait_for_followers(timeout_s=10)
    follower.close()
    channel.close()


def test_a_follower_cannot_call_and_a_leader_cannot_follow():
    channel = LeaderChannel("127.0.0.1", 0, KEYS)
    follower = Lockstep(FollowerChannel(channel.endpoint, 1, KEYS))
    theirs = Recorder()
    follower.bind("r", theirs)
    with pytest.raises(RuntimeError):
        follower.call(theirs.add)
    with pytest.raises(RuntimeError):
        Lockstep().follow()
    follower.close()
    channel.close()


def test_only_methods_of_bound_targets_can_be_called():
    lockstep, bound, stranger = Lockstep(), Recorder(), Recorder()
    lockstep.bind("r", bound)
    assert lockstep.call(bound.add, a=np.ones(2), b=np.ones(2), scale=2)[0] == 3
    with pytest.raises(ValueError, match="not a method of a target bound"):
        lockstep.call(stranger.add, a=np.ones(2), b=None, scale=2)


def test_a_process_without_the_cluster_secret_can_neither_join_nor_read_the_calls():
    """Anyone reaching the leader's port could say hello as a follower's routing id, take its
    place, and receive every call (requests' token ids and pictures)."""
    channel = LeaderChannel("127.0.0.1", 1, KEYS)
    impostor = FollowerChannel(channel.endpoint, 1, ClusterCredential.generate().lockstep_keys)
    try:
        with pytest.raises(TimeoutError, match="0 of 1 followers"):
            channel.wait_for_followers(timeout_s=2)
        follower = FollowerChannel(channel.endpoint, 1, KEYS)
        channel.wait_for_followers(timeout_s=10)
        channel.publish(encode_call("r", "add", {"n": 1}))
        assert decode_call(follower.receive()).inputs == {"n": 1}
        assert impostor._socket.poll(500) == 0  # noqa: SLF001: nothing reached it
        follower.close()
    finally:
        impostor.close()
        channel.close()


def test_the_leader_listens_on_the_address_it_advertises():
    channel = LeaderChannel("127.0.0.1", 0, KEYS)
    try:
        assert channel._socket.getsockopt_string(zmq.LAST_ENDPOINT).startswith("tcp://127.0.0.1:")  # noqa: SLF001
    finally:
        channel.close()


def test_a_call_that_cannot_be_encoded_runs_nowhere_and_leaves_no_gap(pair):
    """Nothing is sent for it, so the follower must not see a call missing after it (it would
    stop, taking the role down, though nothing was lost)."""
    leader, mine, theirs, thread, breaks = pair
    with pytest.raises(OverflowError):
        leader.call(mine.add, a=np.ones(1), b=None, scale=2**70)  # msgpack holds 64-bit integers only
    assert leader.call(mine.add, a=np.ones(1), b=None, scale=1)[0] == 1
    leader.close()
    thread.join(timeout=10)
    assert not thread.is_alive() and [c[0] for c in theirs.calls] == ["add"] and len(mine.calls) == 1
    assert thread.raised is None and not breaks


def test_a_message_of_another_shape_or_size_does_not_stop_the_leader():
    """Followers send only HELLO and DONE: a peer holding the keys that sends more frames, or a
    frame of 64 MiB, is ignored or cut off (the leader unpacked every message as two frames and
    raised, and read any frame whole)."""
    channel = LeaderChannel("127.0.0.1", 1, KEYS)
    stray = curve_client(zmq.Context.instance().socket(zmq.DEALER), KEYS)
    stray.setsockopt(zmq.LINGER, 0)
    stray.setsockopt(zmq.ROUTING_ID, b"follower-1")
    try:
        stray.connect(channel.endpoint)
        stray.send_multipart([b"hello", b"and more"])
        stray.send(b"x" * 64 * 2**20)
        with pytest.raises(TimeoutError, match="0 of 1 followers"):
            channel.wait_for_followers(timeout_s=2)
        stray.close()
        follower = FollowerChannel(channel.endpoint, 1, KEYS)
        channel.wait_for_followers(timeout_s=10)
        follower.close()
    finally:
        stray.close()
        channel.close()
