"""Graphed decode logits (2-layer models at the real widths, 4 steps) with and without the q/k/v
(PhiMoE) and kv (JetMoE) GEMVs' rotary + cache-write epilogue: they must be bitwise equal.

    PYTHONPATH=.:bench python bench/rope_epilogue_check.py
"""

import torch

from moetorch import StaticCache
from moetorch.benchmark import SIZES, build
from moetorch.engine import GraphedDecodeStep
from moetorch.ops import triton_fused as tf

torch.manual_seed(0)
for name in ("jetmoe", "phimoe"):
    model = build(name, "moetorch", dict(SIZES[name], num_hidden_layers=2))
    ids = torch.randint(0, 1000, (1, 37), device="cuda")
    outs = {}
    original = tf.linear_rope_fits
    for arm in ("fused", "off"):
        tf.linear_rope_fits = original if arm == "fused" else (lambda *a, **k: False)
        with torch.no_grad():
            cache = StaticCache(model.config, max_cache_len=64)
            model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            step = GraphedDecodeStep(model, cache, 1)
            tok = ids[:, -1:]
            logits = []
            for t in range(4):
                lg = step(tok, None, torch.full((1, 1), 37 + t, device="cuda"), torch.tensor([37 + t], device="cuda"))
                logits.append(lg.clone())
                tok = lg.argmax(-1, keepdim=True)
        outs[arm] = torch.stack(logits)
    tf.linear_rope_fits = original
    print(name, "graphed decode logits bitwise equal with and without the kv/qkv rotary kernel:",
          torch.equal(outs["fused"], outs["off"]), flush=True)
    del model
    torch.cuda.empty_cache()
