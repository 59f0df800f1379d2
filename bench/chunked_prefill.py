"""Chunked prefill in continuous batching (`ContinuousBatchingConfig.prefill_chunk_tokens`) on the
GPU: a check on tiny models, then long prompts arriving while requests decode, with and without
chunks.

    PYTHONPATH=.:bench python bench/chunked_prefill.py --out r.json [--models jetmoe,phimoe]
        [--arms 0,2048] [--rounds 2]

- `check`: tiny float32 JetMoE and PhiMoE on the GPU, graphs on (a chunk's shape is captured on
  its second use, so later chunks replay graphs that read the prompt's own row as their prefix).
  Three requests decode while six prompts of 60-200 tokens join in chunks of 16; every request's
  tokens against per-request `generate`, and its log-probabilities against an eager forward over
  prompt + tokens. Then the same in bf16 (where the prefill graphs serve): replayed graphs against
  the same padded forwards run eagerly, bit for bit.
- `loop` (random weights at the real sizes, bf16): one manager; `--streams` requests of
  `--stream-prompt` tokens start decoding `--stream-new` tokens each, and `--long` prompts of
  `--long-tokens` tokens (`--long-new` new tokens) arrive one every `--every-ms` from
  `--first-ms` on. Arms: `prefill_chunk_tokens` values (0: whole prompts), each optionally with
  `:eager`, `:on` or `:off` for `batching.MIX_CHUNKS` (a chunk's forward carrying the running
  rows' decode step: only chunks that run eagerly, the default; every chunk, from a graph where
  one serves it; never); after an untimed round of each, rounds alternate the arms' order.
  Per arm: the decoding requests' gaps between consecutive tokens (p50, p99, max: how long a
  prefill held them up), the long prompts' time to first token, generated tokens/s, prefill
  seconds and forwards.
- `closed`: the same arms on short prompts arriving as others finish (`--concurrency` requests in
  flight, `--closed-requests` in all, prompts of 32-512 tokens, 32-224 new tokens), where no
  prompt is longer than a chunk but, while requests decode, a turn runs one prefill forward:
  generated tokens/s, time to first token, the decoding requests' token gaps.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time

import torch
from prefill_graphs import closed_round  # bench/ is the script's directory

from moetorch.benchmark import SIZES, build, log


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def gap_stats(outputs) -> dict:
    """The gaps between consecutive tokens of `outputs` (their timestamps): p50, p99, largest."""
    gaps = [b - a for r in outputs for a, b in zip(r.timestamps, r.timestamps[1:])]
    return {"gap_p50_ms": pct(gaps, 0.5) * 1e3, "gap_p99_ms": pct(gaps, 0.99) * 1e3, "gap_max_ms": max(gaps) * 1e3}


def collect(manager, count: int, timeout: float) -> dict:
    """The next `count` results of `manager`, by request id; an error (or none in `timeout`
    seconds) fails the run."""
    done = {}
    while len(done) < count:
        r = manager.get_result(timeout=timeout)
        if r is None or r.error is not None:
            raise RuntimeError(f"loop: {None if r is None else r.error}")
        done[r.request_id] = r
    return done


def keep(out: dict, label: str, arm: int, row: dict) -> None:
    """Log an arm's round and keep it unless it is the untimed one (round -1)."""
    log(f"  {label} {arm}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in row.items()))
    if row["round"] >= 0:
        out[str(arm)].append(row)


def tiny_run(model, plan: list[tuple]) -> tuple[dict, int, dict]:
    """The tiny workload `plan` ((id, prompt, new tokens)) through one manager, every request
    queued before the loop starts (four rows, chunks of 16): {id: output}, the prefill graphs
    captured, and the requests that ran in chunks and the chunk forwards that carried a decode
    step ({"chunked", "mixed"})."""
    import moetorch

    gen = moetorch.GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config={
        "max_requests_per_batch": 4, "max_cache_len": 320, "prefill_chunk_tokens": 16, "return_logprobs": True})
    for rid, p, n in plan:
        manager.add_request(p, request_id=rid, max_new_tokens=n)
    manager.start()
    got = {}
    while len(got) < len(plan) and (r := manager.get_result(timeout=300)) is not None:
        got[r.request_id] = r
    graphs = manager._batch.packed_graphs
    captured = sum(e.graph is not None for e in graphs.entries.values()) if graphs is not None else 0
    manager.stop(block=True, timeout=300)
    return got, captured, {k: manager.stats[k] for k in ("chunked", "mixed")}


