"""Routing functions `route(logits) -> (weights_TK, ids_TK)` and the Switch load-balancing loss.

Legend: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch

from . import fused


class _SparseMixerGrad(torch.autograd.Function):
    """Forward: the selected gate (scaled by the midpoint mask); backward: the softmax gradient
    of the selected gate, d p_sel / d s = p_sel * (onehot(sel) - p), as in SparseMixer."""

    @staticmethod
    def forward(ctx, scores_TE, gate_T1, ids_T1, probs_TE, scale_T1):
        ctx.save_for_backward(gate_T1, ids_T1, probs_TE)
        return gate_T1 * scale_T1

    @staticmethod
    def backward(ctx, grad_T1):
        gate_T1, ids_T1, probs_TE = ctx.saved_tensors
        g = grad_T1 * gate_T1
        grad_scores = -probs_TE * g
        grad_scores.scatter_add_(-1, ids_T1, g)
        return grad_scores, None, None, None, None


def _sparsemixer_pick(scores_TE, masked_TE, jitter_eps, training):
    """One sparsemixer step: threshold mask, choice (argmax or Gumbel sample), gate weight."""
    with torch.no_grad():
        top, top_idx = masked_TE.max(dim=-1, keepdim=True)
        factor = scores_TE.abs().clamp(min=top)
        drop = ((top - scores_TE) / factor) > (2 * jitter_eps)
    gates_TE = masked_TE.masked_fill(drop, float("-inf"))
    if training:
        # Gumbel-max sampling inside the mask.
        noise = torch.empty_like(gates_TE, memory_format=torch.legacy_contiguous_format).exponential_().log()
        ids_T1 = (gates_TE - noise).max(dim=-1)[1].unsqueeze(-1)
    else:
        ids_T1 = top_idx
    probs_TE = torch.softmax(gates_TE, dim=-1)
    gate_T1 = probs_TE.gather(-1, ids_T1)
    return ids_T1, probs_TE, gate_T1


def _midpoint_scale(probs_TE, ids_T1, second: bool):
    """Heun's third-order midpoint mask: 1.0 where the sample is the argmax or with p=0.25, else 1/3."""
    top, top_idx = probs_TE.max(dim=-1, keepdim=True)
    # The draw sequence matches Transformers' (a second `uniform_` for the second expert), so that a
    # seeded run gives the same routing.
    rand = torch.rand_like(top).uniform_() if second else torch.rand_like(top)
    keep = torch.logical_or(ids_T1 == top_idx, rand > 0.75)
    return torch.add(0.3333, keep, alpha=0.6667).type_as(probs_TE)


def sparsemixer(scores_TE: torch.Tensor, jitter_eps: float, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseMixer top-2 routing of PhiMoE (arXiv 2409.12136).

    The first expert is the argmax (Gumbel-sampled inside the mask in training); its weight is a
    softmax over the logits within a relative distance `2 * jitter_eps` of the maximum. The second
    repeats this with the first masked out. Weights need not sum to one.
    """
    if not training and fused.active(scores_TE):
        return fused.kernels().sparsemixer_eval(scores_TE, jitter_eps)
    weights, ids = [], []
    masked = scores_TE
    for second in (False, True):
        ids_T1, probs_TE, gate_T1 = _sparsemixer_pick(scores_TE, masked, jitter_eps, training)
        if training:
            scale = _midpoint_scale(probs_TE, ids_T1, second)
            gate_T1 = _SparseMixerGrad.apply(scores_TE, gate_T1, ids_T1, probs_TE, scale)
        weights.append(gate_T1)
        ids.append(ids_T1)
        masked = torch.scatter(scores_TE, -1, ids_T1, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(ids, dim=-1)


def topk_softmax(logits_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of float32 logits, softmax over the k chosen (JetMoE). Weights are float32."""
    top_TK, ids_TK = torch.topk(logits_TE.float(), k, dim=-1)
    return torch.softmax(top_TK, dim=-1), ids_TK


def route_topk(logits_TE: torch.Tensor, k: int, weight_dtype: torch.dtype):
    """JetMoE's router on raw logits: (weights [T, k] in weight_dtype, ids [T, k], float32 logits)."""
    if fused.active(logits_TE):
        return fused.kernels().topk_softmax(logits_TE, k, weight_dtype)
    logits32_TE = logits_TE.float()
    weights_TK, ids_TK = topk_softmax(logits32_TE, k)
    return weights_TK.to(weight_dtype), ids_TK, logits32_TE


def switch_aux_loss(
    router_logits: tuple[torch.Tensor, ...],
    num_experts: int,
    top_k: int,
    attention_mask_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss over all layers' router logits ([B*T, E] each).

    E * sum_e (fraction of top-k assignments to e) * (mean router probability of e), with the
    fractions and means taken over non-padding tokens when a 2D attention mask is given. The
    softmax and the top-k run in the logits' dtype (bf16 for a bf16 PhiMoE), the sums in float32,
    as Transformers' `load_balancing_loss_func`.
    """
    device = router_logits[0].device
    counts_E = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probs_E = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    w_N = None
    if attention_mask_BT is not None:
        w_N = attention_mask_BT.reshape(-1).to(device=device, dtype=torch.float32)
    for logits_NE in router_logits:
        p_NE = torch.softmax(logits_NE.to(device), dim=-1)
        _, ids_NK = torch.topk(p_NE, top_k, dim=-1)
        p_NE = p_NE.float()
        w = w_N if w_N is not None else torch.ones(p_NE.shape[0], dtype=torch.float32, device=device)
        counts_E = counts_E.scatter_add(0, ids_NK.reshape(-1), w.repeat_interleave(top_k))
        probs_E = probs_E + (p_NE * w[:, None]).sum(0)
        rows = rows + w.sum()
    return (counts_E / rows * (probs_E / rows)).sum() * num_experts


def z_loss(router_logits: tuple[torch.Tensor, ...], attention_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean of logsumexp(logits)^2, averaged over routers.

    With a 2D attention mask the mean runs over non-padding tokens only.
    """
    terms = []
    for x in router_logits:
        lse2_N = torch.logsumexp(x.float(), dim=-1).square()
        if attention_mask_BT is None:
            terms.append(lse2_N.mean())
        else:
            w_N = attention_mask_BT.reshape(-1).to(device=lse2_N.device, dtype=torch.float32)
            terms.append((lse2_N * w_N).sum() / w_N.sum())
    return torch.stack([t.to(terms[0].device) for t in terms]).mean()  # the routers may sit on several devices
