"""Prefill as a CUDA graph: what a short prompt loses to the host.

An eager prefill launches about 14 Triton kernels a layer, and below a few thousand tokens the GPU
waits on those launches (`bench/host_profile.py`). This probe times one prefill into a
`StaticCache` (as `generate` runs it: `logits_to_keep=1`) eagerly, wall time, and the same forward
captured once into a CUDA graph and replayed, per model and prompt length, and checks that the
replay's logits equal the eager ones. The difference is what a graphed prefill would give a
prompt of that length.

    PYTHONPATH=.:bench python bench/prefill_graph.py [--models jetmoe,phimoe] [--tokens 128,512,2048] --out r.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from moe_layer import save_json  # bench/ is the script's directory

from moetorch import StaticCache
from moetorch.benchmark import SIZES, build, cuda_time, model_names
from moetorch.engine import capture


def wall_s(fn, repeats: int = 7) -> float:
    """Median wall seconds of fn() from an idle GPU to its end (host launches included)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def measure(model, T: int, V: int) -> dict:
    ids = torch.randint(0, V, (1, T), device="cuda")
    cache = StaticCache(model.config, max_cache_len=T + 64)

    def eager():
        cache.reset()
        return model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits

    want = eager().clone()
    eager_s = wall_s(eager)
    try:
        graph, got = capture(eager)
    except Exception as e:  # a host sync or an unsupported op on the prefill path
        return {"tokens": T, "eager_ms": eager_s * 1e3, "capture_error": f"{type(e).__name__}: {str(e)[:300]}"}
    graph.replay()
    torch.cuda.synchronize()
    diff = (got.float() - want.float()).abs().max().item()
    graph_s = wall_s(graph.replay)
    gpu_s = cuda_time(graph.replay, repeats=7, warmup=1)
    del graph
    return {"tokens": T, "eager_ms": eager_s * 1e3, "graph_ms": graph_s * 1e3, "graph_gpu_ms": gpu_s * 1e3,
            "speedup": eager_s / graph_s, "eager_tok_s": T / eager_s, "graph_tok_s": T / graph_s,
            "logits_max_abs_diff": diff}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--tokens", default="128,512,2048")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for name in model_names(args.models):
        model = build(name, "moetorch", SIZES[name])
        for T in (int(v) for v in args.tokens.split(",")):
            r = {"model": name, **measure(model, T, SIZES[name]["vocab_size"])}
            rows.append(r)
            if "capture_error" in r:
                print(f"{name} T={T}: eager {r['eager_ms']:.1f} ms; capture failed: {r['capture_error']}", flush=True)
            else:
                print(f"{name} T={T}: eager {r['eager_ms']:7.2f} ms  graph {r['graph_ms']:7.2f} ms "
                      f"(GPU {r['graph_gpu_ms']:7.2f})  x{r['speedup']:.2f}  diff {r['logits_max_abs_diff']:.1e}",
                      flush=True)
        del model
        torch.cuda.empty_cache()
    save_json(args.out, {"device": torch.cuda.get_device_name(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