def tiny_plan(rng: random.Random) -> list[tuple]:
    """Three requests that decode 60 tokens, then six prompts of 60-200 tokens (8 new tokens)."""
    plan = [(f"s{i}", [rng.randrange(1, 97) for _ in range(rng.randint(3, 12))], 60) for i in range(3)]
    return plan + [(f"l{i}", [rng.randrange(1, 97) for _ in range(rng.randint(60, 200))], 8) for i in range(6)]


@torch.no_grad()
def tiny_check() -> dict:
    from batching import tiny_models  # bench/ is the script's directory

    out = {}
    rng = random.Random(5)
    for name, model in tiny_models(512):
        plan = tiny_plan(rng)
        got, captured, chunked = tiny_run(model, plan)
        same, worst = 0, 0.0
        for rid, p, n in plan:
            ref = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=n, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
            r = got[rid]
            same += r.error is None and r.generated_tokens == ref
            seq = torch.tensor([p + r.generated_tokens], device="cuda")
            lsm = model(seq, use_cache=False).logits[0, len(p) - 1:-1].float().log_softmax(-1)
            expect = lsm.gather(1, seq[0, len(p):, None]).squeeze(1)
            worst = max(worst, float((torch.tensor(r.logprobs, device="cuda") - expect).abs().max()))
        out[name] = {"requests": len(plan), "same_tokens_as_generate": same, "logprob_max_diff": worst,
                     **chunked, "graphs_captured": captured}
        log(f"tiny {name}: {out[name]}")
    return out


@torch.no_grad()
def graph_check() -> dict:
    """Tiny bf16 models (where the varlen kernel, and so the prefill graphs, serve): the same
    chunked workload with the prefill graphs (captured on a shape's second use, then replayed,
    later chunks reading their own row as their prefix) and with the same padded forwards run
    eagerly. Same kernels: the tokens and log-probabilities are expected bit for bit equal."""
    from batching import tiny_models  # bench/ is the script's directory

    from moetorch.engine import cuda_graph

    out = {}
    rng = random.Random(6)
    for name, model in tiny_models(512):
        model = model.to(torch.bfloat16)
        plan = tiny_plan(rng)
        runs = {}
        capture_after = cuda_graph.PREFILL_CAPTURE_AFTER
        for arm, after in (("graphs", capture_after), ("eager_padded", 10**9)):  # eager: no shape is captured
            cuda_graph.PREFILL_CAPTURE_AFTER = after
            try:
                runs[arm] = tiny_run(model, plan)
            finally:
                cuda_graph.PREFILL_CAPTURE_AFTER = capture_after
        (a, captured, chunked), (b, _, _) = runs["graphs"], runs["eager_padded"]
        out[name] = {"requests": len(plan), **chunked, "graphs_captured": captured,
                     "same_tokens": sum(a[k].generated_tokens == b[k].generated_tokens for k in a),
                     "same_logprobs": sum(a[k].logprobs == b[k].logprobs for k in a)}
        log(f"graph check {name}: {out[name]}")
    return out


MIX = {"": "eager", "eager": "eager", "on": True, "off": False}  # "": the library's default


def arm_settings(manager, arm: str) -> None:
    """Set up an arm, "<prefill_chunk_tokens>[:<mix>]", on an idle manager."""
    from moetorch.engine import batching

    chunk, _, mix = arm.partition(":")
    if mix not in MIX:
        raise SystemExit(f"--arms: {arm!r}: the mix is one of on, eager, off")
    manager.chunk_tokens = int(chunk)  # the loop is idle: no request is queued or running
    batching.MIX_CHUNKS = MIX[mix]


