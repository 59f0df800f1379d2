"""`moetorch.layer_bench` (one MoE layer per token count against its floors, which `moetorch bench`
and bench/moe_layer.py report) on CPU: the timers are stand-ins, everything else runs, the triton
backend under the interpreter."""

from __future__ import annotations

import pytest
import torch

from moetorch import benchmark, layer_bench
from moetorch.ops.moe import experts_forward

# As in test_triton_moe: padding rows of the padded sorted layout hold uninitialised values that the
# grouped GEMMs multiply but never store; numpy (the interpreter) warns about the NaNs among them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

TINY = {
    "tiny_mlp": dict(kind="experts", E=4, D=32, I=16, router="sparsemixer"),
    "tiny_moa": dict(kind="moa", E=4, D=32, C=16, router="topk"),
}
CEIL = {"copy_bytes_per_s": 4e12, "bf16_flops_per_s": 8e14, "bf16_flops_per_s_sustained": 6.5e14}


@pytest.fixture
def fake_timers(monkeypatch):
    """Each timer runs its function once (so a broken layer still fails) and reports fixed times:
    eager 2 ms, graph 1 ms."""
    calls = []

    def eager(fn, *a, **k):
        fn()
        calls.append("eager")
        return 2.0

    def graph(fn, *a, **k):
        fn()
        calls.append("graph")
        return 1.0

    monkeypatch.setattr(layer_bench, "median_ms", eager)
    monkeypatch.setattr(layer_bench, "graph_ms", graph)
    return calls


def test_measure_rows_floors_and_chain(fake_timers, monkeypatch):
    # the layers run as inference runs them: no autograd graph (the norm's weights are parameters,
    # and a layer that needs gradients takes the unfused path)
    grad_modes = []
    run_layer = layer_bench.run_layer
    monkeypatch.setattr(layer_bench, "run_layer",
                        lambda *a, **k: grad_modes.append(torch.is_grad_enabled()) or run_layer(*a, **k))
    lines = []
    rows = layer_bench.measure(TINY, [3, 70], ("triton", "gather"), CEIL, chain=2, log=lines.append, device="cpu")
    # gather runs up to GATHER_MAX_T tokens only
    assert [(r["layer"], r["T"], r["backend"]) for r in rows] == [
        ("tiny_mlp", 3, "triton"), ("tiny_mlp", 3, "gather"), ("tiny_mlp", 70, "triton"),
        ("tiny_moa", 3, "triton"), ("tiny_moa", 3, "gather"), ("tiny_moa", 70, "triton"),
    ]
    for r in rows:
        spec = TINY[r["layer"]]
        T, D, E = r["T"], spec["D"], spec["E"]
        assert 1 <= r["experts_touched"] <= E
        if spec["kind"] == "experts":
            per_expert, act = 3 * spec["I"] * D * 2, 2 * T * D * 2
            flops = 2 * T * 2 * 3 * D * spec["I"] + 2 * T * D * E
            act += T * D * 2 * 4  # the norm reads x and the delta, writes the sum and the normed rows
        else:
            per_expert, act = 2 * spec["C"] * D * 2, 2 * T * D * 2 + 2 * T * 2 * spec["C"] * 2
            flops = 2 * T * 2 * 2 * D * spec["C"] + 2 * T * D * E
            act += T * D * 2  # no delta: the norm reads x only
        assert r["bytes"] == r["experts_touched"] * per_expert + E * D * 2 + act
        assert r["flops"] == flops
        assert r["memory_floor_ms"] == pytest.approx(r["bytes"] / CEIL["copy_bytes_per_s"] * 1e3)
        assert r["compute_floor_sustained_ms"] == pytest.approx(flops / CEIL["bf16_flops_per_s_sustained"] * 1e3)
        assert r["eager_ms"] == 2.0 and r["graph_ms"] == 1.0
        assert r["pct_memory_floor"] == pytest.approx(100 * r["memory_floor_ms"])  # against the graph's 1 ms
        # the chain: triton only, one replay of both layers, floors summed per layer on each one's input
        if r["backend"] == "triton":
            assert r["chain_layers"] == 2 and r["chain_ms_per_layer"] == 0.5
            assert len(r["chain_experts_touched"]) == 2
            assert r["pct_memory_floor_chain"] == pytest.approx(100 * r["chain_memory_floor_ms"] / 0.5)
        else:
            assert "chain_layers" not in r
    assert any("in a chain" in line for line in lines)
    assert not any("nan" in line for line in lines)  # no grouped_mm ran: no difference against it is quoted
    assert grad_modes and not any(grad_modes)
    table = layer_bench.table_lines(rows)
    assert len(table) == 1 + len(rows) and "%mem ch" in table[0]


def test_layer_output_is_the_backend_reference(fake_timers):
    # the triton layer the bench times computes what the reference backend does
    spec = TINY["tiny_mlp"]
    g = torch.Generator().manual_seed(0)
    layer = layer_bench.make_layer(spec, g, "cpu")
    x = torch.randn(5, spec["D"], generator=g).bfloat16()
    delta = torch.randn_like(x)
    got = layer_bench.layer_fn(spec, layer, x, delta, "triton")()
    _, h, weights, ids = layer_bench.route(spec, layer, x, delta, with_sum=True)
    want = experts_forward(h.float(), layer["w13"].float(), layer["w2"].float(), ids, weights.float(),
                           torch.nn.functional.silu, "reference")
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=5e-2)


def test_balanced_routing_gives_every_expert_its_share(fake_timers, monkeypatch):
    monkeypatch.setattr(layer_bench, "BALANCED", True)
    spec = TINY["tiny_moa"]
    layer = layer_bench.make_layer(spec, torch.Generator().manual_seed(1), "cpu")
    x = torch.randn(8, spec["D"]).bfloat16()
    _, _, ids = layer_bench.route(spec, layer, x, None)
    assert torch.bincount(ids.flatten(), minlength=spec["E"]).tolist() == [4] * spec["E"]


def test_bench_summary_lists_the_layers(fake_timers):
    rows = layer_bench.measure({"tiny_moa": TINY["tiny_moa"]}, [2], ("triton",), CEIL, chain=0, log=lambda s: None,
                               device="cpu")
    result = {"models": {}, "moe_layers": rows}
    text = benchmark.summary(result)
    assert "one MoE layer against its floors" in text and "tiny_moa" in text
    # with no grouped_mm run beside it (as `moetorch bench` runs it), nothing compares against one
    assert "nan" not in text and "vs gmm" in text
    assert "one MoE layer" not in benchmark.summary({"models": {}})
    # a failed layer run is recorded as an error, and the summary leaves its table out
    assert "one MoE layer" not in benchmark.summary({"models": {}, "moe_layers": {"error": "RuntimeError: x"}})


def test_every_bench_layer_belongs_to_a_bench_model():
    # `moetorch bench --models` picks the layers of the models it runs
    assert {benchmark.layer_model(n) for n in layer_bench.LAYERS} == set(benchmark.SIZES)
    assert [n for n in layer_bench.LAYERS if benchmark.layer_model(n) == "jetmoe"] == ["jetmoe_mlp", "jetmoe_moa"]
