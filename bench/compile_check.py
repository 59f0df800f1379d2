"""torch.compile on moetorch's models, as a Transformers user's script does it (H200).

    PYTHONPATH=.:bench python bench/compile_check.py --out compile.json [--speed jetmoe]

Correctness, on gpu_check's small bf16 configs (4 layers, random weights):
- `torch._dynamo.explain` of the forward: graphs and breaks (one graph, no break expected);
- `torch.compile(model)(ids)` against the eager forward (the fused kernels), in float32 (relative
  error < 1e-3) and in bf16 (informative: inductor rounds elsewhere, which flips near-tied experts
  of random routers);
- Transformers' static-cache recipe (`model.forward = torch.compile(model.forward,
  mode="reduce-overhead", fullgraph=True)`, `generate(cache_implementation="static")`): the tokens
  of the uncompiled model, with generate's graphed steps setting the compiled forward aside (no
  graph compiled during the call); then with `model.decode_graphs = False`, where generate calls
  the compiled forward each step, as Transformers does.
Training: a compiled step's gradients (cross-entropy + aux loss, float32, with and without left
padding) against the eager step's: relative error < 1e-3 for every parameter (a dropped gradient
reads 1); in bf16 (one graph), each parameter's gradient within 3x the eager bf16 step's error
(+ 1e-2) of the float32 step's.
`--speed NAME`: batch-1 decode tokens/s at the real size (random weights), generate's graphed steps
against the compiled forward (`decode_graphs = False`), 128-token prompt, `--steps` new tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import traceback

import torch

from moetorch.benchmark import SIZES, build
from moetorch.gpu_check import bf16_models, rel_err


def attempt(res: dict, key: str, fn):
    start = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - the failure is the finding
        res[key + ".error"] = f"{type(e).__name__}: {str(e)[:1500]}"
        res[key + ".trace"] = traceback.format_exc()[-3000:]
        return None
    res[key + ".seconds"] = round(time.perf_counter() - start, 1)
    return out


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def recipe(model) -> None:
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)


def each_model(res: dict, check, prepare=None) -> bool:
    """`check(res, name, cfg, model)` over gpu_check's small models, dynamo reset after each."""
    ok = True
    for name, cfg, model in bf16_models():
        ok &= check(res, name, cfg, model if prepare is None else prepare(name, model))
        torch._dynamo.reset()
        del model
    return ok


@torch.no_grad()
def check_model(res: dict, name: str, cfg, model) -> bool:
    ok = True
    ids = torch.randint(1, cfg.vocab_size, (2, 48), device="cuda")
    want = model(ids).logits
    torch._dynamo.reset()
    explained = attempt(res, f"{name}.explain", lambda: torch._dynamo.explain(model)(ids))
    if explained is not None:
        res[f"{name}.explain.graphs"] = explained.graph_count
        res[f"{name}.explain.breaks"] = explained.graph_break_count
        res[f"{name}.explain.reasons"] = [str(r.reason)[:300] for r in explained.break_reasons[:8]]
        ok &= explained.graph_break_count == 0
    torch._dynamo.reset()
    got = attempt(res, f"{name}.compile", lambda: torch.compile(model)(ids).logits)
    ok &= got is not None
    if got is not None:  # informative: bf16 rounding flips near-tied experts of random routers
        res[f"{name}.compile.rel_err_vs_eager"] = rel_err(got, want)
    torch._dynamo.reset()
    fp32 = copy.deepcopy(model).float()  # the criterion: float32, where routing does not flip
    got = attempt(res, f"{name}.compile_fp32", lambda: torch.compile(fp32)(ids).logits)
    ok &= got is not None
    if got is not None:
        res[f"{name}.compile_fp32.rel_err_vs_eager"] = err = rel_err(got, fp32(ids).logits)
        ok &= err < 1e-3
    torch._dynamo.reset()
    kw = dict(max_new_tokens=16, do_sample=False, cache_implementation="static", pad_token_id=0)
    want = model.generate(ids, **kw)
    recipe(model)
    before = compiled_graphs()
    got = attempt(res, f"{name}.recipe", lambda: model.generate(ids, **kw))
    ok &= got is not None
    if got is not None:
        res[f"{name}.recipe.same_tokens"] = same = torch.equal(got, want)
        res[f"{name}.recipe.graphs_compiled_during_generate"] = n = compiled_graphs() - before
        ok &= same and n == 0
    model.decode_graphs = False  # generate calls the compiled forward, step by step
    got = attempt(res, f"{name}.recipe_compiled_steps", lambda: model.generate(ids, **kw))
    ok &= got is not None
    if got is not None:
        res[f"{name}.recipe_compiled_steps.graphs_compiled"] = compiled_graphs() - before
        # inductor's bf16 rounding may flip a near tie: informative
        res[f"{name}.recipe_compiled_steps.same_tokens"] = torch.equal(got, want)
        res[f"{name}.recipe_compiled_steps.same_prefix"] = int((got == want).all(0).int().cumprod(0).sum())
    return ok


