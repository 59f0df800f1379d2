"""Tune the Triton expert kernels' block sizes on this GPU; write `ops/configs/<GPU name>.json`.

    PYTHONPATH=. python bench/tune_moe.py [--out PATH] [--budget-s 300] [--tokens 1,8,64,512,4096,16384]

For each layer shape (PhiMoE and JetMoE MLP experts, JetMoE attention experts) and token count T,
every candidate block configuration of each GEMM is timed (median, L2 flushed between runs:
`triton.testing.do_bench`) on random routing, and the fastest kept. The SwiGLU experts' two GEMMs
share one alignment, hence one BLOCK_M: each BLOCK_M gets its best gate_up and best down, and the
BLOCK_M with the smallest sum wins. Candidates are compiled first in parallel worker processes
(Triton's on-disk cache then serves the timing process). Past `--budget-s` the remaining shapes
keep the defaults; the JSON is rewritten after every shape so a cut-off run still leaves results.

Legend: T tokens, D model dim, I expert hidden dim, C attention-expert width, E experts,
K experts per token, N = T*K assignments, P padded sorted rows.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

K = 2
# Real sizes: Phi-3.5-MoE, jetmoe-8b (MLP experts; attention experts of 16 kv heads x 128).
SPECS = {
    "phimoe": dict(kind="experts", E=16, D=4096, I=6400),
    "jetmoe": dict(kind="experts", E=8, D=2048, I=5632),
    "jetmoe_moa": dict(kind="moa", E=8, D=2048, C=2048),
}
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
DTYPE = torch.bfloat16


SMS = 132  # H100/H200: where a decode grid of column tiles leaves SMs idle
SPLIT_KS = (2, 3, 4, 6, 8)


def candidates(T: int, gated: bool, n_out: int) -> list[dict]:
    """Block configurations worth timing at T tokens for a GEMM of `n_out` output columns (per half
    for gate_up): few rows per expert want a small BLOCK_M and many weight columns in flight; many
    rows want large tiles for the matrix units. The alignment-free kernel's grid is one program per
    column tile: under 2 per SM, split-K candidates (up to 4 programs per SM, each also split by
    expert: `triton_moe.splits_by_expert`) fill the GPU. At one token the CUDA-core kernel (GEMV) is
    a candidate too; past 2048 assignments every sorted-path candidate also as a persistent grid."""
    from moetorch.ops.triton_moe import use_small_kernel

    N = T * K
    if use_small_kernel(N, K):  # alignment-free kernel: BLOCK_M is all N rows; columns spread the work
        bms = (max(16, 1 << (N - 1).bit_length()),)
        shapes = [(16, 256, 4, 4), (16, 256, 4, 6), (32, 256, 4, 4), (32, 128, 4, 4), (32, 128, 4, 6),
                  (64, 128, 4, 4), (64, 256, 4, 3), (16, 512, 4, 3), (32, 512, 4, 3)]
    elif N <= 256:
        bms, shapes = (16, 32), [(32, 128, 4, 4), (64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3), (128, 64, 4, 4),
                                 (32, 256, 4, 4), (64, 256, 4, 4), (64, 128, 4, 6), (128, 128, 4, 4)]
    elif N <= 2048:
        bms, shapes = (32, 64), [(64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)]
    else:
        bms, shapes = (64, 128), [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (256, 64, 8, 3), (256, 64, 8, 4),
                                  (64, 64, 4, 4)]
    out = []
    for bm in bms:
        for bn, bk, warps, stages in shapes:
            if gated and bm * bn > 128 * 128:  # two fp32 accumulators: registers run out
                continue
            smem = stages * (bm * bk + bk * bn * (2 if gated else 1)) * 2
            if smem > 220 * 1024:
                continue
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1 if N <= 256 else 8,
                       num_warps=warps, num_stages=stages)
            if use_small_kernel(N, K):
                tiles = -(-n_out // bn)
                splits = [s for s in SPLIT_KS if tiles < 2 * SMS and tiles * s <= 4 * SMS]
                # each split both ways: the flat (expert, K step) loop, and whole experts a program
                out += [{**cfg, "SPLIT_K": 1}] + [{**cfg, "SPLIT_K": s, **by} for s in splits
                                                   for by in ({}, {"SPLIT_E": True})]
            else:
                out.append(cfg)
                if N > 2048:  # prefill sizes: also as a persistent grid, 1 (and where shared memory allows, 2) per SM
                    out += [{**cfg, "PERSISTENT": p} for p in (1, 2) if p == 1 or 2 * smem <= 220 * 1024]
    if T == 1:  # one token: also the CUDA-core kernel, whose programs each take whole dot products
        out += [dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1, num_warps=w, num_stages=s, GEMV=True)
                for bn in (2, 4, 8, 16) for bk in (256, 512, 1024) for w in (2, 4) for s in (2, 3)]
    return out


def ops_of(spec: dict) -> list[tuple[str, int, int, bool]]:
    """(op, output columns, reduction length, gated) of each GEMM of a layer shape."""
    if spec["kind"] == "experts":
        return [("gate_up", spec["I"], spec["D"], True), ("down", spec["D"], spec["I"], False)]
    return [("map", spec["C"], spec["D"], False), ("reduce", spec["D"], spec["C"], False)]


def make_inputs(spec: dict, T: int, fill: bool) -> dict:
    """Weights, activations and a random top-K routing (uniform over experts) at T tokens."""
    g = torch.Generator(device="cuda").manual_seed(T)
    new = (lambda *s: torch.randn(*s, device="cuda", dtype=DTYPE, generator=g) * 0.02) if fill else (
        lambda *s: torch.empty(*s, device="cuda", dtype=DTYPE))
    E, D = spec["E"], spec["D"]
    inp = dict(x_TD=new(T, D), ids_TK=torch.rand(T, E, device="cuda", generator=g).topk(K, dim=-1).indices,
               weights_TK=torch.rand(T, K, device="cuda", generator=g).to(DTYPE))
    if spec["kind"] == "experts":
        inp.update(w_a=new(E, 2 * spec["I"], D), w_b=new(E, D, spec["I"]))
    else:
        inp.update(w_a=new(E, spec["C"], D), w_b=new(E, D, spec["C"]), h_NC=new(T * K, spec["C"]))
    return inp


def op_runner(spec: dict, inp: dict, op: str, cfg: dict, aligned: dict):
    """A closure launching one GEMM of the layer with block sizes `cfg` (alignment cached per BLOCK_M)."""
    from moetorch.ops import triton_moe as tm

    T = inp["x_TD"].shape[0]
    N, E, bm = T * K, spec["E"], cfg["BLOCK_M"]
    if tm.use_small_kernel(N, K):
        return small_op_runner(spec, inp, op, cfg)
    if bm not in aligned:
        aligned[bm] = tm.moe_align(inp["ids_TK"].reshape(-1), E, bm)
    sorted_P, blocks_B = aligned[bm]
    P, x, w_a, w_b = sorted_P.numel(), inp["x_TD"], inp["w_a"], inp["w_b"]
    if op == "gate_up":
        h = torch.empty(P, spec["I"], device="cuda", dtype=DTYPE)
        a, a_div = x, K
        if gathers_first(N):  # as experts_fused runs it: rows gathered once (not timed), A by descriptor
            a, a_div = tm.gather_rows(x, sorted_P, N, K), 0
        return lambda: tm.moe_gemm(a, w_a, h, sorted_P, blocks_B, N, cfg, a_div=a_div, out_padded=True,
                                   n_out=spec["I"], act="silu")
    if op == "down":
        h = torch.randn(P, spec["I"], device="cuda", dtype=DTYPE)
        y = torch.empty(N, spec["D"], device="cuda", dtype=DTYPE)
        w = inp["weights_TK"].reshape(-1)
        return lambda: tm.moe_gemm(h, w_b, y, sorted_P, blocks_B, N, cfg, a_div=0, route_w_N=w)
    y = torch.empty(N, w_a.shape[1] if op == "map" else spec["D"], device="cuda", dtype=DTYPE)
    if op == "map":
        return lambda: tm.moe_gemm(x, w_a, y, sorted_P, blocks_B, N, cfg, a_div=K)
    w = inp["weights_TK"].reshape(-1)
    return lambda: tm.moe_gemm(inp["h_NC"], w_b, y, sorted_P, blocks_B, N, cfg, a_div=1, route_w_N=w)


def gathers_first(N: int) -> bool:
    """Whether `experts_fused` gathers the gate/up GEMM's rows first at N assignments on this GPU."""
    from moetorch.ops import triton_moe as tm

    return N >= tm.GATHER_MIN_ROWS and tm.tma_enabled(torch.device("cuda"))


