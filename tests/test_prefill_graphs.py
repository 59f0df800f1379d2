"""Continuous batching's prefill replayed from CUDA graphs (`engine.cuda_graph.GraphedPackedPrefill`):
the padded plan of a packed forward (`cache.pack_plan(pad=)`), keys that go nowhere, the static
`Packed` that a graph reads, and the runner's flow (eager, captured, replayed, eager again where a
prefix moves within its row). Without a GPU, the graph is a stand-in that reruns the captured
function, and the varlen kernel is a stand-in that reads the offsets from the graph's buffers as
it does. The manager's results on the padded path against Transformers are in test_batching.py
and test_prefix_sharing.py (their `padded` runs)."""

from __future__ import annotations

import random

import pytest
import torch
from archs import ARCH_IDS, ARCHS, PHIMOE
from parity import make_pair

from moetorch.cache import PackedRows, StaticCache, pack_plan
from moetorch.engine import batching, cuda_graph
from moetorch.engine.cuda_graph import GRAPHED_PROMPTS, GraphedPackedPrefill, GraphedPrefill, packed_forward
from moetorch.ops import attention as attention_ops
from moetorch.ops import fused
from moetorch.ops.attention import Packed, packed_attention

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture(scope="module", params=ARCHS, ids=ARCH_IDS)
def pair(request, tmp_path_factory):
    return make_pair(request.param, tmp_path_factory.mktemp(request.param.name))


@pytest.fixture
def model(pair):
    return pair[1]


# ---- the padded plan ---------------------------------------------------------------------------------


@pytest.mark.parametrize("extra_q, extra_k", [(0, 0), (3, 3), (3, 7), (0, 5)])
def test_padded_plan_keeps_the_sequences_keys(extra_q, extra_k):
    """The padding adds one sequence (its extra keys before its tokens) whose keys go nowhere, or,
    with no extra tokens, keys of no sequence; the real sequences' keys are the unpadded plan's."""
    rows, starts, new, shared = [2, 0], [3, 1], [4, 2], [(1, 5, 3), (0, 0, 0)]
    index, lens_q, lens_k = pack_plan(rows, starts, new, shared, 16)
    padded, pq, pk = pack_plan(rows, starts, new, shared, 16, pad=(6 + extra_q, 9 + extra_k))
    assert padded.shape == (5, 9 + extra_k)
    assert torch.equal(padded[:, :9], index)
    if extra_q:
        assert (pq, pk) == (lens_q + [extra_q], lens_k + [extra_k])
        pad = padded[:, 9:]
        fresh = pad[0] >= 0
        assert pad[0, fresh].tolist() == list(range(6, 6 + extra_q))  # the padding's own tokens, last
        assert fresh.tolist() == [False] * (extra_k - extra_q) + [True] * extra_q
    else:
        assert (pq, pk) == (lens_q, lens_k)
        assert (padded[0, 9:] == -1).all()  # prefix-like keys of no sequence
    assert (padded[3, 9:] == -1).all() and (padded[1:3, 9:] == 0).all() and (padded[4, 9:] == 0).all()


