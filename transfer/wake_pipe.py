"""A file descriptor a zmq poll can watch, made readable from any thread.

An event loop that sleeps in a zmq poll over its sockets cannot also wait on a
``threading.Event``; a pipe's read end can sit in the same poll, and any thread wakes the loop
by writing a byte to it.
"""

from __future__ import annotations

import os
import threading


class WakePipe:
    def __init__(self) -> None:
        self.fd, self._write = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write, False)
        self._lock = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        """Safe after ``close`` (from a thread that outlived the owner): then it does nothing,
        rather than write to a descriptor number the process may have reused."""
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._write, b"w")
            except BlockingIOError:  # the pipe is full: the loop is already woken
                pass

    def drain(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self.fd)
            os.close(self._write)
