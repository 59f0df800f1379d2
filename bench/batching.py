"""Continuous batching: `generate_batch` throughput on a workload of requests, against Transformers'
`generate_batch` on the same model and requests, and against a floor.

    PYTHONPATH=.:bench python bench/batching.py --out r.json [--models jetmoe,phimoe] [--requests 256]

The workload: `--requests` prompts of random ids, lengths uniform in `--prompt` (32:512), each
asking for `--new` (128) greedy tokens with no EOS, so every request generates them all. Each
library runs it twice with `persistent_manager=True` (the first run sizes the manager and captures
its graphs), and the second is timed: generated tokens over wall time. Transformers runs the first
`--hf-requests` of them (it is slower), and moetorch runs that subset too, for a like-for-like row.

Floor of a run (weights and prompt FLOPs only): every decode step reads the weights its running
rows route to (`benchmark.decode_floor_s` at the step's row count, from the manager's stats), and
every prompt token costs 2 x active parameters of FLOPs at the measured bf16 matmul rate. Cached
keys and values and attention's FLOPs are left out, so the floor is low for long prompts.

Checks on the same run: a tiny float32 model's `generate_batch` tokens equal its own per-request
`generate` (graphed decode on both sides, exact), and at the real size the first `--check`
requests are compared with per-request `generate` (bf16: near-tied logits may flip, so the share
of equal tokens is reported, not asserted).
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time

import torch

from moetorch.benchmark import SIZES, active_params, build, decode_floor_s, log, measure_ceilings, param_bytes


def workload(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    # ids from 1: `generate` reads id 0 (pad_token_id) in a prompt as padding, and the checks
    # compare with it
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def gen_config(lib: str, new: int):
    if lib == "moetorch":
        import moetorch as m
    else:
        import transformers as m
    return m.GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)


def timed_run(model, lib: str, prompts, new: int) -> dict:
    """Warm run (sizes the manager, captures graphs), then a timed one."""
    import inspect

    gen = gen_config(lib, max(new) if isinstance(new, list) else new)
    # Transformers versions before `persistent_manager` build a manager per call
    keep = {"persistent_manager": True} if "persistent_manager" in inspect.signature(model.generate_batch).parameters \
        else {}
    def run():
        if not isinstance(new, list):
            return model.generate_batch(prompts, generation_config=gen, **keep)
        from moetorch.engine.batching import WorkloadHints

        hints = WorkloadHints(max(map(len, prompts)), max(new), len(prompts))
        with model.continuous_batching_context_manager(gen, persistent_manager=True, workload_hints=hints) as m:
            ids = [m.add_request(q, max_new_tokens=n) for q, n in zip(prompts, new)]
            got = {}
            while len(got) < len(ids):
                r = m.get_result(timeout=60)
                got[r.request_id] = r
        return {i: got[i] for i in ids}

    run()
    manager = getattr(model, "_cached_continuous_batching_manager", None)
    if lib == "moetorch":
        manager.stats.update(decode_rows=[], prefill_tokens=[], shifts=0, alone=0,
                             decode_s=0.0, prefill_s=0.0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = run()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    failed = [r.error for r in out.values() if r.error is not None]
    tokens = sum(len(r.generated_tokens) for r in out.values())
    row = {"requests": len(prompts), "seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds,
           "failed": len(failed) + len(prompts) - len(out), "first_error": (failed or [None])[0],
           "outputs": [r.generated_tokens for r in out.values()]}
    if lib == "moetorch":
        st = manager.stats
        row.update(rows=manager.rows, slots=manager.slots, decode_steps=len(st["decode_rows"]),
                   mean_rows=sum(st["decode_rows"]) / max(len(st["decode_rows"]), 1),
                   prefill_forwards=len(st["prefill_tokens"]), shifts=st["shifts"], decode_s=st["decode_s"],
                   prefill_s=st["prefill_s"], prefill_tokens=sum(st["prefill_tokens"]))
        row["stats"] = {"decode_rows": st["decode_rows"], "prefill_tokens": st["prefill_tokens"]}
    if hasattr(model, "destroy_cached_continuous_batching_manager"):
        model.destroy_cached_continuous_batching_manager()
    log(f"{lib}: {len(prompts)} requests, {tokens} tokens in {seconds:.2f} s: {tokens / seconds:.0f} tok/s"
        + (f" ({row['failed']} failed: {row['first_error']})" if row["failed"] else ""))
    return row


def floor_s(row: dict, pb: dict, ceil: dict) -> float:
    decode = sum(decode_floor_s(pb, b, ceil) for b in row["stats"]["decode_rows"])
    prefill = sum(row["stats"]["prefill_tokens"]) * 2 * active_params(pb) / ceil["bf16_flops_per_s"]
    return decode + prefill


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    same = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))
    total = sum(len(p) for p in a)
    prefix = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p)) for p, q in zip(a, b)]
    return {"equal_tokens": same / max(total, 1), "identical_requests": sum(p == q for p, q in zip(a, b)),
            "requests": len(a), "mean_equal_prefix": sum(prefix) / max(len(prefix), 1)}


def randomize_(model, std: float = 0.2) -> None:
    """Fresh N(0, std) weights (norm weights around 1): peaked next-token distributions, so that
    greedy tokens are not decided by rounding."""
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            shift = 1.0 if p.dim() == 1 and "norm" in name and name.endswith("weight") else 0.0
            p.copy_((torch.randn(p.shape, generator=g) * std + shift).to(p.device, p.dtype))


def tiny_models(max_positions: int, device: str = "cuda"):
    """(name, model): a tiny float32 JetMoE and PhiMoE on `device` (the GPU) with peaked random weights."""
    import moetorch

    for name, cfg in {"jetmoe": moetorch.JetMoeConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2,
                                                        num_key_value_heads=2, kv_channels=16, intermediate_size=48,
                                                        num_local_experts=4, max_position_embeddings=max_positions),
                      "phimoe": moetorch.PhimoeConfig(vocab_size=97, hidden_size=64, intermediate_size=48,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, num_local_experts=4,
                                                      max_position_embeddings=max_positions)}.items():
        cls = moetorch.JetMoeForCausalLM if name == "jetmoe" else moetorch.PhimoeForCausalLM
        model = cls(cfg).to(device).eval()
        randomize_(model)
        yield name, model


@torch.no_grad()
def tiny_check() -> dict:
    """A tiny float32 JetMoE and PhiMoE on the GPU, generate_batch (graphed, with cache shifts)
    against per-request generate (graphed): the share of equal tokens, and both sides'
    log-probabilities against an eager forward over prompt + tokens (float32: a wrong mask,
    position or slot shows as a difference far above rounding)."""
    import moetorch

    out = {}
    for name, model in tiny_models(64):
        prompts = workload(24, 1, 20, 97, seed=1)
        gen = moetorch.GenerationConfig(max_new_tokens=9, do_sample=False, eos_token_id=None, pad_token_id=0)
        res = model.generate_batch(prompts, generation_config=gen,
                                   continuous_batching_config={"max_requests_per_batch": 5, "max_cache_len": 40,
                                                               "max_batch_tokens": 32})
        mine = [r.generated_tokens for r in res.values()]
        ref = [model.generate(torch.tensor([p], device="cuda"), generation_config=gen, eos_token_id=None)[0, len(p):]
               .tolist() for p in prompts]
        out[name] = agreement(mine, ref)
        out[name]["logprob_max_diff"] = logprob_check(model, prompts, 9, {"max_requests_per_batch": 5,
                                                                         "max_cache_len": 40, "max_batch_tokens": 32})
        log(f"tiny {name}: {out[name]}")
    return out


@torch.no_grad()
def logprob_check(model, prompts, new: int, cb: dict | None = None) -> dict:
    """Real size, bf16: each request's generated tokens scored by one eager forward over prompt +
    tokens; the largest difference from the log-probabilities generate_batch reported, and the same
    for per-request `generate` (its scores), as the scale of bf16's own differences."""
    import moetorch

    gen = moetorch.GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    res = model.generate_batch(prompts, generation_config=gen,
                               continuous_batching_config={**(cb or {}), "return_logprobs": True})
    worst = {"generate_batch": 0.0, "generate": 0.0}
    for p, r in zip(prompts, res.values()):
        seq = torch.tensor([p + r.generated_tokens], device="cuda")
        ref = model(seq, use_cache=False).logits[0, len(p) - 1:-1].float().log_softmax(-1)
        got = torch.tensor(r.logprobs, device="cuda")
        expect = ref.gather(1, seq[0, len(p):, None]).squeeze(1)
        worst["generate_batch"] = max(worst["generate_batch"], float((got - expect).abs().max()))
        # (eos_token_id as a keyword: a config's None does not override the model's default)
        out = model.generate(torch.tensor([p], device="cuda"), generation_config=gen, output_scores=True,
                             return_dict_in_generate=True, eos_token_id=None)
        toks = out.sequences[0, len(p):]
        seq = out.sequences
        ref = model(seq, use_cache=False).logits[0, len(p) - 1:-1].float().log_softmax(-1)
        own = torch.stack([s[0].float().log_softmax(-1)[t] for s, t in zip(out.scores, toks)])
        worst["generate"] = max(worst["generate"], float((own - ref.gather(1, toks[:, None]).squeeze(1)).abs().max()))
    log(f"log-probabilities against an eager forward, largest difference: {worst}")
    return worst


