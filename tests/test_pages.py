"""engine.pages: a range backed page by page. HostPages gives the interface on the CPU, with
released pages poisoned; DevicePages (CUDA's virtual memory calls) is checked on the GPU by
bench/vmm_probe.py."""

import pytest
import torch

from moetorch.engine.pages import DevicePages, HostPages, PagesExhausted


class FakeEvent:
    """An event that completes when the test says so; synchronize() completes it."""

    def __init__(self) -> None:
        self.done = False
        self.waited = 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited += 1
        self.done = True


def test_back_and_release_move_memory_and_poison():
    pages = HostPages(count=6, page=8, capacity=4, poison=0x5A)
    assert pages.tensor.shape == (48,) and pages.tensor.eq(0x5A).all()
    pages.back([1, 2, 2])
    assert pages.in_use == 2 and pages.free == 2 and pages.backed(1) and not pages.backed(0)
    assert pages.tensor[8:24].eq(0).all() and pages.tensor[:8].eq(0x5A).all() and pages.tensor[24:].eq(0x5A).all()
    pages.tensor[8:24] = 3
    pages.back([2])  # already backed: kept as it is
    assert pages.tensor[16:24].eq(3).all() and pages.in_use == 2
    pages.release([1, 5])  # 5 was never backed
    assert pages.in_use == 1 and not pages.backed(1) and pages.tensor[8:16].eq(0x5A).all()
    assert pages.tensor[16:24].eq(3).all()


def test_capacity_is_enforced_with_a_message():
    pages = HostPages(count=8, page=4, capacity=3)
    pages.back(range(3))
    with pytest.raises(PagesExhausted, match="2 pages asked for, 0 of 3 free"):
        pages.back([3, 4])
    assert pages.in_use == 3 and not pages.backed(3)  # nothing changed
    with pytest.raises(IndexError, match="page 8 is outside the range's 8 pages"):
        pages.back([8])
    with pytest.raises(IndexError, match="page -1"):
        pages.release([-1])


def test_a_deferred_release_waits_for_its_event():
    pages = HostPages(count=4, page=4, capacity=2)
    pages.back([0, 1])
    pages.tensor[:8] = 7
    event = FakeEvent()
    pages.release([0], after=event)
    # released to its caller at once, its memory kept until the event completes
    assert not pages.backed(0) and pages.free == 1 and pages.in_use == 2 and pages.tensor[:4].eq(7).all()
    # taking it again before then keeps its memory and its contents
    pages.back([0])
    assert pages.backed(0) and pages.in_use == 2 and pages.tensor[:4].eq(7).all()
    pages.release([0], after=event)
    event.done = True
    pages.back([2])  # the pool is full: the completed release gives its page first
    assert pages.in_use == 2 and pages.backed(2) and pages.tensor[:4].eq(pages.poison).all()
    assert event.waited == 0


def test_back_waits_on_a_pending_release_only_when_it_must():
    pages = HostPages(count=6, page=2, capacity=3)
    pages.back([0, 1])
    first, second = FakeEvent(), FakeEvent()
    pages.release([0], after=first)
    pages.release([1], after=second)
    pages.back([2])  # a page is free without waiting
    assert first.waited == 0 and second.waited == 0 and pages.in_use == 3
    pages.back([3])  # needs one: waits on the oldest release only
    assert first.waited == 1 and second.waited == 0 and pages.backed(3) and pages.in_use == 3
    assert pages.free == 1  # page 1's memory, once its release completes
    second.done = True
    pages.back([4])
    assert second.waited == 0 and pages.backed(4) and not pages.backed(1)


def test_covering_and_bad_arguments():
    pages = HostPages(count=10, page=16)
    assert pages.covering(0, 16) == range(0, 1)
    assert pages.covering(15, 17) == range(0, 2)
    assert pages.covering(32, 32) == range(0)
    assert pages.capacity == 10
    with pytest.raises(ValueError, match="count and page size must be positive"):
        HostPages(count=0, page=4)
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        HostPages(count=2, page=4, capacity=-1)
    with pytest.raises(ValueError, match="needs a CUDA device, got cpu"):
        DevicePages(4, 4, torch.device("cpu"))


def test_views_of_the_range_see_the_pages():
    # what a cache does with the range: typed views over it, written and read through the pages
    pages = HostPages(count=4, page=64, poison=0)
    x = pages.tensor.view(torch.float32).view(4, 16)
    pages.back([1, 3])
    x[1] = 1.5
    x[3] = -2.0
    pages.release([3])
    assert x[1].eq(1.5).all() and x[3].eq(0).all() and x[0].eq(0).all()


