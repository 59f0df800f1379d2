"""Fused Triton kernels for the non-expert part of a layer at inference: residual add + norm,
routing (sparsemixer, top-k softmax), rotary embedding, and decode attention over a KV cache.

Legend: R rows (tokens), D model dim, E experts, K experts per token, B batch, T new tokens,
H query heads, G kv heads, d head dim, S key slots.

At decode a layer is a few dozen tiny operations whose launches, not bytes, set the speed; each
kernel here replaces several of them (sparsemixer alone is twenty). They compute what the torch
code they replace computes (ops.norms, ops.routing, ops.rope, ops.attention, cache), in the same
order and with the same intermediate roundings: a bf16
op in torch computes in float32 and rounds its result, and the kernels round at the same points
(`_round`), so outputs agree with the torch path bit for bit in most elements and within one
rounding step elsewhere (reduction order, `exp`).

Forward-only: `ops.fused` uses them when nothing needs gradients, and the torch code otherwise.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .fused import NORM_NONE
from .launch import cdiv, launcher, next_power_of_2
from .norms import delta_terms
from .triton_moe import (
    _interpreting,
    _pdl_release,
    _pdl_start,
    _round,
    arrival_counters,
    pdl_meta,
    round_code,
    sm_count,
)

# ---- residual add + norm -------------------------------------------------------------------------


@triton.jit
def _add_norm_row(
    x_ptr, a_ptr, bias_ptr, w_ptr, nb_ptr, x_out_ptr, h_ptr, row,
    D, eps, stride_x, stride_a, stride_ak, stride_xo, stride_h,
    HAS_A: tl.constexpr, A_K: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr,
    HAS_NB: tl.constexpr, ROUND: tl.constexpr, BLOCK_D: tl.constexpr, store,
):
    # One row: s = x + (a + bias), then LayerNorm or RMSNorm of s (NORM: fused.NORM_NONE, _LAYER,
    # _RMS = 0, 1, 2). torch rounds `a + bias` and the sum before the norm reads it, and so does this.
    # A_K > 1: a is the sum of A_K rows (stride_ak apart: the experts' outputs of a token), summed in
    # float32 in order and rounded once, as torch's sum over that axis.
    # Stores s and h where `store`; returns h in float32 (rounded to the dtype; zeros past D).
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    s = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_A:
        a = tl.load(a_ptr + row * stride_a + cols, mask=ok, other=0.0).to(tl.float32)
        if A_K > 1:
            for k in tl.static_range(1, A_K):
                a += tl.load(a_ptr + row * stride_a + k * stride_ak + cols, mask=ok, other=0.0).to(tl.float32)
            a = _round(a, ROUND)
        if HAS_BIAS:
            a = _round(a + tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32), ROUND)
        s = _round(s + a, ROUND)
        if store:
            tl.store(x_out_ptr + row * stride_xo + cols, s.to(x_out_ptr.dtype.element_ty), mask=ok)
    h = s
    if NORM != 0:
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        else:
            w = tl.full((BLOCK_D,), 1.0, dtype=tl.float32)
        if NORM == 1:
            mean = tl.sum(s, axis=0) / D
            c = tl.where(ok, s - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(c * c, axis=0) / D + eps)
            h = c * rstd * w
            if HAS_NB:
                h += tl.load(nb_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        else:
            # JetMoE / Llama RMSNorm: normalise in float32, round to the dtype, then scale.
            rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / D + eps)
            h = w * _round(s * rstd, ROUND)
        h = tl.where(ok, _round(h, ROUND), 0.0)
        if store:
            tl.store(h_ptr + row * stride_h + cols, h.to(h_ptr.dtype.element_ty), mask=ok)
    return h


@launcher
@triton.jit
def _add_norm_kernel(
    x_ptr, a_ptr, bias_ptr, w_ptr, nb_ptr, x_out_ptr, h_ptr,
    D, eps, stride_x, stride_a, stride_ak, stride_xo, stride_h,
    HAS_A: tl.constexpr, A_K: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr,
    HAS_NB: tl.constexpr, ROUND: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_start(PDL)
    _add_norm_row(
        x_ptr, a_ptr, bias_ptr, w_ptr, nb_ptr, x_out_ptr, h_ptr, tl.program_id(0).to(tl.int64),
        D, eps, stride_x, stride_a, stride_ak, stride_xo, stride_h, HAS_A, A_K, HAS_BIAS, NORM, HAS_W, HAS_NB,
        ROUND, BLOCK_D, True,
    )


def _add_norm_launch(x_RD, a_RD, bias_D, norm: int, weight_D, norm_bias_D, eps: float):
    # (rows R, kernel arguments, constexprs, x_out, h) shared by the add_norm kernels
    D = x_RD.shape[-1]
    x2 = _unit_last(x_RD.reshape(-1, D))
    a_k = delta_terms(x_RD, a_RD) if a_RD is not None else 1
    a3 = _unit_last(a_RD.reshape(-1, a_k, D)) if a_RD is not None else x2.unsqueeze(1)
    x_out = torch.empty_like(x2) if a_RD is not None else x2
    h = torch.empty_like(x2) if norm != NORM_NONE else x2
    args = (
        x2, a3, bias_D if bias_D is not None else x2, weight_D if weight_D is not None else x2,
        norm_bias_D if norm_bias_D is not None else x2, x_out, h,
        D, eps, x2.stride(0), a3.stride(0), a3.stride(1), x_out.stride(0), h.stride(0),
    )
    meta = dict(
        HAS_A=a_RD is not None, A_K=a_k, HAS_BIAS=bias_D is not None, NORM=norm, HAS_W=weight_D is not None,
        HAS_NB=norm_bias_D is not None, ROUND=round_code(x_RD.dtype), BLOCK_D=next_power_of_2(D),
        num_warps=_row_warps(D),
    )
    return x2.shape[0], args, meta, x_out, h


def add_norm(x_RD, a_RD, bias_D, norm: int, weight_D, norm_bias_D, eps: float):
    """(x + (a + bias), norm(x + (a + bias))) over the last dim; `a`/`bias`/norm optional
    (None, None, NORM_NONE): returns (sum or x, normed or None). The norm's weight and bias
    (`norm_bias_D`) may be None, as in a LayerNorm without affine parameters."""
    R, args, meta, x_out, h = _add_norm_launch(x_RD, a_RD, bias_D, norm, weight_D, norm_bias_D, eps)
    if R:
        _add_norm_kernel[(R,)](*args, **meta, **pdl_meta(x_RD.device, R, R))
    shape = x_RD.shape
    return x_out.view(shape), (h.view(shape) if norm != NORM_NONE else None)


def _row_warps(D: int) -> int:
    return 1 if D <= 512 else 4 if D <= 4096 else 8


# ---- routing -------------------------------------------------------------------------------------


@triton.jit
def _softmax_pick(g, cols, pick, ROUND: tl.constexpr):
    # softmax(g)[pick] along axis 1, rounded like torch's softmax output
    m = tl.max(g, axis=1)
    p = tl.exp(g - m[:, None])
    total = tl.sum(p, axis=1)
    sel = tl.sum(tl.where(cols[None, :] == pick[:, None], p, 0.0), axis=1)
    return _round(tl.math.div_rn(sel, total), ROUND)


@triton.jit
def _sparsemixer_pick(s, masked, cols, thr, ROUND: tl.constexpr):
    # One eval-mode sparsemixer step (ops.routing._sparsemixer_pick): argmax of `masked`, and its
    # softmax weight among the logits within relative distance `thr` of the maximum.
    top = tl.max(masked, axis=1)
    pick = tl.argmax(masked, axis=1)
    factor = tl.maximum(tl.abs(s), top[:, None])
    rel = _round(tl.math.div_rn(_round(top[:, None] - s, ROUND), factor), ROUND)
    gates = tl.where(rel > thr, float("-inf"), masked)
    return pick, _softmax_pick(gates, cols, pick, ROUND)


@triton.jit
def _route_rows(
    s, cols, rows64, r_ok, w_ptr, ids_ptr, thr,
    SPARSEMIXER: tl.constexpr, K: tl.constexpr, ROUND: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Routing of float32 logits s [BLOCK_R, E_PAD] (-inf past E): weights and ids [row, K].
    if SPARSEMIXER:
        id0, w0 = _sparsemixer_pick(s, s, cols, thr, ROUND)
        id1, w1 = _sparsemixer_pick(s, tl.where(cols[None, :] == id0[:, None], float("-inf"), s), cols, thr, ROUND)
        tl.store(w_ptr + rows64 * 2, w0.to(w_ptr.dtype.element_ty), mask=r_ok)
        tl.store(w_ptr + rows64 * 2 + 1, w1.to(w_ptr.dtype.element_ty), mask=r_ok)
        tl.store(ids_ptr + rows64 * 2, id0.to(tl.int64), mask=r_ok)
        tl.store(ids_ptr + rows64 * 2 + 1, id1.to(tl.int64), mask=r_ok)
    else:
        # top-K by repeated argmax, then a float32 softmax over the K values (JetMoE's router)
        first = tl.max(s, axis=1)
        total = tl.zeros((BLOCK_R,), dtype=tl.float32)
        rest = s
        for k in tl.static_range(K):
            v = tl.max(rest, axis=1)
            i = tl.argmax(rest, axis=1)
            total += tl.exp(v - first)
            tl.store(ids_ptr + rows64 * K + k, i.to(tl.int64), mask=r_ok)
            rest = tl.where(cols[None, :] == i[:, None], float("-inf"), rest)
        rest = s
        for k in tl.static_range(K):
            v = tl.max(rest, axis=1)
            i = tl.argmax(rest, axis=1)
            w = _round(tl.math.div_rn(tl.exp(v - first), total), ROUND)
            tl.store(w_ptr + rows64 * K + k, w.to(w_ptr.dtype.element_ty), mask=r_ok)
            rest = tl.where(cols[None, :] == i[:, None], float("-inf"), rest)


@launcher
@triton.jit
def _route_kernel(
    logits_ptr, w_ptr, ids_ptr, f32_ptr, R, E, stride_l, thr,
    SPARSEMIXER: tl.constexpr, K: tl.constexpr, WRITE_F32: tl.constexpr, ROUND: tl.constexpr,
    BLOCK_R: tl.constexpr, E_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_start(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, E_PAD)
    r_ok = rows < R
    ok = r_ok[:, None] & (cols < E)[None, :]
    rows64 = rows.to(tl.int64)
    s = tl.load(logits_ptr + rows64[:, None] * stride_l + cols[None, :], mask=ok, other=float("-inf"))
    s = s.to(tl.float32)
    if WRITE_F32:
        tl.store(f32_ptr + rows64[:, None] * E + cols[None, :], s, mask=ok)
    _route_rows(s, cols, rows64, r_ok, w_ptr, ids_ptr, thr, SPARSEMIXER, K, ROUND, BLOCK_R)


def _route(logits_RE, k: int, sparsemixer: bool, thr: float, weight_dtype: torch.dtype, write_f32: bool):
    R, E = logits_RE.shape
    if logits_RE.stride(1) != 1:
        logits_RE = logits_RE.contiguous()
    w = torch.empty(R, k, dtype=weight_dtype, device=logits_RE.device)
    ids = torch.empty(R, k, dtype=torch.long, device=logits_RE.device)
    f32 = torch.empty(R, E, dtype=torch.float32, device=logits_RE.device) if write_f32 else w
    block_r = 16
    if R:
        _route_kernel[(cdiv(R, block_r),)](
            logits_RE, w, ids, f32, R, E, logits_RE.stride(0), thr,
            SPARSEMIXER=sparsemixer, K=k, WRITE_F32=write_f32, ROUND=round_code(weight_dtype),
            BLOCK_R=block_r, E_PAD=max(next_power_of_2(E), 2), num_warps=1,
            **pdl_meta(logits_RE.device, cdiv(R, block_r), R),
        )
    return w, ids, (f32 if write_f32 else None)


@functools.cache
def _threshold(jitter_eps: float, dtype: torch.dtype) -> float:
    # torch compares the quotient with `2 * eps` in the logits' dtype: round the threshold alike.
    return torch.tensor(2 * jitter_eps, dtype=dtype).item()


def sparsemixer_eval(logits_RE: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode sparsemixer: (weights [R, 2] in the logits' dtype, ids [R, 2])."""
    w, ids, _ = _route(logits_RE, 2, True, _threshold(jitter_eps, logits_RE.dtype), logits_RE.dtype, False)
    return w, ids


