"""Qwen3-VL-MoE configuration, read from a Hugging Face ``config.json``.

Both config generations are accepted: transformers 4.57 writes ``rope_scaling`` (with
``mrope_section``) and ``rope_theta`` beside it; transformers 5.x writes ``rope_parameters``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


VISION_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")


def _rope(d: dict[str, Any]) -> dict[str, Any]:
    """A (sub)config's rotary settings as transformers reads them: ``rope_scaling`` (4.57's name)
    before ``rope_parameters``; a ``rope_theta`` beside them is the fallback for theirs."""
    return d.get("rope_scaling") or d.get("rope_parameters") or {}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 2048
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.hidden_act not in VISION_ACTIVATIONS:
            raise ValueError(f"vision hidden_act {self.hidden_act!r} is not implemented (only {VISION_ACTIVATIONS})")
        if min(self.depth, self.hidden_size, self.num_heads, self.patch_size, self.spatial_merge_size) < 1:
            raise ValueError("vision depth, hidden_size, num_heads, patch_size and spatial_merge_size must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if any(not 0 <= i < self.depth for i in self.deepstack_visual_indexes):
            raise ValueError(f"deepstack_visual_indexes {self.deepstack_visual_indexes} must be blocks of the "
                             f"vision tower's {self.depth}")
        if not self.deepstack_visual_indexes or len(set(self.deepstack_visual_indexes)) < len(
                self.deepstack_visual_indexes):  # transformers runs both, as no Qwen3-VL checkpoint is
            raise ValueError(f"deepstack_visual_indexes {list(self.deepstack_visual_indexes)} must name at least one "
                             "vision block, each once (a vision tower without deepstack, or with a block named "
                             "twice, is not supported)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> VisionConfig:
        rope = _rope(d)
        return cls(
            depth=d["depth"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_heads=d["num_heads"],
            in_channels=d.get("in_channels", 3),
            patch_size=d.get("patch_size", 16),
            temporal_patch_size=d.get("temporal_patch_size", 2),
            spatial_merge_size=d.get("spatial_merge_size", 2),
            out_hidden_size=d["out_hidden_size"],
            num_position_embeddings=d.get("num_position_embeddings", 2304),
            deepstack_visual_indexes=tuple(d.get("deepstack_visual_indexes", (8, 16, 24))),
            hidden_act=d.get("hidden_act", "gelu_pytorch_tanh"),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        )

    def to_hf(self) -> dict[str, Any]:
        return {
            "model_type": "qwen3_vl_moe",
            "depth": self.depth,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_heads": self.num_heads,
            "in_channels": self.in_channels,
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "spatial_merge_size": self.spatial_merge_size,
            "out_hidden_size": self.out_hidden_size,
            "num_position_embeddings": self.num_position_embeddings,
            "deepstack_visual_indexes": list(self.deepstack_visual_indexes),
            "hidden_act": self.hidden_act,
            "rope_theta": self.rope_theta,
        }


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    max_position_embeddings: int = 262144
    attention_bias: bool = False
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        if self.hidden_act != "silu":
            raise ValueError(f"text hidden_act {self.hidden_act!r} is not implemented (only 'silu')")
        if min(self.vocab_size, self.hidden_size, self.num_hidden_layers, self.num_attention_heads,
               self.num_key_value_heads, self.head_dim, self.decoder_sparse_step) < 1:
            raise ValueError("vocab_size, hidden_size, num_hidden_layers, attention heads, head_dim and "
                             "decoder_sparse_step must be >= 1")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:  # rotary embedding turns pairs of dimensions (transformers fails on it too)
            raise ValueError(f"head_dim {self.head_dim} must be even: the rotary embedding rotates pairs of dimensions")
        if self.num_experts and not (1 <= self.num_experts_per_tok <= self.num_experts
                                     and self.moe_intermediate_size >= 1):
            raise ValueError(f"a MoE needs 1 <= num_experts_per_tok <= num_experts ({self.num_experts}) and "
                             f"moe_intermediate_size >= 1, got {self.num_experts_per_tok} and "
                             f"{self.moe_intermediate_size}")

    def is_moe_layer(self, layer: int) -> bool:
        """The rule transformers uses to choose a sparse or a dense MLP for a decoder layer."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> TextConfig:
        rope = _rope(d)
        theta = rope.get("rope_theta", d.get("rope_theta", 500_000.0))  # transformers' default_theta
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"unsupported rope_type {rope_type!r} (only default MRoPE is implemented)")
        if rope and not rope.get("mrope_interleaved", True):
            raise ValueError("only interleaved MRoPE (mrope_interleaved=true) is implemented")
        heads = d["num_attention_heads"]
        experts = d.get("num_experts", d.get("num_local_experts", 0))
        for name in ("num_experts_per_tok", "moe_intermediate_size") if experts else ():
            if name not in d:  # a guess would be a different model (transformers' own default differs too)
                raise ValueError(f"the text config has {experts} experts but no {name}")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
            max_position_embeddings=d.get("max_position_embeddings", 262144),
            attention_bias=d.get("attention_bias", False),
            num_experts=experts,
            num_experts_per_tok=d["num_experts_per_tok"] if experts else 0,
            moe_intermediate_size=d["moe_intermediate_size"] if experts else 0,
            decoder_sparse_step=d.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(d.get("mlp_only_layers") or ()),
            hidden_act=d.get("hidden_act", "silu"),
        )

    def to_hf(self) -> dict[str, Any]:
        return {
            "model_type": "qwen3_vl_moe_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "mrope_section": list(self.mrope_section),
                "mrope_interleaved": True,
            },
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "decoder_sparse_step": self.decoder_sparse_step,
            "mlp_only_layers": list(self.mlp_only_layers),
            "hidden_act": self.hidden_act,
        }


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = (151645,)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        if "text_config" not in d or "vision_config" not in d:
            raise ValueError("config.json lacks text_config/vision_config: not a Qwen3-VL-MoE checkpoint")
        text_d = d["text_config"]
        tie = d.get("tie_word_embeddings", False)  # transformers reads the top level's only (the text config's
        # own defaults to true)
        eos = text_d.get("eos_token_id", d.get("eos_token_id", 151645))
        return cls(
            text=TextConfig.from_hf(text_d),
            vision=VisionConfig.from_hf(d["vision_config"]),
            image_token_id=d.get("image_token_id", 151655),
            video_token_id=d.get("video_token_id", 151656),
            vision_start_token_id=d.get("vision_start_token_id", 151652),
            vision_end_token_id=d.get("vision_end_token_id", 151653),
            tie_word_embeddings=bool(tie),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_hf(json.loads(Path(path).read_text()))

    def to_hf(self) -> dict[str, Any]:
        text = self.text.to_hf() | {"eos_token_id": list(self.eos_token_ids)}
        return {
            "architectures": ["Qwen3VLMoeForConditionalGeneration"],
            "model_type": "qwen3_vl_moe",
            "text_config": text,
            "vision_config": self.vision.to_hf(),
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
