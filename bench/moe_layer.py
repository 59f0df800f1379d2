"""One MoE layer (the norm before it, router + experts) per token count, per expert backend,
against its floors: `moetorch.layer_bench` (which `moetorch bench` also runs, for the triton
backend), with more backends, routing forced balanced, and config overrides.

    PYTHONPATH=. python bench/moe_layer.py --out results.json [--tokens 1,8,64,512,4096,16384]

Backends: triton, grouped_mm, and gather for T <= 64; with `--chain L` (default 8) the triton
backend is also timed as L layers back to back in one graph (see `moetorch.layer_bench`). The same
run measures the ceilings as `moetorch bench` does (`benchmark.measure_ceilings`).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton

from moetorch import layer_bench
from moetorch.benchmark import config_override, measure_ceilings
from moetorch.layer_bench import (
    LAYERS,
    TOKENS,
    K,
    graph_ms,  # noqa: F401 (the other bench scripts import it from here)
    measure,
    print_table,
)


def ceilings() -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s, measured here: each
    the fastest of 30 runs, as `moetorch bench` takes them (a median moves by several percent); and
    the matmul rate sustained over seconds (`benchmark.measure_ceilings`)."""
    return measure_ceilings()


def save_json(path: str | None, result: dict) -> None:
    """Write a bench result (when a path was given)."""
    if path:
        with open(path, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")


def override_configs(values: dict) -> None:
    """Make `triton_moe.get_config` answer with `values` set in each sorted-path entry."""
    from moetorch.ops import triton_moe as tm

    real = tm.get_config

    def get_config(*args, **kwargs):
        cfg = real(*args, **kwargs)
        if cfg.get("GEMV") or tm.use_small_kernel(args[6], K):
            return cfg
        cfg.update(values)
        return cfg

    tm.get_config = get_config


@torch.no_grad()
def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--layers", default=",".join(LAYERS))
    parser.add_argument("--backends", default="grouped_mm,triton,gather")
    parser.add_argument("--chain", type=int, default=8,
                        help="also time the triton backend as this many layers back to back in one graph (0: off)")
    parser.add_argument("--balanced", action="store_true",
                        help="route token t to experts t %% E and (t + E/2) %% E (no padded blocks at T*K/E = "
                             "a multiple of BLOCK_M): what the expert kernels reach without the padding")
    parser.add_argument("--kernels", type=int, default=0,
                        help="list this many of the triton layer's kernels by time (one eager call) per row")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=INT", type=config_override,
                        help="override a key in every config of the triton backend's sorted path (an integer, "
                             "e.g. num_stages=3): an A/B of one setting on every shape; repeatable")
    args = parser.parse_args()
    layer_bench.BALANCED = args.balanced
    if args.set:
        override_configs(dict(args.set))
    ceil = ceilings()
    print(f"copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul {ceil['bf16_flops_per_s'] / 1e12:.0f} "
          f"TFLOP/s (sustained {ceil['bf16_flops_per_s_sustained'] / 1e12:.0f})", flush=True)
    rows = measure({name: LAYERS[name] for name in args.layers.split(",")}, [int(t) for t in args.tokens.split(",")],
                   args.backends.split(","), ceil, chain=args.chain, kernels=args.kernels,
                   log=lambda line: print(line, flush=True))
    print_table(rows)
    save_json(args.out, {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "triton": triton.__version__, "ceilings": ceil, "balanced": args.balanced,
                         "set": dict(args.set), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
