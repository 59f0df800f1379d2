"""Continuous batching (`generate_batch`, `init_continuous_batching`): every request gives the
tokens of its own `generate` call and of Transformers (its `generate_batch` for PhiMoE; for
JetMoE, where Transformers' continuous batching fails, its `generate`), whatever joins or leaves
the batch around it."""

from __future__ import annotations

import dataclasses
import inspect
import random
import threading

import pytest
import torch
import transformers
from archs import ARCH_IDS, ARCHS, PHIMOE, longrope_scaling
from parity import OpenAIPenalties, make_pair, run_queued, run_requests

import moetorch
from moetorch.engine import batching, row_sampling

# every test on the static cache and on the paged one (conftest.cache_layout)
pytestmark = pytest.mark.usefixtures("cache_layout")


@pytest.fixture(scope="module", params=ARCHS, ids=ARCH_IDS)
def pair(request, tmp_path_factory):
    return make_pair(request.param, tmp_path_factory.mktemp(request.param.name))


def prompts(seed: int, n: int, lo: int = 1, hi: int = 14, vocab: int = 97) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(1, vocab - 1) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def own_greedy(model, prompt: list[int], n: int, eos=None) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=eos)
    new = out[0, len(prompt):].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos) + 1]
    return new


def config(n: int, **kw) -> moetorch.GenerationConfig:
    return moetorch.GenerationConfig(**{"max_new_tokens": n, "do_sample": False, "pad_token_id": 0, **kw})


@pytest.fixture
def shifts(monkeypatch):
    """The (from, to) columns of every shift of the batch's cache."""
    seen = []
    original = batching._Batch.shift

    def spy(self, new_col, starts, **kw):
        seen.append((self.col, new_col, len(starts)))
        return original(self, new_col, starts, **kw)

    monkeypatch.setattr(batching._Batch, "shift", spy)
    return seen


