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
import tempfile
supervisor = Supervisor({{"a": [sys.executable, "-c", {CHILD!r}], "b": [sys.executable, "-c", {CHILD!r}]}},
                        {{"PYTHONPATH": {str(REPO)!r}}}, tempfile.mkdtemp()).start()
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


def test_a_child_that_cannot_be_started_again_is_tried_later_and_the_others_serve_on(tmp_path):
    """Starting a child again can fail (no fork under memory pressure, its executable replaced):
    the supervisor tries again after a backoff instead of raising, which stopped every child."""
    import time

    from mmserve.roles.supervisor import Supervisor

    flaky = tmp_path / "flaky"
    flaky.write_text("#!/bin/sh\nexit 3\n")
    flaky.chmod(0o755)
    supervisor = Supervisor({"steady": [sys.executable, "-c", "import time; time.sleep(60)"],
                             "flaky": [str(flaky)]}, ENV, str(tmp_path)).start()
    try:
        steady, first = supervisor.children["steady"].process, supervisor.children["flaky"].process
        first.wait(timeout=10)
        flaky.unlink()  # every start from now on fails
        start = time.monotonic()
        for offset in (0.0, 1.5, 4.0):  # its first restart is due 1 s after it exits, the next 2 s later
            supervisor.check(start + offset)
        assert steady.poll() is None
        child = supervisor.children["flaky"]
        assert child.process is first and child.restarts == 2 and child.restart_at > start + 4.0
        flaky.write_text("#!/bin/sh\nsleep 60\n")
        flaky.chmod(0o755)
        supervisor.check(child.restart_at)
        assert child.process is not first and child.process.poll() is None
    finally:
        supervisor.stop()


def test_a_child_that_never_starts_stops_everything_after_five_tries(tmp_path):
    """A child that dies at start every time (a checkpoint it cannot load, a port taken) was started
    again for good, behind a /health answering 503: ``--role all`` never exited."""
    import time

    from mmserve.roles.supervisor import START_FAILURES, Supervisor

    supervisor = Supervisor({"steady": [sys.executable, "-c", "import time; time.sleep(60)"],
                             "broken": [sys.executable, "-c", "raise SystemExit(1)"]}, ENV, str(tmp_path)).start()
    try:
        now, checks = time.monotonic(), 0
        while supervisor.failed is None and checks < 4 * START_FAILURES:
            process = supervisor.children["broken"].process
            process.wait(timeout=30)
            supervisor.check(now)  # notices the death and schedules the restart...
            now = max(now, supervisor.children["broken"].restart_at or now)
            supervisor.check(now)  # ...which is due now
            checks += 1
        assert supervisor.failed == "broken" and supervisor.children["broken"].failed_starts == START_FAILURES
        assert supervisor.run() is False  # returns at once, saying it gave up
    finally:
        supervisor.stop()


def test_a_child_that_fails_after_a_long_start_every_time_is_given_up_on(tmp_path):
    """A run counts as healthy from when the child says it serves, not from its start: a checkpoint
    that loads and compiles for longer than STABLE_S and then fails every time was counted healthy,
    and restarted every second for ever."""
    import time

    from mmserve.roles.supervisor import STABLE_S, START_FAILURES, Supervisor

    supervisor = Supervisor({"slow": [sys.executable, "-c", "raise SystemExit(1)"]}, ENV, str(tmp_path)).start()
    try:
        now = time.monotonic()
        while supervisor.failed is None and supervisor.children["slow"].restarts < 2 * START_FAILURES:
            supervisor.children["slow"].process.wait(timeout=30)
            now += STABLE_S + 1  # each run lasted longer than STABLE_S, never ready
            supervisor.check(now)
            now = max(now, supervisor.children["slow"].restart_at or now)
            supervisor.check(now)
        assert supervisor.failed == "slow"
    finally:
        supervisor.stop()