def small_op_runner(spec: dict, inp: dict, op: str, cfg: dict):
    """`op_runner` for decode sizes: the alignment-free kernel, K rows folded in the down/reduce GEMM
    (left unsummed where the config splits by expert, as the models' decode runs it)."""
    from moetorch.ops import triton_moe as tm

    x, w_a, w_b = inp["x_TD"], inp["w_a"], inp["w_b"]
    T, N = x.shape[0], x.shape[0] * K
    ids, w = inp["ids_TK"].reshape(-1).contiguous(), inp["weights_TK"].reshape(-1)
    if op in ("gate_up", "map"):
        cols = spec["I"] if op == "gate_up" else spec["C"]
        y = torch.empty(N, cols, device="cuda", dtype=DTYPE)
        act = "silu" if op == "gate_up" else None
        return lambda: tm.moe_gemm_small(x, w_a, y, ids, K, cfg, a_div=K, n_out=cols, act=act)
    h = inp["h_NC"] if op == "reduce" else torch.randn(N, spec["I"], device="cuda", dtype=DTYPE)
    # the output allocated here, outside the timed call: `moe_gemm_small_weighted`'s choice of shape
    sum_k = not tm.splits_by_expert(cfg)
    y = torch.empty(T if sum_k else N, spec["D"], device="cuda", dtype=DTYPE)
    return lambda: tm.moe_gemm_small(h, w_b, y, ids, K, cfg, a_div=1, sum_k=sum_k, route_w_N=w)


