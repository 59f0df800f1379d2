"""Chunked prefill in continuous batching (`ContinuousBatchingConfig.prefill_chunk_tokens`): while
requests decode, a prompt longer than a chunk is computed in chunks with a decode step of the
running rows between them, and every request still gives Transformers' tokens."""

from __future__ import annotations

import random

import pytest
import torch
from archs import ARCH_IDS, ARCHS
from parity import greedy_config as config
from parity import make_pair, run_queued

import moetorch
from moetorch.engine import batching

# every test on the static cache and on the paged one (conftest.cache_layout)
pytestmark = pytest.mark.usefixtures("cache_layout")


@pytest.fixture(scope="module", params=ARCHS, ids=ARCH_IDS)
def pair(request, tmp_path_factory):
    return make_pair(request.param, tmp_path_factory.mktemp(request.param.name))


def prompt(seed: int, n: int, vocab: int = 97) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, vocab - 1) for _ in range(n)]


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


@pytest.fixture
def events(monkeypatch):
    """What the batch ran, in order: ("forward", tokens computed, column) for each prefill forward
    and ("step", rows, column) for each decode step; a chunk's forward that carries a decode step
    (`_Batch.mixed`) counts as both, in that order, as the two run without it. `mixed` lists the
    columns of those forwards."""
    seen = _Events()
    forward, step, mixed = batching._Batch.forward, batching._Batch.step, batching._Batch.mixed

    def spy_forward(self, prompts, rows, starts, shared, **kw):
        seen.append(("forward", sum(len(p) - s[2] for p, s in zip(prompts, shared)), self.col))
        return forward(self, prompts, rows, starts, shared, **kw)

    def spy_step(self, b):
        seen.append(("step", b, self.col))
        return step(self, b)

    def spy_mixed(self, prompt, row, start, shared, long, b):
        seen.extend([("forward", len(prompt) - shared[2], self.col), ("step", b, self.col)])
        seen.mixed.append(self.col)
        return mixed(self, prompt, row, start, shared, long, b)

    monkeypatch.setattr(batching._Batch, "forward", spy_forward)
    monkeypatch.setattr(batching._Batch, "step", spy_step)
    monkeypatch.setattr(batching._Batch, "mixed", spy_mixed)
    return seen


class _Events(list):
    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[int] = []


def chunk_runs(events: list, sizes: set[int]) -> list[list[tuple]]:
    """Runs of events that hold the forwards of one chunked prompt: forwards of the given sizes,
    and the steps between them."""
    runs, cur = [], []
    for e in [*events, ("end", 0, 0)]:
        if e[0] == "forward" and e[1] in sizes:
            cur.append(e)
        elif e[0] == "step" and cur:
            cur.append(e)
        elif cur:
            while cur[-1][0] == "step":
                cur.pop()
            runs.append(cur)
            cur = []
    return runs


def run_manager(model, cb: dict, requests: list[tuple], n: int = 8, inside=None) -> tuple[dict, object]:
    """The requests ((id, prompt, add_request settings)), all queued before the loop starts, through
    one manager: {id: final output}, and the manager. `inside(manager, batch)` runs in the loop's
    thread at each prefill forward, with the forward's prompts."""
    return run_queued(model, config(n), cb, requests, inside)


@pytest.fixture
def hooked(monkeypatch):
    """Calls a manager's `inside(manager, batch, prompts)` (when set) at each prefill forward (a
    chunk's forward that carries a decode step too)."""
    forward, mixed = batching._Batch.forward, batching._Batch.mixed
    managers = []

    def look(batch, prompts):
        for m in managers:
            if getattr(m, "inside", None) is not None and m._batch is batch:
                m.inside(m, batch, prompts)

    def spy(self, prompts, *args, **kw):
        look(self, prompts)
        return forward(self, prompts, *args, **kw)

    def spy_mixed(self, prompt, *args):
        look(self, [prompt])
        return mixed(self, prompt, *args)

    original_init = batching.ContinuousBatchingManager.__init__

    def init(self, *args, **kw):
        original_init(self, *args, **kw)
        managers.append(self)

    monkeypatch.setattr(batching._Batch, "forward", spy)
    monkeypatch.setattr(batching._Batch, "mixed", spy_mixed)
    monkeypatch.setattr(batching.ContinuousBatchingManager, "__init__", init)
    return managers