def topk_softmax(logits_RE: torch.Tensor, k: int, weight_dtype: torch.dtype):
    """Top-k softmax: (weights [R, k] in weight_dtype, ids [R, k], the logits in float32)."""
    return _route(logits_RE, k, False, 0.0, weight_dtype, True)


# ---- residual add + norm + router ----------------------------------------------------------------

@launcher
@triton.jit
def _add_norm_route_kernel(
    x_ptr, a_ptr, bias_ptr, w_ptr, nb_ptr, x_out_ptr, h_ptr,
    D, eps, stride_x, stride_a, stride_ak, stride_xo, stride_h,
    rw_ptr, logits_ptr, rweights_ptr, ids_ptr, counter_ptr, E, stride_rw, thr,
    HAS_A: tl.constexpr, A_K: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr,
    HAS_NB: tl.constexpr, ROUND: tl.constexpr, BLOCK_D: tl.constexpr, SPARSEMIXER: tl.constexpr,
    K: tl.constexpr, E_PAD: tl.constexpr, EPP: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_start(PDL)
    # Program (row, g): the row's add + norm (every program of the row computes it; the g = 0 one
    # stores s and h), then the logits of experts [g * EPP, g * EPP + EPP): h . W_router[e], a
    # float32 sum rounded to the dtype, as the Linear rounds its output. One launch for norm, router
    # GEMV and routing.
    # EPP >= E_PAD: the row's one program takes all E logits, its router loads issued with the row's,
    # and routes them itself: no arrival, whose atomic and reload sit on the step's critical path.
    # Else the row's last program to arrive routes its E logits and resets the row's counter to zero
    # for the next launch: the row's programs share the router's bytes.
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    ee = tl.arange(0, E_PAD)
    e_ok = ee < E
    mine = g * EPP + tl.arange(0, EPP)  # this program's experts, their router rows loaded with the row
    mine_ok = mine < E
    wr = tl.load(rw_ptr + mine.to(tl.int64)[:, None] * stride_rw + cols[None, :],
                 mask=mine_ok[:, None] & ok[None, :], other=0.0)
    h = _add_norm_row(  # stored by program g == 0 (with EPP >= E_PAD the only one of its row)
        x_ptr, a_ptr, bias_ptr, w_ptr, nb_ptr, x_out_ptr, h_ptr, row,
        D, eps, stride_x, stride_a, stride_ak, stride_xo, stride_h, HAS_A, A_K, HAS_BIAS, NORM, HAS_W, HAS_NB,
        ROUND, BLOCK_D, g == 0,
    )
    rows64 = row + tl.arange(0, 1)
    lg = _round(tl.sum(wr.to(tl.float32) * h[None, :], axis=1), ROUND)
    tl.store(logits_ptr + row * E + mine, lg.to(logits_ptr.dtype.element_ty), mask=mine_ok)
    if EPP >= E_PAD:
        # the stored logit's value, as the arrival path reloads it
        lg = tl.where(e_ok, lg.to(logits_ptr.dtype.element_ty).to(tl.float32), float("-inf"))
        _route_rows(tl.reshape(lg, (1, E_PAD)), ee, rows64, rows64 >= 0, rweights_ptr, ids_ptr,
                    thr, SPARSEMIXER, K, ROUND, 1)
    else:
        # Every program's logits are stored before its (gpu-scope, acq_rel) arrival; the last arriver
        # reads them all through L2 (".cg": other SMs wrote them).
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.cdiv(E, EPP) - 1:
            row_lg = tl.load(logits_ptr + row * E + ee, mask=e_ok, other=float("-inf"), cache_modifier=".cg")
            _route_rows(tl.reshape(row_lg.to(tl.float32), (1, E_PAD)), ee, rows64, rows64 >= 0, rweights_ptr,
                        ids_ptr, thr, SPARSEMIXER, K, ROUND, 1)
            tl.atomic_xchg(counter_ptr + row, 0)


# Router values (experts x D) one program of `add_norm_route` takes at most: each program computes
# the logits of as many experts as fit (a power of two), and a row whose experts all fit in one
# program routes them there, with no arrival. On the H200 (bench/decode_ab.py), JetMoE's 8 x 2048
# router in one program a row: batch-1 decode 2-6% faster than 8 programs and an arrival, batch 4
# 1118 against 1094 tok/s, batch 16 3200 against 3173, batch 64 11476 against 11285
# (h200-2026-11-30-ab-route-all-e-*.json). PhiMoE's 16 x 4096 in one program was 2.5% slower at
# batch 1 (one SM loading 128 KB takes longer than the arrival). It takes 4 experts a program, an
# arrival among 4: batch-1 decode 266.2 against 265.4 tok/s with one expert a program
# (h200-2026-11-30-ab-route-epp4-phimoe-b1.json), though alone in a graph chain 5.1 against 5.0 us.
ROUTE_PROGRAM_VALUES = 16384


def route_experts_per_program(E: int, D: int) -> int:
    """Experts whose logits one program of `add_norm_route` computes: the largest power of two whose
    router rows hold at most ROUTE_PROGRAM_VALUES values (at least 1), all E (padded to a power of
    two) where they fit."""
    e_pad = max(next_power_of_2(E), 2)
    epp = 1
    while epp < e_pad and 2 * epp * D <= ROUTE_PROGRAM_VALUES:
        epp *= 2
    return epp


def add_norm_route(
    x_RD, a_RD, bias_D, norm: int, weight_D, norm_bias_D, eps: float,
    router_ED, k: int, sparsemixer_eps: float | None, logits_f32: bool,
):
    """`add_norm`, then the router of the normed rows in the same kernel: returns
    (sum or x, normed, (routing weights [R, k], ids [R, k], logits [R, E])). Routing is sparsemixer's
    (eval mode, k = 2) when `sparsemixer_eps` is given, else a top-k softmax; weights are in the
    rows' dtype, logits too unless `logits_f32`."""
    sparsemixer = sparsemixer_eps is not None
    if sparsemixer and k != 2:
        raise ValueError(f"sparsemixer routes to 2 experts, got k={k}")
    R, args, meta, x_out, h = _add_norm_launch(x_RD, a_RD, bias_D, norm, weight_D, norm_bias_D, eps)
    E = router_ED.shape[0]
    dtype, device = x_RD.dtype, x_RD.device
    logits = torch.empty(R, E, dtype=torch.float32 if logits_f32 else dtype, device=device)
    weights = torch.empty(R, k, dtype=dtype, device=device)
    ids = torch.empty(R, k, dtype=torch.long, device=device)
    thr = _threshold(sparsemixer_eps, dtype) if sparsemixer else 0.0
    router_ED = _unit_last(router_ED)
    if R:
        epp = route_experts_per_program(E, router_ED.shape[1])
        # a program's router values spread over more warps than the row alone needs
        meta["num_warps"] = min(16, max(meta["num_warps"], epp * router_ED.shape[1] // 2048))
        per_row = cdiv(E, epp)
        _add_norm_route_kernel[(R, per_row)](
            *args, router_ED, logits, weights, ids, arrival_counters(device, R), E, router_ED.stride(0), thr,
            **meta, SPARSEMIXER=sparsemixer, K=k, E_PAD=max(next_power_of_2(E), 2), EPP=epp,
            **pdl_meta(device, R * per_row, R),
        )
    shape = x_RD.shape
    return x_out.view(shape), h.view(shape), (weights, ids, logits)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ---- small-row linear layers ---------------------------------------------------------------------


def _sms(x: torch.Tensor) -> int:
    # SMs of x's GPU (a nominal 4 on CPU, under the interpreter)
    return sm_count(x.device.index) if x.is_cuda else 4


@launcher
@triton.jit(do_not_specialize=["N1", "N2", "N3"])
def _linear_small_kernel(
    x_ptr, w1_ptr, w2_ptr, w3_ptr, b1_ptr, b2_ptr, b3_ptr, out_ptr,
    M, K, N1, N2, N3, stride_xm, stride_om, stride_w1, stride_w2, stride_w3,
    cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, T, sc_b, sc_t, s_cb, s_cg, s_cs,
    ids_ptr, stride_e3, C3,
    HAS_BIAS: tl.constexpr, ROUND: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    ROPE: tl.constexpr, HAS_Q: tl.constexpr, HALF: tl.constexpr, TO_CACHE: tl.constexpr,
    EXPERT3: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_start(PDL)
    # Program = one BLOCK_N slice of the outputs of one of up to three linear layers that read the
    # same rows (q, k and v, say); out holds them side by side. All M (<= BLOCK_M) rows in one tile,
    # so each weight is read once, and no split-K reduction kernel follows. BLOCK_M = 1: a plain
    # GEMV on the CUDA cores; else the matrix units on a 16-row tile.
    # ROPE (q, k, v of heads of 2 * HALF dims, or k, v without HAS_Q; rows are B x T tokens): q and
    # k leave rotated, as ops.rope's kernel rotates them. Their slices then hold BLOCK_N / 2 pairs
    # (column j of a head next to column j + HALF), so each program rotates its own columns.
    # TO_CACHE: k and v go into cache slot slots[t] of [B, G, S, 2 * HALF] caches, not into out.
    # EXPERT3 (one row): the third layer is an expert projection [E, C3, K] taken once per routed
    # expert, N3 = k * C3 outputs for the row's k experts ids[0..k) (JetMoE's MoA map next to its
    # kv projection: both read the same normed row, so one launch). C3 % BLOCK_N == 0: a slice
    # lies within one expert's outputs.
    pid = tl.program_id(0)
    t1 = tl.cdiv(N1, BLOCK_N)
    t2 = tl.cdiv(N2, BLOCK_N)
    if pid < t1:
        w_ptr, b_ptr, n_seg, col0, blk, stride_w = w1_ptr, b1_ptr, N1, 0 * N1, pid, stride_w1
    elif pid < t1 + t2:
        w_ptr, b_ptr, n_seg, col0, blk, stride_w = w2_ptr, b2_ptr, N2, N1, pid - t1, stride_w2
    else:
        w_ptr, b_ptr, n_seg, col0, blk, stride_w = w3_ptr, b3_ptr, N3, N1 + N2, pid - t1 - t2, stride_w3
        if EXPERT3:
            slot = blk * BLOCK_N // C3
            expert = tl.load(ids_ptr + slot).to(tl.int64)
            # row n of the segment is row n - slot * C3 of that expert's weight
            w_ptr = w3_ptr + expert * stride_e3 - (slot * C3).to(tl.int64) * stride_w3
    i = tl.arange(0, BLOCK_N)
    n = blk * BLOCK_N + i
    rotated_end = t1 + t2 if HAS_Q else t1  # programs below it rotate their slice
    if ROPE:
        if pid < rotated_end:
            pair = blk * (BLOCK_N // 2) + i // 2
            n = (pair // HALF) * (2 * HALF) + pair % HALF + (i % 2) * HALF
    n_ok = n < n_seg
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    kk = tl.arange(0, BLOCK_K)
    if BLOCK_M == 1:
        # one row: multiply-adds along contiguous K, summed across K once at the end
        w_ptrs = w_ptr + n.to(tl.int64)[:, None] * stride_w + kk[None, :]
        part = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
                x = tl.load(x_ptr + k0 + kk)
            else:
                k_ok = kk < K - k0
                w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                x = tl.load(x_ptr + k0 + kk, mask=k_ok, other=0.0)
            part += w.to(tl.float32) * x.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
        acc = tl.reshape(tl.sum(part, axis=1), (1, BLOCK_N))
    else:
        w_ptrs = w_ptr + n.to(tl.int64)[None, :] * stride_w + kk[:, None]
        x_ptrs = x_ptr + m.to(tl.int64)[:, None] * stride_xm + kk[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
                x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            else:
                k_ok = kk < K - k0
                w = tl.load(w_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
                x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter's dot wants float32
                w = w.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
    _pdl_release(PDL)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = _round(acc, ROUND)  # the layer's output as torch stores it
    if ROPE:
        if pid < rotated_end:
            # x * cos + rotate_half(x) * sin, each product and the sum rounded (ops.rope's kernel),
            # with the rows' cos / sin at this slice's pair indices. Loaded here, not before the main
            # loop: held through it they cost the registers of a sixth program per SM (q/k/v of
            # PhiMoE then ran in two waves, 18 us against 14.5 us in a graph chain).
            j = tl.split(tl.reshape(n % (2 * HALF), (BLOCK_N // 2, 2)))[0]
            c_off = (m // T).to(tl.int64)[:, None] * sc_b + (m % T).to(tl.int64)[:, None] * sc_t + j[None, :]
            c_at = cos_ptr + c_off
            s_at = sin_ptr + c_off
            c_ok = m_ok[:, None] & (j < HALF)[None, :]
            c1 = tl.load(c_at, mask=c_ok, other=0.0).to(tl.float32)
            c2 = tl.load(c_at + HALF, mask=c_ok, other=0.0).to(tl.float32)
            s1 = tl.load(s_at, mask=c_ok, other=0.0).to(tl.float32)
            s2 = tl.load(s_at + HALF, mask=c_ok, other=0.0).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(y, (BLOCK_M, BLOCK_N // 2, 2)))
            y1 = _round(_round(x1 * c1, ROUND) + _round(-x2 * s1, ROUND), ROUND)
            y2 = _round(_round(x2 * c2, ROUND) + _round(x1 * s2, ROUND), ROUND)
            y = tl.reshape(tl.join(y1, y2), (BLOCK_M, BLOCK_N))
    dst = out_ptr + m.to(tl.int64)[:, None] * stride_om + (col0 + n)[None, :]
    if TO_CACHE:
        cache_start = t1 if HAS_Q else 0  # the k programs, then the v programs
        if pid >= cache_start and (HAS_Q or pid < t1 + t2):  # not the EXPERT3 programs
            if pid < rotated_end:
                cache_ptr = k_cache_ptr
            else:
                cache_ptr = v_cache_ptr
            slot = tl.load(slots_ptr + m % T, mask=m_ok, other=0).to(tl.int64)
            dst = (cache_ptr + (m // T).to(tl.int64)[:, None] * s_cb + slot[:, None] * s_cs
                   + (n // (2 * HALF)).to(tl.int64)[None, :] * s_cg + (n % (2 * HALF))[None, :])
    tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# Column slices per SM that a one-row `linear_small` aims for at least (see linear_small_config).
ONE_ROW_SLICES_PER_SM = 5


def linear_small_config(n_total: int, k_dim: int, sm_count: int, rows: int) -> dict:
    """Block sizes for `linear_small`: enough column slices to give every SM a few of them.

    One row takes the CUDA-core GEMV, with slices as narrow as 4 columns: at least
    ONE_ROW_SLICES_PER_SM (5) per SM, each step a 4096-element weight tile, one warp per 2 columns.
    Timed inside CUDA graphs of many layers as decode runs them (bench/decode_chain.py on the H200):
    the 4096 x 4096 projections take 10.4 us this way against 11.4 us with 8-column slices (the
    floor is 7.9 us)."""
    if rows == 1:
        block_n = 32
        while block_n > 4 and cdiv(n_total, block_n) < ONE_ROW_SLICES_PER_SM * sm_count:
            block_n //= 2
        block_k = min(4096 // block_n, max(16, next_power_of_2(k_dim)))
        return dict(BLOCK_M=1, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=max(1, block_n // 2), num_stages=4)
    block_n = 64
    while block_n > 16 and cdiv(n_total, block_n) < 3 * sm_count:
        block_n //= 2
    block_k = min(256, max(16, next_power_of_2(k_dim)))
    return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=4)


def linear_small(x_MK: torch.Tensor, weights, biases, config: dict | None = None, rope=None,
                 experts=None) -> torch.Tensor:
    """[x W1^T + b1, x W2^T + b2, ...] side by side in one [M, N1 + N2 + ...] tensor, for up to
    three weights [Ni, K] with the same K and M <= 16 rows. Sums in float32, bias added, rounded once
    (what torch's Linear computes, up to the order of the sums).

    `rope` (weights q, k, v, or k, v): (cos [B or 1, T, d], sin, T, k_cache, v_cache, slots) with
    the M = B*T rows in (b, t) order. q and k leave rotated (`rope_qk`), and with caches [B, G, S, d]
    given, k and v are written into slots[t] of them instead of `out` (`rope_qk_cache`). The caller
    checks `linear_rope_fits` first.

    `experts` = (w [E, C, K], ids [k]) for one row and at most two weights without biases: a last
    layer taken once per expert ids[j], its k * C outputs (expert j's at columns j * C) after the
    others' (`EXPERT3` in the kernel; C a multiple of the slice width: `linear_experts_fit`)."""
    M, K = x_MK.shape
    if not 1 <= len(weights) <= 3 or M > 16:
        raise ValueError(f"linear_small takes 1 to 3 weights and at most 16 rows, got {len(weights)} and {M}")
    x_MK = _unit_last(x_MK)
    weights = [_unit_last(w) for w in weights]
    ns = [w.shape[0] for w in weights]
    has_bias = biases[0] is not None
    expert_args = (x_MK, 0, 1)
    if experts is not None:
        problem = _experts_problem(x_MK, weights, has_bias, *experts)
        if problem:
            raise ValueError(f"linear_small: {problem}")
        w_EOK, ids = _unit_last(experts[0]), experts[1].reshape(-1)
        expert_args = (ids, w_EOK.stride(0), w_EOK.shape[1])
        if len(weights) == 1:  # an empty second layer: the experts are always the third
            weights, ns = [*weights, weights[0][:0]], [*ns, 0]
        weights, ns = [*weights, w_EOK[0]], [*ns, ids.numel() * w_EOK.shape[1]]
    out = torch.empty(M, sum(ns), dtype=x_MK.dtype, device=x_MK.device)
    pad = 3 - len(weights)
    ws = weights + [weights[0]] * pad
    bs = (list(biases) if has_bias else [x_MK] * len(weights)) + [x_MK] * pad
    ns_p = ns + [0] * pad
    cfg = config or linear_small_config(sum(ns), K, _sms(x_MK), M)
    block_m = 1 if M == 1 and cfg.get("BLOCK_M", 1) == 1 else 16  # the one-row GEMV serves one row only
    block_n = cfg["BLOCK_N"]
    if rope is None:
        rope_args, half, to_cache = (x_MK, x_MK, x_MK, x_MK, x_MK, 1, 0, 0, 0, 0, 0), 1, False
    else:
        cos, sin, T, k_cache, v_cache, slots = rope
        half = cos.shape[-1] // 2
        block_n = _rope_block_n(block_n, block_m, half)
        if len(weights) < 2 or block_n is None or M % T or cos.stride(-1) != 1 or cos.stride() != sin.stride():
            raise ValueError("linear_small: rope needs q, k and v (or k and v) weights, rows in (b, t) order "
                             "and unit-stride cos/sin; check linear_rope_fits first")
        to_cache = k_cache is not None
        if not to_cache:
            k_cache = v_cache = slots = x_MK
        elif k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
            raise ValueError("linear_small: the key and value caches need the same strides, unit in the last dim")
        cb = cos.stride(0) if cos.shape[0] > 1 else 0
        cache_strides = k_cache.stride()[:3] if to_cache else (0, 0, 0)
        rope_args = (cos, sin, k_cache, v_cache, slots, T, cb, cos.stride(1), *cache_strides)
    if experts is not None and expert_args[2] % block_n:
        raise ValueError(f"linear_small: an expert's {expert_args[2]} outputs are not a multiple of the "
                         f"{block_n}-column slices (check linear_experts_fit first)")
    grid = (sum(cdiv(n, block_n) for n in ns),)
    if M:
        _linear_small_kernel[grid](
            x_MK, *ws, *bs, out, M, K, *ns_p, x_MK.stride(0), out.stride(0), *(w.stride(0) for w in ws),
            *rope_args, *expert_args,
            HAS_BIAS=has_bias, ROUND=round_code(x_MK.dtype), UPCAST=_interpreting(),
            PRECISION="ieee" if x_MK.dtype == torch.float32 else "tf32",
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=cfg["BLOCK_K"], EVEN_K=K % cfg["BLOCK_K"] == 0,
            ROPE=rope is not None, HAS_Q=len(weights) == 3 and experts is None, HALF=half, TO_CACHE=to_cache,
            EXPERT3=experts is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            **pdl_meta(x_MK.device),
        )
    return out


def _rope_block_n(block_n: int, block_m: int, half: int) -> int | None:
    # a slice of rotated columns holds whole pairs of one head: block_n / 2 must divide half
    # (the matrix-unit tile needs 16 columns at least)
    while block_n >= 4 and half % (block_n // 2):
        block_n //= 2
    return block_n if block_n >= (4 if block_m == 1 else 16) and half % (block_n // 2) == 0 else None


def _rope_slice_width(x_MK: torch.Tensor, n_total: int, head_dim: int) -> int | None:
    # the column slice `linear_small(..., rope=...)` takes for n_total outputs (its default config)
    M, K = x_MK.shape
    return _rope_block_n(linear_small_config(n_total, K, _sms(x_MK), M)["BLOCK_N"], 1 if M == 1 else 16, head_dim // 2)


def linear_rope_fits(x_MK: torch.Tensor, ns, head_dim: int) -> bool:
    """Whether `linear_small(..., rope=...)` serves q/k/v (or k/v) of these output widths and head size."""
    if head_dim % 2 or any(n % head_dim for n in ns[:-1]):
        return False
    return _rope_slice_width(x_MK, sum(ns), head_dim) is not None


def _experts_problem(x_MK, weights, has_bias: bool, w_EOK, ids) -> str | None:
    # what keeps `linear_small(..., experts=(w_EOK, ids))` from serving, or None
    M, K = x_MK.shape
    if (M != 1 or len(weights) > 2 or has_bias or w_EOK.dim() != 3 or w_EOK.shape[2] != K
            or w_EOK.dtype != weights[0].dtype or ids.is_floating_point() or ids.device != w_EOK.device
            or ids.numel() < 1):
        return (f"experts take one row, at most two other weights, no biases, a [E, C, {K}] weight of their "
                f"dtype and integer ids on its device; got {M} rows, {len(weights)} weights, experts "
                f"{tuple(w_EOK.shape)} {w_EOK.dtype}, ids {tuple(ids.shape)} {ids.dtype}")
    return None


def linear_experts_fit(x_MK: torch.Tensor, weights, biases, head_dim: int, w_EOK, ids) -> bool:
    """Whether `linear_small(..., rope=..., experts=(w_EOK, ids))` serves the k and v `weights` with
    these experts: what it takes (one row, ...), and each expert's C outputs whole heads and a whole
    number of the kernel's column slices."""
    if _experts_problem(x_MK, weights, biases[0] is not None, w_EOK, ids) or head_dim % 2:
        return False
    C = w_EOK.shape[1]
    width = _rope_slice_width(x_MK, sum(w.shape[0] for w in weights) + ids.numel() * C, head_dim)
    return width is not None and C % head_dim == 0 and C % width == 0


# ---- rotary embedding ----------------------------------------------------------------------------


@launcher
@triton.jit
def _rope_tables_kernel(
    pos_ptr, inv_freq_ptr, cos_ptr, sin_ptr, mscale, R, T, sp_b, sp_t,
    long_ptr, inv_long_ptr, mscale_long, sl_b, sl_t,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_R: tl.constexpr, ROUND: tl.constexpr,
    LIBDEVICE: tl.constexpr, PER_POSITION: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_start(PDL)
    # RotaryEmbedding.forward's nine torch ops (float, * inv_freq, cat, cos, * mscale, to, sin, ...)
    # in one launch. Rows of BLOCK_R positions; both halves of a row get the same HALF values (the
    # cat). The same float32 steps as torch: the position rounded to float32, one multiply, cos / sin
    # of the CUDA math library (LIBDEVICE; tl.cos may compile to the approximate instruction, and the
    # interpreter has no libdevice), the multiply by mscale, then one rounding to the output dtype.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    i = tl.arange(0, HALF_PAD)
    r_ok = rows < R
    pos = tl.load(pos_ptr + (rows // T).to(tl.int64) * sp_b + (rows % T).to(tl.int64) * sp_t, mask=r_ok, other=0)
    inv = tl.load(inv_freq_ptr + i, mask=i < HALF, other=0.0)[None, :]
    scale = mscale
    if PER_POSITION:  # LongRoPE's factor set per position: the long table and mscale where its flag is set
        flag = tl.load(long_ptr + (rows // T).to(tl.int64) * sl_b + (rows % T).to(tl.int64) * sl_t, mask=r_ok, other=0)
        is_long = (flag != 0)[:, None]
        inv = tl.where(is_long, tl.load(inv_long_ptr + i, mask=i < HALF, other=0.0)[None, :], inv)
        scale = tl.where(is_long, mscale_long, mscale)
    freqs = pos.to(tl.float32)[:, None] * inv
    if LIBDEVICE:
        c = libdevice.cos(freqs)
        s = libdevice.sin(freqs)
    else:
        c = tl.cos(freqs)
        s = tl.sin(freqs)
    c = _round(c * scale, ROUND).to(cos_ptr.dtype.element_ty)
    s = _round(s * scale, ROUND).to(sin_ptr.dtype.element_ty)
    ok = r_ok[:, None] & (i < HALF)[None, :]
    out = rows.to(tl.int64)[:, None] * (2 * HALF) + i[None, :]
    tl.store(cos_ptr + out, c, mask=ok)
    tl.store(cos_ptr + out + HALF, c, mask=ok)
    tl.store(sin_ptr + out, s, mask=ok)
    tl.store(sin_ptr + out + HALF, s, mask=ok)


def rope_tables(position_ids_BT: torch.Tensor, inv_freq: torch.Tensor, mscale: float, dtype: torch.dtype,
                long: tuple[torch.Tensor, torch.Tensor, float] | None = None):
    """(cos, sin) [*position_ids.shape, 2 * len(inv_freq)] in `dtype`, contiguous: what
    `RotaryEmbedding.forward` computes in torch (cos(pos * inv_freq) * mscale, each half of the head
    dim the same), bit for bit on the GPU, in one launch. `inv_freq` float32. `long`: (flags of
    `position_ids`' shape, the long table, its mscale): positions whose flag is nonzero take those."""
    tables = [inv_freq] if long is None else [inv_freq, long[1]]
    if any(t.dtype != torch.float32 or t.shape != inv_freq.shape or t.dim() != 1 for t in tables):
        raise TypeError("rope_tables: inv_freq (and the long table) must be float32 vectors of one length, got "
                        f"{[(t.dtype, tuple(t.shape)) for t in tables]}")
    if long is not None and long[0].shape != position_ids_BT.shape:
        raise ValueError(f"rope_tables: the long flags' shape {tuple(long[0].shape)} is not the positions' "
                         f"{tuple(position_ids_BT.shape)}")
    half = inv_freq.shape[0]
    shape = (*position_ids_BT.shape, 2 * half)
    cos = torch.empty(shape, dtype=dtype, device=inv_freq.device)
    sin = torch.empty(shape, dtype=dtype, device=inv_freq.device)
    R = position_ids_BT.numel()
    if R:
        pos = position_ids_BT.reshape(-1, position_ids_BT.shape[-1])  # [B, T] (a view where the strides allow)
        flags = pos if long is None else long[0].reshape(pos.shape)
        if flags.dtype == torch.bool:
            flags = flags.view(torch.uint8)
        half_pad = next_power_of_2(half)
        block_r = min(next_power_of_2(R), max(1, 2048 // half_pad))
        programs = cdiv(R, block_r)
        _rope_tables_kernel[(programs,)](
            pos, inv_freq, cos, sin, mscale, R, pos.shape[1], pos.stride(0), pos.stride(1),
            flags, tables[-1], mscale if long is None else long[2], flags.stride(0), flags.stride(1),
            HALF=half, HALF_PAD=half_pad, BLOCK_R=block_r, ROUND=round_code(dtype), LIBDEVICE=not _interpreting(),
            PER_POSITION=long is not None,
            num_warps=4 if block_r * half_pad >= 1024 else 1, **pdl_meta(inv_freq.device, programs, R),
        )
    return cos, sin


@triton.jit
def _grouped_position(h, G: tl.constexpr, H: tl.constexpr):
    # Where tiled head h (it reads kv head h % G) sits in the grouped order that sdpa reads: kv head
    # g's H/G query heads at positions g*(H/G) .. g*(H/G) + H/G - 1 (ops.attention._to_grouped).
    return (h % G) * (H // G) + h // G


@triton.jit
def _rope_rows(x_ptr, o_ptr, b, t, c1, c2, s1, s2, sx_b, sx_t, sx_h, so_b, so_t, so_h,
               NH: tl.constexpr, NH_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
               ROUND: tl.constexpr, GROUPS: tl.constexpr = 1):
    # GROUPS > 1: head h leaves at its grouped position (`_grouped_position`)
    h = tl.arange(0, NH_PAD)
    i = tl.arange(0, HALF_PAD)
    ok = (h < NH)[:, None] & (i < HALF)[None, :]
    base = x_ptr + b * sx_b + t * sx_t + h[:, None] * sx_h + i[None, :]
    x1 = tl.load(base, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=ok, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1); each product and the sum rounded
    y1 = _round(_round(x1 * c1[None, :], ROUND) + _round(-x2 * s1[None, :], ROUND), ROUND)
    y2 = _round(_round(x2 * c2[None, :], ROUND) + _round(x1 * s2[None, :], ROUND), ROUND)
    if GROUPS > 1:
        h = _grouped_position(h, GROUPS, NH)
    out = o_ptr + b * so_b + t * so_t + h[:, None] * so_h + i[None, :]
    tl.store(out, y1.to(o_ptr.dtype.element_ty), mask=ok)
    tl.store(out + HALF, y2.to(o_ptr.dtype.element_ty), mask=ok)


@launcher
@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, v_ptr, qo_ptr, ko_ptr, vc_ptr, cos_ptr, sin_ptr, pos_ptr, T,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sqo_b, sqo_t, sqo_h, sko_b, sko_t, sko_h,
    svc_b, svc_s, svc_h, sc_b, sc_t,
    HQ: tl.constexpr, HQ_PAD: tl.constexpr, HK: tl.constexpr, HK_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, ROUND: tl.constexpr, TO_CACHE: tl.constexpr,
    FIRST: tl.constexpr, Q_GROUPS: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_start(PDL)
    # Program (token, part): part 0 rotates the token's query heads (Q_GROUPS > 1: written in the
    # grouped order, see `_rope_rows`), part 1 its key heads; FIRST = 1 when there are no queries
    # (one part, the keys). TO_CACHE: the keys go straight into cache slot pos[t] (ko_ptr is the
    # key cache; sko_t unused), and the values are copied into the value cache's slot.
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    i = tl.arange(0, HALF_PAD)
    c_ok = i < HALF
    c_base = b * sc_b + t * sc_t
    c1 = tl.load(cos_ptr + c_base + i, mask=c_ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + c_base + HALF + i, mask=c_ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + c_base + i, mask=c_ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + c_base + HALF + i, mask=c_ok, other=0.0).to(tl.float32)
    if tl.program_id(1) + FIRST == 0:
        _rope_rows(q_ptr, qo_ptr, b, t, c1, c2, s1, s2, sq_b, sq_t, sq_h, sqo_b, sqo_t, sqo_h,
                   HQ, HQ_PAD, HALF, HALF_PAD, ROUND, Q_GROUPS)
    elif TO_CACHE:
        slot = tl.load(pos_ptr + t).to(tl.int64)
        # the cache row of slot `slot` is addressed as token 0 of a cache offset by that slot
        _rope_rows(k_ptr, ko_ptr + slot * sko_t, b, t, c1, c2, s1, s2, sk_b, sk_t, sk_h, sko_b, 0, sko_h,
                   HK, HK_PAD, HALF, HALF_PAD, ROUND)
        h = tl.arange(0, HK_PAD)[:, None]
        dd = tl.arange(0, 2 * HALF_PAD)[None, :]
        ok = (h < HK) & (dd < 2 * HALF)
        val = tl.load(v_ptr + b * sv_b + t * sv_t + h * sv_h + dd, mask=ok)
        tl.store(vc_ptr + b * svc_b + slot * svc_s + h * svc_h + dd, val.to(vc_ptr.dtype.element_ty), mask=ok)
    else:
        _rope_rows(k_ptr, ko_ptr, b, t, c1, c2, s1, s2, sk_b, sk_t, sk_h, sko_b, sko_t, sko_h,
                   HK, HK_PAD, HALF, HALF_PAD, ROUND)


def _rope_launch(q_BHTd, k_BGTd, cos_BTd, sin_BTd, k_out, v=None, v_cache=None, cache_position_T=None,
                 q_groups: int = 1):
    # rotated queries [B, H, T, d] in [B, T, H, d] memory (what the torch expression yields for a
    # transposed input; q_groups > 1: in the grouped head order); keys into k_out [B, G, T, d], or
    # with v_cache into cache slots. q or k may be None: only the other is rotated (q None: None).
    x = q_BHTd if q_BHTd is not None else k_BGTd
    B, _, T, d = x.shape
    heads = max(t.shape[1] for t in (q_BHTd, k_BGTd) if t is not None)
    q_BHTd = _unit_last(q_BHTd) if q_BHTd is not None else None
    k_BGTd = _unit_last(k_BGTd) if k_BGTd is not None else None
    if cos_BTd.stride() != sin_BTd.stride() or cos_BTd.stride(-1) != 1:
        cos_BTd, sin_BTd = cos_BTd.contiguous(), sin_BTd.contiguous()
    q_out = None
    if q_BHTd is not None:
        H = q_BHTd.shape[1]
        if q_groups < 1 or H % q_groups:
            raise ValueError(f"rope: q_groups must divide the {H} query heads, got {q_groups}")
        q_out = torch.empty(B, T, H, d, dtype=x.dtype, device=x.device).transpose(1, 2)
    to_cache = v_cache is not None
    if to_cache:
        v = _unit_last(v)
        if k_out.stride(-1) != 1 or v_cache.stride(-1) != 1:
            raise ValueError("rope_qk_cache writes caches whose last dim is contiguous")
    q, qo = (q_BHTd, q_out) if q_BHTd is not None else (k_BGTd, k_out)  # (the latter unused)
    k, ko = (k_BGTd, k_out) if k_BGTd is not None else (q_BHTd, q_out)  # (the latter unused)
    if not to_cache:
        v, v_cache, cache_position_T = k, ko, k  # unused
    cb, ct = (cos_BTd.stride(0) if cos_BTd.shape[0] > 1 else 0), cos_BTd.stride(1)
    half = d // 2
    parts = (q_BHTd is not None) + (k_BGTd is not None)
    if B * T:
        # each tensor's (batch, token, head) strides; a tensor is [B, heads, T, d]
        sq, sk, sv, sqo, sko, svc = ((s[0], s[2], s[1]) for s in (t.stride() for t in (q, k, v, qo, ko, v_cache)))
        _rope_kernel[(B * T, parts)](
            q, k, v, qo, ko, v_cache, cos_BTd, sin_BTd, cache_position_T, T,
            *sq, *sk, *sv, *sqo, *sko, *svc,
            cb, ct,
            HQ=q.shape[1], HQ_PAD=next_power_of_2(q.shape[1]), HK=k.shape[1],
            HK_PAD=next_power_of_2(k.shape[1]), HALF=half, HALF_PAD=next_power_of_2(half),
            ROUND=round_code(x.dtype), TO_CACHE=to_cache, FIRST=int(q_BHTd is None), Q_GROUPS=q_groups,
            num_warps=4 if heads * d >= 2048 else 1, **pdl_meta(x.device, parts * B * T, B * T),
        )
    return q_out


def rope_qk(q_BHTd, k_BGTd, cos_BTd, sin_BTd, q_groups: int = 1):
    """(apply_rotary(q), apply_rotary(k)) in one launch, each [B, heads, T, d] in [B, T, heads, d]
    memory. Either may be None (not rotated; None returned). `q_groups` = G > 1: the query heads
    leave in the grouped order of `ops.attention` (head h at position (h % G) * (H/G) + h // G)."""
    if q_BHTd is None and k_BGTd is None:
        raise ValueError("rope_qk: queries and keys are both None: nothing to rotate")
    k_out = None
    if k_BGTd is not None:
        B, G, T, d = k_BGTd.shape
        k_out = torch.empty(B, T, G, d, dtype=k_BGTd.dtype, device=k_BGTd.device).transpose(1, 2)
    return _rope_launch(q_BHTd, k_BGTd, cos_BTd, sin_BTd, k_out, q_groups=q_groups), k_out


def rope_qk_cache(q_BHTd, k_BGTd, v_BGTd, cos_BTd, sin_BTd, k_cache_BGSd, v_cache_BGSd, cache_position_T):
    """`rope_qk`, then `kv_write` of the rotated keys and the values, in one launch: returns the
    rotated queries (in `rope_qk`'s layout; None for q None); the keys are rotated straight into
    the cache."""
    return _rope_launch(q_BHTd, k_BGTd, cos_BTd, sin_BTd, k_cache_BGSd, v_BGTd, v_cache_BGSd, cache_position_T)


@launcher
@triton.jit
def _tiled_heads_kernel(x_ptr, out_ptr, T, sx_b, sx_t, sx_h, G: tl.constexpr, R: tl.constexpr, H_PAD: tl.constexpr,
                        HEAD_D: tl.constexpr, D_PAD: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    # Program (b*T + t): out[b, t, h] = x[b, t, grouped position of h], out contiguous.
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    h = tl.arange(0, H_PAD)
    dd = tl.arange(0, D_PAD)
    ok = (h < G * R)[:, None] & (dd < HEAD_D)[None, :]
    src = _grouped_position(h, G, G * R)
    val = tl.load(x_ptr + b * sx_b + t * sx_t + src[:, None] * sx_h + dd[None, :], mask=ok)
    tl.store(out_ptr + pid.to(tl.int64) * (G * R * HEAD_D) + h[:, None] * HEAD_D + dd[None, :], val, mask=ok)


def tiled_heads(x_BTHd: torch.Tensor, groups: int) -> torch.Tensor:
    """Query heads in the grouped order of `ops.attention` (kv head g's at positions g*R .. g*R+R-1)
    back to the tiled order (head h reads kv head h % G), as a contiguous [B, T, H, d]."""
    B, T, H, d = x_BTHd.shape
    if H % groups:
        raise ValueError(f"tiled_heads: {groups} groups do not divide {H} heads")
    x_BTHd = _unit_last(x_BTHd)
    out = torch.empty(B, T, H, d, dtype=x_BTHd.dtype, device=x_BTHd.device)
    if B * T:
        _tiled_heads_kernel[(B * T,)](
            x_BTHd, out, T, *x_BTHd.stride()[:3], G=groups, R=H // groups, H_PAD=next_power_of_2(H),
            HEAD_D=d, D_PAD=next_power_of_2(d), num_warps=4 if H * d >= 2048 else 1,
            **pdl_meta(x_BTHd.device, B * T, B * T),
        )
    return out


# ---- packed keys and values (continuous batching's prefill) ----------------------------------------


@triton.jit
def _key_block(rows_ptr, slots_ptr, K, HEAD_D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    # A program's keys (block program_id(0)), its kv head g (program_id(1)), the head's columns,
    # the masks, and each key's (row, slot) in the store.
    keys = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    g = tl.program_id(1).to(tl.int64)
    dd = tl.arange(0, D_PAD)
    ok = keys < K
    okd = ok[:, None] & (dd < HEAD_D)[None, :]
    row = tl.load(rows_ptr + keys, mask=ok, other=0).to(tl.int64)
    slot = tl.load(slots_ptr + keys, mask=ok, other=0).to(tl.int64)
    return keys, g, dd, ok, okd, row, slot


@launcher
@triton.jit
def _pack_keys_kernel(new_ptr, store_ptr, out_ptr, take_ptr, rows_ptr, slots_ptr, K,
                      sn_k, sn_g, ss_b, ss_g, ss_s, G: tl.constexpr, HEAD_D: tl.constexpr, D_PAD: tl.constexpr,
                      BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    # Program (block of keys, kv head g): out[k, g] = new[take[k], g] where take[k] >= 0, else
    # store[rows[k], g, slots[k]]; out contiguous [K, G, d].
    keys, g, dd, ok, okd, row, slot = _key_block(rows_ptr, slots_ptr, K, HEAD_D, D_PAD, BLOCK_K)
    take = tl.load(take_ptr + keys, mask=ok, other=0).to(tl.int64)
    fresh = take >= 0
    a = tl.load(new_ptr + (take * sn_k + g * sn_g)[:, None] + dd[None, :], mask=okd & fresh[:, None], other=0.0)
    b = tl.load(store_ptr + (row * ss_b + g * ss_g + slot * ss_s)[:, None] + dd[None, :], mask=okd & ~fresh[:, None],
                other=0.0)
    out = out_ptr + ((keys.to(tl.int64) * G + g) * HEAD_D)[:, None] + dd[None, :]
    tl.store(out, tl.where(fresh[:, None], a, b), mask=okd)


@launcher
@triton.jit
def _place_keys_kernel(src_ptr, store_ptr, rows_ptr, slots_ptr, K, sx_k, sx_g, ss_b, ss_g, ss_s,
                       HEAD_D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    # Program (block of keys, kv head g): store[rows[k], g, slots[k]] = src[k, g], where rows[k] >= 0.
    keys, g, dd, ok, okd, row, slot = _key_block(rows_ptr, slots_ptr, K, HEAD_D, D_PAD, BLOCK_K)
    okd = okd & (row >= 0)[:, None]
    val = tl.load(src_ptr + (keys.to(tl.int64) * sx_k + g * sx_g)[:, None] + dd[None, :], mask=okd)
    tl.store(store_ptr + (row * ss_b + g * ss_g + slot * ss_s)[:, None] + dd[None, :], val, mask=okd)


def _key_blocks(K: int, d: int) -> int:
    # keys a program copies: about 16 KB of one head's rows
    return max(1, min(next_power_of_2(max(K, 1)), (8192 // max(d, 1)) or 1))


def pack_keys(new_KGd: torch.Tensor, store_BGSd: torch.Tensor, take_K: torch.Tensor, rows_K: torch.Tensor,
              slots_K: torch.Tensor) -> torch.Tensor:
    """[K, G, d] contiguous: row k is `new[take[k]]` where take[k] >= 0, else `store[rows[k], :,
    slots[k]]` (a cached key read where it lies). Index tensors [K], any integer dtype."""
    K, (_, G, _, d) = take_K.shape[0], store_BGSd.shape
    new_KGd, store_BGSd = _unit_last(new_KGd), _unit_last(store_BGSd)
    out = torch.empty(K, G, d, dtype=store_BGSd.dtype, device=store_BGSd.device)
    if K:
        block = _key_blocks(K, d)
        _pack_keys_kernel[(cdiv(K, block), G)](
            new_KGd, store_BGSd, out, take_K, rows_K, slots_K, K, new_KGd.stride(0), new_KGd.stride(1),
            *store_BGSd.stride()[:3], G=G, HEAD_D=d, D_PAD=next_power_of_2(d), BLOCK_K=block,
            num_warps=4, **pdl_meta(store_BGSd.device),
        )
    return out


def place_keys(src_KGd: torch.Tensor, store_BGSd: torch.Tensor, rows_K: torch.Tensor, slots_K: torch.Tensor) -> None:
    """`store[rows[k], :, slots[k]] = src[k]` for every k with rows[k] >= 0 (the (row, slot) pairs
    distinct; a key of row -1 goes nowhere), in place."""
    K, G, d = src_KGd.shape
    if store_BGSd.stride(-1) != 1:
        raise ValueError("place_keys: the store's last dimension must be contiguous")
    src_KGd = _unit_last(src_KGd)
    if K:
        block = _key_blocks(K, d)
        _place_keys_kernel[(cdiv(K, block), G)](
            src_KGd, store_BGSd, rows_K, slots_K, K, src_KGd.stride(0), src_KGd.stride(1), *store_BGSd.stride()[:3],
            HEAD_D=d, D_PAD=next_power_of_2(d), BLOCK_K=block, num_warps=4, **pdl_meta(store_BGSd.device),
        )


# ---- attention mask ------------------------------------------------------------------------------


@launcher
@triton.jit
def _causal_mask_kernel(
    pos_ptr, am_ptr, out_ptr, T, S, L, window, sp_t, sa_b, sa_s,
    HAS_WINDOW: tl.constexpr, HAS_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_start(PDL)
    # ops.attention.build_mask's torch ops (arange, <=, the window's compare, expand, bool, pad, &)
    # in one launch. Program (b*T + t, block of key slots): slot j is visible to the query at
    # cache position q = pos[t] when j <= q, j > q - window, and the 2D mask is nonzero at (b, j);
    # slots past its L columns count as attended, as torch pads them with True.
    row = tl.program_id(0)
    b = (row // T).to(tl.int64)
    t = row % T
    j = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    in_s = j < S
    q = tl.load(pos_ptr + t.to(tl.int64) * sp_t).to(tl.int64)
    vis = j <= q
    if HAS_WINDOW:
        vis = vis & (j > q - window)
    if HAS_PAD:
        pad = tl.load(am_ptr + b * sa_b + j.to(tl.int64) * sa_s, mask=in_s & (j < L), other=1)
        vis = vis & (pad != 0)
    tl.store(out_ptr + row.to(tl.int64) * S + j, vis.to(tl.uint8), mask=in_s)


def causal_mask(attention_mask_BL: torch.Tensor | None, cache_position_T: torch.Tensor, kv_len: int,
                sliding_window: int | None, batch: int) -> torch.Tensor:
    """`build_mask`'s general case in one launch: bool [B, 1, T, kv_len], key slot j visible to query
    t when j <= pos[t], pos[t] - j < sliding_window, and the 2D `attention_mask_BL` (any dtype,
    shorter than kv_len: the rest visible) is nonzero at j. B is `batch` broadcast with the mask's
    rows; contiguous, or with no 2D mask one [1, 1, T, kv_len] expanded to `batch`, as torch gives."""
    T = cache_position_T.shape[0]
    device = cache_position_T.device
    if attention_mask_BL is not None:
        B = torch.broadcast_shapes((batch,), (attention_mask_BL.shape[0],))[0]
        am = attention_mask_BL.view(torch.uint8) if attention_mask_BL.dtype == torch.bool else attention_mask_BL
        L, sa_b, sa_s = am.shape[1], (am.stride(0) if am.shape[0] > 1 else 0), am.stride(1)
    else:
        B, am, L, sa_b, sa_s = 1, cache_position_T, 0, 0, 0
    out = torch.empty(B, 1, T, kv_len, dtype=torch.bool, device=device)
    block_s = min(4096, next_power_of_2(max(kv_len, 1)))
    grid = (B * T, cdiv(kv_len, block_s))
    if B * T * kv_len:
        _causal_mask_kernel[grid](
            cache_position_T, am, out.view(torch.uint8), T, kv_len, L,
            sliding_window if sliding_window is not None else 0, cache_position_T.stride(0), sa_b, sa_s,
            HAS_WINDOW=sliding_window is not None, HAS_PAD=attention_mask_BL is not None, BLOCK_S=block_s,
            num_warps=4 if block_s >= 2048 else 1, **pdl_meta(device, grid[0] * grid[1], B * T),
        )
    return out if attention_mask_BL is not None else out.expand(batch, 1, T, kv_len)


# ---- KV cache write ------------------------------------------------------------------------------


@launcher
@triton.jit
def _kv_write_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, T,
    sk_b, sk_g, sk_t, sv_b, sv_g, sv_t, sc_b, sc_g, sc_s, svc_b, svc_g, svc_s,
    G: tl.constexpr, G_PAD: tl.constexpr, HEAD_D: tl.constexpr, D_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_start(PDL)
    # Program (b, t): token t's G key and value heads into cache slot pos[t].
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = pid % T
    slot = tl.load(pos_ptr + t).to(tl.int64)
    g = tl.arange(0, G_PAD)[:, None].to(tl.int64)
    dd = tl.arange(0, D_PAD)[None, :]
    ok = (g < G) & (dd < HEAD_D)
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + b * sk_b + g * sk_g + t64 * sk_t + dd, mask=ok)
    v = tl.load(v_ptr + b * sv_b + g * sv_g + t64 * sv_t + dd, mask=ok)
    tl.store(kc_ptr + b * sc_b + g * sc_g + slot * sc_s + dd, k.to(kc_ptr.dtype.element_ty), mask=ok)
    tl.store(vc_ptr + b * svc_b + g * svc_g + slot * svc_s + dd, v.to(vc_ptr.dtype.element_ty), mask=ok)


def kv_write(k_BGTd, v_BGTd, k_cache_BGSd, v_cache_BGSd, cache_position_T) -> None:
    """k_cache[:, :, pos[t]] = k[:, :, t] (and v): both index_copy_ calls of a static cache in one launch."""
    B, G, T, d = k_BGTd.shape
    k_BGTd, v_BGTd = _unit_last(k_BGTd), _unit_last(v_BGTd)
    if B * T:
        _kv_write_kernel[(B * T,)](
            k_BGTd, v_BGTd, k_cache_BGSd, v_cache_BGSd, cache_position_T, T,
            *k_BGTd.stride()[:3], *v_BGTd.stride()[:3], *k_cache_BGSd.stride()[:3], *v_cache_BGSd.stride()[:3],
            G=G, G_PAD=next_power_of_2(G), HEAD_D=d, D_PAD=next_power_of_2(d),
            num_warps=1 if G * d <= 1024 else 4, **pdl_meta(k_BGTd.device, B * T, B * T),
        )


# ---- decode attention ----------------------------------------------------------------------------


@launcher
@triton.jit
def _decode_attn_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, cos_ptr, sin_ptr, rows_ptr,
    S, chunk, num_splits, scale,
    sq_b, sq_h, sk_b, sk_g, sk_s, sv_b, sv_g, sv_s, sm_b, sm_s, so_b, so_h, sc_b, sr_b,
    G: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, TILED: tl.constexpr, HAS_MASK: tl.constexpr,
    SPLIT: tl.constexpr, HEAD_D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_BLOCKS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, ROPE_Q: tl.constexpr,
    ROUND: tl.constexpr, ONE_BLOCK: tl.constexpr, ROWS: tl.constexpr, INTERLEAVE: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_start(PDL)
    # Program (b*G + g, split): the R query heads that read kv head g, over `chunk` blocks of
    # BLOCK_N keys at most: split, split + num_splits, split + 2 * num_splits, ... (INTERLEAVE,
    # so that a row's visible keys spread over every split wherever they lie in S), else
    # [split * chunk, (split + 1) * chunk).
    # One pass of online softmax; K/V are read once per kv head, never repeated per query head.
    # ROWS: key slot n of row b lies in row rows[b, n] of K and V (a beam-search cache's slot_rows).
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // G).to(tl.int64)
    g = pid % G
    r = tl.arange(0, R_PAD)
    if TILED:
        heads = r * G + g  # JetMoE's MoA: head h reads kv head h % G
    else:
        heads = g * R + r  # GQA: head h reads kv head h // R
    r_ok = r < R
    dd = tl.arange(0, D_PAD)
    d_ok = dd < HEAD_D
    q_rows = q_ptr + b * sq_b + heads[:, None] * sq_h
    q = tl.load(q_rows + dd[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if ROPE_Q:
        # the queries arrive unrotated: x * cos + rotate_half(x) * sin, each product and the sum
        # rounded as ops.rope's kernel rounds them (rotate_half pairs dim j with j +- d/2)
        HALF: tl.constexpr = HEAD_D // 2
        partner = tl.load(q_rows + ((dd + HALF) % HEAD_D)[None, :], mask=r_ok[:, None] & d_ok[None, :],
                          other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + b * sc_b + dd, mask=d_ok, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + b * sc_b + dd, mask=d_ok, other=0.0).to(tl.float32)
        sign = tl.where(dd < HALF, -1.0, 1.0)
        q = _round(_round(q.to(tl.float32) * c[None, :], ROUND) + _round(sign[None, :] * partner * sn[None, :], ROUND),
                   ROUND).to(q_ptr.dtype.element_ty)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full((R_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((R_PAD,), dtype=tl.float32)
    acc = tl.zeros((R_PAD, D_PAD), dtype=tl.float32)
    if ROWS:
        k_base = k_ptr + g.to(tl.int64) * sk_g
        v_base = v_ptr + g.to(tl.int64) * sv_g
    else:
        k_base = k_ptr + b * sk_b + g.to(tl.int64) * sk_g
        v_base = v_ptr + b * sv_b + g.to(tl.int64) * sv_g
    m_row = mask_ptr + b * sm_b
    t = tl.arange(0, BLOCK_N)
    lo_n = 0
    hi_n = S
    first = 0
    last = chunk
    if HAS_MASK and not ONE_BLOCK:
        # First a pass over the mask bytes of this program's blocks alone, for the blocks [first,
        # last) and keys [lo_n, hi_n) it sees: the K/V loads below then depend on nothing but the
        # loop index, so they pipeline, and the slots of a static cache past its filled part are
        # never read. A split of one block (ONE_BLOCK) skips it: its mask, K and V then load
        # together, one round trip instead of two.
        first = chunk
        last = 0
        lo_n = S
        hi_n = 0
        for j0 in range(0, chunk, MASK_BLOCKS):
            j = j0 + tl.arange(0, MASK_BLOCKS)
            blk = j * num_splits + split if INTERLEAVE else split * chunk + j
            n = blk[:, None] * BLOCK_N + t[None, :]
            ok = (j < chunk)[:, None] & (n < S)
            seen = (tl.load(m_row + n.to(tl.int64) * sm_s, mask=ok, other=0) != 0) & ok
            lo_n = tl.minimum(lo_n, tl.min(tl.min(tl.where(seen, n, S), axis=1), axis=0))
            hi_n = tl.maximum(hi_n, tl.max(tl.max(tl.where(seen, n + 1, 0), axis=1), axis=0))
            any_j = tl.max(seen.to(tl.int32), axis=1) != 0
            first = tl.minimum(first, tl.min(tl.where(any_j, j, chunk), axis=0))
            last = tl.maximum(last, tl.max(tl.where(any_j, j + 1, 0), axis=0))
    for jb in range(first, last):
        n = (jb * num_splits + split if INTERLEAVE else split * chunk + jb) * BLOCK_N + t
        inside = (n >= lo_n) & (n < hi_n)
        kv_ok = inside[:, None] & d_ok[None, :]
        if ROWS:
            src = tl.load(rows_ptr + b * sr_b + n, mask=inside, other=0).to(tl.int64)[:, None]
            k = tl.load(k_base + src * sk_b + n.to(tl.int64)[:, None] * sk_s + dd[None, :], mask=kv_ok, other=0.0)
            v = tl.load(v_base + src * sv_b + n.to(tl.int64)[:, None] * sv_s + dd[None, :], mask=kv_ok, other=0.0)
        else:
            k = tl.load(k_base + n.to(tl.int64)[:, None] * sk_s + dd[None, :], mask=kv_ok, other=0.0)
            v = tl.load(v_base + n.to(tl.int64)[:, None] * sv_s + dd[None, :], mask=kv_ok, other=0.0)
        if HAS_MASK:
            vis = inside & (tl.load(m_row + n.to(tl.int64) * sm_s, mask=inside, other=0) != 0)
            if ONE_BLOCK:
                # the block is the whole split, past the visible span too: a hidden slot (a static
                # cache's unwritten tail, stale) adds nothing, even if it holds inf or nan
                v = tl.where(vis[:, None], v, 0.0)
        else:
            vis = inside
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(vis[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a block with no visible key (inside [lo, hi): padding, a window) leaves m at -inf
        alpha = tl.where(m_new > float("-inf"), tl.exp(m_i - m_new), 1.0)
        p = tl.exp(s - tl.where(m_new > float("-inf"), m_new, 0.0)[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if SPLIT:
        # partials of the R real heads only (R_PAD pads the rows of the dots, not the partials)
        part = ((b * G + g) * R + r) * num_splits + split
        tl.store(part_m_ptr + part, m_i, mask=r_ok)
        tl.store(part_l_ptr + part, l_i, mask=r_ok)
        tl.store(part_acc_ptr + part[:, None] * D_PAD + dd[None, :], acc, mask=r_ok[:, None])
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b * so_b + heads[:, None] * so_h + dd[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & d_ok[None, :])


@launcher
@triton.jit
def _decode_combine_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, num_splits, so_b, so_h,
    G: tl.constexpr, R: tl.constexpr, TILED: tl.constexpr,
    HEAD_D: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, SPLIT_BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_start(PDL)
    pid = tl.program_id(0)  # (b*G + g)*R + r: one head's partials, num_splits of them in a row
    r = pid % R
    g = (pid // R) % G
    b = (pid // (R * G)).to(tl.int64)
    if TILED:
        head = r * G + g
    else:
        head = g * R + r
    base = pid.to(tl.int64) * num_splits
    sp = tl.arange(0, SPLITS_PAD)
    sp_ok = sp < num_splits
    m = tl.load(part_m_ptr + base + sp, mask=sp_ok, other=float("-inf"))
    m_max = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
    l_sum = tl.sum(w * tl.load(part_l_ptr + base + sp, mask=sp_ok, other=0.0), axis=0)
    dd = tl.arange(0, D_PAD)
    # the accumulators SPLIT_BLOCK splits at a time: a long cache's many splits never sit in a
    # program's registers at once
    out = tl.zeros((D_PAD,), dtype=tl.float32)
    for s0 in range(0, num_splits, SPLIT_BLOCK):
        s = s0 + tl.arange(0, SPLIT_BLOCK)
        s_ok = s < num_splits
        ms = tl.load(part_m_ptr + base + s, mask=s_ok, other=float("-inf"))
        ws = tl.where(ms > float("-inf"), tl.exp(ms - m_max), 0.0)
        acc = tl.load(part_acc_ptr + (base + s)[:, None] * D_PAD + dd[None, :], mask=s_ok[:, None], other=0.0)
        out += tl.sum(ws[:, None] * acc, axis=0)
    out = out / tl.where(l_sum > 0, l_sum, 1.0)
    tl.store(out_ptr + b * so_b + head * so_h + dd, out.to(out_ptr.dtype.element_ty), mask=dd < HEAD_D)


# Keys per step of the decode attention for head dims up to 256. 16 (twice the splits at a short
# context) read 0.7% slower for JetMoE and 1.0% for PhiMoE at batch 1, level at JetMoE batch 16
# (h200-2026-11-30-ab-block16-*.json).
DECODE_BLOCK_N = 32


def decode_attn_config(d: int, rows: int, sms: int) -> dict:
    """Block sizes of `_decode_attn_kernel` for head dim d and `rows` = batch x kv heads: BLOCK_N
    keys per step, warps, pipeline stages. 32 keys per step keep a program's K/V buffers small, so
    more programs share an SM; with a program per SM or more, 2 warps each (measured on the H200,
    bench/decode_attn.py: 5-10% faster than 64 keys and 4 warps at batch 16 and 64)."""
    return dict(BLOCK_N=DECODE_BLOCK_N if d <= 256 else 16, num_warps=2 if rows >= sms else 4, num_stages=2)


# Cache slots a split of the decode attention covers at least. Longer splits (fewer programs and
# partials) decoded slower at batch 1: 128 or 256 slots, JetMoE 560-563 against 595-596 tok/s,
# PhiMoE 251-252 against 262 (h200-2026-11-30-ab-split-*-b1.json).
DECODE_MIN_SPLIT_KEYS = 32

# Programs per SM the decode attention's key splits aim for (batch x kv heads x splits). 16 (more,
# shorter splits at batch 16 and 64) decoded 3% slower for JetMoE at batch 16 and 64, 0.5% for
# PhiMoE at 64 (h200-2026-11-30-ab-split16-*.json).
DECODE_PROGRAMS_PER_SM = 4

# Splits the combine kernel sums per step, with 4 warps once a step holds more than 2048 values
# (one warp for a short cache's few splits). 0: every split in one step with one warp (a long
# cache's 64 splits of 128 values then spill the warp's registers), for an A/B.
DECODE_COMBINE_SPLITS = 16

# A split of one key block loads its mask bytes with its K and V, with no pass for the visible span
# first (0: the span pass in every split, for an A/B).
DECODE_ONE_BLOCK_LOADS = 1

# Registers a thread of the decode attention may use where its programs of 2 warps would fill the
# SMs 7 or 8 deep (0: never capped). Uncapped, the compiler takes 142 at 32 keys and 2 warps (sm_90,
# rotary on the queries), so 6 programs share an SM and JetMoE's 1024 at batch 64 ran in 1.3
# waves; at 128 (4 registers spilled) 8 fit and they run in one: alone 43.3 against 46.0 us on an
# H100, graphed decode 8860 against 8756 tok/s (h100-2026-12-06-decode-attn-maxnreg128.json,
# -ab-maxnreg128-jetmoe-b*.json). At most 6 deep, one wave holds them anyway.
DECODE_WAVE_MAXNREG = 128

# A split reads every num_splits-th key block (1), so that a row's visible keys spread over all the
# splits wherever they lie among its S slots (a batch row's few keys far into a long paged row, or
# a long static cache's filled start); 0: each split a contiguous run of blocks, for an A/B.
DECODE_INTERLEAVED_SPLITS = 1


def decode_attn_maxnreg(programs: int, num_warps: int, sms: int) -> int | None:
    """The register cap of a decode attention launch of `programs` (DECODE_WAVE_MAXNREG's note)."""
    if DECODE_WAVE_MAXNREG and num_warps == 2 and 6 * sms < programs <= 8 * sms:
        return DECODE_WAVE_MAXNREG
    return None


def decode_attention(q_BH1d, k_BGSd, v_BGSd, mask_B11S, scale: float, tiled: bool, config: dict | None = None,
                     rope_q=None, kv_rows=None):
    """Attention of one query per row over S cached keys: out [B, 1, H, d] (queries' dtype).

    `mask_B11S` (bool, any strides, or None for all keys visible) already holds causality,
    padding and the sliding window. Splits S across programs when B*G alone cannot fill the GPU.
    `config`: block sizes (`decode_attn_config`'s keys), else the defaults. `rope_q` = (cos, sin
    [B or 1, 1, d]): the queries are not yet rotated, and the kernel rotates them as it loads them
    (`apply_rotary`, the same roundings). `kv_rows` [B, S] (integers): slot s of row b is read from
    row kv_rows[b, s] of K and V (`ops.attention.attention`).
    """
    B, H, _, d = q_BH1d.shape
    G, S = k_BGSd.shape[1], k_BGSd.shape[2]
    R = H // G
    q_BH1d, k_BGSd, v_BGSd = _unit_last(q_BH1d), _unit_last(k_BGSd), _unit_last(v_BGSd)
    sms = _sms(q_BH1d)
    cfg = config or decode_attn_config(d, B * G, sms)
    block_n = cfg["BLOCK_N"]
    programs = DECODE_PROGRAMS_PER_SM * sms
    splits = max(1, min(cdiv(S, max(block_n, DECODE_MIN_SPLIT_KEYS)), cdiv(programs, B * G)))
    blocks = cdiv(S, block_n)
    chunk = cdiv(blocks, splits)  # blocks a split, interleaved (the kernel's note)
    splits = cdiv(blocks, chunk)
    r_pad = max(16, next_power_of_2(R))
    d_pad = max(16, next_power_of_2(d))
    out = torch.empty(B, 1, H, d, dtype=q_BH1d.dtype, device=q_BH1d.device)
    if splits > 1:
        part_m = torch.empty(B * H * splits, dtype=torch.float32, device=q_BH1d.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(B * H * splits, d_pad, dtype=torch.float32, device=q_BH1d.device)
    else:
        part_m = part_l = part_acc = out
    if mask_B11S is not None:
        m8 = mask_B11S.view(torch.uint8)
        sm_b, sm_s = (m8.stride(0) if m8.shape[0] > 1 else 0), m8.stride(3)
    else:
        m8, sm_b, sm_s = out, 0, 0
    fp32 = q_BH1d.dtype == torch.float32
    if rope_q is not None:
        cos, sin = rope_q
        if d % 2 or cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, B) or cos.shape[1:] != (1, d):
            raise ValueError(f"decode_attention: rope_q must be cos/sin [B or 1, 1, {d}] (even d), "
                             f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
        cos, sin = cos.reshape(-1, d).contiguous(), sin.reshape(-1, d).contiguous()
        sc_b = cos.stride(0) if cos.shape[0] > 1 else 0
    else:
        cos, sin, sc_b = out, out, 0
    rows = out if kv_rows is None else kv_rows if kv_rows.stride(1) == 1 else kv_rows.contiguous()
    _decode_attn_kernel[(B * G, splits)](
        q_BH1d, k_BGSd, v_BGSd, m8, out, part_m, part_l, part_acc, cos, sin, rows,
        S, chunk, splits, scale,
        q_BH1d.stride(0), q_BH1d.stride(1), k_BGSd.stride(0), k_BGSd.stride(1), k_BGSd.stride(2),
        v_BGSd.stride(0), v_BGSd.stride(1), v_BGSd.stride(2), sm_b, sm_s, out.stride(0), out.stride(2), sc_b,
        rows.stride(0) if kv_rows is not None else 0,
        G=G, R=R, R_PAD=r_pad, TILED=tiled, HAS_MASK=mask_B11S is not None, SPLIT=splits > 1,
        HEAD_D=d, D_PAD=d_pad, BLOCK_N=block_n, MASK_BLOCKS=min(max(1, 1024 // block_n), next_power_of_2(chunk)),
        UPCAST=_interpreting(), PRECISION="ieee" if fp32 else "tf32", ROPE_Q=rope_q is not None,
        ROUND=round_code(q_BH1d.dtype), ONE_BLOCK=bool(DECODE_ONE_BLOCK_LOADS) and chunk == 1,
        ROWS=kv_rows is not None, INTERLEAVE=bool(DECODE_INTERLEAVED_SPLITS), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], maxnreg=decode_attn_maxnreg(B * G * splits, cfg["num_warps"], sms),
        **pdl_meta(q_BH1d.device, B * G * splits, B),
    )
    if splits > 1:
        splits_pad = max(2, next_power_of_2(splits))
        block = min(splits_pad, DECODE_COMBINE_SPLITS or splits_pad)
        _decode_combine_kernel[(B * H,)](
            part_m, part_l, part_acc, out, splits, out.stride(0), out.stride(2),
            G=G, R=R, TILED=tiled, HEAD_D=d, D_PAD=d_pad, SPLITS_PAD=splits_pad, SPLIT_BLOCK=block,
            num_warps=1 if block * d_pad <= 2048 or not DECODE_COMBINE_SPLITS else 4,
            **pdl_meta(q_BH1d.device, B * H, B),
        )
    return out
