"""Prefix sharing in the continuous batch (`ContinuousBatchingConfig.allow_block_sharing`).

A request whose prompt begins with tokens whose keys and values the batch's cache already holds
copies them instead of computing them. Keys are rotated by position, not by slot, so the slots of
positions 0 .. p - 1 of one row serve any sequence with the same first p tokens, wherever its
own slots lie.

The cache holds such tokens in two kinds of rows:
- a running request's row holds its prompt (from its prefill on);
- a finished request's row, until another request takes the row, holds its prompt and every
  generated token but the last (each token's keys are written by the step that feeds it). A
  follow-up turn of a chat, whose prompt is the last turn's prompt and reply and a new message,
  reuses all of it.

Sources are found by their first tokens in blocks of `BLOCK`: each block's hash is chained to the
blocks before it, so one dictionary look-up a block finds every source that shares the prompt up
to it. The match then goes on token by token into the next block, and is checked token by token
from the start (a hash names candidates, never decides). A prompt keeps at least its last token
to compute, whose logits give the first new token.

With LongRoPE (PhiMoE) a row's keys are rotated by one of two factor sets, its request's `long`
(a prompt past the switch, or a request that crossed it). Each set has its own hash chain, so a
prompt finds only rows rotated as its own prefill would rotate it.
"""

from __future__ import annotations

import itertools

# Tokens of a block: a source is found by whole blocks, and a shorter shared prefix is not used.
BLOCK = 16


class Source:
    """Tokens whose keys and values lie in slots `start ..` of `row`. A running request's source
    reads its start from the request (which a cache shift moves); a finished one keeps its own."""

    __slots__ = ("row", "tokens", "req", "_start", "hashes", "stamp", "mode")

    def __init__(self, row: int, tokens: list[int], stamp: int, req=None, start: int = 0, mode: bool = False,
                 memo: dict | None = None) -> None:
        self.row, self.tokens, self.req, self._start, self.stamp, self.mode = row, tokens, req, start, stamp, mode
        self.hashes = [h for _, h in block_hashes(tokens, len(tokens), mode, memo)]

    @property
    def start(self) -> int:
        return self.req.start if self.req is not None else self._start


def block_hashes(tokens: list[int], limit: int, mode: bool = False, memo: dict | None = None):
    """(end, chained hash) of each whole block within the first `limit` tokens, in order: each
    hash covers every token before `end` (computed as consumed, so a search may stop early). The
    chain starts from `mode` (LongRoPE's factor set), so that each set's hashes are its own.

    `memo`: a dict that the owner of a sequence that only grows keeps for it ({mode: the hashes
    of its first blocks}); `tokens` must be a prefix of that sequence. Hashes it holds are read
    back, and those computed are added: a request looked up several times, then added as a
    source, hashes each of its blocks once."""
    known = memo.setdefault(mode, []) if memo is not None else None
    h, done = int(mode), 0
    if known:
        for h in known[:limit // BLOCK]:
            done += BLOCK
            yield done, h
    for j in range(done + BLOCK, limit + 1, BLOCK):
        h = hash((h, tuple(tokens[j - BLOCK:j])))
        if known is not None:
            known.append(h)
        yield j, h


class PrefixIndex:
    """The rows whose cached tokens a new prompt may start from (see the module's docstring)."""

    def __init__(self) -> None:
        self._by_hash: dict[int, dict[int, Source]] = {}  # block hash -> {id(source): source}
        self._rows: dict[int, Source] = {}  # row -> its source (running or finished)
        self._clock = itertools.count()

    def __len__(self) -> int:
        return len(self._rows)

    def _add(self, src: Source) -> None:
        self.drop(src.row)
        self._rows[src.row] = src
        for h in src.hashes:
            self._by_hash.setdefault(h, {})[id(src)] = src

    def drop(self, row: int) -> None:
        """The row is taken (or its slots are lost): its tokens are no source any more."""
        src = self._rows.pop(row, None)
        if src is None:
            return
        for h in src.hashes:
            holders = self._by_hash.get(h)
            if holders is not None:
                holders.pop(id(src), None)
                if not holders:
                    del self._by_hash[h]

    def clear(self) -> None:
        self._by_hash.clear()
        self._rows.clear()

    def running(self, row: int, req) -> None:
        """A request now runs in `row`, its prompt's keys in its slots from `req.start` on."""
        self._add(Source(row, req.prompt, next(self._clock), req=req, mode=getattr(req, "long", False),
                         memo=getattr(req, "hash_memo", None)))

    def finished(self, row: int, req) -> None:
        """The request of `row` finished: its prompt and generated tokens but the last stay."""
        tokens = req.prompt + req.tokens[:-1]
        self._add(Source(row, tokens, next(self._clock), start=req.start, mode=getattr(req, "long", False),
                         memo=getattr(req, "hash_memo", None)))

    def finished_rows(self) -> dict[int, int]:
        """Finished sources' rows -> their first slot."""
        return {row: s.start for row, s in self._rows.items() if s.req is None}

    def finished_spans(self) -> dict[int, tuple[int, int]]:
        """Finished sources' rows -> the [first, end) slots of their tokens."""
        return {row: (s.start, s.start + len(s.tokens)) for row, s in self._rows.items() if s.req is None}

    def age(self, row: int) -> int:
        """How recently the row's source was added (-1: no source): the oldest go first."""
        src = self._rows.get(row)
        return -1 if src is None else src.stamp

    def shift(self, lo: int, d: int) -> None:
        """The cache moved its slots `lo ..` by -d: finished sources there move along, those that
        start before `lo` are lost (running ones follow their requests)."""
        for row, src in list(self._rows.items()):
            if src.req is not None:
                continue
            if src.start >= lo:
                src._start -= d
            else:
                self.drop(row)

    def find(self, prompt: list[int], users: dict[int, int] | None = None,
             mode: bool = False, memo: dict | None = None) -> tuple[Source, int] | None:
        """The source sharing the longest prefix with `prompt` (at least a block, at most all but
        its last token), and that prefix's length; None if none does. Among sources that share as
        much, the one on the row with the fewest `users` (row -> requests that start from it), then
        the newest. Only sources of LongRoPE factor set `mode` count. `memo`: the prompt's
        hashes kept between look-ups (`block_hashes`)."""
        limit = len(prompt) - 1
        best = None
        for j, h in block_hashes(prompt, limit, mode, memo):
            holders = self._by_hash.get(h)
            if not holders:
                break
            best = (j, holders)
        if best is None:
            return None
        j, holders = best
        # rank the holders by what they would share, then check the first j tokens of the best
        # alone (a hash collision drops it for the next): many rows holding one long system
        # prompt each cost a few token compares, not a compare of the whole prefix
        get, nxt, ranked = (users or {}).get, prompt[j], []
        for src in holders.values():
            if src.mode != mode:
                continue
            toks, p = src.tokens, j
            if len(toks) > j and toks[j] == nxt:  # it shares tokens past the block (else: j)
                end = min(limit, len(toks))
                while p < end and toks[p] == prompt[p]:
                    p += 1
            ranked.append((p, -get(src.row, 0), src.stamp, src))  # (stamps differ: sources never compared)
        if not ranked:
            return None
        best = max(ranked)
        if best[3].tokens[:j] == prompt[:j]:
            return best[3], best[0]
        ranked.sort(reverse=True)  # a hash collision: the next ones in order
        for p, _, _, src in ranked[1:]:
            if src.tokens[:j] == prompt[:j]:
                return src, p
        return None
