"""Launching Triton kernels with less host time: `launcher(triton.jit(fn))`.

`kernel[grid](*args, **kwargs)` through Triton binds the arguments to the kernel's parameters,
works out how the kernel is specialised for them, looks the compiled kernel up (compiling it the
first time), then launches it. On the H200's host that is 30-50 us a launch, of which the launch
itself is under half (`bench/launch_cost.py`), and a prefill makes a few hundred launches: at short
prompts the GPU waits on them.

A `Launcher` is called the same way. The first call of each specialisation goes through Triton;
later calls that specialise alike launch the kernel Triton compiled for it directly. What Triton
specialises on (Triton 3.6 to 3.9): a tensor's dtype and whether its address is a multiple of 16;
an integer's width (32 or 64 bits, signed or not), whether it is 1, and whether it is a multiple
of 16; a tensor descriptor's dtype and block shape; a constexpr's value; the type of anything else
(floats, bools); and the launch options (`num_warps`, ...). The key here (`Launcher.key`) holds
all of that, and more of some (a float's value, a descriptor's alignment). So two calls that
share a key share Triton's compiled kernel, and a decode step's new position or cache length
keeps its key. tests/test_launch.py checks the key against Triton's own specialisation on every
launch that tiny models make, and on variants of them.

Calls go through Triton unchanged under the interpreter (`TRITON_INTERPRET=1`, where `triton.jit`
makes no compiled kernels), when `ENABLED` is False (`MOETORCH_FAST_LAUNCH=0` at import, or set at
run time), when a launch hook is set (`triton.knobs.runtime.launch_enter_hook`, as profilers do,
so that they see every launch), when a global the kernel reads has changed since it compiled
(Triton then raises), while torch.compile traces (it captures Triton's kernels as they are), for
a grid given as a function, and for calls with an unhashable argument;
a call that passes a tensor by keyword goes through Triton every time (its key would hold the
tensor itself).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

try:  # Triton's own way to the current stream (a raw handle), with the public fallback
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:  # pragma: no cover - older torch
    def _raw_stream(device: int) -> int:
        return torch.cuda.current_stream(device).cuda_stream

try:  # the current device without `torch.cuda.current_device`'s lazy-init checks (five calls, ~2 us):
    # a launch's tensors are on the GPU already, so CUDA is initialised
    from torch._C import _cuda_getDevice as _current_device
except ImportError:  # pragma: no cover - a torch without CUDA
    def _current_device() -> int:
        return torch.cuda.current_device()

ENABLED = os.environ.get("MOETORCH_FAST_LAUNCH", "1") != "0"

_UNSET = object()
# Entries a launcher keeps (a float argument's values make their own keys); past it, it starts afresh.
MAX_KEPT = 1024


def cdiv(x: int, y: int) -> int:
    """`triton.cdiv` for host code: Triton's is a constexpr function, whose call costs about 3 us."""
    return (x + y - 1) // y


