"""Prefix sharing in continuous batching (`allow_block_sharing`): the same workloads with it on
and off, interleaved, on one model.

    PYTHONPATH=.:bench python bench/prefix_sharing.py --out r.json [--models jetmoe,phimoe]

Workloads (random ids from 1, greedy, no EOS, so every request generates all its tokens):
- `system`: `--requests` prompts of one `--system`-token system prompt and a question of
  `--question` (LO:HI) tokens of their own, all queued at once (a dataset run through
  `generate_batch`);
- `chat`: `--chats` conversations of `--turns` turns; each turn's prompt is the turn before's
  prompt and reply and `--message` new tokens; a turn's requests are queued together once the
  turn before has finished (a chat server's follow-ups).

Each arm runs in one persistent manager, warmed on the same workload first; the cached prefixes
are cleared before the timed run, so the timed run shares only what it computes itself. The two
arms generate the same number of tokens; their outputs are compared (bf16 on random weights:
near-tied logits may flip, so the share of equal tokens is reported, not asserted).

A tiny float32 check first: prompts from a few shared beginnings through a small manager (few
rows, a short cache with shifts, second prefill phases), sharing on, against per-request
`generate` (tokens) and an eager forward over prompt + tokens (log-probabilities).
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time

import torch
from batching import agreement, tiny_models  # bench/ is the script's directory

from moetorch.benchmark import SIZES, build, log


def rand_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(1, vocab) for _ in range(n)]


def gen(new: int):
    import moetorch

    return moetorch.GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)


@torch.no_grad()
def tiny_check() -> dict:
    from moetorch.engine import batching

    batching.FOLLOW_MIN_TOKENS, keep = 0, batching.FOLLOW_MIN_TOKENS
    out = {}
    try:
        for name, model in tiny_models(128):
            rng = random.Random(1)
            heads = [rand_ids(rng, rng.randint(17, 40), 97) for _ in range(3)]
            prompts = [rng.choice(heads) + rand_ids(rng, rng.randint(0, 8), 97) for _ in range(24)]
            cb = {"max_requests_per_batch": 5, "max_cache_len": 80, "max_batch_tokens": 96, "return_logprobs": True}
            with model.continuous_batching_context_manager(gen(9), continuous_batching_config=cb) as m:
                ids = [m.add_request(p) for p in prompts]
                got = {}
                while len(got) < len(ids):
                    r = m.get_result(timeout=60)
                    got[r.request_id] = r
                shared = m.stats["shared_tokens"]
            res = [got[i] for i in ids]
            ref = [model.generate(torch.tensor([p], device="cuda"), generation_config=gen(9), eos_token_id=None)
                   [0, len(p):].tolist() for p in prompts]
            row = agreement([r.generated_tokens for r in res], ref)
            worst = 0.0
            for p, r in zip(prompts, res):
                seq = torch.tensor([p + r.generated_tokens], device="cuda")
                lp = model(seq, use_cache=False).logits[0, len(p) - 1:-1].float().log_softmax(-1)
                expect = lp.gather(1, seq[0, len(p):, None]).squeeze(1)
                worst = max(worst, float((torch.tensor(r.logprobs, device="cuda") - expect).abs().max()))
            row.update(shared_tokens=shared, prompt_tokens=sum(map(len, prompts)), logprob_max_diff=worst)
            out[name] = row
            log(f"tiny {name}: {row}")
    finally:
        batching.FOLLOW_MIN_TOKENS = keep
    return out


def system_workload(args, vocab: int) -> list[list[list[int]]]:
    rng = random.Random(0)
    lo, hi = (int(x) for x in args.question.split(":"))
    system = rand_ids(rng, args.system, vocab)
    return [[system + rand_ids(rng, rng.randint(lo, hi), vocab) for _ in range(args.requests)]]


def run_turns(m, first: list[list[int]], turns: int, message: int, vocab: int) -> tuple[list, float, float]:
    """Each turn's requests queued together once the turn before has finished; a turn's prompt is
    the one before's prompt and reply and `message` new ids. (outputs, seconds, seconds of the
    first turn)."""
    rng = random.Random(1)
    prompts, outputs, first_s = first, [], 0.0
    t0 = time.perf_counter()
    for k in range(turns):
        ids = [m.add_request(p) for p in prompts]
        got = {}
        while len(got) < len(ids):
            r = m.get_result(timeout=600)
            got[r.request_id] = r
        res = [got[i] for i in ids]
        if any(r.error for r in res):
            raise RuntimeError(next(r.error for r in res if r.error))
        outputs.append([r.generated_tokens for r in res])
        if k == 0:
            first_s = time.perf_counter() - t0
        prompts = [p + r.generated_tokens + rand_ids(rng, message, vocab) for p, r in zip(prompts, res)]
    torch.cuda.synchronize()
    return outputs, time.perf_counter() - t0, first_s


def arm(model, share: bool, first, turns: int, args, vocab: int, rows: int) -> dict:
    from moetorch.engine.batching import WorkloadHints

    longest = max(map(len, first)) + (turns - 1) * (args.new + args.message)
    hints = WorkloadHints(longest, args.new, len(first))
    # rows of just the slots the workload needs; as many rows as memory holds, at most `rows`
    cb = {"allow_block_sharing": share, "max_cache_len": -(-(longest + args.new) // 256) * 256}
    hints.num_requests = rows
    with model.continuous_batching_context_manager(gen(args.new), continuous_batching_config=cb,
                                                   persistent_manager=True, workload_hints=hints) as m:
        run_turns(m, first, turns, args.message, vocab)  # warm: graphs, prefill shapes
        batch = m._batch
        if batch.prefixes is not None:
            batch.prefixes.clear()
        for key in ("decode_rows", "prefill_tokens"):
            m.stats[key] = []
        m.stats.update(shifts=0, decode_s=0.0, prefill_s=0.0, shared_tokens=0)
        outputs, seconds, first_s = run_turns(m, first, turns, args.message, vocab)
        st = dict(m.stats)
    model.destroy_cached_continuous_batching_manager()
    tokens = sum(len(t) for turn in outputs for t in turn)
    row = {"sharing": share, "rows": m.rows, "slots": m.slots,
           "seconds": seconds, "first_turn_s": first_s, "generated_tokens": tokens,
           "tokens_per_s": tokens / seconds, "prefill_s": st["prefill_s"], "decode_s": st["decode_s"],
           "prefill_forwards": len(st["prefill_tokens"]), "prefill_tokens": sum(st["prefill_tokens"]),
           "shared_tokens": st["shared_tokens"], "decode_steps": len(st["decode_rows"]), "shifts": st["shifts"],
           "outputs": outputs}
    log(f"  sharing {'on ' if share else 'off'}: {seconds:.2f} s, {row['tokens_per_s']:.0f} tok/s; prefill "
        f"{st['prefill_s']:.2f} s in {row['prefill_forwards']} forwards, {row['prefill_tokens']} tokens computed, "
        f"{row['shared_tokens']} shared; decode {st['decode_s']:.2f} s, {row['decode_steps']} steps")
    return row


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--workloads", default="system,chat")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--system", type=int, default=1024, help="tokens of the shared system prompt")
    p.add_argument("--question", default="32:128", help="tokens of each request's own question, LO:HI")
    p.add_argument("--chats", type=int, default=64)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--first", default="256:768", help="tokens of a chat's first prompt, LO:HI")
    p.add_argument("--message", type=int, default=64, help="new tokens a later turn adds")
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/prefix_sharing.py needs a CUDA GPU")
    from moe_layer import save_json

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args),
              "tiny_check": tiny_check(), "models": {}}
    save_json(args.out, result)
    for name in args.models.split(","):
        cfg = dict(SIZES[name])
        vocab = cfg["vocab_size"]
        log(f"{name}: building")
        model = build(name, "moetorch", cfg)
        rows_out: dict = {}
        for wl in args.workloads.split(","):
            if wl == "system":
                first, turns, rows = system_workload(args, vocab)[0], 1, min(args.requests, 256)
            else:
                rng = random.Random(2)
                lo, hi = (int(x) for x in args.first.split(":"))
                first = [rand_ids(rng, rng.randint(lo, hi), vocab) for _ in range(args.chats)]
                turns, rows = args.turns, args.chats
            log(f"{name}/{wl}: {len(first)} requests, {turns} turn(s)")
            runs = []
            for r in range(args.rounds):
                for share in ((True, False) if r % 2 == 0 else (False, True)):
                    runs.append(arm(model, share, first, turns, args, vocab, rows))
            on = [x for x in runs if x["sharing"]]
            off = [x for x in runs if not x["sharing"]]
            flat = [t for turn in on[0]["outputs"] for t in turn]
            summary = {"agreement_on_off": agreement(flat, [t for turn in off[0]["outputs"] for t in turn]),
                       "seconds_on": sorted(x["seconds"] for x in on), "seconds_off": sorted(x["seconds"] for x in off),
                       "speedup_median": (sorted(x["seconds"] for x in off)[len(off) // 2]
                                          / sorted(x["seconds"] for x in on)[len(on) // 2])}
            for x in runs:
                x.pop("outputs")
            rows_out[wl] = {"runs": runs, **summary}
            log(f"{name}/{wl}: on {summary['seconds_on']} s, off {summary['seconds_off']} s, speed-up "
                f"{summary['speedup_median']:.2f}x; outputs on/off {summary['agreement_on_off']}")
            result["models"][name] = rows_out
            save_json(args.out, result)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    save_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
