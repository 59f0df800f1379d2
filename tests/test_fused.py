"""The fused inference kernels (ops/triton_fused.py) under Triton's CPU interpreter, against the
torch code they replace: residual add + LayerNorm/RMSNorm, sparsemixer and top-k routing, rotary
embedding, decode attention over a cache (GQA and MoA head layouts, masks, split keys), and whole
tiny models decoding with and without them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from archs import JETMOE, PHIMOE, randomize_
from interp import shuffle_programs
from parity import make_inputs

from moetorch import DynamicCache, StaticCache
from moetorch.engine import GraphedDecodeStep
from moetorch.ops import fused, triton_fused
from moetorch.ops.attention import attention, build_mask
from moetorch.ops.linear import linears, linears_rotated
from moetorch.ops.moe import expert_map
from moetorch.ops.norms import LayerNorm, Residual, RMSNorm, residual_add
from moetorch.ops.rope import RotaryEmbedding, apply_rotary, apply_rotary_qk
from moetorch.ops.routing import route_topk, sparsemixer, topk_softmax

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

DTYPES = [torch.float32, torch.bfloat16]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def close(a, b, dtype, what=""):
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


# ---- norms ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [32, 48])
def test_layernorm_and_add_norm(dtype, D):
    norm = LayerNorm(D, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D, generator=gen(1)))
        norm.bias.copy_(torch.randn(D, generator=gen(2)))
    x = torch.randn(3, 5, D, generator=gen(3)).to(dtype)
    a = torch.randn(3, 5, D, generator=gen(4)).to(dtype)
    with torch.no_grad():
        want_h = F.layer_norm(x, (D,), norm.weight, norm.bias, 1e-5)
        want_s = x + a
        want_h2 = F.layer_norm(want_s, (D,), norm.weight, norm.bias, 1e-5)
        with fused.forced():
            h = norm(x)
            s, h2 = norm.add_norm(x, a)
    close(h, want_h, dtype, "layernorm")
    assert torch.equal(s, want_s), "the residual sum is rounded exactly as torch rounds it"
    close(h2, want_h2, dtype, "add + layernorm")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_add_with_bias_and_residual_add(dtype):
    D = 40
    norm = RMSNorm(D, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D, generator=gen(1)))
    x, a = (torch.randn(7, D, generator=gen(s)).to(dtype) for s in (2, 3))
    bias = torch.randn(D, generator=gen(4)).to(dtype)
    with torch.no_grad():
        want_s = x + (a + bias)
        want_h = norm._norm(want_s)
        with fused.forced():
            s, h = norm.add_norm(x, a, bias)
            h_only = norm(x)
            r = residual_add(x, a, bias)
    assert torch.equal(s, want_s) and torch.equal(r, want_s)
    close(h, want_h, dtype, "add + rmsnorm")
    close(h_only, norm._norm(x), dtype, "rmsnorm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_kind", ["layer", "rms"])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_add_sums_a_delta_with_an_expert_axis(dtype, norm_kind, K):
    # The MoE's K weighted outputs [..., K, D] go to the residual add unsummed: the add's kernel
    # sums them (float32, rounded once) where torch's `sum(-2)` did in a kernel of its own.
    D = 40
    norm = (LayerNorm(D, eps=1e-5) if norm_kind == "layer" else RMSNorm(D, eps=1e-6)).to(dtype).eval()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D, generator=gen(1)))
    x = torch.randn(3, 5, D, generator=gen(2)).to(dtype)
    delta = torch.randn(3, 5, K, D, generator=gen(3)).to(dtype)
    bias = torch.randn(D, generator=gen(4)).to(dtype)
    router = (torch.randn(6, D, generator=gen(5)) / 4).to(dtype)
    with torch.no_grad():
        want_s = x + (delta.sum(-2) + bias)
        want_h = norm(want_s)
        torch_s, torch_h = norm.add_norm(x, delta, bias)
        with fused.forced():
            s, h = norm.add_norm(x, delta, bias)
            r = residual_add(x, delta, bias)
            s2, h2, routing = norm.add_norm_route(x.view(15, D), delta.view(15, K, D), bias, router, 2)
    assert torch.equal(torch_s, want_s) and torch.equal(torch_h, want_h), "the torch path sums the axis too"
    if K <= 2:  # two float32 terms sum alike in any order
        for got in (s, r, s2.view_as(x)):
            assert torch.equal(got, want_s)
    else:
        for got in (s, r, s2.view_as(x)):
            close(got, want_s, dtype, "sum over K")
    close(h, want_h, dtype, "normed")
    close(h2.view_as(x), want_h, dtype, "normed (with the router)")
    assert routing is not None


def test_add_rejects_a_delta_of_the_wrong_shape():
    norm = RMSNorm(8, 1e-6)
    x = torch.randn(2, 3, 8)
    for bad in (torch.randn(2, 3, 9), torch.randn(2, 4, 2, 8), torch.randn(2, 3, 2, 9), torch.randn(6, 8)):
        for on in (False, True):
            with torch.no_grad(), fused.forced(on), pytest.raises(ValueError, match="residual delta of shape"):
                norm.add_norm(x, bad)
            with torch.no_grad(), fused.forced(on), pytest.raises(ValueError, match="residual delta of shape"):
                residual_add(x, bad)


def test_residual_value_and_norm_of_a_pending_add():
    norm = LayerNorm(8).eval()
    x, delta, bias = torch.randn(2, 8), torch.randn(2, 3, 8), torch.randn(8)
    want = x + (delta.sum(-2) + bias)
    with torch.no_grad():
        assert torch.equal(Residual(x).value(), x)
        assert torch.equal(Residual(x, delta, bias).value(), want)
        s, h = norm.add_norm(*Residual(x, delta, bias))
        s0, h0 = norm.add_norm(*Residual(x))
    assert torch.equal(s, want) and torch.equal(h, norm(want))
    assert s0 is x and torch.equal(h0, norm(x))


def test_norms_keep_torch_path_when_gradients_are_needed():
    norm = LayerNorm(16)
    x = torch.randn(2, 16, requires_grad=True)
    with fused.forced():
        s, h = norm.add_norm(x, torch.randn(2, 16))
    h.sum().backward()  # the torch path: differentiable
    assert x.grad is not None


# ---- routing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,eps", [(16, 0.01), (5, 0.3), (8, 2.0)])
def test_sparsemixer_kernel_matches_torch(dtype, E, eps):
    logits = (torch.randn(37, E, generator=gen(E)) * 2).to(dtype)
    logits[3] = logits[3, 0]  # a row of ties
    logits[4, :2] = logits[4, :2].max()  # a tie for the top
    want_w, want_ids = sparsemixer(logits, eps, training=False)
    with fused.forced():
        w, ids = sparsemixer(logits, eps, training=False)
    assert torch.equal(ids, want_ids)
    assert w.dtype == want_w.dtype == dtype
    close(w, want_w, dtype, "sparsemixer weights")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,k", [(8, 2), (5, 1), (6, 3)])
def test_topk_route_kernel_matches_torch(dtype, E, k):
    logits = (torch.randn(21, E, generator=gen(E + k)) * 3).to(dtype)
    want_w, want_ids = topk_softmax(logits.float(), k)
    with fused.forced():
        w, ids, logits32 = route_topk(logits, k, dtype)
    assert torch.equal(ids, want_ids)
    assert torch.equal(logits32, logits.float())
    close(w, want_w.to(dtype), dtype, "top-k softmax weights")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_kind,E,k,eps,with_delta", [
    ("layer", 16, 2, 0.01, True),   # PhiMoE: x + attention, LayerNorm, sparsemixer
    ("layer", 5, 2, 0.3, False),
    ("rms", 8, 2, None, True),      # JetMoE: x + (attention + bias), RMSNorm, top-k softmax
    ("rms", 6, 3, None, False),     # JetMoE's input norm: the norm alone
])
@pytest.mark.parametrize("R", [1, 7])
@pytest.mark.parametrize("values", [48, 96, 16384])  # per program: 1 expert, 2 (arrivals among them), all
def test_add_norm_route_matches_norm_then_router(dtype, norm_kind, E, k, eps, with_delta, R, values, monkeypatch):
    D = 48
    monkeypatch.setattr(triton_fused, "ROUTE_PROGRAM_VALUES", values)
    norm = (LayerNorm(D, eps=1e-5) if norm_kind == "layer" else RMSNorm(D, eps=1e-6)).to(dtype).eval()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D, generator=gen(1)))
        if norm_kind == "layer":
            norm.bias.copy_(torch.randn(D, generator=gen(2)))
    x = torch.randn(R, D, generator=gen(3)).to(dtype)
    delta = torch.randn(R, D, generator=gen(4)).to(dtype) if with_delta else None
    bias = torch.randn(D, generator=gen(5)).to(dtype) if with_delta and norm_kind == "rms" else None
    router = (torch.randn(E, D, generator=gen(6)) / 4).to(dtype)
    f32 = eps is None
    with torch.no_grad():
        want_s, want_h = norm.add_norm(x, delta, bias) if with_delta else (x, norm(x))
        want_logits = F.linear(want_h, router)
        unfused = norm.add_norm_route(x, delta, bias, router, k, eps, f32)
        with fused.forced():
            s, h, (w, ids, logits) = norm.add_norm_route(x, delta, bias, router, k, eps, f32)
    assert unfused[2] is None, "off the fused path the caller routes"
    assert torch.equal(s, want_s)
    close(h, want_h, dtype, "normed rows")
    assert logits.dtype == (torch.float32 if f32 else dtype)
    close(logits, want_logits.to(logits.dtype), dtype, "router logits")
    # the routing of the kernel's own logits is exactly the torch routing of those logits
    # (the sums' order may differ from torch's GEMV by an ulp, which can flip a near tie)
    if eps is not None:
        want_w, want_ids = sparsemixer(logits, eps, training=False)
    else:
        want_w, want_ids = topk_softmax(logits, k)
    assert torch.equal(ids, want_ids)
    assert w.dtype == dtype
    close(w, want_w.to(dtype), dtype, "routing weights")


@pytest.mark.parametrize("sparse", [True, False])
def test_add_norm_route_any_split_of_the_experts_routes_alike(sparse, monkeypatch):
    # The same rows routed with every expert's logit in its own program (an arrival), with a few
    # experts a program (an arrival among fewer), and with all of them in one program (none).
    E, D, R = 16 if sparse else 8, 64, 4
    norm = (LayerNorm(D) if sparse else RMSNorm(D, 1e-6)).to(torch.bfloat16).eval()
    x = torch.randn(R, D, generator=gen(7)).bfloat16()
    delta = torch.randn(R, 2, D, generator=gen(8)).bfloat16()
    router = (torch.randn(E, D, generator=gen(9)) / 4).bfloat16()
    eps = 0.01 if sparse else None
    out = {}
    for values, epp in ((D, 1), (4 * D, 4), (E * D, E)):
        monkeypatch.setattr(triton_fused, "ROUTE_PROGRAM_VALUES", values)
        assert triton_fused.route_experts_per_program(E, D) == epp
        with torch.no_grad(), fused.forced():
            out[epp] = norm.add_norm_route(x, delta, None, router, 2, eps, not sparse)
    s0, h0, (w0, ids0, lg0) = out[1]
    for epp in (4, E):
        s1, h1, (w1, ids1, lg1) = out[epp]
        assert torch.equal(s0, s1) and torch.equal(h0, h1)
        close(lg1, lg0, torch.bfloat16, "router logits")
        assert torch.equal(ids0, ids1)
        close(w1, w0, torch.bfloat16, "routing weights")


def test_route_experts_per_program_at_the_models_sizes():
    # JetMoE's 8 x 2048 router: one program a row, no arrival; PhiMoE's 16 x 4096: 4 experts a program
    assert triton_fused.route_experts_per_program(8, 2048) == 8
    assert triton_fused.route_experts_per_program(16, 4096) == 4
    assert triton_fused.route_experts_per_program(6, 64) == 8  # all E, padded to a power of two
    assert triton_fused.route_experts_per_program(16, 65536) == 1  # wider than the budget: one each


@pytest.mark.parametrize("values", [32, 64])
def test_add_norm_route_any_program_may_arrive_last(values, monkeypatch):
    # A row's programs (one expert each, or two) meet at a counter; whichever arrives last routes the
    # row and resets it.
    from moetorch.ops.triton_moe import _ARRIVAL_COUNTERS

    monkeypatch.setattr(triton_fused, "ROUTE_PROGRAM_VALUES", values)
    norm, router = RMSNorm(32, 1e-6).eval(), torch.randn(6, 32, generator=gen(1))
    assert triton_fused.route_experts_per_program(6, 32) == values // 32
    x = torch.randn(5, 32, generator=gen(2))
    with torch.no_grad(), fused.forced():
        want = norm.add_norm_route(x, None, None, router, 2)
        for seed in range(2):
            with monkeypatch.context() as m:
                order = shuffle_programs(m, seed)
                got = norm.add_norm_route(x, None, None, router, 2)
            assert order["other_last"] > 0
            for g, w in zip(got[:2] + got[2], want[:2] + want[2]):
                assert torch.equal(g, w)
    assert all(not c.any() for c in _ARRIVAL_COUNTERS.values()), "the last arriver resets the counter"


def test_add_norm_route_falls_back_when_training_or_large():
    norm, router = RMSNorm(16, 1e-6).eval(), torch.randn(4, 16)
    x = torch.randn(fused.ROUTE_MAX_ROWS + 1, 16)
    with torch.no_grad(), fused.forced():
        assert norm.add_norm_route(x, None, None, router, 2)[2] is None  # too many rows: GEMM + routing
        assert norm.add_norm_route(x[:3], None, None, router, 2)[2] is not None
        norm.train()
        assert norm.add_norm_route(x[:3], None, None, router, 2)[2] is None  # training routes its own way
    with pytest.raises(ValueError, match="sparsemixer routes to 2 experts"):
        triton_fused.add_norm_route(x[:3], None, None, fused.NORM_RMS, norm.weight.detach(), None, 1e-6,
                                    router, 3, 0.1, False)


# ---- small-row linear layers ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("outs,bias", [((40, 24, 24), True), ((48,), False), ((8, 72), True), ((16, 16, 16), False)])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_linears_kernel_matches_nn_linear(dtype, outs, bias, rows):
    K = 40  # not a multiple of the K block: masked tail
    torch.manual_seed(len(outs) + rows)
    layers = [torch.nn.Linear(K, n, bias=bias).to(dtype) for n in outs]
    x = torch.randn(rows, 2, K + 3, generator=gen(rows)).to(dtype)[:, 1, 2:-1]  # strided rows
    with torch.no_grad():
        want = [layer(x) for layer in layers]
        with fused.forced():
            got = linears(x, *layers)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == dtype
        close(g, w, dtype, "linear")


def test_linears_block_sizes_and_leading_dims():
    K, layers = 64, [torch.nn.Linear(64, n) for n in (96, 32)]
    x = torch.randn(2, 3, K, generator=gen(1))
    with torch.no_grad():
        for cfg in (dict(BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1), dict(BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=2)):
            out = triton_fused.linear_small(x.view(-1, K), [l.weight for l in layers], [l.bias for l in layers], cfg)
            close(out, torch.cat([l(x.view(-1, K)) for l in layers], -1), torch.float32, f"linear_small {cfg}")
        with fused.forced():
            a, b = linears(x, *layers)
        assert a.shape == (2, 3, 96) and b.shape == (2, 3, 32)
        close(a, layers[0](x), torch.float32, "3d input")


def test_linears_takes_torch_path_outside_decode_sizes(monkeypatch):
    calls, original = [], triton_fused.linear_small
    monkeypatch.setattr(triton_fused, "linear_small", lambda *a, **k: calls.append(1))
    lin, lin_nb = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8, bias=False)
    small, large = torch.randn(2, 16), torch.randn(fused.LINEAR_MAX_ROWS + 1, 16)
    with torch.no_grad(), fused.forced():
        linears(large, lin)  # too many rows
        linears(small, lin, lin_nb)  # mixed biases
        linears(small, lin, lin, lin, lin)  # more than three layers
    linears(small, lin)  # gradients needed (and not forced)
    assert not calls
    with pytest.raises(ValueError, match="1 to 3 weights and at most 16 rows"):
        original(torch.randn(17, 16), [lin.weight], [None])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,cos_batch,bias", [(1, 1, 1, False), (1, 1, 1, True), (4, 1, 4, False), (2, 3, 1, True),
                                                  (16, 1, 16, True)])  # 16 rows: LINEAR_MAX_ROWS
@pytest.mark.parametrize("to_cache", [True, False])
def test_linears_rotated_matches_linears_then_rotary(dtype, B, T, cos_batch, bias, to_cache):
    # q/k/v projections with q and k rotated (and k, v written into cache slots) in one kernel,
    # against the two kernels it replaces (exactly at one row, where both sum alike) and torch
    D, H, G, d, S = 40, 4, 2, 16, 9
    torch.manual_seed(B * 10 + T)
    layers = [torch.nn.Linear(D, n * d, bias=bias).to(dtype) for n in (H, G, G)]
    x = torch.randn(B, T, D, generator=gen(1)).to(dtype)
    ang = torch.randn(cos_batch, T, d // 2, generator=gen(2)) * 30
    cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
    slots = torch.arange(4, 4 + T)
    kwargs = {"cache_position": slots}

    def reference(on):
        with torch.no_grad(), fused.forced(on):
            q, k, v = (t.view(B, T, -1, d).transpose(1, 2) for t in linears(x, *layers))
            if not to_cache:
                return (*apply_rotary_qk(q, k, cos, sin), v)
            cache = StaticCache(num_layers=1, max_cache_len=S)
            cache.update(torch.zeros(B, G, 4, d, dtype=dtype), torch.zeros(B, G, 4, d, dtype=dtype), 0)
            return cache.update_rotated(q, k, v, cos, sin, 0, kwargs)

    want_fused, want_torch = reference(True), reference(False)
    with torch.no_grad(), fused.forced():
        if to_cache:
            cache = StaticCache(num_layers=1, max_cache_len=S)
            cache.update(torch.zeros(B, G, 4, d, dtype=dtype), torch.zeros(B, G, 4, d, dtype=dtype), 0)
            got = cache.project_rotated(x, layers, d, cos, sin, 0, kwargs)
            assert cache.get_seq_length() == 4 + T
        else:
            got = linears_rotated(x, layers, d, cos, sin)
    assert got is not None, "the one-kernel path serves these shapes"
    for name, g, wf, wt in zip("qkv", got, want_fused, want_torch):
        assert g.shape == wt.shape and g.dtype == dtype
        if B * T == 1:
            assert torch.equal(g, wf), f"{name}: the same sums and roundings as linears + rope_qk(_cache)"
        close(g, wf, dtype, f"{name} vs the two kernels")
        close(g, wt, dtype, f"{name} vs torch")


def test_linears_rotated_declines_what_it_cannot_serve():
    D, d = 32, 12  # half a head (6) is no multiple of the 16-column tile's 8 pairs
    layers = [torch.nn.Linear(D, n * d) for n in (4, 2, 2)]
    cos = sin = torch.ones(1, 1, d)
    with torch.no_grad(), fused.forced():
        assert linears_rotated(torch.randn(1, 1, D), layers, d, cos, sin) is not None  # 4-column GEMV slices
        assert linears_rotated(torch.randn(3, 1, D), layers, d, cos.expand(3, 1, d), sin.expand(3, 1, d)) is None
        assert linears_rotated(torch.randn(1, 1, D), layers[:2], d, cos, sin) is None  # not q, k and v
        assert linears_rotated(torch.randn(1, 1, D), layers, d, cos[..., :8], sin[..., :8]) is None
        wrong_batch = (torch.zeros(2, 2, 5, d), torch.zeros(2, 2, 5, d), torch.tensor([0]))
        assert linears_rotated(torch.randn(1, 1, D), layers, d, cos, sin, wrong_batch) is None
    assert linears_rotated(torch.randn(1, 1, D), layers, d, cos, sin) is None  # not forced: torch on CPU
    with pytest.raises(ValueError, match=r"rope needs q, k and v \(or k and v\) weights"):
        triton_fused.linear_small(torch.randn(1, D), [layers[0].weight], [None], rope=(cos, sin, 1, None, None, None))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (2, 2)])
@pytest.mark.parametrize("to_cache", [True, False])
def test_kv_projection_rotated_matches_linears_then_rotary(dtype, B, T, to_cache):
    # JetMoE's single kv projection (keys, then values): the keys rotated and both written into
    # the cache in one kernel; no queries come back
    D, G, d, S = 40, 2, 16, 9
    torch.manual_seed(B + 3 * T)
    kv_proj = torch.nn.Linear(D, 2 * G * d, bias=False).to(dtype)
    x = torch.randn(B, T, D, generator=gen(1)).to(dtype)
    ang = torch.randn(B, T, d // 2, generator=gen(2)) * 30
    cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
    kwargs = {"cache_position": torch.arange(4, 4 + T)}
    q_any = torch.zeros(B, G, T, d, dtype=dtype)

    def fresh():
        cache = StaticCache(num_layers=1, max_cache_len=S)
        cache.update(torch.zeros(B, G, 4, d, dtype=dtype), torch.zeros(B, G, 4, d, dtype=dtype), 0)
        return cache

    with torch.no_grad(), fused.forced():
        k, v = (t.view(B, T, G, d).transpose(1, 2) for t in linears(x, kv_proj)[0].chunk(2, dim=-1))
        if to_cache:
            _, want_k, want_v = fresh().update_rotated(q_any, k, v, cos, sin, 0, kwargs)
            cache = fresh()
            got = cache.project_rotated(x, (kv_proj,), d, cos, sin, 0, kwargs)
            assert cache.get_seq_length() == 4 + T
        else:
            want_k, want_v = apply_rotary_qk(q_any, k, cos, sin)[1], v
            got = linears_rotated(x, (kv_proj,), d, cos, sin)
    assert got is not None and got[0] is None, "k and v only"
    for name, g, w in (("k", got[1], want_k), ("v", got[2], want_v)):
        if B * T == 1:
            assert torch.equal(g, w), name
        close(g, w, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("to_cache", [True, False])
@pytest.mark.parametrize("ids", [[2, 0], [1, 1], [3, 2, 0]], ids=["two", "same-twice", "three"])
def test_kv_projection_takes_the_moa_map_at_one_row(dtype, to_cache, ids):
    # JetMoE at one token: the same kernel also projects the row with each routed attention expert
    # (ops.moe.expert_map); q comes back unrotated in the attention's [B, H, T, d] layout, and k and
    # v as without the experts
    D, G, d, E, S = 40, 2, 16, 4, 9
    C = G * d
    torch.manual_seed(len(ids))
    kv_proj = torch.nn.Linear(D, 2 * G * d, bias=False).to(dtype)
    w_map = (torch.randn(E, C, D, generator=gen(3)) * 0.2).to(dtype)
    ids_NK = torch.tensor([ids])
    x = torch.randn(1, 1, D, generator=gen(1)).to(dtype)
    ang = torch.randn(1, 1, d // 2, generator=gen(2)) * 30
    cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
    kwargs = {"cache_position": torch.tensor([4])}

    def project(experts):
        if not to_cache:
            return linears_rotated(x, (kv_proj,), d, cos, sin, None, experts)
        cache = StaticCache(num_layers=1, max_cache_len=S)
        cache.update(torch.zeros(1, G, 4, d, dtype=dtype), torch.zeros(1, G, 4, d, dtype=dtype), 0)
        return [t.clone() for t in cache.project_rotated(x, (kv_proj,), d, cos, sin, 0, kwargs, experts)[1:]]

    with torch.no_grad(), fused.forced():
        want_q = expert_map(x.view(1, D), w_map, ids_NK, "reference").view(1, 1, -1, d).transpose(1, 2)
        want_kv = project(None)[-2:]
        got = linears_rotated(x, (kv_proj,), d, cos, sin, None, (w_map, ids_NK))
        got_kv = project((w_map, ids_NK))[-2:]
    assert got[0].shape == (1, len(ids) * G, 1, d) and got[0].dtype == dtype
    close(got[0], want_q, dtype, "map")
    for name, g, w in zip("kv", got_kv, want_kv):
        close(g, w, dtype, name)


def test_kv_projection_leaves_the_map_where_it_cannot_take_it(monkeypatch):
    # more than one row, biases, expert widths off the slice multiple, a forced-off gate: k and v
    # still come from the fused kernel, q stays None (the caller maps); bad direct calls name the problem
    from moetorch.ops import linear

    D, G, d, E = 32, 2, 16, 4
    kv_proj, kv_bias = torch.nn.Linear(D, 2 * G * d, bias=False), torch.nn.Linear(D, 2 * G * d)
    w_map, w_odd = torch.randn(E, G * d, D), torch.randn(E, 24, D)  # 24: not whole heads
    ang = torch.randn(2, 1, d // 2)
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    x1, x2 = torch.randn(1, 1, D), torch.randn(2, 1, D)
    ids1, ids2 = torch.tensor([[0, 1]]), torch.tensor([[0, 1], [2, 3]])
    with torch.no_grad(), fused.forced():
        assert linears_rotated(x2, (kv_proj,), d, cos, sin, None, (w_map, ids2))[0] is None
        assert linears_rotated(x1, (kv_bias,), d, cos[:1], sin[:1], None, (w_map, ids1))[0] is None
        assert linears_rotated(x1, (kv_proj,), d, cos[:1], sin[:1], None, (w_odd, ids1))[0] is None
        assert linears_rotated(x1, (kv_proj,), d, cos[:1], sin[:1], None, (w_map, ids1.float()))[0] is None
        monkeypatch.setattr(linear, "MAP_WITH_KV", 0)
        off = linears_rotated(x1, (kv_proj,), d, cos[:1], sin[:1], None, (w_map, ids1))
        assert off is not None and off[0] is None and off[1] is not None
        with pytest.raises(ValueError, match="experts take one row"):
            triton_fused.linear_small(x2.view(2, D), [kv_proj.weight], [None], experts=(w_map, ids2))
        with pytest.raises(ValueError, match="not a multiple of the 4-column slices"):
            triton_fused.linear_small(x1.view(1, D), [kv_proj.weight], [None], experts=(w_map[:, :18], ids1))
        with pytest.raises(ValueError, match="no biases"):
            triton_fused.linear_small(x1.view(1, D), [kv_bias.weight], [kv_bias.bias], experts=(w_map, ids1))
        with pytest.raises(ValueError, match="integer ids"):
            triton_fused.linear_small(x1.view(1, D), [kv_proj.weight], [None], experts=(w_map, ids1.float()))


def test_linear_small_experts_alone_and_after_one_weight():
    # the expert layer as the only one (an empty second slot) or after one dense weight
    D, E, C = 64, 3, 32
    dense, w_map = torch.randn(24, D), torch.randn(E, C, D)
    x, ids = torch.randn(1, D), torch.tensor([2, 0])
    want = expert_map(x, w_map, ids.view(1, 2), "reference").reshape(1, -1)
    with torch.no_grad(), fused.forced():
        alone = triton_fused.linear_small(x, [dense[:0]], [None], experts=(w_map, ids))
        after = triton_fused.linear_small(x, [dense], [None], experts=(w_map, ids))
    close(alone, want, torch.float32, "experts alone")
    close(after, torch.cat([x @ dense.T, want], -1), torch.float32, "after a dense layer")


def test_project_rotated_allocates_and_takes_the_next_slots():
    # An empty static cache allocates from the projections' shapes; without cache_position the new
    # tokens take the next slots; only layer 0 advances the count; bad batches fall back to
    # update(), which names the problem.
    D, H, G, d = 32, 4, 2, 8
    layers = [torch.nn.Linear(D, n * d) for n in (H, G, G)]
    x = torch.randn(1, 1, D, generator=gen(1))
    cos = sin = torch.ones(1, 1, d)
    with torch.no_grad(), fused.forced():
        cache, want = StaticCache(num_layers=2, max_cache_len=6), StaticCache(num_layers=2, max_cache_len=6)
        for step in range(2):
            for layer in range(2):
                got = cache.project_rotated(x, layers, d, cos, sin, layer)
                q, k, v = (t.view(1, 1, -1, d).transpose(1, 2) for t in linears(x, *layers))
                expect = want.update_rotated(q, k, v, cos, sin, layer)
                assert all(torch.equal(a, b) for a, b in zip(got, expect))
            assert cache.get_seq_length() == want.get_seq_length() == step + 1
        assert cache.keys[0].shape == (1, G, 6, d) and cache.keys[1][:, :, :2].abs().sum() > 0
        for call in (lambda: cache.project_rotated(torch.randn(2, 1, D), layers, d, cos, sin, 0),  # batch 1 cache
                     lambda: cache.update(torch.zeros(2, G, 1, d), torch.zeros(2, G, 1, d), 0)):
            with pytest.raises(ValueError, match="the StaticCache holds 1 rows of .* layer 0 gives keys of 2 rows"):
                call()
            assert cache.get_seq_length() == 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,H,G", [("grouped", 8, 2), ("tiled", 8, 4)])
@pytest.mark.parametrize("cos_batch", [1, 3])
def test_decode_attention_rotates_unrotated_queries(dtype, layout, H, G, cos_batch):
    # rope_q: the decode kernel rotates the queries as it loads them; the same numbers as rotating
    # them first, and the other paths (need_weights: eager) rotate them first themselves
    B, S, d = 3, 40, 16
    q = torch.randn(B, 1, H * d, generator=gen(1)).to(dtype).view(B, 1, H, d).transpose(1, 2)
    k = torch.randn(B, G, S, d, generator=gen(2)).to(dtype)
    v = torch.randn(B, G, S, d, generator=gen(3)).to(dtype)
    ang = torch.randn(cos_batch, 1, d // 2, generator=gen(4)) * 30
    cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
    pad = torch.ones(B, S, dtype=torch.long)
    pad[0, :5] = 0
    mask, _ = build_mask(pad, torch.tensor([S - 9]), S, None, B, queries_at_end=False)
    q_rot = apply_rotary(q, cos, sin)
    with torch.no_grad(), fused.forced():
        want, _ = attention(q_rot, k, v, mask, False, d**-0.5, "sdpa", 0.0, layout)
        got, _ = attention(q, k, v, mask, False, d**-0.5, "sdpa", 0.0, layout, rope_q=(cos, sin))
        eager, _ = attention(q, k, v, mask, False, d**-0.5, "sdpa", 0.0, layout, need_weights=True,
                             rope_q=(cos, sin))
    assert torch.equal(got, want)
    close(eager, want, dtype, "eager path rotates first")
    with pytest.raises(ValueError, match="rope_q must be cos/sin"):
        triton_fused.decode_attention(q, k, v, mask, d**-0.5, False, rope_q=(cos[..., :8], sin[..., :8]))


@pytest.mark.parametrize("arch,weights", [(PHIMOE, 3), (JETMOE, 2)], ids=["phimoe", "jetmoe"])
def test_decode_projects_rotates_and_caches_in_one_kernel(arch, weights, monkeypatch):
    # A static-cache decode step takes the one-kernel q/k/v (PhiMoE) or kv (JetMoE) path in every
    # layer (prefill rows exceed the small-row kernel and keep linears + rope_qk_cache); tokens
    # match the torch path's.
    ropes, maps, original = [], [], triton_fused.linear_small
    monkeypatch.setattr(triton_fused, "linear_small",
                        lambda x, ws, *a, rope=None, experts=None, **k: ropes.append(rope is not None and len(ws))
                        or maps.append(experts is not None) or original(x, ws, *a, rope=rope, experts=experts, **k))
    model = _tiny(arch)
    ids = torch.randint(1, 97, (1, 5), generator=gen(6))
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        want = model.generate(ids, **kwargs)
        with fused.forced():
            got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)
    assert ropes.count(weights) == 2 * model.config.num_hidden_layers, "two decode steps, each layer"
    # JetMoE's MoA map rides in that kernel at one row
    assert maps.count(True) == (2 * model.config.num_hidden_layers if arch is JETMOE else 0)


# ---- before the first layer: rotary tables and attention mask ---------------------------------


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between a and b in steps of their (float) dtype: the bit patterns as
    sign-magnitude integers, made monotonic."""
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    magnitude = torch.iinfo(ints).max

    def ordered(x):
        i = x.view(ints).long()
        return torch.where(i < 0, -(i & magnitude), i)

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
            "short_mscale": 1.19, "long_mscale": 1.31}


