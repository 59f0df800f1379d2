"""Host cost of one expert GEMM launch, with the GPU busy ahead (so only the host is timed):
`triton_moe.moe_gemm` (config, descriptors, PDL flags, then the launch) with moetorch's launcher
(`ops.launch`) and with Triton's launch path (`launch.ENABLED = False`); then the kernel launched
three ways: through Triton (`kernel[grid](...)`: argument binding, specialization, cache lookup),
through moetorch's launcher (its own key, then the compiled kernel), and the compiled kernel's
runner alone (`compiled[grid](...)`). Checks that all three write the same output.

    PYTHONPATH=. python bench/launch_cost.py [--profile N]

`--profile N` also prints the N functions with the most host time (cProfile, own time) over 300
`moe_gemm` calls, and times the Triton launch with fresh tensor descriptors each call (as
`moe_gemm` makes them) against reused ones.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from moetorch.ops import launch as fast
from moetorch.ops import triton_moe as tm

T, K, E, D, I = 2048, 2, 8, 2048, 5632  # JetMoE's gate/up GEMM at a 2048-token prefill


def per_call_us(fn, busy: torch.Tensor, n: int = 300) -> float:
    """Host microseconds per call of `fn`, launched behind queued matmuls."""
    fn()
    torch.cuda.synchronize()
    for _ in range(6):
        torch.matmul(busy, busy)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    return us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=int, default=0, metavar="N")
    opts = parser.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(T, D, device=dev, dtype=dt)
    ids = torch.randint(0, E, (T, K), device=dev)
    w13 = torch.randn(E, 2 * I, D, device=dev, dtype=dt) * 0.02
    cfg = tm.get_config("gate_up", E, I, D, dt, T, T * K, dev)
    sorted_P, blocks_B = tm.moe_align(ids.view(-1), E, cfg["BLOCK_M"])
    h = torch.empty(sorted_P.numel(), I, device=dev, dtype=dt)
    busy = torch.randn(8192, 8192, device=dev, dtype=dt)

    def full():
        tm.moe_gemm(x, w13, h, sorted_P, blocks_B, T * K, cfg, a_div=K, out_padded=True, n_out=I, act="silu")

    # the kernel launch that moe_gemm makes, recorded
    launch, kernel = {}, tm._moe_gemm_kernel

    class Record:
        def __getitem__(self, grid):
            def go(*args, **kwargs):
                launch.update(grid=grid, args=args, kwargs=kwargs)
                return kernel[grid](*args, **kwargs)
            return go

    tm._moe_gemm_kernel = Record()
    try:
        full()
    finally:
        tm._moe_gemm_kernel = kernel
    grid, args, kwargs = launch["grid"], launch["args"], launch["kwargs"]
    compiled = kernel[grid](*args, **kwargs)
    # the runner takes every parameter in order, constexprs included, and a 3-d grid
    every = list(args) + [kwargs[name] for name in kernel.arg_names[len(args):]]
    runner = compiled[tuple(grid) + (1,) * (3 - len(grid))]

    def via_jit():
        kernel.jit[grid](*args, **kwargs)

    def via_launcher():
        kernel[grid](*args, **kwargs)

    def full_via_triton():
        fast.ENABLED = False
        try:
            full()
        finally:
            fast.ENABLED = True

    def via_runner():
        runner(*every)

    def fresh_descriptors():  # the recorded launch, with descriptors made anew as moe_gemm makes them
        renewed = [tm._tma_descriptor(a.base, list(a.block_shape)) if type(a).__name__ == "TensorDescriptor" else a
                   for a in args]
        kernel.jit[grid](*renewed, **kwargs)

    runs = [("moe_gemm()", full), ("moe_gemm(), Triton's", full_via_triton), ("kernel[grid](...)", via_jit),
            ("launcher[grid](...)", via_launcher), ("compiled[grid](...)", via_runner)]
    if opts.profile:
        runs.append(("kernel[grid], new descs", fresh_descriptors))
    for name, fn in runs:
        print(f"{name:22s} {min(per_call_us(fn, busy) for _ in range(3)):7.1f} us", flush=True)
    if opts.profile:
        prof = cProfile.Profile()
        torch.cuda.synchronize()
        for _ in range(6):
            torch.matmul(busy, busy)
        prof.enable()
        for _ in range(300):
            full()
        prof.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(opts.profile)
        print(out.getvalue())
    outputs = []
    for fn in (via_jit, via_launcher, via_runner):
        h.zero_()
        fn()
        outputs.append(h.clone())
    torch.cuda.synchronize()
    print("same output:", all(torch.equal(outputs[0], o) for o in outputs[1:]))


if __name__ == "__main__":
    main()