def test_padded_plan_bad_input():
    with pytest.raises(ValueError, match=r"pad of \(5, 9\)"):
        pack_plan([0], [0], [6], None, 16, pad=(5, 9))  # fewer tokens than the sequence's
    with pytest.raises(ValueError, match="at least as many extra keys as tokens"):
        pack_plan([0], [0], [4], [(1, 0, 2)], 16, pad=(8, 9))  # 4 extra tokens, 3 extra keys


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("shares", [False, True])
def test_static_packed_rows_write_only_real_keys(kernels, shares):
    """Over a padded plan, the real keys land where the unpadded forward puts them and come back in
    its order; the padding's keys (row -1) write nothing. `place_keys` (interpreter) skips them as
    the torch indexing does."""
    torch.manual_seed(3)
    S, G, d = 12, 2, 8
    cache = StaticCache(max_cache_len=S, num_layers=1)
    cache._allocate(4, G, d, torch.device("cpu"), torch.float32)
    for t in cache._all:
        t.copy_(torch.randn_like(t))
    want = StaticCache(max_cache_len=S, num_layers=1)
    want._allocate(4, G, d, torch.device("cpu"), torch.float32)
    for a, b in zip(want._all, cache._all):
        a.copy_(b)
    rows, starts, new = [1, 3], [2, 0], [3, 4]
    shared = [(0, 4, 2), (0, 0, 0)] if shares else None
    tokens, keys = 10, (16 if shares else 10)
    index, lens_q, lens_k = pack_plan(rows, starts, new, shared, S, pad=(tokens, keys))
    cu = Packed.offsets(lens_q, lens_k)
    static = PackedRows.static(cache, index, Packed.static(cu[0], cu[1], tokens, keys, max(lens_k)), tokens)
    reference = PackedRows(want, rows, starts, new, shared)
    assert static.shares == shares and static.padded
    k_new, v_new = torch.randn(1, G, tokens, d), torch.randn(1, G, tokens, d)
    with fused.forced(kernels):
        k_all, v_all = static.update(k_new, v_new, 0)
        k_ref, v_ref = reference.update(k_new[:, :, :7], v_new[:, :, :7], 0)
    real = sum(lens_k[:2])
    torch.testing.assert_close(k_all[:, :, :real], k_ref, atol=0, rtol=0)
    torch.testing.assert_close(v_all[:, :, :real], v_ref, atol=0, rtol=0)
    assert k_all.shape[2] == keys if shares else tokens
    for got, ref in zip(cache._all, want._all):
        torch.testing.assert_close(got, ref, atol=0, rtol=0)


def test_offsets_end_in_empty_sequences():
    """A graph's offsets: the sequences' cumulative counts, then empty sequences up to its shape."""
    cu = Packed.offsets([3, 1], [5, 1], 4)
    assert cu.tolist() == [[0, 3, 4, 4, 4], [0, 5, 6, 6, 6]] and cu.dtype == torch.int32
    assert cu[0].is_contiguous() and cu[1].is_contiguous()
    assert Packed.offsets([2], [2]).tolist() == [[0, 2], [0, 2]]


def test_static_packed_needs_the_varlen_kernel():
    cu = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_k must be a contiguous 1D int32"):
        Packed.static(cu, cu.long(), 4, 4, 4)
    packed = Packed.static(cu, cu, 4, 4, 4)
    q, kv = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="needs the varlen flash kernel"):
        packed_attention(q, kv, kv, packed, 1.0)


# ---- the runner ----------------------------------------------------------------------------------------


def varlen_stand_in(real):
    """`packed_attention` where a static `Packed` reads its offsets from the buffers, as the varlen
    kernel does: empty sequences only after the real ones, every length within the bounds."""

    def run(q, k, v, packed, scale, dropout_p=0.0):
        assert dropout_p == 0.0
        if packed.lens_q is not None:
            return real(q, k, v, packed, scale)
        cu_q, cu_k = packed.cu_q.tolist(), packed.cu_k.tolist()
        lens_q = [b - a for a, b in zip(cu_q, cu_q[1:])]
        lens_k = [b - a for a, b in zip(cu_k, cu_k[1:])]
        n = sum(1 for x in lens_q if x)
        assert all(lens_q[:n]) and not any(lens_q[n:]) and not any(lens_k[n:])
        assert max(lens_q) <= packed.max_q and max(lens_k) <= packed.max_k
        assert cu_q[-1] == q.shape[0] and cu_k[-1] <= k.shape[0]
        return real(q, k, v, Packed.of(lens_q[:n], lens_k[:n], q.device, packed.window), scale)

    return run


class StandInGraph:
    """A captured function that each replay runs again into the captured output, as a CUDA graph
    replays its kernels into its buffers."""

    def __init__(self, fn, out):
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self):
        self.replays += 1
        self.out.copy_(self.fn())


def forward_unpadded(model, cache, prompts, rows, starts, shared):
    """The prefill's eager forward with no padding (`cuda_graph.packed_forward`, which continuous
    batching's tests hold to Transformers)."""
    with torch.no_grad():
        return packed_forward(model, cache, prompts, rows, starts, shared, getattr(model.config, "sliding_window", None))


