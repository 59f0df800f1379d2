"""Eager decode steps on a dynamic cache (no CUDA graph: the path of a user's own decoding loop,
`custom_generate` and `synced_gpus`), A/B in one process: the code as it is (A) against a module
attribute set (B), three interleaved rounds, the best of each printed, all to the JSON.

    PYTHONPATH=.:bench python bench/eager_decode_ab.py --b moetorch.ops.launch:ENABLED=0

Random weights at the real sizes (moetorch.benchmark.SIZES); each round prefills a `--prompt`-token
prompt, then times `--steps` single-token forwards, each fed the last token, as a loop does.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from decode_ab import patch  # bench/ is the script's directory

import moetorch
from moetorch.benchmark import SIZES, build


def steps_per_s(model, ids: torch.Tensor, steps: int) -> float:
    cache = moetorch.DynamicCache()
    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = ids[:, -1:]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        model(tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--b", required=True, help="module:attribute=off|<int>")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    module, attr, b_value = patch(args.b)
    arms = {"A": getattr(module, attr), "B": b_value}
    res = {"device": torch.cuda.get_device_name(), "b": args.b, "steps_per_s": {}}
    for name in args.models.split(","):
        model = build(name, "moetorch", dict(SIZES[name]))
        ids = torch.randint(0, SIZES[name]["vocab_size"], (1, args.prompt), device="cuda")
        runs = {}
        for value in arms.values():  # warm-up: compiles, and the launcher's first launches
            setattr(module, attr, value)
            steps_per_s(model, ids, 4)
        for _ in range(args.rounds):
            for tag, value in arms.items():
                setattr(module, attr, value)
                runs.setdefault(tag, []).append(steps_per_s(model, ids, args.steps))
        setattr(module, attr, arms["A"])
        res["steps_per_s"][name] = runs
        print(name, {tag: round(max(v), 1) for tag, v in runs.items()}, "steps/s", flush=True)
        del model
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
