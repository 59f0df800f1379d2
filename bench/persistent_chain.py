"""Dependent one-row GEMVs as separate kernels against one persistent kernel with grid barriers.

Batch-1 decode is a chain of small dependent kernels; each boundary costs a few microseconds that
PDL does not hide (a 16.8 MB GEMV takes about 7 us in a graph chain against a 3.9 us floor,
`bench/decode_chain.py`). A layer-persistent kernel would replace those boundaries with barriers
between phases inside one launch, and could stream the next phase's weights into L2 while the
slowest program of the current phase finishes. This probe measures what that buys before any model
code is written for it:

- `linear_small`: the library's one-row GEMV, one launch per link, PDL on (as decode runs it);
- `launches`: this file's GEMV body, one launch per link, PDL on (the same code as below, so the
  persistent arms differ from it only by the barrier);
- `persistent`: one launch for all links, a grid barrier (arrival counter) between links, every
  thread polling the counter;
- `persistent+l2`: the same, each program first issuing a bulk L2 prefetch
  (`cp.async.bulk.prefetch.L2`) of its weight slice of the next link before it waits at the barrier;
- `persistent+l2early`: the prefetch of link l+1 issued when link l starts;
- `persistent1`: one thread per program polls (acquire loads), the others wait at a bar.sync;
- `persistent1+reg`: that, and between arriving and waiting each program loads its first weight tile
  of the next link into registers (weights need no barrier);
- `persistent1+l2tile`: that, with the first tile prefetched into L2 instead.

Each link reads the previous link's output (its first K values) and its own weights [N, K], so every
weight byte comes from HBM once per replay. Times are per link inside one CUDA graph, against the
weight bytes over the copy bandwidth measured in the same run.

    PYTHONPATH=.:bench python bench/persistent_chain.py [--links 16] [--shapes 4096x2048,...] --out r.json

Measured (H200, `results/h200-2026-11-30-persistent-chain.json`): a dependent link costs about
3 us on top of its bytes either way. 16.8 MB: 6.7-6.9 us as launches, 7.1-8.3 persistent (floor
3.9); 92 MB: 25.0-25.5 against 24.6-26.8 (21.6); 2 MB: 3.2 against 2.6-3.2 (0.5). The prefetches
helped only at 2 MB and cost up to 50% at 92 MB.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import triton
import triton.language as tl
from moe_layer import ceilings, graph_ms, save_json  # bench/ is the script's directory

from moetorch.ops import triton_fused
from moetorch.ops.triton_moe import _pdl_release, _pdl_start, pdl_meta, sm_count

# JetMoE's one-token GEMVs: kv or MoA map + kv [4096 x 2048] (or the map of 2 experts), MoA reduce
# of 2 experts [2048 x 4096], gate/up of 2 experts [22528 x 2048], down of 2 experts [2048 x 11264];
# and 1 MB of weights, where a link is mostly its dependency (a kernel boundary, or a barrier)
SHAPES = ["4096x2048", "2048x4096", "22528x2048", "2048x11264", "1024x1024"]


@triton.jit
def _prefetch_l2(ptr, nbytes):
    # one thread of the program asks the copy engine to bring [ptr, ptr + nbytes) into L2
    tl.inline_asm_elementwise(
        """{
        .reg .pred p;
        .reg .u32 t;
        mov.u32 t, %tid.x;
        setp.eq.u32 p, t, 0;
        @p cp.async.bulk.prefetch.L2.global [$1], $2;
        mov.u32 $0, 0;
        }""",
        "=r,l,r", [ptr, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_tile(w_ptr, tile, K, BLOCK_N: tl.constexpr):
    # one column tile of a link's weights: BLOCK_N whole rows, contiguous
    _prefetch_l2(w_ptr + tile.to(tl.int64) * BLOCK_N * K, (BLOCK_N * K * 2).to(tl.int32))


@triton.jit
def _prefetch_slice(w_ptr, pid, P, n_tiles, K, BLOCK_N: tl.constexpr):
    # this program's tiles of one link
    for tile in range(pid, n_tiles, P):
        _prefetch_tile(w_ptr, tile, K, BLOCK_N)


@triton.jit
def _grid_barrier(count_ptr, target):
    # every program arrives once; all wait until `target` arrivals (the count only grows), every
    # thread polling
    _arrive(count_ptr)
    seen = tl.load(count_ptr, volatile=True)
    while seen < target:
        seen = tl.load(count_ptr, volatile=True)
    tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _spin_until(count_ptr, target):
    # thread 0 of the program polls the count with acquire loads until it reaches target; the
    # others wait for it at the next bar.sync
    tl.inline_asm_elementwise(
        """{
        .reg .pred p;
        .reg .u32 t;
        .reg .s32 c;
        mov.u32 t, %tid.x;
        setp.ne.u32 p, t, 0;
        @p bra SPIN_DONE;
        SPIN_LOOP:
        ld.acquire.gpu.global.s32 c, [$1];
        setp.lt.s32 p, c, $2;
        @p bra SPIN_LOOP;
        SPIN_DONE:
        mov.u32 $0, 0;
        }""",
        "=r,l,r", [count_ptr, target], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _arrive(count_ptr):
    # the program's stores are done (bar.sync), then one thread adds its arrival with release order
    # (which also waits for the program's loads in flight: prefetches go after it)
    tl.debug_barrier()
    tl.atomic_add(count_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _wait(count_ptr, target):
    # one thread polls until `target` arrivals, then the program goes on
    _spin_until(count_ptr, target)
    tl.debug_barrier()


@triton.jit
def _tile_walk(pid, N, K, P, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # program pid of P takes column tiles pid, pid + P, ...: the tile count, K steps a tile, this
    # program's tile count, and the tile's row and K offsets
    n_tiles = N // BLOCK_N
    return n_tiles, K // BLOCK_K, tl.cdiv(n_tiles - pid, P), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)


@triton.jit(do_not_specialize=["l0", "L"])
def _gemv_links(w_ptr, y_ptr, count_ptr, l0, L, N, K, S, P,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr,
                BARRIER: tl.constexpr = 0):
    # links l0 .. l0 + L: y[l + 1][:N] = W[l] @ y[l][:K]; rows of y are S long. Program pid takes
    # column tiles pid, pid + P, ...; a flat loop over (tile, K step) keeps loads in flight across
    # tiles. L > 1: a grid barrier between links (all P programs must be resident).
    _pdl_start(PDL)
    pid = tl.program_id(0)
    n_tiles, steps, mine, i, kk = _tile_walk(pid, N, K, P, BLOCK_N, BLOCK_K)
    if PREFETCH == 2:
        _prefetch_slice(w_ptr + l0.to(tl.int64) * N * K, pid, P, n_tiles, K, BLOCK_N)
    first = (pid * BLOCK_N + i).to(tl.int64)[:, None] * K + kk[None, :]  # a link's first tile of this program
    w_next = tl.load(w_ptr + l0.to(tl.int64) * N * K + first, mask=(PREFETCH == 3) & (pid < n_tiles), other=0.0)
    for l in range(l0, l0 + L):
        w_l = w_ptr + l.to(tl.int64) * N * K
        if PREFETCH == 2 and l + 1 < l0 + L:
            _prefetch_slice(w_l + N * K, pid, P, n_tiles, K, BLOCK_N)
        x_l = y_ptr + l.to(tl.int64) * S
        part = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for it in range(mine * steps):
            tile = pid + (it // steps) * P
            k0 = (it % steps) * BLOCK_K
            ptrs = w_l + (tile * BLOCK_N + i).to(tl.int64)[:, None] * K + k0 + kk[None, :]
            if PREFETCH == 3:  # the first tile was loaded before the barrier
                w = tl.where(it == 0, w_next, tl.load(ptrs, mask=it > 0, other=0.0))
            else:
                w = tl.load(ptrs)
            x = tl.load(x_l + k0 + kk, cache_modifier=".cg")
            part += w.to(tl.float32) * x.to(tl.float32)[None, :]
            if it % steps == steps - 1:
                tl.store(y_ptr + (l + 1).to(tl.int64) * S + tile * BLOCK_N + i, tl.sum(part, axis=1).to(tl.bfloat16))
                part = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if l + 1 < l0 + L:
            if PREFETCH == 1:
                _prefetch_slice(w_l + N * K, pid, P, n_tiles, K, BLOCK_N)
            if BARRIER == 0:
                _grid_barrier(count_ptr, (l - l0 + 1) * P)
            else:
                _arrive(count_ptr)
                # weights need no barrier: between arriving and waiting, the next link's first tile
                # into registers (3) or into L2 (4)
                if PREFETCH == 3:
                    w_next = tl.load(w_l + N * K + first, mask=pid < n_tiles, other=0.0)
                if PREFETCH == 4:
                    if pid < n_tiles:
                        _prefetch_tile(w_l + N * K, pid, K, BLOCK_N)
                _wait(count_ptr, (l - l0 + 1) * P)
    _pdl_release(PDL)


def chain(arm: str, ws, y, count, cfg: dict):
    """A function running all links of `arm` once (to be captured in a graph)."""
    L, N, K = ws.shape
    S = y.shape[1]
    dev = ws.device
    if arm == "linear_small":  # N >= K: each link reads the first K of the previous link's outputs
        def run():
            x = y[0:1, :K]
            for l in range(L):
                out = triton_fused.linear_small(x, [ws[l]], [None])
                x = out[:, :K]
            y[L, :N] = out[0]  # one copy per chain, for the check
        return run
    meta = dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])
    if arm == "launches":
        P = N // cfg["BLOCK_N"]  # one tile per program, as many programs as tiles

        def run():
            for l in range(L):
                _gemv_links[(P,)](ws, y, count, l, 1, N, K, S, P, PREFETCH=0, **meta, **pdl_meta(dev))
        return run
    P = sm_count(dev.index) * cfg["per_sm"]
    prefetch = {"persistent": 0, "persistent+l2": 1, "persistent+l2early": 2, "persistent1": 0,
                "persistent1+reg": 3, "persistent1+l2tile": 4}[arm]
    meta["BARRIER"] = int(arm.startswith("persistent1"))
    # the barrier needs all P programs resident at once: compile with one link (no barrier) and
    # check that per_sm programs fit on an SM, else the spinning programs would wait forever
    kernel = _gemv_links[(1,)](ws, y, count, 0, 1, N, K, S, P, PREFETCH=prefetch, **meta, PDL=0)
    if resident_per_sm(kernel, cfg["num_warps"]) < cfg["per_sm"]:
        return None

    def run():
        count.zero_()
        _gemv_links[(P,)](ws, y, count, 0, L, N, K, S, P, PREFETCH=prefetch, **meta, PDL=0)
    return run


def copy_rate() -> float:
    """The device copy rate (bytes read + written a second), measured and printed."""
    bw = ceilings()["copy_bytes_per_s"]
    print(f"copy {bw / 1e12:.2f} TB/s", flush=True)
    return bw


def each_chain(shapes: str, links: int, bw: float):
    """For each "NxK" of `shapes`: the shape, N, K, the link count, `chain_buffers`, a zeroed
    barrier counter and the floor of one link (its weight bytes at the copy rate, us)."""
    for shape in shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        ws, y, ref = chain_buffers(links, N, K)
        count = torch.zeros(1, device="cuda", dtype=torch.int32)
        yield shape, N, K, links, ws, y, ref, count, N * K * 2 / bw * 1e6
        del ws, y, ref
        torch.cuda.empty_cache()


def chain_buffers(L: int, N: int, K: int):
    """Weights [L, N, K] of a chain's links, its activations y [L + 1, max(N, K)] (y[0] the
    input; link l reads the first K values of y[l] and writes N values of y[l + 1]) and the chain
    computed in torch (float32 sums of bf16 inputs), to check an arm's last output against."""
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = (torch.randn(L, N, K, device="cuda", generator=g) * 0.02).bfloat16()
    y = torch.zeros(L + 1, max(N, K), device="cuda", dtype=torch.bfloat16)
    y[0].normal_(generator=g)
    ref = y.clone()
    for l in range(L):
        ref[l + 1, :N] = (ws[l].float() @ ref[l, :K].float()).bfloat16()
    return ws, y, ref


