"""Beam search through `generate()`: the static cache with graphed steps against eager steps.

On a GPU, beam search now decodes from a static cache (reordered in place between steps) whose steps
replay a captured CUDA graph, kept between calls, as greedy search does, and decides whether to go
on one step late. Arms, taking turns call by call on one model: `graphed` (the default: each prompt
runs once for its beams, and the cache's keys and values stay in place, read through its
`slot_rows`), `graphed_rows` (`prompt_once = False`: every beam's prompt runs),
`graphed_moved` (`beam_slot_rows = False` too: each step moves the cache's filled slots into the
reordered rows), `graphed_each_step`
(`lagged_stop = False`: the decision read every step), `static_eager` (the same
cache, `decode_graphs = False`: the same kernels launched one by one, so the same tokens) and
`dynamic` (`cache_implementation="dynamic"`: eager steps on a growing cache, what beam search ran
before). With `--hf`, Transformers' `generate` on the same sizes (random weights of its own) for
one call, for scale. With `--profile`, one call of each graphed arm and of greedy search at as
many rows under the profiler: its kernels by total time and the GPU's idle stretches (what the
host's bookkeeping between steps leaves idle).

Random weights at the real sizes, a 128-token prompt, `--beams` beams, `--new` new tokens (no EOS,
so every call runs them all), medians of `--calls` calls after warm-up calls per arm (which capture
the prompt's graph: on its second use). The prompt's
length is a prefill bucket, so the graphed arm's prompt is not padded and its tokens must equal the
eager arm's.

    PYTHONPATH=.:bench python bench/beam_calls.py [--models jetmoe,phimoe] [--beams 4] [--new 64] [--prompt 128]
        [--hf] [--profile] --out r.json
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from functools import partial

import torch
from generate_calls import call_s  # bench/ is the script's directory
from moe_layer import save_json
from prefill_probe import idle_lines

from moetorch.benchmark import SIZES, build, kernel_lines, kernel_times, model_names
from moetorch.engine.cuda_graph import PREFILL_CAPTURE_AFTER


def run(model, ids, arm: str, beams: int, new: int) -> tuple[float, torch.Tensor]:
    model.decode_graphs = arm != "static_eager"
    model.lagged_stop = arm != "graphed_each_step"
    model.beam_slot_rows = arm != "graphed_moved"
    model.prompt_once = arm not in ("graphed_moved", "graphed_rows")
    cache = "dynamic" if arm == "dynamic" else None
    return call_s(model, ids, new, num_beams=beams, cache_implementation=cache)


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--hf", action="store_true", help="also time Transformers' generate (one call)")
    p.add_argument("--profile", action="store_true", help="list one call's kernels and GPU idle stretches")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for name in model_names(args.models):
        V = SIZES[name]["vocab_size"]
        ids = torch.randint(0, V, (1, args.prompt), device="cuda")
        model = build(name, "moetorch", SIZES[name])
        arms = ("graphed", "graphed_rows", "graphed_moved", "graphed_each_step", "static_eager", "dynamic")
        ms, outs = {a: [] for a in arms}, {}
        for _ in range(PREFILL_CAPTURE_AFTER):  # compile, capture (a prompt is captured on its second use)
            for arm in arms:
                outs[arm] = run(model, ids, arm, args.beams, args.new)[1]
        for _ in range(args.calls):
            for arm in arms:
                s, out = run(model, ids, arm, args.beams, args.new)
                ms[arm].append(s * 1e3)
                outs[arm] = out
        same = torch.equal(outs["graphed"], outs["static_eager"])
        for arm in arms:
            med = statistics.median(ms[arm])
            rows.append({"model": name, "lib": "moetorch", "arm": arm, "beams": args.beams, "new_tokens": args.new,
                         "calls_ms": ms[arm], "median_ms": med, "ms_per_token": med / args.new,
                         "same_tokens_as_graphed": torch.equal(outs[arm], outs["graphed"])})
            print(f"{name} {arm:12s} {args.beams} beams, {args.new} tokens: median {med:8.1f} ms "
                  f"({med / args.new:6.2f} ms/token)  same tokens as graphed: {rows[-1]['same_tokens_as_graphed']}",
                  flush=True)
        if not same:
            print(f"{name}: graphed beam search returned other tokens than its eager steps", flush=True)
        if args.profile:
            model.decode_graphs, model.lagged_stop = True, True
            model.beam_slot_rows = model.prompt_once = True
            profiles = {
                f"{args.beams} beams": partial(run, model, ids, "graphed", args.beams, args.new),
                f"{args.beams} beams, sampled": partial(call_s, model, ids, args.new, num_beams=args.beams,
                                                        do_sample=True),
                f"greedy, {args.beams} rows": partial(call_s, model, ids.expand(args.beams, -1), args.new),
            }
            for title, fn in profiles.items():
                fn()  # capture what this arm needs first
                lines = [f"# {name}, {title}, {args.new} new tokens",
                         *kernel_lines(kernel_times(fn), args.top), *idle_lines(fn, args.top)]
                rows.append({"model": name, "profile": title, "lines": lines})
                print("\n".join(lines), flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        if args.hf:
            hf = build(name, "transformers", SIZES[name])
            call_s(hf, ids, 2, num_beams=args.beams)
            s, _ = call_s(hf, ids, args.new, num_beams=args.beams)
            rows.append({"model": name, "lib": "transformers", "arm": "default", "beams": args.beams,
                         "new_tokens": args.new, "median_ms": s * 1e3, "ms_per_token": s * 1e3 / args.new})
            print(f"{name} transformers {args.beams} beams, {args.new} tokens: {s * 1e3:8.1f} ms "
                  f"({s * 1e3 / args.new:6.2f} ms/token)", flush=True)
            del hf
            gc.collect()
            torch.cuda.empty_cache()
    save_json(args.out, {"device": torch.cuda.get_device_name(), "prompt": args.prompt, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
