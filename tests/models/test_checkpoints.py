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


def test_auto_dtype_is_the_checkpoint_s_own(base_reference, base_model, tmp_path):
    """As vLLM's ``--dtype auto``: a bfloat16 checkpoint (the hub's) ran in float32 by default, twice
    its memory (115.75 GiB of parameters for Qwen3-VL-30B-A3B); float16 runs in bfloat16, the
    16-bit type this code has; float32 stays float32, and so does tiny."""
    src = base_reference[1]
    for saved, runs in (("bfloat16", "bfloat16"), ("float16", "bfloat16"), ("float32", "float32")):
        config = json.loads((src / "config.json").read_text())
        assert config["dtype"] == "float32"
        (tmp_path / saved).mkdir()
        _rewrite_dir(src, tmp_path / saved, {})
        (tmp_path / saved / "config.json").write_text(json.dumps(config | {"dtype": saved}))
        assert load_model(tmp_path / saved, weights=False).dtype == np.dtype(runs), saved
    assert load_model("tiny", weights=False).dtype == np.float32
    bf16 = load_model(src, dtype="bfloat16")
    bf16.save_orbax(tmp_path / "orbax")  # its config says what it holds
    assert load_model(tmp_path / "orbax").dtype == np.dtype("bfloat16")


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


def _with_config(src, dst, change):
    """A copy of checkpoint ``src`` whose config.json's text (or vision) config ``change`` edits."""
    tensors = load_file(src / "model.safetensors")
    _rewrite_dir(src, dst, tensors)
    config = json.loads((dst / "config.json").read_text())
    change(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("change, message", [
    # each loaded without a word into another model than the checkpoint's (logits off by 0.04-0.5)
    (lambda c: c["text_config"].update(hidden_act="gelu"), "text hidden_act 'gelu' is not implemented"),
    (lambda c: c["vision_config"].update(hidden_act="silu"), "vision hidden_act 'silu' is not implemented"),
    (lambda c: c["text_config"].pop("num_experts_per_tok"), "experts but no num_experts_per_tok"),
    (lambda c: c["text_config"].update(num_hidden_layers=c["text_config"]["num_hidden_layers"] - 1),
     "is one the config does not use"),
    (lambda c: c["vision_config"].update(deepstack_visual_indexes=[0, 99]), "deepstack_visual_indexes"),
    # transformers runs both; here they failed in the loading, naming neither ("Need at least one
    # array to stack", KeyError 'deepstack_merger_list_1')
    (lambda c: c["vision_config"].update(deepstack_visual_indexes=[]), "must name at least one vision block"),
    (lambda c: c["vision_config"].update(deepstack_visual_indexes=[1, 1]), "each once"),
    # a broadcasting TypeError deep in the rotary embedding (a review, 2026-12-08)
    (lambda c: c["text_config"].update(head_dim=15), "head_dim 15 must be even"),
])
def test_a_config_the_weights_or_this_code_do_not_match_is_refused(base_reference, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        load_model(_with_config(base_reference[1], tmp_path, change))


def test_damaged_or_ambiguous_safetensors_are_refused_naming_the_file(base_reference, tmp_path):
    src = base_reference[1]
    tensors = load_file(src / "model.safetensors")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    _rewrite_dir(src, truncated, tensors)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:len(data) - 4096])
    with pytest.raises(ValueError, match="truncated or damaged"):
        load_model(truncated)
    stray = tmp_path / "stray"
    stray.mkdir()
    _rewrite_dir(src, stray, tensors)  # a second file holding a tensor of the first: which one is meant?
    save_file({"model.language_model.norm.weight": torch.zeros_like(tensors["model.language_model.norm.weight"])},
              stray / "z_extra.safetensors")
    with pytest.raises(CheckpointError, match="is in both model.safetensors and z_extra.safetensors"):
        load_model(stray)
    integer = tmp_path / "integer"
    integer.mkdir()
    key = "model.language_model.norm.weight"
    _rewrite_dir(src, integer, tensors | {key: (tensors[key] * 100).to(torch.int64)})
    with pytest.raises(CheckpointError, match="weights must be floating point"):
        load_model(integer)


def test_an_orbax_checkpoint_lacking_what_the_config_asks_for_is_refused(base_model, base_reference, tmp_path):
    """``partial_restore`` left placeholders for the arrays a checkpoint lacked: the server said it
    was healthy and failed every request."""
    base_model.save_orbax(tmp_path / "orbax")
    config = json.loads((base_reference[1] / "config.json").read_text())
    config["text_config"]["attention_bias"] = True  # asks for q/k/v/o biases it never saved
    (tmp_path / "orbax" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not hold"):
        load_model(tmp_path / "orbax")


def test_a_processor_at_odds_with_the_vision_tower_is_refused_before_the_weights(base_reference, tmp_path):
    """Every picture failed later ("pixel values do not match grids"), the server healthy meanwhile."""
    src = base_reference[1]
    _rewrite_dir(src, tmp_path, load_file(src / "model.safetensors"))
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        config = json.loads((tmp_path / name).read_text())
        config["patch_size"] = 14
        (tmp_path / name).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="preprocessor config's patch_size is 14, the vision config's 16"):
        load_model(tmp_path, weights=False)


def test_the_fingerprint_names_the_model_not_the_files_it_came_from(base_model, base_reference, tmp_path):
    """The router refuses workers of another model by this fingerprint: one checkpoint gives one
    fingerprint from safetensors or orbax, with or without its weights; another config, or another
    model, gives another."""
    base_model.save_orbax(tmp_path / "orbax")
    fingerprint = base_model.fingerprint
    assert load_model(tmp_path / "orbax", dtype="float32").fingerprint == fingerprint
    assert load_model(base_reference[1], weights=False).fingerprint == fingerprint
    (tmp_path / "eps").mkdir()
    other_eps = _with_config(base_reference[1], tmp_path / "eps",
                             lambda c: c["text_config"].update(rms_norm_eps=c["text_config"]["rms_norm_eps"] * 10))
    assert load_model(other_eps, weights=False).fingerprint != fingerprint
    assert load_model("tiny", weights=False).fingerprint != fingerprint