# ---- the paged batch cache in the continuous-batching manager ---------------------------------

import collections  # noqa: E402
import random  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from parity import own_greedy  # noqa: E402

import moetorch  # noqa: E402
from moetorch.engine import batching  # noqa: E402
from moetorch.engine.prefixes import PrefixIndex  # noqa: E402


@pytest.fixture(scope="module")
def phimoe(tmp_path_factory):
    from archs import PHIMOE
    from parity import make_pair

    return make_pair(PHIMOE, tmp_path_factory.mktemp("phimoe"))[1]


def greedy(n: int) -> moetorch.GenerationConfig:
    return moetorch.GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)


def manager(model, **cb):
    return model.init_continuous_batching(generation_config=greedy(4), continuous_batching_config=cb)


def test_the_cpu_default_is_the_static_cache_and_paged_is_asked_for(phimoe):
    assert manager(phimoe, max_cache_len=32).paged is False
    m = manager(phimoe, max_cache_len=32, max_requests_per_batch=3, paged=True, page_size=4)
    assert m.paged is True
    batch = m._ensure_batch()
    slot = batching._slot_bytes(phimoe.config, phimoe.dtype)
    assert isinstance(batch.pages, HostPages) and batch.pages.page == 4 * slot
    assert batch.pages.count == 3 * 32 // 4 and batch.pages.in_use == 0
    # the cache's keys and values lie slot-major in the pages' range
    assert batch.cache.keys[0].untyped_storage().data_ptr() == batch.pages.tensor.untyped_storage().data_ptr()


def test_spans_are_what_requests_write_and_read(phimoe, monkeypatch):
    """A running request holds its prompt's and new tokens' slots, [start, start + prompt + max_new);
    the request in chunks those from its first chunk's slot to its join column + max_new, and the
    prefix it copies; a finished row that prompts may start from, its tokens' slots."""
    monkeypatch.setattr(batching, "PAGE_SLOTS", 1)
    monkeypatch.setattr(batching, "PAGES_ON_DEMAND", False)
    m = manager(phimoe, max_cache_len=40, max_requests_per_batch=4, paged=True)
    batch = m._ensure_batch()
    run = SimpleNamespace(start=5, prompt=[1, 2, 3], max_new=4, tokens=[9])
    assert m._spans(batch, {2: run}) == {2: [(5, 12)]}
    waiting = SimpleNamespace(start=0, prompt=[7] * 6, max_new=3, tokens=[])
    m._chunked = batching._Chunked(waiting, 1, 20, (3, 4, 2), 2)
    finished = SimpleNamespace(start=0, prompt=list(range(1, 21)), max_new=5, tokens=[50, 51], long=False)
    batch.prefixes.finished(3, finished)
    assert m._spans(batch, {2: run}) == {2: [(5, 12)], 1: [(14, 23)], 3: [(4, 6), (0, 21)]}
    # pages on demand: running requests' new tokens only below the horizon (at least the column),
    # the request in chunks at least to its join column
    monkeypatch.setattr(batching, "PAGES_ON_DEMAND", True)
    batch.col, m._horizon = 8, 10
    assert m._spans(batch, {2: run}) == {2: [(5, 10)], 1: [(14, 20)], 3: [(4, 6), (0, 21)]}
    m._horizon = 3
    assert m._spans(batch, {2: run})[2] == [(5, 8)]
    m._horizon = 22
    assert m._spans(batch, {2: run}) == {2: [(5, 12)], 1: [(14, 22)], 3: [(4, 6), (0, 21)]}
    monkeypatch.setattr(batching, "PAGES_ON_DEMAND", False)
    batch.col = 0
    batch.hold(m._spans(batch, {2: run}))
    S = batch.S
    want = {2 * S + s for s in range(5, 12)} | {S + s for s in range(14, 23)} | {3 * S + s for s in range(21)}
    assert batch._held == want and batch.pages.in_use == len(want)
    assert all(batch.pages.backed(i) == (i in want) for i in range(batch.pages.count))
    m._chunked = None
    batch.hold(m._spans(batch, {}))  # the chunked and running ones gone: their pages go back
    assert batch.pages.in_use == 21


