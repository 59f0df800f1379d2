"""Losses with Transformers' semantics: causal-LM cross-entropy and sequence classification."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shifted_labels(labels_BT: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The target of each position [B, T]: the next position's label (`ignore_index` after the last)."""
    return F.pad(labels_BT, (0, 1), value=ignore_index)[..., 1:]


def causal_lm_loss(
    logits_BTV: torch.Tensor,
    labels_BT: torch.Tensor,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy in float32; labels are shifted here (position t predicts t+1).

    With `num_items_in_batch` the sum is divided by it instead (gradient accumulation). On a GPU the
    loss kernels (`ops.triton_loss`) compute it from the logits in their own dtype, with no float32
    copy of them; elsewhere `F.cross_entropy` over a float32 copy, as Transformers does.
    """
    if shift_labels is None:
        shift_labels = shifted_labels(labels_BT, ignore_index)
    logits_NV = logits_BTV.reshape(-1, logits_BTV.shape[-1])
    target = shift_labels.reshape(-1).to(logits_NV.device)
    if _kernel_serves(logits_NV, target):
        from . import triton_loss

        total = triton_loss.row_losses(logits_NV, target, ignore_index).sum()
        if num_items_in_batch is None:
            return total / (target != ignore_index).sum()
    else:
        logits = logits_BTV.float().reshape(-1, logits_BTV.shape[-1])  # one copy, also of strided logits
        try:
            total = F.cross_entropy(logits, target, ignore_index=ignore_index,
                                    reduction="mean" if num_items_in_batch is None else "sum")
        except IndexError as e:  # (the CPU's error for a label outside the vocabulary; a GPU asserts)
            V = logits.shape[-1]
            bad = target[(target != ignore_index) & ((target < 0) | (target >= V))]
            shown = int(bad[0]) if bad.numel() else "a value"
            raise ValueError(f"labels hold {shown}, neither a token id (0 .. {V - 1}) nor ignore_index "
                             f"({ignore_index})") from e
        if num_items_in_batch is None:
            return total
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _kernel_serves(logits_NV: torch.Tensor, target_N: torch.Tensor) -> bool:
    """Whether the loss kernels (`ops.triton_loss`) compute the loss: where the fused kernels serve
    (a GPU, not while torch.compile traces; ops.fused), `fused.LOSS_KERNEL` on, a kernel dtype and
    integer targets, at least one row."""
    from . import fused

    return (fused.LOSS_KERNEL and fused.serves(logits_NV.device) and logits_NV.dtype in fused.KERNEL_DTYPES
            and not target_N.is_floating_point() and target_N.numel() > 0)


def causal_lm_loss_function(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """`causal_lm_loss` with the signature of Transformers' `ForCausalLMLoss` (a model's
    `loss_function`); `vocab_size` only checks the logits' last axis."""
    if vocab_size is not None and logits.shape[-1] != vocab_size:
        raise ValueError(f"loss_function: logits have {logits.shape[-1]} classes, vocab_size is {vocab_size}")
    return causal_lm_loss(logits, labels, ignore_index, num_items_in_batch, shift_labels)


def sequence_classification_loss(labels: torch.Tensor, pooled_logits: torch.Tensor, config, **kwargs) -> torch.Tensor:
    """The classifier's loss with the signature of Transformers' `ForSequenceClassificationLoss`:
    by `config.problem_type`, inferred and stored when unset, as the classifier's forward does."""
    if config.problem_type is None:
        config.problem_type = infer_problem_type(config.num_labels, labels)
    return classification_loss(pooled_logits, labels, config.num_labels, config.problem_type)


def infer_problem_type(num_labels: int, labels: torch.Tensor) -> str:
    if num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


def classification_loss(
    pooled_BL: torch.Tensor, labels: torch.Tensor, num_labels: int, problem_type: str
) -> torch.Tensor:
    labels = labels.to(pooled_BL.device)
    if problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(pooled_BL.squeeze(), labels.squeeze())
        return F.mse_loss(pooled_BL, labels)
    if problem_type == "single_label_classification":
        return F.cross_entropy(pooled_BL.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(pooled_BL, labels)


def last_token_index(
    input_ids_BT: torch.Tensor | None, pad_token_id: int | None, batch: int, device
) -> torch.Tensor | int:
    """Index of the rightmost non-padding token per row (works for left and right padding)."""
    if pad_token_id is None:
        if batch != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined (set config.pad_token_id).")
        return -1
    if input_ids_BT is None:
        return -1
    not_pad = (input_ids_BT != pad_token_id).to(device, torch.int32)
    idx = torch.arange(input_ids_BT.shape[-1], device=device, dtype=torch.int32)
    return (idx * not_pad).argmax(-1)
