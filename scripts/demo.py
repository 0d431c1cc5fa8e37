"""The README's main job: start ``serve.py --role all`` on the tiny model, ask it one chat question
about a generated picture over the OpenAI chat API, print the answer, stop the server.

    python scripts/demo.py [--model tiny] [--port 8000]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from generate import generated_image

SERVE = Path(__file__).with_name("serve.py")


def wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"serve.py exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                return json.loads(reply.read())
        except OSError:
            time.sleep(1)
    raise SystemExit(f"the server did not become healthy within {timeout:.0f}s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the server to come up")
    args = p.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen([sys.executable, str(SERVE), "--role", "all", "--model", args.model,
                               "--port", str(args.port)], start_new_session=True)
    try:
        health = wait_healthy(url, server, args.timeout)
        print("roles up:", {role: [w["name"] for w in workers] for role, workers in health["roles"].items()})
        buf = io.BytesIO()
        generated_image().save(buf, format="PNG")
        picture = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        body = {"model": args.model, "max_tokens": 24, "temperature": 0, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture}},
                                         {"type": "text", "text": "Describe this image."}]}]}
        request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json",
                                                  "authorization": f"Bearer {os.environ.get('MMSERVE_API_KEY', '')}"})
        with urllib.request.urlopen(request, timeout=args.timeout) as reply:
            answer = json.loads(reply.read())
        print("answer:", repr(answer["choices"][0]["message"]["content"]))
        print("usage:", answer["usage"])
        return 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
