"""The expert GEMMs with and without a code path, interleaved in one process.

    PYTHONPATH=. python bench/gemm_ab.py --b moetorch.ops.triton_moe:tma_enabled=off [--tokens 2048,4096,16384]
        [--shapes phimoe,jetmoe,jetmoe_moa] [--ops gate_up] [--rounds 5] [--out r.json]
    PYTHONPATH=. python bench/gemm_ab.py --b-config PERSISTENT=1 --b-config num_stages=3 ...

Each GEMM of each layer shape (`tune_moe.py`'s: PhiMoE and JetMoE SwiGLU experts, JetMoE attention
experts) runs at T tokens with the block sizes the config JSON gives it, as `tune_moe.py` times it
(random routing, `triton.testing.do_bench` medians with L2 flushed). Arm A runs the code as it is,
arm B with `module:attribute` set to the value given (an int, or `off`: a function returning
False), or with `--b-config` keys set in each GEMM's config (a down GEMM keeps gate/up's BLOCK_M,
which the alignment fixes). The arms alternate for `--rounds` rounds, so clock and thermal drift
fall on both; the median of each arm is reported with its spread. One timing of a prefill-size
GEMM moves by up to 10% between runs on the H200, more than most changes it is meant to judge.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import triton.testing
from decode_ab import patch, setting
from tune_moe import DTYPE, SPECS, K, make_inputs, op_runner, ops_of

from moetorch.benchmark import config_override


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--b", default=None, help="module:attribute=off|<int>")
    p.add_argument("--b-config", action="append", default=[], metavar="KEY=INT", type=config_override,
                   help="arm B: this key of each GEMM's config set to this value (repeatable)")
    p.add_argument("--tokens", default="2048,4096,16384")
    p.add_argument("--shapes", default=",".join(SPECS))
    p.add_argument("--ops", default=None, help="only these GEMMs (gate_up, down, map, reduce)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from moetorch.ops import triton_moe as tm

    if (args.b is None) == (not args.b_config):
        p.error("give --b or --b-config (either, not both)")
    b_config = dict(args.b_config)
    if args.b:
        module, attr, b_value = patch(args.b)

    def arm_b(fn):
        def run():
            with setting(module, attr, b_value):
                fn()
        return run
    rows = []
    for name in args.shapes.split(","):
        spec = SPECS[name]
        for T in map(int, args.tokens.split(",")):
            inp, aligned = make_inputs(spec, T, fill=True), {}
            for op, n_out, k_dim, _ in ops_of(spec):
                if args.ops and op not in args.ops.split(","):
                    continue
                cfg = tm.get_config(op, spec["E"], n_out, k_dim, DTYPE, T, T * K, torch.device("cuda"))
                if op == "down":  # shares gate/up's alignment, hence its BLOCK_M
                    up = tm.get_config("gate_up", spec["E"], spec["I"], spec["D"], DTYPE, T, T * K,
                                       torch.device("cuda"))
                    cfg["BLOCK_M"] = up["BLOCK_M"]
                fn = op_runner(spec, inp, op, cfg, aligned)
                if b_config:
                    cfg_b = {**cfg, **b_config, **({"BLOCK_M": cfg["BLOCK_M"]} if op == "down" else {})}
                    fns = {"A": fn, "B": op_runner(spec, inp, op, cfg_b, aligned)}
                else:
                    cfg_b, fns = None, {"A": fn, "B": arm_b(fn)}
                times = {"A": [], "B": []}
                for _ in range(args.rounds):
                    for arm, f in fns.items():
                        times[arm].append(triton.testing.do_bench(f, warmup=5, rep=40, return_mode="median"))
                row = {"shape": name, "op": op, "T": T, "config": cfg, "config_b": cfg_b, "times_ms": times,
                       **{f"{arm}_median_ms": statistics.median(t) for arm, t in times.items()}}
                row["B_over_A"] = row["B_median_ms"] / row["A_median_ms"]
                rows.append(row)
                arms = "  ".join(f"{arm} {statistics.median(t) * 1e3:8.1f} us ({min(t) * 1e3:.0f}-{max(t) * 1e3:.0f})"
                                 for arm, t in times.items())
                print(f"{name:11s} T={T:6d} {op:8s} {arms}  B/A {row['B_over_A']:.3f}", flush=True)
            del inp, aligned
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "b": args.b, "b_config": b_config, "rounds": args.rounds,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
