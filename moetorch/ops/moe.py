"""The expert computation seam: SwiGLU experts applied to routed tokens.

Legend: T tokens, D model dim, I expert hidden dim, E experts, K experts per token, N = T*K.
Weights are stacked `[E, out, in]`: w13_E2ID holds [gate; up], w2_EDI the down projection.

Backends (all compute the same function):
- "reference": a loop over experts (the oracle; synchronises with the host to find each expert's tokens).
- "gather": per-assignment weight gather + bmm; no host sync, for decode-sized T.
- "grouped_mm": tokens sorted by expert on device, one `torch._grouped_mm` per projection (CUDA).
`experts_forward(..., backend=None)` picks one; Triton kernels plug in here as well.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Act = Callable[[torch.Tensor], torch.Tensor]

# Assignments up to which the sync-free gather path is used when no backend is forced.
GATHER_MAX_ROWS = 64


def _swiglu(h_N2I: torch.Tensor, act: Act) -> torch.Tensor:
    gate, up = h_N2I.chunk(2, dim=-1)
    return act(gate) * up


def experts_reference(x_TD, w13_E2ID, w2_EDI, ids_TK, weights_TK, act: Act) -> torch.Tensor:
    out_TD = torch.zeros_like(x_TD)
    for e in range(w13_E2ID.shape[0]):
        tok, slot = torch.where(ids_TK == e)
        if tok.numel() == 0:
            continue
        h = _swiglu(x_TD[tok] @ w13_E2ID[e].T, act) @ w2_EDI[e].T
        out_TD.index_add_(0, tok, (h * weights_TK[tok, slot, None]).to(out_TD.dtype))
    return out_TD


def experts_gather(x_TD, w13_E2ID, w2_EDI, ids_TK, weights_TK, act: Act) -> torch.Tensor:
    T, K = ids_TK.shape
    ids_N = ids_TK.reshape(-1)
    x_ND1 = x_TD.repeat_interleave(K, dim=0).unsqueeze(-1)
    h_N2I = torch.bmm(w13_E2ID[ids_N], x_ND1).squeeze(-1)
    y_ND = torch.bmm(w2_EDI[ids_N], _swiglu(h_N2I, act).unsqueeze(-1)).squeeze(-1)
    y_ND = y_ND * weights_TK.reshape(-1, 1)
    return y_ND.view(T, K, -1).sum(1).to(x_TD.dtype)


def experts_grouped_mm(x_TD, w13_E2ID, w2_EDI, ids_TK, weights_TK, act: Act) -> torch.Tensor:
    T, K = ids_TK.shape
    E = w13_E2ID.shape[0]
    ids_N = ids_TK.reshape(-1)
    order_N = torch.argsort(ids_N, stable=True)
    counts_E = torch.bincount(ids_N, minlength=E)
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    xs_ND = x_TD[order_N // K]
    h = torch._grouped_mm(xs_ND, w13_E2ID.transpose(1, 2), offs=offs_E)
    y = torch._grouped_mm(_swiglu(h, act), w2_EDI.transpose(1, 2), offs=offs_E)
    y = y * weights_TK.reshape(-1)[order_N, None]
    out_TD = torch.zeros(T, x_TD.shape[1], dtype=y.dtype, device=x_TD.device)
    out_TD.index_add_(0, order_N // K, y)
    return out_TD.to(x_TD.dtype)


EXPERT_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": experts_reference,
    "gather": experts_gather,
    "grouped_mm": experts_grouped_mm,
}


def pick_backend(x_TD: torch.Tensor, ids_TK: torch.Tensor) -> str:
    if x_TD.is_cuda and hasattr(torch, "_grouped_mm") and x_TD.dtype == torch.bfloat16:
        return "grouped_mm"
    if ids_TK.numel() <= GATHER_MAX_ROWS:
        return "gather"
    return "reference"


def experts_forward(x_TD, w13_E2ID, w2_EDI, ids_TK, weights_TK, act: Act, backend: str | None = None) -> torch.Tensor:
    """y_T = sum_k weights[t, k] * W2[e] (act(W1[e] x_t) * W3[e] x_t), with e = ids[t, k]."""
    name = backend or pick_backend(x_TD, ids_TK)
    if name not in EXPERT_BACKENDS:
        raise ValueError(f"unknown expert backend {name!r}; available: {sorted(EXPERT_BACKENDS)}")
    return EXPERT_BACKENDS[name](x_TD, w13_E2ID, w2_EDI, ids_TK, weights_TK, act)
