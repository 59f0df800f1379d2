"""Where a decode step's time goes, per layer: the CUDA kernels of one eager decode step (torch
profiler, summed by kernel name) and the CUDA-graph step time at two layer counts, whose difference
is the cost of one layer. Random bf16 weights at the real layer sizes.

    PYTHONPATH=. python bench/profile_decode.py --out r.json

`--timeline`: instead, the kernels of one graph replay in launch order, each with its start
relative to the replay's first kernel, its duration and the gap after the previous kernel's end
(negative where programmatic dependent launch started it early), to see which kernel boundaries
cost what. `PYTHONPATH=. python bench/profile_decode.py --timeline --layers 4 --batches 1`
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch

from moetorch import StaticCache
from moetorch.benchmark import SIZES, build, cuda_time
from moetorch.engine import GraphedDecodeStep


def _step_fn(model, B: int, prompt: int, graphs: bool):
    cache = StaticCache(model.config, max_cache_len=prompt + 64)
    ids = torch.randint(0, model.config.vocab_size, (B, prompt), device="cuda")
    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    step = GraphedDecodeStep(model, cache, B, enabled=graphs)
    tok = ids[:, -1:].clone()  # each row its own token, as moetorch bench's decode driver feeds them
    pos = torch.full((B, 1), prompt, device="cuda")
    slot = torch.tensor([prompt], device="cuda")

    def run():
        cache.truncate(prompt)
        step(tok, None, pos, slot)

    return run


def cuda_events(run, steps: int, sync_each: bool) -> list:
    """The CUDA events of `steps` runs (after one unprofiled run), with a host sync after each run
    when `sync_each` (which separates the runs in time)."""
    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
            if sync_each:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
    return [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]


def kernel_table(run, steps: int = 3) -> list[tuple[str, float, int]]:
    total, count = defaultdict(float), defaultdict(int)
    for ev in cuda_events(run, steps, sync_each=False):
        total[ev.name] += ev.time_range.elapsed_us() / steps
        count[ev.name] += 1
    return sorted(((k[:90], v, count[k] // steps) for k, v in total.items()), key=lambda r: -r[1])


def timeline(run) -> list[dict]:
    """The kernels of one run (after an unprofiled one), in start order: name, start (us from the
    run's first kernel), duration, gap after the previous kernel's end. One run only: the host
    gaps inside a step (its input copies) can be longer than those between steps."""
    kernels = sorted((ev.time_range.start, ev.time_range.end, ev.name) for ev in cuda_events(run, 1, True))
    t0, prev_end, rows = kernels[0][0], kernels[0][0], []
    for start, end, name in kernels:
        rows.append({"name": name[:60], "start_us": round(start - t0, 2), "us": round(end - start, 2),
                     "gap_us": round(start - prev_end, 2)})
        prev_end = max(prev_end, end)
    return rows


@torch.no_grad()
def main_timeline(args) -> int:
    result = {"gpu": torch.cuda.get_device_name(), "models": {}}
    L = int(args.layers.split(",")[0])
    for name in args.models.split(","):
        model = build(name, "moetorch", dict(SIZES[name], num_hidden_layers=L))
        for B in (int(b) for b in args.batches.split(",")):
            rows = timeline(_step_fn(model, B, args.prompt, True))
            result["models"].setdefault(name, {})[B] = rows
            print(f"\n== {name} B={B}, {L} layers: graph replay {rows[-1]['start_us'] + rows[-1]['us']:.1f} us")
            for r in rows:
                print(f"  {r['start_us']:8.2f} {r['us']:7.2f} gap {r['gap_us']:6.2f}  {r['name']}")
        del model
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--layers", default="2,6")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--out", default=None)
    p.add_argument("--timeline", action="store_true")
    args = p.parse_args()
    if args.timeline:
        return main_timeline(args)
    lo, hi = (int(x) for x in args.layers.split(","))
    result = {"gpu": torch.cuda.get_device_name(), "models": {}}
    for name in args.models.split(","):
        entry = result["models"][name] = {}
        for B in (int(b) for b in args.batches.split(",")):
            times = {}
            for L in (lo, hi):
                cfg = dict(SIZES[name], num_hidden_layers=L)
                model = build(name, "moetorch", cfg)
                times[L] = cuda_time(_step_fn(model, B, args.prompt, True), repeats=20, warmup=3) * 1e6
                if L == lo:
                    table = kernel_table(_step_fn(model, B, args.prompt, False))
                del model
                torch.cuda.empty_cache()
            per_layer = (times[hi] - times[lo]) / (hi - lo)
            entry[B] = {"graph_step_us": times, "per_layer_us": per_layer,
                        "kernels_us_per_step": [{"name": n, "us": round(t, 2), "calls": c} for n, t, c in table]}
            kernel_sum = sum(t for _, t, _ in table)
            print(f"\n== {name} B={B}: graphed step {times} us, per layer {per_layer:.1f} us; "
                  f"eager kernels of a {lo}-layer step sum to {kernel_sum:.1f} us", flush=True)
            for n, t, c in table[:40]:
                print(f"  {t:8.1f} us  x{c:<4d} {n}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
