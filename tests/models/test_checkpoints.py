"""Checkpoints as people have them: both expert layouts, shards, bf16, orbax, and clear errors."""

import json

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_reference import image_prompt, random_patches
from models.qwen3_vl_moe import load_model
from models.qwen3_vl_moe.weights import CheckpointError


def _rewrite(src, dst, transform, shards=1):
    """Copies checkpoint ``src`` to ``dst`` with tensors passed through ``transform``, in shards."""
    tensors = {k: transform(k, v) for k, v in load_file(src / "model.safetensors").items()}
    for name in src.iterdir():
        if name.suffix != ".safetensors":
            (dst / name.name).write_bytes(name.read_bytes())
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i::shards]}
        save_file(part, dst / file, metadata={"format": "pt"})
        weight_map |= {k: file for k in part}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def _published_layout(key, value):
    """The hub layout: gate_up_proj (E, H, 2I), down_proj (E, I, H)."""
    return value.transpose(1, 2) if key.endswith(("experts.gate_up_proj", "experts.down_proj")) else value


def _prompt(rng):
    grids = np.array([[1, 4, 6]])
    return image_prompt(rng, grids), random_patches(rng, grids), grids


def test_published_expert_layout_sharded_gives_same_logits(base_reference, base_model, tmp_path, rng):
    ckpt = _rewrite(base_reference[1], tmp_path, _published_layout, shards=3)
    assert not (ckpt / "model.safetensors").exists()
    published = load_model(ckpt, dtype="float32")
    ids, pv, grids = _prompt(rng)
    np.testing.assert_array_equal(np.asarray(published.forward(ids, pv, grids)),
                                  np.asarray(base_model.forward(ids, pv, grids)))


def test_bf16_checkpoint_loads_as_float32(base_reference, base_model, tmp_path):
    ckpt = _rewrite(base_reference[1], tmp_path, lambda k, v: v.to(torch.bfloat16))
    model = load_model(ckpt, dtype="float32")
    got = model.params["language_model"]["embed_tokens"]["embedding"]
    want = base_model.params["language_model"]["embed_tokens"]["embedding"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-2, atol=1e-2)
    assert not np.array_equal(np.asarray(got), np.asarray(want))


def test_orbax_round_trip_gives_identical_params(base_model, tmp_path, rng):
    base_model.save_orbax(tmp_path / "orbax")
    restored = load_model(tmp_path / "orbax", dtype="float32")
    leaves = jax.tree.leaves_with_path(base_model.params)
    assert len(leaves) == len(jax.tree.leaves(restored.params))
    for path, leaf in leaves:
        np.testing.assert_array_equal(np.asarray(_at(restored.params, path)), np.asarray(leaf))
    ids, pv, grids = _prompt(rng)
    np.testing.assert_array_equal(np.asarray(restored.forward(ids, pv, grids)),
                                  np.asarray(base_model.forward(ids, pv, grids)))


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_missing_tensor_names_file_and_key(base_reference, tmp_path):
    key = "model.language_model.layers.2.self_attn.k_norm.weight"
    src = base_reference[1]
    tensors = load_file(src / "model.safetensors")
    del tensors[key]
    _rewrite_dir(src, tmp_path, tensors)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.language_model\.layers\.2\.self_attn\.k_norm"):
        load_model(tmp_path)


def test_misshapen_tensor_names_file_and_key(base_reference, tmp_path):
    key = "model.visual.blocks.1.attn.qkv.weight"
    src = base_reference[1]
    tensors = load_file(src / "model.safetensors")
    tensors[key] = tensors[key][:, :-1].contiguous()
    _rewrite_dir(src, tmp_path, tensors)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.visual\.blocks\.1\.attn\.qkv"):
        load_model(tmp_path)


def _rewrite_dir(src, dst, tensors):
    for name in src.iterdir():
        if name.suffix != ".safetensors":
            (dst / name.name).write_bytes(name.read_bytes())
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
