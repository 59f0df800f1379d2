from .phimoe import PhimoeForCausalLM, PhimoeForSequenceClassification, PhimoeModel, PhimoePreTrainedModel

__all__ = ["PhimoeForCausalLM", "PhimoeForSequenceClassification", "PhimoeModel", "PhimoePreTrainedModel"]
