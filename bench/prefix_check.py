"""A shared-prefix prefill against an unshared one at the real sizes (bf16, random weights): the
last prompt token's logits and the suffix's cached keys and values, each against a plain forward
over the whole prompt, as relative errors. Random bf16 weights route chaotically, so the unshared
prefill's own distance from the plain forward is the scale to read the shared one's against.

    PYTHONPATH=.:bench python bench/prefix_check.py --out r.json [--models jetmoe,phimoe]
"""

from __future__ import annotations

import argparse
import random
import sys

import torch

from moetorch.benchmark import SIZES, build, log


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def check(model, vocab: int, prefix: int, questions: list[int]) -> dict:
    from moetorch.engine.batching import _Batch

    rng = random.Random(0)
    system = [rng.randrange(1, vocab) for _ in range(prefix)]
    prompts = [system + [rng.randrange(1, vocab) for _ in range(q)] for q in questions]
    k = len(prompts)
    batch = _Batch(model, rows=2 * k + 1, slots=prefix + max(questions) + 64, graphs=False, share=True)
    batch.col = prefix + max(questions)
    batch.prefill([system + [1]], [0])  # the source row: the system prompt's keys in row 0
    start = batch.col - prefix - 1
    shared = batch.prefill(prompts, list(range(1, k + 1)), [(0, start, prefix)] * k)
    plain = batch.prefill(prompts, list(range(k + 1, 2 * k + 1)))
    out = {"prefix": prefix, "questions": questions, "rows": []}
    for i, p in enumerate(prompts):
        full = model(torch.tensor([p], device=model.device), use_cache=False).logits[0, -1]
        n = len(p)
        kv_shared = [t[:, 1 + i, :, batch.col - n:batch.col] for t in batch.cache._all]
        kv_plain = [t[:, 1 + k + i, :, batch.col - n:batch.col] for t in batch.cache._all]
        row = {"logits_shared_vs_forward": rel(shared[i], full), "logits_plain_vs_forward": rel(plain[i], full),
               "logits_shared_vs_plain": rel(shared[i], plain[i]),
               "kv_shared_vs_plain": max(rel(a, b) for a, b in zip(kv_shared, kv_plain)),
               "same_argmax": bool(shared[i].argmax() == plain[i].argmax())}
        out["rows"].append(row)
        log(f"  prompt {i} ({n} tokens): {row}")
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--prefix", type=int, default=1024)
    p.add_argument("--questions", default="1,17,64,128")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/prefix_check.py needs a CUDA GPU")
    from moe_layer import save_json

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args), "models": {}}
    for name in args.models.split(","):
        cfg = dict(SIZES[name])
        log(f"{name}: building")
        model = build(name, "moetorch", cfg)
        result["models"][name] = check(model, cfg["vocab_size"], args.prefix,
                                       [int(x) for x in args.questions.split(",")])
        save_json(args.out, result)
        del model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
