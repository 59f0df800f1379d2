"""One token's SwiGLU experts as one kernel: gate/up and down without a kernel boundary between.

At batch-1 decode the expert MLP is two dependent GEMVs (gate/up, then down), and each dependent
step costs about 3 us beyond its bytes (`bench/persistent_chain.py`). The down projection is
linear in the hidden activations, so a program that owns a slice of an expert's hidden units can
finish its own share of the down GEMV at once: it computes h = act(gate) * up for its slice, then
W_down[:, slice] @ h, weighted by the routing weight, and adds that partial [D] vector into a
float32 accumulator with atomic adds. No program waits for another; the next kernel (the next
norm, which adds the delta to the residual) reads the accumulator and zeroes it for the next use.

Arms, each as L layers back to back in one CUDA graph, each layer on its own weights and experts,
with a one-program hand-off kernel between layers standing in for the next norm (it reads the
layer's output, normalises it and, for the fused arm, zeroes the accumulator):
- `two_kernels`: `triton_moe.experts_fused(..., combine=False)` at one token, as decode runs it
  (the alignment-free gate/up kernel, then the down GEMV summing the K terms in registers);
- `fused`: this file's kernel, the best of its configurations (`--configs`).

    PYTHONPATH=.:bench python bench/fused_mlp.py [--layers 8] [--models jetmoe,phimoe] --out r.json

Measured (H200, us a layer, hand-off included; floor = the two experts' weight bytes at the copy
rate: JetMoE 32.4, PhiMoE 73.6): the two kernels 40.6 and 80.5. Fused on the CUDA cores 52.5 and
102.3 (`results/h200-2026-11-30-fused-mlp-cuda-cores.json`; storing the partials instead of adding
them changed little, so the atomics are not what costs); on the matrix units 46.2 and 91.1
(`-fused-mlp-mma.json`): a slice's W_down columns are 64-byte pieces of rows 11-13 KB apart. With
W_down transposed, so that a slice's rows are contiguous, 40.8 and 80.7 (`-fused-mlp-mma-wt.json`):
level with the two kernels. One boundary fewer buys nothing here; the programs' switch from the
first GEMV's stream to the second costs what the kernel boundary did.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl
from moe_layer import ceilings, graph_ms, save_json  # bench/ is the script's directory

from moetorch.ops import triton_moe
from moetorch.ops.triton_moe import _activate, _pdl_release, _pdl_start, pdl_meta

MODELS = {"jetmoe": dict(E=8, D=2048, I=5632), "phimoe": dict(E=16, D=4096, I=6400)}
K = 2


@triton.jit
def _mlp_gemv_kernel(
    x_ptr, w13_ptr, w2_ptr, acc_ptr, ids_ptr, rw_ptr, D, I,
    SUM_K: tl.constexpr, TRANS: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    # Program (k, slice) (or, with SUM_K, (slice) for both of the token's K = 2 experts): the hidden
    # units [slice * BLOCK_I, +BLOCK_I) of expert ids[k]: h = silu(W_gate x) * (W_up x), rounded to
    # bf16 as the two-kernel path stores it, times the routing weight; then acc += W_down[:, units] h
    # by atomic adds, BLOCK_D outputs at a time. w13 [E, 2I, D]; w2 [E, D, I], or with TRANS its
    # transpose [E, I, D] (a slice's down weights contiguous). ATOMIC=0 (timing only): each program
    # stores its partial to acc[pid] instead.
    _pdl_start(PDL)
    slices = I // BLOCK_I
    pid = tl.program_id(0)
    s = pid % slices
    k = 0 if SUM_K else pid // slices
    units = s * BLOCK_I + tl.arange(0, BLOCK_I)
    kk = tl.arange(0, BLOCK_K)
    dd = tl.arange(0, BLOCK_D)
    e0 = tl.load(ids_ptr + k).to(tl.int64)
    e1 = tl.load(ids_ptr + 1).to(tl.int64)
    rows0 = w13_ptr + e0 * 2 * I * D + units.to(tl.int64)[:, None] * D
    rows1 = w13_ptr + e1 * 2 * I * D + units.to(tl.int64)[:, None] * D
    g0 = tl.zeros((BLOCK_I, BLOCK_K), dtype=tl.float32)
    u0 = tl.zeros((BLOCK_I, BLOCK_K), dtype=tl.float32)
    g1 = tl.zeros((BLOCK_I, BLOCK_K), dtype=tl.float32)
    u1 = tl.zeros((BLOCK_I, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        a = tl.load(x_ptr + k0 + kk).to(tl.float32)[None, :]
        g0 += tl.load(rows0 + k0 + kk[None, :]).to(tl.float32) * a
        u0 += tl.load(rows0 + I * D + k0 + kk[None, :]).to(tl.float32) * a
        if SUM_K:
            g1 += tl.load(rows1 + k0 + kk[None, :]).to(tl.float32) * a
            u1 += tl.load(rows1 + I * D + k0 + kk[None, :]).to(tl.float32) * a
    _pdl_release(PDL)
    h0 = (_activate(tl.sum(g0, axis=1), "silu") * tl.sum(u0, axis=1)).to(tl.bfloat16).to(tl.float32)
    h0 = h0 * tl.load(rw_ptr + k).to(tl.float32)
    h1 = (_activate(tl.sum(g1, axis=1), "silu") * tl.sum(u1, axis=1)).to(tl.bfloat16).to(tl.float32)
    h1 = h1 * tl.load(rw_ptr + 1).to(tl.float32)
    if TRANS:
        down0 = w2_ptr + e0 * D * I + units.to(tl.int64)[:, None] * D
        down1 = w2_ptr + e1 * D * I + units.to(tl.int64)[:, None] * D
    else:
        down0 = w2_ptr + e0 * D * I + units[None, :]
        down1 = w2_ptr + e1 * D * I + units[None, :]
    out = acc_ptr if ATOMIC else acc_ptr + pid.to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        if TRANS:
            part = tl.sum(tl.load(down0 + d0 + dd[None, :]).to(tl.float32) * h0[:, None], axis=0)
            if SUM_K:
                part += tl.sum(tl.load(down1 + d0 + dd[None, :]).to(tl.float32) * h1[:, None], axis=0)
        else:
            d = (d0 + dd).to(tl.int64)[:, None] * I
            part = tl.sum(tl.load(down0 + d).to(tl.float32) * h0[None, :], axis=1)
            if SUM_K:
                part += tl.sum(tl.load(down1 + d).to(tl.float32) * h1[None, :], axis=1)
        if ATOMIC:
            tl.atomic_add(out + d0 + dd, part, sem="relaxed")
        else:
            tl.store(out + d0 + dd, part)


@triton.jit
def _mlp_mma_kernel(
    x_ptr, w13_ptr, w2_ptr, acc_ptr, ids_ptr, rw_ptr, D, I,
    BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, TRANS: tl.constexpr, UPCAST: tl.constexpr,
    PDL: tl.constexpr,
):
    # The same work on the matrix units, as `triton_moe._moe_small_kernel` runs one token's gate/up:
    # a program owns hidden units [pid * BLOCK_I, +BLOCK_I) of both experts; row k of a 16-row tile
    # is assignment k (rows 2..15 zero). Phase 1: gate and up over D, one flat loop over (expert,
    # K step). Phase 2: per BLOCK_D outputs, both experts' h rows times their W_down[:, units] tiles,
    # summed over rows, added into acc.
    _pdl_start(PDL)
    pid = tl.program_id(0)
    m = tl.arange(0, 16)
    row_ok = m < 2
    units = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    kk = tl.arange(0, BLOCK_K)
    steps = D // BLOCK_K
    acc = tl.zeros((16, BLOCK_I), dtype=tl.float32)
    acc_up = tl.zeros((16, BLOCK_I), dtype=tl.float32)
    for step in range(2 * steps):
        j = step // steps
        k0 = (step - j * steps) * BLOCK_K
        expert = tl.load(ids_ptr + j).to(tl.int64)
        a = tl.load(x_ptr + k0 + kk[None, :] + m[:, None] * 0, mask=(m == j)[:, None], other=0.0)
        w_ptrs = w13_ptr + expert * 2 * I * D + units.to(tl.int64)[None, :] * D + (k0 + kk)[:, None]
        w = tl.load(w_ptrs)
        w_up = tl.load(w_ptrs + I * D)
        if UPCAST:  # the CPU interpreter multiplies bf16 wrongly
            a, w, w_up = a.to(tl.float32), w.to(tl.float32), w_up.to(tl.float32)
        acc = tl.dot(a, w, acc)
        acc_up = tl.dot(a, w_up, acc_up)
    _pdl_release(PDL)
    rw = tl.load(rw_ptr + m, mask=row_ok, other=0.0).to(tl.float32)
    h = (_activate(acc, "silu") * acc_up).to(tl.bfloat16).to(tl.float32) * rw[:, None]
    h0 = tl.where((m == 0)[:, None], h, 0.0).to(tl.bfloat16)
    h1 = tl.where((m == 1)[:, None], h, 0.0).to(tl.bfloat16)
    e0 = tl.load(ids_ptr).to(tl.int64)
    e1 = tl.load(ids_ptr + 1).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    if TRANS:  # w2 [E, I, D]: a slice's rows contiguous
        down0 = w2_ptr + e0 * D * I + units.to(tl.int64)[:, None] * D
        down1 = w2_ptr + e1 * D * I + units.to(tl.int64)[:, None] * D
    else:
        down0 = w2_ptr + e0 * D * I + units[:, None]
        down1 = w2_ptr + e1 * D * I + units[:, None]
    for d0 in range(0, D, BLOCK_D):
        if TRANS:
            d = d0 + dd[None, :]
        else:
            d = (d0 + dd).to(tl.int64)[None, :] * I
        w0 = tl.load(down0 + d)
        w1 = tl.load(down1 + d)
        if UPCAST:
            y = tl.dot(h0.to(tl.float32), w0.to(tl.float32))
            y = tl.dot(h1.to(tl.float32), w1.to(tl.float32), y)
        else:
            y = tl.dot(h0, w0)
            y = tl.dot(h1, w1, y)
        tl.atomic_add(acc_ptr + d0 + dd, tl.sum(y, axis=0), sem="relaxed")


@triton.jit
def _handoff_kernel(src_ptr, dst_ptr, D, BLOCK: tl.constexpr, FROM_ACC: tl.constexpr, PDL: tl.constexpr):
    # the next norm's stand-in: dst = src / rms(src) in bf16; a float32 accumulator is zeroed
    _pdl_start(PDL)
    d = tl.arange(0, BLOCK)
    ok = d < D
    v = tl.load(src_ptr + d, mask=ok, other=0.0).to(tl.float32)
    if FROM_ACC:
        tl.store(src_ptr + d, tl.zeros((BLOCK,), dtype=tl.float32), mask=ok)
    rms = tl.sqrt(tl.sum(v * v, axis=0) / D + 1e-6)
    tl.store(dst_ptr + d, (v / rms).to(tl.bfloat16), mask=ok)


def handoff(src: torch.Tensor, dst: torch.Tensor) -> None:
    D = dst.numel()
    _handoff_kernel[(1,)](src, dst, D, BLOCK=triton.next_power_of_2(D), FROM_ACC=src.dtype == torch.float32,
                          num_warps=8, **pdl_meta(dst.device, 1, 1))


def fused(x, w13, w2, acc, ids, rw, cfg: dict, atomic: bool = True) -> None:
    """One token's experts into the float32 accumulator acc [D] (zero before); w2 [E, D, I], or its
    transpose [E, I, D] where cfg["TRANS"]."""
    E, I2, D = w13.shape
    if cfg.get("MMA"):
        _mlp_mma_kernel[(I2 // 2 // cfg["BLOCK_I"],)](
            x, w13, w2, acc, ids, rw, D, I2 // 2, BLOCK_I=cfg["BLOCK_I"], BLOCK_K=cfg["BLOCK_K"],
            BLOCK_D=cfg["BLOCK_D"], TRANS=cfg["TRANS"] == 3, UPCAST=x.device.type == "cpu", num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], **pdl_meta(x.device))
        return
    slices = I2 // 2 // cfg["BLOCK_I"]
    grid = (slices if cfg["SUM_K"] else K * slices,)
    _mlp_gemv_kernel[grid](x, w13, w2, acc, ids, rw, D, I2 // 2, SUM_K=cfg["SUM_K"], TRANS=cfg["TRANS"],
                           ATOMIC=int(atomic), BLOCK_I=cfg["BLOCK_I"], BLOCK_K=cfg["BLOCK_K"],
                           BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                           **pdl_meta(x.device))


# (BLOCK_I, BLOCK_K, BLOCK_D, num_warps) for each down-weight layout
SHAPES = {0: ((8, 512, 256, 4), (16, 256, 256, 4), (16, 512, 128, 8), (32, 128, 128, 4), (32, 256, 128, 8),
              (64, 128, 64, 8), (64, 64, 64, 4)),
          1: ((8, 512, 512, 4), (16, 256, 256, 4), (16, 512, 512, 8), (32, 128, 256, 4), (32, 256, 256, 8),
              (64, 128, 128, 8), (64, 64, 128, 4))}


def configs(D: int, I: int) -> list[dict]:
    out = []
    for trans, shapes in SHAPES.items():
        for bi, bk, bd, warps in shapes:
            if I % bi or D % bk or D % bd:
                continue
            for sum_k in (0, 1):
                for stages in (2, 3):
                    out.append(dict(TRANS=trans, BLOCK_I=bi, BLOCK_K=bk, BLOCK_D=bd, num_warps=warps,
                                    num_stages=stages, SUM_K=sum_k))
    for bi in (16, 32, 64):
        for bk in (128, 256, 512):
            for bd in (64, 128, 256):
                for stages in (3, 4):
                    for trans in (2, 3):
                        if I % bi == 0 and bi * bk <= 16384 and bi * bd <= 16384:
                            out.append(dict(MMA=1, TRANS=trans, BLOCK_I=bi, BLOCK_K=bk, BLOCK_D=bd, num_warps=4,
                                            num_stages=stages, SUM_K=1))
    return out


def layer_ref(x, w13, w2, ids, rw):
    """One layer and the hand-off in torch (float32 sums, h rounded to bf16), from the bf16 input x [D]."""
    I = w2.shape[-1]
    y = torch.zeros(w2.shape[1], device=x.device)
    for k in range(K):
        e = int(ids[k])
        gu = w13[e].float() @ x.float()
        h = (torch.nn.functional.silu(gu[:I]) * gu[I:]).bfloat16().float()
        y += rw[k].float() * (w2[e].float() @ h)
    return y / torch.sqrt((y * y).mean() + 1e-6)


def measure_model(name: str, L: int, rounds: int, kernels: set, bw: float) -> list[dict]:
    """Every arm at one model's sizes: its rows (time a layer against the floor)."""
    rows = []
    E, D, I = (MODELS[name][k] for k in ("E", "D", "I"))
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(L, E, 2 * I, D, device="cuda", generator=g) * 0.02).bfloat16()
    w2 = (torch.randn(L, E, D, I, device="cuda", generator=g) * 0.02).bfloat16()
    w2t = w2.transpose(2, 3).contiguous()
    ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:K] for _ in range(L)]).int()
    rw = torch.softmax(torch.randn(L, K, device="cuda", generator=g), -1).bfloat16()
    x0 = torch.randn(1, D, device="cuda", generator=g).bfloat16()
    xs = torch.zeros(L + 1, 1, D, device="cuda", dtype=torch.bfloat16)
    acc = torch.zeros(L, 1, D, device="cuda", dtype=torch.float32)
    scratch = torch.zeros(K * I // 8, D, device="cuda", dtype=torch.float32)
    floor_us = K * 3 * D * I * 2 / bw * 1e6

    def arm(cfg, atomic=True):
        def run():
            handoff(x0, xs[0])
            for l in range(L):
                if cfg is None:
                    y = triton_moe.experts_fused(xs[l], w13[l], w2[l], ids[l:l + 1], rw[l:l + 1], "silu",
                                                 combine=False)
                    handoff(y, xs[l + 1])
                else:
                    out = acc[l] if atomic else scratch
                    fused(xs[l], w13[l], w2t[l] if cfg["TRANS"] in (1, 3) else w2[l], out, ids[l], rw[l], cfg, atomic)
                    handoff(out, xs[l + 1])
        return run

    def check(fn) -> float:
        # each layer against torch from the same input (the arm's own previous output)
        xs.zero_()
        fn()
        torch.cuda.synchronize()
        errs = []
        for l in range(L):
            ref = layer_ref(xs[l, 0], w13[l], w2[l], ids[l], rw[l])
            errs.append(((xs[l + 1, 0].float() - ref).norm() / ref.norm()).item())
        return max(errs)

    timed = []
    for cfg in [None] + [c for c in configs(D, I) if c["TRANS"] in kernels]:
        fn = arm(cfg)
        try:
            err = check(fn)
        except Exception as e:  # a configuration that does not compile here
            print(f"  {name} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        if not err < 1e-2:
            print(f"  {name} {cfg}: wrong result (rel err {err:.2e})", flush=True)
            continue
        ms = graph_ms(fn, warmup=5, rep=30)
        if ms is None:
            continue
        print(f"  {name} {'two_kernels' if cfg is None else cfg}: {ms * 1e3 / L:6.2f} us a layer  err {err:.1e}",
              flush=True)
        timed.append((ms, cfg, err))
    arms = {"two_kernels": (None, True)}
    for trans in (0, 1, 2, 3):
        ok = sorted((t for t in timed if t[1] is not None and t[1]["TRANS"] == trans), key=lambda t: t[0])
        if ok:
            arms[f"fused_t{trans}"] = (ok[0][1], True)
            if trans < 2:  # the same kernel storing its partials instead of adding them (timing only)
                arms[f"fused_t{trans}_store"] = (ok[0][1], False)
    errs = {t[1]["TRANS"] if t[1] else None: t[2] for t in timed}
    medians = {a: [] for a in arms}
    for _ in range(rounds):
        for a, (cfg, atomic) in arms.items():
            medians[a].append(graph_ms(arm(cfg, atomic), warmup=5, rep=50))
    for a, (cfg, atomic) in arms.items():
        us = sorted(medians[a])[len(medians[a]) // 2] * 1e3 / L
        err = errs.get(cfg["TRANS"] if cfg else None) if atomic else None
        rows.append({"model": name, "arm": a, "config": cfg, "layers": L, "us_per_layer": us,
                     "floor_us": floor_us, "pct_floor": 100 * floor_us / us, "rel_err": err,
                     "rounds_ms": medians[a]})
        print(f"{name:7s} {a:16s} {us:7.2f} us a layer  floor {floor_us:6.2f}  {100 * floor_us / us:5.1f}%  "
              f"{cfg}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the arms")
    p.add_argument("--kernels", default="0,1,2",
                   help="fused kernels to time: 0 CUDA cores, 1 the same with W_down transposed, 2 matrix units, "
                        "3 the same with W_down transposed")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    kernels = {int(v) for v in args.kernels.split(",")}
    bw = ceilings()["copy_bytes_per_s"]
    print(f"copy {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for name in args.models.split(","):
        rows += measure_model(name, args.layers, args.rounds, kernels, bw)
        torch.cuda.empty_cache()
    save_json(args.out, {"device": torch.cuda.get_device_name(), "copy_bytes_per_s": bw, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
