"""Training steps over packed sequences (positions that start again at 0, no attention mask; what
TRL's packing and padding-free collators give): the varlen flash path against the dense
block-diagonal mask, the same documents one to a row with padding and an attention mask (as
given, and unpadded: `UNPAD_ROWS`; without a cache, and with the cache that the default
`use_cache=True` builds, as a Trainer's step has it), and Transformers (sdpa over its packed
mask) on the packed rows and on the padded rows. Two arms take the loss over a float32 copy of
the logits (`fused.LOSS_KERNEL = 0`) instead of the loss kernels. Peak memory is each arm's first
step's (the gradients kept for the check wait on the host). Tokens/s count the packed tokens in
every arm. `--checkpointing` turns on gradient checkpointing in every arm.

    PYTHONPATH=.:bench python bench/packed_training.py --out r.json

Each model at its real width with `--layers` decoder layers, bf16 random weights, train mode. A
step is the forward with labels and the loss's backward (no optimizer). Rows of `--tokens`
tokens each hold documents of random lengths (uniform in `--docs`). Arms alternate; median of
`--steps` steps after one untimed. Checks, per model: one layer's attention, forward and
backward, each path against float32 (`attention_check`); the two moetorch arms' losses and the
gradients of every parameter, reported beside the same distance for the dense mask run with
sdpa's math kernel (rows up to 8192 tokens: rounding alone; random bf16 weights route chaotically,
so the gradients move with any rounding); and their peak memory. Exits non-zero if the varlen path's
attention strays past twice the dense mask's error or the losses differ by 2%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from moetorch import modeling_utils
from moetorch.benchmark import SIZES, build, log
from moetorch.ops import fused
from moetorch.ops.attention import attention, build_mask


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


def padded(ids: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed documents one to a row, right-padded: ids, attention mask, labels (-100 on padding)."""
    flat_ids, flat_pos = ids.flatten(), pos.flatten()
    starts = (flat_pos == 0).nonzero().flatten().tolist() + [flat_ids.numel()]
    docs = [flat_ids[a:b] for a, b in zip(starts, starts[1:])]
    L = max(len(d) for d in docs)
    out = torch.zeros(len(docs), L, dtype=ids.dtype, device=ids.device)
    mask = torch.zeros_like(out)
    for i, d in enumerate(docs):
        out[i, :len(d)], mask[i, :len(d)] = d, 1
    return out, mask, out.masked_fill(mask == 0, -100)


def step(model, ids, pos, batch=None, use_cache: bool | None = False) -> tuple[float, torch.Tensor]:
    """One forward and backward: of the packed rows, or (`batch`) of (ids, mask, labels);
    `use_cache` None: the config's default (a cache is built, as a Trainer's step does)."""
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if batch is None:
        loss = model(ids, position_ids=pos, labels=ids, use_cache=False).loss
    else:
        loss = model(batch[0], attention_mask=batch[1], labels=batch[2], use_cache=use_cache).loss
    loss.backward()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, loss.detach().float()


def grads(model) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, copied to the host: copies held on the GPU would count in the
    next arms' peak memory (a copy of PhiMoE's 4 layers' gradients is about 10 GiB)."""
    return {n: p.grad.to("cpu", copy=True) for n, p in model.named_parameters() if p.grad is not None}


