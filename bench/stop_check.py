"""What `generate()`'s stop check and sampling cost a decode step: EOS read each step, one step late, or
not at all; greedy or sampled.

With an EOS id (or another rule the device decides), the decode loop must learn whether every row
is done. Reading the step's own flag (`lagged_stop = False`) waits for that step to finish, and the
GPU then idles while the host prepares the next one. Reading the step before's flag
(`lagged_stop = True`, the CUDA default) queues the next step first; a step past the end is
computed and dropped. With no EOS id only `max_length` can stop the loop and the host counts steps
itself (`no_eos`): the bound for the other two. `sample_one_step_late` samples as a chat server
would (temperature 0.7, top-k 50, top-p 0.9), reading EOS one step late: what sampling adds. It
draws with the sampling kernel (the CUDA default); `sample_processors` with the processors, softmax
and `torch.multinomial` (`fused.SAMPLE_KERNEL = 0`). Seeded alike, the two must return the same
tokens (`sample_arms_same_calls` counts the calls where they do).

Random weights at the real sizes, a 128-token prompt, the held static cache and graphs (the same
for every arm: one length bucket). The arms take turns call by call. The EOS id is one the greedy
output never contains, so every greedy arm runs the same steps and must return the same tokens
(counted; the sampling arm, seeded alike on every call, the same tokens as its first call, and its
length is recorded). A second EOS id, a token the output holds, checks that both EOS arms stop at
the same place with the same tokens.

    PYTHONPATH=.:bench python bench/stop_check.py [--models jetmoe,phimoe] [--batches 1,16] --out r.json
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from generate_calls import call_s  # bench/ is the script's directory
from moe_layer import save_json

from moetorch.benchmark import SIZES, build, counts, model_names
from moetorch.ops import fused

ARMS = {"no_eos": None, "eos_each_step": False, "eos_one_step_late": True, "sample_one_step_late": True,
        "sample_processors": True}
SAMPLING = dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9)


def run(model, ids, new: int, arm: str, eos: int) -> tuple[float, torch.Tensor]:
    model.lagged_stop = ARMS[arm]
    fused.SAMPLE_KERNEL = int(arm != "sample_processors")
    if arm.startswith("sample"):
        torch.manual_seed(0)
    return call_s(model, ids, new, eos_token_id=None if arm == "no_eos" else eos,
                  **(SAMPLING if arm.startswith("sample") else {}))


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--new", type=int, default=129, help="new tokens per call")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for name in model_names(args.models):
        model = build(name, "moetorch", SIZES[name])
        V = SIZES[name]["vocab_size"]
        for B in counts(args.batches):
            ids = torch.randint(0, V, (B, args.prompt), device="cuda")
            for _ in range(2):  # compile, then capture the prompt's bucket
                _, out = call_s(model, ids, args.new, eos_token_id=None)
            seen = set(out[:, args.prompt:].flatten().tolist())
            never = next(t for t in range(V - 1, -1, -1) if t not in seen)
            ms = {arm: {n: [] for n in (1, args.new)} for arm in ARMS}
            differ, want = dict.fromkeys(ARMS, 0), dict.fromkeys(ARMS, out)
            sample_same = 0
            for _ in range(args.calls):
                for n in (1, args.new):
                    sampled = []
                    for arm in ARMS:
                        s, got = run(model, ids, n, arm, never)
                        ms[arm][n].append(s * 1e3)
                        if arm.startswith("sample"):
                            sampled.append(got)
                        if n == args.new and arm.startswith("sample") and want[arm] is out:
                            want[arm] = got
                        differ[arm] += n == args.new and not torch.equal(got, want[arm])
                    sample_same += n == args.new and torch.equal(*sampled)
            for arm in ARMS:
                call, first = statistics.median(ms[arm][args.new]), statistics.median(ms[arm][1])
                step = (call - first) / (args.new - 1)
                rows.append({"model": name, "batch": B, "arm": arm, "new_tokens": args.new,
                             "call_ms": ms[arm][args.new], "first_token_ms": ms[arm][1], "median_call_ms": call,
                             "step_ms": step, "tok_s": B * 1e3 / step, "calls_with_other_tokens": differ[arm],
                             "new_tokens_returned": want[arm].shape[1] - args.prompt,
                             "sample_arms_same_calls": sample_same if arm.startswith("sample") else None})
                print(f"{name} b{B:<3d} {arm:18s} call {call:8.1f} ms  step {step:.3f} ms ({B * 1e3 / step:8.1f} "
                      f"tok/s)  other tokens in {differ[arm]} calls", flush=True)
            print(f"{name} b{B:<3d} sampling kernel and processors: the same tokens in {sample_same} of "
                  f"{args.calls} calls", flush=True)
            stop = int(out[0, args.prompt + args.new // 3])  # stops row 0 a third of the way (or earlier)
            ends = {arm: run(model, ids, args.new, arm, stop)[1] for arm in ("eos_each_step", "eos_one_step_late")}
            same = torch.equal(*ends.values())
            rows.append({"model": name, "batch": B, "early_eos": stop, "new_tokens_returned":
                         ends["eos_one_step_late"].shape[1] - args.prompt, "eos_arms_same_tokens": same})
            print(f"{name} b{B:<3d} EOS {stop} met: {ends['eos_one_step_late'].shape[1] - args.prompt} new tokens, "
                  f"both EOS arms the same tokens: {same}", flush=True)
        del model
        torch.cuda.empty_cache()
    save_json(args.out, {"device": torch.cuda.get_device_name(), "prompt": args.prompt, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
