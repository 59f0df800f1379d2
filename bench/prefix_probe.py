"""Where a shared-prefix prefill's time goes: each prefill forward of the `system` workload of
`bench/prefix_sharing.py` (sharing on), timed with a device sync around the whole call and around
the model's forward inside it (the rest: building the packed inputs and their index tensors).

    PYTHONPATH=.:bench python bench/prefix_probe.py --out r.txt [--model jetmoe] [--kernels]

With --kernels instead: three forwards alone, each timed (wall, median of 3) and its CUDA kernels
summed under the profiler: a plain forward over one prompt, the manager's prefill of that prompt
into a row of its cache, and a prefill of 17 prompts that start from a shared prefix of `--system`
tokens. Kernel time far below the wall time says the forward waits on the host.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from prefix_sharing import gen, system_workload

from moetorch.benchmark import SIZES, build, cuda_time, kernel_lines, kernel_times, log


@torch.no_grad()
def kernels(model, prompts: list[list[int]], prefix: int, rows: int = 17, top: int = 12) -> list[str]:
    from moetorch.engine.batching import _Batch

    batch = _Batch(model, rows=rows + 2, slots=max(map(len, prompts)) + 64, graphs=False, share=True)
    batch.col = max(map(len, prompts))
    batch.prefill([prompts[0]], [0])
    start = batch.col - len(prompts[0])
    group = prompts[1:rows + 1]
    cases = {
        "plain forward, 1 prompt": lambda: model(torch.tensor([prompts[0]], device="cuda"), use_cache=False,
                                                 logits_to_keep=1),
        "manager prefill, 1 prompt": lambda: batch.prefill([prompts[0]], [rows + 1]),
        f"manager prefill, {rows} prompts from a shared prefix": lambda: batch.prefill(
            group, list(range(1, rows + 1)), [(0, start, prefix)] * rows),
    }
    lines = []
    for name, fn in cases.items():
        wall = cuda_time(fn, repeats=3, warmup=1)
        times = kernel_times(fn)
        busy = sum(us for us, _ in times.values())
        lines.append(f"{name}: wall {1e3 * wall:.2f} ms, kernels {busy / 1e3:.2f} ms in "
                     f"{sum(n for _, n in times.values())} launches")
        lines += ["  " + x for x in kernel_lines(times, top)]
    return lines


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="jetmoe")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--system", type=int, default=1024)
    p.add_argument("--question", default="32:128")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--kernels", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from moetorch.engine import batching
    from moetorch.engine.batching import WorkloadHints

    cfg = dict(SIZES[args.model])
    model = build(args.model, "moetorch", cfg)
    prompts = system_workload(args, cfg["vocab_size"])[0]
    if args.kernels:
        text = "\n".join(kernels(model, prompts, args.system))
        log("\n" + text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return 0
    calls = []
    original, forward = batching._Batch.prefill, model.forward

    def timed_forward(*a, **kw):
        if not calls or "total_s" in calls[-1]:  # a decode step (or its capture): not timed
            return forward(*a, **kw)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = forward(*a, **kw)
        torch.cuda.synchronize()
        calls[-1]["forward_s"] = time.perf_counter() - t0
        return out

    def timed_prefill(self, prompts, rows, shared=None):
        torch.cuda.synchronize()
        shared = shared or [(0, 0, 0)] * len(prompts)
        calls.append({"rows": len(prompts), "P": max(s[2] for s in shared),
                      "S": max(len(q) - s[2] for q, s in zip(prompts, shared))})
        t0 = time.perf_counter()
        out = original(self, prompts, rows, shared)
        torch.cuda.synchronize()
        calls[-1]["total_s"] = time.perf_counter() - t0
        return out

    batching._Batch.prefill = timed_prefill
    model.forward = timed_forward
    longest = max(map(len, prompts))
    cb = {"max_cache_len": -(-(longest + args.new) // 256) * 256}
    lines = []
    hints = WorkloadHints(longest, args.new, len(prompts))
    for rnd in range(2):
        calls.clear()
        with model.continuous_batching_context_manager(gen(args.new), continuous_batching_config=cb,
                                                       workload_hints=hints) as m:
            t0 = time.perf_counter()
            ids = [m.add_request(q) for q in prompts]
            for rid in ids:
                m.get_result(rid, timeout=600)
            wall = time.perf_counter() - t0
            st = m.stats
        lines.append(f"round {rnd}: {wall:.2f} s; prefill {st['prefill_s']:.2f} s, decode {st['decode_s']:.2f} s; "
                     f"{len(calls)} prefill calls: total {sum(c['total_s'] for c in calls):.3f} s, forwards "
                     f"{sum(c['forward_s'] for c in calls):.3f} s")
        for c in calls:
            lines.append(f"  rows {c['rows']:4d} P {c['P']:5d} S {c['S']:5d}: {1e3 * c['total_s']:8.2f} ms, forward "
                         f"{1e3 * c['forward_s']:8.2f} ms")
        model.destroy_cached_continuous_batching_manager()
    text = "\n".join(lines)
    log("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