def test_generate_batch_matches_transformers(pair, padded):
    hf, ours = pair
    inputs = prompts(1, 7)
    cb = {"max_requests_per_batch": 3, "return_logprobs": True}
    out = ours.generate_batch(inputs, generation_config=config(6, eos_token_id=None), continuous_batching_config=cb)
    assert list(out) == [f"req_{i}" for i in range(len(inputs))]
    for (rid, res), p in zip(out.items(), inputs):
        assert res.request_id == rid and res.prompt_ids == p and res.error is None
        assert res.status == moetorch.RequestStatus.FINISHED and res.is_finished()
        ref = hf.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert res.generated_tokens == ref[0, len(p):].tolist()
        # log-probabilities of the chosen tokens, from Transformers' forward over the whole sequence
        with torch.no_grad():
            logits = hf(ref).logits[0, len(p) - 1:-1].float().log_softmax(-1)
        expect = logits.gather(1, ref[0, len(p):, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(res.logprobs), expect, atol=1e-4, rtol=1e-4)
        assert res.lifespan[0] >= res.created_time and res.lifespan[1] >= res.lifespan[0]


def test_the_model_is_left_in_eval_mode(pair):
    """As Transformers' manager (TRL's GRPO calls `.train()` after generate_batch for that reason)."""
    hf, ours = pair
    ours.train()
    p = prompts(20, 1)[0]
    out = ours.generate_batch([p], generation_config=config(4))
    assert not ours.training and out["req_0"].generated_tokens == own_greedy(ours, p, 4)


def test_transformers_generate_batch_oracle(tmp_path):
    """PhiMoE: Transformers' own continuous batching gives the same results, ids, tokens and
    log-probabilities. (Its JetMoE fails in its paged cache's index_copy_, so JetMoE compares
    against `generate` above.)"""
    hf, ours = make_pair(PHIMOE, tmp_path)
    inputs = prompts(2, 5)
    cfg = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    theirs = hf.generate_batch(inputs, generation_config=transformers.GenerationConfig(**cfg), warmup=False,
                               continuous_batching_config=transformers.ContinuousBatchingConfig(return_logprobs=True))
    mine = ours.generate_batch(inputs, generation_config=transformers.GenerationConfig(**cfg),
                               continuous_batching_config=transformers.ContinuousBatchingConfig(return_logprobs=True))
    assert list(mine) == list(theirs)
    for rid in theirs:
        assert mine[rid].prompt_ids == theirs[rid].prompt_ids
        assert mine[rid].generated_tokens == theirs[rid].generated_tokens
        assert int(mine[rid].status) == int(theirs[rid].status)
        torch.testing.assert_close(torch.tensor(mine[rid].logprobs), torch.tensor(theirs[rid].logprobs),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed,lag", [(0, 1), (1, 1), (2, 1), (0, 0)])
def test_requests_join_and_leave(pair, seed, lag, shifts, monkeypatch, padded):
    """Random prompts and lengths over few rows and a short cache: requests wait for rows, join
    between steps, and the cache's columns shift; every request keeps its own greedy tokens,
    whether the host reads each step's tokens while the next runs (lag 1) or before it (0)."""
    _, ours = pair
    monkeypatch.setattr(batching, "READ_LAG", lag)
    rng = random.Random(seed)
    inputs = prompts(10 + seed, rng.randint(6, 12))
    n = rng.randint(2, 8)
    cb = {"max_requests_per_batch": rng.randint(1, 4), "max_cache_len": 22, "max_batch_tokens": rng.choice([8, 20])}
    out = ours.generate_batch(inputs, generation_config=config(n), continuous_batching_config=cb)
    assert [r.generated_tokens for r in out.values()] == [own_greedy(ours, p, n) for p in inputs]
    assert any(moved for *_, moved in shifts) or seed  # seed 0 shifts with requests running


def test_keys_bound():
    """A phase's prompts go into forwards of at most `limit` keys (shared + computed), in order;
    a prompt alone may pass it."""
    assert batching._keys_bound([0, 0, 0], [5, 100, 90], 1000) == [[0, 1, 2]]
    assert batching._keys_bound([0, 0, 0], [5, 100, 90], 105) == [[0, 1], [2]]
    assert batching._keys_bound([10, 10, 0, 10], [2, 2, 2, 2], 24) == [[0, 1], [2, 3]]
    assert batching._keys_bound([10, 10, 0, 10], [2, 2, 2, 2], 23) == [[0], [1, 2], [3]]
    assert batching._keys_bound([0, 50], [5, 60], 20) == [[0], [1]]
    assert batching._keys_bound([], [], 20) == [[]]


@pytest.mark.parametrize("d", [1, 3, 4, -1, -4])
def test_shift_moves_live_slots(pair, d):
    """`_Batch.shift` moves every layer's live slots by the same amount, in place in chunks or
    through a copy (a short move of a wide span), and re-masks the rows."""
    _, ours = pair
    batch = batching._Batch(ours, rows=3, slots=24, graphs=False)
    for t in batch.cache._all:
        t.copy_(torch.randn(t.shape))
    before = [t.clone() for t in batch.cache._all]
    batch.col = 14
    starts = {0: 4, 2: 9}  # row 1 free
    batch.shift(14 - d, starts)
    assert batch.col == 14 - d
    for old, new in zip(before, batch.cache._all):
        torch.testing.assert_close(new[:, [0, 2], :, 4 - d:14 - d], old[:, [0, 2], :, 4:14], rtol=0, atol=0)
    slots = torch.arange(24)
    assert torch.equal(batch.mask[0], (slots >= 4 - d).long()) and torch.equal(batch.mask[2], (slots >= 9 - d).long())
    assert batch.mask[1].tolist() == [1] + [0] * 23


def test_shift_right_for_a_long_prompt(pair, shifts):
    """A long prompt arriving while a short one runs: the live columns move right to make room."""
    _, ours = pair
    short, long = prompts(3, 1, 2, 2)[0], prompts(4, 1, 12, 12)[0]
    cb = {"max_requests_per_batch": 2, "max_cache_len": 24, "max_batch_tokens": 4}
    out = ours.generate_batch([short, long], generation_config=config(8), continuous_batching_config=cb)
    assert (2, 12, 1) in shifts  # from column 2 to 12, with the short request running
    assert [r.generated_tokens for r in out.values()] == [own_greedy(ours, short, 8), own_greedy(ours, long, 8)]


def test_eos_ends_a_request(pair):
    _, ours = pair
    inputs = prompts(5, 6)
    # an EOS id that some requests produce early: the most common first greedy token
    firsts = [own_greedy(ours, p, 1)[0] for p in inputs]
    eos = max(set(firsts), key=firsts.count)
    out = ours.generate_batch(inputs, generation_config=config(6, eos_token_id=eos),
                              continuous_batching_config={"max_requests_per_batch": 2})
    got = [r.generated_tokens for r in out.values()]
    assert got == [own_greedy(ours, p, 6, eos=eos) for p in inputs]
    assert any(len(g) < 6 and g[-1] == eos for g in got)


def test_sampling(pair):
    _, ours = pair
    inputs = prompts(6, 3)
    # top_k=1 sampling is greedy
    out = ours.generate_batch(inputs, generation_config=config(5, do_sample=True, top_k=1, temperature=0.7))
    assert [r.generated_tokens for r in out.values()] == [own_greedy(ours, p, 5) for p in inputs]
    # a seed gives the same draws; num_return_sequences names the children as Transformers does
    gen = config(6, do_sample=True, temperature=1.3, top_p=0.95, num_return_sequences=3)
    runs = [ours.generate_batch(inputs, generation_config=gen, continuous_batching_config={"seed": 7, "return_logprobs": True})
            for _ in range(2)]
    assert list(runs[0]) == ["req_0__child#0", "req_0__child#1", "req_0", "req_1__child#0", "req_1__child#1", "req_1",
                             "req_2__child#0", "req_2__child#1", "req_2"]
    assert [r.generated_tokens for r in runs[0].values()] == [r.generated_tokens for r in runs[1].values()]
    tokens = [tuple(r.generated_tokens) for r in runs[0].values()]
    assert len(set(tokens)) > 3  # the draws differ between rows
    assert all(len(r.logprobs) == 6 and max(r.logprobs) <= 0 for r in runs[0].values())


def test_warp_rows_is_transformers_warpers_row_by_row():
    """Per-row temperature, top-k and top-p give, row by row, Transformers' own warpers' scores."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    B, V = 12, 40
    scores = torch.randn(B, V, generator=g) * 3
    temperature = torch.rand(B, generator=g) * 1.5 + 0.2
    top_k = torch.randint(0, V + 5, (B,), generator=g)
    top_k[:2] = torch.tensor([0, 1])
    top_p = torch.rand(B, generator=g) * 0.9 + 0.05
    top_p[2] = 1.0
    ours = row_sampling.warp_rows(scores, temperature, top_k, top_p)
    for i in range(B):
        want = TemperatureLogitsWarper(float(temperature[i]))(None, scores[i:i + 1].clone())
        if top_k[i] > 0:
            want = TopKLogitsWarper(int(top_k[i]))(None, want)
        if top_p[i] < 1:
            want = TopPLogitsWarper(float(top_p[i]))(None, want)
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(want[0])), i
        kept = ~torch.isinf(want[0])
        torch.testing.assert_close(ours[i][kept], want[0][kept])
    # no filters: temperature alone
    torch.testing.assert_close(row_sampling.warp_rows(scores, temperature, None, None), scores / temperature[:, None])


def test_per_row_draws_follow_the_distribution(pair):
    """The exponential race draws each token with its softmax probability (5 sigma per token)."""
    _, ours = pair
    m = ours.init_continuous_batching(generation_config=config(2))
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    n = 20000
    reqs = [batching._Request(str(i), [1], 2, frozenset(), False, False, batching.Sampling(True)) for i in range(n)]
    for r in reqs:  # as admission keys each request's draws (rows with one seed draw alike)
        r.seed = int(torch.randint(0, 2**62, ()))
    tokens, _ = m._choose_per_row(probs.log().expand(n, -1).clone(), reqs)
    freq = torch.bincount(tokens, minlength=5).double() / n
    assert ((freq - probs.double()).abs() <= 5 * (probs.double() * (1 - probs.double()) / n).sqrt()).all(), freq
    # greedy rows beside them take the argmax
    reqs[::2] = [None] * len(reqs[::2])
    tokens, _ = m._choose_per_row(probs.log().expand(n, -1).clone(), reqs)
    assert (tokens[::2] == 0).all()


def test_per_request_sampling_settings(pair):
    """add_request(do_sample=, temperature=, top_k=, top_p=, seed=): each request decodes by its own
    settings in one batch; top_k=1 is greedy, a top-k request's tokens are among its top k (checked
    with an eager forward), and a seed gives the same draws whatever runs beside it."""
    _, ours = pair
    inputs = prompts(11, 5, 3, 9)
    n = 6
    cb = {"max_requests_per_batch": 4, "return_logprobs": True}

    def run(requests):
        return run_requests(ours, config(n), cb, requests, timeout=30)

    requests = {"greedy": (inputs[0], {}), "top1": (inputs[1], {"do_sample": True, "top_k": 1, "temperature": 0.5}),
                "top3": (inputs[2], {"do_sample": True, "top_k": 3, "temperature": 2.0}),
                "nucleus": (inputs[3], {"do_sample": True, "top_p": 0.6, "seed": 3}),
                "seeded": (inputs[4], {"do_sample": True, "temperature": 1.5, "seed": 1234})}
    out = run(requests)
    assert out["greedy"].generated_tokens == own_greedy(ours, inputs[0], n)
    assert out["top1"].generated_tokens == own_greedy(ours, inputs[1], n)
    assert out["top1"].logprobs == [0.0] * n  # one token left: probability 1
    with torch.no_grad():
        full = torch.tensor([inputs[2] + out["top3"].generated_tokens])
        logits = ours(full).logits[0, len(inputs[2]) - 1:-1]
    top3 = logits.topk(3, dim=-1).indices
    assert all(t in top3[i] for i, t in enumerate(out["top3"].generated_tokens))
    # the seeded requests again, alone and in another order: the same draws
    again = run({"seeded": requests["seeded"], "nucleus": requests["nucleus"]})
    assert again["seeded"].generated_tokens == out["seeded"].generated_tokens
    assert again["nucleus"].generated_tokens == out["nucleus"].generated_tokens
    other = run({"seeded": (inputs[4], {"do_sample": True, "temperature": 1.5, "seed": 99})})
    assert other["seeded"].generated_tokens != out["seeded"].generated_tokens


def test_top_logprobs(pair):
    """add_request(top_logprobs=k): each token's k likeliest (id, log-probability) of the
    distribution it was drawn from, as an eager forward over prompt + tokens gives them; a request
    beside it that asks for none gets none."""
    _, ours = pair
    inputs = prompts(13, 3, 2, 9)
    cb = {"max_requests_per_batch": 3, "return_logprobs": True}
    with ours.continuous_batching_context_manager(generation_config=config(5), continuous_batching_config=cb) as m:
        m.add_request(inputs[0], request_id="top3", top_logprobs=3)
        m.add_request(inputs[1], request_id="none")
        m.add_request(inputs[2], request_id="top1", top_logprobs=1, do_sample=True, top_k=1)
        out = {r.request_id: r for r in (m.get_result(timeout=30) for _ in range(3))}
    assert out["none"].top_logprobs == []
    r, p = out["top3"], inputs[0]
    with torch.no_grad():
        logits = ours(torch.tensor([p + r.generated_tokens])).logits[0, len(p) - 1:-1].float()
    values, ids = logits.log_softmax(-1).topk(3)
    assert [[t for t, _ in top] for top in r.top_logprobs] == ids.tolist()
    torch.testing.assert_close(torch.tensor([[v for _, v in top] for top in r.top_logprobs]), values, atol=1e-4, rtol=0)
    assert [top[0][0] for top in r.top_logprobs] == r.generated_tokens  # greedy: the likeliest
    assert [top[0][1] for top in r.top_logprobs] == r.logprobs
    # sampled with top_k=1: the distribution drawn from holds one token, of probability 1
    assert out["top1"].top_logprobs == [[(t, 0.0)] for t in out["top1"].generated_tokens]
    greedy_only = ours.init_continuous_batching(generation_config=config(5))
    with pytest.raises(ValueError, match="return_logprobs"):
        greedy_only.add_request(inputs[0], top_logprobs=2)
    with pytest.raises(ValueError, match="top_logprobs must be"):
        ours.init_continuous_batching(generation_config=config(5), continuous_batching_config=cb).add_request(
            inputs[0], top_logprobs=21)


def hf_generate(hf, prompt: list[int], n: int, **kw) -> list[int]:
    """Transformers' greedy tokens with its processors (and `frequency`/`presence`, OpenAI's)."""
    freq, pres = kw.pop("frequency", 0.0), kw.pop("presence", 0.0)
    procs = transformers.LogitsProcessorList([OpenAIPenalties(freq, pres, len(prompt))] if freq or pres else [])
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None,
                      logits_processor=procs, **kw)
    return out[0, len(prompt):].tolist()


def test_row_penalties_are_transformers_processors_row_by_row():
    """Logit bias, repetition penalty (over prompt and generated tokens) and OpenAI's frequency and
    presence penalties (over the generated tokens), a setting per row, on counts kept on the device
    (`TokenCounts`), give Transformers' sequence-bias and repetition-penalty processors and OpenAI's
    formula row by row; min-p after the other warpers gives Transformers' min-p warper."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        SequenceBiasLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )


    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    B, V, R = 6, 30, 9
    rows = [7, 0, 3, 5, 1, 8]  # the batch rows of the step's B rows
    prompts_ = [torch.randint(0, V, (int(torch.randint(1, 12, (), generator=g)),), generator=g).tolist()
                for _ in range(B)]
    generated = [torch.randint(0, V, (int(torch.randint(0, 10, (), generator=g)),), generator=g).tolist()
                 for _ in range(B)]
    settings = [row_sampling.Sampling(True, repetition_penalty=float(torch.rand((), generator=g)) * 2 + 0.3,
                                      frequency_penalty=float(torch.randn((), generator=g)),
                                      presence_penalty=float(torch.randn((), generator=g)),
                                      logit_bias=tuple(sorted({int(t): float(torch.randn((), generator=g)) * 5
                                                               for t in torch.randint(0, V, (3,), generator=g)}.items())),
                                      temperature=0.7, top_k=12, min_p=float(torch.rand((), generator=g)) * 0.5)
                for _ in range(B)]
    settings[1] = row_sampling.Sampling(True)  # a row with nothing set
    settings[2] = dataclasses.replace(settings[2], repetition_penalty=1.0, logit_bias=())

    def put(values, dtype):
        return torch.tensor(values, dtype=dtype)

    counts = row_sampling.TokenCounts(R, V, torch.device("cpu"))
    counts.generated += 3  # stale counts of earlier requests
    counts.prompt[:] = True
    counts.reset(rows, prompts_, put)
    for step in range(max(map(len, generated))):  # each step counts the rows that still generate
        live = [i for i in range(B) if step < len(generated[i])]
        counts.add(put([rows[i] for i in live], torch.long), put([generated[i][step] for i in live], torch.long))
    scores = torch.randn(B, V, generator=g) * 3
    rs = row_sampling.RowSettings.of(settings, put)
    rows_t = torch.tensor(rows)
    ours = row_sampling.penalize_rows(scores, counts.generated[rows_t], counts.prompt[rows_t], rs)
    ours = row_sampling.warp_rows(ours, rs.temperature, rs.top_k, rs.top_p, rs.min_p)
    for i, s in enumerate(settings):
        ids = torch.tensor([prompts_[i] + generated[i]])
        want = scores[i:i + 1]
        if s.logit_bias:
            want = SequenceBiasLogitsProcessor({(t,): b for t, b in s.logit_bias})(ids, want)
        want = RepetitionPenaltyLogitsProcessor(s.repetition_penalty)(ids, want)
        want = OpenAIPenalties(s.frequency_penalty, s.presence_penalty, len(prompts_[i]))(ids, want)
        want = TemperatureLogitsWarper(s.temperature)(ids, want)
        if s.top_k:
            want = TopKLogitsWarper(s.top_k)(ids, want)
        if s.min_p:
            want = MinPLogitsWarper(s.min_p)(ids, want)
        torch.testing.assert_close(ours[i:i + 1], want, msg=f"row {i}: {s}")


