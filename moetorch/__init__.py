"""moetorch: fast, faithful PhiMoE and JetMoE mixture-of-experts models for PyTorch."""

from .cache import Cache, DynamicCache, StaticCache
from .checkpoint import CheckpointError
from .configuration import ConfigError, PhimoeConfig
from .models.phimoe import PhimoeForCausalLM, PhimoeForSequenceClassification, PhimoeModel, PhimoePreTrainedModel
from .outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast, SequenceClassifierOutputWithPast

__version__ = "0.1.0"

__all__ = [
    "Cache",
    "CheckpointError",
    "ConfigError",
    "DynamicCache",
    "MoeCausalLMOutputWithPast",
    "MoeModelOutputWithPast",
    "PhimoeConfig",
    "PhimoeForCausalLM",
    "PhimoeForSequenceClassification",
    "PhimoeModel",
    "PhimoePreTrainedModel",
    "SequenceClassifierOutputWithPast",
    "StaticCache",
]
