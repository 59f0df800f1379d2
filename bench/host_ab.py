"""Host time of eager forwards, A/B between two copies of moetorch in interleaved processes.

A change to the host code (how kernels are launched, what each op checks) cannot be switched by a
module attribute, and hosts differ by a third from machine to machine, so both copies run on the
same machine: each round starts one process per copy and model, alternating which copy goes first.
Each process measures, for eager forwards at the real sizes (random weights, bf16):

- prefill: `model(ids, use_cache=False, logits_to_keep=1)` at each `--tokens`, wall time from an
  idle GPU to the end (host launches included: what a caller sees), and host time alone (the
  forward queued behind ~80 ms of GPU work, so that no launch waits on the device);
- decode: single-token forwards on a dynamic cache after a 128-token prompt (a user's own loop);
- Python function calls in one forward at the first `--tokens` (cProfile's count: the same on any
  host, where the times above move with the host's speed and load).

    git archive HEAD moetorch ':!moetorch/assets' | tar -x -C /tmp/before
    PYTHONPATH=.:bench python bench/host_ab.py --a . --b /tmp/before --out results.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(model_name: str, tokens: list[int], steps: int) -> dict:
    """Runs inside the child process: the copy of moetorch on its path is the one measured."""
    import torch
    from eager_decode_ab import steps_per_s  # bench/ is on the child's path

    import moetorch
    from moetorch.benchmark import SIZES, build

    model = build(model_name, "moetorch", dict(SIZES[model_name]))
    V = SIZES[model_name]["vocab_size"]
    busy = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    out = {"moetorch": str(Path(moetorch.__file__).parent), "prefill": {}}
    with torch.no_grad():
        for T in tokens:
            ids = torch.randint(0, V, (1, T), device="cuda")

            def forward(ids=ids):
                return model(ids, use_cache=False, logits_to_keep=1)

            for _ in range(2):
                forward()
            walls, hosts = [], []
            for _ in range(7):
                torch.cuda.synchronize()
                start = time.perf_counter()
                forward()
                torch.cuda.synchronize()
                walls.append(time.perf_counter() - start)
            for _ in range(5):
                torch.cuda.synchronize()
                for _ in range(60):  # ~80 ms of queued GPU work
                    busy @ busy
                start = time.perf_counter()
                forward()
                hosts.append(time.perf_counter() - start)
                torch.cuda.synchronize()
            out["prefill"][T] = {"wall_ms": statistics.median(walls) * 1e3,
                                 "host_ms": statistics.median(hosts) * 1e3,
                                 "tokens_per_s": T / statistics.median(walls)}
            if T == tokens[0]:
                profile = cProfile.Profile()
                profile.runcall(forward)
                torch.cuda.synchronize()
                out["python_calls_per_forward"] = pstats.Stats(profile).total_calls
        ids = torch.randint(0, V, (1, 128), device="cuda")
        rates = [steps_per_s(model, ids, steps) for _ in range(3)]
        out["decode_ms_per_step"] = 1e3 / statistics.median(rates)
    return out


def child(tree: str, model_name: str, tokens: list[int], steps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(tree).resolve()), str(HERE)]))
    code = (f"import json, host_ab; print('RESULT', json.dumps(host_ab.measure({model_name!r}, {tokens!r}, "
            f"{steps})))")
    # from a directory of neither copy: `python -c` puts the working directory first on the path
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise RuntimeError(f"{tree} / {model_name}: {done.stderr[-3000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    got = json.loads(line[len("RESULT "):])
    if Path(got["moetorch"]).resolve() != (Path(tree) / "moetorch").resolve():
        raise RuntimeError(f"measured {got['moetorch']}, not the copy in {tree}")
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", default=".", help="the directory holding copy A's moetorch package")
    p.add_argument("--b", required=True, help="the directory holding copy B's moetorch package")
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--tokens", default="128,512,2048")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    trees = {"A": args.a, "B": args.b}
    res = {"trees": trees, "runs": {}}
    for r in range(args.rounds):
        order = ("A", "B") if r % 2 == 0 else ("B", "A")
        for name in args.models.split(","):
            for tag in order:
                got = child(trees[tag], name, tokens, args.steps)
                res["runs"].setdefault(name, {}).setdefault(tag, []).append(got)
                pre = ", ".join(f"{T}: {v['wall_ms']:.1f} ms wall / {v['host_ms']:.1f} host"
                                for T, v in got["prefill"].items())
                print(f"round {r} {name} {tag}: {pre}; decode step {got['decode_ms_per_step']:.1f} ms; "
                      f"{got['python_calls_per_forward']} Python calls a forward", flush=True)
                if args.out:  # after each process, so that a cut run keeps what it measured
                    with open(args.out, "w") as f:
                        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
