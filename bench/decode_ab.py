"""Graphed decode of one model with and without a code path, interleaved in one process on the same
weights: differences of a percent or two are below the spread between machines (and between runs
that rebuild the model), so an A/B must not span two of them.

    PYTHONPATH=. python bench/decode_ab.py --model phimoe --batch 1 \
        --b moetorch.ops.triton_moe:pdl_enabled=off [--rounds 4] [--out r.json]

`--b module:attribute=off` replaces that function with one returning False for the B runs (a
feature's or a fusion's gate: PDL above); `=<int>` sets an integer attribute instead.
`--b-configs FILE` runs B with the expert kernels' block sizes from FILE (a config JSON, such as
the committed one at an older revision; `{}` for none: every GEMM on `default_config`, as on a GPU
with no file) in place of this GPU's. A runs as the code stands. Each arm captures its own graphs,
so the path is chosen as decode would choose it. `--dtype float16` builds the model in float16;
`--size intermediate_size=960` (repeatable) changes the model's config from the real sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import sys
from pathlib import Path

import torch
from moe_layer import save_json  # bench/ is the script's directory

from moetorch.benchmark import SIZES, _ours_decode, build, cuda_time


def configs_from(path: str):
    """(module, attribute, B value) that make `triton_moe.get_config` read the table at path."""
    from moetorch.ops import triton_moe

    if not Path(path).is_file():
        raise FileNotFoundError(f"--b-configs: no file {path}")
    return triton_moe, "_device_file", lambda device: Path(path)


def size_override(text: str) -> tuple[str, int]:
    """`--size KEY=INT`: (a model config field, its integer value)."""
    key, sep, value = text.partition("=")
    if not sep or not value.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=INT, e.g. intermediate_size=960")
    return key, int(value)


@contextlib.contextmanager
def setting(module, attr: str, value):
    """`module.attr` set to `value` inside the block, back to what it was after."""
    before = getattr(module, attr)
    setattr(module, attr, value)
    try:
        yield
    finally:
        setattr(module, attr, before)


def patch(spec: str):
    """(module, attribute, B value) from `module:attribute=off|<int>`."""
    target, value = spec.split("=")
    module_name, attr = target.split(":")
    module = importlib.import_module(module_name)
    getattr(module, attr)  # fails early on a typo
    return module, attr, (lambda *a, **k: False) if value == "off" else int(value)


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="phimoe", choices=sorted(SIZES))
    p.add_argument("--batch", type=int, default=1)
    arm_b = p.add_mutually_exclusive_group(required=True)
    arm_b.add_argument("--b", help="module:attribute=off|<int>")
    arm_b.add_argument("--b-configs", help="a config JSON for the expert kernels")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens of each row (the cache's filled part)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--size", action="append", default=[], type=size_override, metavar="KEY=INT",
                   help="a config field of the model set to another integer (repeatable)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    sizes = {**SIZES[args.model], **dict(args.size)}
    module, attr, b_value = patch(args.b) if args.b else configs_from(args.b_configs)
    a_value = getattr(module, attr)
    model = build(args.model, "moetorch", sizes, dtype=getattr(torch, args.dtype))
    ids = torch.randint(0, sizes["vocab_size"], (args.batch, args.prompt), device="cuda")
    times = {"A": [], "B": []}
    # round 0 is a warm-up, not recorded: on the H200 the first arm timed in a process reads 2-4%
    # above every later round of either arm (clocks settle), which would favour arm A
    for rnd in range(args.rounds + 1):
        for arm, value in (("A", a_value), ("B", b_value)):
            with setting(module, attr, value):  # a new graph per arm: the path is chosen while capturing
                t = cuda_time(_ours_decode(model, ids, args.steps), repeats=3, warmup=1) / args.steps
            if rnd:
                times[arm].append(args.batch / t)
            print(f"{args.model} b{args.batch} {arm}: {args.batch / t:8.1f} tok/s{'' if rnd else ' (warm-up)'}",
                  flush=True)
    best = {arm: max(v) for arm, v in times.items()}
    median = {arm: statistics.median(v) for arm, v in times.items()}
    print(f"median A {median['A']:.1f}  B {median['B']:.1f}  A/B {median['A'] / median['B']:.4f}; "
          f"best A {best['A']:.1f}  B {best['B']:.1f}")
    save_json(args.out, {"device": torch.cuda.get_device_name(), "model": args.model, "batch": args.batch,
                         "prompt": args.prompt, "dtype": args.dtype, "sizes": dict(args.size),
                         "moe_config_env": os.environ.get("MOETORCH_MOE_CONFIG"),
                         "b": args.b or f"configs {args.b_configs}", "tokens_per_s": times, "best": best,
                         "median": median})
    return 0


if __name__ == "__main__":
    sys.exit(main())