def ab_parser() -> argparse.ArgumentParser:
    """The arguments of an A/B on the workload above (`alternating`)."""
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt", default="32:512")
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None)
    return p


def row_span(arm: str, default: int | None) -> int | None:
    """`batching.PAGED_ROW_SPAN` for an arm named `spanK` (K), else `default`."""
    return int(arm[len("span"):]) if arm.startswith("span") else default


def alternating(args, arms: tuple[str, str], run, done=None) -> dict:
    """An A/B on the workload above, per model of `args.models` (a random-weight model at the real
    size; `args.requests`, `args.prompt`, `args.new`): the two `arms` alternating over
    `args.rounds`, `run(model, prompts, arm)` giving a row with the requests' `outputs`.
    {model: {arm: [rows], "agreement": the arms' tokens compared}}, passed to `done` after each
    model too (to save what a later model's time limit would lose)."""
    lo, hi = (int(x) for x in args.prompt.split(":"))
    out = {}
    for name in args.models.split(","):
        cfg = dict(SIZES[name])
        prompts = workload(args.requests, lo, hi, cfg["vocab_size"])
        model = build(name, "moetorch", cfg)
        rows: dict = {arm: [] for arm in arms}
        outputs = {}
        for r in range(args.rounds):
            for arm in arms if r % 2 == 0 else arms[::-1]:
                got = run(model, prompts, arm)
                outputs[arm] = got.pop("outputs")
                got.pop("stats", None)
                rows[arm].append(got)
                log(f"{name} {arm}: {got['tokens_per_s']:.0f} tok/s, {got['rows']} rows (mean {got['mean_rows']:.0f}), "
                    f"decode {got['decode_s']:.2f} s in {got['decode_steps']} steps, prefill {got['prefill_s']:.2f} s "
                    f"in {got['prefill_forwards']}")
        rows["agreement"] = agreement(outputs[arms[0]], outputs[arms[1]])
        out[name] = rows
        if done is not None:
            done(out)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt", default="32:512", help="prompt lengths, LO:HI")
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--hf-requests", type=int, default=64)
    p.add_argument("--check", type=int, default=4)
    p.add_argument("--staggered", default="32:224", help="a third run with max_new_tokens uniform in LO:HI "
                   "per request (0:0: none)")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/batching.py needs a CUDA GPU")
    from moe_layer import save_json  # bench/ is the script's directory

    lo, hi = (int(x) for x in args.prompt.split(":"))
    args.staggered = tuple(int(x) for x in args.staggered.split(":"))
    ceil = measure_ceilings()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ceilings": ceil,
              "args": vars(args), "tiny_check": tiny_check(), "models": {}}
    for name in args.models.split(","):
        cfg = dict(SIZES[name])
        pb = param_bytes(cfg, name)
        prompts = workload(args.requests, lo, hi, cfg["vocab_size"])
        sub = prompts[: args.hf_requests]
        row: dict = {}
        log(f"{name}/moetorch: building")
        model = build(name, "moetorch", cfg)
        for key, ps in (("all", prompts), ("subset", sub)):
            r = timed_run(model, "moetorch", ps, args.new)
            r["floor_s"] = floor_s(r, pb, ceil)
            r["pct_of_floor"] = 100 * r["floor_s"] / r["seconds"]
            log(f"{name}/moetorch {key}: floor {r['floor_s']:.2f} s, {r['pct_of_floor']:.1f}% of it; "
                f"{r['decode_steps']} steps ({r['decode_s']:.2f} s), mean {r['mean_rows']:.1f} rows, {r['shifts']} "
                f"shifts; prefill {r['prefill_s']:.2f} s, {r['prefill_tokens']} tokens in {r['prefill_forwards']} "
                "forwards")
            row[f"moetorch_{key}"] = r
        row["logprob_check"] = logprob_check(model, prompts[: args.check], min(args.new, 32))
        lo_n, hi_n = args.staggered
        if hi_n:  # requests of different lengths: they leave and join at different steps
            rng = random.Random(1)
            r = timed_run(model, "moetorch", prompts, [rng.randint(lo_n, hi_n) for _ in prompts])
            r["floor_s"] = floor_s(r, pb, ceil)
            r["pct_of_floor"] = 100 * r["floor_s"] / r["seconds"]
            row["moetorch_staggered"] = r
            log(f"{name}/moetorch staggered: {r['pct_of_floor']:.1f}% of the floor; {r['decode_steps']} steps "
                f"({r['decode_s']:.2f} s), mean {r['mean_rows']:.1f} rows, {r['shifts']} shifts; prefill "
                f"{r['prefill_s']:.2f} s in {r['prefill_forwards']} forwards")
        del model
        gc.collect()
        torch.cuda.empty_cache()
        if not args.no_transformers:
            log(f"{name}/transformers: building")
            model = build(name, "transformers", cfg)
            try:
                r = timed_run(model, "transformers", sub, args.new)
            except Exception as e:  # noqa: BLE001 -- recorded in the result
                r = {"error": repr(e)[:500]}
                log(f"{name}/transformers: {r['error']}")
            row["transformers_subset"] = r
            if "outputs" in r and not r["failed"]:  # (other random weights: its tokens are not comparable)
                row["speedup_subset"] = row["moetorch_subset"]["tokens_per_s"] / r["tokens_per_s"]
                log(f"{name}: moetorch / transformers on {len(sub)} requests: {row['speedup_subset']:.1f}x")
            del model
            gc.collect()
            torch.cuda.empty_cache()
        for r in row.values():
            if isinstance(r, dict):
                r.pop("outputs", None)
                r.pop("stats", None)
        result["models"][name] = row
        save_json(args.out, result)
    save_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
