"""One token's SwiGLU experts read from pinned host memory in place (a decode step of a layer placed
on the CPU): the shipped block sizes against others, to see what reads the bus fastest. A JetMoE
(or PhiMoE) layer's experts in host memory, a random normed row and routing, each variant timed as
`--reps` calls back to back (a call takes milliseconds: launches do not count), in alternating rounds.

    PYTHONPATH=.:bench python bench/host_gemv_ab.py --model jetmoe --out r.json
"""

from __future__ import annotations

import argparse

import torch
from moe_layer import save_json  # bench/ is the script's directory

import moetorch
from moetorch.benchmark import SIZES, log
from moetorch.ops import moe, triton_moe
from moetorch.ops.activations import ACTIVATIONS
from moetorch.ops.host import host_mapped_parameter

# (gate/up changes, down changes) at one token; {} keeps the shipped entry
VARIANTS = {
    "shipped": ({}, {}),
    "gate_up GEMV, 4 columns": ({"GEMV": True, "BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 2}, {}),
    "gate_up GEMV, 2 columns": ({"GEMV": True, "BLOCK_N": 2, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 2}, {}),
    "gate_up 32 columns": ({"BLOCK_N": 32}, {}),
    "gate_up split x2": ({"SPLIT_K": "x2"}, {}),
    "down 2 columns": ({}, {"BLOCK_N": 2}),
    "down 8 columns": ({}, {"BLOCK_N": 8}),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/host_gemv_ab.py")
    p.add_argument("--model", default="jetmoe", choices=sorted(SIZES))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cfg = getattr(moetorch, {"jetmoe": "JetMoeConfig", "phimoe": "PhimoeConfig"}[args.model])(**SIZES[args.model])
    E, D, I, K = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, cfg.num_experts_per_tok
    torch.manual_seed(0)
    shapes = ((E, 2 * I, D), (E, D, I))
    like = (torch.nn.Parameter(torch.empty(*s, dtype=torch.bfloat16, device="meta"), False) for s in shapes)
    w13, w2 = (host_mapped_parameter(p) for p in like)
    for w in (w13, w2):
        w.data.normal_(0, 0.02)
    x = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
    ids = torch.randperm(E, device="cuda")[:K].view(1, K)
    weights = torch.softmax(torch.randn(1, K, device="cuda"), -1).to(torch.bfloat16)
    act = ACTIVATIONS["silu"]
    shipped_get = triton_moe.get_config
    shipped = (shipped_get("gate_up", E, I, D, torch.bfloat16, 1, K, x.device),
               shipped_get("down", E, D, I, torch.bfloat16, 1, K, x.device))

    def variant_get(changes):
        def get(op, *a, **k):
            c = dict(shipped_get(op, *a, **k))
            extra = dict(changes[0] if op == "gate_up" else changes[1])
            if extra.get("SPLIT_K") == "x2":
                extra["SPLIT_K"] = 2 * c.get("SPLIT_K", 1)
            return {**c, **extra}
        return get

    bytes_read = K * (2 * I * D + D * I) * 2
    times = {name: [] for name in VARIANTS}
    want = moe.experts_forward(x, w13, w2, ids, weights, act, "triton")
    errors = {}
    for _ in range(args.rounds):
        for name, changes in VARIANTS.items():
            triton_moe.get_config = variant_get(changes)
            try:
                got = moe.experts_forward(x, w13, w2, ids, weights, act, "triton")  # (compiles)
                errors[name] = ((got.float() - want.float()).norm() / want.float().norm()).item()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(args.reps):
                    moe.experts_forward(x, w13, w2, ids, weights, act, "triton")
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end) / args.reps)
            finally:
                triton_moe.get_config = shipped_get
    result = {"model": args.model, "device": torch.cuda.get_device_name(), "shipped": shipped,
              "bytes_read": bytes_read, "ms": times, "rel_err_vs_shipped": errors,
              "gb_per_s_best": {n: bytes_read / min(t) / 1e6 for n, t in times.items()}}
    for name, t in times.items():
        log(f"{name:28s} best {min(t):7.3f} ms  ({bytes_read / min(t) / 1e6:5.1f} GB/s)  rel err {errors[name]:.1e}")
    save_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
