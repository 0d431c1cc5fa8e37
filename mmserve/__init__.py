"""mmserve: disaggregated serving of Qwen3-VL-MoE on JAX/XLA."""

from mmserve.llm import LLM
from mmserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