def next_power_of_2(n: int) -> int:
    """`triton.next_power_of_2` for host code (0 for 0), without its call's cost."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _spec(a: Any) -> Any:
    """The key of an argument that is neither a tensor nor an int: its type and value (a tensor
    descriptor's dtype, base alignment and block shape). A bool or float is not equal to the int
    of its value here, as it is in Python: Triton compiles them apart."""
    if isinstance(a, TensorDescriptor):
        return "desc", a.base.dtype, not a.base.data_ptr() & 15, tuple(a.block_shape), getattr(a, "padding", None)
    if isinstance(a, torch.Tensor):  # a subclass (nn.Parameter)
        return a.dtype, not a.data_ptr() & 15
    return type(a), a


def specialization_key(args: tuple, kwargs: dict, _tensors=frozenset((torch.Tensor, torch.nn.Parameter)),
                       _spec=_spec) -> tuple:
    """The key under which a call's compiled kernel is kept (the current device and positional
    constexprs aside): a tensor by its dtype and 16-byte alignment; an int by what Triton
    specialises it on (whether it is 1, whether 16 divides it, and its width: 32 bits, 64, or
    unsigned 64), so that positions and lengths that change from call to call share a key; any
    other argument by `_spec`; the keywords (constexprs and options) by name, value and type."""
    return (tuple([(a == 1) | (not a & 15) << 1 | (not -2147483648 <= a < 2147483648) << 2 | (a >= 2**63) << 3
                   if a.__class__ is int else (a.dtype, not a.data_ptr() & 15) if a.__class__ in _tensors
                   else _spec(a) for a in args]),
            tuple(kwargs.items()), tuple(map(type, kwargs.values())))


_RUNTIME = getattr(getattr(triton, "knobs", None), "runtime", None)  # where Triton keeps its launch hooks


def _hooks_set() -> bool:
    """Whether a launch hook is set, as profilers (Proton) set one: Triton 3.6+ keeps each hook as a
    chain of calls, empty when none is set. (Attribute reads only: this runs at every launch.)"""
    if _RUNTIME is None:
        return False
    for hook in (_RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook):
        if hook is not None:
            try:
                if hook.calls:
                    return True
            except AttributeError:  # a plain callable
                return True
    return False


class Launcher:
    """`kernel[grid](*args, **kwargs)` for a `triton.jit` kernel, with the lookup of later calls
    done here (see the module's docstring). Attributes are the kernel's (`fn`, `arg_names`, ...)."""

    def __init__(self, jit) -> None:
        self.jit = jit
        params = getattr(jit, "params", None)
        # Only compiled JIT functions (not the interpreter's) have kernels to launch directly.
        self.direct = params is not None and hasattr(jit, "device_caches")
        self.names = [p.name for p in params] if params else []
        # constexpr parameters, whose values Triton compiles in: by value in the key when positional
        self.constexpr_at = [i for i, p in enumerate(params or ()) if p.is_constexpr]
        self.first_constexpr = self.constexpr_at[0] if self.constexpr_at else len(self.names)
        self.defaults = {p.name: p.default if p.has_default else _UNSET for p in params or ()}
        # key -> (compiled kernel, the parameters after the positional ones, their defaults)
        self.kernels: dict[tuple, tuple] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.jit, name)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def _globals_changed(self) -> bool:
        """Whether a global the kernel reads has changed since it was compiled (Triton's check)."""
        for (name, _), (value, namespace) in self.jit.used_global_vals.items():
            if namespace.get(name, _UNSET) != value:
                return True
        return False

    def key(self, args: tuple, kwargs: dict) -> tuple:
        """A call's key (the current device aside): `specialization_key`, and the values of
        constexprs passed by position."""
        if len(args) <= self.first_constexpr:
            return specialization_key(args, kwargs)
        return specialization_key(args, kwargs), tuple(args[i] for i in self.constexpr_at if i < len(args))

    def launch(self, grid, args: tuple, kwargs: dict):
        if (not (ENABLED and self.direct) or callable(grid) or _hooks_set()
                or (self.jit.used_global_vals and self._globals_changed()) or torch.compiler.is_compiling()):
            return self.jit[grid](*args, **kwargs)  # Triton's path (which raises on changed globals)
        device = _current_device()
        # `self.key`, with its common case (no positional constexpr) inline: a call fewer a launch
        key = (device, specialization_key(args, kwargs) if len(args) <= self.first_constexpr
               else self.key(args, kwargs))
        try:
            hit = self.kernels.get(key)
        except TypeError:  # an unhashable argument
            return self.jit[grid](*args, **kwargs)
        if hit is None:
            compiled = self.jit[grid](*args, **kwargs)
            if hasattr(compiled, "result"):  # an asynchronous compile's future
                compiled = compiled.result()
            tail = self.names[len(args):]
            defaults = tuple(self.defaults[n] for n in tail)
            keep = compiled is not None and all(n in kwargs or d is not _UNSET for n, d in zip(tail, defaults))
            if keep and not any(isinstance(v, (torch.Tensor, TensorDescriptor)) for v in kwargs.values()):
                if len(self.kernels) >= MAX_KEPT:
                    self.kernels.clear()
                self.kernels[key] = compiled, tail, defaults
            return compiled
        compiled, tail, defaults = hit
        size = len(grid)
        compiled.run(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, _raw_stream(device),
                     compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *map(kwargs.get, tail, defaults))
        return compiled


def launcher(jit) -> Launcher:
    """Wrap a `triton.jit` kernel so that repeated launches skip Triton's argument binding."""
    return Launcher(jit)
