"""Sampling several sequences per prompt (`num_return_sequences`) through `generate()`: each prompt
run once for the rows that repeat it (`prompt_once`, the default on a static cache: the other rows
read its slots through the cache's `slot_rows`) against once per row (`prompt_once = False`).

Random weights at the real sizes, one prompt of `--prompt` tokens, `--sequences` sequences of `--new`
tokens (top-k 50, no EOS, so every call runs them all), arms taking turns call by call on one model,
each seeded alike, medians of `--calls` calls after warm-up calls per arm (which capture its graphs).

    PYTHONPATH=.:bench python bench/sequences_calls.py [--models jetmoe,phimoe] [--sequences 4] [--new 32]
        [--prompt 128] --out r.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys

import torch
from generate_calls import call_s  # bench/ is the script's directory
from moe_layer import save_json

from moetorch.benchmark import SIZES, build, model_names
from moetorch.engine.cuda_graph import PREFILL_CAPTURE_AFTER


def run(model, ids, arm: str, sequences: int, new: int) -> tuple[float, torch.Tensor]:
    model.prompt_once = arm == "once"
    torch.manual_seed(0)
    return call_s(model, ids, new, do_sample=True, top_k=50, num_return_sequences=sequences)


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for name in model_names(args.models):
        ids = torch.randint(0, SIZES[name]["vocab_size"], (1, args.prompt), device="cuda")
        model = build(name, "moetorch", SIZES[name])
        arms = ("once", "every_row")
        ms, outs = {a: [] for a in arms}, {}
        for _ in range(PREFILL_CAPTURE_AFTER):  # the prompt's graph is captured on its second use
            for arm in arms:
                run(model, ids, arm, args.sequences, args.new)
        for _ in range(args.calls):
            for arm in arms:
                s, outs[arm] = run(model, ids, arm, args.sequences, args.new)
                ms[arm].append(s * 1e3)
        for arm in arms:
            med = statistics.median(ms[arm])
            rows.append({"model": name, "arm": arm, "sequences": args.sequences, "new_tokens": args.new,
                         "calls_ms": ms[arm], "median_ms": med,
                         "same_tokens_as_once": torch.equal(outs[arm], outs["once"])})
            print(f"{name} {arm:9s} {args.sequences} sequences of {args.new} tokens: median {med:8.1f} ms  "
                  f"same tokens as once: {rows[-1]['same_tokens_as_once']}", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    save_json(args.out, {"device": torch.cuda.get_device_name(), "prompt": args.prompt, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
