"""The README's main job: start ``serve.py --role all`` (router, encode, prefill and decode on
loopback), ask it one chat question about a generated picture with the openai client, print the
answer, stop the server.

    pip install -e ".[client]"
    python scripts/demo.py [--model tiny] [--port 8000]

``tiny`` is a built-in model with random weights: the pipeline, the transfers and the API are
real, its words are not (the answer is gibberish, often with U+FFFD characters where random tokens
split a character). For a real answer, point it at a Hugging Face checkpoint directory:

    python scripts/demo.py --model /path/to/Qwen3-VL-30B-A3B-Instruct
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from generate import generated_image
from mmserve.config_flags import tcp_port

SERVE = Path(__file__).with_name("serve.py")
TINY_NOTE = """\
note: 'tiny' has random weights, so the answer above is gibberish: it shows the request crossed
encode -> prefill -> decode and came back, not what the model would say. For a real answer:
    python scripts/demo.py --model /path/to/Qwen3-VL-30B-A3B-Instruct    # a Hugging Face checkpoint directory"""


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


def picture_url() -> str:
    buf = io.BytesIO()
    generated_image().save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def http_port(text: str) -> int:
    """``tcp_port``, less 0 ("any free one"): the demo must know which port to ask."""
    port = tcp_port(text)
    if port == 0:
        raise argparse.ArgumentTypeError("the demo asks the server on a port it names: 1 to 65535, not 0")
    return port


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="'tiny' (random weights) or a Hugging Face / orbax checkpoint directory (default: tiny)")
    p.add_argument("--port", type=http_port, default=8000, help="the server's HTTP port, 1 to 65535 (default: 8000)")
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds to wait for the server to come up (default: 600)")
    args = p.parse_args()
    try:
        import openai
    except ImportError:
        raise SystemExit('the demo talks to the server with the openai client: pip install -e ".[client]"')
    url = f"http://127.0.0.1:{args.port}"
    with socket.socket() as probe:  # else another server on the port would answer for this one
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", args.port))
        except OSError as error:
            raise SystemExit(f"demo: port {args.port} is not free ({error.strerror}): pick another with --port") from None
    if args.model == "tiny":
        print("demo: 'tiny' has random weights: expect gibberish; the pipeline and the API are what is shown")
    print(f"demo: starting serve.py --role all --model {args.model} on {url} (a few minutes on a small CPU host)")
    server = subprocess.Popen([sys.executable, str(SERVE), "--role", "all", "--model", args.model,
                               "--port", str(args.port)], start_new_session=True)
    try:
        health = wait_healthy(url, server, args.timeout)
        print("roles up:", {role: [w["name"] for w in workers] for role, workers in health["roles"].items()})
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("MMSERVE_API_KEY") or "unused",
                               timeout=args.timeout, max_retries=0)
        start = time.monotonic()
        answer = client.chat.completions.create(model=args.model, max_tokens=24, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture_url()}},
                                         {"type": "text", "text": "Describe this image."}]}])
        print(f"answer ({time.monotonic() - start:.1f} s):", repr(answer.choices[0].message.content))
        print("usage:", answer.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}))
        if args.model == "tiny":
            print(TINY_NOTE)
        return 0
    finally:  # serve.py --role all stops its own processes
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the server was stopped on the way out
        sys.exit(130)
