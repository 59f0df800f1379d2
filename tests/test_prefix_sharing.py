"""Prefix sharing in continuous batching (`allow_block_sharing`): a request whose prompt starts
with tokens whose keys a running or finished row holds copies them and computes the rest; its
tokens and log-probabilities are still those of Transformers' `generate` and forward."""

from __future__ import annotations

import random

import pytest
import torch
from archs import ARCH_IDS, ARCHS
from parity import make_pair

import moetorch
from moetorch.engine import batching, prefixes
from moetorch.engine.prefixes import PrefixIndex

# every test on the static cache and on the paged one (conftest.cache_layout)
pytestmark = pytest.mark.usefixtures("cache_layout")


@pytest.fixture(scope="module", params=ARCHS, ids=ARCH_IDS)
def pair(request, tmp_path_factory):
    return make_pair(request.param, tmp_path_factory.mktemp(request.param.name))


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 4 tokens and no minimum gain for a second prefill phase, so that the tiny
    prompts share."""
    monkeypatch.setattr(prefixes, "BLOCK", 4)
    monkeypatch.setattr(batching, "FOLLOW_MIN_TOKENS", 0)


@pytest.fixture
def prefills(monkeypatch):
    """The `shared` argument of every prefill forward: per prompt, (row, first slot, tokens)."""
    seen = []
    original = batching._Batch.prefill

    def spy(self, prompts, rows, shared=None, **kw):
        seen.append([p for *_, p in shared] if shared else [0] * len(prompts))
        return original(self, prompts, rows, shared, **kw)

    monkeypatch.setattr(batching._Batch, "prefill", spy)
    return seen


def rand_tokens(rng: random.Random, n: int, vocab: int = 97) -> list[int]:
    return [rng.randint(1, vocab - 1) for _ in range(n)]


def config(n: int) -> moetorch.GenerationConfig:
    return moetorch.GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)


def check_against_transformers(hf, prompt: list[int], result, n: int) -> None:
    """The result's tokens are Transformers' greedy ones, and its log-probabilities those of
    Transformers' forward over the prompt and tokens."""
    assert result.error is None, result.error
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert result.generated_tokens == ref[0, len(prompt):].tolist()
    with torch.no_grad():
        logits = hf(ref).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
    expect = logits.gather(1, ref[0, len(prompt):, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(result.logprobs), expect, atol=1e-4, rtol=1e-4)


def run_in_turns(model, turns: list[list[list[int]]], n: int, cb: dict) -> tuple[list, dict]:
    """Each turn's prompts added to one running manager once the turn before has finished:
    ([results of each turn], the manager's stats)."""
    m = model.init_continuous_batching(generation_config=config(n),
                                       continuous_batching_config={"return_logprobs": True, **cb})
    m.start()
    try:
        out = []
        for turn in turns:
            ids = [m.add_request(p) for p in turn]
            out.append([m.get_result(rid, timeout=60) for rid in ids])
    finally:
        m.stop(timeout=60)
    return out, m.stats


def test_running_requests_share_a_system_prompt(pair, small_blocks, prefills, padded):
    """Requests with one system prompt and their own questions, through two rows: each later one
    starts from a row that holds the system prompt (running or finished)."""
    hf, ours = pair
    rng = random.Random(0)
    system = rand_tokens(rng, 13)
    inputs = [system + rand_tokens(rng, rng.randint(1, 6)) for _ in range(6)]
    cb = {"max_requests_per_batch": 2, "return_logprobs": True}
    m = ours.init_continuous_batching(generation_config=config(5), continuous_batching_config=cb)
    m.start()
    try:
        ids = [m.add_request(p) for p in inputs]
        results = [m.get_result(rid, timeout=60) for rid in ids]
    finally:
        m.stop(timeout=60)
    for p, r in zip(inputs, results):
        check_against_transformers(hf, p, r, 5)
    shared = [p for call in prefills for p in call]
    assert shared.count(13) >= 3 and m.stats["shared_tokens"] == sum(shared)  # all 13 system tokens
    assert sum(m.stats["prefill_tokens"]) == sum(map(len, inputs)) - sum(shared)


def test_the_batch_hashes_each_request_block_once(pair, small_blocks, monkeypatch):
    """Admission looks a waiting request up several times (its cost, its rows, its pages) and
    adds its row as a source; its blocks are hashed once: at most the blocks of its prompt and
    tokens, over every request."""
    hf, ours = pair
    calls = []
    monkeypatch.setattr(prefixes, "hash", lambda x: calls.append(x) or hash(x), raising=False)
    rng = random.Random(3)
    system = rand_tokens(rng, 17)
    inputs = [system + rand_tokens(rng, rng.randint(1, 9)) for _ in range(7)]
    ((*results,),), _ = run_in_turns(ours, [inputs], 5, {"max_requests_per_batch": 3})
    for p, r in zip(inputs, results):
        check_against_transformers(hf, p, r, 5)
    assert calls and len(calls) <= sum((len(p) + 5) // 4 for p in inputs)


def test_a_follow_up_turn_starts_from_the_finished_request(pair, small_blocks, prefills, padded):
    """A chat's second turn (the first turn's prompt, its reply and a new message) starts from
    every token the first turn's row holds: its prompt and its tokens but the last."""
    hf, ours = pair
    rng = random.Random(1)
    first = rand_tokens(rng, 9)
    ((a,),), _ = run_in_turns(ours, [[first]], 6, {"max_requests_per_batch": 2})
    second = first + a.generated_tokens + rand_tokens(rng, 3)
    (_, (b,)), stats = run_in_turns(ours, [[first], [second]], 6, {"max_requests_per_batch": 2})
    check_against_transformers(hf, second, b, 6)
    assert prefills[-1] == [len(first) + 6 - 1] and stats["shared_tokens"] == len(first) + 5
    assert prefills[-2] == [0]


def test_requests_of_one_group_share_in_a_second_phase(pair, small_blocks, prefills):
    """Requests that arrive together: one computes the shared prompt, the others start from its
    row in a second prefill."""
    hf, ours = pair
    rng = random.Random(2)
    system = rand_tokens(rng, 10)
    inputs = [system + rand_tokens(rng, k) for k in (3, 1, 4, 2)] + [rand_tokens(rng, 5)]
    (results,), _ = run_in_turns(ours, [inputs], 4, {"max_requests_per_batch": 5})
    for p, r in zip(inputs, results):
        check_against_transformers(hf, p, r, 4)
    assert sorted(map(sorted, prefills)) == [[0, 0], [10, 10, 10]]  # all 10 system tokens


def test_followers_wait_only_for_a_worthwhile_gain(pair, prefills, monkeypatch):
    """Without enough shared tokens (FOLLOW_MIN_TOKENS), the group is one prefill."""
    _, ours = pair
    monkeypatch.setattr(prefixes, "BLOCK", 4)
    monkeypatch.setattr(batching, "FOLLOW_MIN_TOKENS", 100)
    rng = random.Random(3)
    system = rand_tokens(rng, 10)
    run_in_turns(ours, [[system + rand_tokens(rng, 2) for _ in range(3)]], 2, {})
    assert prefills == [[0, 0, 0]]


def test_the_cache_shift_moves_finished_rows(pair, small_blocks, prefills, monkeypatch, padded):
    """A long follow-up prompt moves the cache's columns right: the finished row's slots move
    with them and are shared. (A move left past a finished row's first slot drops it:
    `test_index_follows_a_shift`.)"""
    hf, ours = pair
    rng = random.Random(4)
    first = rand_tokens(rng, 6)
    ((a,),), _ = run_in_turns(ours, [[first]], 3, {"max_cache_len": 40})
    second = first + a.generated_tokens + rand_tokens(rng, 20)
    shifts = []
    original = batching._Batch.shift

    def spy(self, new_col, starts, **kw):
        shifts.append((self.col, new_col))
        return original(self, new_col, starts, **kw)

    monkeypatch.setattr(batching._Batch, "shift", spy)
    (_, (b,)), _ = run_in_turns(ours, [[first], [second]], 3, {"max_cache_len": 40})
    check_against_transformers(hf, second, b, 3)
    assert shifts and shifts[-1][1] > shifts[-1][0]  # moved right
    assert prefills[-1] == [len(first) + 2]


def test_a_taken_row_is_no_source(pair, small_blocks, prefills):
    """A finished row that another request takes loses its tokens: the follow-up computes all."""
    hf, ours = pair
    rng = random.Random(5)
    first, other = rand_tokens(rng, 8), rand_tokens(rng, 5)
    (turns, _) = run_in_turns(ours, [[first], [other], [first + rand_tokens(rng, 2)]], 4,
                              {"max_requests_per_batch": 1})
    check_against_transformers(hf, turns[2][0].prompt_ids, turns[2][0], 4)
    assert prefills == [[0], [0], [0]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_prompts_from_shared_beginnings(pair, seed, monkeypatch, prefills, padded):
    """Prompts drawn from a few shared beginnings, over few rows and a short cache with shifts,
    joining as rows free up: each request keeps Transformers' greedy tokens."""
    hf, ours = pair
    rng = random.Random(100 + seed)
    monkeypatch.setattr(prefixes, "BLOCK", rng.choice([2, 3, 4]))
    monkeypatch.setattr(batching, "FOLLOW_MIN_TOKENS", 0)
    monkeypatch.setattr(batching, "READ_LAG", rng.choice([0, 1]))
    heads = [rand_tokens(rng, rng.randint(3, 9)) for _ in range(3)]
    inputs = [rng.choice(heads) + rand_tokens(rng, rng.randint(0, 4)) for _ in range(10)]
    n = rng.randint(2, 6)
    cb = {"max_requests_per_batch": rng.randint(1, 4), "max_cache_len": 24, "max_batch_tokens": rng.choice([8, 30])}
    out = ours.generate_batch(inputs, generation_config=config(n), continuous_batching_config=cb)
    for p, r in zip(inputs, out.values()):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert r.generated_tokens == ref[0, len(p):].tolist()
    assert any(p for call in prefills for p in call)


def test_sharing_off(pair, prefills):
    """`allow_block_sharing=False` (Transformers' switch) computes every prompt whole, with the
    same tokens and log-probabilities as with sharing."""
    hf, ours = pair
    rng = random.Random(6)
    system = rand_tokens(rng, 40)
    inputs = [system + rand_tokens(rng, 2) for _ in range(3)]
    on, on_stats = run_in_turns(ours, [[p] for p in inputs], 3, {})
    off, off_stats = run_in_turns(ours, [[p] for p in inputs], 3, {"allow_block_sharing": False})
    assert on_stats["shared_tokens"] == 2 * 40 and off_stats["shared_tokens"] == 0
    for (a,), (b,), p in zip(on, off, inputs):
        assert a.generated_tokens == b.generated_tokens
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)
        check_against_transformers(hf, p, a, 3)


# ---- the index alone ---------------------------------------------------------------------------

class _Req:
    def __init__(self, prompt, tokens=(), start=0):
        self.prompt, self.tokens, self.start = list(prompt), list(tokens), start


def test_index_finds_the_longest_shared_prefix(monkeypatch):
    monkeypatch.setattr(prefixes, "BLOCK", 4)
    index = PrefixIndex()
    a = _Req(range(1, 11), start=5)
    index.running(0, a)
    index.finished(1, _Req(range(1, 7), tokens=[50, 51, 52], start=2))  # holds 1..6, 50, 51
    assert index.find(list(range(1, 20)))[1] == 10  # from row 0: its whole prompt
    src, p = index.find([1, 2, 3, 4, 5, 6, 50, 51, 52, 9])
    assert (src.row, src.start, p) == (1, 2, 8)
    assert index.find([1, 2, 3, 4, 5, 6, 50]) [1] == 6  # the last prompt token stays to compute
    assert index.find([1, 2, 3, 9, 9]) is None  # less than a block
    assert index.find([1, 2, 3, 4]) is None  # a block, but all of the prompt
    a.start = 1  # a running source follows its request
    assert index.find(list(range(1, 20)))[0].start == 1


def test_index_checks_tokens_and_drops_rows(monkeypatch):
    monkeypatch.setattr(prefixes, "BLOCK", 2)
    index = PrefixIndex()
    index.finished(3, _Req([7, 8, 9, 10], tokens=[1]))
    index._rows[3].tokens = [7, 0, 9, 10]  # as a hash collision would leave it
    assert index.find([7, 8, 9, 10, 11]) is None
    index.finished(3, _Req([7, 8, 9, 10], tokens=[1]))
    assert index.find([7, 8, 9, 10, 11])[1] == 4
    index.drop(3)
    assert index.find([7, 8, 9, 10, 11]) is None and not index._by_hash and len(index) == 0


def test_index_skips_a_collision_that_would_share_the_most(monkeypatch):
    """Holders are ranked before their first tokens are checked: a collided source that would
    rank first (it shares the most past the block, and is the newest) is passed over for the
    best true one, and with several true ones the ranking (fewest users, then newest) holds."""
    monkeypatch.setattr(prefixes, "BLOCK", 2)
    index = PrefixIndex()
    # the prompt's deepest held block is its second (7, 8, 9, 10): rows 1, 2 and later 5 hold it
    index.finished(1, _Req([7, 8, 9, 10, 5], tokens=[0]))  # shares 4 of the prompt
    index.finished(2, _Req([7, 8, 9, 10, 11], tokens=[0]))  # shares 5 and is newer: the best, once collided
    index.finished(4, _Req([7, 8, 5, 5], tokens=[0]))  # shares 2 (the first block only)
    index._rows[2].tokens = [7, 0, 9, 10, 11, 12]  # its hashes say 7, 8, 9, 10: as a collision leaves it
    src, p = index.find([7, 8, 9, 10, 11, 12, 13])
    assert (src.row, p) == (1, 4)
    index.finished(5, _Req([7, 8, 9, 10, 6], tokens=[0]))  # shares 4 too, newer than row 1
    assert index.find([7, 8, 9, 10, 11, 12, 13])[0].row == 5
    assert index.find([7, 8, 9, 10, 11, 12, 13], users={5: 1})[0].row == 1
    index._rows[1].tokens = index._rows[5].tokens = [0, 0, 0, 0, 0]
    assert index.find([7, 8, 9, 10, 11, 12, 13]) is None


@pytest.mark.parametrize("seed", range(4))
def test_index_finds_what_a_search_of_every_source_finds(monkeypatch, seed):
    """On random sources (prompts from a few shared stems, running and finished, both LongRoPE
    factor sets) and random users, `find` gives the source and length that checking every source
    token by token gives: the longest shared prefix of at least a block and at most all but the
    prompt's last token, then the fewest users, then the newest."""
    monkeypatch.setattr(prefixes, "BLOCK", 4)
    g = random.Random(seed)
    stems = [[g.randrange(6) for _ in range(g.randrange(4, 40))] for _ in range(3)]

    def sequence():
        return g.choice(stems)[:g.randrange(0, 40)] + [g.randrange(6) for _ in range(g.randrange(0, 12))]

    index, sources = PrefixIndex(), {}
    for row in range(40):
        req = _Req(sequence(), tokens=[g.randrange(6) for _ in range(g.randrange(1, 5))])
        req.long = g.random() < 0.3
        if g.random() < 0.5:
            index.running(row, req)
        else:
            index.finished(row, req)
        sources[row] = index._rows[row]
    for _ in range(200):
        prompt, mode = sequence(), g.random() < 0.3
        users = {row: g.randrange(3) for row in g.sample(range(40), 10)}
        want, rank = None, None
        for row, src in sources.items():
            if src.mode != mode:
                continue
            p, limit = 0, min(len(prompt) - 1, len(src.tokens))
            while p < limit and src.tokens[p] == prompt[p]:
                p += 1
            if p >= prefixes.BLOCK and (rank is None or (p, -users.get(row, 0), src.stamp) > rank):
                want, rank = (row, p), (p, -users.get(row, 0), src.stamp)
        got = index.find(prompt, users, mode=mode)
        assert (None if got is None else (got[0].row, got[1])) == want, (prompt, mode)


@pytest.mark.parametrize("seed", range(3))
def test_kept_block_hashes_give_what_hashing_anew_gives(monkeypatch, seed):
    """A sequence that grows between look-ups, looked up with its kept hashes (`memo`) under
    both LongRoPE factor sets and at random limits (consumed in full or stopped early), gets the
    hashes and the look-ups that hashing anew gets."""
    monkeypatch.setattr(prefixes, "BLOCK", 4)
    g = random.Random(seed)
    stem = [g.randrange(5) for _ in range(30)]
    index = PrefixIndex()
    for row in range(12):
        req = _Req(stem[:g.randrange(0, 31)] + [g.randrange(5) for _ in range(g.randrange(0, 9))], tokens=[1])
        req.long = g.random() < 0.3
        index.running(row, req) if g.random() < 0.5 else index.finished(row, req)
    for _ in range(40):
        seq, memo = stem[:g.randrange(0, 31)], {}
        for _ in range(6):
            seq += [g.randrange(5) for _ in range(g.randrange(0, 7))]
            mode = g.random() < 0.3
            limit = g.randrange(0, len(seq) + 1)
            stop = g.randrange(0, 12)
            kept = list(prefixes.block_hashes(seq, limit, mode, memo))[:stop]
            assert kept == list(prefixes.block_hashes(seq, limit, mode))[:stop]
            got, want = index.find(seq, mode=mode, memo=memo), index.find(seq, mode=mode)
            assert (got and (got[0].row, got[1])) == (want and (want[0].row, want[1]))
            for m, hashes in memo.items():  # what is kept is the sequence's own first blocks
                assert hashes == [h for _, h in prefixes.block_hashes(seq, len(hashes) * 4, m)]


def test_a_request_hashes_each_of_its_blocks_once(monkeypatch):
    """Look-ups of a waiting request, then its row as a running and a finished source, hash each
    block of its sequence once."""
    monkeypatch.setattr(prefixes, "BLOCK", 4)
    calls = []
    monkeypatch.setattr(prefixes, "hash", lambda x: calls.append(x) or hash(x), raising=False)
    index = PrefixIndex()
    index.running(0, _Req(list(range(40))))
    calls.clear()
    req = _Req(list(range(30)) + [99, 98, 97])
    req.long, req.hash_memo = False, {}
    for _ in range(3):
        assert index.find(req.prompt, mode=False, memo=req.hash_memo)[1] == 30
    index.running(1, req)
    assert len(calls) == len(req.prompt) // 4  # 8 blocks
    req.tokens = [5, 6, 7, 8, 9, 10]
    index.finished(1, req)  # its prompt and tokens but the last: 38 tokens, one block more
    assert len(calls) == 9
    calls.clear()
    index.running(2, _Req(list(range(30))))  # no memo: hashed anew
    assert len(calls) == 7


def test_index_follows_a_shift(monkeypatch):
    monkeypatch.setattr(prefixes, "BLOCK", 2)
    index = PrefixIndex()
    running = _Req([1, 2, 3], start=10)
    index.running(0, running)
    index.finished(1, _Req([4, 5, 6], tokens=[0], start=12))
    index.finished(2, _Req([7, 8, 9], tokens=[0], start=4))
    assert index.finished_rows() == {1: 12, 2: 4}
    index.shift(lo=10, d=3)
    assert index.finished_rows() == {1: 9}  # row 2 started before the moved slots
    assert index.find([7, 8, 9, 1]) is None and index.find([4, 5, 6, 1])[0].start == 9
    assert index.age(5) == -1 and index.age(0) < index.age(1)  # row 0's source came first


def test_a_sliding_window_shorter_than_a_row(tmp_path, padded):
    """With a sliding window shorter than the shared prefix, prompts still share (a packed
    prefill leaves no padding between a prefix and the rest), with Transformers' tokens."""
    from archs import PHIMOE

    hf, ours = make_pair(PHIMOE, tmp_path, sliding_window=8)
    rng = random.Random(7)
    system = rand_tokens(rng, 20)
    inputs = [system + rand_tokens(rng, 3) for _ in range(3)]
    out, stats = run_in_turns(ours, [[p] for p in inputs], 4, {"max_cache_len": 64})
    assert stats["shared_tokens"] == 2 * 20
    for (r,), p in zip(out, inputs):
        check_against_transformers(hf, p, r, 4)


def test_forwards_keep_their_keys_bound(pair, small_blocks, prefills, monkeypatch):
    """Many requests with a long shared prompt: each forward attends over at most
    max_batch_tokens keys (shared and computed; no GPU memory to measure), and the results are
    still Transformers'."""
    hf, ours = pair
    rng = random.Random(8)
    system = rand_tokens(rng, 24)
    inputs = [system + rand_tokens(rng, rng.randint(1, 3)) for _ in range(8)]
    keys = []
    original = batching._Batch.prefill

    def spy(self, prompts, rows, shared=None, **kw):
        keys.append(sum(len(q) for q in prompts))
        return original(self, prompts, rows, shared, **kw)

    monkeypatch.setattr(batching._Batch, "prefill", spy)
    (results,), stats = run_in_turns(ours, [inputs], 3, {"max_requests_per_batch": 8, "max_batch_tokens": 40})
    for p, r in zip(inputs, results):
        check_against_transformers(hf, p, r, 3)
    assert stats["shared_tokens"] > 0 and max(keys) <= 40 and len(keys) > 2


def test_changed_weights_forget_the_prefixes(pair, small_blocks):
    """Keys cached before the weights change are stale: a change in place (the parameters'
    version counters), a pause (where weights are updated) and a new run each forget them."""
    hf, ours = pair
    rng = random.Random(9)
    prompt = rand_tokens(rng, 10)
    saved = {k: v.clone() for k, v in ours.state_dict().items()}
    hf_embed = hf.model.embed_tokens.weight.detach().clone()
    try:
        m = ours.init_continuous_batching(generation_config=config(3), continuous_batching_config={"return_logprobs": True})
        m.start()
        try:
            m.get_result(m.add_request(prompt), timeout=60)
            with torch.no_grad():
                ours.model.embed_tokens.weight.mul_(1.5)
                hf.model.embed_tokens.weight.mul_(1.5)
            r = m.get_result(m.add_request(prompt + [5]), timeout=60)
            assert m.stats["shared_tokens"] == 0
            check_against_transformers(hf, prompt + [5], r, 3)
            m.get_result(m.add_request(prompt + [6]), timeout=60)
            assert m.stats["shared_tokens"] == 10  # unchanged weights: shared again
            with m.pause():
                pass
            m.get_result(m.add_request(prompt + [7]), timeout=60)
            assert m.stats["shared_tokens"] == 10
        finally:
            m.stop(timeout=60)
        m.start()  # a new run
        try:
            m.get_result(m.add_request(prompt + [8]), timeout=60)
            assert m.stats["shared_tokens"] == 10
        finally:
            m.stop(timeout=60)
    finally:
        with torch.no_grad():
            hf.model.embed_tokens.weight.copy_(hf_embed)
        ours.load_state_dict(saved)


def test_keys_room_counts_one_layer(pair):
    """The keys a prefill's attention gathers are one layer's keys and values."""
    _, ours = pair
    cfg = ours.config
    kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "kv_channels", None) or cfg.hidden_size // cfg.num_attention_heads
    key = 2 * kv_heads * head_dim * 2  # bf16 keys and values of one layer
    assert batching._keys_in(10 * key + key - 1, cfg, torch.bfloat16) == 10
    assert batching._keys_in(10 * key, cfg, torch.float32) == 5


def test_a_shared_prefill_out_of_memory_is_retried_in_halves(pair, small_blocks, monkeypatch, caplog):
    """A shared-prefix forward that runs out of memory (its gathered prefixes may take half the
    free memory) is retried in halves; the results are still Transformers'."""
    hf, ours = pair
    rng = random.Random(10)
    system = rand_tokens(rng, 12)
    inputs = [system + rand_tokens(rng, 2) for _ in range(5)]
    original, sizes = batching._Batch.prefill, []

    def tight(self, prompts, rows, shared=None, **kw):
        sizes.append(len(prompts))
        if len(prompts) > 1 and shared and any(p for *_, p in shared):
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return original(self, prompts, rows, shared, **kw)

    monkeypatch.setattr(batching._Batch, "prefill", tight)
    (results,), stats = run_in_turns(ours, [inputs], 3, {"max_requests_per_batch": 5})
    for p, r in zip(inputs, results):
        check_against_transformers(hf, p, r, 3)
    assert sizes == [1, 4, 2, 1, 1, 2, 1, 1] and stats["shared_tokens"] == 4 * 12
    assert "retried in halves" in caplog.text


def test_an_out_of_memory_retry_computes_a_prefix_moved_within_its_row(pair, small_blocks, monkeypatch, caplog):
    """A chat turn that starts from its own finished row writes that row: when its forward runs
    out of memory partway, the retry computes that prompt whole (its row may hold the failed
    forward's writes), and the results are still Transformers'."""
    hf, ours = pair
    rng = random.Random(11)
    first = rand_tokens(rng, 9)
    calls = []
    original = batching._Batch.prefill

    def failing(self, prompts, rows, shared=None, **kw):
        shared = shared or [(0, 0, 0)] * len(prompts)
        calls.append([(row, s) for row, s in zip(rows, shared)])
        if len(prompts) > 1:
            original(self, prompts[:1], rows[:1], shared[:1], **kw)  # writes the first prompt's row, then fails
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return original(self, prompts, rows, shared, **kw)

    monkeypatch.setattr(batching._Batch, "prefill", failing)
    m = ours.init_continuous_batching(generation_config=config(3), continuous_batching_config={"return_logprobs": True})
    m.start()
    try:
        r1 = m.get_result(m.add_request(first), timeout=60)
        follow = first + r1.generated_tokens + rand_tokens(rng, 2)
        other = rand_tokens(rng, 6)
        with m._lock:  # both reach the loop together: one prefill group
            ids = m.add_requests([follow, other])
        results = [m.get_result(rid, timeout=60) for rid in ids]
    finally:
        m.stop(timeout=60)
    own_row, (_, (src, _, p)) = calls[1][0][0], calls[1][0]
    assert p == 9 + 3 - 1 and src == own_row  # the follow-up started from its own row
    assert calls[2:] == [[(own_row, (0, 0, 0))], [calls[1][1]]]  # retried in halves, the first whole
    for prompt, r in zip([follow, other], results):
        check_against_transformers(hf, prompt, r, 3)
    assert "retried in halves" in caplog.text
