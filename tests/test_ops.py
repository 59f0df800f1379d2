"""The ops behind the models, each against a direct formula or its reference backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moetorch.ops import moe
from moetorch.ops.attention import attention, build_mask
from moetorch.ops.moe import EXPERT_BACKENDS, experts_forward, experts_reference
from moetorch.ops.norms import Residual
from moetorch.ops.routing import sparsemixer, switch_aux_loss, topk_softmax


def test_sparsemixer_eval_semantics():
    """Hand-worked case: expert 1 is the argmax with weight = softmax over logits within the
    relative threshold; expert 2 repeats with expert 1 masked (threshold from the original scores)."""
    scores = torch.tensor([[2.0, 1.9, -1.0, 0.5]])
    eps = 0.05  # keep logits with (max - s) / max(|s|, max) <= 0.1
    w, ids = sparsemixer(scores, eps, training=False)
    assert ids.tolist() == [[0, 1]]
    # first: 1.9 is within (2.0-1.9)/2.0 = 0.05 <= 0.1 -> softmax over {2.0, 1.9}
    p0 = torch.softmax(torch.tensor([2.0, 1.9]), 0)[0]
    # second: max 1.9 among the rest; 0.5 is (1.9-0.5)/1.9 > 0.1 away -> only 1.9 -> weight 1
    torch.testing.assert_close(w, torch.stack([p0, torch.tensor(1.0)])[None])


def test_sparsemixer_ties_pick_the_first_index():
    w, ids = sparsemixer(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), 0.01, training=False)
    assert ids.tolist() == [[1, 2]]


def test_sparsemixer_backward_is_the_softmax_gradient_of_the_selected_gate():
    torch.manual_seed(0)
    scores = torch.randn(16, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    w, ids = sparsemixer(scores, 0.5, training=True)
    g = torch.randn_like(w)
    (w * g).sum().backward()
    # Direct formula: for each of the two picks, the gate is p_sel = softmax(masked scores)[sel];
    # the estimator's gradient is g * p_sel * (onehot(sel) - p), whatever the midpoint scale.
    expected = torch.zeros_like(scores)
    s = scores.detach()
    masked = s.clone()
    for k in range(2):
        top = masked.max(-1, keepdim=True).values
        keep = ((top - s) / s.abs().clamp(min=top)) <= 1.0
        p = torch.softmax(masked.masked_fill(~keep, float("-inf")), -1)
        sel = ids[:, k : k + 1]
        p_sel = p.gather(-1, sel)
        expected += g[:, k : k + 1] * p_sel * (F.one_hot(sel[:, 0], 6).double() - p)
        masked = s.scatter(-1, sel, float("-inf"))
    torch.testing.assert_close(scores.grad, expected)


def test_sparsemixer_training_scales_by_the_midpoint_mask():
    torch.manual_seed(2)
    scores = torch.randn(2000, 4)
    w, ids = sparsemixer(scores, 0.5, training=True)
    _, eval_ids = sparsemixer(scores, 0.5, training=False)
    ratio = w[:, 0] / torch.softmax(scores.masked_fill(
        ((scores.max(-1, keepdim=True).values - scores) / scores.abs().clamp(min=scores.max(-1, keepdim=True).values)) > 1.0,
        float("-inf")), -1).gather(-1, ids[:, :1])[:, 0]
    # every weight is the gate times 1 or ~1/3
    assert torch.all(((ratio - 1).abs() < 1e-4) | ((ratio - 0.3333).abs() < 1e-4))
    # sampled experts differ from argmax sometimes, but most often agree
    agree = (ids[:, 0] == eval_ids[:, 0]).float().mean()
    assert 0.3 < agree < 1.0


def test_topk_softmax():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.0]], dtype=torch.bfloat16)
    w, ids = topk_softmax(logits, 2)
    assert ids.tolist() == [[1, 3]] and w.dtype == torch.float32
    torch.testing.assert_close(w, torch.softmax(torch.tensor([[2.0, 1.0]]), -1))


def test_switch_aux_loss_direct_formula():
    torch.manual_seed(3)
    logits = (torch.randn(10, 5), torch.randn(10, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = switch_aux_loss(logits, 5, 2, mask)
    valid = mask.reshape(-1).bool()
    frac, prob = torch.zeros(5), torch.zeros(5)
    for x in logits:
        p = torch.softmax(x[valid], -1)
        frac += F.one_hot(p.topk(2).indices, 5).sum((0, 1)).float()
        prob += p.sum(0)
    n = 2 * valid.sum()
    torch.testing.assert_close(got, 5 * ((frac / n) * (prob / n)).sum())


def routing_cases(T, E, K, gen):
    yield "random", torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    yield "one_hot_expert", torch.stack([torch.tensor([1] + [(1 + j) % E for j in range(1, K)]) for _ in range(T)])
    yield "empty_experts", torch.randint(0, 2, (T, K), generator=gen) * (E - 1)


# torch._grouped_mm runs bf16 on CUDA only; on CPU it is checked in float32.
BACKEND_DTYPES = [("gather", torch.float32), ("gather", torch.bfloat16), ("grouped_mm", torch.float32)]
# "triton" runs under the Triton CPU interpreter in tests/test_triton_moe.py.
assert {b for b, _ in BACKEND_DTYPES} == set(EXPERT_BACKENDS) - {"reference", "triton"}


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES, ids=[f"{b}-{str(d)[6:]}" for b, d in BACKEND_DTYPES])
@pytest.mark.parametrize("T", [1, 5, 33])
def test_expert_backends_match_reference(backend, T, dtype):
    gen = torch.Generator().manual_seed(T)
    E, K, D, I = 6, 2, 16, 12
    x = torch.randn(T, D, generator=gen).to(dtype)
    w13 = (torch.randn(E, 2 * I, D, generator=gen) * 0.3).to(dtype)
    w2 = (torch.randn(E, D, I, generator=gen) * 0.3).to(dtype)
    weights = torch.rand(T, K, generator=gen).to(dtype)
    for name, ids in routing_cases(T, E, K, gen):
        ref = experts_reference(x.float(), w13.float(), w2.float(), ids, weights.float(), F.silu)
        got = experts_forward(x, w13, w2, ids, weights, F.silu, backend=backend)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol, msg=f"{backend} {name}")


@pytest.mark.parametrize("T", [1, 40, 200])  # one expert's rows under and over ADD_ROWS_PUT_MAX
def test_reference_row_adds_match_index_add(T, monkeypatch):
    """The reference loops add an expert's rows with `index_put_` on the CPU up to ADD_ROWS_PUT_MAX
    rows (torch's CPU `index_add_` opens a parallel region even for one row): the same bits as
    `index_add_` for the output and the gradients, on both sides of the bound."""
    gen = torch.Generator().manual_seed(T)
    E, K, D, I = 4, 2, 16, 12
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    inputs = [torch.randn(T, D, generator=gen), torch.randn(E, 2 * I, D, generator=gen) * 0.3,
              torch.randn(E, D, I, generator=gen) * 0.3, torch.rand(T, K, generator=gen),
              torch.randn(T, K, I, generator=gen), torch.randn(E, D, I, generator=gen) * 0.3]

    def run():
        x, w13, w2, wts, h, w_red = (t.clone().requires_grad_() for t in inputs)
        y = experts_reference(x, w13, w2, ids, wts, F.silu) + moe.expert_reduce_reference(h, w_red, ids, wts)
        y.pow(2).sum().backward()
        return [y.detach()] + [t.grad for t in (x, w13, w2, wts, h, w_red)]

    got = run()
    monkeypatch.setattr(moe, "ADD_ROWS_PUT_MAX", -1)  # index_add_ everywhere
    want = run()
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_unknown_expert_backend():
    with pytest.raises(ValueError, match="unknown expert backend"):
        experts_forward(torch.zeros(1, 2), torch.zeros(1, 2, 2), torch.zeros(1, 2, 1), torch.zeros(1, 1, dtype=torch.long),
                        torch.ones(1, 1), F.silu, backend="magic")


@pytest.mark.parametrize("kv_layout", ["grouped", "tiled"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attention_head_mapping(kv_layout, impl):
    """Query head i reads kv head i // (H/G) (grouped) or i % G (tiled); checked per head."""
    torch.manual_seed(4)
    B, H, G, T, d = 2, 6, 3, 5, 4
    q, k, v = torch.randn(B, H, T, d), torch.randn(B, G, T, d), torch.randn(B, G, T, d)
    out, _ = attention(q, k, v, None, True, 0.5, impl, kv_layout=kv_layout)
    for h in range(H):
        g = h // (H // G) if kv_layout == "grouped" else h % G
        ref = F.scaled_dot_product_attention(q[:, h : h + 1], k[:, g : g + 1], v[:, g : g + 1], is_causal=True, scale=0.5)
        torch.testing.assert_close(out[:, :, h], ref[:, 0], msg=f"head {h}")


@pytest.mark.parametrize("kv_layout", ["grouped", "tiled"])
@pytest.mark.parametrize("served", [True, False])
def test_masked_grouped_heads_with_and_without_enable_gqa(monkeypatch, kv_layout, served):
    """A masked sdpa call with fewer kv heads passes enable_gqa where a fused kernel serves it
    (`masked_gqa_served`), else repeats the kv heads itself: either way each query head attends
    to its own kv head under the mask, forward and backward (per-head float64 references)."""
    from moetorch.ops import attention as attention_ops

    assert attention_ops.masked_gqa_served(*(torch.zeros(1, 2, 3, 4) for _ in range(3)),
                                           torch.ones(1, 1, 3, 3, dtype=torch.bool), 0.0)  # off CUDA: sdpa's own
    monkeypatch.setattr(attention_ops, "masked_gqa_served", lambda *a: served)
    torch.manual_seed(5)
    B, H, G, T, d = 2, 8, 2, 7, 4
    q, k, v = (torch.randn(B, h, T, d, requires_grad=True) for h in (H, G, G))
    mask = (torch.rand(B, 1, T, T) < 0.6) | torch.eye(T, dtype=torch.bool)
    out, _ = attention(q, k, v, mask, False, 0.5, "sdpa", kv_layout=kv_layout)
    grad = torch.randn_like(out)
    out.backward(grad)
    refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    for h in range(H):
        g = h // (H // G) if kv_layout == "grouped" else h % G
        ref = F.scaled_dot_product_attention(refs[0][:, h : h + 1], refs[1][:, g : g + 1], refs[2][:, g : g + 1],
                                             attn_mask=mask, scale=0.5)
        torch.testing.assert_close(out[:, :, h].detach(), ref[:, 0].float(), msg=f"head {h}")
        ref[:, 0].backward(grad[:, :, h].double())
    for name, t, r in zip("qkv", (q, k, v), refs):
        torch.testing.assert_close(t.grad, r.grad.float(), msg=f"d{name}")


def test_build_mask_padding_window_and_static_slots():
    am = torch.tensor([[0, 1, 1, 1]])
    mask, causal = build_mask(am, torch.arange(4), 4, 2, 1)
    expected = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert not causal and torch.equal(mask[0, 0], expected)
    # static cache: 6 slots, query at slot 2 sees slots 0..2 only
    mask, _ = build_mask(None, torch.tensor([2]), 6, None, 1, queries_at_end=False)
    assert mask[0, 0, 0].tolist() == [True, True, True, False, False, False]
    assert build_mask(None, torch.arange(3), 3, None, 2) == (None, True)
    assert build_mask(None, torch.tensor([5]), 6, None, 2) == (None, False)


@pytest.mark.parametrize("backend", ["gather", "grouped_mm"])
def test_moa_map_and_reduce_forward_match_reference(backend):
    """Forward of JetMoE's attention-expert map/reduce (grouped_mm runs forward-only on CPU, fp32)."""
    from moetorch.ops.moe import expert_map, expert_reduce

    g = torch.Generator().manual_seed(5)
    T, K, E, D, C = 9, 2, 4, 16, 24
    x, h = torch.randn(T, D, generator=g), torch.randn(T, K, C, generator=g)
    w_map, w_red = torch.randn(E, C, D, generator=g), torch.randn(E, D, C, generator=g)
    gates = torch.rand(T, K, generator=g)
    for ids in (torch.randint(0, E, (T, K), generator=g), torch.full((T, K), E - 1)):
        torch.testing.assert_close(expert_map(x, w_map, ids, backend), expert_map(x, w_map, ids, "reference"))
        torch.testing.assert_close(
            expert_reduce(h, w_red, ids, gates, backend), expert_reduce(h, w_red, ids, gates, "reference")
        )


def test_residual_leaving_adds_now_only_where_fsdp2_frees_the_bias(monkeypatch):
    """A layer sharded by FSDP2 loses its unsharded parameters as its forward returns, so a bias
    left pending for the next norm would be freed memory: `Residual.leaving` adds it at once
    there, with the same sum as the deferred add, and leaves it pending everywhere else."""
    import torch.distributed.fsdp as fsdp

    x, delta, bias = torch.randn(2, 3, 8), torch.randn(2, 3, 2, 8), torch.randn(8)
    pending = Residual.leaving(torch.nn.Linear(2, 2), x, delta, bias)
    assert pending.delta is delta and pending.bias is bias
    monkeypatch.setattr(fsdp, "FSDPModule", torch.nn.Linear)  # stands for a module fully_shard wrapped
    settled = Residual.leaving(torch.nn.Linear(2, 2), x, delta, bias)
    assert settled.delta is None and settled.bias is None
    assert torch.equal(settled.x, pending.value())
    no_bias = Residual.leaving(torch.nn.Linear(2, 2), x, delta)  # nothing freed to keep: stays pending
    assert no_bias.delta is delta


@pytest.mark.parametrize("backend", ["reference", "gather"])
def test_experts_under_autocast_sum_in_the_residual_dtype(backend):
    """Under bf16 autocast the experts' products are bf16 (as autocast makes a matmul's), and the
    routing-weighted sum is float32, the activations' dtype, as Transformers sums it: the result is
    that float32 sum, not a bf16 rounding of it. Also for JetMoE's attention-expert reduce."""
    from moetorch.ops.moe import expert_reduce

    g = torch.Generator().manual_seed(3)
    T, K, E, D, I = 17, 2, 4, 16, 8
    x = torch.randn(T, D, generator=g)
    w13, w2 = torch.randn(E, 2 * I, D, generator=g) * 0.3, torch.randn(E, D, I, generator=g) * 0.3
    weights, ids = torch.rand(T, K, generator=g), torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    want = torch.zeros(T, D)
    for t in range(T):
        for k in range(K):
            e = ids[t, k]
            h = x[t].bfloat16() @ w13[e].bfloat16().T
            y = (F.silu(h[:I]) * h[I:]) @ w2[e].bfloat16().T
            want[t] += y.float() * weights[t, k]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = experts_forward(x, w13, w2, ids, weights, F.silu, backend=backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    h_TKC, w_red = torch.randn(T, K, I, generator=g).bfloat16(), torch.randn(E, D, I, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = expert_reduce(h_TKC, w_red, ids, weights, backend)
    want = sum((h_TKC[:, k].unsqueeze(1) @ w_red[ids[:, k]].bfloat16().transpose(1, 2)).squeeze(1).float()
               * weights[:, k, None] for k in range(K))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_grouped_mm_sums_in_the_dtype_it_is_given():
    """grouped_mm (bf16 on CUDA only) combines its sorted rows in the residual's dtype: float32 sums
    of bf16 rows, as the other backends under autocast."""
    from moetorch.ops.moe import _combine_sorted

    T, K, D = 5, 2, 3
    rows = torch.tensor([1.0, 2.0 ** -9]).repeat(T * K // 2)[:, None].expand(T * K, D).bfloat16()
    got = _combine_sorted(rows, torch.arange(T * K), torch.ones(T, K), T, K, torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, torch.full((T, D), 1 + 2.0 ** -9))
