"""Linear layers that read the same rows, run together: `linears(x, q_proj, k_proj, v_proj)`.

At decode sizes (at most `fused.LINEAR_MAX_ROWS` rows, inference) one Triton kernel reads all the
weights (`triton_fused.linear_small`): a GEMV with no split-K reduction kernel after it, one launch
for up to three layers. Elsewhere each layer runs as torch runs it.
"""

from __future__ import annotations

import torch
from torch import nn

from . import fused


def linears(x: torch.Tensor, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    """`tuple(layer(x) for layer in layers)`; fused (the outputs are views of one tensor) at decode sizes."""
    if _fusable(x, layers):
        weights = [layer.weight for layer in layers]
        out = fused.kernels().linear_small(x.reshape(-1, x.shape[-1]), weights, [layer.bias for layer in layers])
        out = out.view(*x.shape[:-1], out.shape[-1])
        return tuple(out.split([w.shape[0] for w in weights], dim=-1))
    return tuple(layer(x) for layer in layers)


def _fusable(x: torch.Tensor, layers) -> bool:
    if not 1 <= len(layers) <= 3 or x.dim() == 0 or not 0 < x.numel() // x.shape[-1] <= fused.LINEAR_MAX_ROWS:
        return False
    if any(type(layer).forward is not nn.Linear.forward for layer in layers):
        return False  # a subclass (a LoRA wrapper, a quantised layer) computes something else
    biases = [layer.bias for layer in layers]
    if any((b is None) != (biases[0] is None) for b in biases):
        return False
    if any(layer.in_features != x.shape[-1] for layer in layers):
        return False
    return fused.active(x, *(layer.weight for layer in layers), *biases)
