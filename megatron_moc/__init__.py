"""megatron_moc: Mixture-of-Collaboration language models on Megatron-core + DeepSpeed."""

from megatron_moc.config import MoCConfig
from megatron_moc.model.gpt import build_model
from megatron_moc.model.specs import get_moc_layer_spec

__all__ = ["MoCConfig", "build_model", "get_moc_layer_spec"]
