"""Decode attention over a static cache (`ops.triton_fused.decode_attention`) per model layout,
batch and block configuration, against the bytes of the keys and values it must read.

    PYTHONPATH=. python bench/decode_attn.py --out r.json [--batches 1,16,64] [--visible 150] [--offset 0]

The cache has the decode benchmark's shape (128-token prompt + 40 slots, `--slots`); `--visible`
keys of each row from slot `--offset` on are unmasked (a batch row's keys lie far into its slots).
Each case is a CUDA-graph replay timed with `triton.testing.do_bench` (median, L2 flushed).
Floor: visible K and V bytes (+ queries and outputs) over the copy bandwidth measured in the same
run. Every configuration's output is checked against the default one's.

`--b module:attribute=off|<int>`: instead of the sweep, the default configuration as the code
stands (A) and with that attribute set (B), alternating for `--rounds` rounds (medians).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys

import torch
import triton.runtime.errors
from moe_layer import ceilings, graph_ms, save_json  # bench/ is the script's directory

from moetorch.ops import triton_fused

LAYOUTS = {  # name: (kv heads G, query heads per kv head R, head dim, MoA's tiled heads)
    "jetmoe": (16, 2, 128, True),
    "phimoe": (8, 4, 128, False),
}
CONFIGS = [dict(BLOCK_N=n, num_warps=w, num_stages=s) for n in (16, 32, 64, 128) for w in (2, 4, 8) for s in (1, 2, 3)]


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--slots", type=int, default=168)
    p.add_argument("--visible", type=int, default=150)
    p.add_argument("--offset", type=int, default=0, help="the first visible slot")
    p.add_argument("--b", default=None, metavar="MODULE:ATTR=off|INT",
                   help="instead of the config sweep: the default config with and without this setting, "
                        "interleaved for --rounds rounds")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.b:
        return ab_main(args)
    bw = ceilings()["copy_bytes_per_s"]
    result = {"device": torch.cuda.get_device_name(), "copy_bytes_per_s": bw, "rows": []}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, B, tiled, q, k, v, mask, floor_ms in cases(args, bw):
        G, d = k.shape[1], k.shape[-1]
        default = triton_fused.decode_attn_config(d, B * G, sms)
        want = triton_fused.decode_attention(q, k, v, mask, d**-0.5, tiled)
        run = functools.partial(triton_fused.decode_attention, q, k, v, mask, d**-0.5, tiled)
        timed = []
        for cfg in [default] + [c for c in CONFIGS if c != default]:
            try:
                got = run(cfg)
            except triton.runtime.errors.OutOfResources:
                continue
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            ms = graph_ms(functools.partial(run, cfg))
            if ms is not None:
                timed.append((ms, cfg, err))
        default_ms = timed[0][0]
        best_ms, best_cfg, best_err = min(timed, key=lambda t: t[0])
        row = {"layout": name, "B": B, "floor_ms": floor_ms, "default_ms": default_ms, "default_config": default,
               "best_ms": best_ms, "best_config": best_cfg, "best_rel_err_vs_default": best_err,
               "pct_floor_default": floor_ms / default_ms * 100, "pct_floor_best": floor_ms / best_ms * 100,
               "top5": [dict(ms=t, **c) for t, c, _ in sorted(timed, key=lambda t: t[0])[:5]]}
        result["rows"].append(row)
        print(f"{name} B={B:3d}: floor {floor_ms * 1e3:6.1f} us  default {default_ms * 1e3:6.1f} us "
              f"({row['pct_floor_default']:.0f}%)  best {best_ms * 1e3:6.1f} us ({row['pct_floor_best']:.0f}%) "
              f"{best_cfg}", flush=True)
    save_json(args.out, result)
    return 0


def cases(args, bw: float):
    """(layout, B, tiled, q, k, v, mask, floor ms) per layout and batch: the decode bench's cache
    shape; the floor at copy bandwidth `bw`."""
    S, vis, at = args.slots, args.visible, args.offset
    if not 0 <= at <= S - vis:
        raise SystemExit(f"--offset {at} and --visible {vis} must lie inside --slots {S}")
    for name, (G, R, d, tiled) in LAYOUTS.items():
        for B in map(int, args.batches.split(",")):
            q = torch.randn(B, G * R, 1, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(B, G, S, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(B, G, S, d, device="cuda", dtype=torch.bfloat16)
            slot = torch.arange(S, device="cuda")
            mask = ((slot >= at) & (slot < at + vis)).view(1, 1, 1, S).expand(B, 1, 1, S)
            floor_ms = (2 * B * G * vis * d + 2 * B * G * R * d) * 2 / bw * 1e3
            yield name, B, tiled, q, k, v, mask, floor_ms


def ab_main(args) -> int:
    """The default configuration with the code as it is (A) and with `--b` set (B), alternating."""
    from decode_ab import patch, setting

    module, attr, b_value = patch(args.b)
    a_value = getattr(module, attr)
    bw = ceilings()["copy_bytes_per_s"]
    result = {"device": torch.cuda.get_device_name(), "copy_bytes_per_s": bw, "b": args.b, "args": vars(args),
              "rows": []}
    for name, B, tiled, q, k, v, mask, floor_ms in cases(args, bw):
        run = functools.partial(triton_fused.decode_attention, q, k, v, mask, q.shape[-1] ** -0.5, tiled)
        times = {"A": [], "B": []}
        outs = {}
        for _ in range(args.rounds):
            for arm, value in (("B", b_value), ("A", a_value)):
                with setting(module, attr, value):
                    outs[arm] = run()
                    times[arm].append(graph_ms(run))
        med = {arm: statistics.median(t) for arm, t in times.items()}
        diff = ((outs["A"].float() - outs["B"].float()).norm() / outs["B"].float().norm()).item()
        us = {arm: [t * 1e3 for t in ts] for arm, ts in times.items()}
        result["rows"].append({"layout": name, "B": B, "floor_us": floor_ms * 1e3, "us": us,
                               "median_us": {arm: m * 1e3 for arm, m in med.items()}, "rel_diff_a_vs_b": diff})
        a_us, b_us, f_us = med["A"] * 1e3, med["B"] * 1e3, floor_ms * 1e3
        print(f"{name} B={B:3d}: floor {f_us:6.1f} us  A {a_us:6.1f} us ({f_us / a_us * 100:.0f}%)  "
              f"B {b_us:6.1f} us ({f_us / b_us * 100:.0f}%)  B/A {b_us / a_us:.3f}  rel diff {diff:.1e}", flush=True)
    save_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
