"""Task heads shared by every architecture, with Transformers' semantics."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..modeling_utils import check_packing_kwargs, keep_last, module_device
from ..ops.losses import causal_lm_loss, last_token_index, sequence_classification_loss, shifted_labels
from ..outputs import MoeCausalLMOutputWithPast, SequenceClassifierOutputWithPast

# (router logits, 2D padding mask of the new tokens or None) -> router loss
RouterLoss = Callable[[tuple, torch.Tensor | None], torch.Tensor]


def on_device_of(head, x: torch.Tensor) -> torch.Tensor:
    """x on the head's device (a model placed over several devices: the last layer's may differ)."""
    device = module_device(head)
    return x if x.device == device else x.to(device)


def classify(model, out, input_ids, inputs_embeds, labels, return_dict):
    """Pool the score of the rightmost non-padding token; loss by `config.problem_type`
    (inferred from num_labels and the labels' dtype when unset, and then stored, as Transformers does)."""
    cfg = model.config
    logits_BTL = model.score(on_device_of(model.score, out.last_hidden_state))
    B = (input_ids if input_ids is not None else inputs_embeds).shape[0]
    last = last_token_index(input_ids, cfg.pad_token_id, B, logits_BTL.device)
    pooled_BL = logits_BTL[torch.arange(B, device=logits_BTL.device), last]
    loss = sequence_classification_loss(labels, pooled_BL, cfg) if labels is not None else None
    result = SequenceClassifierOutputWithPast(
        loss=loss, logits=pooled_BL, past_key_values=out.past_key_values,
        hidden_states=out.hidden_states, attentions=out.attentions,
    )
    return result if (cfg.return_dict if return_dict is None else return_dict) else result.to_tuple()


LOSS_KWARGS = {"num_items_in_batch", "ignore_index", "shift_labels"}


def loss_positions(labels: torch.Tensor | None, loss_kwargs: dict,
                   inputs: torch.Tensor | None = None) -> torch.Tensor | None:
    """[B, T] bool: the positions whose logits `causal_lm_loss` reads (position t predicts label
    t + 1, or `shift_labels[t]`; not where the target is `ignore_index`); None without labels.
    Labels (and shift_labels) that are no integer tensor of the input's [B, T] are an error that
    names them (`inputs`: the forward's input_ids or inputs_embeds)."""
    if labels is None:
        return None
    for name, value in (("labels", labels), ("shift_labels", loss_kwargs.get("shift_labels"))):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.dtype == torch.bool:
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"{name} must be an integer tensor [batch, seq] of token ids (-100: no loss), got {kind}")
        if isinstance(inputs, torch.Tensor) and tuple(value.shape) != tuple(inputs.shape[:2]):
            raise ValueError(f"{name} must have the input's shape [batch, seq] = {list(inputs.shape[:2])}, got "
                             f"{list(value.shape)}")
    ignore = loss_kwargs.get("ignore_index", -100)
    shifted = loss_kwargs.get("shift_labels")
    if shifted is None:
        shifted = shifted_labels(labels, ignore)
    return shifted != ignore


def causal_lm(
    model,
    out,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    logits_to_keep: int | torch.Tensor,
    output_router_logits: bool,
    loss_kwargs: dict,
    return_dict: bool | None,
    router_loss: RouterLoss,
    router_loss_coef: float,
):
    """LM logits of the kept positions, next-token loss, and `aux_loss = router_loss(...)` when
    router logits are output (added to the loss, times `router_loss_coef`, when labels are given).
    `loss_kwargs`: the forward's keywords for `causal_lm_loss`: num_items_in_batch, ignore_index
    and shift_labels (and flash-attention's packing keywords, which the mask from `position_ids`
    stands for). They come as keywords, not named parameters, as in Transformers: its Trainer
    takes every forward parameter named like a label for a label column, and passes
    num_items_in_batch only to a forward that takes keywords."""
    check_packing_kwargs(type(model).__name__, {k: v for k, v in loss_kwargs.items() if k not in LOSS_KWARGS})
    loss_kwargs = {k: v for k, v in loss_kwargs.items() if k in LOSS_KWARGS}  # packing's: the mask has them
    cfg = model.config
    logits = model.lm_head(on_device_of(model.lm_head, keep_last(out.last_hidden_state, logits_to_keep)))
    loss = causal_lm_loss(logits, labels, **loss_kwargs) if labels is not None else None
    aux_loss = None
    if output_router_logits:
        T = out.last_hidden_state.shape[1]
        pad_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            # the new tokens' columns: they end where the cache's count does (a mask may span a
            # static cache's free slots too), else (no cache, or one the layers did not write under
            # gradient checkpointing) at the mask's end
            cache = out.past_key_values
            written = cache.get_seq_length() if cache is not None else 0
            end = written if written >= T else attention_mask.shape[1]
            pad_mask = attention_mask[:, end - T : end]
        aux_loss = router_loss(out.router_logits, pad_mask)
        if loss is not None:
            loss = loss + router_loss_coef * aux_loss.to(loss.device)
    result = MoeCausalLMOutputWithPast(
        loss=loss, aux_loss=aux_loss, logits=logits, past_key_values=out.past_key_values,
        hidden_states=out.hidden_states, attentions=out.attentions, router_logits=out.router_logits,
    )
    return result if (cfg.return_dict if return_dict is None else return_dict) else result.to_tuple()
