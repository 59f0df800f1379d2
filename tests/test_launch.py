"""Fast Triton launches (`ops.launch.Launcher`).

A call whose arguments specialise like an earlier call's launches the kernel compiled for that
call directly, so the launcher's key must never join two calls that Triton compiles apart. That is
checked against Triton's own specialisation (its argument binder, built for an sm_90 target: no GPU
needed) on every launch that the tiny models make, and on variants of each argument. The launch
itself is checked with a stand-in kernel: which calls go through Triton, and what reaches the
compiled kernel's runner.
"""

from __future__ import annotations

import pytest
import torch
from archs import JETMOE, PHIMOE
from launches import kernels, record_launches, tiny_model
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature
from triton.tools.tensor_descriptor import TensorDescriptor

import moetorch
from moetorch.ops import fused, launch, triton_moe


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A tensor of t's dtype whose address is not a multiple of 16 bytes."""
    return torch.zeros(t.numel() + 16, dtype=t.dtype)[1:1 + t.numel()]


def _aligned(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros(max(t.numel(), 1), dtype=t.dtype)


# Values every integer argument also takes: 1 (which Triton makes a constant), multiples of 16 and
# not, negatives, and the 32-bit, 64-bit and unsigned 64-bit ranges' edges.
_INTS = (0, 1, 2, 16, 17, -16, -17, 2**31 - 16, 2**31 - 1, 2**31, -(2**31), -(2**31) - 16, 2**40 + 16,
         2**63 - 16, 2**63, 2**64 - 16)


def _variants(args: tuple, constexpr: list[bool]):
    """The call's arguments, then the same with one argument changed at a time."""
    yield args
    for i, (a, c) in enumerate(zip(args, constexpr)):
        if c:
            continue
        if isinstance(a, TensorDescriptor):
            base = a.base
            others = [TensorDescriptor.from_tensor(_aligned(base).view(-1)[: base.numel()].view(base.shape),
                                                   list(a.block_shape))]
        elif isinstance(a, torch.Tensor):
            others = [_misaligned(a), _aligned(a)]
        elif isinstance(a, bool):
            others = [not a, int(a), float(a)]
        elif isinstance(a, int):
            others = [*_INTS, True, False, 1.0, 0.0]  # 1, True and 1.0 are equal in Python, not to Triton
        elif isinstance(a, float):
            others = [0.0, 1.0, -2.5, 1e30, 1, True]
        else:
            others = [None]
        for other in others:
            yield args[:i] + (other,) + args[i + 1:]


def test_the_key_never_joins_calls_that_triton_compiles_apart(recorded_launches):
    backend = make_backend(GPUTarget("cuda", 90, 32))
    by_kernel: dict[str, list] = {}
    for module, name, args, kwargs in recorded_launches:
        by_kernel.setdefault(f"{module.__name__}.{name}", []).append((module, name, args, kwargs))
    every = {f"{m.__name__}.{n}" for m, n in kernels()}
    assert set(by_kernel) == every, f"not launched: {sorted(every - set(by_kernel))}"
    checked = 0
    for calls in by_kernel.values():
        module, name = calls[0][:2]
        jit = JITFunction(getattr(module, name).fn)  # compiled, as on a GPU (the tests interpret)
        ours = launch.Launcher(jit)
        assert ours.direct
        constexpr = [p.is_constexpr for p in jit.params]
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        seen: dict[tuple, tuple] = {}
        for _, _, args, kwargs in calls[:40]:
            for variant in _variants(args, constexpr):
                _, specialization, options = binder(*variant, **kwargs)
                triton_key = (tuple(specialization), str(options))
                key = ours.key(variant, kwargs)
                assert seen.setdefault(key, triton_key) == triton_key, (name, variant)
                checked += 1
    assert checked > 5000


# The interpreted kernels also compute on values they then mask (a static cache's unwritten slots,
# padding rows), and numpy warns of the NaNs among them.
@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
@pytest.mark.parametrize("arch", [PHIMOE, JETMOE], ids=["phimoe", "jetmoe"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_eager_decode_steps_keep_their_keys(monkeypatch, arch, cache):
    """An eager decode step feeds each kernel a new position and a longer cache, which keep their
    keys (Triton specialises on neither's value), so the steps launch directly. A dynamic cache's
    strides grow with it and alternate between multiples of 16 and not, which Triton compiles
    apart: two keys there, after which no step makes a new one."""
    calls = record_launches(monkeypatch)
    model = tiny_model(arch).to(torch.bfloat16)
    with torch.no_grad(), fused.forced():
        kv = moetorch.DynamicCache() if cache == "dynamic" else moetorch.StaticCache(model.config, max_cache_len=40)
        model(torch.randint(1, 97, (2, 17)), past_key_values=kv, use_cache=True)
        steps = []
        for t in range(17, 20):
            start = len(calls)
            model(torch.randint(1, 97, (2, 1)), past_key_values=kv, use_cache=True, position_ids=torch.full((2, 1), t))
            steps.append([(name, _launcher(module, name).key(args, kwargs)) for module, name, args, kwargs in calls[start:]])
    assert steps[0] and set(steps[2]) <= set(steps[0]) | set(steps[1])
    if cache == "static":
        assert steps[1] == steps[0] and steps[2] == steps[0]


def _launcher(module, name) -> launch.Launcher:
    return launch.Launcher(JITFunction(getattr(module, name).kernel.fn))  # the compiled kind, as on a GPU


def test_the_key_tells_apart_what_triton_specialises_on():
    t = torch.zeros(8, dtype=torch.bfloat16)

    def key(*args, **kwargs):
        return launch.specialization_key(args, kwargs)

    assert key(t) != key(_misaligned(t)) and key(t) != key(t.float()) and key(t) == key(torch.ones(4, dtype=t.dtype))
    assert key(torch.nn.Parameter(t)) == key(t)
    # an int by Triton's classes: 1, a multiple of 16 or not, 32-bit, 64-bit or unsigned 64-bit
    assert key(16) == key(0) == key(-32) and key(17) == key(2) == key(-1) and key(2**31 - 1) == key(5)
    assert len({key(v) for v in (1, True, 1.0, 16, 17, None, False, 0.0, 2**31, 2**31 + 1, 2**63)}) == 11
    assert key(BLOCK=1) != key(BLOCK=True) and key(BLOCK=16) != key(BLOCK=32) and key(t, 2) != key(t, n=2)
    d = TensorDescriptor.from_tensor(torch.zeros(64, 64), [16, 32])
    assert key(d) == key(TensorDescriptor.from_tensor(torch.ones(64, 64), [16, 32]))
    assert key(d) != key(TensorDescriptor.from_tensor(torch.ones(64, 64), [32, 32]))


class _Compiled:
    """A stand-in compiled kernel: records what its runner receives."""

    def __init__(self) -> None:
        self.function, self.packed_metadata, self.runs = "fn", "meta", []

    def run(self, *args) -> None:
        self.runs.append(args)


class _Jit:
    """A stand-in for a `triton.jit` function with parameters (x_ptr, n, BLOCK: constexpr, FLAG=0)."""

    def __init__(self) -> None:
        import inspect

        def kernel(x_ptr, n, BLOCK, FLAG=0):
            pass

        class Param:
            def __init__(self, p: inspect.Parameter) -> None:
                self.name = p.name
                self.is_constexpr = p.name.isupper()
                self.has_default = p.default is not inspect.Parameter.empty
                self.default = p.default

        self.params = [Param(p) for p in inspect.signature(kernel).parameters.values()]
        self.device_caches, self.used_global_vals, self.triton_calls = {}, {}, []
        self.compiled = {}

    def __getitem__(self, grid):
        def go(*args, **kwargs):
            self.triton_calls.append((grid, args, kwargs))
            block = kwargs["BLOCK"] if "BLOCK" in kwargs else args[2]
            return self.compiled.setdefault(block, _Compiled())

        return go


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setattr(launch, "_raw_stream", lambda device: 1234)
    jit = _Jit()
    return jit, launch.Launcher(jit)


def test_later_calls_launch_the_compiled_kernel_directly(stand_in):
    jit, kernel = stand_in
    x = torch.zeros(32)
    first = kernel[(4,)](x, 64, BLOCK=16, num_warps=4)
    assert len(jit.triton_calls) == 1 and first.runs == []
    again = kernel[(5, 2)](torch.ones(64), 64, BLOCK=16, num_warps=4)  # another tensor, same specialisation
    assert again is first and len(jit.triton_calls) == 1
    grid_and_stream, rest = again.runs[0][:4], again.runs[0][4:]
    assert grid_and_stream == (5, 2, 1, 1234)
    # function, metadata, no launch metadata or hooks, then every parameter in order, defaults included
    assert rest[:5] == ("fn", "meta", None, None, None)
    assert rest[5].shape == (64,) and rest[5][0] == 1 and rest[6:] == (64, 16, 0)
    kernel[(1,)](x, 80, BLOCK=16, num_warps=4)  # another multiple of 16 (a new position, a longer cache)
    assert len(jit.triton_calls) == 1 and first.runs[-1][-3:] == (80, 16, 0)
    kernel[(1,)](x, 81, BLOCK=16, num_warps=4)  # not a multiple of 16: Triton compiles it apart
    assert len(jit.triton_calls) == 2
    kernel[(1,)](x, 64, 16, FLAG=3)  # BLOCK positionally: another call shape, through Triton once
    kernel[(1,)](x, 64, 16, FLAG=3)
    assert len(jit.triton_calls) == 3 and first.runs[-1][-3:] == (64, 16, 3)
    kernel[(1,)](x, 64, 32, FLAG=3)  # a positional constexpr keyed by its value
    assert len(jit.triton_calls) == 4


def test_what_the_launcher_does_not_keep(stand_in, monkeypatch):
    jit, kernel = stand_in
    x = torch.zeros(32)
    for _ in range(2):
        kernel[(1,)](x_ptr=x, n=64, BLOCK=16)  # a tensor by keyword: keyed by identity, so not kept
    assert len(jit.triton_calls) == 2 and not kernel.kernels
    for _ in range(2):
        kernel[(1,)](x, 64, BLOCK=16, FLAG=[1])  # unhashable: Triton's (which would reject it)
    assert len(jit.triton_calls) == 4
    monkeypatch.setattr(launch, "MAX_KEPT", 3)
    for flag in range(5):
        kernel[(1,)](x, 64, BLOCK=16, FLAG=flag)
    assert len(kernel.kernels) == 2, "a full launcher starts afresh"


@pytest.mark.parametrize("change", ["alignment", "one", "width", "constexpr", "option", "dtype"])
def test_a_call_specialised_otherwise_goes_through_triton(stand_in, change):
    jit, kernel = stand_in
    x = torch.zeros(32)
    kernel[(1,)](x, 64, BLOCK=16, num_warps=4)
    args, kwargs = {
        "alignment": ((x[1:], 64), dict(BLOCK=16, num_warps=4)),
        "one": ((x, 1), dict(BLOCK=16, num_warps=4)),
        "width": ((x, 2**32), dict(BLOCK=16, num_warps=4)),
        "constexpr": ((x, 64), dict(BLOCK=32, num_warps=4)),
        "option": ((x, 64), dict(BLOCK=16, num_warps=8)),
        "dtype": ((x.half(), 64), dict(BLOCK=16, num_warps=4)),
    }[change]
    kernel[(1,)](*args, **kwargs)
    assert len(jit.triton_calls) == 2


def test_triton_runs_every_call_when_turned_off_hooked_changed_or_traced(stand_in, monkeypatch):
    jit, kernel = stand_in
    x = torch.zeros(32)

    def twice():
        for _ in range(2):
            kernel[(1,)](x, 64, BLOCK=16)

    monkeypatch.setattr(launch, "ENABLED", False)
    twice()
    assert len(jit.triton_calls) == 2
    monkeypatch.setattr(launch, "ENABLED", True)

    class Chain:  # Triton's hook chains
        def __init__(self, calls):
            self.calls = calls

    runtime = type("Runtime", (), {})()
    runtime.launch_enter_hook, runtime.launch_exit_hook = Chain([print]), Chain([])  # a profiler's hook
    monkeypatch.setattr(launch, "_RUNTIME", runtime)
    twice()
    runtime.launch_enter_hook, runtime.launch_exit_hook = Chain([]), print
    twice()
    assert len(jit.triton_calls) == 6
    runtime.launch_exit_hook = None
    namespace = {"SCALE": 2}
    jit.used_global_vals = {("SCALE", id(namespace)): (1, namespace)}  # changed since it compiled
    twice()
    assert len(jit.triton_calls) == 8
    namespace["SCALE"] = 1
    twice()
    assert len(jit.triton_calls) == 9 and len(jit.compiled[16].runs) == 1
    kernel[lambda meta: (1,)](x, 64, BLOCK=16)  # a grid computed from the arguments: Triton's
    assert len(jit.triton_calls) == 10
    monkeypatch.setattr(launch.torch.compiler, "is_compiling", lambda: True)  # torch.compile tracing
    twice()
    assert len(jit.triton_calls) == 12


def test_the_interpreters_kernels_are_not_launched_directly():
    # under TRITON_INTERPRET (as in these tests) triton.jit makes interpreted functions
    assert not triton_moe._moe_gemm_kernel.direct
    assert triton_moe._moe_gemm_kernel.fn.__name__ == "_moe_gemm_kernel"


def test_host_integer_helpers_equal_tritons():
    import triton

    for n in [*range(0, 70), 127, 128, 129, 4095, 4096, 4097, 2**31 - 1, 2**31, 2**40 + 3]:
        assert launch.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 128, 1000):
            assert launch.cdiv(n, d) == triton.cdiv(n, d), (n, d)
