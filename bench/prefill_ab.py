"""Whole-model prefill, A/B in one process: the grouped GEMMs with pointer loads (`triton_moe.TMA = False`),
with tensor descriptors, and with the gate/up rows gathered first (ops.triton_moe.GATHER_MIN_ROWS);
or, with `--b module:attribute=off|<int>`, the code as it is (A) against that attribute set (B);
or, with `--b-configs FILE`, against the expert kernels' block sizes from FILE (decode_ab.py's).

    PYTHONPATH=. python bench/prefill_ab.py --models jetmoe,phimoe --out results.json
    PYTHONPATH=. python bench/prefill_ab.py --b moetorch.ops.triton_moe:SELF_COUNT_MAX_ROWS=0

Random weights at the real sizes (moetorch.benchmark.SIZES), prompts of 2048 and 8192 tokens,
three interleaved rounds; the best round of each variant is printed, all rounds go to the JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from functools import partial

import torch
from decode_ab import configs_from, patch, size_override  # bench/ is the script's directory

import moetorch.ops.triton_moe as tm
from moetorch.benchmark import SIZES, build, cuda_time
from moetorch.engine import capture

# name: (triton_moe.TMA, GATHER_MIN_ROWS)
VARIANTS = {"pointer": (False, 10**9), "tma": (True, 10**9), "tma+gather": (True, tm.GATHER_MIN_ROWS)}


def load_mode(tma: bool, gather_min: int) -> None:
    tm.TMA, tm.GATHER_MIN_ROWS = tma, gather_min


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--tokens", default="2048,8192")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--b", default=None, help="module:attribute=off|<int>: A/B that instead of the load modes")
    p.add_argument("--b-configs", default=None, help="a config JSON for the expert kernels: A/B that instead")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--size", action="append", default=[], type=size_override, metavar="KEY=INT",
                   help="a config field of the models set to another integer (repeatable)")
    p.add_argument("--graphed", action="store_true",
                   help="also time each arm's forward captured in a CUDA graph: its GPU time, no host launches")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.b or args.b_configs:
        module, attr, b_value = patch(args.b) if args.b else configs_from(args.b_configs)
        arms = {"A": getattr(module, attr), "B": b_value}
        variants = {tag: partial(setattr, module, attr, value) for tag, value in arms.items()}
    else:
        variants = {tag: partial(load_mode, tma, gather_min) for tag, (tma, gather_min) in VARIANTS.items()}
    before = tm.TMA, tm.GATHER_MIN_ROWS
    res = {"device": torch.cuda.get_device_name(), "tokens_per_s": {}}
    for name in args.models.split(","):
        model = build(name, "moetorch", {**SIZES[name], **dict(args.size)}, dtype=getattr(torch, args.dtype))
        for T in map(int, args.tokens.split(",")):
            ids = torch.randint(0, SIZES[name]["vocab_size"], (1, T), device="cuda")
            runs, graphed = {}, {}
            forward = partial(model, ids, use_cache=False, logits_to_keep=1)
            for _ in range(args.rounds):
                for tag, select in variants.items():
                    select()
                    t = cuda_time(forward, repeats=3, warmup=1)
                    runs.setdefault(tag, []).append(T / t)
                    if args.graphed:  # the arm's kernels, captured as it launches them
                        graph, _ = capture(forward)
                        graphed.setdefault(tag, []).append(T / cuda_time(graph.replay, repeats=3, warmup=1))
                        del graph
            res["tokens_per_s"][f"{name}.{T}"] = runs
            print(name, T, {tag: round(max(v)) for tag, v in runs.items()}, "tok/s", flush=True)
            if graphed:
                res.setdefault("graphed_tokens_per_s", {})[f"{name}.{T}"] = graphed
                print(name, T, "graphed", {tag: round(max(v)) for tag, v in graphed.items()}, "tok/s", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    tm.TMA, tm.GATHER_MIN_ROWS = before
    if args.b or args.b_configs:
        variants["A"]()
        res["b"] = args.b or f"configs {args.b_configs}"
    res["dtype"], res["sizes"] = args.dtype, dict(args.size)
    res["moe_config_env"] = os.environ.get("MOETORCH_MOE_CONFIG")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
