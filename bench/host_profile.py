"""Where an eager prefill spends host time: cProfile over three forwards of one model at the real
size (random weights), after two warm-up forwards.

    PYTHONPATH=. python bench/host_profile.py --model jetmoe --tokens 2048 --out profile.txt
    PYTHONPATH=. python bench/host_profile.py --model jetmoe --tokens 128 --decode   # a decode step

Prints the host time of one forward next to its wall time (equal when the GPU waits on the host),
the host time of a forward queued behind ~80 ms of GPU work (the host's own cost, which no GPU
wait inflates), whether a forward syncs with the device (torch's sync debug mode), the host time
per call of the expert seam's launch helpers (the expert kernels on the sorted path at the
model's sizes), then the profile sorted by own time and by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
import warnings

import torch

import moetorch
from moetorch.benchmark import SIZES, build


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="jetmoe", choices=sorted(SIZES))
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--out", default=None)
    p.add_argument("--dump", default=None, help="also write the raw profile (pstats) to this file")
    p.add_argument("--decode", action="store_true",
                   help="profile one-token forwards on a dynamic cache after a --tokens prompt (a user's own "
                        "decoding loop) instead of the prompt's forward")
    args = p.parse_args()
    model = build(args.model, "moetorch", dict(SIZES[args.model]))
    ids = torch.randint(0, SIZES[args.model]["vocab_size"], (1, args.tokens), device="cuda")

    if args.decode:
        cache = moetorch.DynamicCache()
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = ids[:, -1:]

        def forward():
            return model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
    else:
        def forward():
            return model(ids, use_cache=False, logits_to_keep=1)

    for _ in range(2):
        forward()
    torch.cuda.synchronize()
    start = time.perf_counter()
    forward()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    print(f"host {host * 1e3:.1f} ms, wall {wall * 1e3:.1f} ms")
    lines = [f"host {host * 1e3:.1f} ms, wall {wall * 1e3:.1f} ms (one forward, unprofiled)"]
    lines += host_alone(forward) + syncs(forward)
    if not args.decode:
        lines += seam_costs(SIZES[args.model], args.tokens)
    print("\n".join(lines[1:]), flush=True)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(3):
        forward()
    torch.cuda.synchronize()
    profile.disable()
    if args.dump:
        profile.dump_stats(args.dump)
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text).sort_stats("tottime")
    stats.print_stats(35)
    stats.sort_stats("cumulative").print_stats(45)
    print(text.getvalue())
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
            f.write(text.getvalue())


def queue_gpu_work(a: torch.Tensor) -> None:
    """Once the device is idle, queue ~80 ms of matmuls on it (a: bf16 [8192, 8192]), so that no
    launch after this waits on the device."""
    torch.cuda.synchronize()
    for _ in range(60):
        a @ a


def host_alone(forward) -> list[str]:
    """Host time of forwards queued behind ~80 ms of GPU work: the host's own cost."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    out = []
    for _ in range(3):
        queue_gpu_work(a)
        start = time.perf_counter()
        forward()
        out.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
    return [f"host with the GPU busy ahead: {', '.join(f'{t:.1f}' for t in out)} ms"]


def syncs(forward) -> list[str]:
    """Host-device syncs in one forward (torch's sync debug mode warns at each)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            forward()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [f"syncs in a forward: {len(caught)}"] + [f"  {w.filename}:{w.lineno}: {w.message}" for w in caught[:8]]


def per_call_us(fn, n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def seam_costs(size: dict, T: int) -> list[str]:
    """Host microseconds per call of the sorted-path expert helpers at the model's sizes, each run
    behind enough queued GPU work that no launch waits on the device."""
    from moetorch.ops import triton_moe as tm

    dev, dt, K = torch.device("cuda"), torch.bfloat16, 2
    E, D, I = size.get("num_local_experts", 8), size["hidden_size"], size["intermediate_size"]
    x = torch.randn(T, D, device=dev, dtype=dt)
    ids = torch.randint(0, E, (T, K), device=dev)
    route_w = torch.rand(T, K, device=dev, dtype=dt)
    w13 = torch.randn(E, 2 * I, D, device=dev, dtype=dt) * 0.02
    w2 = torch.randn(E, D, I, device=dev, dtype=dt) * 0.02
    cfg = tm.get_config("gate_up", E, I, D, dt, T, T * K, dev)
    sorted_P, blocks_B = tm.moe_align(ids.view(-1), E, cfg["BLOCK_M"])
    h = torch.empty(sorted_P.numel(), I, device=dev, dtype=dt)
    busy = torch.randn(8192, 8192, device=dev, dtype=dt)
    calls = {
        "get_config": (lambda: tm.get_config("gate_up", E, I, D, dt, T, T * K, dev), 2000),
        "pdl_meta": (lambda: tm.pdl_meta(dev), 2000),
        "tma_enabled": (lambda: tm.tma_enabled(dev), 2000),
        "_tma_descriptor": (lambda: tm._tma_descriptor(w13, [1, cfg["BLOCK_N"], cfg["BLOCK_K"]]), 2000),
        "torch.empty": (lambda: torch.empty(T, D, device=dev, dtype=dt), 2000),
        "moe_align": (lambda: tm.moe_align(ids.view(-1), E, cfg["BLOCK_M"]), 100),
        "moe_gemm (gate/up)": (lambda: tm.moe_gemm(x, w13, h, sorted_P, blocks_B, T * K, cfg, a_div=K,
                                                    out_padded=True, n_out=I, act="silu"), 50),
        "experts_fused": (lambda: tm.experts_fused(x, w13, w2, ids, route_w, "silu", combine=False), 20),
    }
    out = [f"host us per call ({E} experts, D={D}, I={I}, T={T}):"]
    for name, (fn, n) in calls.items():
        queue_gpu_work(busy)
        out.append(f"  {name:20s} {per_call_us(fn, n):8.1f}")
        torch.cuda.synchronize()
    return out


if __name__ == "__main__":
    main()
