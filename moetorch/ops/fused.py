"""When the fused inference kernels (`ops.triton_fused`) run instead of the torch code.

They run on CUDA tensors, with triton installed, when nothing asks for gradients; everything else
(training, CPU, `MOETORCH_FUSED=0`) takes the torch code, which stays the reference. The one
exception is the causal-LM loss (`LOSS_KERNEL`, `ops.triton_loss`), whose kernels compute its
gradient too. Tests run the kernels on CPU under Triton's interpreter with `forced()`.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from .moe import on_training_paths, triton_available

# What the kernels compute in (float32 accumulation, rounding to these); float64 takes the torch code.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Which norm `triton_fused.add_norm` applies after the residual add.
NORM_NONE, NORM_LAYER, NORM_RMS = 0, 1, 2

# Rows up to which a norm runs the following router in its kernel (`add_norm_route`): each of a
# row's E programs recomputes the row's norm for its one logit, which at decode sizes costs less
# than the two launches (router GEMV, routing) it saves; more rows take the GEMM and `_route_kernel`.
ROUTE_MAX_ROWS = 64

# Rows up to which `ops.linear.linears` (and `linears_rotated`, with the rotary and the cache write)
# runs the layers in one GEMV kernel. At 16 rows, graphed decode on the H200 (bench/decode_ab.py):
# PhiMoE 898 -> 918 tok/s, JetMoE 3287 -> 3326 against cuBLAS and the rotary kernel. A 64-row tile
# of the same kernel decoded JetMoE at batch 64 2% slower, PhiMoE level (docs/performance.md).
LINEAR_MAX_ROWS = 16

# The rotary tables and the attention mask of a step each in one kernel (`rope_tables`,
# `causal_mask`); 0: their torch ops (the B arm of bench/decode_ab.py's A/B).
STEP_INPUT_KERNELS = 1

# Sampled decode steps (`generate(do_sample=True)`, not beams) draw their tokens with the sampling
# kernels (`ops.triton_sample.sample`), which also compute the closing temperature, top-k, top-p and
# min-p warpers; 0: the warpers, softmax and torch.multinomial (the B arm of bench/stop_check.py's A/B).
# Continuous batching's per-row draw likewise (`ops.triton_row_sample`; 0: `row_sampling.draw_rows_torch`).
SAMPLE_KERNEL = 1

# The causal-LM loss and its gradient from the logits in their own dtype (`ops.triton_loss`), where
# the fused kernels serve, in training too; 0: `F.cross_entropy` over a float32 copy of the logits.
LOSS_KERNEL = 1

_state = {"enabled": os.environ.get("MOETORCH_FUSED", "1") != "0", "forced": False}


def serves(device: torch.device) -> bool:
    """Whether the fused kernels run on `device` at all: CUDA (any device under `forced()`), triton
    installed, MOETORCH_FUSED not 0. For ops with no float inputs (the attention mask); `active`
    checks the tensors of the others. Never while torch.compile traces: the compiled graph takes
    the torch code, which inductor fuses itself; nor inside `moe.training_paths()`."""
    if torch.compiler.is_compiling() or on_training_paths():
        return False
    return _state["enabled"] and (_state["forced"] or device.type == "cuda") and triton_available()


def active(*tensors: torch.Tensor | None) -> bool:
    """Whether the fused kernels serve an op on these tensors: the first one decides the device,
    all must share its dtype (torch would promote), and none may need gradients or autocast."""
    first = tensors[0]
    if not serves(first.device) or torch.is_autocast_enabled(first.device.type):
        return False
    dtype = first.dtype
    if dtype not in KERNEL_DTYPES:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:  # a plain loop: this runs for every fused op of an eager forward
        if t is not None and (t.dtype != dtype or (grad and t.requires_grad)):
            return False
    return True


@contextlib.contextmanager
def forced(on: bool = True):
    """Use the fused kernels on any device (CPU under TRITON_INTERPRET=1), or (on=False) never."""
    before = dict(_state)
    _state.update(forced=on, enabled=on)
    try:
        yield
    finally:
        _state.update(before)


@functools.cache
def kernels():
    """ops.triton_fused, imported on first use (it needs triton); a module lookup after that."""
    from . import triton_fused

    return triton_fused
