"""Two kernels for a sampled decode step: temperature, top-k, top-p, min-p, softmax and the draw.

`generate(do_sample=True)` with Transformers' warpers runs ~40 torch kernels a step on 32000
logits: `torch.topk` (45 us on the H200 at batch 1), a full sort, softmax and cumulative sum for
top-p (68 us), softmax and `torch.multinomial` (45 us). `sample` computes the same:

1. the row in float32, times the temperature's reciprocal (what torch's CUDA division by a scalar
   computes: `x * (1 / t)` in float32, rounded before anything else uses it);
2. top-k: `_chunk_top_kernel` (many programs a row, CHUNK values each) finds each chunk's KC-th
   largest value by bisection over the values' order-preserving int32 bit patterns (32 counts) and
   passes on its KC best; `_draw_kernel` (a program a row) finds the k-th largest of those the same
   way: exactly the row's, as each chunk's share of the row's k best is among its own k best. The
   row keeps every value >= it, ties included, as `TopKLogitsWarper` does;
3. top-p (optional): Transformers sorts the row ascending (stable: equal values in index order, as
   CUDA's sort leaves them), drops the prefix whose cumulative probability stays <= 1 - top_p and
   always keeps the last token. The survivors of top-k in that order are the values tied at the
   k-th (index order), then the fewer than k above it, all in the pool, which one program sorts;
4. min-p (optional): drops what is less likely than min_p times the top token, as
   `MinPLogitsWarper` does after the others;
5. the draw: `torch.multinomial(probs, 1)` is `argmax(probs / q)` with `q` drawn by
   `exponential_` on a tensor of the row's shape. `sample` draws `q` with torch (same generator,
   same draws, same generator state after) and the kernel takes the argmax (first index on ties).

The kept set is Transformers' exactly where the top-k threshold decides. The probabilities are
summed in another order than torch's softmax and cumulative sum, so they can differ in the last
bit: a token whose cumulative probability lies within a rounding step of 1 - top_p, or two tokens
whose `p / q` lie within one, can come out the other way (gpu_check counts such draws).
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .launch import cdiv, launcher, next_power_of_2

# Largest top_k `sample` serves: each chunk passes on its KC = next_power_of_2(top_k) best, and one
# program of `_draw_kernel` holds them all (16 chunks x 256 at 32064 logits).
MAX_K = 256
# Values a program of the first kernel takes (H200, 32064 bf16 logits, top-k 50 and top-p 0.9:
# 1024 / 2048 / 4096 took 41.4 / 40.7 / 44.0 us at batch 1, 47.9 / 44.6 / 47.7 at batch 16;
# bench/sampling_chunks.py, h200-2026-11-30-sampling-chunks.txt), and the block the second walks
# the row in.
CHUNK = 2048
ROW_BLOCK = 4096
_MIN64 = tl.constexpr(-(2**63))


@triton.jit
def _order_key(x):
    """float32 -> int32 whose signed order is the values' order (-0.0 taken as +0.0)."""
    b = (x + 0.0).to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b)


@triton.jit
def _from_key(key):
    return tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)


