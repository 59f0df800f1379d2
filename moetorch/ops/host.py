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


# ---- Weights held in host memory, read by a GPU ---------------------------------------------
# A model that runs on a GPU may keep some expert weights in pinned host memory (from_pretrained's
# layers placed on the CPU, see `moetorch.placement`): the GPU's kernels read them over the bus
# through unified addressing. Such a parameter records the address of its pinned storage; a
# parameter whose storage was since replaced (`model.to(dtype)` makes a plain host copy) no longer
# counts as mapped, and is copied to the GPU for each use instead.
_MAPPED = "_moetorch_host_mapped"


# Whether this process has made a host-mapped parameter: until then a forward looks for none.
MAPPED_MADE = False


def host_mapped_parameter(like: torch.nn.Parameter) -> torch.nn.Parameter:
    """An uninitialised parameter of `like`'s shape and dtype in pinned host memory, marked as read
    by the GPU in place (`is_host_mapped`)."""
    global MAPPED_MADE
    p = torch.nn.Parameter(torch.empty(like.shape, dtype=like.dtype, pin_memory=True), like.requires_grad)
    setattr(p, _MAPPED, p.data_ptr())
    MAPPED_MADE = True
    return p


def is_host_mapped(t: torch.Tensor) -> bool:
    """Whether `t` is a parameter made by `host_mapped_parameter` that still holds its pinned storage."""
    return t.device.type == "cpu" and getattr(t, _MAPPED, None) == t.data_ptr()


def marked_host_mapped(t: torch.Tensor) -> bool:
    """Whether `t` was made by `host_mapped_parameter` and is still in host memory (pinned or, after
    a conversion, not): a weight of a module that runs on a GPU."""
    return t.device.type == "cpu" and hasattr(t, _MAPPED)


def repin(module: torch.nn.Module) -> None:
    """Pin again the host-mapped parameters of `module` whose storage a conversion replaced with plain
    host memory (`module.to(dtype)`), so that the GPU reads them in place again (a copy from plain
    host memory could not be captured in a CUDA graph)."""
    for p in module.parameters():
        if marked_host_mapped(p) and not is_host_mapped(p) and torch.cuda.is_available():
            p.data = p.data.pin_memory()
            setattr(p, _MAPPED, p.data_ptr())


def module_device(module: torch.nn.Module) -> torch.device | None:
    """The device of a module's first parameter (a walk down its first children: no generator);
    expert weights that a GPU reads from host memory are passed over."""
    for p in module._parameters.values():
        if p is not None and not marked_host_mapped(p):
            return p.device
    for child in module._modules.values():
        if child is not None and (device := module_device(child)) is not None:
            return device
    return None


def held_bytes(module: torch.nn.Module) -> list[int]:
    """Bytes of the weights held in host memory of each decoder layer that holds some (the layers
    that name them `host_mappable`: their experts), in the layers' order."""
    layers = (sum(p.numel() * p.element_size() for p in m.parameters() if marked_host_mapped(p))
              for m in module.modules() if hasattr(m, "host_mappable"))
    return [n for n in layers if n]


def host_copy_bytes(module: torch.nn.Module) -> int:
    """The most GPU memory that weights held in host memory take at once: a decoder layer's experts,
    which a forward of many tokens copies to the GPU for the length of the layer
    (`ops.moe.host_weights`)."""
    return max(held_bytes(module), default=0)
