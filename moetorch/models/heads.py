"""Task heads shared by every architecture, with Transformers' semantics."""

from __future__ import annotations

import torch

from ..ops.losses import classification_loss, infer_problem_type, last_token_index
from ..outputs import SequenceClassifierOutputWithPast


def classify(model, out, input_ids, inputs_embeds, labels, return_dict):
    """Pool the score of the rightmost non-padding token; loss by `config.problem_type`
    (inferred from num_labels and the labels' dtype when unset, and then stored, as Transformers does)."""
    cfg = model.config
    logits_BTL = model.score(out.last_hidden_state)
    B = (input_ids if input_ids is not None else inputs_embeds).shape[0]
    last = last_token_index(input_ids, cfg.pad_token_id, B, logits_BTL.device)
    pooled_BL = logits_BTL[torch.arange(B, device=logits_BTL.device), last]
    loss = None
    if labels is not None:
        if cfg.problem_type is None:
            cfg.problem_type = infer_problem_type(cfg.num_labels, labels)
        loss = classification_loss(pooled_BL, labels, cfg.num_labels, cfg.problem_type)
    result = SequenceClassifierOutputWithPast(
        loss=loss, logits=pooled_BL, past_key_values=out.past_key_values,
        hidden_states=out.hidden_states, attentions=out.attentions,
    )
    return result if (cfg.return_dict if return_dict is None else return_dict) else result.to_tuple()
