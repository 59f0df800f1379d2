"""The causal-LM cross-entropy in two kernels, with no float32 copy of the logits.

`F.cross_entropy(logits.float(), ...)`, as Transformers computes the loss, holds a float32 copy of
the [N, V] logits and the float32 log-softmax that its backward reads, and the backward makes a
float32 gradient before casting it to the logits' dtype: at 16k tokens and 32k words, 2 GiB each.
Here one program per row reads the row in its own dtype:
- forward (`_row_loss_kernel`): the row's maximum M, then L = log(sum(exp(x - M))) in float32,
  and the loss L - (x_t - M), which is torch's `-log_softmax(x)[t]` (`(x - M) - L`), summed in
  another order. A row whose target is `ignore_index` has loss 0; a target outside [0, V) gives
  nan (torch asserts on the device there). M and L are kept for the backward.
- backward (`_row_grad_kernel`): `exp((x - M) - L) * g`, less g at the target, rounded once to the
  logits' dtype (to nearest even, `triton_moe._round`), where g is the row's gradient (0 at
  ignored rows): torch's log-softmax backward of the nll's gradient, then the cast's.

The backward saves the logits themselves (the model's output, held anyway), so an in-place change
of the output logits before `backward()` raises, as autograd does for any saved tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host import on_device
from .launch import launcher, next_power_of_2
from .triton_moe import _round, round_code
from .triton_sample import _exp

# Values a program reads at once, and its warps.
BLOCK = 4096
NUM_WARPS = 8


@launcher
@triton.jit
def _row_loss_kernel(x_ptr, stride_x, t_ptr, loss_ptr, stats_ptr, V, ignore_index,
                     BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_x
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32))
    M = tl.max(m, 0)
    s = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        s += tl.where(idx < V, _exp(x - M, LIBDEVICE), 0.0)
    L = tl.log(tl.sum(s, 0))
    t = tl.load(t_ptr + row)
    valid = (t >= 0) & (t < V)
    x_t = tl.load(base + tl.where(valid, t, 0)).to(tl.float32)
    loss = tl.where(valid, L - (x_t - M), float("nan"))
    tl.store(loss_ptr + row, tl.where(t == ignore_index, 0.0, loss))
    tl.store(stats_ptr + 2 * row, M)
    tl.store(stats_ptr + 2 * row + 1, L)


@launcher
@triton.jit
def _row_grad_kernel(x_ptr, stride_x, t_ptr, stats_ptr, g_ptr, out_ptr, stride_out, V, ignore_index,
                     BLOCK: tl.constexpr, ROUND: tl.constexpr, LIBDEVICE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_x
    M = tl.load(stats_ptr + 2 * row)
    L = tl.load(stats_ptr + 2 * row + 1)
    t = tl.load(t_ptr + row)
    g = tl.where(t == ignore_index, 0.0, tl.load(g_ptr + row))
    for start in range(0, V, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        x = tl.load(base + idx, mask=idx < V, other=0.0).to(tl.float32)
        d = _exp((x - M) - L, LIBDEVICE) * g - tl.where(idx == t, g, 0.0)
        tl.store(out_ptr + row * stride_out + idx, _round(d, ROUND).to(out_ptr.dtype.element_ty), mask=idx < V)


def _block(V: int) -> int:
    return min(BLOCK, next_power_of_2(V))


class _RowLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, target_N: torch.Tensor, ignore_index: int) -> torch.Tensor:
        N, V = logits_NV.shape
        loss_N = torch.empty(N, dtype=torch.float32, device=logits_NV.device)
        stats_N2 = torch.empty(N, 2, dtype=torch.float32, device=logits_NV.device)
        with on_device(logits_NV.device):  # a model over several devices: its logits on the last one
            _row_loss_kernel[(N,)](logits_NV, logits_NV.stride(0), target_N, loss_N, stats_N2, V, ignore_index,
                                   BLOCK=_block(V), LIBDEVICE=logits_NV.is_cuda, num_warps=NUM_WARPS)
        ctx.save_for_backward(logits_NV, target_N, stats_N2)
        ctx.ignore_index = ignore_index
        return loss_N

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernel's gradient is not itself differentiated
    def backward(ctx, grad_N: torch.Tensor):
        logits_NV, target_N, stats_N2 = ctx.saved_tensors
        N, V = logits_NV.shape
        out = torch.empty((N, V), dtype=logits_NV.dtype, device=logits_NV.device)
        with on_device(logits_NV.device):
            _row_grad_kernel[(N,)](logits_NV, logits_NV.stride(0), target_N, stats_N2, grad_N.float().contiguous(),
                                   out, out.stride(0), V, ctx.ignore_index, BLOCK=_block(V),
                                   ROUND=round_code(logits_NV.dtype), LIBDEVICE=logits_NV.is_cuda,
                                   num_warps=NUM_WARPS)
        return out, None, None


def row_losses(logits_NV: torch.Tensor, target_N: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Each row's cross-entropy [N] in float32 (0 where the target is `ignore_index`), differentiable
    in the logits, whose gradient comes back in their dtype. N >= 1."""
    if logits_NV.stride(1) != 1:
        logits_NV = logits_NV.contiguous()
    return _RowLosses.apply(logits_NV, target_N.contiguous(), int(ignore_index))
