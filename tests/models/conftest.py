import jax
import numpy as np
import pytest

from hf_reference import hf_config, hf_model, write_checkpoint
from models.qwen3_vl_moe import load_model


@pytest.fixture(scope="session")
def base_reference(tmp_path_factory):
    """(transformers model, checkpoint dir) for the base small config."""
    model = hf_model(hf_config())
    return model, write_checkpoint(model, tmp_path_factory.mktemp("base_ckpt"))


@pytest.fixture(scope="session")
def base_model(base_reference):
    return load_model(base_reference[1], dtype="float32")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="module", autouse=True)
def optimised_as_served():
    """The model's tests compile as a server does (the rest of the suite compiles with XLA's
    optimisations off, for time: tests/conftest.py), so its parity with transformers is the
    served programs'."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)
