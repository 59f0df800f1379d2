"""One MoE layer (the norm before it, router + experts) per token count, per expert backend,
against its floors.

    PYTHONPATH=. python bench/moe_layer.py --out results.json [--tokens 1,8,64,512,4096,16384]

Layers at real sizes, bf16: PhiMoE (16 SwiGLU experts, sparsemixer top-2), JetMoE MLP (8 SwiGLU
experts, top-2 softmax) and JetMoE attention experts (router + query projection `map` + output
projection `reduce`, the attention between them left out). Each starts at the norm that feeds it, as
the models run it: at decode sizes the router runs inside the norm's kernel (`add_norm_route`).
Backends: triton, grouped_mm, and gather for T <= 64. Each layer is captured in a CUDA graph
(decode runs that way) and its replay timed with `triton.testing.do_bench` (median; L2 flushed
before each run so weights come from HBM); the eager call is timed too, and the norm + router alone
(graph). With `--chain L` (default 8) the triton backend is also timed as L such layers, each
with its own weights, back to back in one graph, each feeding the next as a model runs them (a
layer's output keeps its K axis where the backend leaves it, and the next layer's norm adds it to
the residual and sums it; the attention experts' too, whose output in the models goes to the
residual add before the MLP's norm). Per
layer, that excludes a lone graph's launch and drain, which at decode sizes are a large share of a
short layer, and the separate sum over K. The same run measures the two ceilings as `moetorch
bench` does (fastest of 30): device copy bandwidth (a 4 GiB copy, bytes read + written) and the
bf16 matmul rate (8192^3). Floors: memory = bytes of the expert weights actually touched (distinct
experts routed to) + router weight + activations in and out (the norm's too), over the copy
bandwidth; compute = FLOPs over the matmul rate.

Legend: T tokens, D model dim, I expert hidden dim, C attention-expert width, E experts, K = 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import torch
import torch.nn.functional as F
import triton.testing

from moetorch.benchmark import config_override, kernel_lines, kernel_times
from moetorch.ops.moe import expert_map, expert_reduce, experts_forward
from moetorch.ops.norms import LayerNorm, RMSNorm
from moetorch.ops.routing import route_topk, sparsemixer

K = 2
LAYERS = {
    "phimoe": dict(kind="experts", E=16, D=4096, I=6400, router="sparsemixer"),
    "jetmoe_mlp": dict(kind="experts", E=8, D=2048, I=5632, router="topk"),
    "jetmoe_moa": dict(kind="moa", E=8, D=2048, C=2048, router="topk"),
}
TOKENS = (1, 8, 64, 512, 4096, 16384)
GATHER_MAX_T = 64


def median_ms(fn, warmup: int = 10, rep: int = 100) -> float:
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def ceilings() -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s, measured here: each
    the fastest of 30 runs, as `moetorch bench` takes them (a median moves by several percent); and
    the matmul rate sustained over seconds (`benchmark.measure_ceilings`)."""
    from moetorch.benchmark import measure_ceilings

    ceil = measure_ceilings()
    return {"copy_bytes_per_s": ceil["copy_bytes_per_s"], "bf16_flop_per_s": ceil["bf16_flops_per_s"],
            "bf16_flop_per_s_sustained": ceil["bf16_flops_per_s_sustained"]}


def make_layer(spec: dict, g: torch.Generator) -> dict:
    E, D = spec["E"], spec["D"]

    def new(*s):
        return torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02

    layer = {"router": new(E, D)}
    norm = LayerNorm(D) if spec["router"] == "sparsemixer" else RMSNorm(D, 1e-6)
    layer["norm"] = norm.to("cuda", torch.bfloat16).eval()
    if spec["kind"] == "experts":
        layer.update(w13=new(E, 2 * spec["I"], D), w2=new(E, D, spec["I"]))
    else:
        layer.update(w_map=new(E, spec["C"], D), w_red=new(E, D, spec["C"]))
    return layer


