"""Where an eager prefill spends host time: cProfile over three forwards of one model at the real
size (random weights), after two warm-up forwards.

    PYTHONPATH=. python bench/host_profile.py --model jetmoe --tokens 2048 --out profile.txt

Prints the host time of one forward next to its wall time (equal when the GPU waits on the host),
then the profile sorted by own time and by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from moetorch.benchmark import SIZES, build


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="jetmoe", choices=sorted(SIZES))
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model = build(args.model, "moetorch", dict(SIZES[args.model]))
    ids = torch.randint(0, SIZES[args.model]["vocab_size"], (1, args.tokens), device="cuda")

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
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(3):
        forward()
    torch.cuda.synchronize()
    profile.disable()
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text).sort_stats("tottime")
    stats.print_stats(35)
    stats.sort_stats("cumulative").print_stats(45)
    print(text.getvalue())
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"host {host * 1e3:.1f} ms, wall {wall * 1e3:.1f} ms (one forward, unprofiled)\n")
            f.write(text.getvalue())


if __name__ == "__main__":
    main()
