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