def _tables_with(cos_sin, pos, inv_freq, mscale, dtype):
    # RotaryEmbedding.forward's steps, with cos / sin given as float32 numpy functions
    freqs = pos[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1).numpy()
    return tuple((torch.from_numpy(f(emb)) * mscale).to(dtype) for f in cos_sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,longrope", [((1, 9), False), ((3, 5), True), ((2, 1), True), ((4,), False)])
def test_rope_tables_kernel_matches_rotary_embedding(dtype, shape, longrope):
    d = 32
    g = gen(len(shape) * 100 + shape[0] * 10 + longrope)
    params = {"rope_type": "default", "rope_theta": 10000.0}
    if longrope:  # LongRoPE: rescaled frequencies, and an mscale that is not 1
        params = dict(LONGROPE, short_factor=(1 + 2 * torch.rand(d // 2, generator=g)).tolist(),
                      long_factor=(1 + 60 * torch.rand(d // 2, generator=g)).tolist())
    rotary = RotaryEmbedding(d, params)
    pos = torch.randint(0, 200_000, shape, generator=g)
    pos.view(-1)[0], pos.view(-1)[-1] = 100_000, 0
    for long in (False, True) if longrope else (False,):
        want = rotary(pos, dtype, long)
        with fused.forced():
            got = rotary(pos, dtype, long)
        # The interpreter has no libdevice: its cos / sin are numpy's. With those in torch's steps
        # (position to float32, one multiply, * mscale, one rounding), the kernel is exact.
        inv_freq = rotary.inv_freq_long if long else rotary.inv_freq_short
        mscale = rotary.long_mscale if long else rotary.short_mscale
        numpy_steps = _tables_with((np.cos, np.sin), pos, inv_freq, mscale, dtype)
        for a, b, c, what in zip(got, want, numpy_steps, ("cos", "sin")):
            assert a.shape == b.shape == (*shape, d) and a.dtype == dtype and a.is_contiguous()
            assert torch.equal(a, c), f"{what} {dtype} long={long}: the steps differ from torch's"
            if not torch.equal(a, b):
                # Against torch's own CPU cos / sin (not numpy's), float32 values may be an ulp
                # apart: then one step of a bf16 / fp16 output, and in float32 up to two once
                # scaled by an mscale != 1. On the GPU both sides are libdevice's cosf / sinf and
                # equal bit for bit (gpu_check: prelayer).
                limit = 2 if dtype == torch.float32 and mscale != 1.0 else 1
                assert _ulps(a, b) <= limit, f"{what} {dtype} long={long}: {_ulps(a, b)} ulps"


def test_rope_tables_kernel_takes_expanded_positions_and_keeps_exact_steps():
    # positions [B, T] as a stride-0 view (the models expand one row), and frequencies whose cos /
    # sin are exact (zero: cos 1, sin 0), so the multiply by mscale and the rounding are checked
    # exactly: 1.31 * 1 rounded to bf16 is 1.3125
    d, B, T = 16, 3, 4
    rotary = RotaryEmbedding(d, dict(LONGROPE, short_factor=[1.0] * (d // 2), long_factor=[2.0] * (d // 2)))
    pos = torch.arange(5, 5 + T)[None].expand(B, -1)
    with fused.forced():
        got = rotary(pos, torch.bfloat16, True)
        rotary.inv_freq_long.zero_()
        ones, zeros = rotary(pos, torch.bfloat16, True)
    want = rotary(pos, torch.bfloat16, True)  # torch, of the zeroed frequencies
    assert torch.equal(ones, want[0]) and torch.equal(zeros, want[1])
    assert (ones == 1.3125).all() and (zeros == 0).all()
    assert got[0].shape == (B, T, d) and torch.equal(got[0][0], got[0][2])


def test_rope_tables_kernel_rejects_non_float32_frequencies():
    pos = torch.arange(3)[None]
    for inv_freq in (torch.ones(4, dtype=torch.bfloat16), torch.ones(2, 4)):
        with pytest.raises(TypeError, match="inv_freq .*must be float32 vectors"):
            triton_fused.rope_tables(pos, inv_freq, 1.0, torch.float32)
    flags = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(TypeError, match="the long table"):  # a long table of another length
        triton_fused.rope_tables(pos, torch.ones(4), 1.0, torch.float32, long=(flags, torch.ones(3), 1.0))
    with pytest.raises(ValueError, match=r"long flags' shape \(1, 2\) is not the positions' \(1, 3\)"):
        triton_fused.rope_tables(pos, torch.ones(4), 1.0, torch.float32, long=(flags[:, :2], torch.ones(4), 1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,flag_shape", [((5, 1), (5, 1)), ((3, 7), (3, 7)), ((3, 7), (3, 1)), ((1, 9), (1, 9))])
def test_rope_tables_per_position_factor_sets(dtype, shape, flag_shape):
    """Continuous batching's rows each take their own LongRoPE factor set: with a flag per position
    (or per row), each position's cos / sin are those of its set, in torch and in the kernel."""
    d = 32
    g = gen(shape[0] * 10 + shape[1] + (dtype == torch.bfloat16))
    rotary = RotaryEmbedding(d, dict(LONGROPE, short_factor=(1 + 2 * torch.rand(d // 2, generator=g)).tolist(),
                                     long_factor=(1 + 60 * torch.rand(d // 2, generator=g)).tolist()))
    pos = torch.randint(0, 100_000, shape, generator=g)
    flags = torch.rand(flag_shape, generator=g) < 0.5
    flags.view(-1)[0], flags.view(-1)[-1] = True, False
    want = [torch.where(flags.expand(shape)[..., None], long, short)
            for short, long in zip(rotary(pos, dtype, False), rotary(pos, dtype, True))]
    for given in (flags, flags.long()):  # bool or integer flags
        got = rotary(pos, dtype, given)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), "torch: a position took the other set's values"
        with fused.forced():
            kernel = rotary(pos, dtype, given)
            per_set = [rotary(pos, dtype, False), rotary(pos, dtype, True)]
        expect = [torch.where(flags.expand(shape)[..., None], long, short) for short, long in zip(*per_set)]
        assert all(a.shape == (*shape, d) and torch.equal(a, b) for a, b in zip(kernel, expect)), \
            "kernel: a position took the other set's values"


def _padding_mask(B: int, L: int, g: torch.Generator, kind: str) -> torch.Tensor | None:
    # random 2D masks with zeros anywhere, the first row left-padded, in the dtypes callers pass
    if kind == "none":
        return None
    am = (torch.rand(B, L, generator=g) > 0.3).long()
    am[0, : L // 2] = 0
    am[-1] = 1
    return {"long": am, "bool": am.bool(), "float": am.float(), "one_row": am[:1]}[kind]


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("kind,length", [("none", 0), ("long", 0), ("bool", -3), ("float", 2), ("one_row", 0)])
def test_mask_kernel_matches_build_mask(T, static, window, kind, length):
    # A static cache's queries sit anywhere among its slots and its mask may be shorter (the rest
    # visible: unseen slots are masked by position anyway); a dynamic cache's queries are the last
    # T slots. length: the 2D mask's length against what was seen (past + T), longer or shorter.
    B, past, slots = 3, 7, 20
    g = gen(T * 100 + static * 10 + (window or 0))
    pos = torch.arange(past, past + T)
    kv_len = slots if static else past + T
    am = _padding_mask(B, past + T + length, g, kind)
    args = (am, pos, kv_len, window, B)
    want, want_causal = build_mask(*args, queries_at_end=not static)
    with fused.forced():
        got, causal = build_mask(*args, queries_at_end=not static)
    assert causal == want_causal
    if want is None:  # build_mask's early returns stay
        assert got is None
        return
    assert got.dtype == torch.bool and got.shape == want.shape == (B, 1, T, kv_len)
    assert torch.equal(got, want)
    if am is not None:
        assert got.is_contiguous()


def test_mask_kernel_keeps_build_mask_early_returns_and_errors(monkeypatch):
    launched = []
    kernel = triton_fused.causal_mask
    monkeypatch.setattr(triton_fused, "causal_mask", lambda *a: launched.append(a) or kernel(*a))
    m4 = torch.ones(2, 1, 3, 5)
    with fused.forced():
        assert build_mask(m4, torch.arange(2, 5), 5, None, 2)[0] is m4  # 4D float: as given (added to the scores)
        assert build_mask(m4.long(), torch.arange(2, 5), 5, None, 2)[0].dtype == torch.bool  # integer: True attends
        assert build_mask(None, torch.arange(3), 3, None, 2) == (None, True)
        assert build_mask(None, torch.tensor([5]), 6, None, 2) == (None, False)
        with pytest.raises(ValueError, match="must be 2D"):
            build_mask(torch.ones(2, 1, 5), torch.tensor([4]), 5, None, 2)
        assert not launched
        build_mask(torch.ones(2, 5, dtype=torch.long), torch.tensor([4]), 5, None, 2)
        assert len(launched) == 1
    with fused.forced(False):
        build_mask(torch.ones(2, 5, dtype=torch.long), torch.tensor([4]), 5, None, 2)
    assert len(launched) == 1, "the torch code without the fused kernels"


def test_step_input_kernels_setting_takes_the_torch_code(monkeypatch):
    # fused.STEP_INPUT_KERNELS = 0 (an A/B's B arm) runs the torch ops for the tables and the mask
    called = []
    for name in ("rope_tables", "causal_mask"):
        monkeypatch.setattr(triton_fused, name, lambda *a, _n=name: called.append(_n))
    monkeypatch.setattr(fused, "STEP_INPUT_KERNELS", 0)
    rotary = RotaryEmbedding(16, {"rope_type": "default", "rope_theta": 10000.0})
    with fused.forced():
        cos, sin = rotary(torch.arange(4)[None], torch.bfloat16, False)
        mask, _ = build_mask(torch.ones(2, 6, dtype=torch.long), torch.tensor([4]), 6, None, 2)
    assert not called
    assert cos.shape == (1, 4, 16) and mask.shape == (2, 1, 1, 6)


@pytest.mark.parametrize("arch", [PHIMOE, JETMOE], ids=["phimoe", "jetmoe"])
@pytest.mark.parametrize("packs", [True, False])
def test_decode_builds_rotary_tables_and_mask_in_kernels(arch, monkeypatch, packs):
    # every forward of a static-cache generate (prefill and decode steps) takes the rotary tables'
    # kernel, and every forward with a 2D mask the mask's: the decode steps, and the left-padded
    # prompt when it runs padded (packed in one row, it needs no mask)
    from moetorch.engine import cuda_graph

    monkeypatch.setattr(cuda_graph, "PACK_PADDED_PROMPTS", packs)
    called = []
    for name in ("rope_tables", "causal_mask"):
        original = getattr(triton_fused, name)
        monkeypatch.setattr(triton_fused, name, lambda *a, _f=original, _n=name: called.append(_n) or _f(*a))
    model = _tiny(arch)
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 5, "left", seed=3)
    with fused.forced():
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                       cache_implementation="static")
    assert called.count("rope_tables") == 3 and called.count("causal_mask") == (2 if packs else 3)


# ---- rotary -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,cos_batch", [(2, 2), (3, 1)])
def test_rope_kernel_matches_apply_rotary(dtype, B, cos_batch):
    T, H, G, d = 5, 4, 2, 16
    # projections are [B, T, heads*d], viewed as [B, heads, T, d] (what the models pass)
    q = torch.randn(B, T, H * d, generator=gen(1)).to(dtype).view(B, T, H, d).transpose(1, 2)
    k = torch.randn(B, T, G * d, generator=gen(2)).to(dtype).view(B, T, G, d).transpose(1, 2)
    ang = torch.randn(cos_batch, T, d // 2, generator=gen(3))
    emb = torch.cat((ang, ang), -1)
    cos, sin = (emb.cos() * 1.2).to(dtype), (emb.sin() * 1.2).to(dtype)
    with fused.forced():
        q2, k2 = apply_rotary_qk(q, k, cos, sin)
    want_q, want_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    # every product and sum is rounded where torch rounds it: bit-equal
    assert torch.equal(q2, want_q) and torch.equal(k2, want_k)
    assert q2.stride() == want_q.stride()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_kernel_one_side_and_grouped_queries(dtype):
    # q None: the keys alone; k None: the queries alone, optionally written in the grouped head
    # order of a tiled kv layout (ops.attention); the numbers are apply_rotary's, bit for bit
    B, T, H, G, d = 2, 5, 6, 3, 16
    q = torch.randn(B, T, H * d, generator=gen(1)).to(dtype).view(B, T, H, d).transpose(1, 2)
    k = torch.randn(B, T, 2 * G * d, generator=gen(2)).to(dtype)[..., : G * d].view(B, T, G, d).transpose(1, 2)
    ang = torch.randn(1, T, d // 2, generator=gen(3))
    cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
    want_q, want_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    with fused.forced():
        none_q, only_k = apply_rotary_qk(None, k, cos, sin)
        only_q, none_k = triton_fused.rope_qk(q, None, cos, sin)
        grouped, _ = triton_fused.rope_qk(q, None, cos, sin, q_groups=G)
        with pytest.raises(ValueError, match="q_groups must divide the 6 query heads"):
            triton_fused.rope_qk(q, None, cos, sin, q_groups=4)
        with pytest.raises(ValueError, match="queries and keys are both None"):
            triton_fused.rope_qk(None, None, cos, sin)
    assert none_q is None and none_k is None
    assert torch.equal(only_k, want_k) and torch.equal(only_q, want_q)
    # grouped position j = g * (H/G) + r holds head r * G + g (the head that reads kv head g)
    order = [r * G + g for g in range(G) for r in range(H // G)]
    assert torch.equal(grouped, want_q[:, order])
    assert grouped.transpose(1, 2).is_contiguous(), "[B, T, H, d] memory, as sdpa reads a projection"


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention_rotates_and_groups_tiled_queries(dtype):
    # a tiled kv layout (JetMoE) at prefill: one kernel rotates the queries into the grouped head
    # order, and the output comes back in the tiled order as [B, T, H, d] memory; the same numbers
    # as rotating first on the torch path
    B, T, H, G, d = 2, 7, 6, 3, 16
    q = torch.randn(B, T, H * d, generator=gen(1)).to(dtype).view(B, T, H, d).transpose(1, 2)
    k = torch.randn(B, G, T, d, generator=gen(2)).to(dtype)
    v = torch.randn(B, G, T, d, generator=gen(3)).to(dtype)
    ang = torch.randn(B, T, d // 2, generator=gen(4)) * 30
    cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
    with torch.no_grad():
        want, _ = attention(apply_rotary(q, cos, sin), k, v, None, True, d**-0.5, "sdpa", 0.0, "tiled")
        with fused.forced():
            got, _ = attention(q, k, v, None, True, d**-0.5, "sdpa", 0.0, "tiled", rope_q=(cos, sin))
    close(got, want, dtype, "fused rotate + group")
    assert got.is_contiguous()
    for h in range(H):  # head h reads kv head h % G
        ref = F.scaled_dot_product_attention(apply_rotary(q, cos, sin)[:, h : h + 1].float(), k[:, h % G : h % G + 1].float(),
                                             v[:, h % G : h % G + 1].float(), is_causal=True, scale=d**-0.5)
        close(got[:, :, h].float(), ref[:, 0], dtype, f"head {h}")


@pytest.mark.parametrize("B,T,H,G", [(2, 5, 6, 3), (1, 3, 32, 16), (3, 1, 4, 1)])
def test_tiled_heads_undoes_the_grouped_order(B, T, H, G):
    # grouped position j = g * R + r holds tiled head r * G + g; the kernel puts each back, from
    # any [B, T, H, d] view whose last dim is contiguous, into contiguous memory
    d = 8
    x = torch.randn(B, H, T, d, generator=gen(1)).transpose(1, 2)  # sdpa's head-major output
    R = H // G
    want = torch.stack([x[:, :, (h % G) * R + h // G] for h in range(H)], dim=2)
    with fused.forced():
        got = triton_fused.tiled_heads(x, G)
        with pytest.raises(ValueError, match="5 groups do not divide"):
            triton_fused.tiled_heads(x, 5)
    assert got.is_contiguous() and torch.equal(got, want)


def test_rope_qk_cache_keys_alone():
    # a static cache's update with no queries (JetMoE's attention rotates its own): the keys are
    # rotated into their slots and the values copied, as with queries
    B, T, H, G, d, S = 2, 3, 4, 2, 8, 6
    q = torch.randn(B, T, H * d, generator=gen(1)).view(B, T, H, d).transpose(1, 2)
    k = torch.randn(B, T, G * d, generator=gen(2)).view(B, T, G, d).transpose(1, 2)
    v = torch.randn(B, T, G * d, generator=gen(3)).view(B, T, G, d).transpose(1, 2)
    ang = torch.randn(1, T, d // 2, generator=gen(4))
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    slots = torch.tensor([1, 4, 2])
    caches = [(torch.zeros(B, G, S, d), torch.zeros(B, G, S, d)) for _ in range(2)]
    with fused.forced():
        assert triton_fused.rope_qk_cache(None, k, v, cos, sin, *caches[0], slots) is None
        triton_fused.rope_qk_cache(q, k, v, cos, sin, *caches[1], slots)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    assert torch.equal(caches[0][0][:, :, slots], apply_rotary(k, cos, sin))
    assert torch.equal(caches[0][1][:, :, slots], v)


# ---- decode attention -------------------------------------------------------------------------


def _reference_attention(q, k, v, mask, scale, layout):
    return attention(q, k, v, mask, False, scale, "eager", kv_layout=layout)[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,H,G", [("grouped", 8, 2), ("tiled", 6, 3), ("grouped", 4, 4), ("tiled", 4, 1)])
@pytest.mark.parametrize("S", [1, 37, 150])
def test_decode_attention_matches_eager(dtype, layout, H, G, S):
    B, d = 2, 16
    q = torch.randn(B, H, 1, d, generator=gen(1)).to(dtype)
    k = torch.randn(B, G, S, d, generator=gen(2)).to(dtype)
    v = torch.randn(B, G, S, d, generator=gen(3)).to(dtype)
    # a static cache whose first S-20 slots are filled, left padding on row 1, a sliding window
    seen = max(S - 20, 1)
    pad = torch.ones(B, S, dtype=torch.long)
    pad[1, : min(3, seen - 1)] = 0
    mask, _ = build_mask(pad, torch.tensor([seen - 1]), S, 100, B, queries_at_end=False)
    scale = d**-0.5
    want = _reference_attention(q, k, v, mask, scale, layout)
    with fused.forced(), torch.no_grad():
        out, w = attention(q, k, v, mask, False, scale, "sdpa", kv_layout=layout)
        out_all, _ = attention(q, k, v, None, False, scale, "sdpa", kv_layout=layout)
    assert w is None
    close(out, want, dtype, "masked decode attention")
    close(out_all, _reference_attention(q, k, v, None, scale, layout), dtype, "unmasked decode attention")


def test_decode_attention_splits_keys_and_reads_strided_cache():
    # Many keys over few (B*G) programs: the keys are split and the partial softmaxes combined.
    B, H, G, S, d = 1, 4, 2, 300, 128
    q = torch.randn(B, 1, H, d, generator=gen(1)).transpose(1, 2)  # [B, H, 1, d], strided
    cache = torch.randn(2, B, G, S + 5, d, generator=gen(2))
    k, v = cache[0, :, :, :S], cache[1, :, :, :S]
    mask = torch.rand(B, 1, 1, S, generator=gen(3)) > 0.3
    out = triton_fused.decode_attention(q, k, v, mask, 0.1, tiled=False)
    close(out, _reference_attention(q, k, v, mask, 0.1, "grouped"), torch.float32, "split decode attention")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,H,G,S,d", [("grouped", 8, 2, 37, 16), ("tiled", 6, 3, 150, 16),
                                           ("grouped", 4, 2, 300, 128)], ids=["grouped", "tiled", "split"])
def test_decode_attention_reads_keys_through_slot_rows(dtype, layout, H, G, S, d):
    # kv_rows (a beam-search cache's slot_rows): slot s of row b lies in row rows[b, s]. Oracle:
    # the keys and values copied into place slot by slot, then the eager path.
    B = 3
    q = torch.randn(B, H, 1, d, generator=gen(5)).to(dtype)
    k = torch.randn(B, G, S, d, generator=gen(6)).to(dtype)
    v = torch.randn(B, G, S, d, generator=gen(7)).to(dtype)
    rows = torch.randint(0, B, (B, S), generator=gen(8))
    k_own, v_own = torch.empty_like(k), torch.empty_like(v)
    for b in range(B):
        for s in range(S):
            k_own[b, :, s], v_own[b, :, s] = k[rows[b, s], :, s], v[rows[b, s], :, s]
    pad = torch.ones(B, S, dtype=torch.long)
    pad[2, :4] = 0
    mask, _ = build_mask(pad, torch.tensor([S - 6]), S, None, B, queries_at_end=False)
    scale = d**-0.5
    want = _reference_attention(q, k_own, v_own, mask, scale, layout)
    with fused.forced(), torch.no_grad():
        got, _ = attention(q, k, v, mask, False, scale, "sdpa", kv_layout=layout, kv_rows=rows)
        torch_path, _ = attention(q, k, v, mask, False, scale, "sdpa", kv_layout=layout, kv_rows=rows,
                                  need_weights=True)
        assert not torch.equal(got, attention(q, k, v, mask, False, scale, "sdpa", kv_layout=layout)[0])
        with pytest.raises(ValueError, match="kv_rows must be"):
            attention(q, k, v, mask, False, scale, "sdpa", kv_layout=layout, kv_rows=rows[:, :-1])
    close(got, want, dtype, "decode kernel through slot rows")
    assert torch.equal(torch_path, want)


def _decode_inputs(B, H, G, S, d, dtype, seed):
    """One query per row, a cache of S random keys and values, and an all-hidden mask to fill in."""
    q = torch.randn(B, H, 1, d, generator=gen(seed)).to(dtype)
    k = torch.randn(B, G, S, d, generator=gen(seed + 1)).to(dtype)
    v = torch.randn(B, G, S, d, generator=gen(seed + 2)).to(dtype)
    return q, k, v, torch.zeros(B, 1, 1, S, dtype=torch.bool)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [None, dict(BLOCK_N=16, num_warps=2, num_stages=3),
                                    dict(BLOCK_N=64, num_warps=4, num_stages=1)], ids=["default", "n16", "n64"])
def test_decode_attention_visible_span_inside_splits(dtype, config):
    # Visible keys in the middle only (a filled window of a static cache, left padding before it),
    # so whole splits and whole blocks inside the scanned span see no key; one row sees a single key.
    B, H, G, S, d = 2, 4, 2, 300, 32
    q, k, v, mask = _decode_inputs(B, H, G, S, d, dtype, seed=4)
    mask[0, ..., 70:75] = True
    mask[0, ..., 140:230] = True
    mask[1, ..., 299] = True
    with torch.no_grad():
        out = triton_fused.decode_attention(q, k, v, mask, d**-0.5, tiled=False, config=config)
    close(out, _reference_attention(q, k, v, mask, d**-0.5, "grouped"), dtype, "span decode attention")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [None, dict(BLOCK_N=16, num_warps=2, num_stages=2)], ids=["one-block", "two-blocks"])
def test_decode_attention_ignores_non_finite_hidden_slots(dtype, config):
    # A static cache's unwritten tail may hold anything: inf or nan there must not reach the
    # output. 100 slots over 4 splits of 32 keys: one block a split by default (mask, K and V load
    # together, the tail too), two blocks of 16 with the span pass (the tail never read).
    B, H, G, S, d = 1, 4, 2, 100, 32
    q, k, v, mask = _decode_inputs(B, H, G, S, d, dtype, seed=7)
    mask[..., :60] = True
    mask[..., 10:15] = False
    want = _reference_attention(q, k, v, mask, d**-0.5, "grouped")
    k[:, :, 60:], v[:, :, 60:] = float("nan"), float("inf")
    with torch.no_grad():
        out = triton_fused.decode_attention(q, k, v, mask, d**-0.5, tiled=False, config=config)
    assert torch.isfinite(out).all()
    close(out, want, dtype, "decode attention with non-finite hidden slots")


@pytest.mark.parametrize("combine_splits", [16, 0], ids=["blocked", "one-step"])
@pytest.mark.parametrize("layout,H,G", [("grouped", 8, 2), ("tiled", 4, 2)])
def test_decode_attention_combines_many_splits(monkeypatch, combine_splits, layout, H, G):
    # A long cache over few rows: 37 key splits, more than the combine sums in one step (16) and
    # not a multiple of it; some splits see no key. Partials are kept for the R real heads only.
    monkeypatch.setattr(triton_fused, "DECODE_PROGRAMS_PER_SM", 64)
    monkeypatch.setattr(triton_fused, "DECODE_COMBINE_SPLITS", combine_splits)
    B, S, d = 1, 37 * 32 - 5, 32
    q, k, v, mask = _decode_inputs(B, H, G, S, d, torch.float32, seed=11)
    mask[...] = torch.rand(B, 1, 1, S, generator=gen(12)) > 0.4
    mask[..., 200:330] = False
    with torch.no_grad():
        out = triton_fused.decode_attention(q, k, v, mask, d**-0.5, tiled=layout == "tiled")
    close(out, _reference_attention(q, k, v, mask, d**-0.5, layout), torch.float32, "many-split decode attention")


@pytest.mark.parametrize("interleaved", [1, 0], ids=["interleaved", "contiguous"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_short_span_far_into_long_rows(monkeypatch, interleaved, dtype):
    # A batch row's few keys far into its slots (a long paged row): 19 splits of 3 blocks of 16
    # keys, each split reading every 19th block (interleaved) or a run of 3; the rows' spans start
    # and end inside blocks, one spans 25 blocks (splits whose first and last blocks lie apart),
    # one is a single key, and the slots around the spans hold inf and nan, which must not reach
    # the output.
    monkeypatch.setattr(triton_fused, "DECODE_PROGRAMS_PER_SM", 64)
    monkeypatch.setattr(triton_fused, "DECODE_MIN_SPLIT_KEYS", 48)
    monkeypatch.setattr(triton_fused, "DECODE_INTERLEAVED_SPLITS", interleaved)
    B, H, G, S, d = 3, 4, 2, 19 * 3 * 16 - 7, 32
    q, k, v, mask = _decode_inputs(B, H, G, S, d, dtype, seed=21)
    for b, (lo, hi) in enumerate([(613, 700), (5, 400), (S - 1, S)]):  # row 1: 2 blocks a split
        mask[b, ..., lo:hi] = True
    mask[0, ..., 640:645] = False  # a hole inside a span
    want = _reference_attention(q, k, v, mask, d**-0.5, "grouped")
    hidden = ~mask[:, 0, 0]
    for t in (k, v):
        t.masked_fill_(hidden[:, None, :, None] & (torch.arange(S) % 2 == 0)[None, None, :, None], float("nan"))
        t.masked_fill_(hidden[:, None, :, None] & (torch.arange(S) % 2 == 1)[None, None, :, None], float("inf"))
    k[0, :, 640:645], v[0, :, 640:645] = 0.5, -2.0  # a hole holds finite stale keys: read, hidden by the mask
    with torch.no_grad():
        out = triton_fused.decode_attention(q, k, v, mask, d**-0.5, tiled=False,
                                            config=dict(BLOCK_N=16, num_warps=2, num_stages=2))
    assert torch.isfinite(out).all()
    close(out, want, dtype, "decode attention over a short span far into long rows")


def test_decode_attention_config():
    # 32 keys per step; 2 warps once batch x kv heads gives every SM a program
    assert triton_fused.decode_attn_config(128, 1024, 132) == dict(BLOCK_N=32, num_warps=2, num_stages=2)
    assert triton_fused.decode_attn_config(128, 16, 132)["num_warps"] == 4
    assert triton_fused.decode_attn_config(512, 16, 132)["BLOCK_N"] == 16


def test_decode_attention_register_cap(monkeypatch):
    # Registers capped where 2-warp programs fill the SMs 7 or 8 deep (JetMoE's 1024 at batch 64 on
    # 132 SMs), so that one wave holds them; not where 6 or fewer, or more than 8, a program, nor for
    # 4 warps, nor with the cap set to 0
    cap = triton_fused.decode_attn_maxnreg
    assert cap(1024, 2, 132) == 128 and cap(8 * 132, 2, 132) == 128 and cap(6 * 132 + 1, 2, 132) == 128
    assert cap(6 * 132, 2, 132) is None and cap(512, 2, 132) is None and cap(8 * 132 + 1, 2, 132) is None
    assert cap(1024, 4, 132) is None and cap(4096, 2, 132) is None
    monkeypatch.setattr(triton_fused, "DECODE_WAVE_MAXNREG", 0)
    assert cap(1024, 2, 132) is None
    monkeypatch.undo()
    # the capped launch computes what the eager path does (the interpreter's 4 "SMs": 28 programs)
    B, H, G, S, d = 14, 4, 2, 40, 16
    assert cap(B * G, triton_fused.decode_attn_config(d, B * G, 4)["num_warps"], 4) == 128
    q, k, v, mask = _decode_inputs(B, H, G, S, d, torch.float32, seed=9)
    mask[..., : S - 3] = True
    with torch.no_grad():
        out = triton_fused.decode_attention(q, k, v, mask, d**-0.5, tiled=True)
    close(out, _reference_attention(q, k, v, mask, d**-0.5, "tiled"), torch.float32, "capped decode attention")


# ---- whole models -----------------------------------------------------------------------------


def _tiny(arch, **overrides):
    torch.manual_seed(0)
    model = arch.ours["causal_lm"](arch.our_config(**overrides)).eval()
    randomize_(model, 3)
    return model


@pytest.mark.parametrize("arch", [PHIMOE, JETMOE], ids=["phimoe", "jetmoe"])
def test_fused_forward_matches_torch_path(arch):
    model = _tiny(arch)
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 9, "left", seed=5)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        with fused.forced():
            got = model(ids, attention_mask=mask).logits
    close(got, want, torch.float32, "prefill logits")


@pytest.mark.parametrize("arch", [PHIMOE, JETMOE], ids=["phimoe", "jetmoe"])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_fused_decode_gives_the_same_tokens(arch, cache_kind):
    model = _tiny(arch)
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 6, "left", seed=7)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                  output_scores=True, return_dict_in_generate=True)
    if cache_kind == "static":
        kwargs["cache_implementation"] = "static"
    want = model.generate(ids, **kwargs)
    with fused.forced():
        got = model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        close(a, b, torch.float32, "decode scores")


def _triton_experts_and_residual_deltas(arch, monkeypatch):
    """A tiny model whose expert layers take the triton backend, and the list that each fused
    residual add's delta rank (minus its input's) will be appended to: 1 where a MoE output arrives
    with its K axis, None where there is no delta."""
    model = _tiny(arch)
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = "triton"
    deltas = []
    launch = triton_fused._add_norm_launch
    monkeypatch.setattr(triton_fused, "_add_norm_launch",
                        lambda x, a, *r: deltas.append(None if a is None else a.dim() - x.dim()) or launch(x, a, *r))
    return model, deltas


@pytest.mark.parametrize("arch", [PHIMOE, JETMOE], ids=["phimoe", "jetmoe"])
def test_triton_experts_leave_their_sum_to_the_next_norm(arch, monkeypatch):
    # A prefill big enough for the experts' sorted path: each MoE output reaches the following
    # residual add with its K axis (no sum kernel of its own), and logits and hidden states match
    # the torch path's.
    model, deltas = _triton_experts_and_residual_deltas(arch, monkeypatch)
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 20, "left", seed=11)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, output_hidden_states=True)
        with fused.forced():
            got = model(ids, attention_mask=mask, output_hidden_states=True)
            deltas_with_states = list(deltas)
            deltas.clear()
            logits = model(ids, attention_mask=mask).logits
    close(got.logits, want.logits, torch.float32, "prefill logits")
    close(logits, want.logits, torch.float32, "prefill logits without hidden states")
    for i, (a, b) in enumerate(zip(got.hidden_states, want.hidden_states, strict=True)):
        close(a, b, torch.float32, f"hidden state {i}")
    assert 1 in deltas, "an expert axis reached the residual add"
    assert 1 in deltas_with_states


@pytest.mark.parametrize("arch", [PHIMOE, JETMOE], ids=["phimoe", "jetmoe"])
def test_small_expert_kernel_split_by_expert_leaves_its_sum_to_the_next_norm(arch, monkeypatch):
    # Decode sizes (the alignment-free expert kernel) with every expert GEMM split by expert
    # (SPLIT_E): the down and reduce outputs reach the next residual add with their K axis, and the
    # logits match the torch path's.
    from moetorch.ops import triton_moe

    model, deltas = _triton_experts_and_residual_deltas(arch, monkeypatch)
    tuned = triton_moe.get_config
    monkeypatch.setattr(triton_moe, "get_config", lambda *a, **kw: {**tuned(*a, **kw), "SPLIT_K": 2, "SPLIT_E": True})
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 3, "left", seed=12)
    assert ids.numel() * model.config.num_experts_per_tok <= triton_moe.SMALL_MAX_ROWS
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        with fused.forced():
            got = model(ids, attention_mask=mask).logits
    close(got, want, torch.float32, "logits, experts split by expert")
    assert 1 in deltas, "no expert axis reached the residual add"


def test_fused_graphed_step_fallback_matches_dynamic_decode():
    model = _tiny(PHIMOE, sliding_window=4)
    B, P = 2, 5
    ids = torch.randint(1, 97, (B, P), generator=gen(9))
    with torch.no_grad():
        ref_cache = DynamicCache()
        model(ids, past_key_values=ref_cache, use_cache=True)
        cache = StaticCache(model.config, max_cache_len=P + 4)
        model(ids, past_key_values=cache, use_cache=True)
        step = GraphedDecodeStep(model, cache, B)
        tok = ids[:, -1:]
        for t in range(3):
            want = model(tok, past_key_values=ref_cache, use_cache=True).logits[:, -1]
            with fused.forced():
                got = step(tok, None, torch.full((B, 1), P + t), torch.tensor([P + t]))
            close(got, want, torch.float32, f"graphed-step fallback, step {t}")
            tok = want.argmax(-1, keepdim=True)


@pytest.mark.parametrize("arch,expected", [
    (PHIMOE, {"add_norm", "add_norm_route", "linear_small", "rope_qk_cache", "decode_attention"}),
    (JETMOE, {"add_norm", "add_norm_route", "linear_small", "rope_qk_cache", "decode_attention"}),
], ids=["phimoe", "jetmoe"])
def test_inference_decode_runs_every_fused_kernel(arch, expected, monkeypatch):
    # The models must take the fused path when it is on (a silent fallback would go unnoticed:
    # both paths give the same numbers), and must not take it when gradients are needed.
    called = set()
    for name in expected:
        original = getattr(triton_fused, name)
        monkeypatch.setattr(triton_fused, name, lambda *a, _f=original, _n=name, **k: called.add(_n) or _f(*a, **k))
    model = _tiny(arch)
    ids = torch.randint(1, 97, (2, 5), generator=gen(4))
    with fused.forced():
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, cache_implementation="static")
        assert called == expected
        called.clear()
        model(ids, labels=ids).loss.backward()
    assert not called


@pytest.mark.parametrize("dtype", DTYPES)
def test_static_cache_write_kernel(dtype):
    B, G, T, d, S = 2, 3, 4, 16, 12
    k = torch.randn(B, T, G, d, generator=gen(1)).to(dtype).transpose(1, 2)  # strided, as the models pass
    v = torch.randn(B, G, T, d, generator=gen(2)).to(dtype)
    pos = torch.tensor([5, 6, 7, 8])
    want_k, want_v = torch.zeros(B, G, S, d, dtype=dtype), torch.zeros(B, G, S, d, dtype=dtype)
    want_k.index_copy_(2, pos, k)
    want_v.index_copy_(2, pos, v)
    got_k, got_v = torch.zeros_like(want_k), torch.zeros_like(want_v)
    triton_fused.kv_write(k, v, got_k, got_v, pos)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cache_cls", [StaticCache, DynamicCache])
def test_update_rotated_matches_rotary_then_update(dtype, cache_cls):
    # Strided q/k/v as the models pass them; the static cache rotates keys straight into their slots.
    B, H, G, T, d = 2, 4, 2, 3, 16
    q = torch.randn(B, T, H, d, generator=gen(1)).to(dtype).transpose(1, 2)
    k = torch.randn(B, T, G, d, generator=gen(2)).to(dtype).transpose(1, 2)
    v = torch.randn(B, T, G, d, generator=gen(3)).to(dtype).transpose(1, 2)
    ang = torch.randn(B, T, d // 2, generator=gen(4)) * 50
    cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
    kwargs = {"cache_position": torch.tensor([4, 5, 6])}

    def make():
        cache = cache_cls(num_layers=2, max_cache_len=9) if cache_cls is StaticCache else cache_cls()
        cache.update(torch.zeros(B, G, 4, d, dtype=dtype), torch.zeros(B, G, 4, d, dtype=dtype), 0)
        return cache

    want_cache = make()
    want_q, want_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    want_k, want_v = want_cache.update(want_k, v, 0, kwargs)
    got_cache = make()
    with fused.forced(), torch.no_grad():
        got_q, got_k, got_v = got_cache.update_rotated(q, k, v, cos, sin, 0, kwargs)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    assert got_cache.get_seq_length() == want_cache.get_seq_length() == 7


def test_rope_qk_cache_rejects_a_cache_with_strided_head_dim():
    q = torch.randn(1, 2, 1, 8)
    k = v = torch.randn(1, 1, 1, 8)
    cos = sin = torch.ones(1, 1, 8)
    cache = torch.zeros(1, 1, 8, 4).transpose(2, 3)  # [B, G, S, d] with d not contiguous
    with pytest.raises(ValueError, match="last dim is contiguous"):
        triton_fused.rope_qk_cache(q, k, v, cos, sin, cache, torch.zeros(1, 1, 4, 8), torch.tensor([0]))


def test_float64_and_mixed_dtypes_take_the_torch_path():
    model = _tiny(PHIMOE).double()
    ids = torch.randint(1, 97, (2, 5), generator=gen(6))
    with torch.no_grad():
        want = model(ids).logits
        with fused.forced():
            got = model(ids).logits  # no kernel supports float64: the torch code runs, unchanged
    assert torch.equal(got, want)
    norm = LayerNorm(16)  # float32 weights, bfloat16 input: torch promotes, so no fused kernel
    with fused.forced(), torch.no_grad():
        assert not fused.active(torch.ones(2, 16, dtype=torch.bfloat16), norm.weight)
    with pytest.raises(TypeError, match="float64"):
        triton_fused.round_code(torch.float64)


def test_active_rules():
    bf = torch.ones(2, 16, dtype=torch.bfloat16)
    w = torch.ones(16, dtype=torch.bfloat16, requires_grad=True)
    with fused.forced():
        assert fused.active(bf, None, bf.clone())  # None entries are skipped
        assert not fused.active(bf, bf.float())  # mixed dtypes: torch would promote
        assert not fused.active(bf.double(), bf.double())  # no kernel computes in float64
        assert not fused.active(bf, w)  # autograd records: the torch code
        with torch.no_grad():
            assert fused.active(bf, w)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert not fused.active(bf, w)
    with torch.no_grad():
        assert not fused.active(bf, w)  # a CPU tensor, not forced


@pytest.mark.parametrize("affine,bias", [(False, False), (True, False)])
def test_layernorm_without_weight_or_bias(affine, bias):
    # nn.LayerNorm's optional parameters: the fused path must normalise exactly as torch does
    norm = LayerNorm(24, elementwise_affine=affine, bias=bias)
    x, a = torch.randn(4, 24, generator=gen(1)), torch.randn(4, 24, generator=gen(2))
    with torch.no_grad():
        want_s = x + a
        want = F.layer_norm(want_s, (24,), norm.weight, norm.bias, norm.eps)
        with fused.forced():
            s, h = norm.add_norm(x, a)
    assert torch.equal(s, want_s)
    close(h, want, torch.float32, "layernorm without affine parameters")