def test_runner_runs_eagerly_then_captures_and_replays(model, monkeypatch):
    """Each call gives the unpadded forward's logits and cache writes: the first use of a shape
    eagerly, the second captured and replayed, later ones replayed over refilled buffers; a call
    whose prompt moves its prefix within its own row runs eagerly instead, and captures nothing."""
    captures = []

    def stand_in_capture(fn, pool=None, mode="global"):
        assert mode == "thread_local"  # the batch's loop captures while other threads may call CUDA
        graph = StandInGraph(fn, fn())
        captures.append(graph)
        return graph, graph.out

    monkeypatch.setattr(cuda_graph, "capture", stand_in_capture)
    monkeypatch.setattr(attention_ops, "packed_attention", varlen_stand_in(packed_attention))
    rng = random.Random(0)
    torch.manual_seed(0)
    R, S, vocab = 4, 40, model.config.vocab_size
    ours = StaticCache(model.config, max_cache_len=S, max_batch_size=R, device="cpu", dtype=torch.float32)
    want = StaticCache(model.config, max_cache_len=S, max_batch_size=R, device="cpu", dtype=torch.float32)
    for a, b in zip(ours._all, want._all):
        a.copy_(torch.randn_like(a))
        b.copy_(a)
    monkeypatch.setattr(cuda_graph, "varlen_kernel_serves", lambda *a: True)  # as on a GPU
    runner = GraphedPackedPrefill(model, ours, getattr(model.config, "sliding_window", None))
    runner.pool = "pool"

    def call(prompts, rows, starts, shared):
        got = runner(prompts, rows, starts, shared)
        expect = forward_unpadded(model, want, prompts, rows, starts, shared)
        torch.testing.assert_close(got, expect, atol=2e-5, rtol=2e-5)
        for a, b in zip(ours._all, want._all):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)

    def tokens(n):
        return [rng.randrange(1, vocab) for _ in range(n)]

    # shape (16 tokens, 16 keys, 4 prompts): three prompts of 3-6 tokens, nothing shared
    for use in range(3):
        prompts = [tokens(rng.randint(3, 5)) for _ in range(3)]
        call(prompts, [0, 1, 3], [S - len(p) for p in prompts], [(0, 0, 0)] * 3)
        assert len(captures) == (0 if use == 0 else 1)
    assert captures[0].replays == 2
    # shape (16 tokens, 32 keys, 2 prompts): one prompt of 20 tokens from row 2's first 8
    base = ours.keys[0][2].clone()
    head = tokens(8)
    call([head + tokens(10)], [1], [S - 18], [(2, 0, 8)])
    assert len(captures) == 1  # first use: eagerly
    call([head + tokens(12)], [2], [S - 20], [(2, 0, 8)])  # moves within its own row: eagerly
    assert len(captures) == 1 and not torch.equal(ours.keys[0][2], base)
    call([head + tokens(11)], [0], [S - 19], [(1, S - 18, 8)])
    assert len(captures) == 2 and captures[1].replays == 1
    assert len(runner.entries) == 2


def test_runner_shapes():
    """Tokens pad to `PREFILL_BUCKETS`, keys to `KEY_BUCKETS` (with room for the tokens' padding),
    prompts to a power of two with room for the padding's sequence; past the buckets, None."""
    runner = GraphedPackedPrefill.__new__(GraphedPackedPrefill)
    runner.rotary, runner.flops_per_token = None, 1.0
    assert runner.key([5, 9], [5, 9]) == (16, 16, 4)
    assert runner.key([17], [17]) == (32, 32, 2)
    assert runner.key([300, 40], [20, 40]) == (64, 512, 4)  # 64 + 280 shared keys
    assert runner.key([10] * (GRAPHED_PROMPTS - 1), [10] * (GRAPHED_PROMPTS - 1)) == (512, 512, GRAPHED_PROMPTS)
    assert runner.key([10] * GRAPHED_PROMPTS, [10] * GRAPHED_PROMPTS) is None
    assert runner.key([2049], [2049]) is None
    assert runner.key([20000, 20], [10, 20]) is None  # keys past the last bucket