def grads(model, fn, ids, mask) -> dict:
    model.zero_grad(set_to_none=True)
    out = fn(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), output_router_logits=True)
    out.loss.backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def as_training(name: str, model):
    """float32; PhiMoE in eval mode (its training router samples), JetMoE in train mode."""
    return model.float().train(name == "jetmoe")


def check_training(res: dict, name: str, cfg, model) -> bool:
    """A compiled training step's gradients (loss = cross-entropy + aux loss, a left-padded batch)
    against the eager step's, float32 (whose experts on a GPU take the loop, a graph break each:
    no fullgraph), then in bf16 (one graph) against the eager bf16 step. A dropped gradient reads 1."""
    ok = True
    ids = torch.randint(1, cfg.vocab_size, (2, 48), device="cuda")
    for masked in (False, True):
        mask = torch.ones_like(ids)
        mask[1, :7] = 0 if masked else 1
        want = grads(model, model, ids, mask)
        torch._dynamo.reset()
        compiled = torch.compile(model)
        key = f"{name}.train_mask{int(masked)}"
        got = attempt(res, key, lambda mask=mask, compiled=compiled: grads(model, compiled, ids, mask))
        ok &= got is not None
        if got is not None:
            errs = {n: rel_err(got[n], want[n]) for n in want}
            worst = max(errs, key=errs.get)
            res[f"{key}.grad_max_rel_err"] = errs[worst]
            res[f"{key}.grad_worst"] = worst
            ok &= errs[worst] < 1e-3 and set(got) >= set(want)
    # bf16, one graph (the grouped_mm experts): the compiled step's gradients and the eager bf16
    # step's, each against the float32 step's; inductor rounds elsewhere, a dropped gradient reads 1
    half = copy.deepcopy(model).bfloat16()
    eager = grads(half, half, ids, mask)
    torch._dynamo.reset()
    compiled = torch.compile(half, fullgraph=True)
    got = attempt(res, f"{name}.train_bf16", lambda: grads(half, compiled, ids, mask))
    ok &= got is not None
    if got is not None:
        err_c = {n: rel_err(got[n], want[n]) for n in want}
        err_e = {n: rel_err(eager[n], want[n]) for n in want}
        worst = max(want, key=lambda n: err_c[n] - 3 * err_e[n])
        res[f"{name}.train_bf16.compiled_max_rel_err_vs_fp32"] = max(err_c.values())
        res[f"{name}.train_bf16.eager_max_rel_err_vs_fp32"] = max(err_e.values())
        res[f"{name}.train_bf16.worst"] = [worst, err_c[worst], err_e[worst]]
        ok &= all(err_c[n] <= 3 * err_e[n] + 1e-2 for n in want)
    return ok


def decode_tok_s(model, ids, steps: int) -> float:
    kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, cache_implementation="static")
    model.generate(ids, **kw)  # capture or compile
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


@torch.no_grad()
def speed(res: dict, name: str, steps: int) -> None:
    model = build(name, "moetorch", dict(SIZES[name]))
    ids = torch.randint(0, SIZES[name]["vocab_size"], (1, 128), device="cuda")
    res[f"speed.{name}.graphed_tok_s"] = decode_tok_s(model, ids, steps)
    recipe(model)
    res[f"speed.{name}.recipe_graphed_tok_s"] = decode_tok_s(model, ids, steps)
    model.decode_graphs = False
    start = time.perf_counter()
    res[f"speed.{name}.recipe_compiled_steps_tok_s"] = attempt(
        res, f"speed.{name}.recipe_compiled_steps", lambda: decode_tok_s(model, ids, steps))
    res[f"speed.{name}.recipe_compiled_steps_wall_s"] = round(time.perf_counter() - start, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--speed", default="", help="models to time at the real size, comma-separated")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--parts", default="correctness,training")
    args = p.parse_args()
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def dump() -> None:  # after each part: a run cut short keeps what it measured
        if args.out:
            with open(args.out, "w") as f:
                f.write(json.dumps(res, indent=2) + "\n")

    res["ok"] = each_model(res, check_model) if "correctness" in args.parts else True
    dump()
    res["training_ok"] = each_model(res, check_training, as_training) if "training" in args.parts else True
    res["ok"] = res["ok"] and res["training_ok"]
    dump()
    for name in filter(None, args.speed.split(",")):
        speed(res, name, args.steps)
        dump()
    print(json.dumps({k: v for k, v in res.items() if not k.endswith(".trace")}, indent=2))


if __name__ == "__main__":
    main()
