"""One ``serve.py --role colocated`` process for the whole serving session (started on first use,
stopped at the end) and the offline ``LLM`` on the same checkpoint to compare it with."""

import openai
import pytest

from mmserve import LLM
from served_model import API_KEY, ENGINE_ARGS, MODEL_NAME, engine_flags, random_image, write_served_checkpoint
from server_process import ServerProcess


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return write_served_checkpoint(tmp_path_factory.mktemp("serving_ckpt"))


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    """The server's --allowed-local-media-path, holding one picture."""
    path = tmp_path_factory.mktemp("media")
    random_image(1).save(path / "one.png")
    return path


@pytest.fixture(scope="session")
def server(checkpoint, media_dir, tmp_path_factory):
    process = ServerProcess(
        ["--role", "colocated", "--model", str(checkpoint), "--served-model-name", MODEL_NAME,
         "--allowed-local-media-path", str(media_dir), *engine_flags()],
        tmp_path_factory.mktemp("server_log") / "serve.log", env={"MMSERVE_API_KEY": API_KEY})
    yield process
    process.stop()


@pytest.fixture(scope="session")
def offline(checkpoint):
    return LLM(str(checkpoint), **ENGINE_ARGS)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=180)


@pytest.fixture
def auth():
    return {"Authorization": f"Bearer {API_KEY}"}