@triton.jit
def _scaled_row(logits_ptr, row, stride_row, idx, V, inv_t, TEMPERATURE: tl.constexpr):
    x = tl.load(logits_ptr + row * stride_row + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
    if TEMPERATURE:
        x = x * inv_t
    return x


@triton.jit
def _row_block(logits_ptr, row, stride_row, start, V, inv_t, thr, BLOCK: tl.constexpr, TEMPERATURE: tl.constexpr):
    """One block of the row: (indices, scaled values, their keys, which survive top-k)."""
    idx = start + tl.arange(0, BLOCK)
    x = _scaled_row(logits_ptr, row, stride_row, idx, V, inv_t, TEMPERATURE)
    key = _order_key(x)
    return idx, x, key, (idx < V) & (key >= thr)


@triton.jit
def _exp(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.exp(x)
    return tl.exp(x)


@triton.jit
def _kth_largest(key, valid, k):
    """The k-th largest of `key[valid]` (int32), by bisection over the int32 range: 32 counts. Where
    fewer than k are valid, the smallest int32."""
    lo = tl.full((), -(2**31), tl.int64)
    hi = tl.full((), 2**31, tl.int64)
    wide = key.to(tl.int64)
    for _ in range(32):
        mid = (lo + hi) >> 1
        enough = tl.sum((valid & (wide >= mid)).to(tl.int32), 0) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    return lo.to(tl.int32)


@triton.jit
def _pack(key, idx):
    """(key, index) -> int64 whose order is the key's, then the index's."""
    return (key.to(tl.int64) << 32) | idx.to(tl.int64)


@launcher
@triton.jit
def _chunk_top_kernel(logits_ptr, work_ptr, V, stride_row, inv_t, n_chunks,
                      CH: tl.constexpr, KC: tl.constexpr, TEMPERATURE: tl.constexpr):
    """Program (row, chunk): the chunk's KC largest values, packed (`_pack`), in no order; the
    smallest int64 where the chunk has fewer."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    idx = c * CH + tl.arange(0, CH)
    valid = idx < V
    key = _order_key(_scaled_row(logits_ptr, row, stride_row, idx, V, inv_t, TEMPERATURE))
    t = _kth_largest(key, valid, KC)
    # the values above t, then as many equal to t as fill KC slots
    above = valid & (key > t)
    tie = valid & (key == t)
    slot = tl.where(above, tl.cumsum(above.to(tl.int32), 0),
                    tl.sum(above.to(tl.int32), 0) + tl.cumsum(tie.to(tl.int32), 0)) - 1
    out = work_ptr + (row * n_chunks + c) * KC
    tl.store(out + tl.arange(0, KC), tl.full((KC,), _MIN64, tl.int64))
    tl.debug_barrier()
    tl.store(out + slot, _pack(key, idx), mask=(above | tie) & (slot < KC))


@launcher
@triton.jit
def _draw_kernel(
    logits_ptr, q_ptr, work_ptr, out_ptr, V, stride_row, inv_t, k, drop_mass, min_p, pool_size, n_rows,
    POOL: tl.constexpr, KC: tl.constexpr, BLOCK: tl.constexpr, ALL: tl.constexpr, TEMPERATURE: tl.constexpr,
    TOP_P: tl.constexpr, MIN_P: tl.constexpr, LIBDEVICE: tl.constexpr,
):
    """Program per row: top-k's threshold from the chunks' best, top-p, min-p, softmax and the draw."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, POOL)
    if ALL:  # no top-k: every value stays
        thr = tl.full((), -(2**31), tl.int32)
        m = tl.full((), float("-inf"), tl.float32)
        for start in range(0, V, BLOCK):
            m = tl.maximum(m, tl.max(_scaled_row(logits_ptr, row, stride_row, start + tl.arange(0, BLOCK), V,
                                                 inv_t, TEMPERATURE), 0))
    else:
        pool = tl.load(work_ptr + row * pool_size + j, mask=j < pool_size, other=_MIN64)
        pool_key = (pool >> 32).to(tl.int32)
        thr = _kth_largest(pool_key, pool != _MIN64, k)  # the row's k-th largest: exact
        m = _from_key(tl.max(pool_key, 0))
    # pass 1: the softmax's sum over the survivors, and the ties at the threshold
    total = tl.zeros((), tl.float32)
    n_tie = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK):
        idx, x, key, keep = _row_block(logits_ptr, row, stride_row, start, V, inv_t, thr, BLOCK, TEMPERATURE)
        total += tl.sum(tl.where(keep, _exp(x - m, LIBDEVICE), 0.0), 0)
        n_tie += tl.sum((keep & (key == thr)).to(tl.int32), 0)
    total_kept = total
    d_tie = tl.zeros((), tl.int32)  # top-p drops the first d_tie tied tokens (index order)
    if TOP_P:
        # Transformers' ascending order of the survivors: the ties at the threshold first (index
        # order), then the values above it, which are all in the pool (each chunk has fewer than k).
        n_above = tl.sum((pool_key > thr).to(tl.int32), 0)
        e_tie = _exp(_from_key(thr) - m, LIBDEVICE)
        p_tie = e_tie / total
        # the largest r <= n_tie with r * p_tie <= 1 - top_p (the tied tokens' cumulative mass)
        r = tl.minimum(tl.maximum((drop_mass / p_tie).to(tl.int32), 0), n_tie)
        r = tl.where((r > 0) & (r.to(tl.float32) * p_tie > drop_mass), r - 1, r)
        r = tl.where((r < n_tie) & ((r + 1).to(tl.float32) * p_tie <= drop_mass), r + 1, r)
        d_tie = tl.where(n_above == 0, tl.minimum(r, n_tie - 1), r)  # the last token always stays
        # the values above the threshold, sorted descending (fewer than k: KC slots)
        above_pool = pool_key > thr
        slot = tl.cumsum(above_pool.to(tl.int32), 0) - 1
        g_ptr = work_ptr + pool_size * n_rows + row * KC
        i = tl.arange(0, KC)
        tl.store(g_ptr + i, tl.full((KC,), _MIN64, tl.int64))
        tl.debug_barrier()
        tl.store(g_ptr + slot, pool, mask=above_pool)
        tl.debug_barrier()
        g = tl.sort(tl.load(g_ptr + i), descending=True)
        g_key = (g >> 32).to(tl.int32)
        above = i < n_above
        g_idx = (g & 0xFFFFFFFF).to(tl.int32)
        e_g = tl.where(above, _exp(_from_key(g_key) - m, LIBDEVICE), 0.0)
        cum_g = n_tie.to(tl.float32) * p_tie + tl.cumsum(e_g / total, 0, reverse=True)
        kept_g = above & ((cum_g > drop_mass) | (i == 0))
        total_kept = tl.sum(tl.where(kept_g, e_g, 0.0), 0) + (n_tie - d_tie).to(tl.float32) * e_tie
    total_final = total_kept
    if MIN_P:
        # min-p drops what is less likely than min_p times the top token (whose e is exp(0) = 1)
        cut = min_p * (1.0 / total_kept)
        if TOP_P:
            kept_g = kept_g & (e_g / total_kept >= cut)
            d_tie = tl.where(e_tie / total_kept >= cut, d_tie, n_tie)
            total_final = tl.sum(tl.where(kept_g, e_g, 0.0), 0) + (n_tie - d_tie).to(tl.float32) * e_tie
        else:
            total_final = tl.zeros((), tl.float32)
            for start in range(0, V, BLOCK):
                idx, x, key, keep = _row_block(logits_ptr, row, stride_row, start, V, inv_t, thr, BLOCK, TEMPERATURE)
                e = tl.where(keep, _exp(x - m, LIBDEVICE), 0.0)
                total_final += tl.sum(tl.where(keep & (e / total_kept >= cut), e, 0.0), 0)
    if TOP_P:
        q_g = tl.load(q_ptr + row * V + g_idx, mask=kept_g, other=1.0)
        ratio_g = tl.where(kept_g, (e_g / total_final) / q_g, -1.0)
        best = tl.max(ratio_g, 0)
        best_idx = tl.min(tl.where(ratio_g == best, g_idx, 2**31 - 1), 0)
    else:
        best = tl.full((), -1.0, tl.float32)
        best_idx = tl.full((), 2**31 - 1, tl.int32)
    # pass 2: argmax(p / q), the first index on ties (torch.multinomial's argmax)
    seen_tie = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK):
        idx, x, key, keep = _row_block(logits_ptr, row, stride_row, start, V, inv_t, thr, BLOCK, TEMPERATURE)
        e = _exp(x - m, LIBDEVICE)
        if TOP_P:  # the values above the threshold came from the pool; here the kept ties
            tie = keep & (key == thr)
            rank = seen_tie + tl.cumsum(tie.to(tl.int32), 0)
            seen_tie += tl.sum(tie.to(tl.int32), 0)
            keep = tie & (rank > d_tie)
        elif MIN_P:
            keep = keep & (e / total_kept >= cut)
        q = tl.load(q_ptr + row * V + idx, mask=keep, other=1.0)
        ratio = tl.where(keep, (e / total_final) / q, -1.0)
        b = tl.max(ratio, 0)
        b_idx = tl.min(tl.where(ratio == b, idx, 2**31 - 1), 0)
        better = (b > best) | ((b == best) & (b_idx < best_idx))
        best_idx = tl.where(better, b_idx, best_idx)
        best = tl.maximum(b, best)
    tl.store(out_ptr + row, best_idx.to(tl.int64))


