"""One kernel for a continuous-batching step's draw, where every row has settings of its own.

`draw(scores_BV, ...)` computes what `engine.row_sampling.draw_rows_torch` computes: per row,
Transformers' temperature, top-k, top-p and min-p warpers, then the draw as an exponential race
(`argmax p / q`, `q = -log(1 - u)`) whose uniforms `u` come from Philox keyed by the row's seed,
counted by (token id, the request's draw index): a row's draws depend on its seed and its own
history, never on the rows beside it. Greedy rows take the first index of their largest score.

A program takes a row, with no sort:
1. a pass writes the scaled row `x / t` (the warped scores' buffer, which the passes after it
   read from L2) and finds its maximum;
2. top-k: the k-th largest value by bisection over the values' order-preserving int32 keys, each
   step jumping to the nearest key present in the row, so a row of few distinct values (bf16
   logits) takes few passes;
3. top-p: the same bisection for the largest key `a` whose lower mass (the probabilities of the
   survivors below it) stays <= 1 - top_p. Transformers' ascending cumulative sum drops every value
   below `a`, keeps every value above, and drops the first `d` of the values tied at `a` (index
   order, as a stable sort leaves them) while their cumulative mass stays <= 1 - top_p; the
   largest value always stays;
4. min-p: drops what is less likely than min_p times the top token;
5. the last pass draws and writes the warped scores (-inf where filtered).

The kept set is Transformers' where no cumulative sum lies within a rounding step of 1 - top_p:
the probabilities are summed in another order than torch's softmax and cumulative sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launcher, next_power_of_2
from .triton_sample import _exp, _from_key, _order_key

# Values a program reads at once, and its warps (H200: `bench/row_sampling_cost.py`).
BLOCK = 4096
NUM_WARPS = 16


@triton.jit
def _uniform(seed, idx, draw):
    """Philox-4x32-10 keyed by `seed` at counter (token id, draw index, 0, 0): uniforms in [0, 1),
    multiples of 2**-24 (`engine.row_sampling.philox_uniform` computes the same)."""
    zero = idx * 0
    r, _, _, _ = tl.philox(seed, idx, zero + draw, zero, zero)
    return (r >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _load(ptr, idx, V):
    return tl.load(ptr + idx, mask=idx < V, other=float("-inf"))


@triton.jit
def _bisect(w_ptr, V, m, total, lo, hi, k, drop, thr, MASS: tl.constexpr, BLOCK: tl.constexpr):
    """The largest present key t in [lo, hi) with count(keys >= t) >= k (MASS False: top-k), or
    with the mass of the survivors (keys >= thr) below t <= drop (MASS True: top-p). `lo` is a
    present key where the condition holds, `hi` a bound where it fails. Each step is a pass over
    the row, summed per lane and reduced once at its end, with the fast exponential and no
    division (the pass after the search sums the mass as the draw does)."""
    budget = drop * total
    while hi - lo > 1:
        mid = (lo + (hi - lo) // 2).to(tl.int32)  # lo <= mid < hi <= 2**31
        below = tl.zeros((BLOCK,), tl.float32)
        above = tl.zeros((BLOCK,), tl.int32)
        nxt = tl.full((BLOCK,), 2**31 - 1, tl.int32)  # the smallest key >= mid
        prv = tl.full((BLOCK,), -(2**31), tl.int32)  # the largest key < mid
        for start in range(0, V, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            s = _load(w_ptr, idx, V)
            key = _order_key(s)
            live = (idx < V) & (key >= thr)
            hi_side = live & (key >= mid)
            lo_side = live & (key < mid)
            if MASS:
                below += tl.where(lo_side, tl.exp(s - m), 0.0)
            else:
                above += hi_side.to(tl.int32)
            nxt = tl.minimum(nxt, tl.where(hi_side, key, 2**31 - 1))
            prv = tl.maximum(prv, tl.where(lo_side, key, -(2**31)))
        holds = (tl.sum(below, 0) <= budget) if MASS else (tl.sum(above, 0) >= k)
        lo = tl.where(holds, tl.min(nxt, 0).to(tl.int64), lo)
        hi = tl.where(holds, hi, tl.max(prv, 0).to(tl.int64) + 1)
    return lo.to(tl.int32)


@triton.jit
def _kept(s, idx, V, m, thr, a, d_tie, seen, kept_total, cut, LIBDEVICE: tl.constexpr):
    """A block's survivors of top-k (keys >= thr), top-p (keys above a, and the ties at a after
    the first d_tie; `seen`: ties in the blocks before) and min-p (e / kept_total >= cut), their e
    and the ties seen so far."""
    key = _order_key(s)
    tie = (idx < V) & (key == a)
    n_tie = tl.sum(tie.to(tl.int32), 0)
    top_p_keeps = key > a
    if d_tie > 0:
        top_p_keeps = top_p_keeps | (tie & (seen + tl.cumsum(tie.to(tl.int32), 0) > d_tie))
    else:
        top_p_keeps = top_p_keeps | tie
    e = _exp(s - m, LIBDEVICE)
    return (idx < V) & (key >= thr) & top_p_keeps & (e / kept_total >= cut), e, seen + n_tie


@launcher
@triton.jit
def _row_draw_kernel(
    scores_ptr, stride_row, warped_ptr, out_ptr, sampled_ptr, temp_ptr, top_k_ptr, drop_ptr, min_p_ptr,
    seed_ptr, first_ptr, step, V,
    TOP_K: tl.constexpr, TOP_P: tl.constexpr, MIN_P: tl.constexpr, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_ptr = scores_ptr + row * stride_row
    w_ptr = warped_ptr + row * V
    sampled = tl.load(sampled_ptr + row) != 0
    t = tl.load(temp_ptr + row)
    # pass 1: the scaled row into the warped buffer, its maximum and where it first occurs (per
    # lane, then over the lanes), its smallest key
    m_v = tl.full((BLOCK,), float("-inf"), tl.float32)
    first_v = tl.full((BLOCK,), 2**31 - 1, tl.int32)
    lo_v = tl.full((BLOCK,), 2**31 - 1, tl.int32)
    for start in range(0, V, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        s = tl.math.div_rn(_load(x_ptr, idx, V).to(tl.float32), t)
        tl.store(w_ptr + idx, s, mask=idx < V)
        first_v = tl.where(s > m_v, idx, first_v)
        m_v = tl.maximum(m_v, s)
        lo_v = tl.minimum(lo_v, tl.where(idx < V, _order_key(s), 2**31 - 1))
    m = tl.max(m_v, 0)
    first = tl.min(tl.where(m_v == m, first_v, 2**31 - 1), 0)
    token = first
    tl.debug_barrier()
    if sampled:
        lo_key = tl.min(lo_v, 0)
        top = _order_key(m).to(tl.int64) + 1
        thr = tl.full((), -(2**31), tl.int32)  # top-k keeps keys >= thr
        if TOP_K:
            k = tl.load(top_k_ptr + row)
            if (k > 0) & (k < V):
                thr = _bisect(w_ptr, V, m, 1.0, lo_key.to(tl.int64), top, k, 0.0, thr, False, BLOCK)
        total_v = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            s = _load(w_ptr, idx, V)
            total_v += tl.where((idx < V) & (_order_key(s) >= thr), _exp(s - m, LIBDEVICE), 0.0)
        total = tl.sum(total_v, 0)
        # top-p: keys below a go, the first d_tie of those equal to a (index order) go
        a = thr
        d_tie = tl.zeros((), tl.int32)
        kept_total = total
        if TOP_P:
            drop = tl.load(drop_ptr + row)
            if drop > 0:
                a = _bisect(w_ptr, V, m, total, tl.maximum(thr, lo_key).to(tl.int64), top, 0, drop, thr, True, BLOCK)
                below_v = tl.zeros((BLOCK,), tl.float32)
                tie_v = tl.zeros((BLOCK,), tl.int32)
                above_v = tl.zeros((BLOCK,), tl.float32)
                for start in range(0, V, BLOCK):
                    idx = start + tl.arange(0, BLOCK)
                    s = _load(w_ptr, idx, V)
                    key = _order_key(s)
                    live = (idx < V) & (key >= thr)
                    e = _exp(s - m, LIBDEVICE)
                    below_v += tl.where(live & (key < a), e / total, 0.0)
                    tie_v += (live & (key == a)).to(tl.int32)
                    above_v += tl.where(live & (key > a), e, 0.0)
                below = tl.sum(below_v, 0)
                n_tie = tl.sum(tie_v, 0)
                above_e = tl.sum(above_v, 0)
                e_tie = _exp(_from_key(a) - m, LIBDEVICE)
                p_tie = e_tie / total
                # the largest r <= n_tie with below + r * p_tie <= drop
                r = tl.minimum(tl.maximum(((drop - below) / p_tie).to(tl.int32), 0), n_tie)
                r = tl.where((r > 0) & (below + r.to(tl.float32) * p_tie > drop), r - 1, r)
                r = tl.where((r < n_tie) & (below + (r + 1).to(tl.float32) * p_tie <= drop), r + 1, r)
                d_tie = tl.where(above_e == 0.0, tl.minimum(r, n_tie - 1), r)  # the largest stays
                kept_total = above_e + (n_tie - d_tie).to(tl.float32) * e_tie
        cut = tl.zeros((), tl.float32)
        final_total = kept_total
        if MIN_P:
            min_p = tl.load(min_p_ptr + row)
            if min_p > 0:
                # min-p drops what is less likely than min_p times the top token (whose e is 1)
                cut = min_p * (1.0 / kept_total)
                final_v = tl.zeros((BLOCK,), tl.float32)
                seen = tl.zeros((), tl.int32)
                for start in range(0, V, BLOCK):
                    idx = start + tl.arange(0, BLOCK)
                    keep, e, seen = _kept(_load(w_ptr, idx, V), idx, V, m, thr, a, d_tie, seen, kept_total, cut,
                                          LIBDEVICE)
                    final_v += tl.where(keep, e, 0.0)
                final_total = tl.sum(final_v, 0)
        # the draw: argmax (e / final_total) / q, the first index on ties; the warped scores
        seed = tl.load(seed_ptr + row)
        draw = (step - tl.load(first_ptr + row)).to(tl.int32)
        best_v = tl.full((BLOCK,), -1.0, tl.float32)
        best_idx_v = tl.full((BLOCK,), 2**31 - 1, tl.int32)
        seen = tl.zeros((), tl.int32)
        for start in range(0, V, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            s = _load(w_ptr, idx, V)
            keep, e, seen = _kept(s, idx, V, m, thr, a, d_tie, seen, kept_total, cut, LIBDEVICE)
            q = -tl.log(1.0 - _uniform(seed, idx, draw))
            ratio = tl.where(keep, (e / final_total) / q, -1.0)
            best_idx_v = tl.where(ratio > best_v, idx, best_idx_v)
            best_v = tl.maximum(best_v, ratio)
            tl.store(w_ptr + idx, tl.where(keep, s, float("-inf")), mask=idx < V)
        best = tl.max(best_v, 0)
        token = tl.min(tl.where(best_v == best, best_idx_v, 2**31 - 1), 0)
        token = tl.where(token < V, token, first)  # no ratio to compare (NaN scores): the first maximum
    # a row of -inf (or NaN) alone has no maximum either: token 0, as torch's argmax gives for -inf
    tl.store(out_ptr + row, tl.where(token < V, token, 0).to(tl.int64))


def draw(scores_BV: torch.Tensor, sampled_B: torch.Tensor, temperature_B: torch.Tensor,
         top_k_B: torch.Tensor | None, top_p_B: torch.Tensor | None, min_p_B: torch.Tensor | None,
         seed_B: torch.Tensor, first_B: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B], the warped float32 scores [B, V]) of float32 scores [B, V]: a row's settings as
    `row_sampling.warp_rows` takes them (None: no row filters), `sampled_B` which rows draw, and
    their draw index `step - first_B`."""
    B, V = scores_BV.shape
    if scores_BV.stride(1) != 1:
        scores_BV = scores_BV.contiguous()
    warped = torch.empty((B, V), dtype=torch.float32, device=scores_BV.device)
    out = torch.empty(B, dtype=torch.long, device=scores_BV.device)
    drop_B = None if top_p_B is None else 1 - top_p_B  # float32, as torch computes it
    _row_draw_kernel[(B,)](
        scores_BV, scores_BV.stride(0), warped, out, sampled_B, temperature_B,
        temperature_B if top_k_B is None else top_k_B, temperature_B if drop_B is None else drop_B,
        temperature_B if min_p_B is None else min_p_B, seed_B, first_B, step, V,
        TOP_K=top_k_B is not None, TOP_P=drop_B is not None, MIN_P=min_p_B is not None,
        BLOCK=min(BLOCK, next_power_of_2(V)), LIBDEVICE=scores_BV.is_cuda, num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    return out, warped
