from .jetmoe import JetMoeForCausalLM, JetMoeForSequenceClassification, JetMoeModel, JetMoePreTrainedModel
from .phimoe import PhimoeForCausalLM, PhimoeForSequenceClassification, PhimoeModel, PhimoePreTrainedModel

__all__ = [
    "JetMoeForCausalLM",
    "JetMoeForSequenceClassification",
    "JetMoeModel",
    "JetMoePreTrainedModel",
    "PhimoeForCausalLM",
    "PhimoeForSequenceClassification",
    "PhimoeModel",
    "PhimoePreTrainedModel",
]
