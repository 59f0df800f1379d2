"""The attention experts' grouped GEMMs (map, reduce) at prefill sizes with A's rows loaded by
pointer, as the kernels run them, against the rows first gathered into padded sorted order
(`triton_moe.gather_rows`) and loaded through a tensor descriptor, as the SwiGLU gate/up GEMM does
from `GATHER_MIN_ROWS` assignments on.

    PYTHONPATH=.:bench python bench/moa_gather.py [--tokens 2048,4096,8192,16384]

JetMoE's shapes (8 experts, 2048 x 2048, top-2, random routing), each GEMM with the config the
JSON gives it. Times in us: `triton.testing.do_bench` (its mean, L2 flushed), the fastest of three:
pointer A; descriptor A on rows gathered beforehand (the GEMM alone); the gather alone; gather and
GEMM together. Floor: the GEMM's FLOPs at 797 TFLOP/s. The outputs of both ways are compared.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton.testing

from moetorch.ops import triton_moe as tm

E, D, K = 8, 2048, 2  # JetMoE: experts, model dim = attention-expert width, top-k


def best_us(fn) -> float:
    return min(triton.testing.do_bench(fn, warmup=25, rep=200) for _ in range(3)) * 1e3


def time_op(op: str, T: int, x, h, w, ids_N, route_w) -> str:
    """One GEMM at T tokens both ways: its line of output."""
    N, dev = T * K, x.device
    cfg = tm.get_config(op, E, D, D, x.dtype, T, N, dev)
    sorted_P, block_expert = tm.moe_align(ids_N, E, cfg["BLOCK_M"])
    out = torch.empty(N, D, device=dev, dtype=x.dtype)
    a, a_div = (x, K) if op == "map" else (h, 1)
    kw = {"route_w_N": route_w} if op == "reduce" else {}

    def gemm(rows, rows_div):
        return tm.moe_gemm(rows, w, out, sorted_P, block_expert, N, cfg, a_div=rows_div, **kw)

    def gather():
        return tm.gather_rows(a, sorted_P, N, a_div)

    gathered = gather()
    want = gemm(a, a_div).clone()
    diff = (gemm(gathered, 0).float() - want.float()).abs().max().item()
    times = {"pointer": best_us(lambda: gemm(a, a_div)), "descriptor": best_us(lambda: gemm(gathered, 0)),
             "gather": best_us(gather), "gather+descriptor": best_us(lambda: gemm(gather(), 0))}
    floor = 2 * N * D * D / 797e12 * 1e6
    return (f"{op:6s} T={T:6d} floor {floor:6.1f} us  " + "  ".join(f"{k} {v:6.1f}" for k, v in times.items())
            + f"  max diff {diff:.1e}  {cfg}")


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="2048,4096,8192,16384")
    args = p.parse_args()
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}; tensor descriptors: {tm.tma_enabled(dev)}", flush=True)
    for T in map(int, args.tokens.split(",")):
        x = torch.randn(T, D, device=dev, dtype=bf16)
        h = torch.randn(T * K, D, device=dev, dtype=bf16)
        w = torch.randn(E, D, D, device=dev, dtype=bf16) * 0.02
        ids_N = torch.stack([torch.randperm(E, device=dev)[:K] for _ in range(T)]).reshape(-1)
        route_w = torch.rand(T * K, device=dev, dtype=bf16)
        for op in ("map", "reduce"):
            print(time_op(op, T, x, h, w, ids_N, route_w), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