def test_requests_wait_for_pages_and_finished_rows_give_theirs_up(phimoe, monkeypatch):
    """With fewer pages than rows need, requests wait for pages (not rows), the finished rows that
    prompts could start from give their pages up first, and every request still gives its own
    `generate` tokens."""
    monkeypatch.setattr(batching, "PAGE_SLOTS", 2)
    rng = random.Random(3)
    system = [rng.randint(1, 96) for _ in range(17)]
    inputs = [system + [rng.randint(1, 96) for _ in range(rng.randint(1, 5))] for _ in range(6)]
    inputs += [[rng.randint(1, 96) for _ in range(rng.randint(2, 9))] for _ in range(4)]
    cb = {"max_cache_len": 64, "max_requests_per_batch": 6, "paged": True, "num_blocks": 40,
          "prefill_chunk_tokens": 8}
    m = phimoe.init_continuous_batching(generation_config=greedy(7), continuous_batching_config=cb)
    peak, evicted, looked = [], [], []
    back, fit = HostPages.back, batching.ContinuousBatchingManager._fit_pages

    def spy_back(self, pages):
        back(self, pages)
        peak.append(self.in_use)

    finds, find = [], PrefixIndex.find

    def spy_find(self, prompt, *args, **kwargs):
        out = find(self, prompt, *args, **kwargs)
        finds.append((tuple(prompt), out is not None))
        return out

    def spy_fit(self, batch, running, group, *args):
        before, finds[:] = len(batch.prefixes.finished_rows()), []
        out = fit(self, batch, running, group, *args)
        evicted.append(before - len(batch.prefixes.finished_rows()))
        # a prompt that starts from a row is looked up once per group tried, not once per row freed
        # (one that found none is looked up again after each: a freed row may have hidden a source)
        found = collections.Counter(key for key, hit in finds if hit)
        looked.append((max(found.values(), default=0), len(group) - len(out[0]) + 1, evicted[-1]))
        return out

    monkeypatch.setattr(HostPages, "back", spy_back)
    monkeypatch.setattr(batching.ContinuousBatchingManager, "_fit_pages", spy_fit)
    monkeypatch.setattr(PrefixIndex, "find", spy_find)
    m.start()
    got = {}
    first = m.add_request(system + [5])  # finished first: its row holds the system prompt
    got[first] = m.get_result(first, timeout=60)
    ids = [m.add_request(p) for p in inputs]
    while len(got) < len(ids) + 1:
        r = m.get_result(timeout=60)
        got[r.request_id] = r
    m.stop(block=True)
    for rid, p in zip([first, *ids], [system + [5], *inputs]):
        assert got[rid].error is None and got[rid].generated_tokens == own_greedy(phimoe, p, 7), rid
    assert m.stats["waited_for_pages"] > 0 and max(peak) <= 40
    assert m.stats["shared_tokens"] > 0 and sum(evicted) > 0
    assert all(n <= bound for n, bound, _ in looked), looked


def test_page_settings_are_checked(phimoe):
    with pytest.raises(RuntimeError, match=r"a request of 40 slots \(max_cache_len\) needs \d+ pages .* may hold 3"):
        manager(phimoe, max_cache_len=40, paged=True, page_size=4, num_blocks=3).add_request([1, 2, 3])
    with pytest.raises(ValueError, match="page_size must be a positive int, got 0"):
        manager(phimoe, max_cache_len=40, paged=True, page_size=0).add_request([1, 2, 3])
    with pytest.raises(ValueError, match="num_blocks must be a positive int, got 0"):
        manager(phimoe, max_cache_len=40, paged=True, num_blocks=0).add_request([1, 2, 3])
    # nothing was paged where paged is off: the page settings are not read
    manager(phimoe, max_cache_len=40, page_size=0).add_request([1, 2, 3])


def test_pages_larger_than_rows_still_batch(phimoe):
    """Pages coarser than the requests (a tiny model on a GPU: the whole cache on one 2 MB page):
    a request that would land on pages already held needs none, so prompts still join running
    requests, in chunks, as with the static cache."""
    rng = random.Random(5)
    plan = [[rng.randint(1, 96) for _ in range(rng.randint(3, 8))] for _ in range(2)]
    plan += [[rng.randint(1, 96) for _ in range(rng.randint(30, 40))] for _ in range(3)]
    cb = {"max_cache_len": 96, "max_requests_per_batch": 2, "paged": True, "page_size": 10_000,
          "prefill_chunk_tokens": 8}
    m = phimoe.init_continuous_batching(generation_config=greedy(6), continuous_batching_config=cb)
    new = [12, 40, 6, 6, 6]  # the long prompts join while the second short one decodes
    ids = [m.add_request(p, max_new_tokens=n) for p, n in zip(plan, new)]
    m.start()
    got = {}
    while len(got) < len(ids):
        r = m.get_result(timeout=60)
        got[r.request_id] = r
    count = m._batch.pages.count
    m.stop(block=True)
    assert count == 1 and m.stats["chunked"] > 0 and m.stats["waited_for_pages"] == 0
    for rid, p, n in zip(ids, plan, new):
        assert got[rid].generated_tokens == own_greedy(phimoe, p, n), rid


