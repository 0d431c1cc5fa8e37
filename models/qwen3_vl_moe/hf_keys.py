"""Where each Hugging Face checkpoint tensor goes in the Flax parameter tree, and how it is reshaped.

A checkpoint tensor ``W`` of an ``nn.Linear`` becomes a Flax ``kernel`` ``W.T``; the Conv3d patch
embedding becomes a Dense kernel over flattened (C, T, P, P) patches; LayerNorm ``weight`` becomes
``scale``. Expert tensors come in two layouts told apart by shape (see :func:`expert_transform`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from models.qwen3_vl_moe.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Target:
    path: tuple[str, ...]
    transform: Callable[[np.ndarray], np.ndarray]


def _same(w):
    return w


def _linear(w):
    return w.T


def _conv_as_dense(w):
    return w.reshape(w.shape[0], -1).T


def expert_transform(name: str, hidden: int, inter: int,
                     transposed: bool | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """Published checkpoints store gate_up_proj (E, H, 2I) and down_proj (E, I, H), used as
    ``x @ W[e]``; transformers 5 ``save_pretrained`` writes (E, 2I, H) and (E, H, I). We keep the
    published layout and transpose the other. When H == 2I gate_up_proj's shapes cannot tell:
    ``transposed`` says which the checkpoint uses (read from its down_proj, whose shapes always
    differ then: :func:`experts_transposed`), the published layout when not known."""
    published = (hidden, 2 * inter) if name == "gate_up_proj" else (inter, hidden)

    def transform(w):
        if published == published[::-1] and transposed is not None:
            return np.swapaxes(w, 1, 2) if transposed else w
        if tuple(w.shape[1:]) == published:
            return w
        if tuple(w.shape[1:]) == published[::-1]:
            return np.swapaxes(w, 1, 2)
        return w  # wrong shape: reported by the loader's shape check

    return transform


def _linear_targets(hf: str, path: tuple[str, ...], bias: bool) -> dict[str, Target]:
    out = {f"{hf}.weight": Target(path + ("kernel",), _linear)}
    if bias:
        out[f"{hf}.bias"] = Target(path + ("bias",), _same)
    return out


def _layer_norm_targets(hf: str, path: tuple[str, ...]) -> dict[str, Target]:
    return {f"{hf}.weight": Target(path + ("scale",), _same), f"{hf}.bias": Target(path + ("bias",), _same)}


def _merger_targets(hf: str, path: tuple[str, ...]) -> dict[str, Target]:
    out = _layer_norm_targets(f"{hf}.norm", path + ("norm",))
    out |= _linear_targets(f"{hf}.linear_fc1", path + ("linear_fc1",), True)
    out |= _linear_targets(f"{hf}.linear_fc2", path + ("linear_fc2",), True)
    return out


def vision_targets(config: ModelConfig) -> dict[str, Target]:
    v, root = "model.visual", ("visual",)
    out = {
        f"{v}.patch_embed.proj.weight": Target(root + ("patch_embed", "kernel"), _conv_as_dense),
        f"{v}.patch_embed.proj.bias": Target(root + ("patch_embed", "bias"), _same),
        f"{v}.pos_embed.weight": Target(root + ("pos_embed",), _same),
    }
    for i in range(config.vision.depth):
        hf, path = f"{v}.blocks.{i}", root + (f"blocks_{i}",)
        out |= _layer_norm_targets(f"{hf}.norm1", path + ("norm1",))
        out |= _layer_norm_targets(f"{hf}.norm2", path + ("norm2",))
        out |= _linear_targets(f"{hf}.attn.qkv", path + ("attn", "qkv"), True)
        out |= _linear_targets(f"{hf}.attn.proj", path + ("attn", "proj"), True)
        out |= _linear_targets(f"{hf}.mlp.linear_fc1", path + ("mlp", "linear_fc1"), True)
        out |= _linear_targets(f"{hf}.mlp.linear_fc2", path + ("mlp", "linear_fc2"), True)
    out |= _merger_targets(f"{v}.merger", root + ("merger",))
    for j in range(len(config.vision.deepstack_visual_indexes)):
        out |= _merger_targets(f"{v}.deepstack_merger_list.{j}", root + (f"deepstack_merger_list_{j}",))
    return out


def experts_transposed(down_proj_shape: tuple[int, ...], hidden: int, inter: int) -> bool | None:
    """Whether a checkpoint's experts are in transformers 5's layout, from a down_proj's shape;
    None when it tells nothing (H == I, where gate_up_proj's shapes tell)."""
    if hidden == inter:
        return None
    return tuple(down_proj_shape[1:]) == (hidden, inter)


def text_targets(config: ModelConfig, transposed: bool | None = None) -> dict[str, Target]:
    t, root, c = "model.language_model", ("language_model",), config.text
    out = {
        f"{t}.embed_tokens.weight": Target(root + ("embed_tokens", "embedding"), _same),
        f"{t}.norm.weight": Target(root + ("norm", "weight"), _same),
    }
    for i in range(c.num_hidden_layers):
        hf, path = f"{t}.layers.{i}", root + (f"layers_{i}",)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out |= _linear_targets(f"{hf}.self_attn.{proj}", path + ("self_attn", proj), c.attention_bias)
        for norm in ("q_norm", "k_norm"):
            out[f"{hf}.self_attn.{norm}.weight"] = Target(path + ("self_attn", norm, "weight"), _same)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{hf}.{norm}.weight"] = Target(path + (norm, "weight"), _same)
        mlp = path + ("mlp",)
        if c.is_moe_layer(i):
            out[f"{hf}.mlp.gate.weight"] = Target(mlp + ("gate",), _linear)
            for name in ("gate_up_proj", "down_proj"):
                transform = expert_transform(name, c.hidden_size, c.moe_intermediate_size, transposed)
                out[f"{hf}.mlp.experts.{name}"] = Target(mlp + (name,), transform)
        else:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out |= _linear_targets(f"{hf}.mlp.{proj}", mlp + (proj,), False)
    return out


def checkpoint_targets(config: ModelConfig, experts_transposed: bool | None = None) -> dict[str, Target]:
    """Every tensor a checkpoint of this config must hold, keyed by its checkpoint name
    (``experts_transposed``: the experts' layout where their shapes cannot tell, see
    :func:`expert_transform`)."""
    out = vision_targets(config) | text_targets(config, experts_transposed)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = Target(("lm_head", "kernel"), _linear)
    return out
