"""The batch cache's two layouts, A/B: `batching.SLOT_MAJOR` off ([layers, rows, kv heads, slots,
head_dim]) and on (one range [rows, slots, 2, layers, kv heads, head_dim], the layout a cache
backed page by page needs). The same model and workload as bench/batching.py (random weights at
the real size, bf16; prompts of 32-512 random tokens, 128 greedy tokens each, no EOS), the arms
alternating over `--rounds`, each a warm run and a timed one in its own manager. The two arms
compute the same sums in the same order, so their tokens are compared for equality; a tiny
float32 model checks the on arm against per-request `generate`.

    PYTHONPATH=.:bench python bench/slot_major_ab.py --out bench/results/h200-<date>-slot-major-ab.json
"""

from __future__ import annotations

import argparse
import gc

import torch

import moetorch.engine.batching as cb
from moetorch.benchmark import SIZES, build, log


def main() -> int:
    from batching import agreement, timed_run, tiny_check, workload  # bench/batching.py
    from moe_layer import save_json

    p = argparse.ArgumentParser()
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt", default="32:512")
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    lo, hi = (int(x) for x in args.prompt.split(":"))
    cb.SLOT_MAJOR = True
    result = {"device": torch.cuda.get_device_name(), "args": vars(args), "tiny_check_slot_major": tiny_check(),
              "models": {}}
    for name in args.models.split(","):
        cfg = dict(SIZES[name])
        prompts = workload(args.requests, lo, hi, cfg["vocab_size"])
        model = build(name, "moetorch", cfg)
        rows: dict = {"off": [], "on": []}
        outputs = {}
        for r in range(args.rounds):
            for arm in (("off", "on") if r % 2 == 0 else ("on", "off")):
                cb.SLOT_MAJOR = arm == "on"
                got = timed_run(model, "moetorch", prompts, args.new)
                outputs[arm] = got.pop("outputs")
                got.pop("stats", None)
                rows[arm].append(got)
                log(f"{name} slot-major {arm}: {got['tokens_per_s']:.0f} tok/s, decode {got['decode_s']:.2f} s in "
                    f"{got['decode_steps']} steps, prefill {got['prefill_s']:.2f} s, {got['rows']} rows")
        rows["same_tokens"] = agreement(outputs["off"], outputs["on"])
        result["models"][name] = rows
        del model
        gc.collect()
        torch.cuda.empty_cache()
    cb.SLOT_MAJOR = False
    save_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
