"""Logits of the Flax model equal transformers' Qwen3VLMoeForConditionalGeneration (fp32, 1e-4)."""

import numpy as np
import pytest

from hf_reference import hf_config, hf_logits, hf_model, image_prompt, random_patches, video_prompt, write_checkpoint
from models.qwen3_vl_moe import load_model

TOL = 1e-4


def assert_close(ours, theirs):
    ours = np.asarray(ours)
    assert ours.shape == theirs.shape
    diff = float(np.max(np.abs(ours - theirs)))
    assert diff < TOL, f"max logit difference {diff:.3e}"


def test_text_only(base_reference, base_model, rng):
    ids = list(rng.integers(0, 1000, 37))
    assert_close(base_model.forward(ids), hf_logits(base_reference[0], ids))


def test_one_image(base_reference, base_model, rng):
    grids = np.array([[1, 4, 6]])
    ids, pv = image_prompt(rng, grids), random_patches(rng, grids)
    assert_close(base_model.forward(ids, pv, grids), hf_logits(base_reference[0], ids, pv, grids))


def test_several_images_of_different_sizes(base_reference, base_model, rng):
    grids = np.array([[1, 4, 6], [1, 10, 4], [1, 2, 2]])
    ids, pv = image_prompt(rng, grids), random_patches(rng, grids)
    assert_close(base_model.forward(ids, pv, grids), hf_logits(base_reference[0], ids, pv, grids))


def test_video(base_reference, base_model, rng):
    grid = np.array([[3, 4, 6]])
    ids, pv = video_prompt(rng, grid[0]), random_patches(rng, grid)
    ours = base_model.forward(ids, pixel_values_videos=pv, video_grid_thw=grid)
    assert_close(ours, hf_logits(base_reference[0], ids, pixel_values_videos=pv, video_grid_thw=grid))


def test_image_and_video_together(base_reference, base_model, rng):
    grids, vgrid = np.array([[1, 4, 4]]), np.array([[2, 4, 6]])
    ids = image_prompt(rng, grids) + video_prompt(rng, vgrid[0])
    pv, pvv = random_patches(rng, grids), random_patches(rng, vgrid)
    ours = base_model.forward(ids, pv, grids, pvv, vgrid)
    assert_close(ours, hf_logits(base_reference[0], ids, pv, grids, pvv, vgrid))


VARIANTS = {
    "dense_layer_among_moe": dict(text={"mlp_only_layers": [1]}),
    "sparse_step_2": dict(text={"decoder_sparse_step": 2}),
    "tied_embeddings": dict(tie=True),
    "two_deepstack_levels": dict(vision={"deepstack_visual_indexes": [1, 3]}),
    "three_deepstack_levels_late": dict(vision={"deepstack_visual_indexes": [1, 2, 3]}),
    # hidden = 2 x moe_intermediate: gate_up_proj's two layouts have one shape (down_proj's tells them)
    "experts_square_gate_up": dict(text={"moe_intermediate_size": 32}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants(variant, tmp_path, rng):
    reference = hf_model(hf_config(**VARIANTS[variant]), seed=7)
    model = load_model(write_checkpoint(reference, tmp_path), dtype="float32")
    grids = np.array([[1, 6, 4]])
    ids, pv = image_prompt(rng, grids), random_patches(rng, grids)
    assert_close(model.forward(ids, pv, grids), hf_logits(reference, ids, pv, grids))