def test_a_child_that_served_long_enough_is_healthy_again(tmp_path):
    import time

    from mmserve.roles.supervisor import FIRST_BACKOFF_S, STABLE_S, Supervisor

    ready = "from mmserve.roles.supervisor import mark_ready; mark_ready(); import time; time.sleep(0.5)"
    supervisor = Supervisor({"served": [sys.executable, "-c", ready]}, ENV, str(tmp_path)).start()
    try:
        child = supervisor.children["served"]
        start = time.monotonic()
        while not (tmp_path / "ready-0").exists():
            assert time.monotonic() - start < 30
            time.sleep(0.05)
        supervisor.check(start)  # sees it ready
        child.process.wait(timeout=30)
        supervisor.check(start + STABLE_S + 1)  # it died after serving longer than STABLE_S
        assert child.quick_deaths == 1 and child.restart_at == start + STABLE_S + 1 + FIRST_BACKOFF_S
    finally:
        supervisor.stop()


def test_stopping_gives_the_children_one_grace_together_then_kills_them(tmp_path, monkeypatch):
    """Each child waited its own grace in turn: four children deaf to SIGTERM (busy in native code)
    took four graces, past what docker stop and Kubernetes allow."""
    import time

    from mmserve.roles import supervisor as module

    monkeypatch.setattr(module, "STOP_GRACE_S", 1.0)
    deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    supervisor = module.Supervisor({f"c{i}": [sys.executable, "-c", deaf] for i in range(4)}, ENV, str(tmp_path))
    supervisor.start()
    time.sleep(1.0)  # each has set SIGTERM aside
    started = time.monotonic()
    supervisor.stop()
    assert time.monotonic() - started < 2.5
    assert all(c.process.returncode == -9 for c in supervisor.children.values())


def test_a_child_that_served_and_keeps_dying_soon_is_restarted_not_given_up_on(tmp_path):
    """Dying soon after it served (a request that crashes it, retried) is no failure to start."""
    import time

    from mmserve.roles.supervisor import START_FAILURES, Supervisor

    crash = "from mmserve.roles.supervisor import mark_ready; mark_ready(); raise SystemExit(1)"
    supervisor = Supervisor({"crashy": [sys.executable, "-c", crash]}, ENV, str(tmp_path)).start()
    try:
        child, now = supervisor.children["crashy"], time.monotonic()
        while child.restarts < START_FAILURES + 2:
            child.process.wait(timeout=30)
            supervisor.check(now)  # its ready file is there: it served, then died soon
            now = max(now, child.restart_at or now)
            supervisor.check(now)
        assert supervisor.failed is None and child.failed_starts == 0
    finally:
        supervisor.stop()


def test_a_child_that_served_once_and_can_no_longer_start_is_given_up_on(tmp_path):
    """Its first run served; every later one dies before it serves (its port taken meanwhile, say):
    it was restarted every 30 s for good, the parent never exiting (a review, 2026-12-08)."""
    import time

    from mmserve.roles.supervisor import START_FAILURES, Supervisor

    once = (f"import os, sys; from mmserve.roles.supervisor import mark_ready; flag = {str(tmp_path / 'served')!r}\n"
            "if os.path.exists(flag): sys.exit(1)\n"
            "open(flag, 'w').close(); mark_ready()")
    supervisor = Supervisor({"once": [sys.executable, "-c", once]}, ENV, str(tmp_path)).start()
    try:
        child, now = supervisor.children["once"], time.monotonic()
        while supervisor.failed is None and child.restarts < 3 * START_FAILURES:
            child.process.wait(timeout=30)
            supervisor.check(now)
            now = max(now, child.restart_at or now)
            supervisor.check(now)
        assert supervisor.failed == "once" and child.restarts == START_FAILURES
    finally:
        supervisor.stop()


