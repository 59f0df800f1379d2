"""Attention over packed prompts, timed: the varlen flash kernel (`ops.attention.packed_attention`'s
GPU path) against sdpa over the same prompts as a padded batch (cuDNN's causal kernel, and with a
2D mask as a padded prefill has), and the copies that place packed keys in a cache's rows.

    PYTHONPATH=.:bench python bench/varlen_attention.py --out r.txt

bf16, JetMoE's heads (32 query, 16 kv heads of 128), one layer, mean of 20 calls after 3.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from moetorch.benchmark import log
from moetorch.ops import triton_fused
from moetorch.ops.attention import Packed, packed_attention

H, G, D = 32, 16, 128


def timed(fn, n: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def attention_lines(lengths: list[int]) -> list[str]:
    N, n, L = sum(lengths), len(lengths), max(lengths)
    q = torch.randn(N, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(N, G, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    packed = Packed.of(lengths, lengths, q.device)
    qb, kb, vb = (torch.zeros(n, L, t.shape[1], D, device="cuda", dtype=torch.bfloat16) for t in (q, k, v))
    mask = torch.zeros(n, 1, L, L, dtype=torch.bool, device="cuda")
    for i, (a, m) in enumerate(zip(packed.cu_q.tolist(), lengths)):  # left-padded rows
        for src, dst in ((q, qb), (k, kb), (v, vb)):
            dst[i, L - m:] = src[a:a + m]
        mask[i, 0, L - m:, L - m:] = torch.ones(m, m, dtype=torch.bool, device="cuda").tril()
    mask[:, 0].diagonal(dim1=1, dim2=2).fill_(True)  # padding rows see themselves
    qb, kb, vb = (t.transpose(1, 2) for t in (qb, kb, vb))
    cases = {
        "varlen flash (packed)": lambda: torch.ops.aten._flash_attention_forward(
            q, k, v, packed.cu_q, packed.cu_k, L, L, 0.0, True, False, scale=D**-0.5),
        "packed_attention": lambda: packed_attention(q, k, v, packed, D**-0.5),
        "sdpa causal, padded batch": lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True,
                                                                             enable_gqa=True),
        "sdpa 2D mask, padded batch": lambda: F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask,
                                                                             enable_gqa=True),
    }
    out = [f"{n} prompts of {min(lengths)}-{L} tokens ({N} packed, {n * L} padded):"]
    for name, fn in cases.items():
        out.append(f"  {name}: {1e3 * timed(fn):.3f} ms")
    return out


def copy_lines(K: int = 16384, B: int = 64, S: int = 4096) -> list[str]:
    store = torch.zeros(B, G, S, D, device="cuda", dtype=torch.bfloat16)
    pairs = torch.randperm(B * S, device="cuda")[:K]  # distinct (row, slot) pairs
    rows, slots = pairs // S, pairs % S
    src = torch.randn(K, G, D, device="cuda", dtype=torch.bfloat16)
    take = torch.arange(K, device="cuda")
    take[::2] = -1  # half the keys read from the store
    nbytes = K * G * D * 2
    cases = {
        "index_put store[rows, :, slots] = keys": lambda: store.__setitem__((rows, slice(None), slots), src),
        "gather store[rows, :, slots]": lambda: store[rows, :, slots],
        "triton_fused.place_keys": lambda: triton_fused.place_keys(src, store, rows, slots),
        "triton_fused.pack_keys (half from the store)": lambda: triton_fused.pack_keys(src, store, take, rows, slots),
    }
    out = [f"{K} keys x {G} heads x {D} (bf16, {nbytes / 1e6:.0f} MB) into a [{B}, {G}, {S}, {D}] layer:"]
    for name, fn in cases.items():
        s = timed(fn)
        out.append(f"  {name}: {1e3 * s:.3f} ms, {nbytes / s / 1e9:.0f} GB/s written")
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}"]
    lines += attention_lines([1024] * 16)
    lines += attention_lines([300, 1500, 700, 1024, 2000, 100, 1800, 900, 1200, 1000, 1100, 1300, 1000, 1100, 1500,
                              760])
    lines += attention_lines([1093])
    lines += copy_lines()
    text = "\n".join(lines)
    log("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
