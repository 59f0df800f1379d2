"""What a continuous-batching step's per-row sampling costs, part by part: the GPU time of its
kernels and the host's time per call, on random float32 logits [B, V] where every row has its own
temperature and top-p (`row_sampling.warp_rows`) and its own seed (the exponential race's draws).

    PYTHONPATH=.:bench python bench/row_sampling_cost.py [--batches 240] [--vocab 32000] --out r.json
"""

from __future__ import annotations

import argparse
import sys

import torch
from moe_layer import save_json  # bench/ is the script's directory
from sampling_cost import measure

from moetorch.benchmark import counts
from moetorch.engine import row_sampling


def parts(B: int, V: int) -> dict:
    """The timed calls: each part of a sampled step, then the whole step as the manager runs it."""
    logits = torch.randn(B, V, device="cuda") * 3
    temperature = torch.linspace(0.6, 1.0, B, device="cuda")
    top_p = torch.full((B,), 0.9, device="cuda")
    seeds = list(range(B))
    generators = [torch.Generator(device="cuda") for _ in seeds]
    for g, s in zip(generators, seeds):
        g.manual_seed(s)
    warped = row_sampling.warp_rows(logits, temperature, None, top_p)

    def seeded_draws(q):
        for i, g in enumerate(generators):
            q[i].exponential_(generator=g)
        return q

    def step(seeded: bool):
        scores = row_sampling.warp_rows(logits, temperature, None, top_p)
        q = torch.empty_like(scores).exponential_()
        if seeded:
            seeded_draws(q)
        return (scores.softmax(dim=-1) / q).argmax(dim=-1)

    lsm = warped.log_softmax(dim=-1)
    out = {
        "log_softmax": lambda: warped.log_softmax(dim=-1),
        "topk 5 of the log-probabilities": lambda: lsm.topk(5, dim=-1),
        "topk 20 of the log-probabilities": lambda: lsm.topk(20, dim=-1),
        "temperature": lambda: row_sampling.warp_rows(logits, temperature, None, None),
        "temperature + top_p": lambda: row_sampling.warp_rows(logits, temperature, None, top_p),
        "exponential, one call": lambda: torch.empty_like(logits).exponential_(),
        f"exponential, {B} seeded rows": lambda: seeded_draws(torch.empty_like(logits)),
        "softmax / q, argmax": lambda: (warped.softmax(dim=-1) / logits).argmax(dim=-1),
        "whole step, unseeded": lambda: step(False),
        "whole step, seeded": lambda: step(True),
    }
    def put(values, dtype):
        return torch.tensor(values, dtype=dtype, device="cuda")

    settings = row_sampling.RowSettings.of(
        [row_sampling.Sampling(True, temperature=t, top_p=0.9, seed=i) for i, t in enumerate(temperature.tolist())],
        put)
    seed_B = torch.arange(B, device="cuda")
    first_B = torch.zeros(B, dtype=torch.long, device="cuda")
    out["draw_rows (the fused kernel)"] = lambda: row_sampling.draw_rows(logits, settings, seed_B, first_B, 3)
    out["draw_rows_torch"] = lambda: row_sampling.draw_rows_torch(logits, settings, seed_B, first_B, 3)
    bf16 = logits.bfloat16().float()  # few distinct values, as a model's logits
    out["draw_rows (the fused kernel), bf16 values"] = lambda: row_sampling.draw_rows(
        bf16, settings, seed_B, first_B, 3)
    topk = row_sampling.RowSettings.of(
        [row_sampling.Sampling(True, temperature=0.8, top_k=50, top_p=0.95, min_p=0.05, seed=i) for i in range(B)], put)
    out["draw_rows (fused), top-k 50 + top-p + min-p"] = lambda: row_sampling.draw_rows(
        logits, topk, seed_B, first_B, 3)
    return out


def agreement(B: int, V: int) -> dict:
    """The fused kernel against `draw_rows_torch` on the GPU, on random settings per row (float32
    logits, and bf16 values with their ties): rows whose kept sets, kept values and tokens agree."""
    g = torch.Generator().manual_seed(B)
    out = {}
    for kind in ("float32", "bf16 values"):
        logits = (torch.randn(B, V, generator=g) * 3).cuda()
        if kind != "float32":
            logits = logits.bfloat16().float()
        ss = [row_sampling.Sampling(
            bool(i % 7), temperature=float(torch.rand((), generator=g)) + 0.3,
            top_k=int(torch.randint(0, 200, (), generator=g)) * (i % 3 == 0), top_p=[1.0, 0.9, 0.5, 0.99][i % 4],
            min_p=[0.0, 0.0, 0.05][i % 3], seed=i) for i in range(B)]
        settings = row_sampling.RowSettings.of(
            ss, lambda values, dtype: torch.tensor(values, dtype=dtype, device="cuda"))
        seed_B, first_B = torch.arange(B, device="cuda") * 7919, torch.zeros(B, dtype=torch.long, device="cuda")
        t1, w1 = row_sampling.draw_rows(logits, settings, seed_B, first_B, 5)
        t2, w2 = row_sampling.draw_rows_torch(logits, settings, seed_B, first_B, 5)
        kept1, kept2 = ~torch.isinf(w1), ~torch.isinf(w2)
        same = (kept1 == kept2).all(1)
        out[kind] = {"rows": B, "kept_sets_equal": int(same.sum()),
                     "kept_values_equal": int(((w1 == w2) | ~kept1).all(1).sum()),
                     "tokens_equal": int((t1 == t2).sum())}
    return out


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="240")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = measure(parts, args.batches, args.vocab)
    checks = {B: agreement(B, args.vocab) for B in counts(args.batches)}
    print("fused against torch:", checks)
    save_json(args.out, {"device": torch.cuda.get_device_name(), "rows": rows, "agreement": checks})
    return 0


if __name__ == "__main__":
    sys.exit(main())
