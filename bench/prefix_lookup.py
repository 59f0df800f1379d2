"""Host time of the prefix index's look-up (`engine.prefixes.PrefixIndex.find`), which admission
calls for each waiting request (its cost, the pages it needs, the rows it takes).

    PYTHONPATH=. python bench/prefix_lookup.py --out r.json [--queries 256] [--rounds 5]

Each case fills an index with `holders` running rows whose prompts are one shared stem of `stem`
tokens and `tail` tokens of their own, then times `find` for `--queries` new prompts of the same
shape (best of `--rounds`, microseconds a look-up). The many-rows, one-system-prompt cases are a
server's: every row holds the same system prompt. It also times what admission does with each
request: three look-ups and its row added as a source, with the request's block hashes kept
between them (`memo`, as the batch keeps them) and hashed anew each time. CPU only; no model.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

from moetorch.engine.prefixes import PrefixIndex

CASES = [  # (holders, stem, tail)
    (8, 1024, 64), (128, 1024, 64), (255, 1024, 64), (128, 4096, 64), (128, 0, 1000), (255, 256, 256),
]


class _Request:
    def __init__(self, prompt: list[int], memo: bool = True) -> None:
        self.prompt, self.tokens, self.start, self.long = prompt, [], 0, False
        self.hash_memo = {} if memo else None


def lookup_us(holders: int, stem: int, tail: int, queries: int, rounds: int) -> tuple[float, float, float]:
    """(us a look-up, us an admission with kept hashes, us an admission hashing anew)."""
    g = random.Random(holders * 7919 + stem * 31 + tail)
    shared = [g.randrange(32000) for _ in range(stem)]
    index = PrefixIndex()
    for row in range(holders):
        index.running(row, _Request(shared + [g.randrange(32000) for _ in range(tail)]))
    prompts = [shared + [g.randrange(32000) for _ in range(tail)] for _ in range(queries)]
    best = [float("inf")] * 3
    for _ in range(rounds):
        t0 = time.perf_counter()
        for prompt in prompts:
            index.find(prompt)
        best[0] = min(best[0], time.perf_counter() - t0)
        for arm, memo in ((1, True), (2, False)):
            reqs = [_Request(p, memo) for p in prompts]
            t0 = time.perf_counter()
            for req in reqs:
                for _ in range(3):
                    index.find(req.prompt, memo=req.hash_memo)
                index.running(holders, req)  # the row it takes (one row, so the index keeps its size)
            best[arm] = min(best[arm], time.perf_counter() - t0)
        index.drop(holders)
    return tuple(b / queries * 1e6 for b in best)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out")
    a = p.parse_args()
    rows = []
    for holders, stem, tail in CASES:
        us, kept, anew = lookup_us(holders, stem, tail, a.queries, a.rounds)
        rows.append(dict(holders=holders, stem=stem, tail=tail, us_per_lookup=round(us, 1),
                         us_per_admission_kept_hashes=round(kept, 1), us_per_admission_hashed_anew=round(anew, 1)))
        print(f"{holders:4d} rows, stem {stem:5d} + {tail:4d} tokens: {us:8.1f} us a look-up; an admission "
              f"(3 look-ups, its row added) {kept:8.1f} us with kept hashes, {anew:8.1f} us hashing anew", flush=True)
    result = dict(bench="prefix_lookup", host=platform.processor() or platform.machine(),
                  python=platform.python_version(), queries=a.queries, rounds=a.rounds, rows=rows)
    if a.out:
        with open(a.out, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
