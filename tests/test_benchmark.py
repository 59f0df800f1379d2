"""The pieces of `moetorch bench` that do not need a GPU: floors, the decode driver, the table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
from archs import JETMOE, PHIMOE, randomize_

from moetorch import benchmark


def test_floors_count_the_weights_a_step_reads():
    pb = benchmark.param_bytes(benchmark.SIZES["phimoe"], "phimoe")
    ceil = {"copy_bytes_per_s": 4.27e12, "bf16_flops_per_s": 777e12}
    one = benchmark.decode_floor_s(pb, 1, ceil)
    # batch 1 reads 2 of 16 experts per layer plus attention and the head: ~6.6B params, ~3.1 ms
    assert 2.8e-3 < one < 3.4e-3
    assert benchmark.decode_floor_s(pb, 64, ceil) > 6 * one  # nearly every expert is hit
    assert 6.0e9 < benchmark.active_params(pb) < 7.0e9
    jet = benchmark.param_bytes(benchmark.SIZES["jetmoe"], "jetmoe")
    assert 1.9e9 < benchmark.active_params(jet) < 2.6e9


@torch.no_grad()
def test_decode_driver_runs_and_resets_between_repeats(monkeypatch):
    from moetorch.engine import GraphedDecodeStep

    fed, step = [], GraphedDecodeStep.__call__
    monkeypatch.setattr(GraphedDecodeStep, "__call__", lambda self, tok, *a: fed.append(tok.clone()) or step(self, tok, *a))
    model = PHIMOE.ours["causal_lm"](PHIMOE.our_config())
    randomize_(model, 0)
    model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    run = benchmark._ours_decode(model, ids, steps=3)
    run()
    run()
    assert model.generation_config is not None
    # every step feeds each row its prompt's last token, as the Transformers driver does
    assert len(fed) == 6 and all(torch.equal(tok, ids[:, -1:]) for tok in fed)


def _long_context():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        import long_context
    finally:
        sys.path.pop(0)
    return long_context


@pytest.mark.parametrize("arch", [PHIMOE, JETMOE], ids=["phimoe", "jetmoe"])
def test_long_context_floor_counts_what_the_static_cache_stores(arch):
    # bench/long_context.py adds each row's cached keys and values to the decode floor: its bytes per
    # token must be what a StaticCache of the model holds per slot
    from moetorch import StaticCache

    name = "phimoe" if arch is PHIMOE else "jetmoe"
    cfg = arch.our_config()
    cache = StaticCache(cfg, max_cache_len=24, max_batch_size=1, device="cpu", dtype=torch.bfloat16)
    stored = sum(t.numel() * t.element_size() for t in cache._all) // 24
    assert _long_context().kv_bytes_per_token(cfg.to_dict(), name) == stored


def test_long_context_config_and_cases():
    lc = _long_context()
    assert lc.parse_cases("1x2048, 16X8192".replace(" ", "")) == [(1, 2048), (16, 8192)]
    for bad in ("2048", "1x", "0x64", "ax8"):
        with pytest.raises(SystemExit, match="BATCHxCONTEXT|positive"):
            lc.parse_cases(bad)
    # PhiMoE runs with LongRoPE over 4096 original positions, which both libraries read
    import transformers

    import moetorch

    cfg = lc.config("phimoe")
    for lib in (moetorch, transformers):
        params = lib.PhimoeConfig(**cfg).rope_parameters
        assert params["rope_type"] == "longrope" and len(params["long_factor"]) == 64
    assert "rope_parameters" not in lc.config("jetmoe")


def test_summary_table():
    result = {"models": {"jetmoe": {
        "floors": {"decode_ms_per_step": {1: 1.0}, "prefill_tokens_per_s": 100000.0},
        "moetorch": {"decode_tokens_per_s": {1: 800.0}, "prefill_tokens_per_s": {2048: 60000.0}},
        "transformers": {"decode_tokens_per_s": {1: 12.0}, "prefill_tokens_per_s": {2048: 40000.0}},
    }}}
    table = benchmark.summary(result)
    assert "decode b1" in table and "80%" in table and "66.7" in table and "60%" in table
    assert "% sust." in table and table.splitlines()[2].split()[-1] == "-"  # a run without the sustained rate
    result["models"]["jetmoe"]["floors"]["prefill_tokens_per_s_sustained"] = 80000.0
    assert benchmark.summary(result).splitlines()[2].split()[-1] == "75%"


def test_sustained_rate_skips_the_first_third(monkeypatch):
    """The sustained matmul rate is the median over the last two thirds of the run: a fast start
    (clocks still at their boost) is left out."""
    import time

    start = time.perf_counter()

    def fake_cuda_time(fn, repeats, warmup):
        time.sleep(0.002)
        return 0.5 if time.perf_counter() - start < 0.04 else 1.0  # seconds per 10 matmuls

    monkeypatch.setattr(benchmark, "cuda_time", fake_cuda_time)
    a = torch.empty(4, 8)
    b = torch.empty(8, 2)
    assert benchmark.sustained_rate(a, b, 0.3) == 2 * 4 * 8 * 2 * 10 / 1.0


def test_config_override_names_the_bad_part():
    assert benchmark.config_override("num_stages=3") == ("num_stages", 3)
    assert benchmark.config_override("PERSISTENT=0") == ("PERSISTENT", 0)
    for bad, says in (("num_stages", "expected KEY=INT"), ("num_stages=three", "expected KEY=INT"),
                      ("BLOCK_Q=64", "BLOCK_Q is not a config key")):
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            benchmark.config_override(bad)


def test_gpu_checks_are_recorded_skipped_or_stop_the_bench(monkeypatch, capsys):
    # a results file says whether the checks ran; a failed check stops the bench, naming the check
    from moetorch import gpu_check

    assert benchmark.gpu_checks(skip=True) == "skipped (--skip-check)"
    assert "skipped" in capsys.readouterr().err
    passed = {"ok": True, "fused.linears.jetmoe.kv.B16.rel_err": 0.0}
    monkeypatch.setattr(gpu_check, "run_checks", lambda: passed)
    assert benchmark.gpu_checks(skip=False) is passed
    monkeypatch.setattr(gpu_check, "run_checks", lambda: {"ok": False, "fused.topk.B16.picks_equal": False})
    with pytest.raises(SystemExit, match="fused.topk.B16.picks_equal"):
        benchmark.gpu_checks(skip=False)


def test_gpu_check_runs_the_checks_named_in_only(monkeypatch):
    # `--only` takes a comma list of CHECKS' names (an unknown one is named), and run_checks runs
    # those alone, in the order given; without it, every check in CHECKS' order
    from moetorch import gpu_check

    assert gpu_check.check_names("fused,packed_training") == ["fused", "packed_training"]
    for bad in ("fused,attention", ","):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a comma list of experts"):
            gpu_check.check_names(bad)
    ran = []
    fakes = {name: (lambda results, n=name: ran.append(n) or n != "pdl") for name in gpu_check.CHECKS}
    monkeypatch.setattr(gpu_check, "CHECKS", fakes)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    assert gpu_check.run_checks(["models", "fused"])["ok"] is True and ran == ["models", "fused"]
    ran.clear()
    assert gpu_check.run_checks()["ok"] is False and ran == list(fakes)


def test_bench_arguments_are_checked_before_anything_runs(capsys):
    # lists parse into integers and known model names; a bad item is named, before the GPU check
    assert benchmark.counts("1, 16,64") == [1, 16, 64] and benchmark.counts("") == []
    assert benchmark.model_names("phimoe") == ["phimoe"]
    for argv, named in ((["--batches", "1,x"], "'x' in '1,x'"), (["--prefill", "0"], "'0' in '0'"),
                        (["--layer-tokens", "8,-1"], "'-1' in '8,-1'"), (["--models", "jetmoe,mixtral"], "mixtral"),
                        (["--steps", "0"], "--steps: must be at least 1"), (["--prompt", "x"], "--prompt: 'x'"),
                        (["--layers", "0"], "--layers: must be at least 1"),
                        (["--layer-chain", "-2"], "--layer-chain: must be at least 1")):
        with pytest.raises(SystemExit) as exc:
            benchmark.main(argv)
        assert exc.value.code == 2, argv
        assert named in capsys.readouterr().err, argv


def _layer_row(layer, T, mem, cmp, chain=None):
    row = {"layer": layer, "T": T, "graph_ms": 0.5, "eager_ms": 0.9, "pct_memory_floor": mem, "pct_compute_floor": cmp}
    if chain:
        row.update(chain_ms_per_layer=0.4, pct_memory_floor_chain=chain[0], pct_compute_floor_chain=chain[1])
    return row


def test_markdown_tables_from_a_results_file(tmp_path, capsys):
    # `moetorch bench --markdown FILE` builds the README's tables from a results file (JSON: string
    # keys) and measures nothing, so it runs without a GPU
    result = {"gpu": "NVIDIA H200", "date": "2026-11-30", "transformers": "5.17.0", "models": {"jetmoe": {
        "floors": {"decode_ms_per_step": {"1": 1.0}, "prefill_tokens_per_s": 100000.0,
                   "prefill_tokens_per_s_sustained": 80000.0},
        "moetorch": {"decode_tokens_per_s": {"1": 800.0}, "prefill_tokens_per_s": {"2048": 60000.0}},
        "transformers": {"decode_tokens_per_s": {"1": 12.0}, "prefill_tokens_per_s": {"2048": 40000.0}},
    }}, "moe_layers": [
        _layer_row("jetmoe_moa", 8, 50.0, 0.7, chain=(71.0, 0.8)),  # decode size: judged in the chain
        _layer_row("jetmoe_moa", 512, 30.0, 20.0),  # no target between 64 and 4096 tokens
        _layer_row("jetmoe_mlp", 4096, 15.0, 74.9, chain=(14.0, 80.0)),  # prefill size: judged alone
    ]}
    path = tmp_path / "h200.json"
    path.write_text(json.dumps(result))
    assert benchmark.main(["--markdown", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Results: `h200.json` (NVIDIA H200, 2026-11-30; Transformers 5.17.0)"
    assert "| jetmoe | decode, batch 1 | 800 | 12.0 | 66.7x | 80.0% of 1000 |" in lines
    assert "| jetmoe | prefill, 2048 tokens | 60000 | 40000 | 1.5x | 60.0% of 100000 (75.0% of 80000 sustained) |" in lines
    assert "| jetmoe_moa | 8 | 0.500 | 50.0% | 0.7% | 0.400, 71.0%, 0.8% | memory >= 70% (chain): met |" in lines
    assert "| jetmoe_moa | 512 | 0.500 | 30.0% | 20.0% | - | - |" in lines
    assert "| jetmoe_mlp | 4096 | 0.500 | 15.0% | 74.9% | 0.400, 14.0%, 80.0% | compute >= 75%: not met |" in lines
    # a run without Transformers or without layer rows still gives its table
    del result["moe_layers"], result["models"]["jetmoe"]["transformers"]
    text = benchmark.markdown(result)
    assert "| jetmoe | decode, batch 1 | 800 | - | - | 80.0% of 1000 |" in text and "| layer |" not in text


def test_markdown_names_a_file_it_cannot_use(tmp_path):
    for name, text in (("broken.json", "{"), ("other.json", '{"rows": []}')):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(SystemExit) as exc:
            benchmark.main(["--markdown", str(path)])
        assert name in str(exc.value)
    # another script's results with a "models" table, or a table with missing or broken fields: named,
    # where a KeyError / TypeError / ZeroDivisionError came before
    floors = {"decode_ms_per_step": {"1": 1.0}, "prefill_tokens_per_s": 1.0}
    for i, models in enumerate(({"jetmoe": {"moetorch": {"decode_tokens_per_s": {"1": 5.0}}}}, {"jetmoe": 5},
                                {"jetmoe": {"floors": {**floors, "decode_ms_per_step": {"1": 0}}}})):
        path = tmp_path / f"shape{i}.json"
        path.write_text(json.dumps({"models": models}))
        with pytest.raises(SystemExit, match=f"shape{i}.json is not a `moetorch bench` results file"):
            benchmark.main(["--markdown", str(path)])
    path.write_text(json.dumps({"models": {"jetmoe": {"floors": floors}}, "moe_layers": [{"layer": "x", "T": 1}]}))
    with pytest.raises(SystemExit, match=r"is not a `moetorch bench` results file \(KeyError: 'graph_ms'\)"):
        benchmark.main(["--markdown", str(path)])
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["--markdown", str(tmp_path / "missing.json")])
    assert "missing.json" in str(exc.value)
