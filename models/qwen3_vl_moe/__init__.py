"""Qwen3-VL-MoE in Flax: config, vision tower, MoE language model, weights, processor, tokenizer."""

from models.qwen3_vl_moe.model import Model, load_model

__all__ = ["Model", "load_model"]
