"""A cached forward with gradients on, on the GPU (not part of the CPU suite: CI has no GPU).

    PYTHONPATH=.:bench python bench/grad_cache_gpu.py [--out results.json]

For each model (small float32 configs), each attention implementation and each cache kind: three
cached steps with gradients on (prefill, two decode steps; then a PhiMoE LongRoPE model whose last
step crosses the threshold and rebuilds its cache), the loss of every step backpropagated. The
oracle is the same model without a cache: each step's logits from a forward of the whole sequence
so far, and the gradients of the same loss. Records the largest relative difference of logits and
of every parameter's gradient; exits non-zero past 1e-4 (float32).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import moetorch

STEPS = ((0, 6), (6, 7), (7, 8))
LIMIT = 1e-4


def models():
    phi = dict(vocab_size=512, hidden_size=256, intermediate_size=384, num_hidden_layers=3, num_attention_heads=8,
               num_key_value_heads=2, num_local_experts=8, max_position_embeddings=64)
    jet = dict(vocab_size=512, hidden_size=256, intermediate_size=384, num_hidden_layers=3, num_key_value_heads=4,
               kv_channels=32, num_local_experts=8, max_position_embeddings=64)
    rope = {"type": "longrope", "original_max_position_embeddings": 7, "short_mscale": 1.1, "long_mscale": 1.3,
            "short_factor": [1.0 + 0.01 * i for i in range(16)], "long_factor": [2.0 + 0.2 * i for i in range(16)]}
    yield "phimoe", moetorch.PhimoeForCausalLM(moetorch.PhimoeConfig(**phi))
    yield "jetmoe", moetorch.JetMoeForCausalLM(moetorch.JetMoeConfig(**jet))
    yield "phimoe_longrope", moetorch.PhimoeForCausalLM(moetorch.PhimoeConfig(**phi, rope_scaling=rope))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def run(model, ids, cache) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    model.zero_grad()
    if cache is None:  # the oracle: each step's tokens from a forward of the whole sequence so far
        logits = [model(ids[:, :e]).logits[:, s:] for s, e in STEPS]
    else:
        logits = [model(ids[:, s:e], past_key_values=cache, use_cache=True).logits for s, e in STEPS]
    sum(x.logsumexp(-1).mean() for x in logits).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [x.detach() for x in logits], grads


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    results, worst = {}, 0.0
    for name, model in models():
        model = model.cuda().train(False)
        ids = torch.randint(1, 512, (2, 8), device="cuda")
        for attn in ("eager", "sdpa"):
            model.set_attn_implementation(attn)
            ref_logits, ref_grads = run(model, ids, None)
            for kind in ("static", "dynamic"):
                cache = (moetorch.StaticCache(config=model.config, max_cache_len=16) if kind == "static"
                         else moetorch.DynamicCache())
                logits, grads = run(model, ids, cache)
                row = {"logits": max(rel(a, b) for a, b in zip(logits, ref_logits)),
                       "grads": max(rel(grads[n], g) for n, g in ref_grads.items()),
                       "same_params": sorted(grads) == sorted(ref_grads)}
                if name.endswith("longrope"):
                    row["rebuilt_long"] = bool(cache.rope_long)
                results[f"{name}.{attn}.{kind}"] = row
                worst = max(worst, row["logits"], row["grads"], 0.0 if row["same_params"] else 1.0)
                print(f"{name:16s} {attn:5s} {kind:7s} logits {row['logits']:.2e} grads {row['grads']:.2e}", flush=True)
    ok = worst <= LIMIT
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "limit": LIMIT, "passed": ok,
           "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    print("passed" if ok else f"FAILED: {worst:.2e} > {LIMIT}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
