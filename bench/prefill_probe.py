"""Where a prefill's time goes: tokens/s with the fused kernels on and off (timed twice each), then
the CUDA kernels of one prefill, summed by name, against its wall time. Kernel time close to the
wall time says the prefill is GPU-bound; far below it, that it waits on the host's launches.

    PYTHONPATH=. python bench/prefill_probe.py [--models jetmoe,phimoe] [--tokens 2048,8192]
                                               [--kernels 8192] [--top 25] [--no-compare]

With --kernels, also the forward's idle stretches on the GPU: their sum, the longest ones with the
kernels around them, and the CUDA runtime calls the host made (a cudaMalloc, cudaFree or a
synchronising call there would explain a stretch that the launches alone do not).
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from host_profile import queue_gpu_work

from moetorch.benchmark import SIZES, build, cuda_time, kernel_lines, kernel_times
from moetorch.ops import fused


def kernel_table(model, ids, top: int) -> list[str]:
    """One forward's kernels by total time, under a line with its wall time and their sum."""
    run = partial(model, ids, use_cache=False, logits_to_keep=1)
    wall = cuda_time(run, repeats=3, warmup=1)
    times = kernel_times(run)
    busy = sum(us for us, _ in times.values())
    return [f"# {ids.shape[1]} tokens: wall {wall * 1e6:.0f} us (median of 3), kernels {busy:.0f} us, "
            f"wall behind ~80 ms of queued GPU work {wall_behind(run) * 1e6:.0f} us (median of 3)",
            *kernel_lines(times, top), *idle_lines(run, top), *idle_lines(run, top, behind=True)]


def wall_behind(run) -> float:
    """Seconds from the forward's first to its last GPU work when it is launched behind ~80 ms of
    queued matmuls: the host has that long to run ahead of the device."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return cuda_time(run, repeats=3, warmup=0, before=partial(queue_gpu_work, a))


def idle_lines(run, top: int, behind: bool = False) -> list[str]:
    """One forward with host and GPU activity: the GPU's idle time between its first and last
    kernel, the longest idle stretches, and the host's CUDA runtime calls by total time. `behind`:
    the forward is launched behind ~80 ms of queued matmuls (left out of the stretches), so what
    idle remains is not the host's."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) if behind else None
    with torch.profiler.profile(activities=acts) as prof:
        if behind:
            queue_gpu_work(a)
        run()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = sorted((ev.time_range.start, ev.time_range.end, ev.name[:50]) for ev in events
                     if ev.device_type == torch.autograd.DeviceType.CUDA)
    if behind:  # the queued matmuls: the leading run of one kernel name (and cuBLAS's memsets)
        lead = next((i for i, k in enumerate(kernels) if k[2] not in (kernels[0][2], "Memset (Device)")),
                    len(kernels))
        kernels = kernels[lead:]
    gaps, end, before = [], kernels[0][1], kernels[0][2]
    for start, stop, name in kernels[1:]:
        if start > end:
            gaps.append((start - end, before, name))
        if stop > end:
            end, before = stop, name
    idle = sum(g for g, _, _ in gaps)
    lines = [f"# GPU idle {idle:.0f} us of {end - kernels[0][0]:.0f} us, in {len(gaps)} stretches"
             f"{' (behind queued work)' if behind else ''}; the longest:"]
    for lo, hi in ((0, 5), (5, 20), (20, 100), (100, float("inf"))):
        part = [g for g, _, _ in gaps if lo <= g < hi]
        lines.append(f"#   {lo}-{hi} us: {len(part)} stretches, {sum(part):.0f} us")
    lines += [f"{g:9.1f} us after {a} / before {b}" for g, a, b in sorted(gaps, reverse=True)[:top]]
    calls: dict[str, list[float]] = {}
    for ev in events:
        if ev.device_type == torch.autograd.DeviceType.CPU and ev.name.startswith("cu"):
            calls.setdefault(ev.name, []).append(ev.time_range.elapsed_us())
    lines.append("# host CUDA runtime calls: total us, count, longest us")
    for name, us in sorted(calls.items(), key=lambda x: -sum(x[1]))[:top]:
        lines.append(f"{sum(us):9.1f} x{len(us):<5d} {max(us):8.1f}  {name}")
    return lines


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="jetmoe")
    p.add_argument("--tokens", default="2048,8192", help="token counts timed with fused kernels on and off")
    p.add_argument("--kernels", default="2048", help="token counts whose kernels are listed")
    p.add_argument("--top", type=int, default=18)
    p.add_argument("--no-compare", action="store_true", help="skip the on/off timings")
    args = p.parse_args()
    for name in args.models.split(","):
        model = build(name, "moetorch", dict(SIZES[name]))
        V = model.config.vocab_size
        if not args.no_compare:
            for T in map(int, args.tokens.split(",")):
                ids = torch.randint(0, V, (1, T), device="cuda")
                for on in (True, False):
                    with fused.forced(on):
                        ts = [cuda_time(partial(model, ids, use_cache=False, logits_to_keep=1), repeats=5,
                                        warmup=2) for _ in range(2)]
                    print(name, T, "fused" if on else "torch", [round(T / t) for t in ts], flush=True)
        for T in map(int, args.kernels.split(",")):
            ids = torch.randint(0, V, (1, T), device="cuda")
            print(f"# {name}", flush=True)
            print("\n".join(kernel_table(model, ids, args.top)), flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
