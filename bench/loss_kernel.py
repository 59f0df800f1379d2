"""The causal-LM loss and its backward alone: the loss kernels (`ops.triton_loss`, through
`causal_lm_loss`) against `F.cross_entropy` over a float32 copy of the logits (the same function
with `fused.LOSS_KERNEL = 0`) and Transformers' `ForCausalLMLoss`, on bf16 logits of each model's
vocabulary. Per arm: milliseconds for the loss and its backward (median of `--steps`, arms
alternating) and the memory it takes beyond the logits (peak over what was held before it).

    PYTHONPATH=. python bench/loss_kernel.py --out r.json

`--sweep`: instead, the kernels alone (`triton_loss.row_losses` and its backward) at each
`triton_loss.BLOCK` x `NUM_WARPS`, median ms of 10 after 2, per token count (JetMoE's vocabulary).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from moetorch.ops import fused
from moetorch.ops.losses import causal_lm_loss


def hf_loss():
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return None
    return lambda logits, labels: ForCausalLMLoss(logits, labels, logits.shape[-1])


def run(fn, logits, labels) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """(ms, GiB beyond the logits, loss, the logits' gradient) of one loss and backward."""
    x = logits.detach().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    loss = fn(x, labels)
    loss.backward()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), (torch.cuda.max_memory_allocated() - held) / 2**30, loss.detach(), x.grad


def sweep(rows: list[int], V: int = 32000) -> dict:
    from moetorch.ops import triton_loss

    out = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for N in rows:
        logits = (torch.randn(N, V, device="cuda", generator=g) * 3).bfloat16()
        target = torch.randint(0, V, (N,), device="cuda", generator=g)

        def loss(x, t):
            return triton_loss.row_losses(x[0], t[0]).sum()

        for block in (1024, 2048, 4096, 8192):
            for warps in (4, 8, 16):
                triton_loss.BLOCK, triton_loss.NUM_WARPS = block, warps
                times = []
                for i in range(12):
                    ms = run(loss, logits[None], target[None])[0]
                    if i >= 2:
                        times.append(ms)
                key = f"N={N} BLOCK={block} warps={warps}"
                out[key] = statistics.median(times)
                print(f"{key}: {out[key]:.3f} ms", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loss_kernel")
    p.add_argument("--rows", default="4096,16384,32768", help="B*T tokens, a comma list")
    p.add_argument("--vocab", default="32000,32064", help="JetMoE's and PhiMoE's vocabularies")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sweep", action="store_true", help="time the kernels' block sizes and warps alone")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.sweep:
        res = {"device": torch.cuda.get_device_name(), "sweep": sweep([int(n) for n in args.rows.split(",")])}
        if args.out:
            with open(args.out, "w") as f:
                f.write(json.dumps(res, indent=2) + "\n")
        return 0

    def float_copy(x, labels):
        fused.LOSS_KERNEL = 0
        try:
            return causal_lm_loss(x, labels)
        finally:
            fused.LOSS_KERNEL = 1

    arms = {"kernel": causal_lm_loss, "float32 copy": float_copy}
    if (hf := hf_loss()) is not None:
        arms["transformers ForCausalLMLoss"] = hf
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": {}}
    g = torch.Generator(device="cuda").manual_seed(0)
    ok = True
    for V in (int(v) for v in args.vocab.split(",")):
        for N in (int(n) for n in args.rows.split(",")):
            logits = (torch.randn(1, N, V, device="cuda", generator=g) * 3).bfloat16()
            labels = torch.randint(0, V, (1, N), device="cuda", generator=g)
            labels[:, ::10] = -100
            times = {a: [] for a in arms}
            mem, result = {}, {}
            for i in range(args.steps + 1):
                for a, fn in arms.items():
                    ms, gib, loss, grad = run(fn, logits, labels)
                    if i == 0:  # untimed: compiles; its memory and results are the check's
                        mem[a], result[a] = gib, (loss, grad)
                    else:
                        times[a].append(ms)
                    del loss, grad
            want_loss, want_grad = result["float32 copy"]
            row = {}
            for a in arms:
                loss, grad = result[a]
                row[a] = {"ms": statistics.median(times[a]), "peak_beyond_logits_gib": mem[a],
                          "loss_rel": (abs(loss - want_loss) / abs(want_loss)).item(),
                          "grad_rel": ((grad.float() - want_grad.float()).norm() / want_grad.float().norm()).item()}
                ok &= row[a]["loss_rel"] < 1e-5 and row[a]["grad_rel"] < 1e-2
                print(f"V={V} N={N} {a}: {row[a]['ms']:.2f} ms, {mem[a]:.2f} GiB beyond the logits, "
                      f"loss {row[a]['loss_rel']:.1e}, gradient {row[a]['grad_rel']:.1e} from the float32 copy",
                      file=sys.stderr, flush=True)
            out["rows"][f"V={V} N={N}"] = row
            del logits, labels, result
            torch.cuda.empty_cache()
    out["ok"] = bool(ok)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
