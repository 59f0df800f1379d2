"""`generate` on a left-padded batch: its prompts packed in one row (`GraphedPrefill._packed`, the
default) against the padded forward with a 2D mask (`cuda_graph.PACK_PADDED_PROMPTS = False`).

    PYTHONPATH=.:bench python bench/padded_generate.py --out r.json [--models jetmoe,phimoe]

Random bf16 weights at the real sizes. Per batch shape (prompt lengths drawn uniformly, left-padded
to the longest): the wall time of `generate(..., max_new_tokens=1)` (the prompt's forward and one
token; static cache, as generate runs on a GPU), median of `--repeats` after two warm calls that
compile and capture, the arms alternating; then the first token's scores of both arms (relative
error, share of equal argmaxes) and 16 greedy tokens of both (share of equal rows).
`--smoke` runs it on the CPU with tiny float32 models: checks the script, measures nothing.
`--tiny` runs the check alone on the GPU with tiny bf16 models whose random weights are peaked (no
chaotic routing): both arms' first scores against a plain forward over each prompt alone.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch

from moetorch.benchmark import SIZES, build, log
from moetorch.engine import cuda_graph

SHAPES = {"8 of 100-1000": (8, 100, 1000), "4 of 16-2000": (4, 16, 2000), "16 of 32-512": (16, 32, 512),
          "2 of 200-1800": (2, 200, 1800)}


def batch(vocab: int, n: int, lo: int, hi: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    lengths = [rng.randint(lo, hi) for _ in range(n)]
    T = max(lengths)
    ids = torch.tensor([[0] * (T - m) + [rng.randrange(1, vocab) for _ in range(m)] for m in lengths], device=device)
    mask = (torch.arange(T, device=device)[None] >= T - torch.tensor(lengths, device=device)[:, None]).long()
    return ids, mask


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run_model(model, vocab: int, repeats: int, shapes: dict) -> dict:
    device = model.device
    out = {}
    for name, (n, lo, hi) in shapes.items():
        ids, mask = batch(vocab, n, lo, hi, seed=len(out), device=device)
        kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
        times: dict[str, list[float]] = {"padded": [], "packed": []}
        arms = (("padded", False), ("packed", True))
        for _, packs in arms:  # compiles, captures
            cuda_graph.PACK_PADDED_PROMPTS = packs
            for _ in range(2):
                model.generate(ids, max_new_tokens=1, **kw)
        for r in range(repeats):
            for arm, packs in arms if r % 2 == 0 else arms[::-1]:
                cuda_graph.PACK_PADDED_PROMPTS = packs
                sync(device)
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=1, **kw)
                sync(device)
                times[arm].append(time.perf_counter() - t0)
        res: dict = {"prompts": n, "padded_length": ids.shape[1], "tokens": int(mask.sum())}
        scores, seqs = {}, {}
        for arm, packs in arms:
            cuda_graph.PACK_PADDED_PROMPTS = packs
            res[f"{arm}_ms"] = statistics.median(times[arm]) * 1e3
            scores[arm] = model.generate(ids, max_new_tokens=1, output_scores=True, return_dict_in_generate=True,
                                         **kw).scores[0].float()
            seqs[arm] = model.generate(ids, max_new_tokens=16, **kw)[:, ids.shape[1]:]
        cuda_graph.PACK_PADDED_PROMPTS = True
        a, b = scores["packed"], scores["padded"]
        res["speedup"] = res["padded_ms"] / res["packed_ms"]
        res["first_scores_rel_err"] = float((a - b).norm() / b.norm())
        res["same_first_argmax"] = float((a.argmax(-1) == b.argmax(-1)).float().mean())
        res["same_16_tokens"] = float((seqs["packed"] == seqs["padded"]).all(1).float().mean())
        log(f"  {name}: {res}")
        out[name] = res
    return out


@torch.no_grad()
def tiny_check() -> dict:
    """Tiny bf16 models on the GPU (graphed steps): each arm's first-token scores against a plain
    forward over each prompt alone, with no padding (relative error, equal argmaxes)."""
    from batching import tiny_models  # bench/ is the script's directory

    out = {}
    for name, model in tiny_models(4096):
        model = model.to(torch.bfloat16)
        for shape, (n, lo, hi) in SHAPES.items():
            ids, mask = batch(97, n, lo, hi, seed=7, device=model.device)
            plain = torch.stack([model(ids[b:b + 1, ids.shape[1] - int(mask[b].sum()):]).logits[0, -1]
                                 for b in range(n)]).float()
            res = {}
            for arm, packs in (("padded", False), ("packed", True)):
                cuda_graph.PACK_PADDED_PROMPTS = packs
                for _ in range(3):  # the third replays the captured graph
                    s = model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0,
                                       eos_token_id=None, output_scores=True,
                                       return_dict_in_generate=True).scores[0].float()
                res[f"{arm}_vs_plain_rel_err"] = float((s - plain).norm() / plain.norm())
                res[f"{arm}_same_argmax_as_plain"] = float((s.argmax(-1) == plain.argmax(-1)).float().mean())
            cuda_graph.PACK_PADDED_PROMPTS = True
            log(f"  tiny {name} {shape}: {res}")
            out[f"{name} {shape}"] = res
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny float32 models on the CPU: checks the script")
    p.add_argument("--tiny", action="store_true", help="the tiny bf16 models' check alone (GPU)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    result: dict = {"torch": torch.__version__, "args": vars(args)}
    if not args.smoke:
        result["gpu"] = torch.cuda.get_device_name()
    if args.tiny:
        result["tiny"] = tiny_check()
    for name in [] if args.tiny else args.models.split(","):
        cfg = dict(SIZES[name])
        shapes = SHAPES
        if args.smoke:
            cfg.update(hidden_size=64, intermediate_size=48, num_hidden_layers=2, vocab_size=97)
            cfg.update(num_attention_heads=4, num_key_value_heads=2) if name == "phimoe" else \
                cfg.update(num_key_value_heads=2, kv_channels=16)
            shapes = {"3 of 4-20": (3, 4, 20)}
        log(f"{name}: building")
        model = build(name, "moetorch", cfg, device="cpu" if args.smoke else "cuda",
                      dtype=torch.float32 if args.smoke else torch.bfloat16)
        result[name] = run_model(model, cfg["vocab_size"], 1 if args.smoke else args.repeats, shapes)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
