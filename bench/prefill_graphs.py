"""Continuous batching's prefill replayed from CUDA graphs (`engine.cuda_graph.GraphedPackedPrefill`)
on the GPU: checks, one prefill's time by group shape, and a closed loop of requests.

    PYTHONPATH=.:bench python bench/prefill_graphs.py --out r.json [--models jetmoe,phimoe]
        [--concurrency 32] [--loop-requests 192]

Random weights at the real sizes, bf16 (and tiny bf16 models for the checks). Arms: the eager
unpadded prefill (`batching.PREFILL_GRAPHS = False`) against the graphed one (None, the default).

- `check`: the varlen kernel over a static `Packed` (offsets read from a buffer, empty sequences
  after the real ones, the bucket's bounds) against the same sequences through `Packed.of`; then
  prefill groups through a batch: the graph's replays against the same padded forward run eagerly
  (the same kernels: bitwise equal expected), and against the unpadded eager forward (relative
  error of the logits and of the cached keys and values; the share of equal argmaxes).
- `prefill`: one group's wall time, host work included (each call synchronised), median of
  `--repeats`, per group shape.
- `loop`: a persistent manager keeps `--concurrency` requests in flight (each finished request is
  replaced by a new one, as a server's clients do) until `--loop-requests` are done, prompts of
  `--prompt` tokens and `--new` new tokens; after an untimed round of each, rounds alternate
  between the arms. Generated tokens/s, time to first token (p50, p90), prefill seconds and
  forwards.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch

from moetorch.benchmark import SIZES, build, log
from moetorch.engine import batching
from moetorch.ops.attention import Packed, packed_attention


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def check_static_attention() -> list[dict]:
    """The varlen kernel reading a static Packed (bounds = buckets, empty sequences after the real
    ones) against Packed.of over the same sequences."""
    rows = []
    rng = random.Random(0)
    for name, H, G in (("phimoe", 32, 8), ("jetmoe", 32, 16)):
        for lens_q, lens_k, slots, bounds in (
            ([100], [100], 2, (128, 128)),
            ([37, 200, 1], [37, 1224, 900], 8, (256, 2048)),
            ([rng.randint(1, 100) for _ in range(13)], None, 16, (2048, 4096)),
        ):
            lens_k = lens_k or [q + rng.choice([0, rng.randint(1, 200)]) for q in lens_q]
            q = torch.randn(bounds[0], H, 128, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(bounds[1], G, 128, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            # the padding as the runner lays it out: one more sequence with the rest of the tokens
            pad_q, pad_k = bounds[0] - sum(lens_q), bounds[1] - sum(lens_k)
            all_q, all_k = lens_q + [pad_q] * bool(pad_q), lens_k + [pad_k] * bool(pad_q)
            cu = Packed.offsets(all_q, all_k, slots).cuda()
            static = packed_attention(q, k, v, Packed.static(cu[0], cu[1], *bounds, max(lens_k)), 128**-0.5)
            n, nk = sum(lens_q), sum(lens_k)
            plain = packed_attention(q[:n], k[:nk], v[:nk], Packed.of(lens_q, lens_k, q.device), 128**-0.5)
            row = {"model": name, "sequences": len(lens_q), "slots": slots, "bounds": bounds,
                   "rel_err": rel(static[:n], plain), "bitwise": bool(torch.equal(static[:n], plain))}
            log(f"  static attention {row}")
            rows.append(row)
    return rows


def groups(vocab: int, rng: random.Random, system: list[int]) -> dict[str, tuple]:
    """name -> (prompts, shared prefix tokens per prompt) of the checked and timed prefill groups."""
    def toks(n: int) -> list[int]:
        return [rng.randrange(1, vocab) for _ in range(n)]

    out = {
        "1x128": [toks(128)],
        "1x512": [toks(512)],
        "1x2000": [toks(2000)],
        "4x32-512": [toks(rng.randint(32, 512)) for _ in range(4)],
        "16x16-128": [toks(rng.randint(16, 128)) for _ in range(16)],
        f"8x({len(system)}+64) shared": [system + toks(64) for _ in range(8)],
    }
    return {k: (v, [len(system) if k.endswith("shared") else 0] * len(v)) for k, v in out.items()}


class Bed:
    """A batch with a source row holding `system`'s keys, and the groups' rows."""

    def __init__(self, model, system: list[int], rows: int = 24, slots: int = 4096) -> None:
        self.batch = batching._Batch(model, rows=rows, slots=slots, graphs=True, share=False)
        self.batch.col = slots - 64
        self.source = rows - 1
        batching.PREFILL_GRAPHS = False
        self.batch.prefill([system + [1]], [self.source])
        self.first = self.batch.col - len(system) - 1

    def prefill(self, prompts: list[list[int]], prefix: list[int]) -> torch.Tensor:
        shared = [(self.source, self.first, p) if p else (0, 0, 0) for p in prefix]
        return self.batch.prefill(prompts, list(range(len(prompts))), shared)

    def slots(self, prompts) -> list[torch.Tensor]:
        L = max(map(len, prompts))
        return [t[:, :len(prompts), :, self.batch.col - L:self.batch.col].clone() for t in self.batch.cache._all]


@torch.no_grad()
def check_groups(model, vocab: int) -> dict:
    rng = random.Random(1)
    system = [rng.randrange(1, vocab) for _ in range(1024)]
    bed = Bed(model, system)
    out = {}
    for name, (prompts, prefix) in groups(vocab, rng, system).items():
        batching.PREFILL_GRAPHS = False
        unpadded = bed.prefill(prompts, prefix).clone()
        kv_unpadded = bed.slots(prompts)
        batching.PREFILL_GRAPHS = None
        runs = [bed.prefill(prompts, prefix).clone() for _ in range(3)]  # eager padded, captured, replayed
        kv = bed.slots(prompts)
        res = {"captured": bool(bed.batch.packed_graphs and any(e.graph is not None for e in
                                                                bed.batch.packed_graphs.entries.values())),
               "replay_equals_eager_padded": bool(torch.equal(runs[0], runs[1]) and torch.equal(runs[1], runs[2])),
               "logits_rel_err_vs_unpadded": rel(runs[2], unpadded),
               "kv_rel_err_vs_unpadded": max(rel(a, b) for a, b in zip(kv, kv_unpadded)),
               # keys by layer: rounding-level in the first, growing with depth where random weights
               # route chaotically (a near tie flips an expert)
               "keys_rel_err_by_layer": [rel(a, b) for a, b in zip(kv[0], kv_unpadded[0])],
               "same_argmax_vs_unpadded": float((runs[2].argmax(-1) == unpadded.argmax(-1)).float().mean())}
        layers = res["keys_rel_err_by_layer"]
        log(f"  {name}: {({k: v for k, v in res.items() if k != 'keys_rel_err_by_layer'})}, keys by layer "
            f"{layers[0]:.1e} .. {layers[len(layers) // 2]:.1e} .. {layers[-1]:.1e}")
        out[name] = res
        bed.batch.packed_graphs = None  # each group's graphs captured afresh (fewer held at once)
    return out


@torch.no_grad()
def time_groups(model, vocab: int, repeats: int) -> dict:
    rng = random.Random(2)
    system = [rng.randrange(1, vocab) for _ in range(1024)]
    bed = Bed(model, system)
    out = {}
    for name, (prompts, prefix) in groups(vocab, rng, system).items():
        res = {"tokens": sum(len(p) - s for p, s in zip(prompts, prefix))}
        for arm, mode in (("eager", False), ("graph", None)):
            batching.PREFILL_GRAPHS = mode
            for _ in range(3):  # compiles, captures
                bed.prefill(prompts, prefix)
            torch.cuda.synchronize()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                bed.prefill(prompts, prefix)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            res[f"{arm}_ms"] = statistics.median(times) * 1e3
        res["speedup"] = res["eager_ms"] / res["graph_ms"]
        log(f"  {name}: {res}")
        out[name] = res
        bed.batch.packed_graphs = None
    return out


def closed_round(manager, work: list[tuple[list[int], int]], concurrency: int, timeout: float = 120
                 ) -> tuple[list, float]:
    """`work` ((prompt, new tokens)) through a running `manager` with `concurrency` requests in
    flight, each finished one replaced by the next (as a server's clients do), with timestamps:
    the outputs in the order they finished, and the wall seconds."""
    t0 = time.perf_counter()
    issued, done = 0, []
    for _ in range(min(concurrency, len(work))):
        manager.add_request(work[issued][0], max_new_tokens=work[issued][1], record_timestamps=True)
        issued += 1
    while len(done) < len(work):
        r = manager.get_result(timeout=timeout)
        if r is None:
            raise RuntimeError(f"closed loop: no result within {timeout:g} s")
        if r.error is not None:
            raise RuntimeError(f"closed loop: {r.error}")
        done.append(r)
        if issued < len(work):
            manager.add_request(work[issued][0], max_new_tokens=work[issued][1], record_timestamps=True)
            issued += 1
    return done, time.perf_counter() - t0


@torch.no_grad()
def closed_loop(model, vocab: int, args) -> dict:
    import moetorch

    lo, hi = map(int, args.prompt.split(":"))
    new_lo, new_hi = map(int, args.new.split(":")) if ":" in args.new else (int(args.new),) * 2
    rng = random.Random(3)
    gen = moetorch.GenerationConfig(max_new_tokens=new_hi, do_sample=False, eos_token_id=None, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config={
        "max_requests_per_batch": 2 * args.concurrency, "max_cache_len": hi + new_hi + 512})
    manager.start()
    out: dict = {"eager": [], "graph": []}
    try:
        for rnd in range(-1, args.rounds):  # round -1: both arms once, untimed (compiles, captures)
            arms = (("eager", False), ("graph", None))
            for arm, mode in arms if rnd % 2 == 0 else arms[::-1]:
                batching.PREFILL_GRAPHS = mode
                work = [([rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))], rng.randint(new_lo, new_hi))
                        for _ in range(args.loop_requests)]
                prefill_s, forwards = manager.stats["prefill_s"], len(manager.stats["prefill_tokens"])
                done, wall = closed_round(manager, work, args.concurrency)
                ttft = sorted(r.timestamps[0] - r.created_time for r in done)
                row = {"round": rnd, "tokens_per_s": sum(len(r.generated_tokens) for r in done) / wall,
                       "wall_s": wall, "ttft_p50_ms": ttft[len(ttft) // 2] * 1e3,
                       "ttft_p90_ms": ttft[int(len(ttft) * 0.9)] * 1e3,
                       "prefill_s": manager.stats["prefill_s"] - prefill_s,
                       "prefill_forwards": len(manager.stats["prefill_tokens"]) - forwards}
                log(f"  loop {arm}: {row}")
                if rnd >= 0:
                    out[arm].append(row)
    finally:
        manager.stop(block=True)
        batching.PREFILL_GRAPHS = None
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--loop-requests", type=int, default=192)
    p.add_argument("--prompt", default="32:512", help="closed loop prompt lengths, LO:HI")
    p.add_argument("--new", default="32:224", help="closed loop new tokens per request, N or LO:HI")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--skip", default="", help="parts to skip: check,prefill,loop")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    from batching import tiny_models  # bench/ is the script's directory

    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args)}
    ok = True
    if "check" not in skip:
        result["static_attention"] = check_static_attention()
        ok &= all(r["rel_err"] < 1e-2 for r in result["static_attention"])
        result["tiny"] = {}
        for name, model in tiny_models(4096):
            log(f"tiny {name}:")
            res = check_groups(model.to(torch.bfloat16), model.config.vocab_size)
            result["tiny"][name] = res
            ok &= all(r["captured"] and r["replay_equals_eager_padded"] for r in res.values())
    for name in args.models.split(","):
        cfg = SIZES[name]
        log(f"{name}: building")
        model = build(name, "moetorch", cfg)
        res = result.setdefault(name, {})
        if "check" not in skip:
            res["check"] = check_groups(model, cfg["vocab_size"])
            ok &= all(r["replay_equals_eager_padded"] for r in res["check"].values())
        if "prefill" not in skip:
            res["prefill"] = time_groups(model, cfg["vocab_size"], args.repeats)
        if "loop" not in skip:
            res["loop"] = closed_loop(model, cfg["vocab_size"], args)
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
