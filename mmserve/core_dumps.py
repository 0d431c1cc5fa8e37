"""No core dumps: a server's memory holds the cluster secret, the keys derived from it and the API
key, and a core file (or a crash handler piping one to disk) would keep them for anyone who can
read it. ``RLIMIT_CORE`` 0 stops core files; ``PR_SET_DUMPABLE`` 0 (Linux) also stops cores piped
to a handler, and makes ``/proc/PID/environ`` and ``mem`` root's alone, where the same user's other
processes could read the secret handed down in the environment. A debugger or ``py-spy`` then
needs root, as for any non-dumpable process (``ssh-agent`` does the same)."""

from __future__ import annotations

import ctypes
import os
import resource
import sys

_PR_SET_DUMPABLE = 4


def forbid_core_dumps() -> None:
    """Call first thing in a server process, before any secret is read."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"prctl(PR_SET_DUMPABLE): {os.strerror(error)}")
