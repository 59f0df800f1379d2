"""A paged batch cache whose pages follow the tokens (`batching.PAGES_ON_DEMAND`): a running
request holds pages up to the batch's horizon, a page past the column, and takes more as it
decodes; where no page is left, the request that came last gives its pages up and is computed
again once pages are free (`ContinuousBatchingManager._preempt`). Every request still gives the
tokens and log-probabilities of its own `generate` call, and seeded draws and penalties go on as
if nothing happened. On the CPU a page is a few slots (`engine.pages.HostPages`), and every page
that no request holds is poisoned before each forward, so a read of a slot the manager did not
hold shows as wrong tokens."""

from __future__ import annotations

import random

import pytest
import torch
from archs import ARCH_IDS, ARCHS, PHIMOE, longrope_scaling
from parity import greedy_config as config
from parity import make_pair, own_greedy, run_queued

import moetorch
from moetorch.engine import batching
from moetorch.engine.pages import HostPages


@pytest.fixture(scope="module", params=ARCHS, ids=ARCH_IDS)
def model(request, tmp_path_factory):
    return make_pair(request.param, tmp_path_factory.mktemp(request.param.name))[1]


@pytest.fixture(autouse=True)
def pages_of_four_slots(monkeypatch):
    monkeypatch.setattr(batching, "PAGE_SLOTS", 4)


def forward_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Each token's log-probability under a forward over the prompt and the tokens before it."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)


def pages_in_use(monkeypatch) -> list[int]:
    """The cache's pages with memory after every `back`."""
    seen, back = [], HostPages.back

    def spy(self, pages):
        back(self, pages)
        seen.append(self.in_use)

    monkeypatch.setattr(HostPages, "back", spy)
    return seen


def test_pages_follow_the_tokens(model, monkeypatch):
    """Running requests hold pages for their prompts and the tokens so far, a page ahead, not for
    all of `max_new_tokens` from the start: the first prefill maps a few pages a request, and the
    pages grow as the rows decode. The tokens are each request's own `generate` tokens either way."""
    rng = random.Random(1)
    inputs = [[rng.randint(1, 96) for _ in range(rng.randint(3, 7))] for _ in range(3)]
    cb = {"max_cache_len": 64, "max_requests_per_batch": 3, "paged": True}
    peaks = {}
    for on_demand in (True, False):
        monkeypatch.setattr(batching, "PAGES_ON_DEMAND", on_demand)
        seen = pages_in_use(monkeypatch)
        out, m = run_queued(model, config(40), cb, [(str(i), p, {}) for i, p in enumerate(inputs)])
        for i, p in enumerate(inputs):
            assert out[str(i)].error is None and out[str(i)].generated_tokens == own_greedy(model, p, 40)
        peaks[on_demand] = (seen[0], max(seen), len(seen))
        assert m.stats["preempted"] == 0
    (first, peak, maps), (first_all, peak_all, maps_all) = peaks[True], peaks[False]
    # on demand: each request's prompt and the column's page (prompts of 3-7 tokens: at most 3
    # pages each), then a page a request each time the column passes a page boundary
    assert first <= 3 * 3 and maps > 8
    # held whole: each request's 40 + prompt slots from its prefill on
    assert first_all >= 3 * 11 and maps_all == 1
    assert peak <= peak_all


