"""The bf16 matmul rate over 6 s of back-to-back 8192^3 matmuls (after 2 s idle), with the SM
clock, power, temperature and throttle reasons sampled by nvidia-smi alongside: how far the rate
under sustained load falls from the peak that `moetorch bench` reports (its fastest of 30 runs).

    python bench/clocks.py
"""

from __future__ import annotations

import subprocess
import threading
import time

import torch

QUERY = "clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"


def sample(samples: list, done: threading.Event) -> None:
    """Append (time, nvidia-smi line) every 0.2 s until `done` is set."""
    while not done.is_set():
        out = subprocess.run(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
        samples.append((time.perf_counter(), out))
        time.sleep(0.2)


def main() -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    samples, done = [], threading.Event()
    time.sleep(2)  # idle first: the clocks start from their boost
    sampler = threading.Thread(target=sample, args=(samples, done))
    sampler.start()
    flops = 2 * 8192**3 * 20
    t0, rows = time.perf_counter(), []
    while time.perf_counter() - t0 < 6:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            torch.matmul(a, b)
        end.record()
        end.synchronize()
        rows.append((time.perf_counter() - t0, flops / (start.elapsed_time(end) / 1e3) / 1e12))
    done.set()
    sampler.join()
    for t, tflops in rows[:: max(1, len(rows) // 20)]:
        print(f"t={t:5.2f} s  {tflops:6.0f} TFLOP/s")
    rates = sorted(r for _, r in rows)
    print("best", rates[-1], "median", rates[len(rates) // 2])
    print(f"nvidia-smi: {QUERY}")
    for t, line in samples[:: max(1, len(samples) // 12)]:
        print(f"t={t - t0:5.2f} s  {line}")


if __name__ == "__main__":
    main()
