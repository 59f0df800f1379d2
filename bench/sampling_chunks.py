"""The sampling kernel's chunk size (`ops.triton_sample.CHUNK`): GPU time of `sample` on bf16 logits
[B, 32064] for chunks of 1024, 2048 and 4096 values, with top-k 50 and top-p 0.9, top-k 50 alone,
and top-k 256 with top-p.

    PYTHONPATH=.:bench python bench/sampling_chunks.py
"""

from __future__ import annotations

import torch
from sampling_cost import cost_us  # bench/ is the script's directory

from moetorch.ops import triton_sample as ts


@torch.no_grad()
def main() -> None:
    shipped = ts.CHUNK
    for B in (1, 16):
        logits = (torch.randn(B, 32064, device="cuda") * 3).bfloat16()
        for chunk in (1024, 2048, 4096):
            ts.CHUNK = chunk
            for name, args in (("T,k50,p0.9", (0.7, 50, 0.9)), ("k50", (None, 50, None)),
                               ("T,k256,p0.9", (0.7, 256, 0.9))):
                gpu, host = cost_us(lambda: ts.sample(logits, *args))  # noqa: B023 (called at once)
                print(f"B{B} chunk {chunk} {name:12s} GPU {gpu:6.1f} us host {host:6.1f} us", flush=True)
    ts.CHUNK = shipped


if __name__ == "__main__":
    main()