@pytest.mark.parametrize("span", [1, 2], ids=["rows-of-max-cache-len", "rows-of-twice"])
def test_requests_give_their_pages_up_and_resume(model, monkeypatch, span):
    """Fewer pages than the running requests grow into: the latest requests give theirs up
    (`stats["preempted"]`), wait at the queue's head and are computed again (prompt and tokens so
    far) once pages are free. Every request gives its own `generate` tokens, its log-probabilities
    those of a forward, and a streamed one sees each token once, in order; with rows of
    max_cache_len slots and with rows of twice that (`PAGED_ROW_SPAN`, a GPU's default)."""
    monkeypatch.setattr(batching, "PAGED_ROW_SPAN", span)
    rng = random.Random(2)
    inputs = [[rng.randint(1, 96) for _ in range(rng.randint(3, 9))] for _ in range(5)]
    n = 30
    cb = {"max_cache_len": 48, "max_requests_per_batch": 4, "paged": True, "num_blocks": 20,
          "return_logprobs": True}
    m = model.init_continuous_batching(generation_config=config(n), continuous_batching_config=cb)
    assert m.row_slots == 48 * span
    streamed, started, preempt = [], {}, batching.ContinuousBatchingManager._preempt

    def spy(self, row, waiting, running, batch):
        started.setdefault(running[row].id, running[row].started)
        preempt(self, row, waiting, running, batch)

    monkeypatch.setattr(batching.ContinuousBatchingManager, "_preempt", spy)
    # all queued before the loop starts: the first prefill takes them in order, as in every run
    ids = [m.add_request(p, request_id=str(i), streaming=i == 3) for i, p in enumerate(inputs)]
    m.start()
    out = {}
    while len(out) < len(ids):
        r = m.get_result(timeout=60)
        assert r is not None
        if r.request_id == "3":
            streamed.append(list(r.generated_tokens))
        if r.is_finished():
            out[r.request_id] = r
    m.stop(block=True)
    assert m.stats["preempted"] >= 1 and max(m.stats["decode_rows"]) >= 2
    for i, p in enumerate(inputs):
        r = out[str(i)]
        assert r.error is None and r.status == moetorch.RequestStatus.FINISHED
        assert r.generated_tokens == own_greedy(model, p, n), f"request {i}"
        torch.testing.assert_close(torch.tensor(r.logprobs), forward_logprobs(model, p, r.generated_tokens),
                                   atol=1e-4, rtol=0)
    assert started and all(out[rid].lifespan[0] == t for rid, t in started.items())  # when it first left the queue
    assert [len(s) for s in streamed] == list(range(1, n + 1))
    assert all(s == out["3"].generated_tokens[:len(s)] for s in streamed)


def test_seeded_draws_and_penalties_go_on_after_a_preemption(model, monkeypatch):
    """A request's draws are keyed by its seed and its token's index, and its penalties count its
    prompt and tokens: with pages enough (no preemption) and with few (preemptions), each request
    draws the same tokens."""
    rng = random.Random(3)
    inputs = [[rng.randint(1, 96) for _ in range(rng.randint(3, 9))] for _ in range(5)]
    settings = [{"do_sample": True, "temperature": 1.3, "seed": 11},
                {"do_sample": True, "top_p": 0.8, "seed": 12, "repetition_penalty": 1.8},
                {"do_sample": True, "top_k": 20, "seed": 13, "frequency_penalty": 0.7, "presence_penalty": 0.4},
                {"do_sample": True, "temperature": 0.9},  # its seed drawn when it first joins, then kept
                {"do_sample": True, "seed": 14, "logit_bias": {5: 3.0}}]
    requests = [(str(i), p, kw) for i, (p, kw) in enumerate(zip(inputs, settings))]
    preempted, preempt = [], batching.ContinuousBatchingManager._preempt

    def spy(self, row, waiting, running, batch):
        preempted.append(running[row].id)
        preempt(self, row, waiting, running, batch)

    monkeypatch.setattr(batching.ContinuousBatchingManager, "_preempt", spy)
    runs = {}
    for blocks in (None, 20):
        cb = {"max_cache_len": 48, "max_requests_per_batch": 4, "paged": True, "num_blocks": blocks, "seed": 5}
        out, m = run_queued(model, config(30), cb, requests)
        assert all(r.error is None for r in out.values())
        runs[blocks] = ({k: r.generated_tokens for k, r in out.items()}, m.stats["preempted"])
    assert runs[None][1] == 0 and runs[20][1] >= 1 and "3" in preempted
    assert runs[20][0] == runs[None][0]


def test_a_preempted_request_resumes_in_chunks_and_from_a_prefix(model):
    """While other rows decode, a preempted request whose sequence is longer than a chunk is
    computed again in chunks, its prompt's prefix shared from a running request with the same
    system prompt. Every request gives its own `generate` tokens."""
    rng = random.Random(4)
    system = [rng.randint(1, 96) for _ in range(17)]
    inputs = [system + [rng.randint(1, 96) for _ in range(3)], [rng.randint(1, 96) for _ in range(4)],
              system + [rng.randint(1, 96) for _ in range(2)], system + [rng.randint(1, 96) for _ in range(2)]]
    news = [20, 8, 40, 30]
    cb = {"max_cache_len": 64, "max_requests_per_batch": 4, "paged": True, "num_blocks": 24,
          "prefill_chunk_tokens": 8}
    resumed, started = [], {}
    chunked, preempt = batching._Chunked.__init__, batching.ContinuousBatchingManager._preempt

    def spy(self, req, *args, **kw):
        chunked(self, req, *args, **kw)
        resumed.append((len(req.tokens), self.shared[2]))

    def spy_preempt(self, row, waiting, running, batch):
        started.setdefault(running[row].id, running[row].started)
        preempt(self, row, waiting, running, batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batching._Chunked, "__init__", spy)
        mp.setattr(batching.ContinuousBatchingManager, "_preempt", spy_preempt)
        out, m = run_queued(model, config(40), cb, [(str(i), p, {"max_new_tokens": k})
                                                    for i, (p, k) in enumerate(zip(inputs, news))])
    assert m.stats["preempted"] >= 1 and m.stats["shared_tokens"] >= 2 * len(system)
    assert any(tokens and shared >= len(system) for tokens, shared in resumed)  # in chunks, from the prefix
    assert all(out[rid].lifespan[0] == t for rid, t in started.items())  # its start is when it first left the queue
    for i, (p, k) in enumerate(zip(inputs, news)):
        assert out[str(i)].error is None and out[str(i)].generated_tokens == own_greedy(model, p, k), f"request {i}"


