"""How many distinct experts one decode step's rows route to, per router, in the bench's
random-weight models: with every row fed the same token, and with each row fed its own (its
prompt's last token, as both decode drivers of `moetorch bench` now feed them). Runs on the CPU at
fewer layers (the first layers are the ones that differ).

    PYTHONPATH=. python bench/routing_spread.py --model jetmoe --layers 4 --batch 16 --prompt 32
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from moetorch import StaticCache
from moetorch.benchmark import SIZES, build


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=sorted(SIZES), default="jetmoe")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32)
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = {**SIZES[args.model], "num_hidden_layers": args.layers}
    model = build(args.model, "moetorch", cfg, device="cpu")
    B, P, k, E = args.batch, args.prompt, cfg["num_experts_per_tok"], cfg["num_local_experts"]
    ids = torch.randint(0, cfg["vocab_size"], (B, P))
    start = time.time()
    print(f"{args.model}, {args.layers} layers, batch {B}, {P}-token prompts; uniform routing would touch "
          f"{E * (1 - (1 - k / E) ** B):.1f} of {E} experts a router")
    for label, tok in (("every row token 0", torch.zeros(B, 1, dtype=torch.long)),
                       ("each row its prompt's last token", ids[:, -1:])):
        cache = StaticCache(model.config, max_cache_len=P + 4)
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        out = model(tok, past_key_values=cache, use_cache=True, output_router_logits=True, logits_to_keep=1)
        touched = [torch.unique(logits.float().topk(k, dim=-1).indices).numel() for logits in out.router_logits]
        print(f"  {label}: experts touched per router (in the order of `router_logits`) {touched}", flush=True)
    print(f"({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
