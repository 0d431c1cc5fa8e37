"""Deepstack features reach the logits, and MRoPE positions equal transformers' get_rope_index."""

import numpy as np
import torch

from hf_reference import IMAGE_ID, VIDEO_ID, image_prompt, random_patches, video_prompt
from models.qwen3_vl_moe.config import ModelConfig
from models.qwen3_vl_moe import model as model_module
from models.qwen3_vl_moe.rope_index import get_rope_index


def test_zeroing_deepstack_changes_logits_at_and_after_the_image(base_model, rng, monkeypatch):
    grids = np.array([[1, 4, 6]])
    ids, pv = image_prompt(rng, grids), random_patches(rng, grids)
    with_deepstack = np.asarray(base_model.forward(ids, pv, grids))

    real_place = model_module.place_visual

    def without_deepstack(*args, **kwargs):
        placed = real_place(*args, **kwargs)
        return type(placed)(embeds=placed.embeds, mask=placed.mask, deepstack=placed.deepstack * 0)

    monkeypatch.setattr(model_module, "place_visual", without_deepstack)
    without = np.asarray(base_model.forward(ids, pv, grids))
    first_image = ids.index(IMAGE_ID)
    np.testing.assert_array_equal(with_deepstack[:first_image], without[:first_image])
    changed = np.abs(with_deepstack - without).max(axis=-1)
    assert np.all(changed[first_image:] > 1e-4), "every position from the image on must feel deepstack"


def test_rope_index_matches_transformers(base_reference, rng):
    reference, _ = base_reference
    grids, vgrid = np.array([[1, 4, 6], [1, 8, 2]]), np.array([[2, 6, 4]])
    ids = image_prompt(rng, grids) + video_prompt(rng, vgrid[0])
    config = ModelConfig.from_hf(reference.config.to_dict())
    ours, delta = get_rope_index(ids, config, grids, vgrid)
    t_ids = torch.tensor(ids)[None]
    mm = torch.zeros_like(t_ids, dtype=torch.int32)
    mm[t_ids == IMAGE_ID], mm[t_ids == VIDEO_ID] = 1, 2
    theirs, their_delta = reference.model.get_rope_index(t_ids, mm, torch.tensor(grids), torch.tensor(vgrid))
    np.testing.assert_array_equal(ours, theirs[:, 0].numpy())
    assert delta == int(their_delta[0, 0])