def test_per_request_penalties_and_logit_bias(pair):
    """add_request(repetition_penalty=, frequency_penalty=, presence_penalty=, logit_bias=): requests
    with and without them share one batch, joining and leaving, and each gives Transformers' greedy
    tokens with the same processors (frequency and presence: OpenAI's formula)."""
    hf, ours = pair
    inputs = prompts(31, 7, 2, 9)
    n = 8
    plain = [own_greedy(ours, p, n) for p in inputs]
    settings = [{}, {"repetition_penalty": 2.5}, {"frequency_penalty": 1.5, "presence_penalty": 0.5},
                {"logit_bias": {plain[3][0]: -100.0, 5: 2.0}}, {"repetition_penalty": 0.6, "presence_penalty": -1.0},
                {"frequency_penalty": 3.0, "logit_bias": {7: 1.5}}, {"repetition_penalty": 1.3}]
    with ours.continuous_batching_context_manager(generation_config=config(n),
                                                   continuous_batching_config={"max_requests_per_batch": 3}) as m:
        for i, (p, kw) in enumerate(zip(inputs, settings)):
            m.add_request(p, request_id=str(i), **kw)
        got = {}
        while len(got) < len(inputs):
            r = m.get_result(timeout=30)
            got[int(r.request_id)] = r.generated_tokens
    for i, (p, kw) in enumerate(zip(inputs, settings)):
        hf_kw = {"repetition_penalty": kw.get("repetition_penalty", 1.0), "frequency": kw.get("frequency_penalty", 0.0),
                 "presence": kw.get("presence_penalty", 0.0)}
        if "logit_bias" in kw:
            hf_kw["sequence_bias"] = {(t,): b for t, b in kw["logit_bias"].items()}
        assert got[i] == hf_generate(hf, p, n, **hf_kw), (i, kw)
    changed = [got[i] != plain[i] for i in range(1, len(inputs))]
    assert sum(changed) >= 4, changed  # the settings bite


def test_config_repetition_penalty_and_sequence_bias(pair):
    """A generation config's repetition_penalty, one-token sequence_bias and min_p apply to every
    request, as in Transformers' generate."""
    hf, ours = pair
    inputs = prompts(32, 4, 2, 9)
    bias = {(3,): 4.0, (11,): -2.0}
    out = ours.generate_batch(inputs, generation_config=config(6, repetition_penalty=1.8, sequence_bias=bias),
                              continuous_batching_config={"max_requests_per_batch": 2})
    assert [r.generated_tokens for r in out.values()] == \
        [hf_generate(hf, p, 6, repetition_penalty=1.8, sequence_bias=bias) for p in inputs]
    # min_p=1 keeps the likeliest token alone: sampling is greedy, with the config's penalty
    out = ours.generate_batch(inputs, generation_config=config(6, do_sample=True, min_p=1.0, repetition_penalty=1.8))
    assert [r.generated_tokens for r in out.values()] == [hf_generate(hf, p, 6, repetition_penalty=1.8) for p in inputs]
    # with a warper no request can set (typical), the config's own warpers run after the penalty
    out = ours.generate_batch(inputs, generation_config=config(6, do_sample=True, top_k=1, typical_p=0.9,
                                                               repetition_penalty=1.8))
    assert [r.generated_tokens for r in out.values()] == [hf_generate(hf, p, 6, repetition_penalty=1.8) for p in inputs]
    # a request's own settings replace the config's
    with ours.continuous_batching_context_manager(generation_config=config(6, repetition_penalty=1.8)) as m:
        m.add_request(inputs[0], request_id="own", repetition_penalty=1.0, frequency_penalty=2.0)
        r = m.get_result("own", timeout=30)
    assert r.generated_tokens == hf_generate(hf, inputs[0], 6, frequency=2.0)


def test_frequency_presence_processor_in_generate(pair):
    """FrequencyPresencePenaltyLogitsProcessor in generate gives OpenAI's formula, as Transformers'
    generate with the test's own processor gives it."""
    hf, ours = pair
    p = prompts(33, 1, 4, 9)[0]
    proc = moetorch.FrequencyPresencePenaltyLogitsProcessor(2.0, 0.5, prompt_length=len(p))
    out = ours.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None,
                        logits_processor=moetorch.LogitsProcessorList([proc]))
    assert out[0, len(p):].tolist() == hf_generate(hf, p, 8, frequency=2.0, presence=0.5)
    with pytest.raises(ValueError, match="frequency_penalty"):
        moetorch.FrequencyPresencePenaltyLogitsProcessor(float("inf"))
    with pytest.raises(ValueError, match="prompt_length"):
        moetorch.FrequencyPresencePenaltyLogitsProcessor(1.0, prompt_length=-1)


def test_per_request_settings_against_the_config(pair):
    """A request's own settings start from the generation config's; a config whose warpers a
    request cannot set (typical_p) refuses them; greedy requests in a sampling manager are greedy."""
    _, ours = pair
    inputs = prompts(12, 2, 3, 9)
    m = ours.init_continuous_batching(generation_config=config(4, do_sample=True, typical_p=0.9))
    with pytest.raises(ValueError, match="TypicalLogitsWarper"):
        m.add_request(inputs[0], temperature=0.5)
    # a greedy request's own settings too: a step holding it would draw every row by row settings,
    # and the config-sampled requests beside it would lose the typical warper
    for own in ({"do_sample": False, "repetition_penalty": 1.5}, {"logit_bias": {3: -5.0}}):
        with pytest.raises(ValueError, match="TypicalLogitsWarper"):
            m.add_request(inputs[1], **own)
    m.add_request(inputs[1], do_sample=True)  # the config's own setting: taken
    with ours.continuous_batching_context_manager(generation_config=config(4, do_sample=True, temperature=1.7)) as m:
        m.add_request(inputs[0], request_id="g", do_sample=False)
        m.add_request(inputs[1], request_id="k1", top_k=1)  # sampled (the config's do_sample), top-1
        got = {r.request_id: r.generated_tokens for r in (m.get_result(timeout=30), m.get_result(timeout=30))}
    assert got == {"g": own_greedy(ours, inputs[0], 4), "k1": own_greedy(ours, inputs[1], 4)}


LIMIT = 12  # original_max_position_embeddings of the LongRoPE models below


