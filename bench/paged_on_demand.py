"""A paged batch cache whose pages follow the tokens (`batching.PAGES_ON_DEMAND`, the default)
against one that holds each request's pages for all of its `max_new_tokens` from its prefill on, H200.

Where requests stop at EOS, a server cannot know their lengths: a chat request without
`max_tokens` may run to its row's end (4096 slots at the server's default `--max-model-len`),
and holding that many pages for it bounds the batch as whole rows do. The workload here: random
weights at the real size, bf16, the LM head scaled down so that next tokens are near uniform;
`--requests` prompts of 32-512 random tokens, each sampled (temperature `--temperature`, its own
seed, so that both arms draw the same tokens where their logits agree) with no limit of its own
but its row's end, and V / `--mean-len` random token ids as EOS: lengths geometric with mean
about `--mean-len`, as unknown to the manager as a chat's (the realized lengths are in the
results). The arms (`--arms`, two of `reserved`, `on-demand`, rows of `--slots` slots, and
`spanK`, on demand with rows of K times `--slots` slots, `batching.PAGED_ROW_SPAN`) alternate
over `--rounds`, each a warm run of a few requests (which sets the manager up: `warm_s`) and a
timed one, in a manager of their own.

On the GPU (DevicePages), a small float32 model with wide slots (128 a 2 MB page) and few pages
checks that requests preempted and computed again give their own `generate` tokens.

    PYTHONPATH=.:bench python bench/paged_on_demand.py --out bench/results/h200-<date>-paged-on-demand.json
"""

from __future__ import annotations

import random
import time

import torch

import moetorch.engine.batching as cb

DEFAULTS = cb.PAGES_ON_DEMAND, cb.PAGED_ROW_SPAN


