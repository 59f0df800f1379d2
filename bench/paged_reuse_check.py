"""Paged continuous batching on the GPU (DevicePages): requests that take rows freed while others
decode get the tokens of their own `generate` call.

A free row inside a decode step's bucket computes a throwaway token and writes its key and value at
the column into its row, where a page may still be held (a finished request's tokens kept for
prompts to start from); a request that takes the row later has those slots masked. On the CPU the
unheld pages are poisoned, the free row wrote NaN there and the request's tokens were garbage, so
`_Batch.clear_before` zeroes those slots on poisoned pages (tests/test_pages.py). On the GPU's mapped
pages nothing is zeroed: this runs the same pattern, and random waves of requests, there, with the
tiny float32 models of bench/batching.py, sharing on and off.

    PYTHONPATH=.:bench python3 bench/paged_reuse_check.py --out bench/results/<gpu>-<date>-paged-reuse-check.json
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

import moetorch


def alone(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=n, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    return out[0, len(prompt):].tolist()


def freed_row(model, share: bool) -> dict:
    """The pattern of tests/test_pages.py: a request ends, its row is free for some steps, a later
    request takes it."""
    config = moetorch.GenerationConfig(max_new_tokens=30, do_sample=False, pad_token_id=0, eos_token_id=None)
    m = model.init_continuous_batching(generation_config=config, continuous_batching_config=dict(
        max_requests_per_batch=2, paged=True, page_size=16, allow_block_sharing=share, max_cache_len=64))
    first, long, later = [5, 6, 7, 8], list(range(10, 30)), [40, 41]
    m.add_request(first, request_id="first", max_new_tokens=2)
    m.add_request(long, request_id="long", max_new_tokens=30, streaming=True)
    m.start()
    try:
        for out in m.request_id_iter("long"):
            if len(out.generated_tokens) >= 8:
                break
        with m.pause():
            m.add_request(later, request_id="later", max_new_tokens=6)
        got = m.get_result("later", timeout=120)
        done = next(out for out in m.request_id_iter("long") if out.is_finished())
        paged = m._batch.pages is not None
    finally:
        m.stop(block=True, timeout=30)
    ok = got is not None and got.generated_tokens == alone(model, later, 6) and \
        done.generated_tokens == alone(model, long, 30)
    return {"ok": ok, "paged": paged, "later": got.generated_tokens if got else None}


def waves(model, share: bool, seed: int) -> dict:
    """Waves of random requests through one manager: each wave's requests take rows that the one
    before freed (and finished rows kept for sharing)."""
    rng = random.Random(seed)
    config = moetorch.GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    m = model.init_continuous_batching(generation_config=config, continuous_batching_config=dict(
        max_requests_per_batch=4, paged=True, page_size=16, allow_block_sharing=share, max_cache_len=96))
    stem = [rng.randrange(1, 97) for _ in range(20)]
    wanted, bad = {}, []
    m.start()
    try:
        for wave in range(4):
            for i in range(rng.randint(2, 6)):
                prompt = (stem[:rng.randint(0, 20)] if share else []) + [rng.randrange(1, 97)
                                                                       for _ in range(rng.randint(1, 24))]
                n = rng.randint(1, 12)
                rid = f"w{wave}r{i}"
                wanted[rid] = (prompt, n)
                m.add_request(prompt, request_id=rid, max_new_tokens=n)
            time.sleep(rng.random() * 0.05)
        got = {}
        while len(got) < len(wanted):
            r = m.get_result(timeout=120)
            if r is None:
                break
            got[r.request_id] = r
    finally:
        m.stop(block=True, timeout=30)
    for rid, (prompt, n) in wanted.items():
        r = got.get(rid)
        if r is None or r.error is not None or r.generated_tokens != alone(model, prompt, n):
            bad.append(rid)
    return {"ok": not bad, "requests": len(wanted), "wrong": bad}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--device", default="cuda", help="cpu: the same on HostPages (poisoned unheld pages)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from batching import tiny_models  # bench/ is the script's directory

    rows = []
    for arch, model in tiny_models(512, args.device):
        for share in (True, False):
            row = {"arch": arch, "share": share, "freed_row": freed_row(model, share),
                   "waves": [waves(model, share, seed) for seed in range(args.seeds)]}
            rows.append(row)
            print(arch, "share" if share else "no-share", "freed row ok:", row["freed_row"]["ok"],
                  "waves ok:", [w["ok"] for w in row["waves"]], flush=True)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    result = {"gpu": gpu, "torch": torch.__version__, "rows": rows,
              "all_ok": all(r["freed_row"]["ok"] and all(w["ok"] for w in r["waves"]) for r in rows)}
    print("all ok:", result["all_ok"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
