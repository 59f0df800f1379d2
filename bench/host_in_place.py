"""Expert weights in host memory: read in place by the expert kernels, or copied to the GPU first?
A model built at the real size into a placement with layers on the CPU (bench/host_mapped.py), a
forward of T tokens (batch 1, no cache) timed under the shipped rule (`ops.moe.reads_host_in_place`),
always in place, and always copied.

    PYTHONPATH=.:bench python bench/host_in_place.py --model jetmoe --gpu-budget 8GiB --out r.json
"""

from __future__ import annotations

import argparse

import torch
from host_mapped import build_placed  # bench/ is the script's directory
from moe_layer import save_json

from moetorch.benchmark import cuda_time, kernel_lines, kernel_times, log
from moetorch.ops import moe


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/host_in_place.py")
    p.add_argument("--model", default="jetmoe")
    p.add_argument("--gpu-budget", default="8GiB")
    p.add_argument("--tokens", default="1,2,3,4,5,8,16,64")
    p.add_argument("--kernels", action="store_true", help="also profile one token's forward (the expert kernels)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    model, planned = build_placed(args.model, "sequential", {0: args.gpu_budget, "cpu": "200GiB"})
    result = {"model": args.model, "device": torch.cuda.get_device_name(), "gpu_budget": args.gpu_budget,
              "layers_placed_on_cpu": sum(v.type == "cpu" and ".layers." in k for k, v in planned.items()),
              "rule_share": moe.HOST_DIRECT_MAX_SHARE, "forward_ms": {}}
    shipped = moe.HOST_DIRECT_MAX_SHARE
    for T in [int(t) for t in args.tokens.split(",")]:
        ids = torch.randint(0, model.config.vocab_size, (1, T), device="cuda")
        row = {}
        for arm, share in (("rule", shipped), ("in_place", 1.0), ("copied", -1.0)):
            moe.HOST_DIRECT_MAX_SHARE = share
            try:
                row[arm] = cuda_time(lambda: model(ids, logits_to_keep=1), repeats=3, warmup=1) * 1e3  # noqa: B023
            finally:
                moe.HOST_DIRECT_MAX_SHARE = shipped
        result["forward_ms"][T] = row
        log(f"T={T}: rule {row['rule']:.1f} ms, in place {row['in_place']:.1f}, copied {row['copied']:.1f}")
    if args.kernels:  # one token's forward under the profiler, with and without the split by expert
        from moetorch.ops import triton_moe

        ids = torch.randint(0, model.config.vocab_size, (1, 1), device="cuda")
        for split in (1, 0):
            triton_moe.SPLIT_BY_EXPERT = split
            try:
                ms = cuda_time(lambda: model(ids, logits_to_keep=1), repeats=3, warmup=1) * 1e3  # noqa: B023
                lines = kernel_lines(kernel_times(lambda: model(ids, logits_to_keep=1)), 10)  # noqa: B023
            finally:
                triton_moe.SPLIT_BY_EXPERT = 1
            result[f"one_token_split_by_expert_{split}"] = {"ms": ms, "kernels": lines}
            log(f"T=1, SPLIT_BY_EXPERT={split}: {ms:.1f} ms\n" + "\n".join(lines))
    save_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