def test_a_paged_cache_that_cannot_be_made_falls_back_only_by_default(phimoe, monkeypatch, caplog):
    """Where the driver refuses the range (no virtual memory management, say), a cache paged by
    default becomes whole rows, with a warning; one paged on request raises the driver's error."""
    def refuse(*args, **kwargs):
        raise RuntimeError("cuMemAddressReserve failed: CUDA driver error 801 (operation not supported)")

    monkeypatch.setattr(batching, "HostPages", refuse)
    asked = manager(phimoe, max_cache_len=32, max_requests_per_batch=3, paged=True)
    with pytest.raises(RuntimeError, match="operation not supported"):
        asked._ensure_batch()
    fallback = manager(phimoe, max_cache_len=32, max_requests_per_batch=3, paged=True)
    fallback._paged_by_default = True  # as where the GPU default chose it
    monkeypatch.setattr(batching, "_free_memory", lambda device: 10**12)
    batch = fallback._ensure_batch()
    assert fallback.paged is False and batch.pages is None and fallback.rows == 3
    assert "no paged cache" in caplog.text and "operation not supported" in caplog.text


def test_a_prompt_in_chunks_holds_the_prefix_it_copies(phimoe, monkeypatch):
    """A long prompt that starts from a finished request's tokens takes that request's row, and its
    chunks copy the prefix from where the row held it: those slots stay held until it is copied
    (one slot a page, the others poisoned)."""
    monkeypatch.setattr(batching, "PAGE_SLOTS", 1)
    rng = random.Random(8)
    first = [rng.randint(1, 96) for _ in range(20)]
    other = [rng.randint(1, 96) for _ in range(4)]
    cb = {"max_cache_len": 160, "max_requests_per_batch": 2, "paged": True, "prefill_chunk_tokens": 8}
    m = phimoe.init_continuous_batching(generation_config=greedy(3), continuous_batching_config=cb)
    m.start()
    a = m.add_request(first, max_new_tokens=3)
    b = m.add_request(other, max_new_tokens=120, streaming=True)  # decodes throughout: the long prompt chunks
    done = {a: m.get_result(a, timeout=60)}
    while len(m.get_result(b, timeout=60).generated_tokens) < 25:
        pass  # the column moves on, so that the new prompt's slots start past the prefix's first
    follow = first + done[a].generated_tokens[:-1] + [rng.randint(1, 96) for _ in range(14)]
    c = m.add_request(follow, max_new_tokens=5)
    done[c] = m.get_result(c, timeout=60)
    while (r := m.get_result(b, timeout=60)).status != moetorch.RequestStatus.FINISHED:
        pass
    done[b] = r
    m.stop(block=True)
    assert m.stats["chunked"] == 1 and m.stats["shared_tokens"] >= 16
    for rid, p, n in ((a, first, 3), (b, other, 120), (c, follow, 5)):
        assert done[rid].error is None and done[rid].generated_tokens == own_greedy(phimoe, p, n), rid