def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a - b|| of two host copies, computed on the GPU one tensor at a time."""
    return (a.cuda().float() - b.cuda().float()).norm()


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
    dense, _ = build_mask(None, torch.arange(T, device="cuda"), T, window, B, segments_BT=segments)
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(B, h, T, d, device="cuda", generator=g, dtype=torch.bfloat16) for h in (H, G, G))
    grad = torch.randn(B, T, H, d, device="cuda", generator=g, dtype=torch.bfloat16)
    layout = "tiled" if tiled else "grouped"
    modeling_utils.PACKED_VARLEN = True
    x = torch.zeros(B, T, 1, device="cuda", dtype=torch.bfloat16)
    sdpa_model = argparse.Namespace(config=argparse.Namespace(_attn_implementation="sdpa"))  # what it reads
    packed = modeling_utils.varlen_packing(sdpa_model, segments, window, False, x)
    modeling_utils.PACKED_VARLEN = None
    results = {}
    for arm, mask, dtype in (("varlen", packed, torch.bfloat16), ("dense mask", dense, torch.bfloat16),
                             ("float32", dense, torch.float32)):
        leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out, _ = attention(*leaves, mask, False, d**-0.5, kv_layout=layout)
        out.backward(grad.to(dtype))
        results[arm] = [out.float(), *(t.grad.float() for t in leaves)]
    ref = results.pop("float32")
    errs = {arm: {n: ((x - r).norm() / r.norm()).item() for n, x, r in zip(("out", "dq", "dk", "dv"), xs, ref)}
            for arm, xs in results.items()}
    ok = all(errs["varlen"][n] <= 2 * errs["dense mask"][n] + 2e-3 for n in errs["varlen"])
    shown = {arm: " ".join(f"{n} {e:.1e}" for n, e in es.items()) for arm, es in errs.items()}
    log(f"{name} attention against float32: varlen {shown['varlen']}; dense mask {shown['dense mask']} -> "
        f"{'ok' if ok else 'FAILED'}")
    return {"errors": errs, "heads": [H, G, d], "window": window, "ok": ok}


def run_model(name: str, args, g: torch.Generator) -> tuple[dict, bool]:
    cfg = dict(SIZES[name], num_hidden_layers=args.layers)
    V = cfg["vocab_size"]
    pos = documents(args.rows, args.tokens, *args.docs, g).cuda()
    ids = torch.randint(0, V, pos.shape, generator=g).cuda()
    docs = int((torch.diff(pos, dim=-1) != 1).sum()) + args.rows
    out = {"config": {"layers": args.layers, "rows": args.rows, "tokens": args.tokens, "docs": docs,
                      "doc_lengths": list(args.docs), "checkpointing": args.checkpointing}}
    out["attention_check"] = attention_check(name, cfg, pos[:, :4096])
    rows = padded(ids, pos)
    # arm: (PACKED_VARLEN, UNPAD_ROWS, the padded batch or None, use_cache, fused.LOSS_KERNEL)
    arms = {"varlen": (None, None, None, False, 1), "dense mask": (False, None, None, False, 1),
            "padded rows, unpadded": (None, None, rows, False, 1), "padded rows": (None, False, rows, False, 1),
            "padded rows, default cache, unpadded": (None, None, rows, None, 1),
            "padded rows, default cache, as given": (None, False, rows, None, 1),
            "varlen, float32-copy loss": (None, None, None, False, 0),
            "padded rows, unpadded, float32-copy loss": (None, None, rows, False, 0)}
    if args.arms:
        arms = {a: arms[a] for a in args.arms.split(";")}
    model = build(name, "moetorch", cfg).train()
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    torch.manual_seed(0)
    times: dict[str, list[float]] = {a: [] for a in arms}
    losses, peak, held, check = {}, {}, {}, {}

    def set_arm(a: str):
        modeling_utils.PACKED_VARLEN, modeling_utils.UNPAD_ROWS, batch, use_cache, fused.LOSS_KERNEL = arms[a]
        torch.manual_seed(1)
        return batch, use_cache

    for a in arms:  # untimed: compile-free warm-up, and the check at a fixed routing seed
        batch, use_cache = set_arm(a)
        model.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats()
        held[a] = torch.cuda.memory_allocated() / 2**30
        _, losses[a] = step(model, ids, pos, batch, use_cache)
        peak[a] = torch.cuda.max_memory_allocated() / 2**30
        if batch is None:
            check[a] = grads(model)
    for _ in range(args.steps):
        for a in arms:
            batch, use_cache = set_arm(a)
            times[a].append(step(model, ids, pos, batch, use_cache)[0])
    modeling_utils.UNPAD_ROWS, fused.LOSS_KERNEL = None, 1
    if args.tokens <= 8192 and "dense mask" in check:
        # the noise floor: the dense mask again with sdpa's math kernel, another rounding of the same
        # attention; its distance from the dense arm is what rounding alone moves the gradients by
        modeling_utils.PACKED_VARLEN = False
        torch.manual_seed(1)
        with sdpa_kernel([SDPBackend.MATH]):
            _, losses["dense mask, math kernel"] = step(model, ids, pos)
        check["dense mask, math kernel"] = grads(model)
    modeling_utils.PACKED_VARLEN = None
    compared = {}
    names = sorted(check.get("dense mask", {}))
    norms = torch.stack([check["dense mask"][n].cuda().float().norm() for n in names]) if names else None
    for a in [x for x in check if x != "dense mask"] if names else []:
        diffs = torch.stack([distance(check[a][n], check["dense mask"][n]) for n in names])
        rel = diffs / norms.clamp_min(1e-12)
        compared[a] = {"loss_rel": abs(losses[a] - losses["dense mask"]).item() / abs(losses["dense mask"]).item(),
                       "grads_rel_total": (diffs.square().sum() / norms.square().sum()).sqrt().item(),
                       "grads_rel_median": rel.median().item(),
                       "grads_rel_worst": {names[i]: rel[i].item() for i in rel.argsort(descending=True)[:5].tolist()}}
    ok = out["attention_check"]["ok"] and ("varlen" not in compared or compared["varlen"]["loss_rel"] < 2e-2)
    padded_arms = [a for a in arms if arms[a][2] is not None]
    for x in padded_arms:  # against the batch as given (PhiMoE: other routing draws in train mode)
        if x != "padded rows" and "padded rows" in losses:
            rel = (abs(losses[x] - losses["padded rows"]) / abs(losses["padded rows"])).item()
            out[f"{x} loss_rel"] = rel
            log(f"{name} {x} against the padded rows as given: loss {rel:.2e}")
    tokens = args.rows * args.tokens
    for a in arms:
        t = statistics.median(times[a])
        out[f"moetorch {a}"] = {"step_ms": t * 1e3, "tokens_per_s": tokens / t, "peak_gib": peak[a],
                                "held_before_gib": held[a],
                                "steps_ms": [x * 1e3 for x in times[a]], "loss": losses[a].item()}
        if arms[a][2] is not None:
            out[f"moetorch {a}"]["shape"] = list(arms[a][2][0].shape)
        log(f"{name} moetorch {a}: {t * 1e3:.1f} ms a step, {tokens / t:.0f} tok/s, peak {peak[a]:.1f} GiB "
            f"({held[a]:.1f} held before the step)")
    out["check"] = {"against the dense mask": compared, "ok": ok}
    for a, c in compared.items():
        log(f"{name} {a} against the dense mask: loss {c['loss_rel']:.2e}, gradients {c['grads_rel_total']:.2e} "
            f"in all, median {c['grads_rel_median']:.2e}")
    log(f"{name} check -> {'ok' if ok else 'FAILED'}")
    del model, check
    torch.cuda.empty_cache()
    if args.transformers:
        hf = build(name, "transformers", cfg).train()
        hf.set_attn_implementation("sdpa")
        if args.checkpointing:
            hf.gradient_checkpointing_enable()
        hf_arms = (("transformers sdpa", None, False), ("transformers sdpa, padded rows", rows, False),
                   ("transformers sdpa, padded rows, default cache", rows, None))
        for arm, batch, use_cache in hf_arms:
            if "padded" in arm and not padded_arms:
                continue
            hf.zero_grad(set_to_none=True)
            torch.cuda.reset_peak_memory_stats()
            held_hf = torch.cuda.memory_allocated() / 2**30
            hf_times = [step(hf, ids, pos, batch, use_cache)[0] for _ in range(args.steps + 1)][1:]
            t = statistics.median(hf_times)
            out[arm] = {"step_ms": t * 1e3, "tokens_per_s": tokens / t, "held_before_gib": held_hf,
                        "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
            log(f"{name} {arm}: {t * 1e3:.1f} ms a step, {tokens / t:.0f} tok/s, peak {out[arm]['peak_gib']:.1f} "
                f"GiB ({held_hf:.1f} held before the step)")
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
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every arm")
    p.add_argument("--arms", default="", help="the moetorch arms to run, separated by ';' (default: all)")
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
