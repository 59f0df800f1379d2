"""JetMoE prefill at 2048 and 8192 tokens, fused kernels on and off, timed twice each, then the CUDA
kernels of one 2048-token prefill: shows whether a prefill is GPU-bound (kernel time ~ wall time)
or waits on the host's launches.

    PYTHONPATH=. python bench/prefill_probe.py
"""

from collections import defaultdict
from functools import partial

import torch

from moetorch.benchmark import SIZES, build, cuda_time
from moetorch.ops import fused


@torch.no_grad()
def main() -> None:
    model = build("jetmoe", "moetorch", dict(SIZES["jetmoe"]))
    for T in (2048, 8192, 2048):
        ids = torch.randint(0, 32000, (1, T), device="cuda")
        for on in (True, False):
            with fused.forced(on):
                ts = [cuda_time(partial(model, ids, use_cache=False, logits_to_keep=1), repeats=5, warmup=2)
                      for _ in range(2)]
            print(T, "fused" if on else "torch", [round(T / t) for t in ts], flush=True)
    ids = torch.randint(0, 32000, (1, 2048), device="cuda")
    model(ids, use_cache=False, logits_to_keep=1)
    torch.cuda.synchronize()
    total, calls = defaultdict(float), defaultdict(int)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model(ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name[:80]] += ev.time_range.elapsed_us()
            calls[ev.name[:80]] += 1
    for name, us in sorted(total.items(), key=lambda x: -x[1])[:18]:
        print(f"{us:9.1f} x{calls[name]:<4d} {name}")


if __name__ == "__main__":
    main()
