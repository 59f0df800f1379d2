"""The decode-size GEMV kernels timed as decode runs them: many layers in one CUDA graph, each link
on its own weights (so every weight byte comes from HBM), consecutive kernels overlapping through
programmatic dependent launch. A kernel timed alone (`tune_moe.py`, `linear_small.py`) pays its
launch and ramp-up in full; inside a decode graph most of that hides behind the previous kernel.

    PYTHONPATH=. python bench/decode_chain.py [--tokens 1] [--links 16] [--ops all] --out r.json

For each op (the dense q/k/v, o and JetMoE k/v projections through `linear_small`; the expert
GEMMs through `moe_gemm_small`, and past its size the MoA map and reduce through the sorted path:
alignment + grouped GEMM) every candidate block configuration is timed as a graph of
`--links` launches, and the time per launch is set against the floor: the weight bytes it must read
over the copy bandwidth measured in the same run. The configuration the library picks today is
timed first, so the table shows what a change of configuration would gain.

Legend: T tokens, K experts per token, N = T*K assignments, E experts, D model dim, I expert hidden
dim, C attention-expert width.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from moe_layer import ceilings, graph_ms, save_json  # bench/ is the script's directory
from tune_moe import SPECS, candidates, ops_of, precompile

from moetorch.ops import triton_fused
from moetorch.ops import triton_moe as tm

K = 2
DTYPE = torch.bfloat16
LINEARS = {  # name: (in features, output sizes, bias)
    "phimoe.qkv": (4096, (4096, 1024, 1024), True),
    "phimoe.o": (4096, (4096,), True),
    "jetmoe.kv": (2048, (4096,), False),
}
EXPERT_OPS = {  # name: (layer shape in tune_moe.SPECS, op)
    "phimoe.gate_up": ("phimoe", "gate_up"), "phimoe.down": ("phimoe", "down"),
    "jetmoe.gate_up": ("jetmoe", "gate_up"), "jetmoe.down": ("jetmoe", "down"),
    "jetmoe.map": ("jetmoe_moa", "map"), "jetmoe.reduce": ("jetmoe_moa", "reduce"),
}
GEMV_CONFIGS = [dict(BLOCK_M=1, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
                for n in (2, 4, 8, 16) for k in (256, 512, 1024) for w in (2, 4, 8) for s in (2, 3, 4)]


def expert_dims(op_name: str) -> tuple[int, int, int, bool]:
    """(E, output columns, reduction length, gated) of an expert GEMM."""
    shape, op = EXPERT_OPS[op_name]
    _, n_out, k_dim, gated = next(o for o in ops_of(SPECS[shape]) if o[0] == op)
    return SPECS[shape]["E"], n_out, k_dim, gated


def configs_of(op_name: str, T: int) -> list[dict]:
    """The configuration in use first, then the candidates."""
    if op_name in LINEARS:
        K_in, outs, _ = LINEARS[op_name]
        now = triton_fused.linear_small_config(sum(outs), K_in, tm.sm_count(0), T)
        return [now] + [c for c in GEMV_CONFIGS if T == 1 and c != now]
    E, n_out, k_dim, gated = expert_dims(op_name)
    shape, op = EXPERT_OPS[op_name]
    current = tm.get_config(op, E, n_out, k_dim, DTYPE, T, T * K, torch.device("cuda"))
    return [current] + [c for c in candidates(T, gated, n_out) if c != current]


def make_links(op_name: str, T: int, links: int, g: torch.Generator) -> list[tuple]:
    """Per link: the arguments of one launch, each link on its own weights."""
    def new(*s):
        return torch.randn(*s, device="cuda", dtype=DTYPE, generator=g) * 0.02

    if op_name in LINEARS:
        K_in, outs, bias = LINEARS[op_name]
        x = new(T, K_in)
        return [(x, [new(n, K_in) for n in outs], [new(n) if bias else None for n in outs]) for _ in range(links)]
    E, n_out, k_dim, gated = expert_dims(op_name)
    _, op = EXPERT_OPS[op_name]
    a = new(T, k_dim) if op in ("gate_up", "map") else new(T * K, k_dim)
    out = []
    for _ in range(links):
        w = new(E, 2 * n_out if gated else n_out, k_dim)
        ids = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=-1).indices.reshape(-1).contiguous()
        route_w = torch.rand(T * K, device="cuda", generator=g).to(DTYPE)
        out.append((a, w, ids, route_w))
    return out


def launcher(op_name: str, T: int, link: tuple, cfg: dict):
    """A closure launching op_name once on one link's tensors with block sizes cfg."""
    if op_name in LINEARS:
        x, ws, bs = link
        return lambda: triton_fused.linear_small(x, ws, bs, cfg)
    _, op = EXPERT_OPS[op_name]
    E, n_out, k_dim, gated = expert_dims(op_name)
    a, w, ids, route_w = link
    if not tm.use_small_kernel(T * K, K):
        # sorted path: the alignment and the grouped GEMM, as a layer runs them (the reduce then
        # shares the map's alignment; here each link aligns its own ids)
        if op not in ("map", "reduce"):
            raise ValueError(f"{op_name} at {T} tokens: the sorted path is timed for map and reduce only "
                             "(gate/up and down share one alignment and BLOCK_M; bench/tune_moe.py times them)")
        ids_TK, route_w_TK = ids.view(T, K), route_w.view(T, K)
        if op == "map":
            return lambda: tm.map_fused(a, w, ids_TK, config=cfg)
        h_TKC = a.view(T, K, k_dim)
        return lambda: tm.reduce_fused(h_TKC, w, ids_TK, route_w_TK, config=cfg, combine=False)
    if op in ("gate_up", "map"):
        y = torch.empty(T * K, n_out, device="cuda", dtype=DTYPE)
        return lambda: tm.moe_gemm_small(a, w, y, ids, K, cfg, a_div=K, n_out=n_out, act="silu" if gated else None)
    # uncombined where the config splits by expert: the K terms left for the next norm, as decode runs it
    return lambda: tm.moe_gemm_small_weighted(a, w, ids, K, cfg, route_w, combine=False)