# Two rows: "b" (row 0) ends after two tokens, "a" (row 1) decodes for a while, and the request
# after them joins in b's row, inside the decode steps' rows, while a decodes.
def around(long_request: tuple, a_new: int = 12, **a_settings) -> list[tuple]:
    return [("b", prompt(2, 4), {"max_new_tokens": 2}), ("a", prompt(1, 5), {"max_new_tokens": a_new, **a_settings}),
            long_request]


@pytest.mark.parametrize("mix", ["eager", True, False], ids=["mixed-eager", "mixed", "apart"])
@pytest.mark.parametrize("lag", [0, 1])
def test_a_long_prompt_joins_in_chunks(pair, events, padded, lag, mix, monkeypatch):
    """When b ends, a 29-token prompt joins in chunks of at most 6 tokens (5 chunks of 5-6) while
    a decodes, one decode step between each two; every request gives Transformers' greedy tokens
    and the log-probabilities of Transformers' forward. The chunks but the last carry that decode
    step in their forward (`MIX_CHUNKS`): by default those that run unpadded (eagerly), with True
    those padded to a graph's shape too."""
    hf, ours = pair
    monkeypatch.setattr(batching, "READ_LAG", lag)
    monkeypatch.setattr(batching, "MIX_CHUNKS", mix)
    requests = around(("long", prompt(3, 29), {"max_new_tokens": 5}))
    cb = {"max_requests_per_batch": 2, "max_cache_len": 64, "prefill_chunk_tokens": 6, "return_logprobs": True}
    got, manager = run_manager(ours, cb, requests)
    assert manager.stats["chunked"] == 1
    for rid, ids, kw in requests:
        res = got[rid]
        assert res.error is None and res.generated_tokens == hf_greedy(hf, ids, kw["max_new_tokens"]), rid
        seq = torch.tensor([ids + res.generated_tokens])
        with torch.no_grad():
            lsm = hf(seq).logits[0, len(ids) - 1:-1].float().log_softmax(-1)
        expect = lsm.gather(1, seq[0, len(ids):, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(res.logprobs), expect, atol=1e-4, rtol=1e-4)
    forwards = [e[1] for e in events if e[0] == "forward"]
    assert forwards == [9, 5, 6, 6, 6, 6]  # a and b, then the chunks
    (run,) = chunk_runs(events, {5, 6})
    assert [e[0] for e in run] == ["forward", "step"] * 4 + ["forward"]
    cols = [e[2] for e in run if e[0] == "forward"]
    assert cols == list(range(cols[0], cols[0] + 5))
    mixes = mix is True or (mix == "eager" and not padded)  # padded: a graph's shape (run eagerly on the CPU)
    assert events.mixed == (cols[:4] if mixes else []) and manager.stats["mixed"] == len(events.mixed)


def test_nothing_decoding_means_no_chunks(pair, events):
    """A long prompt that finds no request decoding runs in one forward; with
    `prefill_chunk_tokens=0` it runs in one forward while another decodes."""
    hf, ours = pair
    long = prompt(4, 23)
    cb = {"max_requests_per_batch": 2, "max_cache_len": 64, "prefill_chunk_tokens": 4}
    got, manager = run_manager(ours, cb, [("long", long, {"max_new_tokens": 4})])
    assert got["long"].generated_tokens == hf_greedy(hf, long, 4)
    assert [e[1] for e in events if e[0] == "forward"] == [23] and manager.stats["chunked"] == 0
    events.clear()
    cb["prefill_chunk_tokens"] = 0
    requests = around(("long", long, {"max_new_tokens": 4}))
    got, manager = run_manager(ours, cb, requests)
    for rid, ids, kw in requests:
        assert got[rid].generated_tokens == hf_greedy(hf, ids, kw["max_new_tokens"]), rid
    assert [e[1] for e in events if e[0] == "forward"] == [9, 23] and manager.stats["chunked"] == 0


def test_short_groups_take_one_forward_a_turn(pair, events):
    """While requests decode, waiting prompts join in forwards of at most a chunk's tokens, one a
    turn, each followed by a decode step."""
    hf, ours = pair
    first = [("a", prompt(1, 5), {"max_new_tokens": 20})] + [(f"b{i}", prompt(2 + i, 4), {"max_new_tokens": 2})
                                                              for i in range(3)]
    later = [(str(i), prompt(10 + i, 3), {}) for i in range(6)]
    cb = {"max_requests_per_batch": 4, "max_cache_len": 64, "prefill_chunk_tokens": 7}
    got, manager = run_manager(ours, cb, first + later)
    for rid, ids, kw in first + later:
        assert got[rid].generated_tokens == hf_greedy(hf, ids, kw.get("max_new_tokens", 8)), rid
    sizes = [e[1] for e in events if e[0] == "forward"]
    assert sizes[0] == 17 and all(s <= 7 for s in sizes[1:]) and sum(sizes[1:]) == 18, sizes
    kinds = [e[0] for e in events]
    assert all(kinds[i + 1] == "step" for i in range(1, len(kinds) - 1) if kinds[i] == "forward")


def test_running_rows_end_mid_prompt(pair, events):
    """a ends a step or two after a 31-token prompt starts in chunks of 4: with nothing left to
    decode the column moves on alone, and the prompt still gives Transformers' tokens."""
    hf, ours = pair
    long = prompt(8, 31)
    requests = around(("long", long, {"max_new_tokens": 6}), a_new=3)
    cb = {"max_requests_per_batch": 2, "max_cache_len": 64, "prefill_chunk_tokens": 4}
    got, manager = run_manager(ours, cb, requests)
    for rid, ids, kw in requests:
        assert got[rid].generated_tokens == hf_greedy(hf, ids, kw["max_new_tokens"]), rid
    assert manager.stats["chunked"] == 1
    (run,) = chunk_runs(events, {3, 4})
    cols = [e[2] for e in run if e[0] == "forward"]
    assert cols == list(range(cols[0], cols[0] + 8))
    assert sum(e[0] == "step" for e in run) < 7  # some chunks ran with no step before them


def test_chunks_from_a_shared_prefix(pair):
    """A long prompt that starts with a decoding request's whole prompt copies it with its first
    chunk and computes the rest in chunks; its tokens are Transformers'."""
    hf, ours = pair
    base = prompt(9, 20)
    follow = base + prompt(10, 14)
    requests = [("a", base, {"max_new_tokens": 10}), ("b", prompt(2, 4), {"max_new_tokens": 2}),
                ("follow", follow, {"max_new_tokens": 4})]
    cb = {"max_requests_per_batch": 2, "max_cache_len": 80, "prefill_chunk_tokens": 5, "allow_block_sharing": True}
    got, manager = run_manager(ours, cb, requests)
    for rid, ids, kw in requests:
        assert got[rid].generated_tokens == hf_greedy(hf, ids, kw["max_new_tokens"]), rid
    assert manager.stats["chunked"] == 1
    assert manager.stats["shared_tokens"] == 20
    assert manager.stats["prefill_tokens"] == [24, 4, 5, 5]


def test_penalties_and_seeded_draws_in_chunks(pair, hooked):
    """A chunked request's token counts start from its prompt when its last chunk runs, though the
    decode steps between its chunks count throwaway tokens in its row (a, decoding, has a penalty
    too), so its repetition penalty gives Transformers' tokens; a seeded sampled request draws the
    same tokens chunked as alone."""
    hf, ours = pair
    long = prompt(12, 26)
    cb = {"max_requests_per_batch": 2, "max_cache_len": 64, "prefill_chunk_tokens": 5}
    at_last_chunk = []

    def look(manager, batch, prompts):
        ch = manager._chunked
        if ch is not None and prompts == [long] and batch.counts is not None:  # its last chunk
            at_last_chunk.append((batch.counts.generated[ch.row].sum().item(),
                                  batch.counts.prompt[ch.row].nonzero().flatten().tolist()))

    def run(chunked: bool, **kw) -> list[int]:
        request = ("long", long, {"max_new_tokens": 8, **kw})
        got, manager = run_manager(ours, cb, around(request, repetition_penalty=2.0) if chunked else [request],
                                   inside=look)
        assert manager.stats["chunked"] == int(chunked)
        return got["long"].generated_tokens

    ref = hf.generate(torch.tensor([long]), max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None,
                      repetition_penalty=3.0)[0, len(long):].tolist()
    assert run(True, repetition_penalty=3.0) == ref
    assert ref != hf_greedy(hf, long, 8)  # the penalty bites
    assert at_last_chunk == [(0, sorted(set(long)))]
    at_last_chunk.clear()
    sampled = {"do_sample": True, "temperature": 1.5, "seed": 1234}
    assert run(True, **sampled) == run(False, **sampled)


def test_cancel_and_hard_stop_mid_prompt(pair, hooked):
    """A request cancelled between its chunks fails as cancelled, and the request queued after it
    takes its row; a hard stop fails a request mid-prompt."""
    hf, ours = pair
    long = prompt(14, 40)
    after = ("after", prompt(15, 6), {"max_new_tokens": 3})
    cb = {"max_requests_per_batch": 2, "max_cache_len": 96, "prefill_chunk_tokens": 2}

    def cancel_at_third_chunk(manager, batch, prompts):
        if manager._chunked is not None and len(manager._chunked.sizes) == 18:
            manager.cancel_request("long")

    requests = [*around(("long", long, {"max_new_tokens": 2}), a_new=30), after]
    got, manager = run_manager(ours, cb, requests, inside=cancel_at_third_chunk)
    assert got["long"].status == moetorch.RequestStatus.FAILED and got["long"].error == "cancelled"
    assert manager.stats["chunked"] == 2 and manager._chunked is None  # after, in chunks too
    for rid, ids, kw in [*requests[:2], after]:
        assert got[rid].error is None and got[rid].generated_tokens == hf_greedy(hf, ids, kw["max_new_tokens"]), rid

    def stop_at_third_chunk(manager, batch, prompts):
        if manager._chunked is not None and len(manager._chunked.sizes) == 18:
            manager.stop(block=False, hard_stop=True)

    got, manager = run_manager(ours, cb, requests, inside=stop_at_third_chunk)
    assert got["long"].status == moetorch.RequestStatus.FAILED and "hard_stop" in got["long"].error
    assert got["after"].status == moetorch.RequestStatus.FAILED


@pytest.mark.parametrize("value", [-1, 2.5, True, "64"])
def test_bad_chunk_sizes_are_refused(pair, value):
    _, ours = pair
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        ours.init_continuous_batching(generation_config=config(4),
                                      continuous_batching_config={"prefill_chunk_tokens": value})
    with pytest.raises(ValueError, match="max_batch_tokens"):
        ours.init_continuous_batching(generation_config=config(4), continuous_batching_config={"max_batch_tokens": -5})


def test_chunk_sizes():
    """Even chunks, the shorter first; a chunk of none only where chunks outnumber the tokens."""
    def sizes(cost: int, chunks: int, shared: int = 0) -> list[int]:
        req = batching._Request("r", list(range(cost + shared)), 4, frozenset(), False, False)
        return batching._Chunked(req, 0, 100, (1, 0, shared), chunks).sizes

    assert sizes(29, 5) == [5, 6, 6, 6, 6]
    assert sizes(12, 3) == [4, 4, 4]
    assert sizes(10, 3, shared=16) == [3, 3, 4]
    assert sizes(2, 3) == [0, 1, 1]


def test_mixed_forward_refuses_bad_input(pair):
    """A Mixed forward's attention refuses queries that are not its packed + decode tokens in one
    row, weights and kv_rows; MixedRows needs a graph's PackedRows' token count (no host lengths)."""
    from moetorch.cache import MixedRows, PackedRows, StaticCache
    from moetorch.ops.attention import Mixed, Packed, attention

    k = v = torch.randn(2, 2, 8, 4)
    mixed = Mixed(Packed.of([3], [3], torch.device("cpu")), 3, 2, torch.ones(2, 1, 1, 8, dtype=torch.bool),
                  lambda: (k, v))
    with pytest.raises(ValueError, match=r"one row of 3 packed \+ 2 decode tokens, got queries of shape \(1, 4, 4, 4\)"):
        attention(torch.randn(1, 4, 4, 4), k[:1], v[:1], mixed, True, 0.5)
    with pytest.raises(ValueError, match="no weights, takes no kv_rows"):
        attention(torch.randn(1, 4, 5, 4), k[:1], v[:1], mixed, True, 0.5, need_weights=True)
    _, ours = pair
    cache = StaticCache(ours.config, max_cache_len=16, max_batch_size=2)
    cu = torch.zeros(2, 3, dtype=torch.int32)
    graph_rows = PackedRows.static(cache, torch.zeros(5, 4, dtype=torch.long),
                                   Packed.static(cu[0], cu[1], 4, 4, 4), 4)
    with pytest.raises(ValueError, match="needs its token count"):
        MixedRows(graph_rows, 2, torch.zeros(1, dtype=torch.long), torch.ones(2, 1, 1, 16, dtype=torch.bool))