def test_slot_major_storage_lays_each_rows_slots_out_in_one_run(phimoe):
    """`StaticCache(storage=)`: keys and values are views of the range laid out [rows, slots, 2,
    layers, kv heads, head_dim]; bad storage is refused by name."""
    from moetorch.cache import StaticCache, _kv_shape, slot_major_bytes

    cfg = phimoe.config
    L, (G, d) = cfg.num_hidden_layers, _kv_shape(cfg)
    nbytes = slot_major_bytes(L, 3, 8, G, d, torch.float32)
    storage = torch.zeros(nbytes + 16, dtype=torch.uint8)
    cache = StaticCache(cfg, max_cache_len=8, max_batch_size=3, device="cpu", dtype=torch.float32, storage=storage)
    flat = storage[:nbytes].view(torch.float32).view(3, 8, 2, L, G, d)
    cache.keys[1][2, 0, 5].fill_(7.0)
    cache.values[0][1, G - 1, 3].fill_(-2.0)
    assert flat[2, 5, 0, 1, 0].eq(7.0).all() and flat[1, 3, 1, 0, G - 1].eq(-2.0).all()
    assert flat.count_nonzero() == 2 * d and cache.keys[0].shape == (3, G, 8, d)
    with pytest.raises(ValueError, match=r"storage must be a flat uint8 tensor, got torch.float32 \(4,\)"):
        StaticCache(cfg, max_cache_len=8, storage=torch.zeros(4))
    with pytest.raises(ValueError, match=rf"storage holds {nbytes - 1} bytes, .* need {nbytes}"):
        StaticCache(cfg, max_cache_len=8, max_batch_size=3, device="cpu", dtype=torch.float32,
                    storage=torch.zeros(nbytes - 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="storage is on cpu, the keys on meta"):
        StaticCache(cfg, max_cache_len=8, max_batch_size=3, device="meta", dtype=torch.float32, storage=storage)


@pytest.mark.parametrize("free_rows, asked, paged, want_paged, want_rows", [
    (1000, None, None, False, 256),  # whole rows of every request fit: static
    (256, None, None, False, 256),  # just
    (100, None, None, True, 256),  # they do not: paged, a row a request
    (100, 200, None, True, 200),  # nor do max_requests_per_batch's
    (300, 200, None, False, 200),
    (100, None, False, False, 100),  # static asked for: as many rows as fit
    (100, None, True, True, 256),
])
def test_on_a_gpu_the_cache_is_paged_where_whole_rows_would_not_fit(phimoe, monkeypatch, free_rows, asked, paged,
                                                                    want_paged, want_rows):
    """The row count and the cache's kind on a GPU (the device a stand-in: nothing is allocated)."""
    monkeypatch.setattr(type(phimoe), "device", property(lambda self: torch.device("cuda")))
    row = 64 * batching._slot_bytes(phimoe.config, phimoe.dtype) + 3 * 4 * phimoe.config.vocab_size
    monkeypatch.setattr(batching, "_free_memory", lambda device: int(free_rows * row / 0.9) + 1)
    cb = {"max_cache_len": 64, "max_requests_per_batch": asked, "paged": paged}
    m = phimoe.init_continuous_batching(generation_config=greedy(4), continuous_batching_config=cb)
    assert (m.paged, m.rows) == (want_paged, want_rows)


def test_static_rows_that_do_not_fit_one_row_are_an_error(phimoe, monkeypatch):
    monkeypatch.setattr(type(phimoe), "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(batching, "_free_memory", lambda device: 1000)
    with pytest.raises(RuntimeError, match=r"one row of 64 cache slots \(0.00 GiB\) is more than the free GPU memory "
                       r"holds within max_memory_percent; lower max_cache_len, or leave `paged` on"):
        phimoe.init_continuous_batching(generation_config=greedy(4),
                                        continuous_batching_config={"max_cache_len": 64, "paged": False})
    # left to the default, such a GPU pages the cache
    m = phimoe.init_continuous_batching(generation_config=greedy(4), continuous_batching_config={"max_cache_len": 64})
    assert m.paged is True


def test_finished_rows_that_prompts_start_from_are_freed_last_after_a_collision():
    """`_fit_pages` frees finished rows that no prompt of the group starts from, oldest first. A
    row whose hashes match a prompt's deepest blocks but whose tokens do not (a hash collision)
    hides the shallower source the prompt does share; once that row is freed, the source is found
    and kept, and the unrelated row goes next."""
    from moetorch.engine import prefixes

    class Req:
        def __init__(self, prompt, tokens=()):
            self.prompt, self.tokens, self.start, self.long = list(prompt), list(tokens), 0, False
            self.hash_memo = {}

        def sequence(self):
            return self.prompt + self.tokens

    B = prefixes.BLOCK
    prompt = list(range(1, 3 * B + 2))
    index = PrefixIndex()
    index.finished(0, Req(prompt[:3 * B] + [900], [1]))  # the oldest: holds all three blocks ...
    index._rows[0].tokens = [777] + index._rows[0].tokens[1:]  # ... by hash only, as a collision leaves it
    index.finished(1, Req(prompt[:2 * B] + [901], [1]))  # shares two blocks with the prompt
    index.finished(2, Req([5] * 40, [1]))  # shares nothing, the newest
    dropped, drop = [], index.drop
    index.drop = lambda row: (dropped.append(row), drop(row))
    manager = SimpleNamespace(stats={"waited_for_pages": 0}, _room=lambda *a: len(dropped) >= 2,
                              _column=lambda *a: 0)
    group = [Req(prompt), Req([9] * 20)]
    out, _ = batching.ContinuousBatchingManager._fit_pages(manager, SimpleNamespace(prefixes=index, col=0), {},
                                                           group, 0, 0)
    assert dropped == [0, 2] and out == group and index.find(prompt)[0].row == 1


def test_a_sampled_batch_with_a_free_row_on_pages(phimoe):
    """A decode step's bucket holds a free row (3 requests in a bucket of 4): its slot 0 lies on a
    page no request holds (poisoned on the CPU), so its logits are NaN. A config that samples draws
    every row at once; the free row's draw, discarded, must not fail the requests beside it."""
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    config = moetorch.GenerationConfig(max_new_tokens=10, do_sample=True, top_k=20, pad_token_id=0, eos_token_id=None)
    results = {}
    for paged in (False, True):
        m = phimoe.init_continuous_batching(generation_config=config, continuous_batching_config=dict(
            paged=paged, page_size=1, allow_block_sharing=False, max_cache_len=32, seed=0))
        for i, p in enumerate(prompts):
            m.add_request(p, request_id=f"r{i}")
        m.start()
        m.stop(block=True)
        out = {}
        while (r := m.get_result(timeout=0)) is not None:
            out[r.request_id] = r
        assert all(r.error is None and len(r.generated_tokens) == 10 for r in out.values()), (paged, out)
        results[paged] = {rid: r.generated_tokens for rid, r in out.items()}
    assert results[True] == results[False]  # the same draws: a free row's logits reach no request's


@pytest.mark.parametrize("page", [4, 16])
def test_a_whole_row_request_runs_on_the_fewest_pages_allowed(phimoe, page):
    """num_blocks at the least that one request of max_cache_len slots needs (fewer is an error when
    a request is added): a request that fills its whole row is admitted and runs (the scheduler
    counted a page more for the horizon's growth than a whole row can take, and never admitted it)."""
    slots = 32
    fewest = (slots + page - 2) // page + 1  # the pages `slots` slots may lie on
    with pytest.raises(RuntimeError, match="needs"):
        manager(phimoe, max_cache_len=slots, paged=True, page_size=page, num_blocks=fewest - 1).add_request([1, 2])
    config = moetorch.GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    m = phimoe.init_continuous_batching(generation_config=config, continuous_batching_config=dict(
        paged=True, page_size=page, num_blocks=fewest, max_cache_len=slots))
    prompt = list(range(1, slots - 8 + 2))  # its prompt and new tokens fill the row
    m.add_request(prompt, request_id="whole")
    m.start()
    result = m.get_result("whole", timeout=60)
    m.stop(block=True, hard_stop=result is None, timeout=10)
    assert result is not None and result.error is None
    assert result.generated_tokens == own_greedy(phimoe, prompt, 8)


@pytest.mark.parametrize("share", [True, False])
def test_a_request_in_a_row_freed_on_pages_reads_nothing_the_free_row_wrote(phimoe, share):
    """A request ends and its row is free while another decodes; a free row's step attends its slot 0
    on a page nobody holds (poisoned on the CPU) and writes a throwaway key at the column into its
    row, on a page still held (the finished request's tokens, kept for prompts to start from, or the
    page a new request takes). A request that takes the row later has those slots masked; masked or
    not, what they hold must not reach its tokens (NaN there did: its tokens were garbage)."""
    config = moetorch.GenerationConfig(max_new_tokens=30, do_sample=False, pad_token_id=0, eos_token_id=None)
    m = phimoe.init_continuous_batching(generation_config=config, continuous_batching_config=dict(
        max_requests_per_batch=2, paged=True, page_size=16, allow_block_sharing=share, max_cache_len=64))
    first, long = [5, 6, 7, 8], list(range(10, 30))
    m.add_request(first, request_id="first", max_new_tokens=2)  # its row is free from its 2nd token on
    m.add_request(long, request_id="long", max_new_tokens=30, streaming=True)
    m.start()
    try:
        for out in m.request_id_iter("long"):  # steps run with the first row free
            if len(out.generated_tokens) >= 8:
                break
        later = [40, 41]
        with m.pause():
            m.add_request(later, request_id="later", max_new_tokens=6)
        result = m.get_result("later", timeout=60)
        done = next(out for out in m.request_id_iter("long") if out.is_finished())
    finally:
        m.stop(block=True, timeout=10)
    assert result is not None and result.error is None
    assert result.generated_tokens == own_greedy(phimoe, later, 6)
    assert done.error is None and done.generated_tokens == own_greedy(phimoe, long, 30)