def run(model, prompts, arm: str, args, eos: list[int]) -> dict:
    from batching import row_span  # bench/batching.py

    import moetorch
    from moetorch.engine.batching import WorkloadHints

    cb.PAGES_ON_DEMAND = arm != "reserved"
    cb.PAGED_ROW_SPAN = row_span(arm, 1)
    longest = max(map(len, prompts))
    gen = moetorch.GenerationConfig(max_new_tokens=args.slots - longest, do_sample=True, temperature=args.temperature,
                                    top_k=0, eos_token_id=eos, pad_token_id=0)
    cfg = {"max_cache_len": args.slots, "paged": True}
    hints = WorkloadHints(longest, args.slots - longest, len(prompts))

    def once(batch):
        with model.continuous_batching_context_manager(gen, continuous_batching_config=cfg, persistent_manager=True,
                                                       workload_hints=hints) as m:
            ids = [m.add_request(p, seed=i) for i, p in batch]
            got = {}
            while len(got) < len(ids):
                r = m.get_result(timeout=900)
                got[r.request_id] = r
        return [got[i] for i in ids]

    if not getattr(model, "_flat_head", False):  # near-uniform next tokens: lengths geometric, mean --mean-len
        with torch.no_grad():
            model.lm_head.weight.mul_(1e-3)
        model._flat_head = True
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    once(list(enumerate(prompts))[:8])  # sizes the manager, maps its range and captures its graphs
    warm_s = time.perf_counter() - t0
    manager = model._cached_continuous_batching_manager
    manager.stats.update(decode_rows=[], prefill_tokens=[], shifts=0, decode_s=0.0, prefill_s=0.0,
                         waited_for_pages=0, preempted=0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = once(list(enumerate(prompts)))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    st, p = manager.stats, manager._batch.pages
    lengths = sorted(len(r.generated_tokens) for r in out)
    tokens = sum(lengths)
    row = {"tokens_per_s": tokens / seconds, "seconds": seconds, "warm_s": warm_s, "generated_tokens": tokens,
           "length_mean": tokens / len(lengths), "length_p50": lengths[len(lengths) // 2],
           "length_p90": lengths[len(lengths) * 9 // 10], "length_max": lengths[-1],
           "failed": sum(r.error is not None for r in out), "rows": manager.rows, "slots": manager.slots,
           "decode_steps": len(st["decode_rows"]), "mean_rows": sum(st["decode_rows"]) / max(len(st["decode_rows"]), 1),
           "max_rows": max(st["decode_rows"], default=0), "decode_s": st["decode_s"], "prefill_s": st["prefill_s"],
           "prefill_forwards": len(st["prefill_tokens"]), "prefill_tokens": sum(st["prefill_tokens"]),
           "waited_for_pages": st["waited_for_pages"], "preempted": st["preempted"], "page_mib": p.page / 2**20,
           "page_capacity": p.capacity, "pages": p.count, "row_slots": manager._batch.S,
           "shifts": st["shifts"],
           "outputs": [r.generated_tokens for r in out]}
    model.destroy_cached_continuous_batching_manager()
    cb.PAGES_ON_DEMAND, cb.PAGED_ROW_SPAN = DEFAULTS
    print(f"{arm}: lengths mean {row['length_mean']:.0f} p90 {row['length_p90']} max {row['length_max']}, "
          f"max rows {row['max_rows']}, preempted {row['preempted']}, waited {row['waited_for_pages']}, "
          f"{p.capacity} pages of {p.page / 2**20:.0f} MiB, {row['shifts']} shifts, set up and warm in {warm_s:.1f} s",
          flush=True)
    return row


@torch.no_grad()
def tiny_check() -> dict:
    """Small float32 JetMoE and PhiMoE (2 layers, 8 kv heads of 128: 16 KB a slot, 128 slots a
    2 MB page) on the GPU: 12 requests through 5 rows of 512 slots and 5 pages, so that running
    requests give their pages up and are computed again, against per-request `generate`."""
    from batching import agreement, randomize_

    import moetorch

    out = {}
    for name in ("jetmoe", "phimoe"):
        if name == "jetmoe":
            cfg = moetorch.JetMoeConfig(vocab_size=97, hidden_size=256, num_hidden_layers=2, num_key_value_heads=8,
                                        kv_channels=128, intermediate_size=64, num_local_experts=4,
                                        max_position_embeddings=512)
            model = moetorch.JetMoeForCausalLM(cfg)
        else:
            cfg = moetorch.PhimoeConfig(vocab_size=97, hidden_size=1024, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=8, num_local_experts=4,
                                        max_position_embeddings=512)
            model = moetorch.PhimoeForCausalLM(cfg)
        model = model.cuda().eval()
        randomize_(model, std=0.05)
        rng = random.Random(1)
        prompts = [[rng.randrange(1, 97) for _ in range(rng.randint(1, 40))] for _ in range(12)]
        news = [rng.randint(100, 300) for _ in prompts]
        gen = moetorch.GenerationConfig(max_new_tokens=max(news), do_sample=False, eos_token_id=None, pad_token_id=0)
        config = {"max_requests_per_batch": 5, "max_cache_len": 512, "paged": True, "num_blocks": 5,
                  "page_size": 128}
        with model.continuous_batching_context_manager(gen, continuous_batching_config=config) as m:
            ids = [m.add_request(p, max_new_tokens=n) for p, n in zip(prompts, news)]
            got = {}
            while len(got) < len(ids):
                r = m.get_result(timeout=300)
                got[r.request_id] = r
            page_slots = m._batch.pages.page // cb._slot_bytes(model.config, model.dtype)
        mine = [got[i].generated_tokens for i in ids]
        ref = [model.generate(torch.tensor([p], device="cuda"), max_new_tokens=n, do_sample=False, pad_token_id=0,
                              eos_token_id=None)[0, len(p):].tolist() for p, n in zip(prompts, news)]
        out[name] = {**agreement(mine, ref), "preempted": m.stats["preempted"],
                     "waited_for_pages": m.stats["waited_for_pages"],
                     "errors": sum(got[i].error is not None for i in ids),
                     "page_slots": page_slots}
        print(f"tiny {name}: {out[name]}", flush=True)
        del model
    return out


def main() -> int:
    from batching import ab_parser, alternating  # bench/batching.py
    from moe_layer import save_json

    from moetorch.benchmark import SIZES

    p = ab_parser()
    p.add_argument("--slots", type=int, default=4096)
    p.add_argument("--mean-len", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--no-tiny", action="store_true")
    p.add_argument("--arms", default="reserved,on-demand",
                   help="two of: reserved (pages for all of max_new_tokens), on-demand, spanK (on demand, rows of "
                        "K x --slots slots)")
    p.set_defaults(requests=256)
    args = p.parse_args()
    result = {"device": torch.cuda.get_device_name(), "args": vars(args)}
    if not args.no_tiny:
        result["tiny_check"] = tiny_check()
    eos_of = {}
    for name in args.models.split(","):
        V = SIZES[name]["vocab_size"]
        eos_of[name] = sorted(random.Random(7).sample(range(1, V), max(1, V // args.mean_len)))
    result["eos_count"] = {k: len(v) for k, v in eos_of.items()}

    def arm_run(model, prompts, arm):
        name = "jetmoe" if type(model).__name__.startswith("JetMoe") else "phimoe"
        return run(model, prompts, arm, args, eos_of[name])

    alternating(args, tuple(args.arms.split(",")), arm_run,
                done=lambda models: save_json(args.out, {**result, "models": models}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
