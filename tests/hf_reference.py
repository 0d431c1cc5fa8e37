"""transformers' own Qwen3VLMoeForConditionalGeneration on small random configs, as the reference.

Checkpoints are written with ``save_pretrained`` (the transformers 5 expert layout) next to the
tiny tokenizer and a processor config, so ``load_model`` reads them as it would a real one.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

IMAGE_ID, VIDEO_ID, VISION_START, VISION_END = 900, 901, 902, 903

BASE_TEXT = dict(
    vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
    decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2], "mrope_interleaved": True},
)
BASE_VISION = dict(
    depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, temporal_patch_size=2,
    spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 2],
    hidden_act="gelu_pytorch_tanh",
)


def hf_config(text=None, vision=None, tie=False) -> Qwen3VLMoeConfig:
    return Qwen3VLMoeConfig(
        text_config=BASE_TEXT | (text or {}),
        vision_config=BASE_VISION | (vision or {}),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
        tie_word_embeddings=tie,
    )


def hf_model(config: Qwen3VLMoeConfig, seed: int = 0) -> Qwen3VLMoeForConditionalGeneration:
    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration._from_config(
        copy.deepcopy(config), attn_implementation="eager", dtype=torch.float32
    )
    # Random init leaves norms at one and biases at zero; perturb every tensor so that a wrong
    # mapping of any of them shows in the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def hf_logits(model, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None):
    ids = torch.tensor(np.asarray(input_ids), dtype=torch.long)[None]
    kwargs = {}
    if pixel_values is not None:
        kwargs |= dict(pixel_values=torch.tensor(pixel_values), image_grid_thw=torch.tensor(image_grid_thw))
    if pixel_values_videos is not None:
        kwargs |= dict(
            pixel_values_videos=torch.tensor(pixel_values_videos), video_grid_thw=torch.tensor(video_grid_thw)
        )
    if kwargs:
        mm = torch.zeros_like(ids, dtype=torch.int32)
        mm[ids == IMAGE_ID] = 1
        mm[ids == VIDEO_ID] = 2
        kwargs["mm_token_type_ids"] = mm
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits[0].numpy()


def write_checkpoint(model, path: Path) -> Path:
    """save_pretrained plus the tiny tokenizer and the default processor config."""
    from models.qwen3_vl_moe.processor import Processor
    from models.qwen3_vl_moe.tiny_tokenizer import build_tiny_tokenizer

    model.save_pretrained(path)
    build_tiny_tokenizer().save(path)
    Processor.default().save(path)
    return path


def random_patches(rng: np.random.Generator, grid_thw) -> np.ndarray:
    n = int(sum(t * h * w for t, h, w in np.asarray(grid_thw).tolist()))
    return rng.standard_normal((n, 3 * 2 * 16 * 16)).astype(np.float32)


def image_prompt(rng: np.random.Generator, grids, text_between: int = 3) -> list[int]:
    """Text, then for each grid ``<vision_start> <image_pad>*tokens <vision_end>`` and more text."""
    ids = list(rng.integers(0, 800, 5))
    for t, h, w in np.asarray(grids).tolist():
        ids += [VISION_START] + [IMAGE_ID] * (t * h * w // 4) + [VISION_END]
        ids += list(rng.integers(0, 800, text_between))
    return ids


def video_prompt(rng: np.random.Generator, grid) -> list[int]:
    """One video: per temporal patch, a timestamp-like text run then its frame's placeholders."""
    t, h, w = grid
    ids = list(rng.integers(0, 800, 4))
    for _ in range(t):
        ids += list(rng.integers(0, 800, 3)) + [VISION_START] + [VIDEO_ID] * (h * w // 4) + [VISION_END]
    return ids + list(rng.integers(0, 800, 4))
