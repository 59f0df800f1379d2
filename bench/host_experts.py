"""Probe: can the Triton expert kernels read expert weights held in pinned host memory (zero-copy
over PCIe, CUDA's unified addressing), and at what rate? PhiMoE / JetMoE expert sizes, bf16.

    PYTHONPATH=. python bench/host_experts.py --out r.json
"""
import argparse
import json
import time

import torch


def timed(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3  # us


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--tokens", default="1,8,64,512,4096")
    args = ap.parse_args()
    import torch.nn.functional as F

    from moetorch.ops import moe

    out = {"device": torch.cuda.get_device_name(), "rows": []}
    # raw triton read of a pinned buffer
    import triton
    import triton.language as tl

    @triton.jit
    def _sum_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.atomic_add(y_ptr, tl.sum(v))

    n = 1 << 28  # 512 MB of bf16
    for where in ("cuda", "pinned"):
        t0 = time.time()
        x = torch.ones(n, dtype=torch.bfloat16, device="cuda") if where == "cuda" else \
            torch.ones(n, dtype=torch.bfloat16).pin_memory()
        alloc = time.time() - t0
        y = torch.zeros(1, device="cuda")
        try:
            us = timed(lambda x=x, y=y: _sum_kernel[(triton.cdiv(n, 4096),)](x, y, n, BLOCK=4096), reps=5)
            out["rows"].append({"raw_read": where, "us": us, "GB/s": 2 * n / us / 1e3, "alloc_s": alloc,
                                "sum_ok": bool(abs(y.item() / 6 - n) < 1e-3 * n)})
        except Exception as e:  # noqa: BLE001
            out["rows"].append({"raw_read": where, "error": repr(e)[:400]})
        print(out["rows"][-1], flush=True)
        del x

    shapes = {"phimoe": (16, 2, 4096, 6400), "jetmoe": (8, 2, 2048, 5632)}
    for name, (E, K, D, I) in shapes.items():
        w13 = torch.randn(E, 2 * I, D, dtype=torch.bfloat16, device="cuda") * 0.02
        w2 = torch.randn(E, D, I, dtype=torch.bfloat16, device="cuda") * 0.02
        w13h, w2h = w13.cpu().pin_memory(), w2.cpu().pin_memory()
        for T in [int(t) for t in args.tokens.split(",")]:
            x = torch.randn(T, D, dtype=torch.bfloat16, device="cuda")
            ids = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)])
            wts = torch.rand(T, K, device="cuda", dtype=torch.bfloat16)
            row = {"model": name, "T": T}
            ref = moe.experts_forward(x, w13, w2, ids, wts, F.silu, backend="triton")
            def run(a, b, x=x, ids=ids, wts=wts):
                return moe.experts_forward(x, a, b, ids, wts, F.silu, backend="triton")

            row["device_us"] = timed(lambda: run(w13, w2))  # noqa: B023
            try:
                got = moe.experts_forward(x, w13h, w2h, ids, wts, F.silu, backend="triton")
                row["rel_diff"] = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                row["host_us"] = timed(lambda: run(w13h, w2h), reps=5)  # noqa: B023
                touched = ids.unique().numel() * (w13[0].numel() + w2[0].numel()) * 2
                row["touched_MB"] = touched / 1e6
                row["host_GB/s"] = touched / row["host_us"] / 1e3
            except Exception as e:  # noqa: BLE001
                row["error"] = repr(e)[:600]
            out["rows"].append(row)
            print(row, flush=True)
    if args.out:
        json.dump(out, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