def test_a_preempted_request_can_be_cancelled(model):
    """A request waiting to be computed again after it gave its pages up is cancelled like any
    waiting one: it comes back with its tokens so far and the error "cancelled"."""
    rng = random.Random(5)
    inputs = [[rng.randint(1, 96) for _ in range(5)] for _ in range(3)]
    cb = {"max_cache_len": 48, "max_requests_per_batch": 3, "paged": True, "num_blocks": 14}
    m = model.init_continuous_batching(generation_config=config(40), continuous_batching_config=cb)
    preempt = batching.ContinuousBatchingManager._preempt
    cancelled = []

    def spy(self, row, waiting, running, batch):
        req = running[row]
        preempt(self, row, waiting, running, batch)
        if not cancelled:
            cancelled.append((req.id, list(req.tokens)))
            self.cancel_request(req.id)

    m._preempt = spy.__get__(m)
    for i, p in enumerate(inputs):
        m.add_request(p, request_id=str(i))
    m.start()
    m.stop(block=True, timeout=120)
    out = {}
    while (r := m.get_result(timeout=0)) is not None:
        out[r.request_id] = r
    (rid, tokens), = cancelled
    assert out[rid].error == "cancelled" and out[rid].generated_tokens == tokens and tokens
    assert out[rid].generated_tokens == own_greedy(model, inputs[int(rid)], len(tokens))
    for i, p in enumerate(inputs):
        if str(i) != rid:
            assert out[str(i)].error is None and out[str(i)].generated_tokens == own_greedy(model, p, 40)


LIMIT = 12  # original_max_position_embeddings of the LongRoPE model below


@pytest.fixture(scope="module")
def longrope(tmp_path_factory):
    return make_pair(PHIMOE, tmp_path_factory.mktemp("longrope"), rope_scaling=longrope_scaling(8, original=LIMIT),
                     max_position_embeddings=96)[1]


def test_preemption_around_longrope_switch(longrope, monkeypatch):
    """PhiMoE with LongRoPE: requests preempted before their sequence passes the switch (their
    crossing step then follows their token count when they join again), and after it (their keys
    computed again with the long factors), give their own `generate` tokens."""
    rng = random.Random(2)
    lengths = [rng.randint(2, 8) for _ in range(5)]
    inputs = [[rng.randint(1, 96) for _ in range(k)] for k in lengths]
    seen, preempt = [], batching.ContinuousBatchingManager._preempt

    def spy(self, row, waiting, running, batch):
        req = running[row]
        seen.append(len(req.prompt) + len(req.tokens) <= LIMIT)  # before the switch
        preempt(self, row, waiting, running, batch)
        assert all(c[3] is not req for c in self._crossings)  # its old crossing step would fire early

    monkeypatch.setattr(batching.ContinuousBatchingManager, "_preempt", spy)
    cb = {"max_cache_len": 48, "max_requests_per_batch": 4, "paged": True, "num_blocks": 16}
    out, m = run_queued(longrope, config(26), cb, [(str(i), p, {}) for i, p in enumerate(inputs)])
    assert True in seen and False in seen and m.stats["recomputed"] >= 1
    for i, p in enumerate(inputs):
        assert out[str(i)].error is None and out[str(i)].generated_tokens == own_greedy(longrope, p, 26), f"request {i}"


