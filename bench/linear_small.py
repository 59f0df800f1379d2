"""The small-row linear kernel (`ops.triton_fused.linear_small`) against torch's Linear, at the
decode projections and LM heads of both models, per row count and block configuration.

    PYTHONPATH=. python bench/linear_small.py --out r.json

Each case is timed as a CUDA-graph replay (decode runs that way) with `triton.testing.do_bench`
(median, L2 flushed): torch runs each layer's Linear in turn (cuBLAS, with its split-K reduction
kernels), ours one kernel for all of them. Floor: the weight bytes (+ rows in and out) over the
copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.runtime.errors
import triton.testing
from moe_layer import ceilings, graph_ms, save_json  # bench/ is the script's directory

from moetorch.ops import triton_fused

SHAPES = {  # name: (K, output sizes, bias)
    "phimoe.qkv": (4096, (4096, 1024, 1024), True),
    "phimoe.o": (4096, (4096,), True),
    "jetmoe.kv": (2048, (4096,), False),
    "phimoe.lm_head": (4096, (32064,), True),
    "jetmoe.lm_head": (2048, (32000,), False),
}
# the matrix-unit tile (16 rows), and for one row the CUDA-core GEMV (BLOCK_M 1)
CONFIGS = [dict(BLOCK_M=16, BLOCK_N=n, BLOCK_K=k, num_warps=4, num_stages=s)
           for n in (16, 32) for k in (128, 256) for s in (3, 4, 6)]
GEMV_CONFIGS = [dict(BLOCK_M=1, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
                for n in (4, 8, 16) for k in (256, 512, 1024) for w in (2, 4) for s in (3, 4)]


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="1,2,4,8,16")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    bw = ceilings()["copy_bytes_per_s"]
    result = {"device": torch.cuda.get_device_name(), "copy_bytes_per_s": bw, "rows": []}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name in args.shapes.split(","):
        K, outs, bias = SHAPES[name]
        layers = [torch.nn.Linear(K, n, bias=bias, device="cuda", dtype=torch.bfloat16) for n in outs]
        ws, bs = [lay.weight for lay in layers], [lay.bias for lay in layers]
        for M in map(int, args.rows.split(",")):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            floor_ms = (sum(ws_.numel() for ws_ in ws) * 2 + M * (K + sum(outs)) * 2) / bw * 1e3
            want = torch.cat([lay(x) for lay in layers], -1)
            torch_ms = graph_ms(lambda x=x, layers=layers: [lay(x) for lay in layers])
            default = triton_fused.linear_small_config(sum(outs), K, sms, M)
            timed = []
            for cfg in [default] + [c for c in CONFIGS + (GEMV_CONFIGS if M == 1 else []) if c != default]:
                try:
                    got = triton_fused.linear_small(x, ws, bs, cfg)
                except triton.runtime.errors.OutOfResources:
                    continue
                err = ((got.float() - want.float()).norm() / want.float().norm()).item()
                run = lambda x=x, ws=ws, bs=bs, cfg=cfg: triton_fused.linear_small(x, ws, bs, cfg)  # noqa: E731
                timed.append((graph_ms(run), cfg, err))
            best = min(timed, key=lambda t: t[0])
            row = {"shape": name, "M": M, "floor_ms": floor_ms, "torch_ms": torch_ms,
                   "default_ms": timed[0][0], "default_config": default, "default_rel_err": timed[0][2],
                   "best_ms": best[0], "best_config": best[1],
                   "pct_floor_torch": 100 * floor_ms / torch_ms, "pct_floor_default": 100 * floor_ms / timed[0][0],
                   "pct_floor_best": 100 * floor_ms / best[0]}
            result["rows"].append(row)
            print(f"{name:11s} M={M:2d} floor {floor_ms * 1e3:6.1f} us  torch {torch_ms * 1e3:6.1f} us "
                  f"({row['pct_floor_torch']:4.1f}%)  ours {timed[0][0] * 1e3:6.1f} us "
                  f"({row['pct_floor_default']:4.1f}%, err {timed[0][2]:.1e})  "
                  f"best {best[0] * 1e3:6.1f} us {best[1]}", flush=True)
    save_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