@pytest.fixture(scope="module")
def longrope(tmp_path_factory):
    """A PhiMoE pair with LongRoPE switching at LIMIT tokens (short and long factors differ)."""
    return make_pair(PHIMOE, tmp_path_factory.mktemp("longrope"), rope_scaling=longrope_scaling(8, original=LIMIT),
                     max_position_embeddings=96)


def crosses(prompt: list[int], n: int) -> bool:
    """Whether a request's sequence passes the switch before its last token is drawn."""
    return len(prompt) <= LIMIT < len(prompt) + n - 1


@pytest.mark.parametrize("chunk", [None, 5], ids=["whole", "chunks-of-5"])
def test_longrope_rows_take_their_own_factor_sets(longrope, chunk):
    """PhiMoE with LongRoPE: every request runs in the batch and gives its own `generate` call's
    tokens, whether it stays within original_max_position_embeddings, starts past it (long
    factors from its prefill on) or passes it while decoding (computed again with the long factors
    at that step, as generate drops its cache there). Its log-probabilities are those of a forward
    over the prompt and the tokens before each (LongRoPE picks its factors by that length). With
    chunks of 5 tokens, long prompts and recomputes (13 tokens) run in chunks between the other
    rows' steps."""
    _, ours = longrope
    rng = random.Random(5)
    n = 8
    # at the edges: the last token drawn from LIMIT tokens (no crossing), a crossing at the first
    # decode step (a prompt of LIMIT), a prompt one past the switch; then random ones
    lengths = [LIMIT - n + 1, LIMIT, LIMIT + 1, 1, *(rng.randint(2, 2 * LIMIT) for _ in range(7))]
    inputs = [[rng.randint(1, 96) for _ in range(k)] for k in lengths]
    assert not crosses(inputs[0], n) and crosses(inputs[1], n) and not crosses(inputs[2], n)
    kinds = {(len(p) > LIMIT, crosses(p, n)) for p in inputs}
    assert kinds == {(False, False), (False, True), (True, False)}
    cb = {"max_requests_per_batch": 3, "return_logprobs": True, "prefill_chunk_tokens": chunk}
    with ours.continuous_batching_context_manager(generation_config=config(n, eos_token_id=None),
                                                  continuous_batching_config=cb) as m:
        for i, p in enumerate(inputs):
            m.add_request(p, request_id=str(i), top_logprobs=2)
        out = {r.request_id: r for r in (m.get_result(timeout=60) for _ in inputs)}
    assert m.stats["recomputed"] == sum(crosses(p, n) for p in inputs) and max(m.stats["decode_rows"]) == 3
    assert (m.stats["recomputed_in_chunks"] > 0) == (chunk is not None) and (m.stats["chunked"] > 0) == bool(chunk)
    for i, p in enumerate(inputs):
        r = out[str(i)]
        assert r.error is None and r.generated_tokens == own_greedy(ours, p, n), f"prompt of {len(p)} tokens"
        seq = p + r.generated_tokens
        with torch.no_grad():
            lsm = torch.stack([ours(torch.tensor([seq[:k]])).logits[0, -1].float().log_softmax(-1)
                               for k in range(len(p), len(seq))])
        values, ids = lsm.topk(2)
        assert [[t for t, _ in top] for top in r.top_logprobs] == ids.tolist()
        torch.testing.assert_close(torch.tensor(r.logprobs), values[:, 0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("slots", [40, 41])
def test_longrope_recompute_in_chunks_needs_room(longrope, slots, monkeypatch):
    """A recompute in chunks moves its row's sequence right by a slot a chunk (chunks - 1 = 2 for
    13 tokens in chunks of 5), so it runs in chunks only where the request's remaining tokens
    still fit in the row after that (41 slots here: its last token's key lands in the last slot);
    with one slot fewer it runs in one forward. Both give generate's tokens. (Rows of
    max_cache_len slots, paged too: the row's end is the boundary under test.)"""
    monkeypatch.setattr(batching, "PAGED_ROW_SPAN", 1)
    _, ours = longrope
    rng = random.Random(11)
    short, crossing = [rng.randint(1, 96) for _ in range(3)], [rng.randint(1, 96) for _ in range(LIMIT - 2)]
    cb = {"max_requests_per_batch": 2, "prefill_chunk_tokens": 5, "max_cache_len": slots}
    out, m = run_queued(ours, config(8, eos_token_id=None), cb,
                        [("short", short, {"max_new_tokens": 9}),  # decoding at the crossing, never crossing
                         ("crossing", crossing, {"max_new_tokens": 30})])
    assert m.stats["recomputed"] == 1 and m.stats["recomputed_in_chunks"] == (slots == 41) and not m.stats["shifts"]
    assert out["short"].generated_tokens == own_greedy(ours, short, 9)
    assert out["crossing"].error is None and out["crossing"].generated_tokens == own_greedy(ours, crossing, 30)


def test_longrope_recompute_runs_whole_where_its_chunks_have_no_pages(longrope, monkeypatch):
    """Paged, a recompute in chunks moves its sequence right by a slot a chunk, onto slots its row
    does not hold yet. Where the pages cannot hold them, it runs in one forward instead (before,
    the manager failed on it), with the same tokens. (Pages held for each request's whole length,
    so that the recompute's chunks set the peak.)"""
    monkeypatch.setattr(batching, "PAGES_ON_DEMAND", False)
    _, ours = longrope
    rng = random.Random(21)
    short = [rng.randint(1, 96) for _ in range(3)]
    crossing = [rng.randint(1, 96) for _ in range(LIMIT - 2)]
    work = [("short", short, {"max_new_tokens": 9}), ("x", crossing, {})]
    peaks = []
    hold = batching._Batch.hold
    monkeypatch.setattr(batching._Batch, "hold", lambda self, spans: (hold(self, spans),
                                                                      peaks.append(len(self._held)))[0])
    cb = {"max_requests_per_batch": 2, "max_cache_len": 20, "prefill_chunk_tokens": 5, "paged": True, "page_size": 1}
    out, m = run_queued(ours, config(6, eos_token_id=None), cb, work)
    assert m.stats["recomputed_in_chunks"] == 1
    out, m = run_queued(ours, config(6, eos_token_id=None), {**cb, "num_blocks": max(peaks) - 1}, work)
    assert m.stats["recomputed"] == 1 and m.stats["recomputed_in_chunks"] == 0
    for rid, p, n in (("short", short, 9), ("x", crossing, 6)):
        assert out[rid].error is None and out[rid].generated_tokens == own_greedy(ours, p, n), rid


def test_longrope_recomputes_in_chunks_one_at_a_time(longrope, monkeypatch):
    """Two requests that pass the switch at one step: the first runs in chunks, the second in one
    forward (one request runs in chunks at a time). A request cancelled while its recompute's
    chunks run comes back cancelled with its tokens so far, and the request waiting for a row
    takes its row."""
    _, ours = longrope
    rng = random.Random(12)
    short = [rng.randint(1, 96) for _ in range(3)]
    pair = [[rng.randint(1, 96) for _ in range(LIMIT - 2)] for _ in range(2)]
    cb = {"max_requests_per_batch": 3, "prefill_chunk_tokens": 5}
    out, m = run_queued(ours, config(6, eos_token_id=None), cb,
                        [("short", short, {"max_new_tokens": 9}), ("x", pair[0], {}), ("y", pair[1], {})])
    assert m.stats["recomputed"] == 2 and m.stats["recomputed_in_chunks"] == 1
    for rid, p, n in (("short", short, 9), ("x", pair[0], 6), ("y", pair[1], 6)):
        assert out[rid].error is None and out[rid].generated_tokens == own_greedy(ours, p, n), rid

    original = batching.ContinuousBatchingManager._next_chunk
    cancelled = []

    def cancel_at_first_chunk(self, running, batch):
        ch = self._chunked
        if ch.recompute and not cancelled:
            cancelled.append(ch.req.id)
            self.cancel_request(ch.req.id)  # taken at the next turn, after this chunk
        original(self, running, batch)

    monkeypatch.setattr(batching.ContinuousBatchingManager, "_next_chunk", cancel_at_first_chunk)
    out, m = run_queued(ours, config(6, eos_token_id=None), dict(cb, max_requests_per_batch=2),
                        [("short", short, {"max_new_tokens": 9}), ("x", pair[0], {}), ("late", pair[1], {})])
    assert cancelled == ["x"] and out["x"].status == moetorch.RequestStatus.FAILED and out["x"].error == "cancelled"
    assert out["x"].generated_tokens == own_greedy(ours, pair[0], 3)  # the tokens before the switch
    assert m._chunked is None and m.stats["recomputed_in_chunks"] >= 1
    for rid, p, n in (("short", short, 9), ("late", pair[1], 6)):
        assert out[rid].error is None and out[rid].generated_tokens == own_greedy(ours, p, n), rid


def test_longrope_chunk_without_a_step_to_ride(longrope, monkeypatch):
    """A prompt chunk waits for the turn's decode step to carry it (`MIX_CHUNKS`); when the only
    running request leaves that step to be computed again past the switch, the chunk runs alone,
    and every request gives generate's tokens."""
    _, ours = longrope
    forward, alone = batching._Batch.forward, []

    def spy(self, prompts, *args, **kw):
        if inspect.stack()[1].function == "_decode":
            alone.append([len(p) for p in prompts])
        return forward(self, prompts, *args, **kw)

    monkeypatch.setattr(batching._Batch, "forward", spy)
    rng = random.Random(14)
    b, a, long = ([rng.randint(1, 96) for _ in range(k)] for k in (4, 9, 20))
    requests = [("b", b, {"max_new_tokens": 2}), ("a", a, {"max_new_tokens": 6}), ("long", long, {"max_new_tokens": 3})]
    out, m = run_queued(ours, config(6, eos_token_id=None), {"max_requests_per_batch": 2, "prefill_chunk_tokens": 5},
                        requests)
    assert alone and m.stats["recomputed"] == 1 and m.stats["mixed"] > 0
    for rid, p, kw in requests:
        assert out[rid].error is None and out[rid].generated_tokens == own_greedy(ours, p, kw["max_new_tokens"]), rid


def test_longrope_rejoined_row_is_shared(longrope, monkeypatch):
    """A row that rejoined after a recompute in chunks holds its sequence a slot a chunk further
    right: a prompt that starts with its prompt (past the switch too) and arrives while it runs
    shares those keys from where they now lie, and both give generate's tokens."""
    monkeypatch.setattr(batching.prefixes, "BLOCK", 4)
    monkeypatch.setattr(batching, "FOLLOW_MIN_TOKENS", 0)
    _, ours = longrope
    rng = random.Random(13)
    short, crossing = [rng.randint(1, 96) for _ in range(3)], [rng.randint(1, 96) for _ in range(LIMIT - 2)]
    follow = crossing + [rng.randint(1, 96) for _ in range(6)]
    original = batching.ContinuousBatchingManager._rejoin

    def then_follow(self, ch, running, batch):
        original(self, ch, running, batch)
        self.add_request(follow, request_id="follow", max_new_tokens=4)

    monkeypatch.setattr(batching.ContinuousBatchingManager, "_rejoin", then_follow)
    cb = {"max_requests_per_batch": 3, "prefill_chunk_tokens": 5, "allow_block_sharing": True}
    m = ours.init_continuous_batching(generation_config=config(8, eos_token_id=None), continuous_batching_config=cb)
    m.add_request(short, request_id="short", max_new_tokens=9)  # both queued before the loop starts
    m.add_request(crossing, request_id="crossing", max_new_tokens=20)
    m.start()
    try:
        out = {r.request_id: r for r in (m.get_result(timeout=60) for _ in range(3))}
    finally:
        m.stop(block=True, timeout=60)
    assert m.stats["recomputed_in_chunks"] == 1 and m.stats["shared_tokens"] >= 8
    for rid, p, n in (("short", short, 9), ("crossing", crossing, 20), ("follow", follow, 4)):
        assert out[rid].error is None and out[rid].generated_tokens == own_greedy(ours, p, n), rid


def test_longrope_batch_matches_transformers(tmp_path):
    """Against Transformers' generate: its LongRoPE switches only the mscale (docs/differences.md),
    so with the same short and long factors both libraries compute the same, and the batch's
    requests that start past the switch or pass it give Transformers' tokens."""
    scaling = longrope_scaling(8, original=LIMIT, seed=3)
    scaling["long_factor"] = scaling["short_factor"]
    hf, ours = make_pair(PHIMOE, tmp_path, rope_scaling=scaling, max_position_embeddings=96)
    rng = random.Random(6)
    inputs = [[rng.randint(1, 96) for _ in range(k)] for k in (3, 9, LIMIT, LIMIT + 4, 2 * LIMIT)]
    out = ours.generate_batch(inputs, generation_config=config(8, eos_token_id=None),
                              continuous_batching_config={"max_requests_per_batch": 2})
    for p, r in zip(inputs, out.values()):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert r.generated_tokens == ref[0, len(p):].tolist(), f"prompt of {len(p)} tokens"


@pytest.mark.parametrize("chunk", [None, 5], ids=["whole", "chunks-of-5"])
def test_longrope_crossing_keeps_sampling_state(longrope, monkeypatch, chunk):
    """A request that passes the switch keeps its sampling state through the recompute: a seeded
    request draws the same tokens alone and beside others (its draw counter goes on), top_k=1 is
    greedy, and penalties count the tokens drawn before it (as generate's processors do), not the
    throwaway tokens that the steps it left computed in its row (one, or one a chunk)."""
    _, ours = longrope
    counted = []
    original = batching.ContinuousBatchingManager._resume

    def spy(self, row, req, logits, running, batch):
        original(self, row, req, logits, running, batch)
        if req.sampling is not None and req.sampling.counts:  # (only rows with penalties are kept exact)
            want = torch.bincount(torch.tensor(req.tokens), minlength=batch.counts.generated.shape[1]).float()
            counted.append(torch.equal(batch.counts.generated[row], want))

    monkeypatch.setattr(batching.ContinuousBatchingManager, "_resume", spy)
    cb = {"max_requests_per_batch": 4, "prefill_chunk_tokens": chunk}
    rng = random.Random(7)
    prompt = [rng.randint(1, 96) for _ in range(LIMIT - 3)]
    others = [[rng.randint(1, 96) for _ in range(k)] for k in (4, LIMIT + 3, 7)]
    n = 9
    assert crosses(prompt, n)
    draws = []
    for company in ([], others):
        requests = {"s": (prompt, {"do_sample": True, "temperature": 3.0, "seed": 5}),
                    "k1": (prompt, {"do_sample": True, "top_k": 1})}
        requests.update({f"o{i}": (p, {}) for i, p in enumerate(company)})
        got = run_requests(ours, config(n), cb, requests)
        assert got["k1"].generated_tokens == own_greedy(ours, prompt, n)
        draws.append(got["s"].generated_tokens)
    assert draws[0] == draws[1]
    kw = {"repetition_penalty": 2.0, "frequency_penalty": 1.0, "presence_penalty": 0.5, "logit_bias": {4: 3.0}}
    # beside another request with penalties, whose counts the steps keep (the row's too)
    got = run_requests(ours, config(n), cb, {"pen": (prompt, kw), "pen2": (others[0], kw), "o": (others[1], {})})
    proc = moetorch.FrequencyPresencePenaltyLogitsProcessor(1.0, 0.5, prompt_length=len(prompt))
    want = ours.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None,
                         repetition_penalty=2.0, sequence_bias={(4,): 3.0},
                         logits_processor=moetorch.LogitsProcessorList([proc]))[0, len(prompt):].tolist()
    assert got["pen"].generated_tokens == want != own_greedy(ours, prompt, n)
    assert counted == [True]


def test_longrope_prefixes_are_shared_within_a_factor_set(tmp_path, monkeypatch):
    """Prefix sharing with LongRoPE: a prompt starts only from rows rotated by its own factor set.
    A long prompt does not start from a short request's row that holds its first tokens; a chat's
    next turn starts from the row of a turn that passed the switch (long by then), and every
    request still gives its own generate call's tokens."""
    monkeypatch.setattr(batching.prefixes, "BLOCK", 4)
    monkeypatch.setattr(batching, "FOLLOW_MIN_TOKENS", 0)
    limit = 20
    _, ours = make_pair(PHIMOE, tmp_path, rope_scaling=longrope_scaling(8, original=limit), max_position_embeddings=96)
    rng = random.Random(9)
    gen = config(4, eos_token_id=None)
    cb = {"max_requests_per_batch": 2, "allow_block_sharing": True}
    short = [rng.randint(1, 96) for _ in range(16)]
    with ours.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb) as m:
        first = m.get_result(m.add_request(short), timeout=60)
        # past the switch, starting with the short request's prompt and reply: nothing shared
        longer = short + first.generated_tokens + [rng.randint(1, 96) for _ in range(5)]
        second = m.get_result(m.add_request(longer), timeout=60)
        assert m.stats["shared_tokens"] == 0
        # a request that passes the switch, then its next turn, which shares its row's long keys
        turn = [rng.randint(1, 96) for _ in range(18)]
        third = m.get_result(m.add_request(turn, max_new_tokens=6), timeout=60)
        follow = turn + third.generated_tokens + [rng.randint(1, 96) for _ in range(3)]
        fourth = m.get_result(m.add_request(follow), timeout=60)
    assert m.stats["recomputed"] == 1 and m.stats["shared_tokens"] >= 20
    for p, r, k in ((short, first, 4), (longer, second, 4), (turn, third, 6), (follow, fourth, 4)):
        assert r.error is None and r.generated_tokens == own_greedy(ours, p, k), f"prompt of {len(p)} tokens"


