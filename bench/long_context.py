"""Decode after long prompts: graphed decode steps on a static cache of `context` + steps slots,
against Transformers' default path (a dynamic cache) on the same model and prompt, and against the
floor, which at long contexts counts the cached keys and values a step reads beside the weights.

    PYTHONPATH=. python bench/long_context.py --out r.json [--models jetmoe,phimoe] [--cases ...]

A case is BATCHxCONTEXT: each of BATCH rows is a random prompt of CONTEXT tokens, prefilled once
(`logits_to_keep=1`), then STEPS tokens are decoded, every row fed its prompt's last token each
step (as `moetorch bench` does). PhiMoE runs with LongRoPE as Phi-3.5-MoE configures it
(factors shaped like the real ones, 4096 original positions): a context past 4096 tokens decodes
in the long regime, and the prefill already runs in it. JetMoE's contexts stay within its 4096
positions.

Floor of a step: the weights it reads (`benchmark.decode_floor_s`: the expected distinct experts
for the batch) + every row's cached keys and values in every layer (context + the step's
position), over the copy bandwidth measured in the same run. Transformers decodes `--hf-steps`
tokens after its own prefill; its dynamic cache grows (and is copied) at each step, as in its
default `generate`.
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch

from moetorch.benchmark import SIZES, _ours_decode, build, cuda_time, decode_floor_s, log, measure_ceilings, param_bytes

CASES = {"jetmoe": "1x2048,1x4000,16x4000", "phimoe": "1x2048,1x8192,1x32768,16x8192"}
# Phi-3.5-MoE's rotary: LongRoPE over 4096 original positions (factors rising across the 64
# frequencies as the real ones do; their values do not change the speed)
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 4096,
            "short_factor": [1.0 + 1.5 * i / 63 for i in range(64)],
            "long_factor": [1.0 + 63.0 * (i / 63) ** 2 for i in range(64)],
            "short_mscale": 1.243163121016122, "long_mscale": 1.243163121016122}


def config(name: str) -> dict:
    cfg = dict(SIZES[name])
    if name == "phimoe":
        cfg["rope_parameters"] = dict(LONGROPE)
    return cfg


def parse_cases(text: str) -> list[tuple[int, int]]:
    cases = []
    for part in filter(None, text.split(",")):
        try:
            b, s = part.lower().split("x")
            cases.append((int(b), int(s)))
        except ValueError:
            raise SystemExit(f"--cases: {part!r} is not BATCHxCONTEXT (e.g. 1x8192)") from None
        if cases[-1][0] < 1 or cases[-1][1] < 1:
            raise SystemExit(f"--cases: {part!r} needs a positive batch and context")
    return cases


def kv_bytes_per_token(cfg: dict, name: str) -> int:
    """Bytes (bf16) of one token's keys and values over all layers."""
    G = cfg["num_key_value_heads"]
    d = cfg["kv_channels"] if name == "jetmoe" else cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * G * d * 2 * 2


def ours_ms(model, ids: torch.Tensor, steps: int) -> float:
    """Milliseconds a graphed decode step takes after `ids` is prefilled into a static cache (the
    decode driver of `moetorch bench`)."""
    return cuda_time(_ours_decode(model, ids, steps), repeats=3, warmup=1) / steps * 1e3


def hf_ms(model, ids: torch.Tensor, steps: int) -> float:
    """Milliseconds a Transformers decode step takes after its prefill of `ids` (dynamic cache)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = ids[:, -1:]

    def run():
        for _ in range(steps):
            model(tok, past_key_values=cache, use_cache=True, logits_to_keep=1)

    ms = cuda_time(run, repeats=1, warmup=1) / steps * 1e3  # the first steps after a prefill run slow
    return ms


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--cases", default=None, help="BATCHxCONTEXT,... for every model (default: per model, "
                   + "; ".join(f"{m} {c}" for m, c in CASES.items()) + ")")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--hf-steps", type=int, default=4)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/long_context.py needs a CUDA GPU")
    from moe_layer import save_json  # bench/ is the script's directory

    ceil = measure_ceilings()
    bw = ceil["copy_bytes_per_s"]
    log(f"copy {bw / 1e12:.2f} TB/s")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ceilings": ceil,
              "steps": args.steps, "hf_steps": args.hf_steps, "rows": []}
    libs = ["moetorch"] + ([] if args.no_transformers else ["transformers"])
    for name in args.models.split(","):
        cfg = config(name)
        cases = parse_cases(args.cases or CASES[name])
        cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], *(s + args.steps + 8 for _, s in cases))
        pb, kv = param_bytes(cfg, name), kv_bytes_per_token(cfg, name)
        g = torch.Generator(device="cuda").manual_seed(0)
        prompts = {(B, S): torch.randint(0, cfg["vocab_size"], (B, S), device="cuda", generator=g) for B, S in cases}
        times: dict = {lib: {} for lib in libs}
        for lib in libs:
            log(f"{name}/{lib}: building")
            model = build(name, lib, cfg)
            for B, S in cases:
                try:
                    if lib == "moetorch":
                        ms = ours_ms(model, prompts[B, S], args.steps)
                    else:
                        ms = hf_ms(model, prompts[B, S], args.hf_steps)
                except torch.OutOfMemoryError as e:
                    ms = None
                    log(f"{name}/{lib} {B}x{S}: out of memory ({str(e)[:100]})")
                times[lib][B, S] = ms
                if ms is not None:
                    log(f"{name}/{lib} {B}x{S}: {ms:.2f} ms/step, {B / ms * 1e3:.1f} tok/s")
                gc.collect()
                torch.cuda.empty_cache()
            del model
            gc.collect()
            torch.cuda.empty_cache()
        for B, S in cases:
            steps = args.steps
            kv_ms = B * kv * (S + (steps + 1) / 2) / bw * 1e3  # the mean step's context
            floor = decode_floor_s(pb, B, ceil) * 1e3 + kv_ms
            ours, hf = times["moetorch"][B, S], times.get("transformers", {}).get((B, S))
            row = {"model": name, "batch": B, "context": S, "floor_ms": floor, "kv_floor_ms": kv_ms,
                   "moetorch_ms": ours, "transformers_ms": hf,
                   "moetorch_tok_s": B / ours * 1e3 if ours else None,
                   "transformers_tok_s": B / hf * 1e3 if hf else None,
                   "pct_floor": floor / ours * 100 if ours else None,
                   "speedup": hf / ours if ours and hf else None}
            result["rows"].append(row)
    print(f"{'model':8s} {'case':>9s} {'floor ms':>9s} {'(kv)':>7s} {'ours ms':>8s} {'% floor':>8s} "
          f"{'tok/s':>8s} {'HF ms':>8s} {'x HF':>6s}")
    for r in result["rows"]:
        def f(x, spec):
            return format(x, spec) if x is not None else "-".rjust(len(format(0.0, spec)))
        print(f"{r['model']:8s} {str(r['batch']) + 'x' + str(r['context']):>9s} {r['floor_ms']:9.2f} "
              f"{r['kv_floor_ms']:7.2f} {f(r['moetorch_ms'], '8.2f')} {f(r['pct_floor'], '8.1f')} "
              f"{f(r['moetorch_tok_s'], '8.1f')} {f(r['transformers_ms'], '8.2f')} {f(r['speedup'], '6.1f')}")
    save_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
