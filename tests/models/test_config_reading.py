"""config.json is read as transformers reads it: which of two spellings wins, what an absent key
means, and whether the output layer is tied. Each checkpoint is the base one with its config
edited; transformers loads the same directory, and the logits of an image prompt must agree
(they differed by 8e-4 to 2.5 before: a tied head read from the text config, or marked tied
while the checkpoint holds a head of its own; rope_parameters preferred to rope_scaling; a text
rope_theta of 5e6 where none is given; a vision rope_theta beside rope_parameters ignored)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3VLMoeForConditionalGeneration

from hf_reference import hf_logits, image_prompt, random_patches
from models.qwen3_vl_moe import load_model
from models.qwen3_vl_moe.config import ModelConfig, TextConfig, VisionConfig

TOL = 1e-4


def untied_by_the_text_config(c):
    c.pop("tie_word_embeddings")
    c["text_config"]["tie_word_embeddings"] = True  # the text config's own default: not the model's word


def tied_with_a_head_of_its_own(c):
    c["tie_word_embeddings"] = True  # the checkpoint holds lm_head.weight, not the embedding's copy


def text_theta_absent(c):
    c["text_config"]["rope_parameters"].pop("rope_theta")


def rope_scaling_beside_rope_parameters(c):
    c["text_config"]["rope_scaling"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3],
                                        "mrope_interleaved": True}


def vision_theta_at_the_top(c):
    c["vision_config"].pop("rope_parameters", None)
    c["vision_config"]["rope_theta"] = 100.0


@pytest.mark.parametrize("change", [untied_by_the_text_config, tied_with_a_head_of_its_own, text_theta_absent,
                                    rope_scaling_beside_rope_parameters, vision_theta_at_the_top],
                         ids=lambda change: change.__name__)
def test_a_config_is_read_as_transformers_reads_it(base_reference, tmp_path, change):
    src = base_reference[1]
    for name in src.iterdir():
        if name.suffix != ".safetensors":
            (tmp_path / name.name).write_bytes(name.read_bytes())
    save_file(load_file(src / "model.safetensors"), tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    change(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    reference = Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32,
                                                                   attn_implementation="eager").eval()
    rng = np.random.default_rng(3)
    grids = np.array([[1, 4, 6]])
    ids, patches = image_prompt(rng, grids), random_patches(rng, grids)
    ours = np.asarray(load_model(tmp_path, dtype="float32").forward(ids, patches, grids))
    diff = np.abs(ours - hf_logits(reference, ids, patches, grids)).max()
    assert diff < TOL, f"max logit difference {diff:.3e}"


def test_every_field_survives_a_round_trip_through_the_written_config():
    """An orbax checkpoint's config is the one written here: its vision rope_theta was not written,
    so the copy reloaded at 10,000."""
    config = ModelConfig(
        text=TextConfig(vocab_size=500, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                        num_attention_heads=6, num_key_value_heads=3, head_dim=24, rms_norm_eps=1e-3, rope_theta=1234.0,
                        mrope_section=(6, 3, 3), max_position_embeddings=999, attention_bias=True, num_experts=5,
                        num_experts_per_tok=3, moe_intermediate_size=7, decoder_sparse_step=2, mlp_only_layers=(1,)),
        vision=VisionConfig(depth=3, hidden_size=24, intermediate_size=20, num_heads=3, in_channels=1, patch_size=14,
                            temporal_patch_size=1, spatial_merge_size=1, out_hidden_size=48, num_position_embeddings=49,
                            deepstack_visual_indexes=(2, 0), hidden_act="gelu", rope_theta=77.0),
        image_token_id=1, video_token_id=2, vision_start_token_id=3, vision_end_token_id=4, tie_word_embeddings=True,
        eos_token_ids=(5, 6))
    assert ModelConfig.from_hf(json.loads(json.dumps(config.to_hf()))) == config
