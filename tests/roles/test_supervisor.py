"""``--role all``'s children never outlive it: killed with SIGKILL (no handler of its own runs), the
supervisor takes its children with it (PR_SET_PDEATHSIG, asked for by each child as it starts)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mmserve.roles.supervisor import PARENT_ENV

REPO = Path(__file__).resolve().parents[2]
ENV = os.environ | {"PYTHONPATH": str(REPO)}
CHILD = ("from mmserve.roles.supervisor import die_with_parent; die_with_parent(); print('ready', flush=True); "
         "import time; time.sleep(120)")
SUPERVISOR = f"""
import json, sys, time
from mmserve.roles.supervisor import Supervisor
supervisor = Supervisor({{"a": [sys.executable, "-c", {CHILD!r}], "b": [sys.executable, "-c", {CHILD!r}]}},
                        {{"PYTHONPATH": {str(REPO)!r}}}).start()
print(json.dumps([c.process.pid for c in supervisor.children.values()]), flush=True)
supervisor.run()
"""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that never comes, in a container, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_children_die_with_a_supervisor_killed_by_sigkill():
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR], env=ENV, stdout=subprocess.PIPE, text=True)
    children = []
    try:
        children = json.loads(supervisor.stdout.readline())
        assert [supervisor.stdout.readline() for _ in children] == ["ready\n"] * len(children)
        assert all(_alive(pid) for pid in children)
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in children), "children outlived their supervisor"
    finally:
        supervisor.kill()
        supervisor.wait()
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_child_whose_parent_is_already_gone_does_not_start():
    """The parent named is not this process's parent any more (it died while the child started)."""
    child = subprocess.run([sys.executable, "-c", CHILD], env=ENV | {PARENT_ENV: str(os.getppid())},
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 1 and "is gone; not starting" in child.stderr


def test_without_the_variable_nothing_changes():
    code = "from mmserve.roles.supervisor import die_with_parent; die_with_parent(); print('served')"
    child = subprocess.run([sys.executable, "-c", code], env={k: v for k, v in ENV.items() if k != PARENT_ENV},
                           capture_output=True, text=True, timeout=60)
    assert (child.returncode, child.stdout) == (0, "served\n")