def test_longrope_long_prompt_in_chunks(longrope):
    """A prompt past the switch computed in chunks while another request decodes: every chunk
    takes the long factors, and both requests give generate's tokens."""
    _, ours = longrope
    rng = random.Random(10)
    short, long = [rng.randint(1, 96) for _ in range(5)], [rng.randint(1, 96) for _ in range(3 * LIMIT)]
    with ours.continuous_batching_context_manager(
            generation_config=config(6, eos_token_id=None),
            continuous_batching_config={"max_requests_per_batch": 2, "prefill_chunk_tokens": 10}) as m:
        m.add_request(short, request_id="a", max_new_tokens=30, streaming=True)
        assert m.get_result("a", timeout=60).status == moetorch.RequestStatus.DECODING
        m.add_request(long, request_id="long")
        got = m.get_result("long", timeout=60)
        rest = list(m.request_id_iter("a"))
    assert m.stats["chunked"] == 1 and got.generated_tokens == own_greedy(ours, long, 6)
    assert rest[-1].generated_tokens == own_greedy(ours, short, 30)


def test_manager_api(pair):
    """init_continuous_batching: ids, streaming, per-request limits, timestamps, get_result by id,
    request_id_iter and iteration."""
    _, ours = pair
    a, b, c = prompts(8, 3)
    manager = ours.init_continuous_batching(generation_config=config(4, eos_token_id=None),
                                            continuous_batching_config={"max_requests_per_batch": 2})
    manager.start()
    try:
        assert manager.is_running()
        assert manager.add_request(a, request_id="mine", streaming=True) == "mine"
        rid = manager.add_request(b, max_new_tokens=2, record_timestamps=True)
        assert rid.startswith("req_")
        steps = list(manager.request_id_iter("mine"))
        assert [len(s.generated_tokens) for s in steps] == [1, 2, 3, 4]
        assert [s.status for s in steps[:-1]] == [moetorch.RequestStatus.DECODING] * 3 and steps[-1].is_finished()
        assert steps[-1].generated_tokens == own_greedy(ours, a, 4)
        res = manager.get_result(rid, timeout=30)
        assert res.generated_tokens == own_greedy(ours, b, 2) and len(res.timestamps) == 2
        manager.add_requests([c])
        results = []
        for r in manager:
            results.append(r)
            if len(results) == 1:
                break
        assert results[0].generated_tokens == own_greedy(ours, c, 4)
    finally:
        manager.stop(block=True, timeout=30)
    assert not manager.is_running()


