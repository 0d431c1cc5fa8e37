"""``load_model``: a ready model (config, params, tokenizer, processor) from ``tiny``, a Hugging
Face directory or an orbax directory written by :meth:`Model.save_orbax`.

``Model.forward`` is the reference path: the whole prompt at once, every position's logits, no
cache kept. It runs the same decoder as the serving stages, over a throwaway paged cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from models.qwen3_vl_moe import stages
from models.qwen3_vl_moe.config import ModelConfig
from models.qwen3_vl_moe.generation_config import sampling_defaults
from models.qwen3_vl_moe.kv_cache import KVCache
from models.qwen3_vl_moe.modeling import Qwen3VLMoe
from models.qwen3_vl_moe.moe_dispatch import choose as choose_moe_dispatch
from models.qwen3_vl_moe.multimodal import place_visual
from models.qwen3_vl_moe.processor import Processor
from models.qwen3_vl_moe.rope_index import get_rope_index
from models.qwen3_vl_moe.tiny import TINY_SEED, tiny_config, tiny_processor
from models.qwen3_vl_moe.tokenizer import Tokenizer
from models.qwen3_vl_moe.tiny_tokenizer import build_tiny_tokenizer
from models.qwen3_vl_moe.vision_inputs import vision_inputs
from models.qwen3_vl_moe.weights import head_of_its_own, load_safetensors, restore_orbax, save_orbax

log = logging.getLogger(__name__)
ORBAX_PARAMS = "orbax_params"
DTYPES = ("float32", "bfloat16")
"""The parameter and compute dtypes the model runs in."""
AUTO_DTYPE = "auto"
"""The checkpoint's own dtype (config.json's ``dtype`` or ``torch_dtype``), as vLLM's ``--dtype auto``:
bfloat16 for a bfloat16 or float16 checkpoint (float16 is not run here), else float32."""
REFERENCE_PAGE_SIZE = 16


@dataclasses.dataclass
class Model:
    config: ModelConfig
    params: dict
    tokenizer: Tokenizer
    processor: Processor
    dtype: jnp.dtype
    moe_dispatch: str = "ragged_dot"
    """The MoE strategy the programs use (:func:`moe_dispatch.choose` picked it at load time)."""
    sampling_defaults: Mapping[str, float | int] = dataclasses.field(default_factory=dict)
    """The checkpoint's recommended sampling (:mod:`generation_config`), for what a request leaves out."""

    @functools.cached_property
    def module(self) -> Qwen3VLMoe:
        return Qwen3VLMoe(self.config, self.dtype, self.moe_dispatch)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A sha256 of what two processes serving one model must share: the config, the
        tokenizer's vocabulary and rules, and the processor's settings (not the weights, not the
        dtype, not the chat template). The same checkpoint gives the same fingerprint whether it
        was read from safetensors or orbax, in any process."""
        described = json.dumps({"config": dataclasses.asdict(self.config),
                                "processor": dataclasses.asdict(self.processor),
                                "extra_eos_token_ids": list(self.tokenizer.extra_eos_token_ids)},
                               sort_keys=True, default=str)
        digest = hashlib.sha256(described.encode())
        digest.update(self.tokenizer.backend.to_str().encode())
        return digest.hexdigest()

    def encode(self, pixel_values, grid_thw):
        """Pixel patches of images or videos -> (embeddings [n, H], deepstack [levels, n, H])."""
        tables = vision_inputs(np.asarray(grid_thw), self.config.vision)
        patches = jnp.asarray(pixel_values, dtype=self.dtype)
        if patches.shape != (tables.num_patches, self.config.vision.patch_dim):
            raise ValueError(
                f"pixel values of shape {tuple(patches.shape)} do not match grids {np.asarray(grid_thw).tolist()}"
            )
        return _jit_encode(self.module, self.params, patches, *dataclasses.astuple(tables))

    def forward(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None):
        """input_ids [S] with placeholders expanded -> logits [S, vocab] (float32)."""
        ids = np.asarray(input_ids, dtype=np.int32).reshape(-1)
        if ids.size == 0:
            raise ValueError("empty input_ids")
        image = self.encode(pixel_values, image_grid_thw) if pixel_values is not None else None
        video = self.encode(pixel_values_videos, video_grid_thw) if pixel_values_videos is not None else None
        placed = place_visual(ids, self.config, image, video)
        positions, _ = get_rope_index(ids, self.config, image_grid_thw, video_grid_thw)
        num_pages = -(-ids.size // REFERENCE_PAGE_SIZE)
        cache = KVCache.create(self.config.text, num_pages, REFERENCE_PAGE_SIZE, self.dtype)
        return _jit_forward(
            self.module,
            self.params,
            jnp.asarray(ids)[None],
            jnp.asarray(positions)[None],
            cache,
            None if placed is None else placed.embeds[None],
            None if placed is None else placed.mask[None],
            None if placed is None else placed.deepstack[:, None],
        )[0]

    def save_orbax(self, path: str | Path) -> None:
        """A directory ``load_model`` restores: orbax params plus config, tokenizer and processor."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_orbax(path / ORBAX_PARAMS, self.params)
        (path / "config.json").write_text(json.dumps(self.config.to_hf() | {"dtype": self.dtype.name}, indent=2))
        self.tokenizer.save(path)
        self.processor.save(path)


