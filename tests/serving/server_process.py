"""``scripts/serve.py`` as a real child process on a free loopback port, and small HTTP helpers."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

from mmserve.roles.supervisor import PARENT_ENV

REPO = Path(__file__).resolve().parents[2]
SERVE = REPO / "scripts" / "serve.py"
READY_TIMEOUT_S = 480  # loading and compiling every program on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Starts serve.py with ``args``, waits until /health answers 200, and stops it on ``stop``."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, str(SERVE), *args, "--port", str(self.port), "--log-level", "warning"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, PARENT_ENV: str(os.getpid()), **(env or {})})  # it dies with the tests
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve.py exited with {self.process.returncode}:\n{self.log()}")
            try:
                if request("GET", f"{self.url}/health", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"serve.py was not ready within {READY_TIMEOUT_S}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def request(method: str, url: str, body=None, headers: dict[str, str] | None = None, timeout: float = 120,
            raw: bytes | None = None) -> tuple[int, object]:
    """(status, parsed JSON or text); HTTP errors are returned, not raised."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, payload = error.code, error.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode(errors="replace")


def stream_then_hang_up(server, body: dict, headers: dict[str, str], lines: int) -> None:
    """Starts a streamed chat, reads ``lines`` lines of it (the request is decoding), and closes the
    socket as a client that leaves would."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                       headers={"Content-Type": "application/json", **headers})
    response = connection.getresponse()
    for _ in range(lines):
        response.fp.readline()
    connection.sock.close()
    connection.close()


def health_once_idle(server, timeout_s: float = 60) -> dict:
    """/health once nothing runs and every page is free, or the last one seen after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = request("GET", f"{server.url}/health")[1]
        if (health["running"] == 0 and health["free_pages"] == health["total_pages"]) or time.monotonic() > deadline:
            return health
        time.sleep(0.2)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def png_data_url(image: Image.Image) -> str:
    return f"data:image/png;base64,{png_base64(image)}"


def prometheus_value(text: str, name: str) -> float:
    """The value of an unlabelled sample ``name`` in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def metric(url: str, sample: str) -> float:
    """The value of ``sample`` (a name, with its labels if any) on the server's /metrics; 0 when absent."""
    for line in request("GET", f"{url}/metrics")[1].splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[1])
    return 0.0
