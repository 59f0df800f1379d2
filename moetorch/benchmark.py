"""`moetorch bench`: decode and prefill speed at the real model sizes, against Transformers and
against the hardware floor, in one run on one GPU. Random weights (speed does not depend on them).

Floors: a decode step must read every weight it uses once (bytes / measured copy bandwidth); a
prefill must do 2 FLOPs per active parameter per token (FLOPs / measured bf16 matmul rate, the
peak: fastest of 30 runs). The matmul rate sustained over seconds is measured too and the prefill
rows also quoted against it: under sustained load an H200 holds its power cap (about 690 W) by
lowering its clocks from 1980 MHz to about 1450-1550, and cuBLAS then runs about 15% below its
peak (bench/results/h200-2026-11-30-clocks.txt).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

from .cli import int_at_least

SIZES = {
    "jetmoe": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                   num_key_value_heads=16, kv_channels=128, num_local_experts=8, num_experts_per_tok=2,
                   max_position_embeddings=4096),
    "phimoe": dict(vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2,
                   max_position_embeddings=131072, attention_bias=True, lm_head_bias=True),
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def cuda_time(fn, repeats: int = 5, warmup: int = 2, fastest: bool = False, before=None) -> float:
    """Median (or with `fastest` the smallest) seconds of `fn()` by CUDA events; `before()`, if
    given, runs ahead of each timed call, outside the events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return min(times) if fastest else sorted(times)[len(times) // 2]


def kernel_times(fn) -> dict[str, tuple[float, int]]:
    """One call of `fn` under the profiler: {kernel name (first 80 characters): (total us, calls)}."""
    total: dict[str, float] = {}
    calls: dict[str, int] = {}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            name = ev.name[:80]
            total[name] = total.get(name, 0.0) + ev.time_range.elapsed_us()
            calls[name] = calls.get(name, 0) + 1
    return {name: (us, calls[name]) for name, us in sorted(total.items(), key=lambda x: -x[1])}


def kernel_lines(times: dict[str, tuple[float, int]], top: int) -> list[str]:
    """`kernel_times` as lines: total us, share of all kernel time, calls, name."""
    busy = sum(us for us, _ in times.values()) or 1.0
    return [f"{us:9.1f} {100 * us / busy:5.1f}% x{n:<4d} {name}" for name, (us, n) in list(times.items())[:top]]


def measure_ceilings(sustain_s: float = 3.0) -> dict:
    """Device copy bandwidth and bf16 matmul rate: peaks, so each is its fastest of 30 timed runs
    (a median moved by about 3% between runs on one H200, and a low ceiling flatters the floors).
    Also `bf16_flops_per_s_sustained`: the median rate of back-to-back batches of the same matmul
    over the last two thirds of `sustain_s` seconds, once the clocks have settled under load."""
    n = 2 * 1024**3 // 2
    x = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    t = cuda_time(partial(y.copy_, x), repeats=30, warmup=5, fastest=True)
    bw = 2 * x.numel() * 2 / t
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    t = cuda_time(partial(torch.matmul, a, b), repeats=30, warmup=5, fastest=True)
    return {"copy_bytes_per_s": bw, "bf16_flops_per_s": 2 * 8192**3 / t,
            "bf16_flops_per_s_sustained": sustained_rate(a, b, sustain_s)}


def sustained_rate(a: torch.Tensor, b: torch.Tensor, seconds: float) -> float:
    """FLOP/s of a @ b run back to back for `seconds`: the median of 10-matmul batches timed over
    the last two thirds (the first third lets the clocks settle)."""
    def ten():
        for _ in range(10):
            torch.matmul(a, b)

    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1] * 10
    start, rates = time.perf_counter(), []
    while time.perf_counter() - start < seconds:
        t = cuda_time(ten, repeats=1, warmup=0)
        if time.perf_counter() - start > seconds / 3:
            rates.append(flops / t)
    rates.sort()
    return rates[len(rates) // 2] if rates else float("nan")


def config_override(text: str) -> tuple[str, int]:
    """An argparse type for bench scripts' `KEY=INT` config overrides: (key, value), the key one of
    the expert kernels' config keys."""
    from moetorch.ops.triton_moe import CONFIG_KEYS, OPTIONAL_CONFIG_KEYS

    key, sep, value = text.partition("=")
    if not sep or not value.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=INT, e.g. num_stages=3")
    if key not in CONFIG_KEYS + OPTIONAL_CONFIG_KEYS:
        raise argparse.ArgumentTypeError(f"{text!r}: {key} is not a config key "
                                         f"({', '.join(CONFIG_KEYS + OPTIONAL_CONFIG_KEYS)})")
    return key, int(value)


def counts(text: str) -> list[int]:
    """An argparse type for a comma list of positive integers (token counts, batch sizes); empty: none."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        if not item.isdigit() or int(item) < 1:
            raise argparse.ArgumentTypeError(f"{item!r} in {text!r}: expected positive integers, comma-separated")
        out.append(int(item))
    return out


def model_names(text: str) -> list[str]:
    """An argparse type for `--models`: a comma list of the bench's model sizes (SIZES)."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in SIZES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of {', '.join(SIZES)}")
    return names


def layer_model(layer: str) -> str:
    """The model a `layer_bench.LAYERS` entry belongs to ("jetmoe_moa" -> "jetmoe")."""
    return layer.split("_")[0]


def param_bytes(cfg: dict, name: str) -> dict:
    """Bytes (bf16) of: one expert of the MLP, the rest of a layer, embeddings and head."""
    D, I, E, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"], \
        cfg["num_hidden_layers"], cfg["vocab_size"]
    expert = 3 * D * I * 2
    if name == "phimoe":
        G, H = cfg["num_key_value_heads"], cfg["num_attention_heads"]
        d = D // H
        attn = (2 * D * D + 2 * D * G * d) * 2
        attn_expert = 0
    else:
        C = cfg["num_key_value_heads"] * cfg["kv_channels"]
        attn = 2 * D * C * 2  # shared kv_proj
        attn_expert = 2 * D * C * 2  # one attention expert: query map + output reduce
    return {"expert": expert, "attn": attn, "attn_expert": attn_expert, "layers": L, "experts": E,
            "embed": V * D * 2, "head": V * D * 2, "top_k": cfg["num_experts_per_tok"]}


def decode_floor_s(pb: dict, batch: int, ceil: dict) -> float:
    """Weights a decode step must read: the expected number of distinct experts hit by `batch`
    tokens (top-k of E, uniform), attention, and the LM head."""
    E, k = pb["experts"], pb["top_k"]
    hit = E * (1 - (1 - k / E) ** batch)
    per_layer = pb["attn"] + hit * (pb["expert"] + pb["attn_expert"])
    return (pb["layers"] * per_layer + pb["head"]) / ceil["copy_bytes_per_s"]


def active_params(pb: dict) -> float:
    per_layer = (pb["attn"] + pb["top_k"] * (pb["expert"] + pb["attn_expert"])) / 2
    return pb["layers"] * per_layer + pb["head"] / 2


def build(name: str, lib: str, cfg: dict, device="cuda", dtype=torch.bfloat16):
    """A random-weight model (bf16 unless `dtype` says otherwise) on `device` (the GPU: without a CPU copy)."""
    if lib == "moetorch":
        import moetorch as m
    else:
        import transformers as m
    cls_cfg = {"jetmoe": "JetMoeConfig", "phimoe": "PhimoeConfig"}[name]
    cls = {"jetmoe": "JetMoeForCausalLM", "phimoe": "PhimoeForCausalLM"}[name]
    config = getattr(m, cls_cfg)(**cfg)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(m, cls)(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


@torch.no_grad()
def bench_model(name: str, lib: str, cfg: dict, batches, prompt: int, steps: int, prefills) -> dict:
    log(f"{name}/{lib}: building")
    torch.cuda.reset_peak_memory_stats()
    model = build(name, lib, cfg)
    V = cfg["vocab_size"]
    out = {"decode_tokens_per_s": {}, "decode_ms_per_step": {}, "prefill_tokens_per_s": {}}
    for B in batches:
        ids = torch.randint(0, V, (B, prompt), device="cuda")
        if lib == "moetorch":
            t = cuda_time(_ours_decode(model, ids, steps), repeats=3, warmup=1) / steps
        else:
            total = cuda_time(partial(_hf_decode, model, ids, steps), repeats=1, warmup=1)
            pre = cuda_time(partial(model, ids, use_cache=False, logits_to_keep=1), repeats=1, warmup=0)
            t = max(total - pre, 1e-9) / steps
        out["decode_ms_per_step"][B] = t * 1e3
        out["decode_tokens_per_s"][B] = B / t
        log(f"{name}/{lib}: decode batch {B}: {t * 1e3:.2f} ms/step, {B / t:.1f} tok/s")
    for T in prefills:
        ids = torch.randint(0, V, (1, T), device="cuda")
        t = cuda_time(partial(model, ids, use_cache=False, logits_to_keep=1), repeats=3, warmup=1)
        out["prefill_tokens_per_s"][T] = T / t
        log(f"{name}/{lib}: prefill {T}: {T / t:.0f} tok/s")
    out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _ours_decode(model, ids, steps: int):
    """A callable that decodes `steps` tokens after the prompt with graphed steps (prompt cached once).
    Each step feeds every row its prompt's last token, as `_hf_decode` does: rows fed one shared
    token route alike in the first layer (bench/routing_spread.py)."""
    from moetorch import StaticCache
    from moetorch.engine import GraphedDecodeStep

    B, prompt = ids.shape
    cache = StaticCache(model.config, max_cache_len=prompt + steps + 8)
    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    step = GraphedDecodeStep(model, cache, B)
    tok = ids[:, -1:].clone()
    positions = [torch.full((B, 1), prompt + t, device=ids.device) for t in range(steps)]
    slots = [torch.tensor([prompt + t], device=ids.device) for t in range(steps)]

    def run():
        cache.truncate(prompt)
        for t in range(steps):
            step(tok, None, positions[t], slots[t])

    return run


def _hf_decode(model, ids, steps: int) -> None:
    """Transformers' default path: a dynamic cache, one forward per token (prefill included)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = ids[:, -1:]
    for _ in range(steps):
        model(tok, past_key_values=cache, use_cache=True, logits_to_keep=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moetorch bench", description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--models", default="jetmoe,phimoe", type=model_names)
    p.add_argument("--batches", default="1,16,64", type=counts)
    p.add_argument("--prefill", default="2048,8192", type=counts, help="prefill token counts (empty: none)")
    p.add_argument("--prompt", type=int_at_least(1), default=128, help="decode's prompt tokens (128)")
    p.add_argument("--steps", type=int_at_least(1), default=32, help="decode steps timed (32)")
    p.add_argument("--layers", type=int_at_least(1), default=None, help="override num_hidden_layers (smoke runs)")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--skip-check", action="store_true", help="do not run the GPU correctness checks first")
    p.add_argument("--layer-tokens", default="1,8,64,512,4096,16384", type=counts,
                   help="one MoE layer of each model per token count against its floors (moetorch.layer_bench); "
                        "empty: none")
    p.add_argument("--layer-chain", type=int_at_least(1), default=8,
                   help="each MoE layer also timed as this many back to back in one graph, as a model runs them "
                        "(1: alone only)")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/<gpu>-<date>.json)")
    p.add_argument("--markdown", metavar="RESULTS_JSON", default=None,
                   help="measure nothing: print the README's tables built from a results file")
    args = p.parse_args(argv)
    if args.markdown:
        path = Path(args.markdown)
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"moetorch bench --markdown: cannot read {path}: {e}") from None
        if not isinstance(result, dict) or not isinstance(result.get("models"), dict):
            raise SystemExit(f"moetorch bench --markdown: {path} is not a bench results file (no 'models' table)")
        try:
            table = markdown(result, path.name)
        except (KeyError, TypeError, AttributeError, ValueError, ZeroDivisionError) as e:
            # another script's results (bench/*.py), or a table with missing or broken fields
            raise SystemExit(f"moetorch bench --markdown: {path} is not a `moetorch bench` results file "
                             f"({type(e).__name__}: {e})") from None
        print(table)
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("moetorch bench needs a CUDA GPU")
    batches, prefills = args.batches, args.prefill
    gpu = torch.cuda.get_device_name()
    result = {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "models": {}}
    from .ops.triton_moe import config_file

    configs = config_file()
    result["moe_configs"] = configs.name if configs else None  # the expert kernels' block-size file (None: untuned)
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        args.no_transformers = True
    result["gpu_check"] = gpu_checks(args.skip_check)
    result["ceilings"] = ceil = measure_ceilings()
    log(f"copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul {ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s "
        f"(sustained {ceil['bf16_flops_per_s_sustained'] / 1e12:.0f})")
    for name in args.models:
        cfg = dict(SIZES[name])
        if args.layers:
            cfg["num_hidden_layers"] = args.layers
        pb = param_bytes(cfg, name)
        entry = {"config": cfg, "floors": {
            "decode_ms_per_step": {B: decode_floor_s(pb, B, ceil) * 1e3 for B in batches},
            "prefill_tokens_per_s": ceil["bf16_flops_per_s"] / (2 * active_params(pb)),
            "prefill_tokens_per_s_sustained": ceil["bf16_flops_per_s_sustained"] / (2 * active_params(pb)),
        }}
        libs = ["moetorch"] + ([] if args.no_transformers else ["transformers"])
        for lib in libs:
            try:
                entry[lib] = bench_model(name, lib, cfg, batches, args.prompt, args.steps, prefills)
            except Exception as e:  # record and go on: one library failing must not lose the other's numbers
                entry[lib] = {"error": f"{type(e).__name__}: {e}"}
                log(f"{name}/{lib} failed: {e}")
            gc.collect()
            torch.cuda.empty_cache()
        result["models"][name] = entry
    layer_tokens = args.layer_tokens
    if layer_tokens:
        from .layer_bench import LAYERS, measure

        log(f"one MoE layer per token count ({', '.join(map(str, layer_tokens))}), the triton experts")
        specs = {n: spec for n, spec in LAYERS.items() if layer_model(n) in args.models}
        try:
            result["moe_layers"] = measure(specs, layer_tokens, ("triton",), ceil, chain=args.layer_chain, log=log)
        except Exception as e:  # as for the models: record it, and keep the numbers above
            result["moe_layers"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"MoE layers failed: {e}")
    out = Path(args.out or f"bench/results/{gpu.replace(' ', '_').lower()}-{result['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    return 0


def gpu_checks(skip: bool) -> dict | str:
    """The kernels against the reference at real sizes (`moetorch.gpu_check`), before anything is
    timed: a fast wrong kernel is not a result. Their results for the bench JSON, or a note that
    they were skipped, so that a results file says which it was. Exits when a check fails."""
    if skip:
        log("GPU checks skipped (--skip-check)")
        return "skipped (--skip-check)"
    from .gpu_check import run_checks

    log("running the GPU checks (moetorch.gpu_check)")
    checks = run_checks()
    if not checks["ok"]:
        failed = [k for k, v in checks.items() if v is False or (isinstance(v, str) and v.startswith("SYNC"))]
        raise SystemExit(f"GPU checks failed ({failed or 'see the tolerances in moetorch.gpu_check'}); "
                         "not benchmarking. --skip-check measures anyway.")
    log("GPU checks passed")
    return checks


def _work_rows(result: dict):
    """The results' rows: (model, "decode" or "prefill", batch or tokens, moetorch's tokens/s,
    Transformers', the floor's, the sustained-rate floor's for prefill rows where measured)."""
    for name, e in result["models"].items():
        ours, hf, floors = e.get("moetorch", {}), e.get("transformers", {}), e["floors"]
        for B, floor_ms in floors["decode_ms_per_step"].items():
            yield (name, "decode", B, ours.get("decode_tokens_per_s", {}).get(B),
                   hf.get("decode_tokens_per_s", {}).get(B), int(B) / (floor_ms / 1e3), None)
        for T, o in ours.get("prefill_tokens_per_s", {}).items():
            yield (name, "prefill", T, o, hf.get("prefill_tokens_per_s", {}).get(T), floors["prefill_tokens_per_s"],
                   floors.get("prefill_tokens_per_s_sustained"))


def summary(result: dict) -> str:
    """The results as a table: each row against Transformers and the floor; prefill rows also
    against the floor at the sustained matmul rate (`% sust.`), where the run measured it. Then the
    MoE layers' table, where the run measured them (`layer_bench.table_lines`)."""
    lines = [f"{'model':8} {'work':16} {'moetorch':>12} {'transformers':>13} {'floor':>10} {'x HF':>7} {'% floor':>8} "
             f"{'% sust.':>8}"]
    for name, kind, n, o, h, f, s in _work_rows(result):
        work = f"decode b{n}" if kind == "decode" else f"prefill {n}"
        lines.append(f"{name:8} {work:16} {_n(o):>12} {_n(h):>13} {f:>10.0f} "
                     f"{_r(o, h):>7} {_p(o, f):>8} {_p(o, s) if s else '-':>8}")
    if isinstance(result.get("moe_layers"), list):
        from .layer_bench import table_lines

        lines += ["", "one MoE layer against its floors (ms; % of the memory and compute floors, alone and in a "
                  "chain of layers)", *table_lines(result["moe_layers"])]
    return "\n".join(lines)


# The issue's targets for one MoE layer: % of its memory floor up to 64 tokens, % of its compute
# floor from 4096 tokens.
LAYER_TARGETS = ((64, "memory", 70.0), (4096, "compute", 75.0))


def markdown(result: dict, source: str = "") -> str:
    """The README's tables from a results file: per model and work, tokens/s of moetorch and
    Transformers, the speed-up and % of the floor (prefill also of the sustained-rate floor); then,
    where the run measured them, one MoE layer per token count against its floors, alone and in a
    chain of layers, with the target that applies at that token count."""
    def tok(x):
        return "-" if not x else f"{x:.1f}" if x < 100 else f"{x:.0f}"

    def speedup(a, b):
        return "-" if not a or not b else f"{a / b:.1f}x"

    def pct(a, f):  # one decimal: some rows sit within a few tenths of their target
        return "-" if not a else f"{100 * a / f:.1f}%"

    lines = [f"Results: `{source}` ({result.get('gpu', '?')}, {result.get('date', '?')}; Transformers "
             f"{result.get('transformers', 'not run')})" if source else "",
             "| model | work | moetorch | Transformers | speed-up | vs floor |", "|---|---|---|---|---|---|"]
    for name, kind, n, o, h, f, s in _work_rows(result):
        work = f"decode, batch {n}" if kind == "decode" else f"prefill, {n} tokens"
        sust = f" ({pct(o, s)} of {s:.0f} sustained)" if s else ""
        lines.append(f"| {name} | {work} | {tok(o)} | {tok(h)} | {speedup(o, h)} | {pct(o, f)} of {f:.0f}{sust} |")
    layers = result.get("moe_layers")
    if isinstance(layers, list) and layers:
        lines += ["", "| layer | tokens | ms | % of memory floor | % of compute floor "
                  "| in a chain: ms, % mem, % compute | target |", "|---|---|---|---|---|---|---|"]
        for r in layers:
            ms = r["graph_ms"] or r["eager_ms"]
            chain = "-"
            if r.get("chain_ms_per_layer"):
                chain = (f"{r['chain_ms_per_layer']:.3f}, {r['pct_memory_floor_chain']:.1f}%, "
                         f"{r['pct_compute_floor_chain']:.1f}%")
            lines.append(f"| {r['layer']} | {r['T']} | {ms:.3f} | {r['pct_memory_floor']:.1f}% | "
                         f"{r['pct_compute_floor']:.1f}% | {chain} | {layer_target(r)} |")
    return "\n".join(lines).lstrip("\n")


def layer_target(row: dict) -> str:
    """The target that applies to a layer row (LAYER_TARGETS) and whether the row meets it. The
    memory target (decode sizes) is judged in the chain of layers where the run measured one: decode
    runs its layers back to back, and a layer alone pays a launch ramp that a decode step hides. The
    compute target (prefill sizes) is judged on the layer alone: there the chain adds nothing but a
    longer stretch of full load, which lowers the clocks (the prefill rows measure that in full)."""
    T = row["T"]
    for bound, floor, pct in LAYER_TARGETS:
        if (T <= bound) if floor == "memory" else (T >= bound):
            chained = floor == "memory" and row.get("chain_ms_per_layer")
            got = row[f"pct_{floor}_floor" + ("_chain" if chained else "")]
            return f"{floor} >= {pct:.0f}%{' (chain)' if chained else ''}: {'met' if got >= pct else 'not met'}"
    return "-"


def _n(x):
    return "-" if x is None else f"{x:.1f}"


def _r(a, b):
    return "-" if not a or not b else f"{a / b:.1f}"


def _p(a, f):
    return "-" if not a else f"{100 * a / f:.0f}%"


if __name__ == "__main__":
    sys.exit(main())