@functools.partial(jax.jit, static_argnums=0)
def _jit_encode(module, params, patches, interp_idx, interp_weight, rope_pos, segment_ids):
    return stages.encode(module, params, patches, interp_idx, interp_weight, rope_pos, segment_ids)


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(module, params, input_ids, positions, cache, mm_embeds, mm_mask, deepstack):
    s = input_ids.shape[1]
    page_tables = jnp.arange(cache.num_pages, dtype=jnp.int32)[None]
    starts, lengths = jnp.zeros((1,), jnp.int32), jnp.full((1,), s, jnp.int32)
    embeds = stages.input_embeddings(module, params, input_ids, mm_embeds, mm_mask)
    hidden, _ = stages.run_decoder(module, params, embeds, positions, cache, page_tables, starts, lengths, deepstack)
    return stages.logits(module, params, hidden)


def init_params(config: ModelConfig, dtype=jnp.float32, seed: int = TINY_SEED) -> dict:
    """Random parameters from a fixed seed (the tiny preset and tests): N(0, 0.02) weights, unit
    norms, zero biases. Drawn with NumPy from the abstract tree, so nothing is traced or compiled."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "weight"):
            return jnp.ones(leaf.shape, dtype)
        if name == "bias":
            return jnp.zeros(leaf.shape, dtype)
        return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * 0.02, dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(config, dtype))


def abstract_params(config: ModelConfig, dtype=jnp.float32):
    """Shapes and dtypes of the parameter tree, without allocating it."""
    module = Qwen3VLMoe(config, dtype)
    return jax.eval_shape(lambda key: _abstract_or_init(module, key), jax.random.PRNGKey(0))


def _abstract_or_init(module: Qwen3VLMoe, key) -> dict:
    c = module.config
    merge = c.vision.merge_unit
    cache = KVCache.create(c.text, 1, 4, module.dtype)
    one = jnp.ones((1,), jnp.int32)
    tables = (jnp.zeros((merge, 4), jnp.int32), jnp.zeros((merge, 4)), jnp.zeros((merge, 2), jnp.int32),
              jnp.zeros((merge,), jnp.int32))
    variables = module.init(
        key, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 3, 1), jnp.int32), cache, jnp.zeros((1, 1), jnp.int32),
        0 * one, one, jnp.zeros((merge, c.vision.patch_dim)), tables,
    )
    return variables["params"]


ParamShardings = Callable[[ModelConfig, dict], dict]
"""(config, abstract params) -> a matching tree of ``jax.sharding.Sharding``; the model does not
know meshes, so the caller says where each parameter goes (``mmserve.distributed.MeshLayout.params``)."""


def _into_shards(value, sharding) -> jax.Array:
    """A small host-made array laid out over ``sharding`` (also across processes)."""
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def load_model(
    path: str | Path = "tiny", dtype: str | jnp.dtype = AUTO_DTYPE, shardings: ParamShardings | None = None,
    weights: bool = True, moe_dispatch: str = "auto",
) -> Model:
    """With ``shardings`` a checkpoint's parameters are read straight into their shards. Without
    ``weights`` only config, tokenizer and processor are read (``params`` is None): what a router
    needs to prepare requests. ``moe_dispatch``: a strategy of :mod:`models.qwen3_vl_moe.moe_dispatch`,
    or ``auto`` for the fast one on this backend and placement."""
    model = _load(path, _dtype(_checkpoint_dtype(path) if str(dtype) == AUTO_DTYPE else dtype), shardings, weights)
    split = model.params is not None and any(
        not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(model.params))
    return dataclasses.replace(model, moe_dispatch=choose_moe_dispatch(moe_dispatch, jax.default_backend(), split))


def _checkpoint_dtype(path: str | Path) -> str:
    """What ``auto`` resolves to for the checkpoint at ``path`` (``tiny``: float32)."""
    config = Path(path) / "config.json"
    if str(path) == "tiny" or not config.exists():
        return "float32"  # tiny; a directory without a config is refused by the loading itself
    try:
        d = json.loads(config.read_text())
    except json.JSONDecodeError:
        return "float32"  # the loading names the file and the error
    text = d.get("text_config") if isinstance(d.get("text_config"), dict) else {}
    saved = d.get("dtype") or d.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    if saved in ("bfloat16", "float16"):
        if saved == "float16":
            log.warning("%s: a float16 checkpoint runs in bfloat16 (float16 is not one of %s)", path, DTYPES)
        return "bfloat16"
    return "float32"


def _dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or {AUTO_DTYPE}, got {dtype!r}")
    return resolved


def _load(path, dtype, shardings, weights) -> Model:
    if str(path) == "tiny":
        config = tiny_config()
        if not weights:
            return Model(config, None, build_tiny_tokenizer(), tiny_processor(), dtype)
        params = init_params(config, dtype)
        if shardings is not None:
            params = jax.tree.map(_into_shards, params, shardings(config, params))
        return Model(config, params, build_tiny_tokenizer(), tiny_processor(), dtype)
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json (expected 'tiny', a Hugging Face or an orbax directory)")
    config = ModelConfig.from_file(path / "config.json")
    if config.tie_word_embeddings and not (path / ORBAX_PARAMS).exists() and head_of_its_own(path):
        log.warning("%s: config.json ties the output layer to the embedding, but the checkpoint holds an lm_head "
                    "of its own: it is used (as transformers does)", path)
        config = dataclasses.replace(config, tie_word_embeddings=False)
    # the tokenizer and processor first: one missing or at odds with the config is found before
    # minutes of reading weights
    tokenizer, processor = Tokenizer.from_dir(path), Processor.from_dir(path)
    _check_processor(processor, config, path)
    defaults = sampling_defaults(path)
    if not weights:
        return Model(config, None, tokenizer, processor, dtype, sampling_defaults=defaults)
    abstract = abstract_params(config, dtype)
    placement = None if shardings is None else shardings(config, abstract)
    if (path / ORBAX_PARAMS).exists():
        params = restore_orbax(path / ORBAX_PARAMS, abstract, placement)
    else:
        params = load_safetensors(path, config, abstract, dtype, placement)
    return Model(config, params, tokenizer, processor, dtype, sampling_defaults=defaults)


def _check_processor(processor: Processor, config: ModelConfig, path: Path) -> None:
    """The processor cuts pictures into the patches the vision tower takes, or every picture fails."""
    vision = config.vision
    for name, theirs, ours in (("patch_size", processor.patch_size, vision.patch_size),
                               ("temporal_patch_size", processor.temporal_patch_size, vision.temporal_patch_size),
                               ("merge_size", processor.merge_size, vision.spatial_merge_size)):
        if theirs != ours:
            raise ValueError(f"{path}: the preprocessor config's {name} is {theirs}, the vision config's {ours}")
