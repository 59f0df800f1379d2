"""`generate()` end to end, call after call: what a user's call costs beyond its decode steps.

A `generate` call on a GPU decodes from a `StaticCache` whose steps replay a captured CUDA graph
(`GraphedDecodeStep`). The model keeps that cache and its graphs for the next call of the same
batch and length bucket (`held`), the prompt's graph too (`GraphedPrefill`, captured on a bucket's
second use); the `fresh` arm frees them before each call (`release_decode_cache`), so that every
call allocates a cache and captures its decode step again. This probe times whole greedy calls
(random weights at the real sizes, batch 1, a `--prompt`-token prompt) for 1, 2 and N new tokens,
several calls each, one arm's calls after the other (the held arm's first calls capture): 1 token
is the prefill alone, 2 adds the first decode step, each later token one replayed step. A prompt
is padded to its bucket on every call, captured or not, so each call's tokens must equal the first
call's: the count of calls that differ is reported.

    PYTHONPATH=.:bench python bench/generate_calls.py [--models jetmoe,phimoe] [--new 1,2,33,129] --out r.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from moe_layer import save_json  # bench/ is the script's directory

from moetorch.benchmark import SIZES, build, model_names


def call_s(model, ids, new: int, eos_token_id=None, **settings) -> tuple[float, torch.Tensor]:
    """Seconds of one generate() call (greedy unless `settings` say otherwise; synchronized around
    it) and its output."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, eos_token_id=eos_token_id, **{"do_sample": False, **settings})
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--new", default="1,2,33,129", help="new tokens per call")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for name in model_names(args.models):
        model = build(name, "moetorch", SIZES[name])
        ids = torch.randint(0, SIZES[name]["vocab_size"], (1, args.prompt), device="cuda")
        call_s(model, ids, 2)  # compile the kernels once
        for new in (int(v) for v in args.new.split(",")):
            times, want = {"fresh": [], "held": []}, None
            differ = {"held": 0, "fresh": 0}
            for arm in times:  # in blocks: a fresh call would free what the held calls keep
                model.release_decode_cache()
                for _ in range(args.calls):
                    if arm == "fresh":
                        model.release_decode_cache()
                    s, out = call_s(model, ids, new)
                    times[arm].append(s)
                    want = out if want is None else want
                    differ[arm] += not torch.equal(out, want)
            for arm, ts in times.items():
                med = statistics.median(ts)
                rows.append({"model": name, "arm": arm, "new_tokens": new, "calls_ms": [t * 1e3 for t in ts],
                             "median_ms": med * 1e3, "calls_with_other_tokens": differ[arm]})
                print(f"{name} {arm:5s} new={new:4d}: median {med * 1e3:8.1f} ms  calls "
                      + " ".join(f"{t * 1e3:.1f}" for t in ts) + f"  other tokens in {differ[arm]} calls",
                      flush=True)
        news = sorted({r["new_tokens"] for r in rows if r["model"] == name})
        if len(news) >= 2:  # a decode step inside generate, from the two longest lengths
            a, b = news[-2], news[-1]
            # held calls only: every fresh call captures, whose cost varies more than the steps
            ms = {r["new_tokens"]: r["median_ms"] for r in rows if r["model"] == name and r["arm"] == "held"}
            step = (ms[b] - ms[a]) / (b - a)
            rows.append({"model": name, "arm": "held", "step_ms": step})
            print(f"{name} held  a step inside generate: {step:.3f} ms ({1e3 / step:.1f} tok/s)", flush=True)
        del model
        torch.cuda.empty_cache()
    save_json(args.out, {"device": torch.cuda.get_device_name(), "prompt": args.prompt, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
