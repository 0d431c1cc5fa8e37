import numpy as np
import pytest
from PIL import Image

from hf_reference import hf_config, hf_model, write_checkpoint
from mmserve import LLM


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """(transformers model, checkpoint dir) that the engine tests serve."""
    model = hf_model(hf_config(), seed=3)
    return model, write_checkpoint(model, tmp_path_factory.mktemp("engine_ckpt"))


@pytest.fixture(scope="session")
def llm(reference):
    """Compiles what the tests run, when they first run it, not the whole grid before its first request
    (95 s on 2 cores): the grid is test_compile_before_ready.py's and test_program_grid.py's subject."""
    return LLM(reference[1], num_pages=512, page_size=8, max_model_len=512, max_prefill_tokens=128,
               precompile=False)


def random_image(seed: int, size=(48, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)
