"""Host tensors onto a device, and a device made the current one."""

from __future__ import annotations

import contextlib

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU from pinned memory without waiting (the host goes on
    launching while the GPU runs what is queued)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def on_device(device: torch.device):
    """`device` as the current CUDA device inside, where Triton and torch launch (nothing off the GPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
