"""Each role on its own mesh: encode on 2 devices, prefill on 4, decode on 8 (CPU devices of three
processes); the KV and embedding paths stay exact, so greedy output equals the one-device engine."""

import openai
import pytest

from cluster import ONE_AT_A_TIME, Cluster
from cluster_chats import ask, expected, image

pytestmark = pytest.mark.slow
MESHES = {"encode": ("model=2", 2), "prefill": ("model=2,expert=2", 4), "decode": ("model=4,expert=2", 8)}


@pytest.fixture(scope="module")
def meshed(tmp_path_factory):
    flags = {role: ["--mesh", mesh, *ONE_AT_A_TIME] for role, (mesh, _) in MESHES.items()}
    env = {role: {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"} for role, (_, n) in MESHES.items()}
    c = Cluster("tiny", tmp_path_factory.mktemp("mesh_logs"), flags, env)
    try:  # a start that fails or times out stops what it started too
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def llm():
    from mmserve import LLM

    return LLM("tiny", num_pages=256, page_size=8, max_model_len=512, max_prefill_tokens=128,
               precompile=False)  # a reference for a few answers: it compiles what they need, not the grid


@pytest.mark.parametrize("images", [[], [image(1, (64, 64))], [image(4, (256, 256))]],
                         ids=["text", "image", "image_with_resume"])
def test_roles_on_different_meshes_equal_one_device(meshed, llm, images):
    client = openai.OpenAI(base_url=f"{meshed.url}/v1", api_key="unused", timeout=600, max_retries=0)
    assert ask(client, "Describe.", images) == expected(llm, "Describe.", images)