def test_runner_leaves_longrope_long_factors_unpadded(tmp_path):
    """A prompt past LongRoPE's switch (the long factors) runs unpadded: a graph holds one factor set."""
    from archs import longrope_scaling

    _, ours = make_pair(PHIMOE, tmp_path, rope_scaling=longrope_scaling(8, original=8), max_position_embeddings=64)
    cache = StaticCache(ours.config, max_cache_len=32, max_batch_size=2, device="cpu", dtype=torch.float32)
    runner = GraphedPackedPrefill(ours, cache, None, enabled=False)
    assert runner.key([8], [8]) is not None and runner.key([9], [9]) is None


def test_manager_pads_only_where_asked(model, monkeypatch):
    """`PREFILL_GRAPHS`: None pads where the decode steps are graphed (not on the CPU), True pads
    everywhere (eagerly here), False never."""
    seen = []
    original = GraphedPackedPrefill.__call__

    def spy(self, *args):
        out = original(self, *args)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(GraphedPackedPrefill, "__call__", spy)
    prompts = [[3, 4, 5], [6, 7]]
    from moetorch import GenerationConfig

    gen = GenerationConfig(max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None)
    outs = {}
    for mode in (None, True, False):
        monkeypatch.setattr(batching, "PREFILL_GRAPHS", mode)
        seen.clear()
        outs[mode] = [r.generated_tokens for r in model.generate_batch(prompts, generation_config=gen).values()]
        assert seen == ([True] if mode else [])
    assert outs[None] == outs[True] == outs[False]


