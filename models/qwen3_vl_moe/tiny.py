"""The built-in ``tiny`` preset: a small random-weight model that runs offline in seconds.

Its special token ids are the generated tiny tokenizer's, and its processor caps images at
256x256 pixels so that a CPU encodes them quickly.
"""

from __future__ import annotations

from models.qwen3_vl_moe.config import ModelConfig, TextConfig, VisionConfig
from models.qwen3_vl_moe.processor import Processor
from models.qwen3_vl_moe.tiny_tokenizer import TINY_SPECIAL_IDS

TINY_SEED = 0


def tiny_config() -> ModelConfig:
    return ModelConfig(
        text=TextConfig(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_theta=5_000_000.0,
            mrope_section=(4, 2, 2),
            max_position_embeddings=4096,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
        ),
        vision=VisionConfig(
            depth=4,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            num_position_embeddings=64,
            deepstack_visual_indexes=(0, 1, 2),
        ),
        image_token_id=TINY_SPECIAL_IDS["<|image_pad|>"],
        video_token_id=TINY_SPECIAL_IDS["<|video_pad|>"],
        vision_start_token_id=TINY_SPECIAL_IDS["<|vision_start|>"],
        vision_end_token_id=TINY_SPECIAL_IDS["<|vision_end|>"],
        tie_word_embeddings=False,
        eos_token_ids=(TINY_SPECIAL_IDS["<|im_end|>"], TINY_SPECIAL_IDS["<|endoftext|>"]),
    )


def tiny_processor() -> Processor:
    return Processor.default().with_pixel_limits(min_pixels=32 * 32, max_pixels=256 * 256)
