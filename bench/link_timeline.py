"""Where a dependent link's extra 3 us goes: per-program timestamps inside a chain of one-row GEMVs.

`bench/persistent_chain.py` found that a dependent link (one GEMV whose input is the previous
one's output) costs about 3 us on top of its weight bytes, as separate launches with PDL and as
one persistent kernel with grid barriers alike. This probe splits that cost. Every program of
every link records the GPU's global timer (ns) at four points: when it may start (after the PDL
wait, or after the barrier), when its first K step has its data (a data dependency on that step's
product), when its last output is stored, and, for the persistent kernel, when it has arrived at
the barrier. Per link, over programs:

- `start_spread`: median start - first start (programs still launching, or late off the barrier);
- `first_tile`: median time from start to the first step's data (the HBM round trip, ramp);
- `busy`: median time from start to done (a program's share of the bytes);
- `finish_tail`: last done - median done (imbalance: how long the slowest programs hold the link);
- `handoff`: next link's first start - this link's last done (the dependency's own latency:
  launch or barrier, negative where PDL lets the next kernel in early);
- `link`: next link's median start - this link's median start (what a link costs in the chain).

Where `finish_tail` dominates, a hand-off that does not wait for the slowest program (the next
link working on the inputs already stored) would recover it; where `handoff` and `first_tile`
dominate, the cost is the dependency's round trip, which only fewer links remove.

    PYTHONPATH=.:bench python bench/link_timeline.py [--links 16] [--shapes 4096x2048,...] --out r.json
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys

import torch
import triton
import triton.language as tl
from moe_layer import graph_ms, save_json  # bench/ is the script's directory
from persistent_chain import (
    _arrive,
    _tile_walk,
    _wait,
    checked_error,
    copy_rate,
    each_chain,
    resident_per_sm,
    timed_configs,
)

from moetorch.ops.triton_moe import _pdl_release, _pdl_start, pdl_meta, sm_count

SHAPES = ["4096x2048", "2048x4096", "22528x2048", "2048x11264", "1024x1024"]


@triton.jit
def _now(dep):
    # the global timer (ns), read once `dep` (a float32 scalar) is computed
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,f", [dep], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _smid(dep):
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,f", [dep], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit(do_not_specialize=["l0", "L"])
def _timed_links(w_ptr, y_ptr, count_ptr, st_ptr, st_rows, l0, L, N, K, S, P,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr, STAMPS: tl.constexpr):
    # persistent_chain's GEMV (flat loop over (tile, K step), one thread polls the barrier), with
    # stamps[l, pid, :] = start, first step's data (STAMPS 2), last store, arrival, SM id
    _pdl_start(PDL)
    pid = tl.program_id(0)
    n_tiles, steps, mine, i, kk = _tile_walk(pid, N, K, P, BLOCK_N, BLOCK_K)
    zero = pid.to(tl.float32) * 0.0
    for l in range(l0, l0 + L):
        st = st_ptr + (l.to(tl.int64) * st_rows + pid) * 5
        if STAMPS:
            tl.store(st, _now(zero))
        w_l = w_ptr + l.to(tl.int64) * N * K
        x_l = y_ptr + l.to(tl.int64) * S
        part = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for it in range(mine * steps):
            tile = pid + (it // steps) * P
            k0 = (it % steps) * BLOCK_K
            w = tl.load(w_l + (tile * BLOCK_N + i).to(tl.int64)[:, None] * K + k0 + kk[None, :])
            x = tl.load(x_l + k0 + kk, cache_modifier=".cg")
            part += w.to(tl.float32) * x.to(tl.float32)[None, :]
            if STAMPS == 2:
                if it == 0:
                    tl.store(st + 1, _now(tl.sum(tl.sum(part, axis=1), axis=0)))
            if it % steps == steps - 1:
                out = tl.sum(part, axis=1)
                tl.store(y_ptr + (l + 1).to(tl.int64) * S + tile * BLOCK_N + i, out.to(tl.bfloat16))
                part = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
                if STAMPS:
                    if it == mine * steps - 1:
                        tl.store(st + 2, _now(tl.sum(out, axis=0)))
                        tl.store(st + 4, _smid(zero).to(tl.int64))
        if l + 1 < l0 + L:
            _arrive(count_ptr)
            if STAMPS:
                tl.store(st + 3, _now(zero))
            _wait(count_ptr, (l - l0 + 1) * P)
    _pdl_release(PDL)


@triton.jit
def _acquire(dep):
    # a gpu-scope acquire fence after the relaxed (volatile) loads that `dep` was computed from
    return tl.inline_asm_elementwise("fence.acq_rel.gpu;\n mov.u32 $0, 0;", "=r,r", [dep], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit(do_not_specialize=["L"])
def _dataflow_links(w_ptr, y_ptr, flags_ptr, L, N, K, S, NC,
                    R: tl.constexpr, BK: tl.constexpr, NCP: tl.constexpr, FLOW: tl.constexpr):
    # One launch for all links; program pid owns output rows [pid * R, pid * R + R) of every link
    # and walks the input in BK-wide chunks (chunk-major: all its rows per chunk). flags[l, c]
    # counts the producers of link l - 1 that stored their rows of chunk c of y[l]; a chunk is
    # ready at BK // R arrivals. FLOW 1: take the ready chunks in order as they come (a chunk's
    # wait is for its own producers); FLOW 0: wait until every chunk is ready (a grid barrier with
    # the same loop). Chunk order is fixed, so sums repeat bit for bit.
    pid = tl.program_id(0)
    rows = pid * R + tl.arange(0, R)
    kk = tl.arange(0, BK)
    cc = tl.arange(0, NCP)
    need = BK // R
    n_chunks = K // BK
    for l in range(L):
        w_l = w_ptr + l.to(tl.int64) * N * K + rows.to(tl.int64)[:, None] * K
        x_l = y_ptr + l.to(tl.int64) * S
        f_l = flags_ptr + l * NC
        acc = tl.zeros((R,), dtype=tl.float32)
        done = 0
        while done < n_chunks:
            f = tl.load(f_l + cc, mask=cc < n_chunks, other=need, volatile=True)
            waiting = (f < need) & (cc >= done)
            upto = tl.min(tl.where(waiting, cc, n_chunks), axis=0)
            if FLOW == 0:
                upto = tl.where(tl.max(waiting.to(tl.int32), axis=0) > 0, done, n_chunks)
            upto += _acquire(upto)
            for c in range(done, upto):
                w = tl.load(w_l + c * BK + kk[None, :])
                x = tl.load(x_l + c * BK + kk, cache_modifier=".cg")
                acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
            done = upto
        tl.store(y_ptr + (l + 1).to(tl.int64) * S + rows, acc.to(tl.bfloat16))
        tl.debug_barrier()
        tl.atomic_add(flags_ptr + (l + 1) * NC + (pid * R) // BK, 1, sem="release", scope="gpu")


def dataflow_chain(ws, y, cfg: dict, flow: int):
    L, N, K = ws.shape
    S = y.shape[1]
    R, BK = cfg["R"], cfg["BK"]
    NC = S // BK
    P = N // R
    big = 1 << 20
    init = torch.zeros(L + 1, NC, device=ws.device, dtype=torch.int32)
    init[0] = big  # the chain's input is there from the start
    init[:, N // BK:] = big  # chunks past the producers' rows (N < K): nothing to wait for
    flags = init.clone()
    meta = dict(R=R, BK=BK, NCP=triton.next_power_of_2(NC), FLOW=flow, num_warps=cfg["num_warps"],
                num_stages=3)
    kernel = _dataflow_links[(1,)](ws, y, init.clone(), 1, N, K, S, NC, **meta)
    if resident_per_sm(kernel, cfg["num_warps"]) * sm_count(ws.device.index) < P:
        return None  # every program must be resident, or a waiting one could starve its producer

    def run():
        flags.copy_(init)
        _dataflow_links[(P,)](ws, y, flags, L, N, K, S, NC, **meta)
    return run


def dataflow_configs(N: int, K: int) -> list[dict]:
    out = []
    for R in (8, 16, 32, 64, 128):
        for BK in (128, 256, 512):
            if R > BK or N % R or K % BK or N // R > 4 * 132 or R * BK > 16384:
                continue
            for warps in (4, 8):
                out.append(dict(R=R, BK=BK, num_warps=warps))
    return out


def chain(arm: str, ws, y, count, stamps, cfg: dict, with_stamps: int):
    L, N, K = ws.shape
    S = y.shape[1]
    dev = ws.device
    meta = dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=4, num_stages=3,
                STAMPS=with_stamps)
    if arm == "launches":
        P = N // cfg["BLOCK_N"]  # one tile per program

        def run():
            for l in range(L):
                _timed_links[(P,)](ws, y, count, stamps, stamps.shape[1], l, 1, N, K, S, P, **meta, **pdl_meta(dev))
        return run, P
    P = sm_count(dev.index) * cfg["per_sm"]
    kernel = _timed_links[(1,)](ws, y, count, stamps, stamps.shape[1], 0, 1, N, K, S, P, **meta, PDL=0)
    if resident_per_sm(kernel, 4) < cfg["per_sm"]:
        return None, P

    def run():
        count.zero_()
        _timed_links[(P,)](ws, y, count, stamps, stamps.shape[1], 0, L, N, K, S, P, **meta, PDL=0)
    return run, P


def summarize(st: torch.Tensor, P: int) -> dict:
    """Per-link phases (us) from stamps [L, >=P, 5], the median over links 1 .. L-2 (the first and
    last link see the graph's start and end)."""
    st = st[:, :P].double()
    L = st.shape[0]
    rows = []
    for l in range(1, L - 1):
        start, first, done = st[l, :, 0], st[l, :, 1], st[l, :, 2]
        med = lambda t: t.median().item()  # noqa: E731
        rows.append({
            "start_spread": med(start) - start.min().item(),
            "first_tile": med(first - start),
            "busy": med(done - start),
            "finish_tail": done.max().item() - med(done),
            "handoff": st[l + 1, :, 0].min().item() - done.max().item(),
            "link": med(st[l + 1, :, 0]) - med(start),
            "span": done.max().item() - start.min().item(),
        })
    out = {k: statistics.median(r[k] for r in rows) / 1e3 for k in rows[0]}
    sms = st[1, :, 4]
    out["sms_used"] = int(torch.unique(sms).numel())
    diffs = torch.diff(torch.unique(st[1:L - 1, :, :3].flatten()))
    out["timer_step_ns"] = float(diffs[diffs > 0].min().item()) if diffs.numel() else 0.0
    return out


def configs(N: int, K: int, arm: str) -> list[dict]:
    out = []
    for bn in (4, 8):
        for bk in (512, 1024):
            if N % bn or K % bk:
                continue
            for per_sm in ((1,) if arm == "launches" else (1, 2, 4)):
                out.append(dict(BLOCK_N=bn, BLOCK_K=bk, per_sm=per_sm))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--links", type=int, default=16)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--arms", default="launches,persistent,dataflow,dataflow-barrier")
    p.add_argument("--stamps", type=int, default=1, choices=(1, 2),
                   help="2: also stamp the first K step's data (perturbs the loop's pipeline)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    bw = copy_rate()
    rows = []
    for shape, N, K, L, ws, y, ref, count, floor_us in each_chain(args.shapes, args.links, bw):
        stamps = torch.zeros(L, max(N // 4, 4 * sm_count(0)), 5, device="cuda", dtype=torch.int64)
        for arm in args.arms.split(","):
            if arm.startswith("dataflow"):
                continue  # below
            def unstamped(cfg, arm=arm, ws=ws, y=y, count=count, stamps=stamps):
                return chain(arm, ws, y, count, stamps, cfg, with_stamps=0)[0]

            timed = timed_configs(unstamped, configs(N, K, arm), y, ref, N, f"{shape} {arm}")
            if not timed:
                continue
            ms, cfg, _ = timed[0]
            fn, P = chain(arm, ws, y, count, stamps, cfg, with_stamps=args.stamps)
            ms_stamped = graph_ms(fn, warmup=5, rep=30)
            err = checked_error(fn, y, ref, N, f"{shape} {arm} {cfg} (stamped)")
            if err is None:
                continue
            # replays of the stamped chain in a graph, as timed: the stamps are the last one's
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            phases = summarize(stamps.cpu(), P)
            if args.stamps == 1:
                del phases["first_tile"]  # not stamped
            row = {"shape": shape, "arm": arm, "config": cfg, "programs": P, "floor_us": floor_us,
                   "us_per_link": ms * 1e3 / L, "us_per_link_stamped": ms_stamped * 1e3 / L,
                   "rel_err": err, **phases}
            rows.append(row)
            print(f"{shape:11s} {arm:10s} {row['us_per_link']:6.2f} us a link ({row['us_per_link_stamped']:.2f} "
                  f"stamped), floor {floor_us:5.2f} | start spread {phases['start_spread']:.2f}  first "
                  f"{phases.get('first_tile', float('nan')):.2f}  busy {phases['busy']:.2f}  "
                  f"tail {phases['finish_tail']:.2f}  "
                  f"handoff {phases['handoff']:.2f}  link {phases['link']:.2f}  span {phases['span']:.2f}  "
                  f"(timer {phases['timer_step_ns']:.0f} ns, {phases['sms_used']} SMs, err {err:.1e}) {cfg}",
                  flush=True)
        for arm in ("dataflow", "dataflow-barrier"):
            if arm not in args.arms.split(","):
                continue
            flow = int(arm == "dataflow")
            timed = timed_configs(functools.partial(dataflow_chain, ws, y, flow=flow), dataflow_configs(N, K), y, ref,
                                  N, f"{shape} {arm}")
            if not timed:
                continue
            ms, cfg, err = timed[0]
            ms = min(ms, graph_ms(dataflow_chain(ws, y, cfg, flow), warmup=5, rep=50))
            rows.append({"shape": shape, "arm": arm, "config": cfg, "programs": N // cfg["R"],
                         "floor_us": floor_us, "us_per_link": ms * 1e3 / L, "rel_err": err})
            print(f"{shape:11s} {arm:16s} {ms * 1e3 / L:6.2f} us a link, floor {floor_us:5.2f}  "
                  f"err {err:.1e}  {cfg}", flush=True)
    save_json(args.out, {"device": torch.cuda.get_device_name(), "copy_bytes_per_s": bw, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