@pytest.mark.parametrize("error", [RuntimeError("operation not permitted when stream is capturing"),
                                   torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")],
                         ids=["uncapturable", "out-of-memory"])
def test_a_failed_capture_leaves_the_prefills_eager(model, monkeypatch, caplog, error):
    """A capture that fails (a kernel that cannot be captured; out of memory, a graph's pool being
    memory of its own) costs no request, not even a lone prompt's, which the manager cannot split
    and retry: the prefill runs eagerly, a warning names the shape, and the runner captures no
    more."""
    calls = []

    def failing_capture(fn, pool=None, mode="global"):
        calls.append(1)
        raise error

    monkeypatch.setattr(cuda_graph, "capture", failing_capture)
    monkeypatch.setattr(attention_ops, "packed_attention", varlen_stand_in(packed_attention))
    S = 32
    ours = StaticCache(model.config, max_cache_len=S, max_batch_size=2, device="cpu", dtype=torch.float32)
    want = StaticCache(model.config, max_cache_len=S, max_batch_size=2, device="cpu", dtype=torch.float32)
    monkeypatch.setattr(cuda_graph, "varlen_kernel_serves", lambda *a: True)  # as on a GPU
    runner = GraphedPackedPrefill(model, ours, getattr(model.config, "sliding_window", None))
    runner.pool = "pool"
    prompt = [5, 6, 7, 8, 9]
    for _ in range(3):
        got = runner([prompt], [1], [S - 5], [(0, 0, 0)])
        expect = forward_unpadded(model, want, [prompt], [1], [S - 5], [(0, 0, 0)])
        torch.testing.assert_close(got, expect, atol=2e-5, rtol=2e-5)
    assert len(calls) == 1 and not runner.enabled
    assert "capturing a prefill of shape (16, 16, 2) failed" in caplog.text and str(error) in caplog.text


def test_warm_prefill_graphs_captures_each_lone_prompt_shape(model, monkeypatch):
    """`warm_prefill_graphs` (a server runs it before it serves) captures one prompt of each
    `PREFILL_BUCKETS` length shorter than a row, once each; with graphs off it does nothing. Then
    requests give their own greedy tokens through the captured shapes."""
    from moetorch import GenerationConfig

    captures = []

    def stand_in_capture(fn, pool=None, mode="global"):
        graph = StandInGraph(fn, fn())
        captures.append(graph)
        return graph, graph.out

    gen = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config={
        "max_requests_per_batch": 2, "max_cache_len": 70})
    assert manager.warm_prefill_graphs() == []  # the CPU: no graphs
    monkeypatch.setattr(cuda_graph, "capture", stand_in_capture)
    monkeypatch.setattr(cuda_graph, "varlen_kernel_serves", lambda *a: True)
    monkeypatch.setattr(attention_ops, "packed_attention", varlen_stand_in(packed_attention))
    batch = manager._ensure_batch()
    batch.prefill_graphs_on = True  # as on a GPU
    batch._packed_graphs().pool = "pool"
    assert manager.warm_prefill_graphs() == [16, 32, 64]
    graphs = manager._batch.packed_graphs
    assert len(captures) == 3 and sorted(graphs.entries) == [(16, 16, 2), (32, 32, 2), (64, 64, 2)]
    prompts = [[5, 6, 7], [8] * 20, [9, 10] * 25]
    manager.start()
    try:
        ids = [manager.add_request(p, max_new_tokens=3) for p in prompts]
        got = {i: manager.get_result(i, timeout=60).generated_tokens for i in ids}
    finally:
        manager.stop(block=True)
    assert len(captures) == 3  # every lone prompt replayed a warm shape
    for i, p in zip(ids, prompts):
        want = model.generate(torch.tensor([p]), max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert got[i] == want[0, len(p):].tolist()


@pytest.mark.parametrize("setting, prefill, decode", [
    (None, True, True), (True, True, True), (False, False, False), ((False, True), False, True),
    ((True, False), True, False), ([False, False], False, False)])
def test_use_cuda_graph_is_transformers_pair(model, monkeypatch, setting, prefill, decode):
    """`use_cuda_graph` as Transformers reads it: a bool (or None, on) for both paths, or a
    (prefill, decode) pair; on a GPU only (the device is a stand-in here: nothing runs)."""
    from moetorch.engine.batching import ContinuousBatchingConfig, ContinuousBatchingManager

    cfg = ContinuousBatchingConfig(max_requests_per_batch=2, max_cache_len=32, use_cuda_graph=setting, paged=False)
    cpu = ContinuousBatchingManager(model, model.generation_config, cfg)
    assert (cpu.use_prefill_graphs, cpu.use_graphs) == (False, False)
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    gpu = ContinuousBatchingManager(model, model.generation_config, cfg)
    assert (gpu.use_prefill_graphs, gpu.use_graphs) == (prefill, decode)


def test_graphs_stop_where_the_gpu_sets_the_time(model, monkeypatch):
    """A group whose padded forward computes more than `GRAPHED_FLOPS` runs unpadded: there the GPU,
    not the launches, sets an eager forward's time. The count is 2 FLOPs per active weight (top-k
    of each expert tensor's experts; no embedding, no LM head) per padded token."""
    from moetorch.engine.cuda_graph import active_weights

    cfg = model.config
    k, E = cfg.num_experts_per_tok, cfg.num_local_experts
    want = 0.0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or "lm_head" in name:
            continue
        want += p.numel() * k / E if p.dim() == 3 and p.shape[0] == E else p.numel()
    assert active_weights(model) == pytest.approx(want)
    cache = StaticCache(cfg, max_cache_len=32, max_batch_size=2, device="cpu", dtype=torch.float32)
    runner = GraphedPackedPrefill(model, cache, None, enabled=False)
    per_token = 2 * want
    monkeypatch.setattr(cuda_graph, "GRAPHED_FLOPS", 64 * per_token)
    assert runner.key([40], [40]) == (64, 64, 2) and runner.key([65], [65]) is None


# ---- generate's left-padded batches -------------------------------------------------------------------


def left_padded(lengths: list[int], vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None] >= T - torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("packs", [True, False])
def test_generate_packs_a_left_padded_batch(pair, monkeypatch, packs):
    """`generate` on a left-padded batch runs the prompts packed in one row (no padding computed,
    no mask) when `PACK_PADDED_PROMPTS` is on: the tokens and scores of Transformers' `generate`
    on the padded batch, either way."""
    hf, ours = pair
    monkeypatch.setattr(cuda_graph, "PACK_PADDED_PROMPTS", packs)
    taken = []
    original = GraphedPrefill._packed
    monkeypatch.setattr(GraphedPrefill, "_packed", lambda self, *a: taken.append(1) or original(self, *a))
    ids, mask = left_padded([3, 9, 1, 6], ours.config.vocab_size, seed=4)
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None,
              output_scores=True, return_dict_in_generate=True, cache_implementation="static")
    mine, theirs = ours.generate(ids, **kw), hf.generate(ids, **kw)
    assert torch.equal(mine.sequences, theirs.sequences)
    for a, b in zip(mine.scores, theirs.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert taken == ([1] if packs else [])


def test_packed_prompts_leave_the_cache_as_the_padded_forward(model):
    """Each prompt's keys and values land in its row's slots after its padding, as the padded
    forward writes them; the padding's slots are not written; the cache counts the padded length."""
    ids, mask = left_padded([5, 2, 7], model.config.vocab_size, seed=1)
    cfg = dict(max_cache_len=12, max_batch_size=3, device="cpu", dtype=torch.float32)
    packed, padded = StaticCache(model.config, **cfg), StaticCache(model.config, **cfg)
    got = GraphedPrefill(model, packed, 3)(ids, mask, None)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                     past_key_values=padded, use_cache=True, cache_position=torch.arange(7)).logits[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert packed.get_seq_length() == 7
    for a, b in zip(packed._all, padded._all):
        for row, n in enumerate([5, 2, 7]):
            torch.testing.assert_close(a[:, row, :, 7 - n:7], b[:, row, :, 7 - n:7], atol=1e-5, rtol=1e-5)
            assert not a[:, row, :, :7 - n].any()  # the padding's slots: never written


def test_what_runs_padded_instead(model, tmp_path):
    """The packed path declines (the padded forward runs) where the mask is not left padding or
    pads nothing, a prompt's positions do not count from 0, or LongRoPE may switch factors within
    the cache (its replay record holds the padded layout)."""
    from archs import longrope_scaling

    ids, mask = left_padded([4, 6], model.config.vocab_size)
    runner = GraphedPrefill(model, StaticCache(model.config, max_cache_len=16, max_batch_size=2, device="cpu",
                                               dtype=torch.float32), 2)
    assert runner._packed(ids, mask, None) is not None
    assert runner._packed(ids, mask, (mask.cumsum(1) - 1).clamp(min=0)) is not None  # generate's own positions
    assert runner._packed(ids, mask.flip(1), None) is None  # right padding
    holed = mask.clone()
    holed[1, 3] = 0
    assert runner._packed(ids, holed, None) is None
    assert runner._packed(ids, torch.ones_like(mask), None) is None
    assert runner._packed(ids, mask, mask.cumsum(1) + 4) is None
    _, long = make_pair(PHIMOE, tmp_path, rope_scaling=longrope_scaling(8, original=8), max_position_embeddings=64)
    for slots, packs in ((8, True), (9, False)):
        cache = StaticCache(long.config, max_cache_len=slots, max_batch_size=2, device="cpu", dtype=torch.float32)
        assert (GraphedPrefill(long, cache, 2)._packed(ids, mask, None) is not None) == packs


def test_flash_turned_off_stops_the_captures(model, monkeypatch):
    """sdpa's flash kernel turned off after the runner was made: it captures no more, and the
    padded forward runs with the host's lengths (per-sequence attention), right all the same."""
    captures = []

    def stand_in_capture(fn, pool=None, mode="global"):
        graph = StandInGraph(fn, fn())
        captures.append(graph)
        return graph, graph.out

    monkeypatch.setattr(cuda_graph, "capture", stand_in_capture)
    monkeypatch.setattr(cuda_graph, "varlen_kernel_serves", lambda *a: True)
    S = 32
    ours = StaticCache(model.config, max_cache_len=S, max_batch_size=2, device="cpu", dtype=torch.float32)
    want = StaticCache(model.config, max_cache_len=S, max_batch_size=2, device="cpu", dtype=torch.float32)
    runner = GraphedPackedPrefill(model, ours, getattr(model.config, "sliding_window", None))
    assert runner.enabled
    monkeypatch.setattr(cuda_graph, "varlen_kernel_serves", lambda *a: False)
    for _ in range(3):
        got = runner([[7, 8, 9, 10]], [1], [S - 4], [(0, 0, 0)])
        torch.testing.assert_close(got, forward_unpadded(model, want, [[7, 8, 9, 10]], [1], [S - 4], [(0, 0, 0)]),
                                   atol=2e-5, rtol=2e-5)
    assert not runner.enabled and not captures