def test_stop_finishes_what_was_added_and_cancel(pair):
    _, ours = pair
    inputs = prompts(9, 4)
    manager = ours.init_continuous_batching(generation_config=config(6, eos_token_id=None),
                                            continuous_batching_config={"max_requests_per_batch": 1})
    # queued before the start: the first runs, the last is cancelled while it waits
    ids = manager.add_requests(inputs)
    manager.cancel_request(ids[-1])
    manager.start()
    manager.stop(block=True, timeout=60)
    results = {}
    while (r := manager.get_result(timeout=0)) is not None:
        results[r.request_id] = r
    assert set(results) == set(ids)
    assert results[ids[-1]].status == moetorch.RequestStatus.FAILED and results[ids[-1]].error == "cancelled"
    for rid, p in zip(ids[:-1], inputs):
        assert results[rid].generated_tokens == own_greedy(ours, p, 6)
    # a stopped manager queues for its next start
    manager.add_request(inputs[0], request_id="again")
    manager.start()
    assert manager.get_result("again", timeout=30).generated_tokens == own_greedy(ours, inputs[0], 6)
    manager.stop(block=False)
    with pytest.raises(RuntimeError, match="stopping"):  # while the loop winds down
        manager.add_request(inputs[1])
    manager.join(30)


def test_hard_stop_fails_what_is_left(pair):
    _, ours = pair
    manager = ours.init_continuous_batching(generation_config=config(30, eos_token_id=None),
                                            continuous_batching_config={"max_requests_per_batch": 1})
    ids = manager.add_requests(prompts(11, 3))
    manager.start()
    manager.stop(block=True, timeout=60, hard_stop=True)
    results = [manager.get_result(timeout=0) for _ in ids]
    assert {r.request_id for r in results} == set(ids)
    left = [r for r in results if r.status == moetorch.RequestStatus.FAILED]
    assert left and all("hard_stop" in r.error for r in left)


def test_result_handler_on_an_event_loop(pair):
    """register_result_handler: a request's outputs reach its callback on the asyncio loop, whole
    or (moetorch, `deltas=True`) as the tokens since the result before."""
    import asyncio

    _, ours = pair
    p = prompts(16, 1)[0]
    m = ours.init_continuous_batching(generation_config=config(3), continuous_batching_config={"return_logprobs": True})
    m.start()

    async def client(deltas: bool):
        done, seen = asyncio.Event(), []

        def on_result(out):
            seen.append((out, threading.current_thread() is threading.main_thread()))
            if out.is_finished():
                done.set()

        m.register_result_handler("h", on_result, **({"deltas": True} if deltas else {}))
        m.add_request(p, request_id="h", streaming=True)
        await asyncio.wait_for(done.wait(), 60)
        return seen

    try:
        seen = asyncio.run(client(False))
        # (moetorch) deltas: each result holds the tokens and log-probabilities since the one before
        parts = asyncio.run(client(True))
    finally:
        m.stop(timeout=30)
    assert [len(o.generated_tokens) for o, _ in seen] == [1, 2, 3] and all(on_loop for _, on_loop in seen)
    assert seen[-1][0].generated_tokens == own_greedy(ours, p, 3)
    assert m.get_result("h", timeout=0) is None  # delivered to the handler only
    assert [len(o.generated_tokens) for o, _ in parts] == [1, 1, 1] and parts[-1][0].is_finished()
    assert [t for o, _ in parts for t in o.generated_tokens] == seen[-1][0].generated_tokens
    assert [lp for o, _ in parts for lp in o.logprobs] == seen[-1][0].logprobs


def test_pause(pair):
    """Inside pause() the loop takes no step; the request then finishes as it would have."""
    _, ours = pair
    p = prompts(17, 1)[0]
    m = ours.init_continuous_batching(generation_config=config(40, eos_token_id=None))
    with pytest.raises(RuntimeError, match="not running"):
        with m.pause():
            pass
    m.start()
    try:
        m.add_request(p, request_id="slow", streaming=True)
        last = m.get_result("slow", timeout=30)
        assert last is not None  # it runs
        with m.pause():
            while (r := m.get_result("slow", timeout=0)) is not None:
                last = r  # what was delivered before the pause took hold
            steps = len(last.generated_tokens)
            with pytest.raises(RuntimeError, match="pause"):
                m.stop()
            assert m.get_result("slow", timeout=0.3) is None  # no step while paused
        outs = list(m.request_id_iter("slow"))
    finally:
        m.stop(timeout=30)
    assert steps < 40 and outs[-1].generated_tokens == own_greedy(ours, p, 40)


def test_context_manager_and_persistent_manager(pair):
    _, ours = pair
    p = prompts(12, 1)[0]
    with ours.continuous_batching_context_manager(generation_config=config(3), persistent_manager=True) as m:
        m.add_request(p, request_id="x")
        assert m.get_result("x", timeout=30).generated_tokens == own_greedy(ours, p, 3)
    assert ours.init_continuous_batching() is m  # kept
    out = ours.generate_batch([p], generation_config=config(3))
    assert out["req_0"].generated_tokens == own_greedy(ours, p, 3)
    ours.destroy_cached_continuous_batching_manager()
    assert ours.init_continuous_batching(generation_config=config(3)) is not m