def _f32(x: float) -> float:
    """x rounded to float32, as torch rounds a Python number it combines with a float32 tensor."""
    return struct.unpack("f", struct.pack("f", x))[0]


def reciprocal(temperature: float) -> float:
    """1 / temperature as torch's CUDA division by a scalar computes it (in float32; the quotient of
    two float32 values, taken in double and rounded once to float32, is float32's own quotient)."""
    return _f32(1.0 / _f32(temperature))


def sample(logits_RV: torch.Tensor, temperature: float | None, top_k: int | None, top_p: float | None,
           min_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `logits_RV` [R, V], as `torch.multinomial(softmax(scores), 1)` draws it
    from `scores = min_p(top_p(top_k(logits / temperature)))` (Transformers' warpers; None: not
    applied)."""
    R, V = logits_RV.shape
    if logits_RV.stride(1) != 1:
        logits_RV = logits_RV.contiguous()
    if top_p is not None and top_k is None:
        raise ValueError("sample: top_p needs a top_k here (the processors serve top_p alone)")
    if top_k is not None and min(top_k, V) > MAX_K:
        raise ValueError(f"sample: top_k={top_k} of {V} logits (at most {MAX_K} here)")
    device = logits_RV.device
    # the exponential draws torch.multinomial makes for a [R, V] float32 probability tensor
    q_RV = torch.empty((R, V), dtype=torch.float32, device=device).exponential_(generator=generator)
    out_R = torch.empty(R, dtype=torch.long, device=device)
    every = top_k is None
    k = V if every else min(int(top_k), V)
    inv_t = reciprocal(temperature) if temperature is not None else 1.0
    # fp32(1 - top_p): the comparison `cumsum <= 1 - top_p` rounds the Python float to float32
    drop_mass = _f32(1.0 - top_p) if top_p is not None else 0.0
    kc = next_power_of_2(k)  # > k - 1: top-p's values above the threshold fit
    chunk = max(min(CHUNK, next_power_of_2(V)), kc)
    n_chunks = cdiv(V, chunk)
    # the chunks' best [R, n_chunks * kc], then top-p's values above the threshold [R, kc]
    work = torch.empty(1 if every else R * (n_chunks + 1) * kc, dtype=torch.long, device=device)
    if not every:
        _chunk_top_kernel[(R, n_chunks)](logits_RV, work, V, logits_RV.stride(0), inv_t, n_chunks,
                                         CH=chunk, KC=kc, TEMPERATURE=temperature is not None,
                                         num_warps=4, enable_fp_fusion=False)
    _draw_kernel[(R,)](
        logits_RV, q_RV, work, out_R, V, logits_RV.stride(0), inv_t, k, drop_mass,
        _f32(min_p) if min_p is not None else 0.0, n_chunks * kc, R,
        POOL=next_power_of_2(n_chunks * kc), KC=kc, BLOCK=min(ROW_BLOCK, next_power_of_2(V)), ALL=every,
        TEMPERATURE=temperature is not None, TOP_P=top_p is not None, MIN_P=min_p is not None,
        LIBDEVICE=logits_RV.is_cuda,
        num_warps=8,
        enable_fp_fusion=False,  # torch rounds x * (1 / t) before subtracting the max
    )
    return out_R
