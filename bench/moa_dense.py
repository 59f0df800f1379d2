"""cuBLAS on the attention experts' shapes taken densely over all experts: what a dense GEMM of the
same bytes reaches, beside the grouped kernels (`bench/decode_chain.py --ops jetmoe.map,jetmoe.reduce`).

    PYTHONPATH=.:bench python bench/moa_dense.py [--rows 8,16,32,64,128] [--links 8]

At 8 tokens and more a JetMoE layer's map and reduce touch (nearly) all 8 experts, so their bytes
equal those of one dense GEMM over all experts at once: map [T, 2048] x [2048, 8 x 2048] (every
token by every expert, a superset of the outputs) and reduce [T, 8 x 2048] x [8 x 2048, 2048]. Each
is timed as a CUDA graph of `--links` GEMMs, each on its own weights (from HBM, as decode reads
them), against its floor: weight bytes over the copy rate measured in the same run.
"""

from __future__ import annotations

import argparse
import sys

import torch
from moe_layer import ceilings, graph_ms  # bench/ is the script's directory

E, D, C = 8, 2048, 2048  # JetMoE: experts, model dim, attention-expert width


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="8,16,32,64,128")
    p.add_argument("--links", type=int, default=8)
    args = p.parse_args()
    bw = ceilings()["copy_bytes_per_s"]
    print(f"# {torch.cuda.get_device_name()}, copy {bw / 1e12:.2f} TB/s, graphs of {args.links} GEMMs", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = {"map [T,2048]x[2048,8*2048]": (D, E * C), "reduce [T,8*2048]x[8*2048,2048]": (E * C, D)}
    for T in map(int, args.rows.split(",")):
        for name, (k_dim, n_out) in shapes.items():
            xs = [torch.randn(T, k_dim, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(args.links)]
            ws = [torch.randn(n_out, k_dim, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
                  for _ in range(args.links)]
            fns = [lambda x=x, w=w: torch.mm(x, w.t()) for x, w in zip(xs, ws)]
            ms = graph_ms(lambda fns=fns: [fn() for fn in fns], warmup=5, rep=40)
            if ms is None:
                continue
            us = ms * 1e3 / args.links
            floor_us = n_out * k_dim * 2 / bw * 1e6
            pct = 100 * floor_us / us
            print(f"T={T:4d} {name:32s} {us:6.1f} us  floor {floor_us:5.1f} us  {pct:5.1f}%", flush=True)
            del xs, ws, fns
    return 0


if __name__ == "__main__":
    sys.exit(main())