def test_the_api_key_reaches_the_router_alone_and_no_child_gets_the_secret_files_path(tmp_path):
    """Every child got the HTTP API key, which no worker uses (a secret held where it serves nothing)."""
    from mmserve.cluster_credential import SECRET_ENV, SECRET_FILE_ENV
    from mmserve.roles.launch_all import child_environments
    from mmserve.roles.supervisor import Supervisor
    from mmserve.serving.router.auth import API_KEY_ENV

    env, own = child_environments({"PATH": os.environ["PATH"], API_KEY_ENV: "the-key", SECRET_FILE_ENV: "/s"},
                                  {SECRET_ENV: "s" * 32})
    show = f"import os; print(os.environ.get({API_KEY_ENV!r}), os.environ.get({SECRET_ENV!r}) is not None, " \
           f"os.environ.get({SECRET_FILE_ENV!r}))"
    out = {name: tmp_path / f"{name}.out" for name in ("router", "decode")}
    commands = {name: ["sh", "-c", f'"{sys.executable}" -c "{show}" > {path}'] for name, path in out.items()}
    supervisor = Supervisor(commands, env | {"PYTHONPATH": str(REPO)}, str(tmp_path), own).start()
    try:
        for child in supervisor.children.values():
            child.process.wait(timeout=30)
    finally:
        supervisor.stop()
    assert out["router"].read_text().split() == ["the-key", "True", "None"]
    assert out["decode"].read_text().split() == ["None", "True", "None"]


def test_a_terminals_ctrl_c_reaches_the_supervisor_alone(tmp_path):
    """Ctrl-C sends SIGINT to the terminal's foreground process group: the children, still importing
    (seconds, jax), each died of it with a KeyboardInterrupt traceback, besides the supervisor's own
    stop. In process groups of their own, they are stopped by the supervisor's SIGTERM alone."""
    import signal
    import time

    child = "import sys, time; print('ready', flush=True); time.sleep(60)"  # Python's default SIGINT handling
    script = f"""
import json, signal, sys
from mmserve.roles.supervisor import Supervisor
supervisor = Supervisor({{"a": [sys.executable, "-c", {child!r}], "b": [sys.executable, "-c", {child!r}]}},
                        {{"PYTHONPATH": {str(REPO)!r}}}, {str(tmp_path)!r})
signal.signal(signal.SIGINT, lambda *_: supervisor.request_stop())
supervisor.start()
print(json.dumps([c.process.pid for c in supervisor.children.values()]), flush=True)
supervisor.run()
supervisor.stop()
print(json.dumps([c.process.returncode for c in supervisor.children.values()]), flush=True)
"""
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        supervisor = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.PIPE, stderr=stderr,
                                      text=True, start_new_session=True)  # a group of its own, as a terminal's job
    children = []
    try:
        children = json.loads(supervisor.stdout.readline())
        assert [supervisor.stdout.readline() for _ in children] == ["ready\n"] * len(children)
        time.sleep(0.2)
        os.killpg(supervisor.pid, signal.SIGINT)  # what Ctrl-C does
        assert json.loads(supervisor.stdout.readline()) == [-signal.SIGTERM] * len(children)
        assert supervisor.wait(timeout=30) == 0
        assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        reap(supervisor, children)


def test_a_child_that_served_and_no_longer_says_it_is_alive_is_killed_and_started_again(tmp_path):
    """A hung child (SIGSTOP, a hung host, a loop that stopped turning) was left as it was: the
    router stopped routing to it, but nothing brought it back. One that renews its ready file
    (``Liveness``, from its loop) is left alone."""
    import time

    from mmserve.roles.supervisor import LIVENESS_S, Supervisor

    renews = ("from mmserve.roles.supervisor import Liveness, mark_ready; import time; mark_ready(); "
              "alive = Liveness()\nwhile True:\n    alive.renew(); time.sleep(0.1)")
    hangs = "from mmserve.roles.supervisor import mark_ready; import time; mark_ready(); time.sleep(60)"
    supervisor = Supervisor({"renews": [sys.executable, "-c", renews], "hangs": [sys.executable, "-c", hangs]}, ENV,
                            str(tmp_path)).start()
    try:
        files = {name: child.ready_file for name, child in supervisor.children.items()}
        deadline = time.monotonic() + 30
        while not all(os.path.exists(f) for f in files.values()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        supervisor.check(time.monotonic())  # both said they serve
        past = time.time() - LIVENESS_S - 5
        for path in files.values():  # as if neither had said anything for longer than LIVENESS_S
            os.utime(path, (past, past))
        time.sleep(1.5)  # the living one renews meanwhile
        hung = supervisor.children["hangs"].process
        supervisor.check(time.monotonic())
        assert hung.returncode == -9 and supervisor.children["hangs"].restart_at is not None
        assert supervisor.children["renews"].process.poll() is None
    finally:
        supervisor.stop()
