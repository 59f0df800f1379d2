"""Training steps over packed sequences (positions that start again at 0, no attention mask; what
TRL's packing and padding-free collators give): the varlen flash path against the dense
block-diagonal mask, and Transformers (sdpa over its packed mask) on the same shapes.

    PYTHONPATH=.:bench python bench/packed_training.py --out r.json

Each model at its real width with `--layers` decoder layers, bf16 random weights, train mode. A
step is the forward with labels and the loss's backward (no optimizer). Rows of `--tokens`
tokens each hold documents of random lengths (uniform in `--docs`). Arms alternate; median of
`--steps` steps after one untimed. Checks, per model: one layer's attention, forward and
backward, each path against float32 (`attention_check`); the two moetorch arms' losses and the
gradients of every parameter (reported; random bf16 weights route chaotically, so expert
gradients move with any rounding); and their peak memory. Exits non-zero if the varlen path's
attention strays past twice the dense mask's error or the losses differ by 2%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from moetorch import modeling_utils
from moetorch.benchmark import SIZES, build, log
from moetorch.ops.attention import attention


def documents(rows: int, tokens: int, lo: int, hi: int, g: torch.Generator) -> torch.Tensor:
    """Positions [rows, tokens]: each row filled with documents of lo..hi tokens (the last cut)."""
    out = []
    for _ in range(rows):
        pos, n = [], 0
        while n < tokens:
            m = min(int(torch.randint(lo, hi + 1, (), generator=g)), tokens - n)
            pos.append(torch.arange(m))
            n += m
        out.append(torch.cat(pos))
    return torch.stack(out)


def step(model, ids, pos) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = model(ids, position_ids=pos, labels=ids, use_cache=False).loss
    loss.backward()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, loss.detach().float()


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def attention_check(name: str, cfg: dict, pos: torch.Tensor) -> dict:
    """One layer's attention over the packed rows at the model's head layout, forward and backward
    (random bf16 q, k, v and output gradient): the varlen path and the dense mask, each against
    the dense mask in float32. Routing plays no part here, so the two paths' gradients are held to
    each other's rounding; in the models, the routing that follows each attention amplifies it."""
    tiled = name == "jetmoe"
    H = 2 * cfg["num_key_value_heads"] if tiled else cfg["num_attention_heads"]
    G = cfg["num_key_value_heads"]
    d = cfg["kv_channels"] if tiled else cfg["hidden_size"] // H
    window = cfg.get("sliding_window")
    B, T = pos.shape
    segments = modeling_utils.packed_segments(pos, None, None, B)
    dense = torch.ones(T, T, dtype=torch.bool, device="cuda").tril() & \
        (segments[:, None, :, None] == segments[:, None, None, :])
    if window is not None:
        i = torch.arange(T, device="cuda")
        dense = dense & (i[:, None] - i[None, :] < window)
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(B, h, T, d, device="cuda", generator=g, dtype=torch.bfloat16) for h in (H, G, G))
    grad = torch.randn(B, T, H, d, device="cuda", generator=g, dtype=torch.bfloat16)
    layout = "tiled" if tiled else "grouped"
    modeling_utils.PACKED_VARLEN = True
    x = torch.zeros(B, T, 1, device="cuda", dtype=torch.bfloat16)
    packed = modeling_utils.varlen_packing(_Config(cfg), segments, window, False, x)
    modeling_utils.PACKED_VARLEN = None
    results = {}
    for arm, mask, dtype in (("varlen", packed, torch.bfloat16), ("dense mask", dense, torch.bfloat16),
                             ("float32", dense, torch.float32)):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out, _ = attention(*leaves, mask, False, d**-0.5, kv_layout=layout)
        out.backward(grad.to(dtype))
        results[arm] = [out.float(), *(t.grad.float() for t in leaves)]
    ref = results.pop("float32")
    errs = {arm: {n: ((x - r).norm() / r.norm()).item() for n, x, r in zip(("out", "dq", "dk", "dv"), xs, ref)}
            for arm, xs in results.items()}
    ok = all(errs["varlen"][n] <= 2 * errs["dense mask"][n] + 2e-3 for n in errs["varlen"])
    log(f"{name} attention check (relative to float32): varlen {errs['varlen']}, dense {errs['dense mask']} -> "
        f"{'ok' if ok else 'FAILED'}")
    return {"errors": errs, "heads": [H, G, d], "window": window, "ok": ok}


