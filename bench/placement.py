"""A model placed over the GPU and the CPU (`from_pretrained(device_map=..., max_memory=...)`),
against the same checkpoint on the GPU alone, moetorch and Transformers (with accelerate) alike.

Random weights at the real sizes are saved once as a checkpoint, then loaded in each arm:
- `gpu`: `device="cuda"` (moetorch's `generate` then decodes on the static cache's CUDA graphs);
- `auto`: `device_map="auto"`, which must keep a model that fits on the GPU (`hf_device_map` {"": 0});
- `gpu-dynamic`: the `gpu` model with `cache_implementation="dynamic"`: eager steps, what a model
  over several GPUs runs, without the copies between them;
- `split`: `device_map="sequential"` with `max_memory={0: --gpu-budget, "cpu": ...}`: the first
  layers on the GPU, the rest placed on the CPU. moetorch runs those on the GPU too, their MLP
  experts' weights read from pinned host memory (static cache, graphed steps); Transformers'
  accelerate keeps them on the CPU and copies them to the GPU for each forward.
Each arm times greedy `generate` of 1 and of --new tokens after a --prompt-token prompt (batch
1), best of --calls (--split-calls for the split arms) after a warm-up call each, and reports the
call's tokens/s, the decode rate (from the difference of the two) and the load time. Tokens are compared with the
`gpu` arm's (bf16 layers on the CPU round otherwise: informative).

    PYTHONPATH=.:bench python bench/placement.py [--model jetmoe] [--gpu-budget 8GiB] --out r.json
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time

import torch
from moe_layer import save_json  # bench/ is the script's directory

from moetorch.benchmark import SIZES, build, log


def timed_generate(model, ids, new: int, calls: int, **kw) -> tuple[float, torch.Tensor]:
    """Best wall time of `calls` greedy generate calls of `new` tokens (after one to warm up), and
    their tokens."""
    out = model.generate(ids, max_new_tokens=new, do_sample=False, **kw)
    best = float("inf")
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, do_sample=False, **kw)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def arm(lib: str, name: str, cls, path: str, ids, args, want, **load) -> tuple[dict, torch.Tensor | None]:
    """Load, then time calls of 1 token (the prompt's forward) and of --new tokens: the decode rate
    is the difference's. moetorch runs without an EOS id, Transformers with min_new_tokens."""
    gen = load.pop("generate", {})
    if lib == "moetorch":
        gen["eos_token_id"] = None
    else:
        gen["min_new_tokens"] = args.new
    calls = args.split_calls if "max_memory" in load else args.calls
    t0 = time.perf_counter()
    model = cls.from_pretrained(path, dtype=torch.bfloat16, **load)
    load_s = time.perf_counter() - t0
    where = getattr(model, "hf_device_map", {"": str(model.device)})
    row = {"load_s": load_s, "devices": sorted({str(v) for v in where.values()}),
           "modules_on_cpu": sum(v == "cpu" for v in where.values()), "hf_device_map": where}
    try:
        one = {k: v for k, v in gen.items() if k != "min_new_tokens"}
        first, _ = timed_generate(model, ids.to(model.device), 1, calls, **one)
        wall, out = timed_generate(model, ids.to(model.device), args.new, calls, **gen)
    except RuntimeError as e:  # recorded, not fatal: the other arms still run
        row["error"] = f"{type(e).__name__}: {e}"
        log(f"{lib}/{name}: {row['error']}")
        out = None
    else:
        row.update(call_s=wall, prompt_call_s=first, tokens_per_s=args.new / wall,
                   decode_tokens_per_s=(args.new - 1) / (wall - first))
        if want is not None:
            row["same_tokens_as_gpu"] = torch.equal(out.cpu(), want.cpu())
        log(f"{lib}/{name}: call {wall:.3f} s ({args.new / wall:.1f} tok/s), decode {row['decode_tokens_per_s']:.1f} "
            f"tok/s, load {load_s:.1f} s, {row['modules_on_cpu']} modules on the CPU")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return row, out


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/placement.py")
    p.add_argument("--model", default="jetmoe", choices=sorted(SIZES))
    p.add_argument("--gpu-budget", default="8GiB", help="max_memory for GPU 0 in the split arm")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--calls", type=int, default=3, help="timed calls of each length on one device")
    p.add_argument("--split-calls", type=int, default=1, help="timed calls of each length in the split arms")
    p.add_argument("--libs", default="moetorch,transformers")
    p.add_argument("--dir", default=None, help="where to write the checkpoint (a temporary directory by default)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    split = dict(device_map="sequential", max_memory={0: args.gpu_budget, "cpu": "200GiB"})
    result = {"model": args.model, "device": torch.cuda.get_device_name(), "prompt": args.prompt, "new": args.new,
              "gpu_budget": args.gpu_budget, "arms": {}}
    with tempfile.TemporaryDirectory(dir=args.dir) as path:
        torch.manual_seed(0)
        model = build(args.model, "moetorch", SIZES[args.model])
        t0 = time.perf_counter()
        model.save_pretrained(path)
        log(f"saved {model.get_memory_footprint() / 2**30:.1f} GiB in {time.perf_counter() - t0:.1f} s")
        del model
        torch.cuda.empty_cache()
        ids = torch.randint(1, SIZES[args.model]["vocab_size"], (1, args.prompt), device="cuda")
        for lib in args.libs.split(","):
            if lib == "moetorch":
                import moetorch as m
            else:
                import transformers as m
            cls = getattr(m, {"jetmoe": "JetMoeForCausalLM", "phimoe": "PhimoeForCausalLM"}[args.model])
            rows = result["arms"][lib] = {}
            rows["gpu"], want = arm(lib, "gpu", cls, path, ids, args, None, device_map="cuda")
            if lib == "moetorch":
                rows["auto"], _ = arm(lib, "auto", cls, path, ids, args, want, device_map="auto")
                rows["gpu-dynamic"], _ = arm(lib, "gpu-dynamic", cls, path, ids, args, want, device_map="cuda",
                                             generate=dict(cache_implementation="dynamic"))
            rows["split"], _ = arm(lib, "split", cls, path, ids, args, want, **split)
    ours, theirs = result["arms"].get("moetorch", {}), result["arms"].get("transformers", {})
    for name in ("gpu", "split"):
        if "tokens_per_s" in ours.get(name, {}) and "tokens_per_s" in theirs.get(name, {}):
            result[f"{name}_speedup_vs_transformers"] = ours[name]["tokens_per_s"] / theirs[name]["tokens_per_s"]
    print({k: v for k, v in result.items() if k != "arms"})
    save_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
