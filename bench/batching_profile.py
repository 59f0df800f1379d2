"""Where a continuous-batching run's time goes: one timed `generate_batch` under torch's profiler
(the loop's thread included), listing host and GPU time by op.

    PYTHONPATH=.:bench python bench/batching_profile.py [--model jetmoe] [--requests 64]
"""

from __future__ import annotations

import argparse
import time

import torch
from batching import gen_config, workload

from moetorch.benchmark import SIZES, build


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="jetmoe")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    cfg = dict(SIZES[args.model])
    model = build(args.model, "moetorch", cfg)
    prompts = workload(args.requests, 32, 512, cfg["vocab_size"])
    gen = gen_config("moetorch", args.new)
    model.generate_batch(prompts, generation_config=gen, persistent_manager=True)
    manager = model._cached_continuous_batching_manager
    manager.stats.update(decode_rows=[], prefill_tokens=[], shifts=0, alone=0,
                         decode_s=0.0, prefill_s=0.0)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        model.generate_batch(prompts, generation_config=gen, persistent_manager=True)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    st = manager.stats
    print(f"wall {wall:.2f} s; decode {st['decode_s']:.2f} s in {len(st['decode_rows'])} steps; prefill "
          f"{st['prefill_s']:.2f} s in {len(st['prefill_tokens'])} forwards: {sum(st['prefill_tokens'])} tokens")
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.top))
    print(ka.table(sort_by="self_cuda_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
