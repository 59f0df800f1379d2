"""Per-request settings in continuous batching on the GPU: a check of each path on tiny float32
models, then what the settings cost at the real sizes.

    PYTHONPATH=.:bench python bench/row_settings.py --out r.json [--models jetmoe,phimoe] [--requests 256]

Check (tiny JetMoE and PhiMoE, float32, graphed decode, 5 rows, cache shifts), each request of a
mixed batch against what it must give:
- penalties and logit bias (greedy): the tokens of the model's own `generate` with the same
  processors (`repetition_penalty`, `sequence_bias`, `FrequencyPresencePenaltyLogitsProcessor`),
  which the CPU tests compare with Transformers';
- top log-probabilities: an eager forward over prompt + tokens (ids equal, largest difference);
- seeded sampling at temperature > 0 with top-p and min-p: the same tokens in another batch
  composition (run alone);
- the per-row sampler's frequencies on the GPU: 20000 rows of one 5-token distribution, within
  5 sigma per token;
- a prompt scored as the server's `echo` does (`Engine.prompt_logprobs`) against a forward.

Cost (bf16, random weights at the real sizes): `--requests` prompts of 32-512 random tokens, 128
new tokens each (no EOS), through one persistent manager, arms interleaved over `--rounds`:
plain greedy; greedy with repetition, frequency and presence penalties on every request; every
request sampled with its own temperature / top-p / seed; greedy with 5 top log-probabilities.
Tokens per second and decode seconds per step (the manager's stats), medians. The manager
returns log-probabilities in every arm (as the server's does), so `plain` includes their cost.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time

import torch
from batching import randomize_, workload

from moetorch.benchmark import SIZES, build, log

DEVICE = "cuda"  # "cpu" with --cpu-smoke (the check alone, to try the script without a GPU)
ARMS = {
    "plain": {},
    "penalties": {"repetition_penalty": 1.1, "frequency_penalty": 0.5, "presence_penalty": 0.3},
    "sampled": "sampled",  # per request: temperature, top_p, seed
    "top_logprobs": {"top_logprobs": 5},
}


def tiny_models():
    import moetorch

    return {"jetmoe": moetorch.JetMoeForCausalLM(moetorch.JetMoeConfig(
                vocab_size=97, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16,
                intermediate_size=48, num_local_experts=4, max_position_embeddings=64)),
            "phimoe": moetorch.PhimoeForCausalLM(moetorch.PhimoeConfig(
                vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=4, max_position_embeddings=64))}


def run_requests(model, requests: list[tuple[list[int], dict]], new: int, cb: dict) -> list:
    import moetorch

    gen = moetorch.GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    with model.continuous_batching_context_manager(gen, continuous_batching_config=cb) as m:
        ids = [m.add_request(p, **kw) for p, kw in requests]
        got = {}
        while len(got) < len(ids):
            r = m.get_result(timeout=120)
            got[r.request_id] = r
    assert all(got[i].error is None for i in ids), [got[i].error for i in ids]
    return [got[i] for i in ids]


@torch.no_grad()
def tiny_check() -> dict:
    import moetorch
    from moetorch.engine import batching

    out = {}
    cb = {"max_requests_per_batch": 5, "max_cache_len": 40, "max_batch_tokens": 32, "return_logprobs": True}
    for name, model in tiny_models().items():
        model = model.to(DEVICE).eval()
        randomize_(model)
        prompts = workload(12, 1, 20, 97, seed=2)
        pens = [{"repetition_penalty": 1.8}, {"frequency_penalty": 1.2, "presence_penalty": 0.4},
                {"logit_bias": {5: 3.0, 7: -100.0}}, {"repetition_penalty": 0.7, "frequency_penalty": -0.5}]
        sampled = {"do_sample": True, "temperature": 0.9, "top_p": 0.9, "min_p": 0.05}
        kws = [pens[i % 4] if i < 8 else {**sampled, "seed": 100 + i} for i in range(len(prompts))]
        kws[0] = {**kws[0], "top_logprobs": 3}
        kws[5] = {"top_logprobs": 4}
        res = run_requests(model, list(zip(prompts, kws)), 9, cb)
        row = {"penalties_equal_generate": 0, "penalty_requests": 0}
        for p, kw, r in zip(prompts, kws, res):
            if kw.get("do_sample") or "top_logprobs" in kw and len(kw) == 1:
                continue
            procs = []
            if kw.get("frequency_penalty") or kw.get("presence_penalty"):
                procs.append(moetorch.FrequencyPresencePenaltyLogitsProcessor(
                    kw.get("frequency_penalty", 0.0), kw.get("presence_penalty", 0.0), prompt_length=len(p)))
            want = model.generate(torch.tensor([p], device=DEVICE), max_new_tokens=9, do_sample=False, pad_token_id=0,
                                  eos_token_id=None, repetition_penalty=kw.get("repetition_penalty", 1.0),
                                  sequence_bias={(t,): b for t, b in kw.get("logit_bias", {}).items()} or None,
                                  logits_processor=moetorch.LogitsProcessorList(procs))[0, len(p):].tolist()
            row["penalty_requests"] += 1
            row["penalties_equal_generate"] += r.generated_tokens == want
        # top log-probabilities (request 5 plain greedy; request 0 greedy with a penalty: its ids and
        # values are those of the penalized scores, checked on request 5 only) against a forward
        p, r = prompts[5], res[5]
        seq = torch.tensor([p + r.generated_tokens], device=DEVICE)
        lsm = model(seq, use_cache=False).logits[0, len(p) - 1:-1].float().log_softmax(-1)
        values, top_ids = lsm.topk(4)
        row["top_ids_equal"] = [[t for t, _ in top] for top in r.top_logprobs] == top_ids.tolist()
        row["top_values_max_diff"] = float((torch.tensor([[v for _, v in top] for top in r.top_logprobs],
                                                         device=DEVICE) - values).abs().max())
        # seeded sampling: the same tokens alone as in the mixed batch
        alone = [run_requests(model, [(prompts[i], kws[i])], 9, cb)[0].generated_tokens for i in range(8, 12)]
        row["seeded_equal_alone"] = sum(a == res[i].generated_tokens for a, i in zip(alone, range(8, 12)))
        row["seeded_requests"] = 4
        # the per-row sampler's frequencies on the GPU
        m = model.init_continuous_batching(generation_config=moetorch.GenerationConfig(max_new_tokens=2))
        probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03], device=DEVICE)
        n = 20000
        reqs = [batching._Request(str(i), [1], 2, frozenset(), False, False, batching.Sampling(True, top_p=0.999))
                for i in range(n)]
        for i, r in enumerate(reqs):  # as admission keys each request's draws
            r.seed = 1000003 * i
        tokens, _ = m._choose_per_row(probs.log().expand(n, -1).clone(), reqs)
        freq = torch.bincount(tokens, minlength=5).double() / n
        sigma = (probs.double() * (1 - probs.double()) / n).sqrt()
        row["sampler_max_sigma"] = float(((freq - probs.double()).abs() / sigma).max())
        # echo scoring, as the server runs it
        row["echo_max_diff"] = echo_check(model, prompts[3])
        row["ok"] = (row["penalties_equal_generate"] == row["penalty_requests"] and row["top_ids_equal"]
                     and row["top_values_max_diff"] < 1e-4 and row["seeded_equal_alone"] == 4
                     and row["sampler_max_sigma"] < 5 and row["echo_max_diff"] < 1e-4)
        out[name] = row
        log(f"tiny {name}: {row}")
    return out


def echo_check(model, ids: list[int]) -> float:
    from moetorch.serve.engine import Engine

    class Tok:  # the engine reads only these
        eos_token_id, pad_token_id = 1, 0

        def convert_tokens_to_ids(self, token):
            return None

    engine = Engine(model, Tok(), "tiny", max_model_len=40, max_batch=2)
    engine.start()
    try:
        chosen, _ = asyncio.run(engine.prompt_logprobs(ids, 2))
    finally:
        engine.stop()
    lsm = model(torch.tensor([ids], device=DEVICE)).logits[0, :-1].float().log_softmax(-1)
    want = lsm.gather(1, torch.tensor(ids[1:], device=DEVICE)[:, None]).squeeze(1)
    return float((torch.tensor(chosen[1:], device=DEVICE) - want).abs().max())


def arm_requests(arm: str, prompts: list[list[int]]) -> list[tuple[list[int], dict]]:
    if ARMS[arm] == "sampled":
        return [(p, {"do_sample": True, "temperature": 0.6 + 0.1 * (i % 5), "top_p": 0.9, "seed": i})
                for i, p in enumerate(prompts)]
    return [(p, dict(ARMS[arm])) for p in prompts]


@torch.no_grad()
def cost(name: str, requests: int, new: int, rounds: int) -> dict:
    import moetorch
    from moetorch.engine.batching import WorkloadHints

    cfg = dict(SIZES[name])
    log(f"{name}: building")
    model = build(name, "moetorch", cfg)
    prompts = workload(requests, 32, 512, cfg["vocab_size"])
    gen = moetorch.GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    hints = WorkloadHints(max(map(len, prompts)), new, len(prompts))
    times: dict[str, list] = {a: [] for a in ARMS}
    steps: dict[str, list] = {a: [] for a in ARMS}
    with model.continuous_batching_context_manager(gen, continuous_batching_config={"return_logprobs": True},
                                                   persistent_manager=True, workload_hints=hints) as m:
        for rnd in range(rounds + 1):  # round 0 warms every arm up
            for arm in ARMS:
                m.stats.update(decode_rows=[], decode_s=0.0, prefill_s=0.0)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                ids = [m.add_request(p, max_new_tokens=new, **kw) for p, kw in arm_requests(arm, prompts)]
                got = 0
                while got < len(ids):
                    r = m.get_result(timeout=300)
                    assert r.error is None, r.error
                    got += 1
                seconds = time.perf_counter() - t0
                if rnd:
                    times[arm].append(len(prompts) * new / seconds)
                    steps[arm].append(1e3 * m.stats["decode_s"] / max(len(m.stats["decode_rows"]), 1))
                log(f"{name} round {rnd} {arm}: {len(prompts) * new / seconds:.0f} tok/s, "
                    f"{1e3 * m.stats['decode_s'] / max(len(m.stats['decode_rows']), 1):.2f} ms a decode step")
    out = {a: {"tokens_per_s": statistics.median(times[a]), "decode_ms_per_step": statistics.median(steps[a]),
               "rounds_tokens_per_s": times[a]} for a in ARMS}
    for a in ARMS:
        out[a]["vs_plain"] = out[a]["tokens_per_s"] / out["plain"]["tokens_per_s"]
    model.destroy_cached_continuous_batching_manager()
    del model, m
    gc.collect()  # (the manager and the model refer to each other)
    torch.cuda.empty_cache()
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--cpu-smoke", action="store_true", help="the tiny check alone, on the CPU")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    global DEVICE
    if args.cpu_smoke:
        DEVICE = "cpu"
        print(tiny_check())
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench/row_settings.py needs a CUDA GPU")
    from moe_layer import save_json

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args)}
    if not args.no_check:
        result["tiny_check"] = tiny_check()
        save_json(args.out, result)
    result["cost"] = {}
    for name in args.models.split(","):
        result["cost"][name] = cost(name, args.requests, args.new, args.rounds)
        save_json(args.out, result)
    return 0 if all(r["ok"] for r in result.get("tiny_check", {}).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
