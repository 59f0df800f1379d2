"""Copy bandwidth by buffer size: from buffers that fit in L2 to ones that do not. Each size is
100 copies (y <- x) in one CUDA graph, replayed; bytes read + written per second, best of 5.

    python bench/l2_bandwidth.py
"""

from __future__ import annotations

import torch


def main() -> None:
    for mb in (2, 4, 8, 16, 24, 32, 64, 256, 1024):
        x = torch.randn(mb * 2**20 // 2, device="cuda", dtype=torch.bfloat16)
        y = torch.empty_like(x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            y.copy_(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(100):
                y.copy_(x)
        best = float("inf")
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        print(f"{mb:5d} MB read + {mb} MB written: {2 * mb * 2**20 * 100 / best / 1e12:6.2f} TB/s", flush=True)


if __name__ == "__main__":
    main()
