"""Host time of the prefix index's look-up (`engine.prefixes.PrefixIndex.find`), which admission
calls for each waiting request (its cost, the pages it needs, the rows it takes).

    PYTHONPATH=. python bench/prefix_lookup.py --out r.json [--queries 256] [--rounds 5]

Each case fills an index with `holders` running rows whose prompts are one shared stem of `stem`
tokens and `tail` tokens of their own, then times `find` for `--queries` new prompts of the same
shape (best of `--rounds`, microseconds a look-up). The many-rows, one-system-prompt cases are a
server's: every row holds the same system prompt. CPU only; no model.
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
    def __init__(self, prompt: list[int]) -> None:
        self.prompt, self.tokens, self.start, self.long = prompt, [], 0, False


def lookup_us(holders: int, stem: int, tail: int, queries: int, rounds: int) -> float:
    g = random.Random(holders * 7919 + stem * 31 + tail)
    shared = [g.randrange(32000) for _ in range(stem)]
    index = PrefixIndex()
    for row in range(holders):
        index.running(row, _Request(shared + [g.randrange(32000) for _ in range(tail)]))
    prompts = [shared + [g.randrange(32000) for _ in range(tail)] for _ in range(queries)]
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for prompt in prompts:
            index.find(prompt)
        best = min(best, time.perf_counter() - t0)
    return best / queries * 1e6


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out")
    a = p.parse_args()
    rows = []
    for holders, stem, tail in CASES:
        us = lookup_us(holders, stem, tail, a.queries, a.rounds)
        rows.append(dict(holders=holders, stem=stem, tail=tail, us_per_lookup=round(us, 1)))
        print(f"{holders:4d} rows, stem {stem:5d} + {tail:4d} tokens: {us:8.1f} us a look-up", flush=True)
    result = dict(bench="prefix_lookup", host=platform.processor() or platform.machine(),
                  python=platform.python_version(), queries=a.queries, rounds=a.rounds, rows=rows)
    if a.out:
        with open(a.out, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
