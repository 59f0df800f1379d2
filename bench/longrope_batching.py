"""PhiMoE's LongRoPE in continuous batching on the GPU: requests past
`original_max_position_embeddings` run in the batch, each row with its own factor set, and a
request whose sequence passes the switch while it decodes is computed again with the long factors
in that step (`ContinuousBatchingManager._recompute`).

    PYTHONPATH=.:bench python bench/longrope_batching.py --out r.json [--parts check,loop]

- `check`: a tiny float32 PhiMoE with LongRoPE switching at 24 tokens, on the GPU with graphs on
  (the decode graphs read each row's factor set from a buffer). Requests that stay short, start
  past the switch, pass it while decoding, and a long prompt in chunks of 16; every request's
  tokens against its own `generate` call, and its log-probabilities against an eager forward over
  the prompt and the tokens before each. Then a tiny bf16 model, graphs on against graphs off
  (the same kernels eagerly): tokens and log-probabilities expected bit for bit equal.
- `logits`: PhiMoE at the real width, 2 layers, float32, LongRoPE at 4096 with random factor
  lists: the logits of prompts of 6000, 4097 and 1000 tokens packed in one forward, each with its
  own factor set, against each prompt's own forward (and with the sets swapped, for scale).
- `loop` (random weights at the real size, bf16, LongRoPE at 4096 with random factor lists): one
  manager: `--streams` requests decode while `--past` prompts of `--past-tokens` tokens (past
  the switch) and `--crossing` prompts of `--crossing-tokens` tokens (which pass it after
  4097 - `--crossing-tokens` new tokens) arrive, one every `--every-ms`. Arms (`--arms`): `batch`
  (they run in the batch, a recompute in chunks of `prefill_chunk_tokens` while others decode),
  `whole` (the same, each recompute in one forward: `batching.RECOMPUTE_CHUNKS = False`), `apart`
  (the same, the chunks' forwards carrying no decode step: `batching.MIX_CHUNKS = False`) and
  `alone` (each through `generate` under `manager.pause()`, holding the batch up between steps as
  the manager did before they ran in the batch). Per round: the streams' gaps between consecutive
  tokens, the long requests' time from arrival to first token, generated tokens/s and the
  recomputes (in chunks or whole).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch
from chunked_prefill import collect, gap_stats  # bench/ is the script's directory

from moetorch.benchmark import SIZES, build, log

ORIGINAL = 4096  # Phi-3.5-MoE's original_max_position_embeddings


def longrope(head_dim: int, original: int, seed: int = 0) -> dict:
    """A LongRoPE `rope_scaling` with random factor lists in the ranges of Phi-3.5-MoE's."""
    rng = random.Random(seed)
    return {"type": "longrope", "original_max_position_embeddings": original,
            "short_factor": [round(rng.uniform(1.0, 1.6), 3) for _ in range(head_dim // 2)],
            "long_factor": [round(rng.uniform(1.0, 60.0), 3) for _ in range(head_dim // 2)],
            "short_mscale": 1.243, "long_mscale": 1.243 if seed else 1.31}


def run(model, plan: list[tuple], cb: dict, timestamps: bool = False) -> tuple[dict, dict]:
    """`plan` ((id, prompt, new tokens)) through one manager, queued before it starts: {id:
    output}, its stats."""
    import moetorch

    gen = moetorch.GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    for rid, p, n in plan:
        manager.add_request(p, request_id=rid, max_new_tokens=n, record_timestamps=timestamps)
    manager.start()
    got = {}
    while len(got) < len(plan) and (r := manager.get_result(timeout=600)) is not None:
        if r.error is not None:
            raise RuntimeError(f"{r.request_id}: {r.error}")
        got[r.request_id] = r
    manager.stop(block=True, timeout=600)
    return got, manager.stats


def tiny_phimoe(dtype=torch.float32):
    from batching import randomize_  # bench/ is the script's directory

    import moetorch

    cfg = moetorch.PhimoeConfig(vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                max_position_embeddings=512, rope_scaling=longrope(16, 24))
    model = moetorch.PhimoeForCausalLM(cfg).cuda().eval()
    randomize_(model)
    return model.to(dtype)


def tiny_plan(rng: random.Random) -> list[tuple]:
    """Streams that pass the switch while decoding (prompts of 3-12 tokens, 40 new), prompts past
    it (30-100 tokens, 8 new; those past 16 tokens run in chunks while others decode), and a
    prompt of 24 (it passes at its first decode step)."""
    tok = lambda n: [rng.randrange(1, 97) for _ in range(n)]  # noqa: E731
    plan = [(f"s{i}", tok(rng.randint(3, 12)), 40) for i in range(3)]
    plan += [(f"p{i}", tok(rng.randint(30, 100)), 8) for i in range(4)]
    return plan + [("edge", tok(24), 6), ("short", tok(5), 10)]


@torch.no_grad()
def tiny_check() -> dict:
    rng = random.Random(5)
    model = tiny_phimoe()
    plan = tiny_plan(rng)
    cb = {"max_requests_per_batch": 4, "max_cache_len": 256, "prefill_chunk_tokens": 16, "return_logprobs": True}
    got, stats = run(model, plan, cb)
    same, worst = 0, 0.0
    for rid, p, n in plan:
        ref = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        r = got[rid]
        same += r.generated_tokens == ref
        seq = p + r.generated_tokens
        # each token's log-probability from a forward over the tokens before it (LongRoPE picks
        # its factors by that length)
        expect = torch.stack([model(torch.tensor([seq[:k]], device="cuda")).logits[0, -1].float().log_softmax(-1)[t]
                              for k, t in zip(range(len(p), len(seq)), r.generated_tokens)])
        worst = max(worst, float((torch.tensor(r.logprobs, device="cuda") - expect).abs().max()))
    out = {"requests": len(plan), "same_tokens_as_generate": same, "logprob_max_diff": worst,
           "recomputed": stats["recomputed"], "recomputed_in_chunks": stats["recomputed_in_chunks"],
           "chunked": stats["chunked"], "mixed": stats["mixed"]}
    log(f"tiny float32: {out}")
    model = tiny_phimoe(torch.bfloat16)
    runs = {arm: run(model, plan, dict(cb, use_cuda_graph=arm == "graphs"))[0] for arm in ("graphs", "eager")}
    a, b = runs["graphs"], runs["eager"]
    out["bf16_graphs_vs_eager"] = {"same_tokens": sum(a[k].generated_tokens == b[k].generated_tokens for k in a),
                                   "same_logprobs": sum(a[k].logprobs == b[k].logprobs for k in a)}
    log(f"tiny bf16 graphs against eager: {out['bf16_graphs_vs_eager']}")
    return out


@torch.no_grad()
def logits_check(layers: int = 2) -> dict:
    """PhiMoE at the real width with `layers` layers in float32 (a whole bf16 model of random
    weights is chaotic: near-tied routing flips with rounding, and its logits decorrelate from
    any other path's). Prompts on both sides of the switch packed in one forward, each with its
    own factor set (`packed_forward(..., long=)`), against each prompt's own forward (which picks
    its set by its length): relative error of the last logits. With the sets swapped, the error
    that a wrong set gives, for scale."""
    from moetorch.cache import StaticCache
    from moetorch.engine.cuda_graph import packed_forward

    cfg = dict(SIZES["phimoe"], num_hidden_layers=layers, rope_scaling=longrope(128, ORIGINAL, seed=1))
    model = build("phimoe", "moetorch", cfg, dtype=torch.float32)
    vocab = cfg["vocab_size"]
    rng = random.Random(9)
    prompts = [[rng.randrange(1, vocab) for _ in range(n)] for n in (6000, ORIGINAL + 1, 1000)]
    cache = StaticCache(model.config, max_cache_len=max(map(len, prompts)) + 16, max_batch_size=len(prompts),
                        device=model.device, dtype=model.dtype)
    cache.records_inputs = False
    ref = [model(torch.tensor([p], device=model.device), use_cache=False, logits_to_keep=1).logits[0, -1].float()
           for p in prompts]
    out = {"layers": layers, "dtype": "float32", "prompts": [len(p) for p in prompts]}
    for arm, long in (("own_sets", [True, True, False]), ("swapped_sets", [False, False, True])):
        got = packed_forward(model, cache, prompts, [0, 1, 2], [0, 0, 0], [(0, 0, 0)] * 3, None, long=long).float()
        out[arm] = {"rel_err": [float((g - r).norm() / r.norm()) for g, r in zip(got, ref)],
                    "same_argmax": [int(g.argmax()) == int(r.argmax()) for g, r in zip(got, ref)]}
    log(f"logits: {out}")
    del model
    torch.cuda.empty_cache()
    return out


@torch.no_grad()
def loop(args) -> dict:
    """One manager; per round, `--streams` requests start decoding and the long requests arrive
    one every `--every-ms` from `--first-ms` on. Arms: `batch` (they run in the batch), `whole`
    (the same with each recompute in one forward), `apart` (the same with no decode step riding in
    a chunk's forward) and `alone` (each runs through `generate` under
    `manager.pause()`, which holds the batch between steps as the manager did before such requests
    ran in the batch, its tokens delivered at the end); their order turns each round."""
    import threading

    import moetorch
    from moetorch.engine import batching

    cfg = dict(SIZES["phimoe"], rope_scaling=longrope(128, ORIGINAL, seed=1))
    log("phimoe: building")
    model = build("phimoe", "moetorch", cfg)
    vocab = cfg["vocab_size"]
    out: dict = {}
    rng = random.Random(7)
    tok = lambda n: [rng.randrange(1, vocab) for _ in range(n)]  # noqa: E731
    slots = args.slots or max(args.past_tokens + args.past_new, ORIGINAL + args.crossing_extra + 1,
                              args.stream_prompt + args.stream_new) + 64
    cross_new = ORIGINAL - args.crossing_tokens + 1 + args.crossing_extra
    gen = moetorch.GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config={
        "max_requests_per_batch": args.streams + args.past + args.crossing, "max_cache_len": slots})
    manager.start()
    arms = args.arms.split(",")
    out.update(slots=slots, **{arm: [] for arm in arms})
    try:
        for rnd in range(-1, args.rounds):  # round -1: each arm once, untimed (compiles, captures)
            for arm in arms[rnd % len(arms):] + arms[:rnd % len(arms)]:
                batching.RECOMPUTE_CHUNKS, batching.MIX_CHUNKS = arm != "whole", arm != "apart"
                streams = [tok(args.stream_prompt) for _ in range(args.streams)]
                longs = [(tok(args.past_tokens), args.past_new) for _ in range(args.past)]
                longs += [(tok(args.crossing_tokens), cross_new) for _ in range(args.crossing)]
                stats0 = {k: (len(v) if isinstance(v, list) else v) for k, v in manager.stats.items()}
                t0 = time.perf_counter()
                ids = [manager.add_request(p, max_new_tokens=args.stream_new, record_timestamps=True) for p in streams]
                firsts: dict[int, float] = {}  # long request -> seconds from its arrival to its first token

                def arrive(longs=longs, t0=t0, arm=arm, firsts=firsts, tag=f"long{rnd}-{arm}"):
                    for i, (p, n) in enumerate(longs):
                        due = t0 + (args.first_ms + i * args.every_ms) / 1e3
                        time.sleep(max(0.0, due - time.perf_counter()))
                        if arm != "alone":
                            manager.add_request(p, request_id=f"{tag}-{i}", max_new_tokens=n, record_timestamps=True)
                            continue
                        with manager.pause():
                            model.generate(torch.tensor([p], device=model.device), max_new_tokens=n, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)
                            torch.cuda.synchronize() if model.device.type == "cuda" else None
                        firsts[i] = time.perf_counter() - due

                driver = threading.Thread(target=arrive)
                driver.start()
                done = collect(manager, len(streams) + (len(longs) if arm != "alone" else 0), 600)
                driver.join()
                wall = time.perf_counter() - t0
                if arm != "alone":
                    for rid, r in done.items():
                        if rid.startswith("long"):
                            i = int(rid.rsplit("-", 1)[1])
                            firsts[i] = r.timestamps[0] - (t0 + (args.first_ms + i * args.every_ms) / 1e3)
                tokens = sum(len(r.generated_tokens) for r in done.values()) + (
                    sum(n for _, n in longs) if arm == "alone" else 0)
                row = {"round": rnd, "wall_s": wall, "tokens_per_s": tokens / wall,
                       **gap_stats([done[rid] for rid in ids]),
                       "streams_done_s": max(done[rid].timestamps[-1] for rid in ids) - t0,
                       "long_first_token_p50_ms": statistics.median(firsts.values()) * 1e3,
                       "long_first_token_max_ms": max(firsts.values()) * 1e3,
                       **{k: manager.stats[k] - stats0[k]
                          for k in ("recomputed", "recomputed_in_chunks", "chunked", "mixed")}}
                log(f"  {arm} round {rnd}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                                        for k, v in row.items()))
                if rnd >= 0:
                    out[arm].append(row)
    finally:
        batching.RECOMPUTE_CHUNKS, batching.MIX_CHUNKS = True, True
        manager.stop(block=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="check,logits,loop")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--stream-prompt", type=int, default=512)
    ap.add_argument("--stream-new", type=int, default=256)
    ap.add_argument("--past", type=int, default=2)
    ap.add_argument("--past-tokens", type=int, default=6000)
    ap.add_argument("--past-new", type=int, default=64)
    ap.add_argument("--crossing", type=int, default=2)
    ap.add_argument("--crossing-tokens", type=int, default=3968)
    ap.add_argument("--crossing-extra", type=int, default=64, help="new tokens after the switch")
    ap.add_argument("--slots", type=int, default=0, help="the rows' slots (0: the longest request + 64)")
    ap.add_argument("--first-ms", type=float, default=500)
    ap.add_argument("--every-ms", type=float, default=700)
    ap.add_argument("--arms", default="batch,whole,apart,alone", help="of batch, whole, apart, alone")
    args = ap.parse_args()
    parts = args.parts.split(",")
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args)}
    if "check" in parts:
        result["check"] = tiny_check()
    if "logits" in parts:
        result["logits"] = logits_check()
    if "loop" in parts:
        result["loop"] = loop(args)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    json.dump(result, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