def weight_bytes(op_name: str, link: tuple) -> int:
    """Bytes a launch must read: the weights it touches (the routed experts only)."""
    if op_name in LINEARS:
        return sum(w.numel() * w.element_size() for w in link[1])
    _, w, ids, _ = link
    return ids.unique().numel() * w[0].numel() * w.element_size()


def _compile(jobs: list[tuple[str, int, dict]]) -> int:
    """Worker: launch each (op, T, config) once, filling Triton's disk cache for the timing process."""
    g = torch.Generator(device="cuda").manual_seed(0)
    done, links = 0, {}
    for op_name, T, cfg in jobs:
        if (op_name, T) not in links:
            links.clear()
            links[op_name, T] = make_links(op_name, T, 1, g)[0]
        try:
            launcher(op_name, T, links[op_name, T], cfg)()
            done += 1
        except Exception as e:  # timed later, where it fails again and is skipped
            print(f"compile failed: {op_name} {cfg}: {type(e).__name__}", file=sys.stderr)
    torch.cuda.synchronize()
    return done


def write_configs(path: str, rows: list[dict]) -> None:
    """Store each expert GEMM's fastest configuration under its token count in the config JSON
    (the format `tune_moe.py` writes and `triton_moe.get_config` reads)."""
    table = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    for row in rows:
        if row["op"] not in EXPERT_OPS:
            continue
        E, n_out, k_dim, _ = expert_dims(row["op"])
        cfg = {k: v for k, v in row["best"].items() if k not in ("us", "pct_floor")}
        table.setdefault(tm.config_key(EXPERT_OPS[row["op"]][1], E, n_out, k_dim, DTYPE), {})[str(row["T"])] = cfg
    Path(path).write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}", flush=True)


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1")
    p.add_argument("--links", type=int, default=16)
    p.add_argument("--ops", default="all", help=f"comma list of {sorted(LINEARS) + sorted(EXPERT_OPS)}")
    p.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    p.add_argument("--write", default=None, help="expert GEMMs: put the fastest configurations in this config JSON")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    ops = list(LINEARS) + list(EXPERT_OPS) if args.ops == "all" else args.ops.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    start = time.time()
    precompile([(o, T, c) for o in ops for T in tokens for c in configs_of(o, T)], args.workers, worker=_compile)
    print(f"compiled in {time.time() - start:.0f} s", flush=True)
    bw = ceilings()["copy_bytes_per_s"]
    result = {"device": torch.cuda.get_device_name(), "copy_bytes_per_s": bw, "links": args.links, "rows": []}
    g = torch.Generator(device="cuda").manual_seed(1)
    for op_name in ops:
        for T in tokens:
            links = make_links(op_name, T, args.links, g)
            floor_us = sum(weight_bytes(op_name, lk) for lk in links) / len(links) / bw * 1e6
            timed = []
            for cfg in configs_of(op_name, T):
                try:
                    fns = [launcher(op_name, T, lk, cfg) for lk in links]
                except Exception as e:
                    print(f"  skip {cfg}: {type(e).__name__}", flush=True)
                    continue
                # one graph of all links (the L2 is flushed before each replay, not between links)
                ms = graph_ms(lambda fns=fns: [fn() for fn in fns], warmup=5, rep=40)
                if ms is None:
                    continue
                us = ms * 1e3 / len(links)
                timed.append(dict(us=us, pct_floor=100 * floor_us / us, **cfg))
            now, best = timed[0], min(timed, key=lambda r: r["us"])
            result["rows"].append(dict(op=op_name, T=T, floor_us=floor_us, current=now, best=best,
                                       all=sorted(timed, key=lambda r: r["us"])))
            print(f"{op_name:15s} T={T:3d} floor {floor_us:6.1f} us  now {now['us']:6.1f} us "
                  f"({now['pct_floor']:4.1f}%)  best {best['us']:6.1f} us ({best['pct_floor']:4.1f}%) "
                  f"{ {k: v for k, v in best.items() if k not in ('us', 'pct_floor')} }", flush=True)
            del links
            torch.cuda.empty_cache()
    save_json(args.out, result)
    if args.write:
        write_configs(args.write, result["rows"])
    print(f"done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