def route(spec: dict, layer: dict, x_TD: torch.Tensor, delta_TD: torch.Tensor | None, with_sum: bool = False):
    """The norm and the router as the models run them: (normed rows, weights, ids), with_sum: and
    first the residual sum x + delta."""
    sparse = spec["router"] == "sparsemixer"
    sum_TD, h_TD, routing = layer["norm"].add_norm_route(
        x_TD, delta_TD, None, layer["router"], K, 0.01 if sparse else None, logits_f32=not sparse
    )
    if routing is None:  # prefill sizes: the router's GEMM, then the routing kernel
        logits_TE = h_TD @ layer["router"].T
        routing = (*sparsemixer(logits_TE, 0.01, False), None) if sparse else route_topk(logits_TE, K, h_TD.dtype)
    weights_TK, ids_TK = routing[0], routing[1]
    if BALANCED:  # the router still runs; the experts see every expert get T*K/E rows
        ids_TK = balanced_ids(x_TD.shape[0], spec["E"], x_TD.device)
    return (sum_TD, h_TD, weights_TK, ids_TK) if with_sum else (h_TD, weights_TK, ids_TK)


# --balanced: token t goes to experts t % E and (t + E/2) % E, so each expert gets T*K/E rows and,
# where that is a multiple of BLOCK_M, no alignment block is padded.
BALANCED = False


