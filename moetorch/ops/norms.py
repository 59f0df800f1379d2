"""Norm layers with a fused residual add: `norm.add_norm(x, delta, bias)` returns
`(x + (delta + bias), norm(x + (delta + bias)))` in one kernel at inference (`ops.fused`), and
computes exactly that in torch otherwise. `residual_add(x, delta, bias)` is the same add alone.

`norm.add_norm_route(...)` also runs the MoE router that reads the normed rows (its GEMV and the
routing) in the same kernel, at decode sizes in inference; elsewhere it returns no routing and the
MoE block routes as usual.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch
from torch import nn

from . import fused


def delta_terms(x: torch.Tensor, delta: torch.Tensor) -> int:
    """How many terms a residual delta holds per row: 1 when it has x's shape, K when it is
    `[..., K, D]` over x's `[..., D]` (K experts' weighted outputs, which the add sums first)."""
    if delta.shape == x.shape:
        return 1
    if delta.dim() == x.dim() + 1 and delta.shape[:-2] == x.shape[:-1] and delta.shape[-1] == x.shape[-1]:
        return delta.shape[-2]
    raise ValueError(f"residual delta of shape {tuple(delta.shape)} fits neither x's {tuple(x.shape)} "
                     f"nor {tuple(x.shape[:-1])} + (K, {x.shape[-1]})")


def _add(x, delta, bias):
    if delta is None:
        return x
    delta_terms(x, delta)  # checks the shape
    if delta.dim() > x.dim():
        delta = delta.sum(-2)
    return x + (delta if bias is None else delta + bias)


def residual_add(x: torch.Tensor, delta: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x + (delta + bias), one kernel at inference; delta None: x."""
    if delta is None:
        return x
    if fused.active(x, delta, bias):
        return fused.kernels().add_norm(x, delta, bias, fused.NORM_NONE, None, None, 0.0)[0]
    return _add(x, delta, bias)


class Residual(NamedTuple):
    """A hidden state `x + (delta + bias)` whose add has not run yet. A decoder layer returns its
    MoE output this way, and the next layer's first norm (or the final norm) adds it in its own
    kernel: `norm.add_norm(*residual)`, one launch where the add and the norm took two. `delta` may
    carry a K axis (`[..., K, D]`, see `delta_terms`): the add sums it."""

    x: torch.Tensor
    delta: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def value(self) -> torch.Tensor:
        """The hidden state itself (one add kernel unless nothing is pending)."""
        return residual_add(self.x, self.delta, self.bias)

    @classmethod
    def leaving(cls, module: nn.Module, x, delta=None, bias=None) -> Residual:
        """What `module`'s forward returns: the add left pending, unless the bias is a parameter
        that goes as the forward returns (a module sharded by FSDP2, whose hook frees its
        unsharded parameters then): that add runs now."""
        r = cls(x, delta, bias)
        fsdp = sys.modules.get("torch.distributed.fsdp")  # nothing is sharded before it is imported
        if bias is not None and fsdp is not None and isinstance(module, fsdp.FSDPModule):
            return cls(r.value())
        return r


class _AddNormRoute:
    """`add_norm_route` for a norm that describes itself by `_kernel_args()` (mode, weight, bias, eps)."""

    def add_norm_route(
        self, x, delta, bias, router_weight_ED: torch.Tensor | None, top_k: int,
        sparsemixer_eps: float | None = None, logits_f32: bool = False,
    ):
        """`(sum, normed, routing)`: `add_norm(x, delta, bias)` (delta None: the norm alone), and the
        router `router_weight_ED` applied to the normed rows with its routing, which is sparsemixer's
        eval mode when `sparsemixer_eps` is given, else a top-k softmax. `routing` is (weights, ids,
        logits) from one fused kernel at decode sizes in inference, else None: the caller routes.
        A router weight of None (a router that is not a plain Linear) always leaves it to the caller."""
        rows = x.numel() // x.shape[-1]
        if (self.training or router_weight_ED is None or not 0 < rows <= fused.ROUTE_MAX_ROWS
                or not self._fusable(x, delta, bias, router_weight_ED)):
            if delta is None:
                return x, self(x), None
            return (*self.add_norm(x, delta, bias), None)
        mode, w, nb, eps = self._kernel_args()
        return fused.kernels().add_norm_route(
            x, delta, bias, mode, w, nb, eps, router_weight_ED, top_k, sparsemixer_eps, logits_f32
        )


class LayerNorm(_AddNormRoute, nn.LayerNorm):
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

    def _kernel_args(self):
        return fused.NORM_LAYER, self.weight, self.bias, self.eps

    def _fused(self, x, delta, bias):
        return fused.kernels().add_norm(x, delta, bias, *self._kernel_args())


class RMSNorm(_AddNormRoute, nn.Module):
    """RMSNorm as JetMoE (and Llama) compute it: normalise in float32, round to the input dtype,
    then scale by the weight."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def init_parameters(self, std: float) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusable(x):
            return fused.kernels().add_norm(x, None, None, *self._kernel_args())[1]
        return self._norm(x)

    def add_norm(self, x, delta, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fusable(x, delta, bias):
            return fused.kernels().add_norm(x, delta, bias, *self._kernel_args())
        s = _add(x, delta, bias)
        return s, self._norm(s)

    def _fusable(self, *tensors) -> bool:
        return fused.active(*tensors, self.weight)

    def _kernel_args(self):
        return fused.NORM_RMS, self.weight, None, self.eps

    def _norm(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
