"""Norm layers with a fused residual add: `norm.add_norm(x, delta, bias)` returns
`(x + (delta + bias), norm(x + (delta + bias)))` in one kernel at inference (`ops.fused`), and
computes exactly that in torch otherwise. `residual_add(x, delta, bias)` is the same add alone.
"""

from __future__ import annotations

import torch
from torch import nn

from . import fused


def _add(x, delta, bias):
    return x + (delta if bias is None else delta + bias)


def residual_add(x: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x + (delta + bias), one kernel at inference."""
    if fused.active(x, delta, bias):
        return fused.kernels().add_norm(x, delta, bias, fused.NORM_NONE, None, None, 0.0)[0]
    return _add(x, delta, bias)


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (same parameters and state dict) with a fused inference path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusable(x):
            return self._fused(x, None, None)[1]
        return super().forward(x)

    def add_norm(self, x, delta, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fusable(x, delta, bias):
            return self._fused(x, delta, bias)
        s = _add(x, delta, bias)
        return s, super().forward(s)

    def _fusable(self, *tensors) -> bool:
        return len(self.normalized_shape) == 1 and fused.active(*tensors, self.weight, self.bias)

    def _fused(self, x, delta, bias):
        return fused.kernels().add_norm(x, delta, bias, fused.NORM_LAYER, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm as JetMoE (and Llama) compute it: normalise in float32, round to the input dtype,
    then scale by the weight."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def init_parameters(self, std: float) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.active(x, self.weight):
            return fused.kernels().add_norm(x, None, None, fused.NORM_RMS, self.weight, None, self.eps)[1]
        return self._norm(x)

    def add_norm(self, x, delta, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
        if fused.active(x, delta, bias, self.weight):
            return fused.kernels().add_norm(x, delta, bias, fused.NORM_RMS, self.weight, None, self.eps)
        s = _add(x, delta, bias)
        return s, self._norm(s)

    def _norm(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
