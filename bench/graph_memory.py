"""GPU memory that `generate()`'s kept static cache and CUDA graphs hold between calls.

A model keeps one static cache with its graphed decode step and a graphed prefill per prompt length
bucket (captured on a bucket's second use); the prefill graphs share one memory pool. For each batch
size this probe calls `generate` twice per bucket, bucket after bucket, and records the memory the
caching allocator holds (allocated and reserved) after each, with the peak of the first (eager,
uncaptured) call of each bucket for comparison; then `release_decode_cache()` and what that gives back.

    PYTHONPATH=.:bench python bench/graph_memory.py [--batches 1,8] [--buckets 128,512,2048] --out r.json
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch
from moe_layer import save_json  # bench/ is the script's directory

from moetorch.benchmark import SIZES, build, counts, model_names

GB = 2**30


def held_gb() -> tuple[float, float]:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / GB, torch.cuda.memory_reserved() / GB


def still_allocated(top: int, skip: set[int]) -> list[str]:
    """The `top` largest live allocations (with history recording on) whose addresses are not in
    `skip`, each with the innermost frames of the Python code that made it."""
    blocks = []
    for seg in torch.cuda.memory._snapshot()["segments"]:
        for blk in seg["blocks"]:
            if blk["state"] == "active_allocated" and blk["address"] not in skip:
                frames = [f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in blk.get("frames", [])
                          if f["filename"].endswith(".py") and "site-packages/torch/" not in f["filename"]][:4]
                blocks.append((blk["size"], frames))
    blocks.sort(key=lambda b: -b[0])
    return [f"  {size / 2**20:9.1f} MiB  " + " < ".join(frames) for size, frames in blocks[:top]]


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="phimoe")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--buckets", default="128,512,2048", help="prompt lengths (each one a bucket)")
    p.add_argument("--history", action="store_true",
                   help="record allocations; after each release, list the largest still allocated (not weights) "
                   "with where they came from")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.history:
        torch.cuda.memory._record_memory_history(max_entries=200000)
    rows = []
    for name in model_names(args.models):
        model = build(name, "moetorch", SIZES[name])
        V = SIZES[name]["vocab_size"]
        weights, _ = held_gb()
        for B in counts(args.batches):
            model.release_decode_cache()
            gc.collect()
            torch.cuda.empty_cache()
            base = held_gb()
            for T in counts(args.buckets):
                ids = torch.randint(0, V, (B, T), device="cuda")
                torch.cuda.reset_peak_memory_stats()
                model.generate(ids, max_new_tokens=2, do_sample=False, eos_token_id=None)  # eager prefill
                eager_peak = torch.cuda.max_memory_allocated() / GB
                model.generate(ids, max_new_tokens=2, do_sample=False, eos_token_id=None)  # captures
                alloc, reserved = held_gb()
                prefill = model._held_decode().prefill  # (no reference kept: release must free it)
                buckets = len(prefill.graphs) if prefill is not None else 0
                del prefill
                rows.append({"model": name, "batch": B, "prompt": T, "buckets_held": buckets,
                             "allocated_gb": alloc, "reserved_gb": reserved,
                             "above_weights_gb": alloc - weights, "eager_call_peak_gb": eager_peak})
                print(f"{name} b{B:<3d} after bucket {T:5d}: allocated {alloc:7.2f} GB (weights {weights:.2f}, "
                      f"held {alloc - base[0]:6.2f}), reserved {reserved:7.2f} GB, eager call's peak "
                      f"{eager_peak:7.2f} GB", flush=True)
            model.release_decode_cache()
            gc.collect()
            after = held_gb()
            torch.cuda.empty_cache()
            if args.history:
                own = {t.data_ptr() for t in (*model.parameters(), *model.buffers())}
                print("\n".join(still_allocated(8, own)), flush=True)
            rows.append({"model": name, "batch": B, "released_allocated_gb": after[0],
                         "released_reserved_after_empty_cache_gb": held_gb()[1]})
            print(f"{name} b{B:<3d} after release_decode_cache: allocated {after[0]:.2f} GB, reserved after "
                  f"empty_cache {held_gb()[1]:.2f} GB", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    save_json(args.out, {"device": torch.cuda.get_device_name(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