def _compile_jobs(jobs: list[tuple[str, int, str, dict]]) -> int:
    """Worker: run each (shape, T, op, config) once on unfilled tensors, filling Triton's disk cache."""
    done, inputs = 0, {}
    for name, T, op, cfg in jobs:
        key = (name, T)
        if key not in inputs:
            inputs.clear()  # one shape at a time: weights are gigabytes, handed back for the next
            torch.cuda.empty_cache()
            inputs[key] = (make_inputs(SPECS[name], T, fill=False), {})
        inp, aligned = inputs[key]
        try:
            op_runner(SPECS[name], inp, op, cfg, aligned)()
            done += 1
        except Exception as e:  # a config that does not compile is skipped when timed, too
            print(f"compile failed: {name} T={T} {op} {cfg}: {e}", file=sys.stderr)
    torch.cuda.synchronize()
    return done


def job_bytes(name: str, T: int) -> int:
    """About what a compile worker allocates for one (shape, T): the weights, the tokens and the
    largest intermediate (2 bytes an element), with its CUDA context."""
    spec, N = SPECS[name], T * K
    if spec["kind"] == "experts":
        elements = spec["E"] * 3 * spec["I"] * spec["D"] + 2 * N * 2 * spec["I"]
    else:
        elements = spec["E"] * 2 * spec["C"] * spec["D"] + 2 * N * spec["C"]
    return 2 * (elements + N * spec["D"]) + (1 << 29)


