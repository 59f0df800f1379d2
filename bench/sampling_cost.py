"""What each part of a sampling step costs on the GPU: the logits processors a chat server's
settings add (temperature, top-k, top-p, min-p), the softmax and `torch.multinomial`, against greedy's argmax
and the sampling kernel (`ops.triton_sample.sample`, which `generate` uses for these settings).

Each part runs alone on random float32 logits [B, V], 20 times under the profiler; a row is its
CUDA kernels' time per call (what a decode step waits for when the host runs ahead, as `generate`
does on a GPU) and the host's time per call (what `generate` must hide behind the step before;
taken under the profiler, so an upper bound).

    PYTHONPATH=.:bench python bench/sampling_cost.py [--batches 1,16] [--vocab 32000] --out r.json
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from moe_layer import save_json  # bench/ is the script's directory

from moetorch.benchmark import counts, kernel_times
from moetorch.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from moetorch.ops import triton_sample

CALLS = 20


def cost_us(fn) -> tuple[float, float]:
    """(CUDA kernel time, host time) per call, in us; the host time is taken under the profiler,
    which adds its own cost to each launch (an upper bound)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    host = []

    def calls():
        t0 = time.perf_counter()
        for _ in range(CALLS):
            fn()
        host.append(time.perf_counter() - t0)

    gpu = sum(us for us, _ in kernel_times(calls).values())
    return gpu / CALLS, host[0] * 1e6 / CALLS


def parts(B: int, V: int) -> dict:
    """The timed calls on random logits [B, V]."""
    logits = torch.randn(B, V, device="cuda") * 3
    ids = torch.zeros(B, 8, dtype=torch.long, device="cuda")
    temp, top_k, top_p = TemperatureLogitsWarper(0.7), TopKLogitsWarper(50), TopPLogitsWarper(0.9)
    chain = LogitsProcessorList([temp, top_k, top_p])
    chain_min_p = LogitsProcessorList([temp, top_k, top_p, MinPLogitsWarper(0.05)])
    probs = logits.softmax(-1)
    logits_bf16 = logits.bfloat16()
    return {
        "float32 copy": lambda: logits.to(torch.float32, copy=True),
        "temperature 0.7": lambda: temp(ids, logits),
        "top_k 50": lambda: top_k(ids, logits),
        "top_p 0.9": lambda: top_p(ids, logits),
        "softmax": lambda: logits.softmax(-1),
        "multinomial": lambda: torch.multinomial(probs, 1),
        "all of a sampled step": lambda: torch.multinomial(
            chain(ids, logits.to(torch.float32, copy=True)).softmax(-1), 1),
        "all of a sampled step, min-p 0.05 too": lambda: torch.multinomial(
            chain_min_p(ids, logits.to(torch.float32, copy=True)).softmax(-1), 1),
        "greedy argmax": lambda: logits.argmax(-1),
        "sampling kernel (T 0.7, top-k 50, top-p 0.9)": lambda: triton_sample.sample(logits, 0.7, 50, 0.9),
        "sampling kernel (top-k 50)": lambda: triton_sample.sample(logits, None, 50, None),
        "sampling kernel (T 0.7, top-k 50, top-p 0.9), bf16 logits": lambda: triton_sample.sample(
            logits_bf16, 0.7, 50, 0.9),
        "sampling kernel (T 0.7, top-k 50, top-p 0.9, min-p 0.05)": lambda: triton_sample.sample(
            logits, 0.7, 50, 0.9, 0.05),
        "sampling kernel (T 0.7, min-p 0.1)": lambda: triton_sample.sample(logits, 0.7, None, None, 0.1),
    }


def measure(parts_of, batches: str, vocab: int) -> list[dict]:
    """`cost_us` of each part `parts_of(B, vocab)` gives ({name: call}), for each batch of
    `batches` ("1,16"), printed as they come."""
    rows = []
    for B in counts(batches):
        for name, fn in parts_of(B, vocab).items():
            gpu, host = cost_us(fn)
            rows.append({"batch": B, "vocab": vocab, "part": name, "gpu_us": gpu, "host_us": host})
            print(f"B{B:<4d} {name:48s} GPU {gpu:8.1f} us  host {host:8.1f} us", flush=True)
    return rows


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,16")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    save_json(args.out, {"device": torch.cuda.get_device_name(), "rows": measure(parts, args.batches, args.vocab)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
