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

    def spy(self, prompts, rows, pad_id, shared=None):
        seen.append([p for *_, p in shared] if shared else [0] * len(prompts))
        return original(self, prompts, rows, pad_id, shared)

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


def test_running_requests_share_a_system_prompt(pair, small_blocks, prefills):
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


def test_a_follow_up_turn_starts_from_the_finished_request(pair, small_blocks, prefills):
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


def test_the_cache_shift_moves_finished_rows(pair, small_blocks, prefills, monkeypatch):
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
def test_random_prompts_from_shared_beginnings(pair, seed, monkeypatch, prefills):
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


def test_a_sliding_window_shorter_than_a_row_turns_sharing_off(tmp_path):
    """A shared prefix's prefill leaves padding between the prefix and the rest of the prompt,
    which a sliding window would count: such a model computes every prompt whole, with
    Transformers' tokens."""
    from archs import PHIMOE

    hf, ours = make_pair(PHIMOE, tmp_path, sliding_window=8)
    rng = random.Random(7)
    system = rand_tokens(rng, 20)
    inputs = [system + rand_tokens(rng, 3) for _ in range(2)]
    out, stats = run_in_turns(ours, [[p] for p in inputs], 4, {"max_cache_len": 32})
    assert stats["shared_tokens"] == 0
    for (r,), p in zip(out, inputs):
        check_against_transformers(hf, p, r, 4)
    ours.config.sliding_window = 32  # a window that spans a row: shared
    _, stats = run_in_turns(ours, [[p] for p in inputs], 4, {"max_cache_len": 32})
    assert stats["shared_tokens"] == 20


def test_scratch_bound():
    """A forward's prompts x (longest shared prefix + longest rest) stay within the limit."""
    assert batching._scratch_bound([[0, 1, 2, 3]], [10, 10, 0, 10], [2, 2, 2, 2], 24) == [[0, 1], [2, 3]]
    assert batching._scratch_bound([[0, 1, 2]], [10, 0, 0], [2, 2, 2], 20) == [[0], [1, 2]]
    assert batching._scratch_bound([[0, 1], [2]], [0, 0, 0], [5, 5, 50], 20) == [[0, 1], [2]]  # one alone may pass
    assert batching._scratch_bound([[0, 1, 2]], [0, 0, 0], [3, 3, 3], 100) == [[0, 1, 2]]


def test_forwards_keep_their_scratch_bound(pair, small_blocks, prefills, monkeypatch):
    """Many requests with a long shared prompt: each forward's scratch cache stays within
    PREFILL_WASTE x max_batch_tokens slots, and the results are still Transformers'."""
    hf, ours = pair
    rng = random.Random(8)
    system = rand_tokens(rng, 24)
    inputs = [system + rand_tokens(rng, rng.randint(1, 3)) for _ in range(8)]
    widths = []
    original = batching._Batch.prefill

    def spy(self, prompts, rows, pad_id, shared=None):
        shared = shared or [(0, 0, 0)] * len(prompts)
        widths.append(len(prompts) * (max(p for *_, p in shared) + max(len(q) - s[2] for q, s in zip(prompts, shared))))
        return original(self, prompts, rows, pad_id, shared)

    monkeypatch.setattr(batching._Batch, "prefill", spy)
    (results,), stats = run_in_turns(ours, [inputs], 3, {"max_requests_per_batch": 8, "max_batch_tokens": 40})
    for p, r in zip(inputs, results):
        check_against_transformers(hf, p, r, 3)
    assert stats["shared_tokens"] > 0 and max(widths) <= int(batching.PREFILL_WASTE * 40) and len(widths) > 2


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


def test_scratch_room_counts_a_slot_over_every_layer(pair):
    """A slot of the scratch cache is a token's keys and values in every layer."""
    _, ours = pair
    cfg = ours.config
    kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "kv_channels", None) or cfg.hidden_size // cfg.num_attention_heads
    slot = 2 * cfg.num_hidden_layers * kv_heads * head_dim * 2  # bf16
    assert batching._slots_in(10 * slot + slot - 1, cfg, torch.bfloat16) == 10
    assert batching._slots_in(10 * slot, cfg, torch.float32) == 5


def test_a_shared_prefill_out_of_memory_is_retried_in_halves(pair, small_blocks, monkeypatch, caplog):
    """A shared-prefix forward that runs out of memory (its scratch cache may take half the free
    memory) is retried in halves; the results are still Transformers'."""
    hf, ours = pair
    rng = random.Random(10)
    system = rand_tokens(rng, 12)
    inputs = [system + rand_tokens(rng, 2) for _ in range(5)]
    original, sizes = batching._Batch.prefill, []

    def tight(self, prompts, rows, pad_id, shared=None):
        sizes.append(len(prompts))
        if len(prompts) > 1 and shared and any(p for *_, p in shared):
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return original(self, prompts, rows, pad_id, shared)

    monkeypatch.setattr(batching._Batch, "prefill", tight)
    (results,), stats = run_in_turns(ours, [inputs], 3, {"max_requests_per_batch": 5})
    for p, r in zip(inputs, results):
        check_against_transformers(hf, p, r, 3)
    assert sizes == [1, 4, 2, 1, 1, 2, 1, 1] and stats["shared_tokens"] == 4 * 12
    assert "retried in halves" in caplog.text
