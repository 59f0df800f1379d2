"""Packed prefill on the GPU: the varlen flash-attention kernel against the per-sequence sdpa path
(the CPU path, which the CPU tests hold to loops and to Transformers), in bf16.

    PYTHONPATH=.:bench python bench/packed_check.py --out r.json

- `attention`: `packed_attention` at the models' head shapes (PhiMoE 32 query / 8 kv heads,
  JetMoE 32 / 16, head dim 128) over sequences with and without cached prefixes, one-token
  sequences and a sliding window, flash kernel against per-sequence sdpa: relative error.
- `prefill`: tiny bf16 models; a continuous-batching prefill of prompts (some starting from
  another row's prefix) with the flash kernel against the same prefill with flash attention off
  (per-sequence sdpa): the logits and the cached keys and values, as relative errors; and each
  prompt's logits against a plain forward over it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys

import torch

from moetorch.benchmark import log
from moetorch.ops.attention import Packed, packed_attention


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def check_attention() -> list[dict]:
    rows = []
    rng = random.Random(0)
    for name, H, G in (("phimoe", 32, 8), ("jetmoe", 32, 16)):
        for lens_q, lens_k, window in (
            ([1024] * 4, [1024] * 4, None),
            ([37, 500, 1, 128], [37, 1524, 900, 128], None),
            ([rng.randint(1, 300) for _ in range(16)], None, None),
            ([200, 64, 1], [1224, 64, 40], 256),
        ):
            lens_k = lens_k or [q + rng.choice([0, rng.randint(1, 1000)]) for q in lens_q]
            q = torch.randn(sum(lens_q), H, 128, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(sum(lens_k), G, 128, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            packed = Packed.of(lens_q, lens_k, q.device, window)
            flash = packed_attention(q, k, v, packed, 128**-0.5)
            with torch.backends.cuda.sdp_kernel(enable_flash=False):  # the per-sequence path
                loop = packed_attention(q, k, v, packed, 128**-0.5)
            row = {"model": name, "sequences": len(lens_q), "queries": sum(lens_q), "keys": sum(lens_k),
                   "window": window, "rel_err": rel(flash, loop)}
            log(f"  attention {row}")
            rows.append(row)
    return rows


@torch.no_grad()
def check_prefill(model, vocab: int) -> dict:
    from moetorch.engine.batching import _Batch

    rng = random.Random(1)
    system = [rng.randrange(1, vocab) for _ in range(40)]
    prompts = [system + [rng.randrange(1, vocab) for _ in range(n)] for n in (3, 17, 1, 60)]
    prompts += [[rng.randrange(1, vocab) for _ in range(n)] for n in (5, 90)]
    k = len(prompts)
    out = {}
    for arm in ("flash", "sdpa"):
        batch = _Batch(model, rows=k + 1, slots=256, graphs=False, share=True)
        batch.col = 200
        batch.prefill([system + [1]], [k])  # the source row
        shared = [(k, 200 - 41, 40)] * 4 + [(0, 0, 0)] * 2
        if arm == "flash":
            logits = batch.prefill(prompts, list(range(k)), shared)
        else:
            with torch.backends.cuda.sdp_kernel(enable_flash=False):
                logits = batch.prefill(prompts, list(range(k)), shared)
        kv = [t[:, :k, :, 200 - max(map(len, prompts)):200].clone() for t in batch.cache._all]
        out[arm] = (logits, kv)
    plain = [model(torch.tensor([p], device="cuda"), use_cache=False).logits[0, -1] for p in prompts]
    res = {
        "logits_flash_vs_sdpa": max(rel(a, b) for a, b in zip(out["flash"][0], out["sdpa"][0])),
        "kv_flash_vs_sdpa": max(rel(a, b) for a, b in zip(out["flash"][1], out["sdpa"][1])),
        "logits_flash_vs_plain_forward": [rel(a, b) for a, b in zip(out["flash"][0], plain)],
        "logits_sdpa_vs_plain_forward": [rel(a, b) for a, b in zip(out["sdpa"][0], plain)],
        "same_argmax_flash_vs_plain": [bool(a.argmax() == b.argmax()) for a, b in zip(out["flash"][0], plain)],
    }
    log(f"  prefill {res}")
    return res


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from batching import tiny_models  # bench/ is the script's directory

    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "attention": check_attention()}
    result["prefill"] = {}
    for name, model in tiny_models(512):
        log(f"{name}:")
        result["prefill"][name] = check_prefill(model.to(torch.bfloat16), model.config.vocab_size)
    worst = max(r["rel_err"] for r in result["attention"])
    worst_model = max(max(r["logits_flash_vs_sdpa"], r["kv_flash_vs_sdpa"]) for r in result["prefill"].values())
    result["ok"] = worst < 1e-2 and worst_model < 2e-2
    log(f"worst attention rel err {worst:.2e}, worst prefill {worst_model:.2e}: {'ok' if result['ok'] else 'FAILED'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
