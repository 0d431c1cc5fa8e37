"""Loading weights: Hugging Face safetensors directories and orbax checkpoints.

A safetensors directory is either one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``; tensors may be bf16 or fp32 and are cast to the requested dtype.
Every expected tensor must be present with the expected shape; the error names the file and key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from models.qwen3_vl_moe.config import ModelConfig
from models.qwen3_vl_moe.hf_keys import checkpoint_targets, experts_transposed
from models.qwen3_vl_moe.safetensors_mmap import SafetensorsFile

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


_LAYER = re.compile(r"\.(layers|blocks)\.\d+\.")


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
    key_file: dict[str, str] = {}
    for file in files:
        for key in SafetensorsFile(file).keys():
            if key in key_file:  # which one is meant? (a stray file silently replaced tensors)
                raise CheckpointError(f"{path}: tensor {key!r} is in both {key_file[key]} and {file.name}, and "
                                      f"there is no {INDEX_FILE} to say which")
            key_file[key] = file.name
    return key_file


HEAD_KEY, EMBEDDING_KEY = "lm_head.weight", "model.language_model.embed_tokens.weight"


def head_of_its_own(path: str | Path) -> bool:
    """Whether a safetensors checkpoint holds an ``lm_head.weight`` other than its embedding: one
    marked tied is then read untied, as transformers reads it (with a warning)."""
    path = Path(path)
    key_file = safetensors_files(path)
    if HEAD_KEY not in key_file or EMBEDDING_KEY not in key_file:
        return False
    head = SafetensorsFile(path / key_file[HEAD_KEY]).view(HEAD_KEY)
    embedding = SafetensorsFile(path / key_file[EMBEDDING_KEY]).view(EMBEDDING_KEY)
    return head.shape != embedding.shape or not np.array_equal(head, embedding)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def load_safetensors(path: str | Path, config: ModelConfig, abstract_params, dtype, shardings=None) -> dict:
    """Reads every tensor the config needs, reshapes it to its Flax form and checks its shape.

    Each array is assembled from per-device slices read straight from the mapped files, so with
    ``shardings`` (a tree of ``jax.sharding.Sharding`` matching the params) no device, and no
    process, ever holds more than its own shards. Without it every array lands on the first device.
    """
    path = Path(path)
    key_file = safetensors_files(path)
    down = next((k for k in key_file if k.endswith("mlp.experts.down_proj")), None)
    transposed = None if down is None else experts_transposed(
        SafetensorsFile(path / key_file[down]).view(down).shape, config.text.hidden_size,
        config.text.moe_intermediate_size)
    targets = checkpoint_targets(config, transposed)
    missing = [k for k in targets if k not in key_file]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    unused_layers = sorted(k for k in key_file if k not in targets and _LAYER.search(k))
    if unused_layers:  # a config of fewer layers than the checkpoint's: another (truncated) model
        raise CheckpointError(f"{path}: tensor {unused_layers[0]!r} is one the config does not use (a layer or block "
                              f"it does not have, or a bias it does not take; {len(unused_layers)} such tensors): "
                              "config.json and the weights disagree")
    by_file: dict[str, list[str]] = {}
    for key in targets:
        by_file.setdefault(key_file[key], []).append(key)

    params: dict = {}
    with tqdm(total=len(targets), desc="loading weights", unit="tensor", leave=False) as bar:
        for file, keys in sorted(by_file.items()):
            tensors = SafetensorsFile(path / file)
            for key in keys:
                target = targets[key]
                raw = tensors.view(key)
                if not jnp.issubdtype(raw.dtype, jnp.floating):  # quantized, or not a weight: cast, it is wrong
                    raise CheckpointError(f"{path / file}: tensor {key!r} is {raw.dtype}; weights must be floating "
                                          "point (quantized checkpoints are not supported)")
                view = target.transform(raw)
                expected = _get(abstract_params, target.path).shape
                if tuple(view.shape) != tuple(expected):
                    raise CheckpointError(
                        f"{path / file}: tensor {key!r} has shape {tuple(view.shape)}, "
                        f"expected {tuple(expected)} (after conversion) for this config"
                    )
                sharding = _default_sharding() if shardings is None else _get(shardings, target.path)
                _set(params, target.path, _from_slices(view, sharding, dtype))
                bar.update()
    return params


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _from_slices(view: np.ndarray, sharding: jax.sharding.Sharding, dtype) -> jax.Array:
    """A global array whose local shards are read from ``view`` one slice at a time."""
    return jax.make_array_from_callback(view.shape, sharding, lambda index: np.asarray(view[index], dtype=dtype))


def save_orbax(path: str | Path, params) -> None:
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(Path(path).absolute(), params, force=True)


def restore_orbax(path: str | Path, abstract_params, shardings=None) -> dict:
    """Restores into the shapes and dtypes of ``abstract_params``, each array straight into its
    shards (``shardings``, as for :func:`load_safetensors`).

    The tree is restored one block (a vision block, a decoder layer, ...) at a time, which is what
    the progress bar counts.
    """
    if shardings is None:
        shardings = jax.tree.map(lambda _: _default_sharding(), abstract_params)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings
    )
    blocks = [(top, name) for top, sub in target.items() for name in sub]
    params: dict = {}
    with ocp.PyTreeCheckpointer() as ckpt, tqdm(blocks, desc="restoring weights", unit="block", leave=False) as bar:
        for top, name in bar:
            item = {top: {name: target[top][name]}}
            restored = ckpt.restore(
                Path(path).absolute(),
                args=ocp.args.PyTreeRestore(
                    item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
                ),
            )
            params.setdefault(top, {})[name] = restored[top][name]
    absent = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(params)
              if not isinstance(leaf, jax.Array)]
    if absent:  # partial_restore leaves what the checkpoint lacks as placeholders, which fail every request
        raise CheckpointError(f"{path}: the config needs {len(absent)} array(s) this checkpoint does not hold, "
                              f"e.g. {absent[0]}")
    return params
