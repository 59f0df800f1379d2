"""Prompt lookup decoding (`generate(prompt_lookup_num_tokens=N)`) against greedy search, moetorch
and Transformers, random weights at the real sizes, batch 1.

The prompt is a random --segment-token segment repeated --repeats times, so that n-grams recur
and lookups find drafts; the random models then tend to loop, which keeps finding them. Arms:
- `greedy`: plain greedy search (moetorch: the static cache's graphed steps);
- `lookup`: prompt lookup on the GPU default (moetorch: the static cache, verify forwards replayed
  from GraphedChunk's graphs, single tokens from the decode graph);
- `lookup-dynamic` (moetorch): prompt lookup with `cache_implementation="dynamic"`, eager forwards,
  which was the only path before the graphed chunks;
- `assistant`: `assistant_model=` a random model of the same sizes with --assistant-layers layers
  (moetorch: it drafts on its own held static cache, replaying its own graphs), at the assistant's
  default settings (up to 20 drafts, stopped where its confidence falls under 0.4);
- `assistant-dynamic` (moetorch): the same with `cache_implementation="dynamic"`, every forward of
  both models eager, which was the assistant's only path before.
Each arm: the best of --calls greedy `generate` calls of --new tokens after a warm-up call; the
target model's forwards are counted (graphed ones too), so tokens per forward tell how many drafts
verification kept. Transformers' arms run its own random weights (its tokens, and so its drafts'
acceptance, differ): compare its tokens per forward with ours before its tokens/s.

    PYTHONPATH=.:bench python bench/assisted.py [--models jetmoe,phimoe] --out r.json
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from moe_layer import save_json  # bench/ is the script's directory

from moetorch.benchmark import SIZES, build, log, model_names


def counted_forwards(model, lib: str):
    """A list that grows by one per target forward (graphed ones included), and the undo."""
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    undo = [hook.remove]
    if lib == "moetorch":
        from moetorch.engine import cuda_graph

        for cls in (cuda_graph.GraphedChunk, cuda_graph.GraphedDecodeStep, cuda_graph.GraphedPrefill):
            original = cls.__call__

            def spy(self, *args, _original=original):
                before = len(calls)
                out = _original(self, *args)
                # a replay of the target's (an eager run counts in the hook; an assistant's runs do not count)
                if out is not None and len(calls) == before and self.model is model:
                    calls.append(1)
                return out

            cls.__call__ = spy
            undo.append(lambda cls=cls, original=original: setattr(cls, "__call__", original))
    return calls, undo


def run_arm(model, lib: str, ids, new: int, calls: int, **kw) -> tuple[dict, torch.Tensor]:
    kw = dict(max_new_tokens=new, do_sample=False, **kw)
    if lib == "moetorch":
        kw["eos_token_id"] = None
    else:
        kw["min_new_tokens"] = new
    out = model.generate(ids, **kw)  # warm-up: Triton compiles, graph captures
    counted, undo = counted_forwards(model, lib)
    best, forwards = float("inf"), 0
    try:
        for _ in range(calls):
            counted.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            torch.cuda.synchronize()
            if time.perf_counter() - t0 < best:
                best, forwards = time.perf_counter() - t0, len(counted)
    finally:
        for fn in undo:
            fn()
    return {"call_s": best, "tokens_per_s": new / best, "forwards": forwards,
            "tokens_per_forward": new / max(forwards - 1, 1)}, out  # the prompt's forward aside


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/assisted.py")
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--segment", type=int, default=64)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens")
    p.add_argument("--assistant-layers", type=int, default=2, help="0: no assistant arms")
    p.add_argument("--arms", default="greedy,lookup,lookup-dynamic,assistant,assistant-dynamic",
                   help="a comma list of the arms to run (greedy always runs: the others are checked against it)")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--hf-calls", type=int, default=1)
    p.add_argument("--libs", default="moetorch,transformers")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = {"device": torch.cuda.get_device_name(), "segment": args.segment, "repeats": args.repeats,
              "new": args.new, "prompt_lookup_num_tokens": args.lookup, "assistant_layers": args.assistant_layers,
              "models": {}}
    for name in model_names(args.models):
        torch.manual_seed(0)
        segment = torch.randint(1, SIZES[name]["vocab_size"], (1, args.segment), device="cuda")
        ids = segment.repeat(1, args.repeats)
        rows = result["models"][name] = {}
        for lib in args.libs.split(","):
            model = build(name, lib, SIZES[name])
            calls = args.calls if lib == "moetorch" else args.hf_calls
            arms = {"greedy": {}, "lookup": dict(prompt_lookup_num_tokens=args.lookup)}
            if lib == "moetorch":
                arms["lookup-dynamic"] = dict(prompt_lookup_num_tokens=args.lookup, cache_implementation="dynamic")
            if args.assistant_layers:
                assistant = build(name, lib, {**SIZES[name], "num_hidden_layers": args.assistant_layers})
                arms["assistant"] = dict(assistant_model=assistant)
                if lib == "moetorch":
                    arms["assistant-dynamic"] = dict(assistant_model=assistant, cache_implementation="dynamic")
            wanted = {"greedy", *args.arms.split(",")}
            arms = {arm: kw for arm, kw in arms.items() if arm in wanted}
            outs = {}
            for arm, kw in arms.items():
                rows[f"{lib}/{arm}"], outs[arm] = run_arm(model, lib, ids, args.new, calls, **kw)
                if arm != "greedy":
                    rows[f"{lib}/{arm}"]["same_tokens_as_greedy"] = torch.equal(outs[arm], outs["greedy"])
                r = rows[f"{lib}/{arm}"]
                log(f"{name} {lib}/{arm}: {r['tokens_per_s']:.1f} tok/s, "
                    f"{r['tokens_per_forward']:.2f} tokens a forward")
            del model, outs, arms
            gc.collect()
            torch.cuda.empty_cache()
        for arm in ("lookup", "assistant"):
            ours = rows.get(f"moetorch/{arm}", {})
            for other in ("moetorch/greedy", f"moetorch/{arm}-dynamic", f"transformers/{arm}", "transformers/greedy"):
                if other in rows and ours:
                    speedup = ours["tokens_per_s"] / rows[other]["tokens_per_s"]
                    rows[f"{arm}_speedup_vs_{other.replace('/', '_')}"] = speedup
    print({n: {k: v for k, v in r.items() if "speedup" in k} for n, r in result["models"].items()})
    save_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
