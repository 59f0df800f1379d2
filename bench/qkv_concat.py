"""PhiMoE's q, k and v projections at prefill sizes: three cuBLAS GEMMs (with bias) against one
GEMM over the concatenated weights, concatenated once or on every call. Medians of
`triton.testing.do_bench` (L2 flushed), three each.

    python bench/qkv_concat.py
"""

import torch
import torch.nn.functional as F
from triton.testing import do_bench


def main() -> None:
    torch.manual_seed(0)
    D = 4096
    ws = [torch.randn(n, D, device="cuda", dtype=torch.bfloat16) * 0.02 for n in (4096, 1024, 1024)]
    bs = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for n in (4096, 1024, 1024)]
    w_cat, b_cat = torch.cat(ws), torch.cat(bs)
    for M in (2048, 8192):
        x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
        arms = (
            ("separate", lambda x=x: [F.linear(x, w, b) for w, b in zip(ws, bs)]),
            ("one GEMM, weights cat before", lambda x=x: F.linear(x, w_cat, b_cat)),
            ("one GEMM, weights cat per call", lambda x=x: F.linear(x, torch.cat(ws), torch.cat(bs))),
        )
        for name, fn in arms:
            ts = [do_bench(fn, warmup=20, rep=200, return_mode="median") for _ in range(3)]
            print(M, name, [round(t * 1e3, 1) for t in ts], "us")


if __name__ == "__main__":
    main()