@torch.no_grad()
def loop(model, vocab: int, args) -> dict:
    import moetorch

    rng = random.Random(7)
    arms = args.arms.split(",")
    gen = moetorch.GenerationConfig(max_new_tokens=args.stream_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config={
        "max_requests_per_batch": args.streams + args.long,
        "max_cache_len": args.long_tokens + args.long_new + args.stream_new + 512})
    manager.start()
    out: dict = {str(a): [] for a in arms}
    try:
        for rnd in range(-1, args.rounds):  # round -1: each arm once, untimed (compiles, captures)
            for arm in arms if rnd % 2 == 0 else arms[::-1]:
                arm_settings(manager, arm)
                streams = [[rng.randrange(1, vocab) for _ in range(args.stream_prompt)] for _ in range(args.streams)]
                longs = [[rng.randrange(1, vocab) for _ in range(args.long_tokens)] for _ in range(args.long)]
                stats0 = {k: (len(v) if isinstance(v, list) else v) for k, v in manager.stats.items()}
                t0 = time.perf_counter()
                ids = [manager.add_request(p, max_new_tokens=args.stream_new, record_timestamps=True) for p in streams]

                def arrive(longs=longs, t0=t0, tag=f"long{rnd}-{arm}"):
                    for i, p in enumerate(longs):
                        time.sleep(max(0.0, t0 + (args.first_ms + i * args.every_ms) / 1e3 - time.perf_counter()))
                        manager.add_request(p, request_id=f"{tag}-{i}", max_new_tokens=args.long_new,
                                            record_timestamps=True)

                driver = threading.Thread(target=arrive)
                driver.start()
                done = collect(manager, len(streams) + len(longs), 300)
                driver.join()
                wall = time.perf_counter() - t0
                ttft = [done[rid].timestamps[0] - done[rid].created_time for rid in done if rid.startswith("long")]
                row = {"round": rnd, "wall_s": wall,
                       "tokens_per_s": sum(len(r.generated_tokens) for r in done.values()) / wall,
                       **gap_stats([done[rid] for rid in ids]),
                       "streams_done_s": max(done[rid].timestamps[-1] for rid in ids) - t0,
                       "long_ttft_p50_ms": statistics.median(ttft) * 1e3, "long_ttft_max_ms": max(ttft) * 1e3,
                       "prefill_s": manager.stats["prefill_s"] - stats0["prefill_s"],
                       "prefill_forwards": len(manager.stats["prefill_tokens"]) - stats0["prefill_tokens"],
                       "chunked": manager.stats["chunked"] - stats0["chunked"],
                       "mixed": manager.stats["mixed"] - stats0["mixed"]}
                keep(out, "chunk", arm, row)
    finally:
        manager.stop(block=True)
    return out


@torch.no_grad()
def closed(model, vocab: int, args) -> dict:
    import moetorch

    rng = random.Random(3)
    arms = args.arms.split(",")
    gen = moetorch.GenerationConfig(max_new_tokens=224, do_sample=False, eos_token_id=None, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config={
        "max_requests_per_batch": 2 * args.concurrency, "max_cache_len": 512 + 224 + 512})
    manager.start()
    out: dict = {str(a): [] for a in arms}
    try:
        for rnd in range(-1, args.rounds):
            for arm in arms if rnd % 2 == 0 else arms[::-1]:
                arm_settings(manager, arm)
                work = [([rng.randrange(1, vocab) for _ in range(rng.randint(32, 512))], rng.randint(32, 224))
                        for _ in range(args.closed_requests)]
                forwards = len(manager.stats["prefill_tokens"])
                done, wall = closed_round(manager, work, args.concurrency, timeout=300)
                ttft = [r.timestamps[0] - r.created_time for r in done]
                row = {"round": rnd, "tokens_per_s": sum(len(r.generated_tokens) for r in done) / wall, "wall_s": wall,
                       "ttft_p50_ms": pct(ttft, 0.5) * 1e3, "ttft_p90_ms": pct(ttft, 0.9) * 1e3, **gap_stats(done),
                       "prefill_forwards": len(manager.stats["prefill_tokens"]) - forwards}
                keep(out, "closed, chunk", arm, row)
    finally:
        manager.stop(block=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--arms", default="0,2048", help="prefill_chunk_tokens values (0: whole prompts), each with "
                   "an optional :eager, :on or :off (batching.MIX_CHUNKS)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--stream-prompt", type=int, default=128)
    p.add_argument("--stream-new", type=int, default=512)
    p.add_argument("--long", type=int, default=8)
    p.add_argument("--long-tokens", type=int, default=8000)
    p.add_argument("--long-new", type=int, default=16)
    p.add_argument("--first-ms", type=float, default=200)
    p.add_argument("--every-ms", type=float, default=250)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--closed-requests", type=int, default=192)
    p.add_argument("--skip", default="", help="parts to skip: check,loop,closed")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args)}
    ok = True
    if "check" not in skip:
        result["tiny"] = tiny_check()
        ok &= all(r["same_tokens_as_generate"] == r["requests"] and r["logprob_max_diff"] < 1e-3 and r["chunked"]
                  for r in result["tiny"].values())
        result["graphs"] = graph_check()
        ok &= all(r["same_tokens"] == r["same_logprobs"] == r["requests"] and r["graphs_captured"] and r["chunked"]
                  for r in result["graphs"].values())
    if not {"loop", "closed"} <= skip:
        for name in args.models.split(","):
            cfg = SIZES[name]
            log(f"{name}: building")
            model = build(name, "moetorch", cfg)
            result[name] = {}
            if "loop" not in skip:
                result[name]["loop"] = loop(model, cfg["vocab_size"], args)
            if "closed" not in skip:
                result[name]["closed"] = closed(model, cfg["vocab_size"], args)
            del model
            torch.cuda.empty_cache()
    result["ok"] = bool(ok)
    log("ok" if ok else "FAILED")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
