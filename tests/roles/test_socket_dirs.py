"""``--role all`` killed with SIGKILL runs no clean-up and leaves its socket directory behind: the
next start removes those of servers no longer running, and nothing else."""

import os
import subprocess
import sys

from mmserve.roles.launch_all import remove_stale_socket_dirs


def test_a_start_removes_the_socket_dirs_of_servers_no_longer_running(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(gone.stdout)
    dead = tmp_path / f"mmserve-{dead_pid}-a1b2c3"
    (dead / "inner").mkdir(parents=True)
    (dead / "registry.sock").write_text("")
    alive = tmp_path / f"mmserve-{os.getpid()}-d4e5f6"
    alive.mkdir()
    other_name = tmp_path / f"mmserve-{dead_pid}"  # not a socket directory's name
    other_name.mkdir()
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    target = tmp_path / f"mmserve-{dead_pid}-link"  # a link, even named like one, is not followed
    target_dir = tmp_path / "kept"
    target_dir.mkdir()
    target.symlink_to(target_dir)

    assert remove_stale_socket_dirs(str(tmp_path)) == [str(dead)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [alive.name, other_name.name, unrelated.name, target.name, target_dir.name])


def test_a_worker_killed_with_sigkill_has_its_data_socket_removed_as_it_is_restarted(tmp_path):
    """Each kill -9 of a worker left its data plane's socket file until the server stopped (18
    files after 15 kills, a review): the supervisor removes a child's once it notices it ended."""
    import signal
    import time

    from mmserve.roles.supervisor import Supervisor
    from transfer.zmq_plane import ZmqDataPlane, remove_sockets_of

    sockets = tmp_path / "sockets"
    sockets.mkdir(mode=0o700)
    plane = ZmqDataPlane("", directory=str(sockets))  # this process's own: kept
    worker = ("import sys, time; sys.path.insert(0, %r); from transfer.zmq_plane import ZmqDataPlane; "
              "plane = ZmqDataPlane('', directory=%r); time.sleep(60)"
              % (os.getcwd(), str(sockets)))
    supervisor = Supervisor({"w": [sys.executable, "-c", worker]}, dict(os.environ), str(tmp_path),
                            on_exit=lambda pid: remove_sockets_of(str(sockets), pid))
    supervisor.start()
    try:
        child = supervisor.children["w"]
        deadline = time.monotonic() + 60
        while len(list(sockets.glob(f"data-{child.process.pid}-*.sock"))) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        child.process.send_signal(signal.SIGKILL)
        child.process.wait(timeout=30)
        supervisor.check(time.monotonic())
        assert [p.name for p in sockets.iterdir()] == [plane.address.rsplit("/", 1)[1]]
    finally:
        supervisor.stop()
        plane.close()
