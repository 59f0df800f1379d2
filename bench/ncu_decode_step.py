"""One eager decode step of a model at real width (few layers) inside an NVTX range "step", for
Nsight Compute to profile kernel by kernel (a graph replay shows them as one launch):

    ncu --nvtx --nvtx-include "step/" --section LaunchStats --section Occupancy --section SpeedOfLight \\
        python bench/ncu_decode_step.py --model jetmoe --batch 1 --layers 1

The step runs the kernels the graphed step replays (the same grids and block sizes), on a static
cache after `--prompt` tokens; two unprofiled steps compile them first.
"""

from __future__ import annotations

import argparse
import sys

import torch
from profile_decode import _step_fn  # bench/ is the script's directory

from moetorch.benchmark import SIZES, build


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="jetmoe", choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    args = p.parse_args()
    model = build(args.model, "moetorch", dict(SIZES[args.model], num_hidden_layers=args.layers))
    run = _step_fn(model, args.batch, args.prompt, False)
    for _ in range(2):
        run()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("step")
    run()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
