"""Loading weights: Hugging Face safetensors directories and orbax checkpoints.

A safetensors directory is either one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``; tensors may be bf16 or fp32 and are cast to the requested dtype.
Every expected tensor must be present with the expected shape; the error names the file and key.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from safetensors import safe_open
from tqdm import tqdm

from models.qwen3_vl_moe.config import ModelConfig
from models.qwen3_vl_moe.hf_keys import checkpoint_targets

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that does not hold what its config says it should."""


def safetensors_files(path: Path) -> dict[str, str]:
    """Checkpoint key -> file name within ``path``."""
    index = path / INDEX_FILE
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no {SINGLE_FILE} and no {INDEX_FILE}")
    key_file = {}
    for file in files:
        with safe_open(file, framework="flax") as f:
            key_file |= {k: file.name for k in f.keys()}
    return key_file


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def load_safetensors(path: str | Path, config: ModelConfig, abstract_params, dtype) -> dict:
    """Reads every tensor the config needs, reshapes it to its Flax form and checks its shape."""
    path = Path(path)
    key_file = safetensors_files(path)
    targets = checkpoint_targets(config)
    missing = [k for k in targets if k not in key_file]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    by_file: dict[str, list[str]] = {}
    for key in targets:
        by_file.setdefault(key_file[key], []).append(key)

    params: dict = {}
    with tqdm(total=len(targets), desc="loading weights", unit="tensor", leave=False) as bar:
        for file, keys in sorted(by_file.items()):
            with safe_open(path / file, framework="flax") as f:
                for key in keys:
                    target = targets[key]
                    value = target.transform(np.asarray(f.get_tensor(key)))
                    expected = _get(abstract_params, target.path).shape
                    if tuple(value.shape) != tuple(expected):
                        raise CheckpointError(
                            f"{path / file}: tensor {key!r} has shape {tuple(value.shape)}, "
                            f"expected {tuple(expected)} (after conversion) for this config"
                        )
                    _set(params, target.path, jnp.asarray(value, dtype=dtype))
                    bar.update()
    return params


def save_orbax(path: str | Path, params) -> None:
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(Path(path).absolute(), params, force=True)


def restore_orbax(path: str | Path, abstract_params) -> dict:
    """Restores into the shapes, dtypes and shardings of ``abstract_params``."""
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(Path(path).absolute(), abstract_params)