class _Config:
    """What `varlen_packing` reads of a model: its config (sdpa, the head size)."""

    def __init__(self, cfg: dict) -> None:
        heads = cfg.get("num_attention_heads")
        self.config = argparse.Namespace(_attn_implementation="sdpa", kv_channels=cfg.get("kv_channels"),
                                         head_dim=heads and cfg["hidden_size"] // heads)


def run_model(name: str, args, g: torch.Generator) -> tuple[dict, bool]:
    cfg = dict(SIZES[name], num_hidden_layers=args.layers)
    V = cfg["vocab_size"]
    pos = documents(args.rows, args.tokens, *args.docs, g).cuda()
    ids = torch.randint(0, V, pos.shape, generator=g).cuda()
    docs = int((torch.diff(pos, dim=-1) != 1).sum()) + args.rows
    out = {"config": {"layers": args.layers, "rows": args.rows, "tokens": args.tokens, "docs": docs,
                      "doc_lengths": list(args.docs)}}
    out["attention_check"] = attention_check(name, cfg, pos)
    arms = {"varlen": None, "dense mask": False}
    model = build(name, "moetorch", cfg).train()
    torch.manual_seed(0)
    times: dict[str, list[float]] = {a: [] for a in arms}
    losses, peak, check = {}, {}, {}
    for a, mode in arms.items():  # untimed: compile-free warm-up, and the check at a fixed routing seed
        modeling_utils.PACKED_VARLEN = mode
        torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(1)
        _, losses[a] = step(model, ids, pos)
        peak[a] = torch.cuda.max_memory_allocated() / 2**30
        check[a] = grads(model)
    for _ in range(args.steps):
        for a, mode in arms.items():
            modeling_utils.PACKED_VARLEN = mode
            torch.manual_seed(1)
            times[a].append(step(model, ids, pos)[0])
    modeling_utils.PACKED_VARLEN = None
    names = sorted(check["varlen"])
    norms = torch.stack([check["dense mask"][n].norm() for n in names])
    diffs = torch.stack([(check["varlen"][n] - check["dense mask"][n]).norm() for n in names])
    rel = diffs / norms.clamp_min(1e-12)
    total = (diffs.square().sum() / norms.square().sum()).sqrt().item()
    worst = {names[i]: rel[i].item() for i in rel.argsort(descending=True)[:5].tolist()}
    loss_rel = abs(losses["varlen"] - losses["dense mask"]).item() / abs(losses["dense mask"]).item()
    ok = loss_rel < 2e-2 and out["attention_check"]["ok"]
    tokens = args.rows * args.tokens
    for a in arms:
        t = statistics.median(times[a])
        out[f"moetorch {a}"] = {"step_ms": t * 1e3, "tokens_per_s": tokens / t, "peak_gib": peak[a],
                                "steps_ms": [x * 1e3 for x in times[a]], "loss": losses[a].item()}
        log(f"{name} moetorch {a}: {t * 1e3:.1f} ms a step, {tokens / t:.0f} tok/s, peak {peak[a]:.1f} GiB")
    out["check"] = {"loss_rel": loss_rel, "grads_rel_total": total, "grads_rel_median": rel.median().item(),
                    "grads_rel_worst": worst, "ok": ok}
    log(f"{name} check: loss {loss_rel:.2e}, gradients {total:.2e} in all, median {rel.median().item():.2e} "
        f"-> {'ok' if ok else 'FAILED'}")
    del model, check
    torch.cuda.empty_cache()
    if args.transformers:
        hf = build(name, "transformers", cfg).train()
        hf.set_attn_implementation("sdpa")
        torch.cuda.reset_peak_memory_stats()
        hf_times = [step(hf, ids, pos)[0] for _ in range(args.steps + 1)][1:]
        t = statistics.median(hf_times)
        out["transformers sdpa"] = {"step_ms": t * 1e3, "tokens_per_s": tokens / t,
                                    "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        log(f"{name} transformers: {t * 1e3:.1f} ms a step, {tokens / t:.0f} tok/s")
        del hf
        torch.cuda.empty_cache()
    return out, ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="packed_training")
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--docs", type=int, nargs=2, default=(64, 1024), metavar=("LO", "HI"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-transformers", dest="transformers", action="store_false")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    results, ok = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}, True
    for name in args.models.split(","):
        results[name], good = run_model(name, args, g)
        ok &= good
    text = json.dumps(results, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
