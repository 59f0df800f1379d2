"""moetorch: fast, faithful PhiMoE and JetMoE mixture-of-experts models for PyTorch."""

from .auto import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
from .cache import Cache, DynamicCache, StaticCache
from .checkpoint import CheckpointError
from .configuration import ConfigError, JetMoeConfig, PhimoeConfig
from .generation import (
    GenerateBeamDecoderOnlyOutput,
    GenerateDecoderOnlyOutput,
    GenerationConfig,
    GenerationMixin,
    LogitsProcessor,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TextIteratorStreamer,
    TextStreamer,
    TopKLogitsWarper,
    TopPLogitsWarper,
    UnbatchedClassifierFreeGuidanceLogitsProcessor,
)
from .generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StopStringCriteria
from .models.jetmoe import (
    JetMoeForCausalLM,
    JetMoeForSequenceClassification,
    JetMoeModel,
    JetMoePreTrainedModel,
)
from .models.phimoe import PhimoeForCausalLM, PhimoeForSequenceClassification, PhimoeModel, PhimoePreTrainedModel
from .outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast, SequenceClassifierOutputWithPast
from .pipeline import TextGenerationPipeline, pipeline
from .tokenizer import AutoTokenizer, BatchEncoding, Tokenizer

__version__ = "0.1.0"

__all__ = [
    "AutoConfig",
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForSequenceClassification",
    "AutoTokenizer",
    "BatchEncoding",
    "TextGenerationPipeline",
    "Tokenizer",
    "pipeline",
    "Cache",
    "CheckpointError",
    "ConfigError",
    "DynamicCache",
    "JetMoeConfig",
    "JetMoeForCausalLM",
    "JetMoeForSequenceClassification",
    "JetMoeModel",
    "JetMoePreTrainedModel",
    "MoeCausalLMOutputWithPast",
    "MoeModelOutputWithPast",
    "PhimoeConfig",
    "PhimoeForCausalLM",
    "PhimoeForSequenceClassification",
    "PhimoeModel",
    "PhimoePreTrainedModel",
    "SequenceClassifierOutputWithPast",
    "StaticCache",
    "EosTokenCriteria",
    "GenerateBeamDecoderOnlyOutput",
    "GenerateDecoderOnlyOutput",
    "GenerationConfig",
    "GenerationMixin",
    "LogitsProcessor",
    "LogitsProcessorList",
    "MaxLengthCriteria",
    "MinLengthLogitsProcessor",
    "MinNewTokensLengthLogitsProcessor",
    "MinPLogitsWarper",
    "NoBadWordsLogitsProcessor",
    "NoRepeatNGramLogitsProcessor",
    "PrefixConstrainedLogitsProcessor",
    "RepetitionPenaltyLogitsProcessor",
    "StopStringCriteria",
    "StoppingCriteria",
    "StoppingCriteriaList",
    "TemperatureLogitsWarper",
    "TextIteratorStreamer",
    "TextStreamer",
    "TopKLogitsWarper",
    "TopPLogitsWarper",
    "UnbatchedClassifierFreeGuidanceLogitsProcessor",
]