def timed_configs(make, configs: list, y, ref, N: int, what: str) -> list[tuple[float, dict, float]]:
    """(ms a replay, config, relative error) of each config whose chain `make(config)` builds
    (None: it cannot run) and computes right, fastest first."""
    timed = []
    for cfg in configs:
        fn = make(cfg)
        if fn is None:
            continue
        err = checked_error(fn, y, ref, N, f"{what} {cfg}")
        ms = None if err is None else graph_ms(fn, warmup=5, rep=30)
        if ms is not None:
            timed.append((ms, cfg, err))
    return sorted(timed, key=lambda t: t[0])


def checked_error(fn, y, ref, N: int, what: str) -> float | None:
    """Run a chain once from zeroed outputs: the relative error of its last link's output (which
    depends on every link) against torch's, or None (said) where it is wrong."""
    y[1:].zero_()
    fn()
    torch.cuda.synchronize()
    err = ((y[-1, :N].float() - ref[-1, :N].float()).norm() / ref[-1, :N].float().norm()).item()
    if not err < 2e-2:
        print(f"  {what}: wrong result (rel err {err:.2e})", flush=True)
        return None
    return err


def resident_per_sm(kernel, num_warps: int) -> int:
    """How many programs of a compiled kernel one H100/H200 SM holds at once (registers, shared
    memory, warps, blocks)."""
    regs = max(kernel.n_regs, 1) * 32 * num_warps
    smem = kernel.metadata.shared + 1024  # the runtime reserves 1 KB a block
    return min(65536 // regs, (228 * 1024) // smem, 64 // num_warps, 32)


ARMS = ["linear_small", "launches", "persistent", "persistent+l2", "persistent+l2early", "persistent1",
        "persistent1+reg", "persistent1+l2tile"]


def configs(N: int, K: int) -> list[dict]:
    out = []
    for bn in (4, 8, 16):
        for bk in (512, 1024):
            if N % bn or K % bk:
                continue
            for per_sm in (1, 2, 4):
                out.append(dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=3, per_sm=per_sm))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--links", type=int, default=16)
    p.add_argument("--shapes", default=",".join(SHAPES), help="NxK weight shapes, comma-separated")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the arms")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    bw = copy_rate()
    rows = []
    for shape, N, K, L, ws, y, ref, count, floor_us in each_chain(args.shapes, args.links, bw):
        # every arm: the best of its configurations (one round), then `rounds` interleaved rounds
        best = {}
        for arm in args.arms.split(","):
            if arm == "linear_small" and N < K:
                continue
            cands = [None] if arm == "linear_small" else configs(N, K)
            if arm == "launches":
                cands = [c for c in cands if c["per_sm"] == 1]
            timed = timed_configs(functools.partial(chain, arm, ws, y, count), cands, y, ref, N, f"{shape} {arm}")
            if not timed:
                continue
            best[arm] = timed[0]
            print(f"  {shape} {arm:20s} best {timed[0][0] * 1e3 / L:6.2f} us a link  cfg {timed[0][1]}", flush=True)
        medians = {arm: [] for arm in best}
        for _ in range(args.rounds):
            for arm, (_, cfg, _) in best.items():
                medians[arm].append(graph_ms(chain(arm, ws, y, count, cfg), warmup=5, rep=50))
        for arm, (_, cfg, err) in best.items():
            us = sorted(medians[arm])[len(medians[arm]) // 2] * 1e3 / L
            rows.append({"shape": shape, "N": N, "K": K, "links": L, "arm": arm, "config": cfg,
                         "us_per_link": us, "floor_us": floor_us, "pct_floor": 100 * floor_us / us,
                         "rel_err": err, "rounds_ms": medians[arm]})
            print(f"{shape:11s} {arm:20s} {us:7.2f} us a link  floor {floor_us:6.2f}  "
                  f"{100 * floor_us / us:5.1f}%  err {err:.1e}", flush=True)
    if args.out:
        save_json(args.out, {"device": torch.cuda.get_device_name(), "copy_bytes_per_s": bw, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
