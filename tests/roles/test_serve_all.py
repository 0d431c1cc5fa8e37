"""The README's main command: ``serve.py --role all`` answers the OpenAI client as colocated does."""

import os
import signal
import subprocess
import sys
import time

import openai
import pytest

from cluster import SERVE, free_port, get_json
from mmserve import LLM, SamplingParams
from test_disaggregated import conversation, image

pytestmark = pytest.mark.slow


def test_role_all_serves_a_chat_with_an_image_and_stops_cleanly(tmp_path):
    port = free_port()
    log = open(tmp_path / "all.log", "wb")
    process = subprocess.Popen([sys.executable, SERVE, "--role", "all", "--model", "tiny", "--port", str(port),
                                "--num-pages", "128"], env=os.environ | {"JAX_PLATFORMS": "cpu"},
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, (tmp_path / "all.log").read_text()[-3000:]
            try:
                if get_json(f"http://127.0.0.1:{port}/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "serve.py --role all did not become healthy"
            time.sleep(1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120)
        picture = [image(7, (64, 64))]
        reply = client.chat.completions.create(model="tiny", messages=conversation("Describe.", picture, True),
                                               max_tokens=8, temperature=0)
        want = LLM("tiny", num_pages=128).chat(conversation("Describe.", picture, False),
                                              SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
        assert reply.choices[0].message.content == want
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    children = subprocess.run(["pgrep", "-s", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert children == [], "serve.py --role all left processes behind"