@functools.cache
def balanced_ids(T: int, E: int, device) -> torch.Tensor:
    t = torch.arange(T, device=device)
    return torch.stack((t % E, (t + E // 2) % E), dim=1)


def run_layer(spec: dict, layer: dict, x_TD: torch.Tensor, delta_TD: torch.Tensor | None, backend: str,
              combine: bool = True):
    """One layer: (the residual sum, the layer's output [T, D]; combine=False: the output may keep
    its K axis, [T, K, D], which the next layer's norm sums as the models run it)."""
    sum_TD, h_TD, weights_TK, ids_TK = route(spec, layer, x_TD, delta_TD, with_sum=True)
    if spec["kind"] == "experts":
        y = experts_forward(h_TD, layer["w13"], layer["w2"], ids_TK, weights_TK, F.silu, backend, combine=combine)
        return sum_TD, y
    q_TKC = expert_map(h_TD, layer["w_map"], ids_TK, backend)
    return sum_TD, expert_reduce(q_TKC, layer["w_red"], ids_TK, weights_TK, backend, combine=combine)


def layer_fn(spec: dict, layer: dict, x_TD: torch.Tensor, delta_TD: torch.Tensor | None, backend: str):
    def run():
        return run_layer(spec, layer, x_TD, delta_TD, backend)[1]

    return run


def chain_inputs(spec: dict, layers: list, x_TD: torch.Tensor, delta_TD: torch.Tensor | None, backend: str):
    """Each layer's (x, delta) when the layers run one after another as in a model: a layer's
    residual sum and output (uncombined where the backend leaves the K axis; for the attention
    experts, the attention left out) are the next layer's x and delta."""
    inputs = []
    for layer in layers:
        inputs.append((x_TD, delta_TD))
        x_TD, delta_TD = run_layer(spec, layer, x_TD, delta_TD, backend, combine=False)
    return inputs


def chain_fn(spec: dict, layers: list, x_TD: torch.Tensor, delta_TD: torch.Tensor | None, backend: str):
    def run():
        x, delta = x_TD, delta_TD
        for layer in layers:
            x, delta = run_layer(spec, layer, x, delta, backend, combine=False)
        return x

    return run


def floors(spec: dict, layer: dict, x_TD: torch.Tensor, delta_TD: torch.Tensor | None, ceil: dict) -> dict:
    """Bytes and FLOPs the layer cannot avoid, and the times they take at the measured ceilings."""
    T, D, E = x_TD.shape[0], spec["D"], spec["E"]
    _, _, ids_TK = route(spec, layer, x_TD, delta_TD)
    touched = torch.unique(ids_TK).numel()  # host sync: outside the timed region
    if spec["kind"] == "experts":
        per_expert = 3 * spec["I"] * D * 2
        flops = 2 * T * K * 3 * D * spec["I"]
        act_bytes = 2 * T * D * 2  # x in, y out
    else:
        per_expert = 2 * spec["C"] * D * 2
        flops = 2 * T * K * 2 * D * spec["C"]
        act_bytes = 2 * T * D * 2 + 2 * T * K * spec["C"] * 2  # x in, y out; q out and back in
    flops += 2 * T * D * E  # router
    act_bytes += T * D * 2 * (4 if delta_TD is not None else 1)  # the norm: x, delta in; sum, normed out
    nbytes = touched * per_expert + E * D * 2 + act_bytes
    return {"experts_touched": touched, "bytes": nbytes, "flops": flops,
            "memory_floor_ms": nbytes / ceil["copy_bytes_per_s"] * 1e3,
            "compute_floor_ms": flops / ceil["bf16_flop_per_s"] * 1e3,
            "compute_floor_sustained_ms": flops / ceil["bf16_flop_per_s_sustained"] * 1e3}


def chain_row(spec: dict, layers: list, x_TD, delta_TD, backend: str, ceil: dict) -> dict:
    """The layer as decode and prefill run it: len(layers) layers (each its own weights) back to
    back in one CUDA graph, each feeding the next. Per layer: replay time and floors (the sum of
    each layer's floors on its actual input: routing, and so the experts touched, differ)."""
    L = len(layers)
    ms = graph_ms(chain_fn(spec, layers, x_TD, delta_TD, backend))
    inputs = chain_inputs(spec, layers, x_TD, delta_TD, backend)
    per = [floors(spec, layer, x, d, ceil) for layer, (x, d) in zip(layers, inputs)]
    mem = sum(f["memory_floor_ms"] for f in per) / L
    cmp = sum(f["compute_floor_ms"] for f in per) / L
    ms_layer = ms / L if ms else None
    return {"chain_layers": L, "chain_ms_per_layer": ms_layer, "chain_memory_floor_ms": mem,
            "chain_compute_floor_ms": cmp, "chain_experts_touched": [f["experts_touched"] for f in per],
            "pct_memory_floor_chain": 100 * mem / ms_layer if ms_layer else float("nan"),
            "pct_compute_floor_chain": 100 * cmp / ms_layer if ms_layer else float("nan")}


def save_json(path: str | None, result: dict) -> None:
    """Write a bench result (when a path was given)."""
    if path:
        with open(path, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")


def graph_ms(fn, warmup: int = 10, rep: int = 100) -> float | None:
    """Median replay time of fn captured in a CUDA graph (None if it cannot be captured); `warmup`
    and `rep`: milliseconds of replays before and while timing."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = median_ms(graph.replay, warmup, rep)
        del graph
        return ms
    except Exception as e:
        print(f"  graph capture failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
        return None


def override_configs(values: dict) -> None:
    """Make `triton_moe.get_config` answer with `values` set in each sorted-path entry."""
    from moetorch.ops import triton_moe as tm

    real = tm.get_config

    def get_config(*args, **kwargs):
        cfg = real(*args, **kwargs)
        if cfg.get("GEMV") or tm.use_small_kernel(args[6], K):
            return cfg
        cfg.update(values)
        return cfg

    tm.get_config = get_config


@torch.no_grad()
def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--layers", default=",".join(LAYERS))
    parser.add_argument("--backends", default="grouped_mm,triton,gather")
    parser.add_argument("--chain", type=int, default=8,
                        help="also time the triton backend as this many layers back to back in one graph (0: off)")
    parser.add_argument("--balanced", action="store_true",
                        help="route token t to experts t %% E and (t + E/2) %% E (no padded blocks at T*K/E = "
                             "a multiple of BLOCK_M): what the expert kernels reach without the padding")
    parser.add_argument("--kernels", type=int, default=0,
                        help="list this many of the triton layer's kernels by time (one eager call) per row")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=INT", type=config_override,
                        help="override a key in every config of the triton backend's sorted path (an integer, "
                             "e.g. num_stages=3): an A/B of one setting on every shape; repeatable")
    args = parser.parse_args()
    global BALANCED
    BALANCED = args.balanced
    if args.set:
        override_configs(dict(args.set))
    ceil = ceilings()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": triton.__version__, "ceilings": ceil, "balanced": args.balanced, "set": dict(args.set),
               "rows": []}
    print(f"copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul {ceil['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s "
          f"(sustained {ceil['bf16_flop_per_s_sustained'] / 1e12:.0f})",
          flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for name in args.layers.split(","):
        spec = LAYERS[name]
        layer = make_layer(spec, g)
        chain = [layer] + [make_layer(spec, g) for _ in range(args.chain - 1)] if args.chain > 1 else []
        for T in map(int, args.tokens.split(",")):
            x_TD = torch.randn(T, spec["D"], device="cuda", dtype=torch.bfloat16, generator=g)
            # the MLPs follow x + attention's output; the attention experts read the norm of x alone
            delta_TD = torch.randn_like(x_TD) if spec["kind"] == "experts" else None
            floor = floors(spec, layer, x_TD, delta_TD, ceil)
            # the norm and the router alone: the part of the layer outside the seam
            floor["router_graph_ms"] = graph_ms(functools.partial(route, spec, layer, x_TD, delta_TD))
            outputs = {}
            for backend in args.backends.split(","):
                if backend == "gather" and T > GATHER_MAX_T:
                    continue
                fn = layer_fn(spec, layer, x_TD, delta_TD, backend)
                outputs[backend] = fn().float()
                row = {"layer": name, "T": T, "backend": backend, **floor,
                       "eager_ms": median_ms(fn), "graph_ms": graph_ms(fn)}
                if "grouped_mm" in outputs:  # a sanity check of the tuned configs: same layer output
                    ref = outputs["grouped_mm"]
                    row["rel_diff_vs_grouped_mm"] = ((outputs[backend] - ref).norm() / ref.norm()).item()
                best = row["graph_ms"] or row["eager_ms"]
                row["pct_memory_floor"] = 100 * floor["memory_floor_ms"] / best
                row["pct_compute_floor"] = 100 * floor["compute_floor_ms"] / best
                row["pct_compute_floor_sustained"] = 100 * floor["compute_floor_sustained_ms"] / best
                if chain and backend == "triton":
                    row.update(chain_row(spec, chain, x_TD, delta_TD, backend, ceil))
                if args.kernels and backend == "triton":
                    times = kernel_times(fn)
                    row["kernels_us"] = {name: us for name, (us, _) in times.items()}
                    print("\n".join(kernel_lines(times, args.kernels)), flush=True)
                results["rows"].append(row)
                print(f"{name:11s} T={T:6d} {backend:10s} graph {row['graph_ms'] or float('nan'):8.3f} ms  eager "
                      f"{row['eager_ms']:8.3f} ms  mem {row['pct_memory_floor']:5.1f}%  "
                      f"compute {row['pct_compute_floor']:5.1f}% (sust. {row['pct_compute_floor_sustained']:5.1f}%)  "
                      f"diff vs grouped_mm {row.get('rel_diff_vs_grouped_mm', float('nan')):.1e}", flush=True)
                if "chain_ms_per_layer" in row:
                    chain_ms = row["chain_ms_per_layer"] or float("nan")
                    print(f"{'':11s} {'':8s} {'in a chain':10s} {chain_ms:8.3f} ms a layer  mem "
                          f"{row['pct_memory_floor_chain']:5.1f}%  compute {row['pct_compute_floor_chain']:5.1f}%",
                          flush=True)
            del x_TD, outputs
        del layer, chain
        torch.cuda.empty_cache()
    by_key = {(r["layer"], r["T"], r["backend"]): r for r in results["rows"]}
    for r in results["rows"]:
        ref = by_key.get((r["layer"], r["T"], "grouped_mm"))
        if ref is not None:
            r["speedup_vs_grouped_mm"] = (ref["graph_ms"] or ref["eager_ms"]) / (r["graph_ms"] or r["eager_ms"])
    print_table(results["rows"])
    save_json(args.out, results)
    return 0


def print_table(rows) -> None:
    print(f"\n{'layer':11s} {'T':>6s} {'backend':10s} {'graph ms':>9s} {'eager ms':>9s} {'mem floor':>9s} "
          f"{'%mem':>6s} {'cmp floor':>9s} {'%cmp':>6s} {'vs gmm':>6s} {'router ms':>9s}")
    for r in rows:
        graph = f"{r['graph_ms']:9.3f}" if r["graph_ms"] else f"{'-':>9s}"
        print(f"{r['layer']:11s} {r['T']:6d} {r['backend']:10s} {graph} {r['eager_ms']:9.3f} "
              f"{r['memory_floor_ms']:9.3f} {r['pct_memory_floor']:6.1f} {r['compute_floor_ms']:9.3f} "
              f"{r['pct_compute_floor']:6.1f} {r.get('speedup_vs_grouped_mm', float('nan')):6.2f} "
              f"{r['router_graph_ms'] or float('nan'):9.3f}")


if __name__ == "__main__":
    sys.exit(main())
