"""``--role all``'s children never outlive it: killed with SIGKILL (no handler of its own runs), the
supervisor takes its children with it (PR_SET_PDEATHSIG, asked for by each child as it starts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from mmserve.roles.supervisor import PARENT_ENV
from orphans import alive, assert_die_with, reap

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


def test_children_die_with_a_supervisor_killed_by_sigkill():
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR], env=ENV, stdout=subprocess.PIPE, text=True)
    children = []
    try:
        children = json.loads(supervisor.stdout.readline())
        assert [supervisor.stdout.readline() for _ in children] == ["ready\n"] * len(children)
        assert all(alive(pid) for pid in children)
        assert_die_with(supervisor, children, "children outlived their supervisor")
    finally:
        reap(supervisor, children)


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
