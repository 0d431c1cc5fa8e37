"""What the serving tests serve: a real Hugging Face checkpoint written by ``hf_reference``, whose
image and vision-marker ids are the tiny tokenizer's, so the chat template's ``<|image_pad|>`` is
the model's image token and chats with images run end to end, and whose vocabulary holds every tiny
token (the tool-call markers too); and the engine settings."""

from pathlib import Path

import numpy as np
from PIL import Image

from hf_reference import hf_config, hf_model, write_checkpoint
from mmserve.config_flags import flag_name
from models.qwen3_vl_moe.tiny_tokenizer import TINY_SPECIAL_IDS, TINY_TOOL_TOKEN_IDS

API_KEY = "sk-serving-tests"
MODEL_NAME = "qwen3-vl-test"
ENGINE_ARGS = {"page_size": 16, "num_pages": 256, "max_model_len": 512, "max_num_seqs": 16,
               "max_prefill_tokens": 256, "precompile": False}
"""``precompile: False``: the servers and the offline engine compile what the tests run when they first
run it, not the whole grid before ready (90 s on 2 cores); compiling the grid before ready is tested on
the engine (tests/engine/test_compile_before_ready.py) and by ``serve.py --role all`` (tests/roles)."""


def write_served_checkpoint(path: Path) -> Path:
    config = hf_config(text={"vocab_size": max(TINY_TOOL_TOKEN_IDS.values()) + 1})  # every tiny token
    config.image_token_id = TINY_SPECIAL_IDS["<|image_pad|>"]
    config.video_token_id = TINY_SPECIAL_IDS["<|video_pad|>"]
    config.vision_start_token_id = TINY_SPECIAL_IDS["<|vision_start|>"]
    config.vision_end_token_id = TINY_SPECIAL_IDS["<|vision_end|>"]
    return write_checkpoint(hf_model(config, seed=5), path)


def engine_flags() -> list[str]:
    """ENGINE_ARGS as serve.py's flags (``--no-NAME`` for a setting that is False)."""
    flags = []
    for key, value in ENGINE_ARGS.items():
        name = flag_name(key)
        flags += [name if value else "--no-" + name[2:]] if isinstance(value, bool) else [name, str(value)]
    return flags


def random_image(seed: int, size=(48, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)