def test_a_request_passing_longrope_switch_gives_its_pages_up_where_none_is_left(longrope):
    """A step that only computes a request again past LongRoPE's switch moves the horizon on too
    (the recompute writes the column's slot). Where its next page is not there (a prompt in chunks
    holds the rest), that request gives its pages up, with the long factors from then on, and the
    step computes nothing."""
    m = longrope.init_continuous_batching(generation_config=config(20), continuous_batching_config={
        "max_cache_len": 32, "max_requests_per_batch": 2, "paged": True, "num_blocks": 9})
    batch = m._ensure_batch()
    (_, (a,)), (_, (b,)) = m._requests([3] * 10, "a", 20, False, False, None, {}), \
        m._requests([4] * 30, "b", 2, False, False, None, {})
    a.tokens, a.start = [5, 6, 7], 0  # 13 tokens: past the switch at 12
    batch.col = m._horizon = 12
    m._chunked = batching._Chunked(b, 1, 30, (0, 0, 0), 2)  # its slots 0 .. 31 of row 1: 8 pages
    m._pending, m._crossings = batching.deque(), []
    waiting, crossing = batching.deque(), {0: a}
    m._recomputing = crossing
    assert len(batch.pages_of(m._spans(batch, {}))) == 8 + 3  # a's 12 slots and b's 32 on pages of 4
    m._grow(waiting, {}, batch)
    assert list(waiting) == [a] and not crossing and a.long and a.status == moetorch.RequestStatus.PENDING
    assert m.stats["preempted"] == 1 and m._horizon == 16 and batch.pages.in_use == 8
    m._chunked = None


def test_rows_longer_than_the_longest_request(model, monkeypatch):
    """With pages on demand, rows of PAGED_ROW_SPAN x max_cache_len slots cost addresses only. All
    rows write one column, and a request joins where its row has room right of it for every token
    it may make: with rows of twice the longest request, requests that may run to max_cache_len
    join while others are far along, and the same requests (sampled with seeds, stopping at EOS)
    take fewer decode steps. Requests stay bounded by max_cache_len."""
    rng = random.Random(9)
    inputs = [[rng.randint(1, 96) for _ in range(rng.randint(4, 16))] for _ in range(60)]
    eos = sorted(random.Random(7).sample(range(1, 97), 6))
    gen = moetorch.GenerationConfig(max_new_tokens=48, do_sample=True, temperature=4.0, top_k=0, eos_token_id=eos,
                                    pad_token_id=0)
    cb = {"max_cache_len": 64, "max_requests_per_batch": 16, "paged": True}
    runs = {}
    for span in (1, 2):
        monkeypatch.setattr(batching, "PAGED_ROW_SPAN", span)
        with model.continuous_batching_context_manager(gen, continuous_batching_config=cb) as m:
            assert m._batch.S == 64 * span and m.slots == 64
            with pytest.raises(ValueError, match="max_cache_len"):
                m.add_request([1] * 20, max_new_tokens=46)  # 20 + 46 - 1 > 64, whatever the rows
            ids = [m.add_request(p, seed=i) for i, p in enumerate(inputs)]
            got = {}
            while len(got) < len(ids):
                r = m.get_result(timeout=60)
                got[r.request_id] = r
        assert all(r.error is None for r in got.values())
        runs[span] = ([got[i].generated_tokens for i in ids], len(m.stats["decode_rows"]))
    (tokens1, steps1), (tokens2, steps2) = runs[1], runs[2]
    assert tokens2 == tokens1 and any(len(t) < 48 for t in tokens1) and any(len(t) > 30 for t in tokens1)
    assert steps2 < 0.75 * steps1, (steps1, steps2)
    monkeypatch.setattr(batching, "PAGED_ROW_SPAN", 0)
    with pytest.raises(ValueError, match="PAGED_ROW_SPAN"):
        model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)._ensure_batch()


def test_rows_span_twice_the_longest_request_on_a_gpu_by_default(model, monkeypatch):
    """PAGED_ROW_SPAN None (the default): rows of 2 x max_cache_len slots where the cache's pages are
    the GPU's (addresses only until tokens arrive), 1 x on the host, where the range is one tensor
    with memory for every page; whole rows (static, or pages held for all of max_new_tokens) stay
    at max_cache_len."""
    assert batching.PAGED_ROW_SPAN is None
    gen = moetorch.GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    for paged, on_demand, gpu, want in [(True, True, True, 128), (True, True, False, 64), (True, False, True, 64),
                                        (False, True, True, 64)]:
        m = model.init_continuous_batching(generation_config=gen, continuous_batching_config={
            "max_cache_len": 64, "max_requests_per_batch": 4, "paged": paged})
        m.paged = paged
        with monkeypatch.context() as patch:
            patch.setattr(batching, "PAGES_ON_DEMAND", on_demand)
            if gpu:
                patch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
            assert m.row_slots == want, (paged, on_demand, gpu)
    with model.continuous_batching_context_manager(gen, continuous_batching_config={
            "max_cache_len": 64, "max_requests_per_batch": 4, "paged": True}) as m:
        assert m._batch.S == 64