def test_errors_name_the_problem(pair):
    _, ours = pair
    m = ours.init_continuous_batching(generation_config=config(4), continuous_batching_config={"max_cache_len": 10})
    with pytest.raises(ValueError, match="empty"):
        m.add_request([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m.add_request([1, 97])
    with pytest.raises(TypeError, match="token ids"):
        m.add_request([1.5, 2.0])
    with pytest.raises(ValueError, match="max_cache_len"):
        m.add_request(list(range(1, 9)))  # 8 + 4 - 1 > 10 slots
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.add_request([1], max_new_tokens=0)
    with pytest.raises(TypeError, match=r"per-request settings \['temprature'\]"):
        m.add_request([1], temprature=0.5)
    with pytest.raises(ValueError, match="do_sample=True"):
        m.add_request([1], temperature=0.5)  # the config decodes greedily
    for bad, err, match in [({"temperature": 0.0}, ValueError, "temperature must be a positive"),
                            ({"top_p": 1.5}, ValueError, "top_p must be in"), ({"top_k": -1}, ValueError, "top_k"),
                            ({"top_k": 2.0}, TypeError, "top_k must be an int"),
                            ({"temperature": "hot"}, TypeError, "temperature must be a finite number"),
                            ({"temperature": 1e39}, TypeError, "temperature must be a finite number within float32"),
                            ({"seed": -3}, ValueError, "seed"), ({"do_sample": 1}, TypeError, "do_sample"),
                            ({"min_p": 1.5}, ValueError, r"min_p must be in \[0, 1\]"),
                            ({"repetition_penalty": 0.0}, ValueError, "repetition_penalty must be positive"),
                            ({"frequency_penalty": float("nan")}, TypeError, "frequency_penalty must be a finite"),
                            ({"presence_penalty": "x"}, TypeError, "presence_penalty must be a finite"),
                            ({"logit_bias": {97: 1.0}}, ValueError, r"logit_bias: 97 is not a token id .*0 \.\. 96"),
                            ({"logit_bias": {"5": 1.0}}, ValueError, "logit_bias: '5' is not a token id"),
                            ({"logit_bias": {5: float("inf")}}, ValueError, r"logit_bias\[5\] must be a finite"),
                            ({"logit_bias": {5: -1e39}}, ValueError, r"logit_bias\[5\] must be a finite"),
                            ({"logit_bias": [(5, 1.0)]}, TypeError, "logit_bias must be a dict")]:
        with pytest.raises(err, match=match):
            m.add_request([1], request_id="bad", **{"do_sample": True, **bad})
    with pytest.raises(ValueError, match=r"\['min_p'\] apply to sampling"):
        m.add_request([1], min_p=0.1)  # greedy: penalties and bias apply, min_p does not
    # a top_k past the vocabulary (past int64 too) keeps every token, as top_k=0 does
    runs = []
    for k in (0, 97, 10**20):
        torch.manual_seed(5)
        out = ours.generate_batch([[1, 2, 3]], generation_config=config(6, do_sample=True, top_k=k))
        runs.append(out["req_0"].generated_tokens)
    assert runs[0] == runs[1] == runs[2]
    m.add_request([1, 2], request_id="a")
    with pytest.raises(ValueError, match="already queued"):
        m.add_request([3], request_id="a")
    with pytest.raises(ValueError, match="beam search"):
        ours.init_continuous_batching(generation_config=config(4, num_beams=2))
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        ours.init_continuous_batching(generation_config=config(4, no_repeat_ngram_size=2),
                                      continuous_batching_config={"drop_unsupported_processors": False})
    with pytest.raises(ValueError, match="sequence_bias"):  # a bias on a longer sequence is not applied
        ours.init_continuous_batching(generation_config=config(4, sequence_bias={(3, 4): 1.0}),
                                      continuous_batching_config={"drop_unsupported_processors": False})
    with pytest.raises(TypeError, match="unknown fields"):
        ours.generate_batch([[1]], continuous_batching_config={"max_rows": 2})
    with pytest.raises(TypeError, match="unexpected keyword"):
        ours.generate_batch([[1]], temperature=0.5)
    with pytest.raises(ValueError, match=r"inputs\[1\]"):
        ours.generate_batch([[1], []])
    assert ours.generate_batch([]) == {}


def test_a_model_over_several_devices_is_refused():
    model = PHIMOE.ours["causal_lm"](PHIMOE.our_config())
    model.model.layers[1].to("meta")  # a second device, as device_map places layers
    with pytest.raises(ValueError, match="one device"):
        model.generate_batch([[1, 2]])


def test_dropped_settings_warn(pair, caplog):
    """As Transformers: settings the batch does not apply are dropped with a warning."""
    _, ours = pair
    p = prompts(13, 1)[0]
    with caplog.at_level("WARNING", logger="moetorch"):
        out = ours.generate_batch([p], generation_config=config(4, no_repeat_ngram_size=2))
    assert "no_repeat_ngram_size" in caplog.text
    assert out["req_0"].generated_tokens == own_greedy(ours, p, 4)


def test_queue_limit(pair, monkeypatch):
    _, ours = pair
    monkeypatch.setattr(batching, "QUEUE_WAIT_S", 0.2)
    m = ours.init_continuous_batching(generation_config=config(2), continuous_batching_config={"max_queue_size": 1})
    m.add_request([1])
    with pytest.raises(TimeoutError, match="queue stayed full"):
        m.add_request([2])


def test_generate_batch_checks_every_prompt_first(pair):
    """A prompt too long for a row fails the call before any request is queued: the kept manager
    holds nothing stale for the next call."""
    _, ours = pair
    good = prompts(18, 2)
    first = ours.generate_batch(good, generation_config=config(4), persistent_manager=True)
    kept = ours.init_continuous_batching()
    too_long = list(range(1, 97)) * 3  # past the kept manager's 256 slots
    with pytest.raises(ValueError, match=r"req_\d+.*max_cache_len"):
        ours.generate_batch([good[0], too_long, good[1]], generation_config=config(4), persistent_manager=True)
    assert not kept._incoming and not kept._known
    again = ours.generate_batch(good, generation_config=config(4), persistent_manager=True)
    assert len(again) == 2 and [r.generated_tokens for r in again.values()] == \
        [r.generated_tokens for r in first.values()] == [own_greedy(ours, p, 4) for p in good]
    ours.destroy_cached_continuous_batching_manager()


def test_generate_batch_with_a_small_queue(pair):
    """max_queue_size below the request count: the loop starts first and drains the queue."""
    _, ours = pair
    inputs = prompts(19, 6)
    out = ours.generate_batch(inputs, generation_config=config(3),
                              continuous_batching_config={"max_queue_size": 2, "max_requests_per_batch": 2})
    assert [r.generated_tokens for r in out.values()] == [own_greedy(ours, p, 3) for p in inputs]


def test_a_failing_forward_fails_its_requests(pair, monkeypatch):
    """An error inside the loop: every request comes back FAILED with it, nothing hangs."""
    _, ours = pair

    def boom(self, *a, **k):
        raise RuntimeError("device on fire")

    monkeypatch.setattr(batching._Batch, "prefill", boom)
    out = ours.generate_batch(prompts(14, 3), generation_config=config(3))
    assert list(out) == ["req_0", "req_1", "req_2"]
    assert all(r.status == moetorch.RequestStatus.FAILED and "device on fire" in r.error for r in out.values())


def test_requests_from_several_threads(pair):
    _, ours = pair
    inputs = prompts(15, 8)
    m = ours.init_continuous_batching(generation_config=config(3), continuous_batching_config={"max_requests_per_batch": 3})
    m.start()
    got = {}
    try:
        def client(i):
            rid = m.add_request(inputs[i], request_id=f"t{i}")
            got[i] = m.get_result(rid, timeout=60)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(inputs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        m.stop(timeout=30)
    assert [got[i].generated_tokens for i in range(len(inputs))] == [own_greedy(ours, p, 3) for p in inputs]


def test_config_sizes(pair):
    _, ours = pair
    m = ours.init_continuous_batching(generation_config=config(4),
                                      workload_hints=batching.WorkloadHints(30, 10, 5))
    assert m.rows == 5 and m.slots == 256  # the requests; twice the longest's 40 tokens, rounded up
    m = ours.init_continuous_batching(generation_config=config(4))
    assert m.rows == batching.DEFAULT_ROWS and m.slots == 64  # CPU; max_position_embeddings
    cfg = batching.ContinuousBatchingConfig.of(transformers.ContinuousBatchingConfig(max_requests_per_batch=3))
    assert cfg.max_requests_per_batch == 3
    assert moetorch.ContinuousMixin is moetorch.ContinuousBatchingMixin


class PoisonedSteps:
    """Decode steps (`_Batch.step`) that raise inside the model's last decoder layer: the layers
    before it have written their keys and values for the step's column, as a forward that fails
    midway leaves them. `errors[n]`: what the n-th step (from 1) raises; `every`: what each step
    raises otherwise (None: nothing)."""

    def __init__(self, monkeypatch, model) -> None:
        self.steps, self.errors, self.every = 0, {}, None
        self._error = None
        step, last = batching._Batch.step, model.model.layers[-1]
        layer_type = type(last)
        forward = layer_type.forward

        def counted(batch, b):
            self.steps += 1
            self._error = self.errors.pop(self.steps, self.every)
            try:
                return step(batch, b)
            finally:
                self._error = None

        def poisoned(layer, *args, **kwargs):
            if layer is last and self._error is not None:
                raise self._error
            return forward(layer, *args, **kwargs)

        monkeypatch.setattr(batching._Batch, "step", counted)
        monkeypatch.setattr(layer_type, "forward", poisoned)

    def next(self, error: BaseException) -> None:
        """The next decode step raises `error` (call it while the loop takes no step)."""
        self.errors[self.steps + 1] = error


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(pair, monkeypatch, caplog):
    """A decode step that raises once: the requests it ran come back FAILED naming the error (the
    traceback logged once), while a request queued behind them and one added afterwards run in the
    batch built afresh, with the tokens a fresh manager gives them."""
    _, ours = pair
    a, b, c, d = prompts(20, 4, lo=3)
    fresh = ours.generate_batch([c, d], generation_config=config(6, eos_token_id=None))
    poison = PoisonedSteps(monkeypatch, ours)
    poison.errors[3] = RuntimeError("device on fire")
    m = ours.init_continuous_batching(generation_config=config(6, eos_token_id=None),
                                      continuous_batching_config={"max_requests_per_batch": 2})
    # queued before the start: a and b fill both rows, c waits for one
    for rid, p in (("a", a), ("b", b), ("c", c)):
        m.add_request(p, request_id=rid)
    with caplog.at_level("ERROR", logger="moetorch"):
        m.start()
        try:
            failed = [m.get_result(rid, timeout=60) for rid in ("a", "b")]
            queued = m.get_result("c", timeout=60)
            m.add_request(d, request_id="d")
            later = m.get_result("d", timeout=60)
            assert m.is_running()
        finally:
            m.stop(timeout=30)
    for r in failed:
        assert r.status == moetorch.RequestStatus.FAILED and r.is_finished()
        assert r.error == "a step of the batch failed: RuntimeError: device on fire"
        assert len(r.generated_tokens) < 6
    assert queued.status == later.status == moetorch.RequestStatus.FINISHED and queued.error is later.error is None
    assert [queued.generated_tokens, later.generated_tokens] == [r.generated_tokens for r in fresh.values()] == \
        [own_greedy(ours, p, 6) for p in (c, d)]
    assert m.recovered_errors == 1 and m.fatal_error is None
    assert caplog.text.count("Traceback") == 1 and "device on fire" in caplog.text


def test_an_out_of_memory_step_is_survived(pair, monkeypatch):
    """torch.cuda.OutOfMemoryError in a step fails that step's request only; the next run."""
    _, ours = pair
    inputs = prompts(21, 3, lo=3)
    poison = PoisonedSteps(monkeypatch, ours)
    poison.errors[2] = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    m = ours.init_continuous_batching(generation_config=config(4, eos_token_id=None),
                                      continuous_batching_config={"max_requests_per_batch": 1})
    ids = m.add_requests(inputs)
    m.start()
    try:
        out = [m.get_result(rid, timeout=60) for rid in ids]
    finally:
        m.stop(timeout=30)
    assert out[0].status == moetorch.RequestStatus.FAILED and "OutOfMemoryError: CUDA out of memory" in out[0].error
    assert [r.generated_tokens for r in out[1:]] == [own_greedy(ours, p, 4) for p in inputs[1:]]
    assert m.recovered_errors == 1 and m.fatal_error is None


def test_a_step_that_always_fails_stops_the_loop(pair, monkeypatch):
    """A failure on every step: the loop survives MAX_STEP_FAILURES - 1 failed turns in a row, then
    stops for good, every request left failed with the reason, and the server's engine says so."""
    from moetorch.serve.engine import Engine, EngineError

    _, ours = pair
    poison = PoisonedSteps(monkeypatch, ours)
    poison.every = RuntimeError("device on fire")
    m = ours.init_continuous_batching(generation_config=config(4, eos_token_id=None),
                                      continuous_batching_config={"max_requests_per_batch": 1})
    ids = m.add_requests(prompts(22, batching.MAX_STEP_FAILURES + 2, lo=3))
    m.start()
    out = [m.get_result(rid, timeout=60) for rid in ids]
    m._thread.join(30)  # (the thread ended by itself: `join()` would forget it, as after a stop)
    assert not m.is_running() and isinstance(m.fatal_error, RuntimeError) and str(m.fatal_error) == "device on fire"
    assert m.recovered_errors == batching.MAX_STEP_FAILURES - 1
    assert all(r.status == moetorch.RequestStatus.FAILED for r in out)
    n = batching.MAX_STEP_FAILURES - 1
    assert all(r.error == "a step of the batch failed: RuntimeError: device on fire" for r in out[:n])
    assert all(r.error == "the manager failed: RuntimeError('device on fire')" for r in out[n:])
    engine = Engine.__new__(Engine)
    engine.model, engine.manager = ours, m
    with pytest.raises(EngineError, match=r"the batch's loop is not running \(RuntimeError: device on fire\)"):
        engine.ensure_running()


def test_failures_an_idle_stretch_apart_are_not_a_row(pair, monkeypatch):
    """Failed turns further apart than STEP_FAILURE_WINDOW_S (here: any two) each start a new row,
    so a failure on every step, past MAX_STEP_FAILURES of them, leaves the loop running, and a
    request after them gives its tokens."""
    _, ours = pair
    inputs = prompts(24, batching.MAX_STEP_FAILURES + 2, lo=3)
    monkeypatch.setattr(batching, "STEP_FAILURE_WINDOW_S", -1.0)
    poison = PoisonedSteps(monkeypatch, ours)
    poison.every = RuntimeError("device on fire")
    m = ours.init_continuous_batching(generation_config=config(4, eos_token_id=None),
                                      continuous_batching_config={"max_requests_per_batch": 1})
    m.start()
    try:
        ids = m.add_requests(inputs[:-1])
        out = [m.get_result(rid, timeout=60) for rid in ids]
        poison.every = None
        m.add_request(inputs[-1], request_id="after")
        after = m.get_result("after", timeout=60)
        assert m.is_running() and m.fatal_error is None
    finally:
        m.stop(timeout=30)
    assert all(r.error == "a step of the batch failed: RuntimeError: device on fire" for r in out)
    assert m.recovered_errors == len(out) > batching.MAX_STEP_FAILURES
    assert after.status == moetorch.RequestStatus.FINISHED and after.generated_tokens == own_greedy(ours, inputs[-1], 4)


def test_a_cuda_error_stops_the_loop_at_once(pair, monkeypatch):
    """After a recovered out-of-memory step and a request served, a CUDA error (the context is
    unusable after one) stops the loop at its first occurrence."""
    _, ours = pair
    first, second, third, fourth = prompts(23, 4, lo=3)
    poison = PoisonedSteps(monkeypatch, ours)
    m = ours.init_continuous_batching(generation_config=config(4, eos_token_id=None),
                                      continuous_batching_config={"max_requests_per_batch": 1})
    m.start()
    try:
        poison.next(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        m.add_request(first, request_id="oom")
        assert "OutOfMemoryError" in m.get_result("oom", timeout=60).error
        m.add_request(second, request_id="ok")
        assert m.get_result("ok", timeout=60).generated_tokens == own_greedy(ours, second, 4)
        sticky = RuntimeError("CUDA error: an illegal memory access was encountered")
        poison.next(sticky)
        m.add_request(third, request_id="sticky")
        m.add_request(fourth, request_id="behind")
        out = [m.get_result(rid, timeout=60) for rid in ("sticky", "behind")]
        m.join(30)
    finally:
        if m.is_running():
            m.stop(timeout=30)
    assert not m.is_running() and m.fatal_error is sticky and m.recovered_errors == 1
    assert all(r.status == moetorch.RequestStatus.FAILED and "illegal memory access" in r.error and
               r.error.startswith("the manager failed") for r in out)


def test_a_failing_step_with_a_prompt_in_chunks(pair, monkeypatch):
    """A step that fails while a long prompt runs in chunks (its chunk riding the running rows'
    decode step, `_Batch.mixed`): the running request and the one in chunks fail; a request
    waiting behind them and a later one run from a clean batch."""
    _, ours = pair
    short, long, behind, later = prompts(24, 4, lo=3, hi=5)
    long = long * 4  # 12+ tokens: chunks of 4 while `short` decodes
    mixed, calls = batching._Batch.mixed, []

    def failing(self, *args, **kwargs):
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("a chunk on fire")
        return mixed(self, *args, **kwargs)

    monkeypatch.setattr(batching._Batch, "mixed", failing)
    m = ours.init_continuous_batching(generation_config=config(6, eos_token_id=None),
                                      continuous_batching_config={"max_requests_per_batch": 3,
                                                                  "prefill_chunk_tokens": 4})
    m.start()
    try:
        m.add_request(short, request_id="short", max_new_tokens=40, streaming=True)
        assert m.get_result("short", timeout=60).status == moetorch.RequestStatus.DECODING
        with m.pause():  # both queued at once: `long` joins in chunks, `behind` waits for it
            m.add_request(long, request_id="long")
            m.add_request(behind, request_id="behind")
        failed = []
        while not failed or not failed[-1].is_finished():
            failed.append(m.get_result("short", timeout=60))
        failed = [failed[-1], m.get_result("long", timeout=60)]
        done = m.get_result("behind", timeout=60)
        m.add_request(later, request_id="later")
        done = [done, m.get_result("later", timeout=60)]
    finally:
        m.stop(timeout=30)
    assert len(calls) >= 2 and m.recovered_errors == 1
    assert all(r.status == moetorch.RequestStatus.FAILED and r.error ==
               "a step of the batch failed: RuntimeError: a chunk on fire" for r in failed)
    assert [r.generated_tokens for r in done] == [own_greedy(ours, p, 6) for p in (behind, later)]