def workers_that_fit(jobs, workers: int, free_bytes: int) -> int:
    """`workers`, or fewer where that many would not fit the GPU's free memory at once (each worker
    holds one (shape, T)'s tensors: 15 at PhiMoE's size need more than an 80 GB H100 holds)."""
    largest = max((job_bytes(name, T) for name, T, _, _ in jobs), default=1)
    return max(1, min(workers, int(0.75 * free_bytes) // (largest + largest // 4)))


def precompile(jobs, workers: int, worker=None) -> None:
    """Compile in `workers` processes: `worker` (default `_compile_jobs`) gets a share of the jobs,
    sorted by their first two fields (shape, T), launches each once and returns how many compiled."""
    # Spawned processes: the parent's CUDA context must not be forked. Jobs are dealt out by shape
    # so each worker allocates few shapes.
    chunks = [jobs[i::workers] for i in range(workers)]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        done = sum(pool.map(worker or _compile_jobs, [sorted(c, key=lambda j: (j[0], j[1])) for c in chunks]))
    print(f"precompiled {done}/{len(jobs)} kernels", flush=True)


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def tune_shape(name: str, spec: dict, T: int, log: dict, rounds: int = 3) -> dict[str, tuple[dict, float]]:
    """Best config (and its median ms) of each GEMM of one layer shape at T tokens; every timing
    goes to `log`. Candidates are timed in `rounds` interleaved rounds and each keeps its median:
    on the H200 one timing of a prefill-size GEMM moves by up to 10% from run to run (more than
    most candidates differ), and interleaving spreads clock and thermal drift over all of them."""
    inp, aligned = make_inputs(spec, T, fill=True), {}
    timed: dict[str, list[tuple[float, dict]]] = {}
    for op, n_out, _, gated in ops_of(spec):
        runners = []
        for cfg in candidates(T, gated, n_out):
            try:
                fn = op_runner(spec, inp, op, cfg, aligned)
                fn()
                runners.append((fn, cfg))
            except Exception as e:
                print(f"  skip {op} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        times = [[bench(fn) for fn, _ in runners] for _ in range(rounds)]
        timed[op] = [(statistics.median(ts), cfg) for ts, (_, cfg) in zip(zip(*times), runners)]
    for op, runs in timed.items():
        log[f"{name}.{op}.T{T}.all"] = [dict(ms=t, **c) for t, c in sorted(runs, key=lambda tc: tc[0])]
    best = {}
    if spec["kind"] == "experts":
        # one BLOCK_M for both GEMMs: the alignment is shared
        def best_at(op, bm):
            return min(((t, c) for t, c in timed[op] if c["BLOCK_M"] == bm), default=(float("inf"), None),
                       key=lambda tc: tc[0])

        bms = {c["BLOCK_M"] for _, c in timed["gate_up"]}
        bm = min(bms, key=lambda b: best_at("gate_up", b)[0] + best_at("down", b)[0])
        for op in ("gate_up", "down"):
            t, c = best_at(op, bm)
            best[op] = (c, t)
    else:
        for op in timed:
            t, c = min(timed[op], key=lambda tc: tc[0])
            best[op] = (c, t)
    from moetorch.ops import triton_moe as tm

    if not tm.use_small_kernel(T * K, K):  # what the alignment pass costs at this size
        ids_N, bm = inp["ids_TK"].reshape(-1), next(iter(best.values()))[0]["BLOCK_M"]
        log[f"{name}.align.T{T}.ms"] = bench(lambda: tm.moe_align(ids_N, spec["E"], bm))
    return best


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="default: moetorch/ops/configs/<GPU name>.json")
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--shapes", default=",".join(SPECS))
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--log", default=None, help="also write every best time here (JSON)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median kept)")
    args = parser.parse_args()
    from moetorch.ops import triton_moe as tm

    tokens = [int(t) for t in args.tokens.split(",")]
    names = args.shapes.split(",")
    out = Path(args.out or tm.CONFIG_DIR / (torch.cuda.get_device_name().replace(" ", "_") + ".json"))
    start = time.time()
    # One compile per (shape, GEMM, config, kernel): kernels do not specialise on T.
    jobs = {(n, op, tuple(cfg.items()), tm.use_small_kernel(T * K, K), op == "gate_up" and gathers_first(T * K)):
            (n, T, op, cfg) for n in names
            for T in tokens for op, o, _, g in ops_of(SPECS[n]) for cfg in candidates(T, g, o)}
    jobs = list(jobs.values())
    try:
        workers = workers_that_fit(jobs, args.workers, torch.cuda.mem_get_info()[0])
        if workers < args.workers:
            print(f"compiling in {workers} workers, not {args.workers}: what more would hold does not fit", flush=True)
        precompile(jobs, workers)
    except Exception as e:  # compiling in the timing process instead is slower, not wrong
        print(f"precompile failed ({type(e).__name__}: {e}); compiling while timing", flush=True)
    print(f"compiled in {time.time() - start:.0f} s", flush=True)
    table = json.loads(out.read_text()) if out.is_file() else {}
    log = {}
    for n in names:
        spec = SPECS[n]
        for T in tokens:
            if time.time() - start > args.budget_s:
                print(f"budget spent: {n} T={T} keeps its defaults", flush=True)
                continue
            for op, (cfg, ms) in tune_shape(n, spec, T, log, args.rounds).items():
                n_out, k_dim = next((o, k) for name, o, k, _ in ops_of(spec) if name == op)
                table.setdefault(tm.config_key(op, spec["E"], n_out, k_dim, DTYPE), {})[str(T)] = cfg
                log[f"{n}.{op}.T{T}"] = dict(ms=ms, **cfg)
                print(f"{n:11s} T={T:6d} {op:8s} {ms * 1e3:9.1f} us  {cfg}", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            tm.check_configs(table, str(out))  # what the kernels will accept when they read it
            out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
            if args.log:
                Path(args.log).write_text(json.dumps(log, indent=1) + "\n")
    print(f"wrote {out} in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
