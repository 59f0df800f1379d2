"""The Triton expert kernels (ops/triton_moe.py) under Triton's CPU interpreter, against the
reference loops: alignment invariants, SwiGLU experts, JetMoE's map/reduce, gradients, configs,
the decode kernel's split-K (partials summed by the last program of a column tile to arrive).

The interpreter runs each program in numpy, so shapes are tiny; explicit small block sizes make the
kernels loop over several column tiles and K steps, with ragged edges.
"""

from __future__ import annotations

import importlib
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from interp import shuffle_programs

from moetorch.ops.activations import ACTIVATIONS
from moetorch.ops.moe import (
    EXPERT_BACKENDS,
    MAP_BACKENDS,
    REDUCE_BACKENDS,
    expert_map,
    expert_map_reference,
    expert_reduce,
    expert_reduce_reference,
    experts_forward,
    experts_reference,
    pick_backend,
)

# Padding rows of the padded sorted layout hold uninitialised values that the kernels multiply
# but never store; numpy (the interpreter) warns about the NaNs and overflows among them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2)
E, K, D, I, C = 5, 2, 40, 24, 24  # D, I not multiples of the 16-wide tiles: ragged edges


@pytest.fixture(scope="module")
def tm():
    """ops.triton_moe, its kernels interpreted (tests/conftest.py sets TRITON_INTERPRET=1 before
    triton can be imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    module = importlib.import_module("moetorch.ops.triton_moe")
    kernel = module._count_kernel.jit  # inside moetorch's launcher (ops.launch)
    assert isinstance(kernel, InterpretedFunction), "TRITON_INTERPRET=1 was not set before triton"
    return module


def routing(T, kind, gen):
    if kind == "random":
        return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    if kind == "one_hot_expert":  # every token's first choice is expert 3
        return torch.stack([torch.tensor([3, (4 + t) % E]) for t in range(T)])
    if kind == "repeated_expert":  # both slots of a token on one expert (no router does it; still defined)
        return torch.randint(0, E, (T, 1), generator=gen).expand(T, K)
    return torch.randint(0, 2, (T, K), generator=gen) * (E - 1)  # experts 1..E-2 stay empty


# (T, small): the alignment-free decode kernel (N <= 32) and the sorted path on the same sizes
PATHS = [(1, True), (1, False), (7, True), (7, False), (33, False)]
PATH_IDS = [f"T{T}-{'small' if small else 'sorted'}" for T, small in PATHS]


def launch_grids(monkeypatch, module, kernel: str) -> list:
    """The grid of each launch of `module.kernel` from now on (the kernel still runs)."""
    grids = []
    real = getattr(module, kernel)

    class Spy:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return real[grid]

    monkeypatch.setattr(module, kernel, Spy())
    return grids


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def check(got, want, dtype, what):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=what)
    else:  # bf16 intermediates and output: a few ulps of bf16
        torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2, msg=what)
        assert rel(got, want) < 1e-2, what


def test_backends_registered():
    for table in (EXPERT_BACKENDS, MAP_BACKENDS, REDUCE_BACKENDS):
        assert "triton" in table
    assert pick_backend(torch.ones(2, 4), torch.zeros(2, 2, dtype=torch.long)) != "triton"  # CPU


def test_training_on_cuda_takes_grouped_mm_where_it_serves():
    class OnCuda(torch.Tensor):  # a CPU tensor that says it is on CUDA: the choice, not the kernels
        is_cuda = property(lambda self: True)

    def trained(t):
        return torch.Tensor._make_subclass(OnCuda, t, True)

    ids = torch.zeros(4, 2, dtype=torch.long)
    x, w = trained(torch.ones(4, 64, dtype=torch.bfloat16)), torch.ones(3, 32, 64, dtype=torch.bfloat16)
    assert pick_backend(x, ids, w) == "grouped_mm"
    # grouped_mm raises on rows that are not whole 16-byte units, and takes bf16 only: gather then
    assert pick_backend(trained(torch.ones(4, 60, dtype=torch.bfloat16)), ids, w[:, :, :60]) == "gather"
    assert pick_backend(x, ids, w[:, :30]) == "gather"
    assert pick_backend(trained(torch.ones(4, 64)), ids, w.float()) == "gather"
    with torch.no_grad():  # inference on CUDA: the Triton kernels
        assert pick_backend(x, ids, w) == "triton"


# chunk 16: several chunks, and at T=600 more chunks than one pass over the count table holds;
# one chunk (T=1, 7, 8 at 16 and 50 at 256): the placement counts for itself, over several programs.
# Several chunks are placed both ways: after the count kernel (self_count_max 0), and by a
# placement that counts all the ids itself, chunk by chunk (the default up to SELF_COUNT_MAX_ROWS).
ALIGN_CASES = [(T, chunk, kind, self_max) for T, chunk in [(1, 256), (7, 16), (8, 16), (50, 16), (50, 256)]
               for kind in ("random", "one_hot_expert", "empty_experts") for self_max in (0, None)]
ALIGN_CASES += [(600, 16, "random", 0), (600, 16, "random", None)]


@pytest.mark.parametrize(("T", "chunk", "kind", "self_max"), ALIGN_CASES)
def test_align_invariants(tm, T, chunk, kind, self_max):
    gen = torch.Generator().manual_seed(T)
    ids_N = routing(T, kind, gen).reshape(-1)
    N, BM = ids_N.numel(), 16
    sorted_P, block_expert_B = tm.moe_align(ids_N, E, BM, chunk=chunk, self_count_max=self_max)
    B = tm.num_blocks_bound(N, E, BM)
    assert sorted_P.shape == (B * BM,) and block_expert_B.shape == (B,)
    rows = sorted_P.view(B, BM)
    real = rows < N
    # every assignment exactly once, each in a block of its own expert, in order within an expert
    assert sorted(sorted_P[sorted_P < N].tolist()) == list(range(N))
    assert (rows == N).logical_or(real).all()
    for b in range(B):
        got = rows[b][real[b]]
        if block_expert_B[b] == E:
            assert got.numel() == 0
        else:
            assert (ids_N[got.long()] == block_expert_B[b]).all()
    order = sorted_P[sorted_P < N].long()
    assert (ids_N[order].diff() >= 0).all() and all(
        (order[ids_N[order] == e].diff() > 0).all() for e in range(E)
    )
    # used blocks come first, in expert order; each expert's padding is under one block
    used = block_expert_B < E
    assert used.sum() == sum(-(-(ids_N == e).sum().item() // BM) for e in range(E))
    assert not used[used.sum():].any() and (block_expert_B[used].diff() >= 0).all()


def test_align_launches(tm, monkeypatch):
    """The count kernel launches only past SELF_COUNT_MAX_ROWS assignments (and more than one chunk)."""
    counted = launch_grids(monkeypatch, tm, "_count_kernel")
    ids_N = routing(300, "random", torch.Generator().manual_seed(0)).reshape(-1)  # 600 assignments
    monkeypatch.setattr(tm, "SELF_COUNT_MAX_ROWS", 600)
    one = tm.moe_align(ids_N, E, 16, chunk=16)
    assert counted == []
    monkeypatch.setattr(tm, "SELF_COUNT_MAX_ROWS", 599)
    two = tm.moe_align(ids_N, E, 16, chunk=16)
    assert counted == [(38,)]
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("T", "small"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("kind", ["random", "one_hot_expert", "empty_experts", "repeated_expert"])
def test_experts_match_reference(tm, T, small, kind, dtype):
    gen = torch.Generator().manual_seed(100 + T)
    x = torch.randn(T, D, generator=gen).to(dtype)
    w13 = (torch.randn(E, 2 * I, D, generator=gen) * 0.3).to(dtype)
    w2 = (torch.randn(E, D, I, generator=gen) * 0.3).to(dtype)
    weights = torch.rand(T, K, generator=gen).to(dtype)
    ids = routing(T, kind, gen)
    want = experts_reference(x.float(), w13.float(), w2.float(), ids, weights.float(), F.silu)
    got = tm.experts_fused(x, w13, w2, ids, weights, "silu", configs=(SMALL, {**SMALL, "BLOCK_N": 32}), small=small)
    assert got.dtype == dtype and got.shape == (T, D)
    check(got, want, dtype, f"experts {kind} T={T}")


def test_experts_through_the_seam(tm):
    """The registered backend with its default (untuned) blocks, another fused activation, K=1."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(9, D, generator=gen)
    w13, w2 = torch.randn(E, 2 * I, D, generator=gen) * 0.3, torch.randn(E, D, I, generator=gen) * 0.3
    for act, ids in ((F.silu, routing(9, "random", gen)), (ACTIVATIONS["gelu_new"], routing(9, "random", gen)[:, :1])):
        weights = torch.rand(ids.shape, generator=gen)
        want = experts_reference(x, w13, w2, ids, weights, act)
        check(experts_forward(x, w13, w2, ids, weights, act, backend="triton"), want, torch.float32, str(act))
    assert experts_forward(x[:0], w13, w2, ids[:0], weights[:0], F.silu, backend="triton").shape == (0, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("T", "small"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("kind", ["random", "one_hot_expert", "empty_experts"])
def test_map_reduce_match_reference(tm, T, small, kind, dtype):
    gen = torch.Generator().manual_seed(200 + T)
    x = torch.randn(T, D, generator=gen).to(dtype)
    w_map = (torch.randn(E, C, D, generator=gen) * 0.3).to(dtype)
    h = torch.randn(T, K, C, generator=gen).to(dtype)
    w_red = (torch.randn(E, D, C, generator=gen) * 0.3).to(dtype)
    weights = torch.rand(T, K, generator=gen).to(dtype)
    ids = routing(T, kind, gen)
    got = tm.map_fused(x, w_map, ids, SMALL, small=small)
    check(got, expert_map_reference(x.float(), w_map.float(), ids), dtype, f"map {kind}")
    got = tm.reduce_fused(h, w_red, ids, weights, SMALL, small=small)
    check(got, expert_reduce_reference(h.float(), w_red.float(), ids, weights.float()), dtype, f"reduce {kind}")


@pytest.fixture
def tma(tm, monkeypatch):
    """The copy-engine path as on a Hopper GPU (the interpreter runs tensor descriptors), the gate/up
    rows gathered first at any size; yields the list of tiles each descriptor was built with."""
    built = []
    real = tm._tma_descriptor

    def spy(t, block):
        d = real(t, block)
        built.append(None if d is None else tuple(block))
        return d

    monkeypatch.setattr(tm, "tma_enabled", lambda device: True)
    monkeypatch.setattr(tm, "GATHER_MIN_ROWS", 0)
    monkeypatch.setattr(tm, "_tma_descriptor", spy)
    return built


def expert_inputs(T, kind, dtype, seed):
    """A layer's inputs at T tokens: activations, both expert shapes' weights, routing weights and ids."""
    gen = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(T, D, generator=gen).to(dtype),
        w13=(torch.randn(E, 2 * I, D, generator=gen) * 0.3).to(dtype),
        w2=(torch.randn(E, D, I, generator=gen) * 0.3).to(dtype),
        w_map=(torch.randn(E, C, D, generator=gen) * 0.3).to(dtype),
        h=torch.randn(T, K, C, generator=gen).to(dtype),
        w_red=(torch.randn(E, D, C, generator=gen) * 0.3).to(dtype),
        weights=torch.rand(T, K, generator=gen).to(dtype),
        # "one_expert": every assignment on expert 3, one expert present
        ids=torch.full((T, K), 3) if kind == "one_expert" else routing(T, kind, gen),
    )


def check_sorted_path(tm, inp, configs, cfg, dtype, what, between=None):
    """experts (gate_up, down `configs`), then map and reduce (`cfg`) on the sorted path against the
    reference loops; `between()` runs after the experts."""
    f = lambda t: t.float()  # noqa: E731
    x, ids, weights = inp["x"], inp["ids"], inp["weights"]
    got = tm.experts_fused(x, inp["w13"], inp["w2"], ids, weights, "silu", configs, small=False)
    want = experts_reference(f(x), f(inp["w13"]), f(inp["w2"]), ids, f(weights), F.silu)
    check(got, want, dtype, f"experts {what}")
    if between is not None:
        between()
    got = tm.map_fused(x, inp["w_map"], ids, cfg, small=False)
    check(got, expert_map_reference(f(x), f(inp["w_map"]), ids), dtype, f"map {what}")
    got = tm.reduce_fused(inp["h"], inp["w_red"], ids, weights, cfg, small=False)
    check(got, expert_reduce_reference(f(inp["h"]), f(inp["w_red"]), ids, f(weights)), dtype, f"reduce {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["random", "one_hot_expert", "empty_experts"])
@pytest.mark.parametrize("T", [7, 33])
def test_tma_path_matches_reference(tm, tma, T, kind, dtype):
    # D = 40 is no multiple of BLOCK_K = 16: the descriptors zero-fill the ragged K edge; I = 24 not
    # of BLOCK_N either: the gate tile's last columns read up rows, never stored.
    def experts_descriptors():
        # gate/up: x gathered, then A and W by descriptor; down: h (padded sorted) and W by descriptor
        assert tma == [(1, 16, 16), (16, 16), (1, 16, 16), (16, 16)]

    inp = expert_inputs(T, kind, dtype, seed=500 + T)
    check_sorted_path(tm, inp, (SMALL, SMALL), SMALL, dtype, kind, between=experts_descriptors)
    assert tma[4:] == [(1, 16, 16), (1, 16, 16)]  # map and reduce gather A in the kernel: W only


# Persistent grids (programs per SM; under the interpreter, programs in all): fewer programs than
# tiles (each walks several, across row blocks and experts), and more (the extra ones get none).
PERSISTENT_CASES = [(1, 7, "random"), (3, 33, "random"), (3, 33, "one_hot_expert"), (5, 7, "empty_experts"),
                    (200, 7, "random")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("descriptors", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize(("programs", "T", "kind"), PERSISTENT_CASES)
def test_persistent_matches_reference(tm, monkeypatch, programs, T, kind, descriptors, dtype):
    if descriptors:
        monkeypatch.setattr(tm, "tma_enabled", lambda device: True)
        monkeypatch.setattr(tm, "GATHER_MIN_ROWS", 0)
    cfg = {**SMALL, "PERSISTENT": programs}
    inp = expert_inputs(T, kind, dtype, seed=700 + T + programs)
    check_sorted_path(tm, inp, (cfg, {**cfg, "BLOCK_N": 32}), cfg, dtype, kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("programs", [6, 8])
def test_persistent_tail_split_matches_reference(tm, monkeypatch, programs, dtype):
    # A persistent grid whose tiles' last round fills at most half of it splits those tiles along K
    # (TAIL_SPLIT); the last program to arrive at a tile sums the partials in split order. Token
    # counts give every remainder of tiles over programs; programs run in a shuffled order so that
    # any split may arrive last; map (stored at row n) and reduce (routing weights) both split.
    Dk, Ck = 128, 48  # 8 and 3 K steps of 16
    cfg = {**SMALL, "PERSISTENT": programs}
    gen = torch.Generator().manual_seed(programs)
    split = 0
    for T in range(5, 41, 3):
        x = torch.randn(T, Dk, generator=gen).to(dtype)
        w_map = (torch.randn(E, Ck, Dk, generator=gen) * 0.1).to(dtype)  # outputs of order 1 over 128 terms
        h = torch.randn(T, K, Dk, generator=gen).to(dtype)
        w_red = (torch.randn(E, Ck, Dk, generator=gen) * 0.1).to(dtype)
        weights = torch.rand(T, K, generator=gen).to(dtype)
        ids = routing(T, "random", gen)
        used = int((tm.moe_align(ids.reshape(-1), E, 16)[1] < E).sum())
        left = used * 3 % programs
        split += left > 0 and min(programs // left, 8, tm.TAIL_SPLIT) > 1
        with monkeypatch.context() as m:
            shuffle_programs(m, seed=T)
            got_map = tm.map_fused(x, w_map, ids, cfg, small=False)
            got_red = tm.reduce_fused(h, w_red, ids, weights, cfg, small=False)
        f = lambda t: t.float()  # noqa: E731
        check(got_map, expert_map_reference(f(x), f(w_map), ids), dtype, f"map, T={T}")
        check(got_red, expert_reduce_reference(f(h), f(w_red), ids, f(weights)), dtype, f"reduce, T={T}")
        # the same call again: the same bits (partials summed in a fixed order), and the arrival
        # counters are back to zero
        assert torch.equal(tm.map_fused(x, w_map, ids, cfg, small=False), got_map)
        assert all(int(c.count_nonzero()) == 0 for c in tm._ARRIVAL_COUNTERS.values())
    assert split >= 2, split  # calls that did split


def test_persistent_tail_split_off_matches(tm, monkeypatch):
    # TAIL_SPLIT = 0 runs every tile whole: the same results within rounding
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(23, 128, generator=gen), torch.randn(E, 48, 128, generator=gen)
    ids = routing(23, "random", gen)
    cfg = {**SMALL, "PERSISTENT": 8}
    got = tm.map_fused(x, w, ids, cfg, small=False)
    monkeypatch.setattr(tm, "TAIL_SPLIT", 0)
    check(tm.map_fused(x, w, ids, cfg, small=False), got, torch.float32, "map without the tail split")


def test_persistent_grid_size(tm, monkeypatch):
    """A persistent launch has min(tiles, programs) programs; without the key, one per tile of the
    host-side bound."""
    grids = launch_grids(monkeypatch, tm, "_moe_gemm_kernel")
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(33, D, generator=gen), torch.randn(E, C, D, generator=gen)
    ids = routing(33, "random", gen)
    tiles = tm.num_blocks_bound(33 * K, E, 16) * -(-C // 16)
    for programs, want in ((3, 3), (10_000, tiles), (0, tiles), (None, tiles)):
        cfg = SMALL if programs is None else {**SMALL, "PERSISTENT": programs}
        got = tm.map_fused(x, w, ids, cfg, small=False)
        check(got, expert_map_reference(x, w, ids), torch.float32, f"map, PERSISTENT={programs}")
        assert grids.pop() == (want,), programs


def test_gather_rows(tm):
    gen = torch.Generator().manual_seed(8)
    T = 29
    ids_N = routing(T, "random", gen).reshape(-1)
    N = ids_N.numel()
    sorted_P, _ = tm.moe_align(ids_N, E, 16)
    x = torch.randn(T, 1500, generator=gen).to(torch.bfloat16)  # over one 1024-column chunk
    got = tm.gather_rows(x, sorted_P, N, K)
    real = sorted_P < N
    assert torch.equal(got[real], x[sorted_P[real].long() // K])
    assert not got[~real].any()  # padding rows are zeros
    strided = torch.randn(1500, T, generator=gen).to(torch.bfloat16).T
    assert torch.equal(tm.gather_rows(strided, sorted_P, N, K)[real], strided[sorted_P[real].long() // K])


def test_tma_descriptor_refusals(tm, monkeypatch):
    w = torch.zeros(4, 64, 48, dtype=torch.bfloat16)
    assert tm._tma_descriptor(w, [1, 16, 16]) is not None
    assert tm._tma_descriptor(w.transpose(1, 2), [1, 16, 16]) is None  # last dimension strided
    assert tm._tma_descriptor(w[:, :, :33], [1, 16, 16]) is not None  # a view: strides still aligned
    assert tm._tma_descriptor(torch.zeros(4, 64, 33, dtype=torch.bfloat16), [1, 16, 16]) is None  # 66-byte rows
    shifted = torch.zeros(4 * 64 * 48 + 1, dtype=torch.bfloat16)[1:].view(4, 64, 48)  # aligned strides
    assert tm._tma_descriptor(shifted, [1, 16, 16]) is None  # base + 2 bytes
    assert tm._tma_descriptor(w, [1, 16, 512]) is None  # tile side over 256
    assert tm._tma_descriptor(w, [1, 16, 4]) is None  # 8-byte tile rows
    assert tm._tma_descriptor(w.double(), [1, 16, 16]) is None
    # only on a CUDA device of Hopper or newer, off under the interpreter and with TMA off
    # (MOETORCH_TMA=0 at import)
    assert not tm.tma_enabled(torch.device("cpu"))
    monkeypatch.setattr(tm, "_tma_capable", lambda index: True)
    assert not tm.tma_enabled(torch.device("cuda", 0)), "the interpreter takes no descriptors"
    monkeypatch.setattr(tm, "INTERPRET", False)
    assert tm.tma_enabled(torch.device("cuda", 0))
    monkeypatch.setattr(tm, "TMA", False)
    assert not tm.tma_enabled(torch.device("cuda", 0))


@pytest.mark.parametrize("capability,want", [((8, 0), False), ((9, 0), True)])
def test_tma_needs_hopper(tm, capability, want, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    assert tm._tma_capable.__wrapped__(0) is want


def test_reduce_reuses_the_maps_alignment(tm, monkeypatch):
    # JetMoE's attention runs map then reduce on one ids tensor: one alignment serves both, with the
    # map's BLOCK_M. Only that very tensor, unchanged, matches.
    gen = torch.Generator().manual_seed(41)
    T = 21
    x = torch.randn(T, D, generator=gen)
    w_map = torch.randn(E, C, D, generator=gen) * 0.3
    h = torch.randn(T, K, C, generator=gen)
    w_red = torch.randn(E, D, C, generator=gen) * 0.3
    weights = torch.rand(T, K, generator=gen)
    ids = routing(T, "random", gen)
    block_ms = []
    real_align = tm.moe_align
    monkeypatch.setattr(tm, "moe_align", lambda ids_N, E_, block_m: block_ms.append(block_m) or real_align(ids_N, E_, block_m))
    used = []
    real_gemm = tm.moe_gemm
    monkeypatch.setattr(tm, "moe_gemm", lambda *a, **kw: used.append(a[6]["BLOCK_M"]) or real_gemm(*a, **kw))

    def reduce_and_check():
        got = tm.reduce_fused(h, w_red, ids, weights, {**SMALL, "BLOCK_M": 32}, small=False)
        check(got, expert_reduce_reference(h, w_red, ids, weights), torch.float32, "reduce")

    tm.map_fused(x, w_map, ids, SMALL, small=False)
    reduce_and_check()
    assert block_ms == [16] and used == [16, 16]  # the reduce ran on the map's 16-row blocks
    tm.reduce_fused(h, w_red, ids.clone(), weights, {**SMALL, "BLOCK_M": 32}, small=False)
    assert block_ms == [16, 32]  # an equal but other tensor: aligned anew
    tm.map_fused(x, w_map, ids, SMALL, small=False)
    ids[0] = (ids[0] + 1) % E  # rerouted in place after the map: the old alignment is stale
    reduce_and_check()
    assert block_ms == [16, 32, 16, 32]
    tm.map_fused(x, w_map, ids, SMALL, small=False)
    tm.reduce_fused(h, w_red, ids, weights, SMALL, small=False)
    # another layer's experts (other E) on the same ids do not match either
    tm.reduce_fused(h, torch.randn(E + 1, D, C, generator=gen), ids, weights, SMALL, small=False)
    assert block_ms == [16, 32, 16, 32, 16, 16]


@pytest.mark.parametrize(("T", "small"), [(7, True), (7, False), (33, False)], ids=["T7-small", "T7-sorted", "T33-sorted"])
def test_uncombined_outputs_sum_to_the_combined_ones(tm, T, small):
    # combine=False: the sorted path hands the K weighted terms to the caller (whose residual add
    # sums them); summed, they are the combined output bit for bit. The small kernel without a
    # split sums anyway (split by expert, it leaves the terms too: test_split_k_matches_reference).
    gen = torch.Generator().manual_seed(300 + T)
    x = torch.randn(T, D, generator=gen).to(torch.bfloat16)
    w13 = (torch.randn(E, 2 * I, D, generator=gen) * 0.3).to(torch.bfloat16)
    w2 = (torch.randn(E, D, I, generator=gen) * 0.3).to(torch.bfloat16)
    h = torch.randn(T, K, C, generator=gen).to(torch.bfloat16)
    w_red = (torch.randn(E, D, C, generator=gen) * 0.3).to(torch.bfloat16)
    weights = torch.rand(T, K, generator=gen).to(torch.bfloat16)
    ids = routing(T, "random", gen)
    cfgs = (SMALL, {**SMALL, "BLOCK_N": 32})
    for combined, terms in (
        (tm.experts_fused(x, w13, w2, ids, weights, "silu", cfgs, small),
         tm.experts_fused(x, w13, w2, ids, weights, "silu", cfgs, small, combine=False)),
        (tm.reduce_fused(h, w_red, ids, weights, SMALL, small),
         tm.reduce_fused(h, w_red, ids, weights, SMALL, small, combine=False)),
    ):
        assert combined.shape == (T, D)
        assert terms.shape == ((T, D) if small else (T, K, D))
        assert torch.equal(terms if small else terms.sum(-2), combined)
    # through the seam: the other backends combine whatever is asked
    for backend in ("reference", "gather"):
        y = experts_forward(x.float(), w13.float(), w2.float(), ids, weights.float(), F.silu, backend, combine=False)
        assert y.shape == (T, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("T", "k", "O"), [(5, 2, 37), (3, 3, 2100), (2, 1, 16)])
def test_sum_over_k(tm, T, k, O, dtype):
    # the combined output: the K rows of each token summed in float32 and rounded once, as torch's
    # sum over the axis; more columns than one program's block (2048) take two
    y = torch.randn(T * k, O, generator=torch.Generator().manual_seed(T * O)).to(dtype)
    got = tm._sum_over_k(y, T, k)
    want = y.view(T, k, O).float().sum(1).to(dtype)
    assert got.shape == (T, O) and got.is_contiguous()
    assert torch.equal(got, want)


def test_gradients_match_reference(tm):
    """Training through the triton backend: kernels forward, reference backward by recomputation."""
    gen = torch.Generator().manual_seed(3)
    T = 5
    ids = routing(T, "random", gen)
    inputs = [torch.randn(T, D, generator=gen), torch.randn(E, 2 * I, D, generator=gen) * 0.3,
              torch.randn(E, D, I, generator=gen) * 0.3, torch.rand(T, K, generator=gen),
              torch.randn(E, C, D, generator=gen) * 0.3, torch.randn(T, K, C, generator=gen),
              torch.randn(E, D, C, generator=gen) * 0.3]
    grads = {}
    for backend in ("reference", "triton"):
        x, w13, w2, wt, wm, h, wr = leaves = [t.clone().requires_grad_() for t in inputs]
        y = experts_forward(x, w13, w2, ids, wt, F.silu, backend)
        q = expert_map(x, wm, ids, backend)
        o = expert_reduce(h, wr, ids, wt, backend)
        (y.square().sum() + q.square().sum() + o.square().sum()).backward()
        grads[backend] = [y, q, o, *(t.grad for t in leaves)]
    for i, (a, b) in enumerate(zip(grads["triton"], grads["reference"])):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"output/grad {i}")


def test_config_lookup(tm, tmp_path, monkeypatch):
    key = tm.config_key("down", 16, 4096, 6400, torch.bfloat16)
    assert key == "down,E=16,N=4096,K=6400,bfloat16"
    small, large = dict(SMALL), {**SMALL, "BLOCK_M": 64}
    path = tmp_path / "GPU.json"
    path.write_text(json.dumps({key: {"1": small, "4096": large}}))
    monkeypatch.setattr(tm, "_device_file", lambda device: path)
    assert tm.get_config("down", 16, 4096, 6400, torch.bfloat16, 8, 16, None) == small
    assert tm.get_config("down", 16, 4096, 6400, torch.bfloat16, 2000, 4000, None) == large
    # no entry: the defaults' decode and prefill regimes
    assert tm.get_config("map", 16, 4096, 6400, torch.bfloat16, 1, 2, None)["BLOCK_M"] == 16
    assert tm.get_config("map", 16, 4096, 6400, torch.bfloat16, 8192, 16384, None)["BLOCK_M"] == 128
    # answers are remembered, but each call gets its own dict, and another file its own answers
    got = tm.get_config("down", 16, 4096, 6400, torch.bfloat16, 8, 16, None)
    got["BLOCK_M"] = 999
    assert tm.get_config("down", 16, 4096, 6400, torch.bfloat16, 8, 16, None) == small
    other = tmp_path / "OTHER.json"
    other.write_text(json.dumps({key: {"1": large}}))
    monkeypatch.setattr(tm, "_device_file", lambda device: other)
    assert tm.get_config("down", 16, 4096, 6400, torch.bfloat16, 8, 16, None) == large


def test_config_lookup_shares_entries_between_the_2_byte_floats(tm, tmp_path, monkeypatch):
    # float16 and bfloat16 tiles are the same size: a file tuned in one serves the other, where it
    # has no entry of its own; float32 (twice the bytes a tile) keeps the defaults
    tuned, fp16_own = {**SMALL, "BLOCK_M": 64}, {**SMALL, "BLOCK_M": 32}
    path = tmp_path / "GPU.json"
    path.write_text(json.dumps({tm.config_key("down", 16, 4096, 6400, torch.bfloat16): {"1": tuned},
                                tm.config_key("map", 16, 4096, 6400, torch.float16): {"1": fp16_own}}))
    monkeypatch.setattr(tm, "_device_file", lambda device: path)
    assert tm.get_config("down", 16, 4096, 6400, torch.float16, 1, 2, None) == tuned
    assert tm.get_config("map", 16, 4096, 6400, torch.bfloat16, 1, 2, None) == fp16_own
    assert tm.get_config("map", 16, 4096, 6400, torch.float16, 1, 2, None) == fp16_own
    for op, dtype in (("down", torch.float32), ("gate_up", torch.float16)):
        assert tm.get_config(op, 16, 4096, 6400, dtype, 1, 2, None) == tm.default_config(2, dtype, op == "gate_up")


class FakeGPU:
    """torch.cuda's answers for one GPU: its name, compute capability and SM count."""

    def __init__(self, name, major, minor, sms):
        self.name, self.major, self.minor, self.multi_processor_count = name, major, minor, sms

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: self.name)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: self)


@pytest.fixture
def config_dir(tm, tmp_path, monkeypatch):
    """A config directory of two files, for GPUs of compute capability 9.0 with 132 and 114 SMs,
    and a fresh `config_file` answer per test."""
    monkeypatch.delenv(tm.CONFIG_ENV, raising=False)
    monkeypatch.setattr(tm, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(tm, "SHIPPED_GPUS", {"BIG_GPU": ((9, 0), 132), "SMALL_GPU": ((9, 0), 114),
                                             "LISTED_GPU_WITHOUT_FILE": ((9, 0), 120)})
    for stem in ("BIG_GPU", "SMALL_GPU"):
        (tmp_path / f"{stem}.json").write_text("{}")
    tm.config_file.cache_clear()
    yield tmp_path
    tm.config_file.cache_clear()


def test_config_file_of_a_gpu(tm, config_dir, monkeypatch, caplog):
    # its own file, by name (spaces as underscores), whatever the architecture
    (config_dir / "NVIDIA_Own_GPU.json").write_text("{}")
    FakeGPU("NVIDIA Own GPU", 8, 0, 108).install(monkeypatch)
    assert tm.config_file(0) == config_dir / "NVIDIA_Own_GPU.json"
    # none of its own: the file of its compute capability with the nearest SM count, said in the log
    for sms, stem in ((132, "BIG_GPU"), (124, "BIG_GPU"), (122, "SMALL_GPU"), (78, "SMALL_GPU")):
        tm.config_file.cache_clear()
        FakeGPU("NVIDIA Other", 9, 0, sms).install(monkeypatch)
        with caplog.at_level(logging.INFO, logger="moetorch"):
            assert tm.config_file(0) == config_dir / f"{stem}.json", sms
        assert f"no expert-kernel block sizes tuned on NVIDIA Other; using {stem}.json" in caplog.text
        caplog.clear()
    # another architecture: no file, and a warning that names the GPU and the way out
    tm.config_file.cache_clear()
    FakeGPU("NVIDIA Next", 10, 0, 148).install(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="moetorch"):
        assert tm.config_file(0) is None
    assert "NVIDIA Next (sm_100)" in caplog.text and "bench/tune_moe.py" in caplog.text
    # decided once per device: a later lookup does not read torch.cuda again
    FakeGPU("NVIDIA Own GPU", 8, 0, 108).install(monkeypatch)
    assert tm.config_file(0) is None


def test_config_file_from_the_environment(tm, config_dir, monkeypatch):
    mine = config_dir / "mine.json"
    mine.write_text("{}")
    monkeypatch.setenv(tm.CONFIG_ENV, str(mine))
    FakeGPU("NVIDIA Own GPU", 9, 0, 132).install(monkeypatch)
    assert tm.config_file(0) == mine  # in place of the GPU's own
    tm.config_file.cache_clear()
    monkeypatch.setenv(tm.CONFIG_ENV, str(config_dir / "missing.json"))
    with pytest.raises(FileNotFoundError, match="MOETORCH_MOE_CONFIG=.*missing.json: no such file"):
        tm.config_file(0)


@pytest.mark.parametrize(("bad", "message"), [
    ({"PERSISTENT": -1}, "PERSISTENT must be an integer >= 0, got -1"),
    ({"BLOCK_M": 48}, "BLOCK_M must be a power of two, got 48"),
    ({"num_warps": 0}, "num_warps must be a power of two, got 0"),
    ({"num_stages": 2.5}, "num_stages must be a positive integer, got 2.5"),
    ({"SPLIT_K": True}, "SPLIT_K must be a positive integer, got True"),
    ({"GEMV": 1}, "GEMV must be true or false, got 1"),
    ({"SPLIT_E": "yes"}, "SPLIT_E must be true or false, got 'yes'"),
    ({"BLOCK_Q": 16}, r"missing keys \[\], unknown keys \['BLOCK_Q'\]"),
])
def test_config_file_errors_name_the_entry(tm, tmp_path, monkeypatch, bad, message):
    # a hand-edited or foreign config file fails at its first lookup, naming the file, entry,
    # bucket and key, not inside a kernel launch
    key = tm.config_key("down", 16, 4096, 6400, torch.bfloat16)
    path = tmp_path / "GPU.json"
    path.write_text(json.dumps({key: {"1": SMALL, "64": {**SMALL, **bad}}}))
    monkeypatch.setattr(tm, "_device_file", lambda device: path)
    with pytest.raises(ValueError, match=f"GPU.json: {key}, bucket '64': {message}"):
        tm.get_config("down", 16, 4096, 6400, torch.bfloat16, 8, 16, None)
    missing = {k: v for k, v in SMALL.items() if k != "GROUP_M"}
    for text, want in ((json.dumps({key: {"1": missing}}), r"missing keys \['GROUP_M'\]"),
                       (json.dumps({key: {"0": SMALL}}), "bucket '0': a token bucket must be a positive integer"),
                       ("{not json", "not a JSON config file")):
        path = tmp_path / f"GPU{len(text)}.json"
        path.write_text(text)
        monkeypatch.setattr(tm, "_device_file", lambda device, path=path: path)
        with pytest.raises(ValueError, match=want):
            tm.get_config("down", 16, 4096, 6400, torch.bfloat16, 8, 16, None)


def test_shipped_configs_are_complete(tm):
    # each shipped file names its GPU's architecture, for GPUs without a file of their own
    assert {p.stem for p in tm.CONFIG_DIR.glob("*.json")} == set(tm.SHIPPED_GPUS)
    for path in tm.CONFIG_DIR.glob("*.json"):
        tables = json.loads(path.read_text())
        for key, table in tables.items():
            op, e, n, k, dtype = key.split(",")
            assert op in ("gate_up", "down", "map", "reduce"), key
            for bucket, cfg in table.items():
                assert int(bucket) >= 1, (path.name, key, bucket)
                assert set(tm.CONFIG_KEYS) <= set(cfg) <= {*tm.CONFIG_KEYS, *tm.OPTIONAL_CONFIG_KEYS}, (path.name, key, bucket)
                assert cfg.get("SPLIT_K", 1) >= 1, (path.name, key, bucket)
                assert cfg.get("PERSISTENT", 0) in (0, 1, 2, 3, 4), (path.name, key, bucket)
            if op == "gate_up":  # the down GEMM (output D = gate_up's K) shares the alignment: same BLOCK_M
                down = tables[f"down,{e},N={k[2:]},K={n[2:]},{dtype}"]
                assert {b: c["BLOCK_M"] for b, c in table.items()} == {b: c["BLOCK_M"] for b, c in down.items()}


# ---- split-K of the alignment-free kernel ------------------------------------------------------

SPLITS = [2, 3, 4]
# (T, routing, BLOCK_K): odd token counts (N = 2..30 rows, BLOCK_M 16 and 32); with BLOCK_K 16 the
# gate_up GEMM (k_dim D = 40) has 3 K steps per expert, the down/reduce GEMM (I = C = 24) 2; with 32,
# 2 and 1: on one expert, fewer (expert, K step) iterations than SPLIT_K, so some slices are empty.
SPLIT_CASES = [(3, "random", 16), (5, "one_expert", 16), (1, "one_expert", 32), (15, "random", 32)]
SPLIT_IDS = [f"T{T}-{kind}-bk{bk}" for T, kind, bk in SPLIT_CASES]


def split_cfg(split_k, block_k, block_n=16, by_expert=False):
    return {**SMALL, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k, "SPLIT_E": by_expert}


def empty_slices(ids, k_dim, block_k, split_k):
    """How many of a column tile's SPLIT_K programs get no (expert, K step) iteration."""
    total = ids.unique().numel() * -(-k_dim // block_k)
    per = -(-total // split_k)
    return sum(s * per >= total for s in range(split_k))


def assert_counters_zero(tm):
    assert tm._ARRIVAL_COUNTERS, "no split-K launch ran"
    for key, counters in tm._ARRIVAL_COUNTERS.items():
        assert not counters.any(), f"arrival counters {key} not reset: {counters.nonzero().flatten().tolist()}"


def run_split(tm, inp, split_k, block_k, combine=True, by_expert=False):
    """experts (gated gate_up + weighted down with the K fold), map, reduce through the split kernel
    (by_expert: configs that say SPLIT_E)."""
    cfg = split_cfg(split_k, block_k, by_expert=by_expert)
    down = split_cfg(split_k, block_k, block_n=32, by_expert=by_expert)
    return (
        tm.experts_fused(inp["x"], inp["w13"], inp["w2"], inp["ids"], inp["weights"], "silu", configs=(cfg, down),
                         small=True, combine=combine),
        tm.map_fused(inp["x"], inp["w_map"], inp["ids"], cfg, small=True),
        tm.reduce_fused(inp["h"], inp["w_red"], inp["ids"], inp["weights"], cfg, small=True, combine=combine),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("T", "kind", "block_k"), SPLIT_CASES, ids=SPLIT_IDS)
@pytest.mark.parametrize("split_k", SPLITS)
@pytest.mark.parametrize("by_expert", [True, False], ids=["by-expert", "flat"])
def test_split_k_matches_reference(tm, by_expert, split_k, T, kind, block_k, dtype):
    # Configs with SPLIT_E: the GEMMs without a sum over K (gate_up, map; down and reduce with
    # combine=False) give each program whole experts; the combined down and reduce keep the flat
    # split and its partials either way.
    inp = expert_inputs(T, kind, dtype, seed=300 + T)
    if kind == "one_expert" and block_k == 32:  # the case is there for its empty slices
        assert empty_slices(inp["ids"], I, block_k, split_k) > 0
    f = {k: v.float() if v.is_floating_point() else v for k, v in inp.items()}
    want_y = experts_reference(f["x"], f["w13"], f["w2"], f["ids"], f["weights"], F.silu)
    want_o = expert_reduce_reference(f["h"], f["w_red"], f["ids"], f["weights"])
    y, q, o = run_split(tm, inp, split_k, block_k, by_expert=by_expert)
    assert y.dtype == q.dtype == o.dtype == dtype
    assert y.shape == (T, D) and q.shape == (T, K, C) and o.shape == (T, D)
    check(y, want_y, dtype, f"experts {kind}")
    check(q, expert_map_reference(f["x"], f["w_map"], f["ids"]), dtype, f"map {kind}")
    check(o, want_o, dtype, f"reduce {kind}")
    assert_counters_zero(tm)
    # combine=False: split by expert, each token's K weighted terms, which sum to the output; the
    # flat split sums them in registers
    y_terms, _, o_terms = run_split(tm, inp, split_k, block_k, combine=False, by_expert=by_expert)
    assert y_terms.shape == o_terms.shape == ((T, K, D) if by_expert else (T, D))
    if by_expert:
        y_terms, o_terms = y_terms.float().sum(-2), o_terms.float().sum(-2)
    check(y_terms, want_y, dtype, f"experts {kind}, uncombined")
    check(o_terms, want_o, dtype, f"reduce {kind}, uncombined")


def test_split_by_expert_needs_no_partials(tm, monkeypatch):
    """Split by expert, the GEMMs without a sum over K meet at no last arriver: arrival counters
    stay untouched, and the result is the same whatever order the programs run in, with as many
    splits as experts present or more (empty slices), and agrees with the flat split."""
    inp = expert_inputs(6, "random", torch.float32, seed=21)
    assert inp["ids"].unique().numel() == E  # 5 experts present: 4 splits take 1-2 each, 8 leave 3 empty
    # counters at a value no launch leaves behind: a split-K program's arrival would move it
    sentinel = torch.full((256,), 1000, dtype=torch.int32)
    flat = run_split(tm, inp, 4, 16, combine=False)
    for split_k in (4, 8):
        with monkeypatch.context() as m:
            m.setattr(tm, "arrival_counters", lambda device, tiles: sentinel)
            first = run_split(tm, inp, split_k, 16, combine=False, by_expert=True)
            for seed in range(2):
                with monkeypatch.context() as order:
                    shuffle_programs(order, seed)
                    again = run_split(tm, inp, split_k, 16, combine=False, by_expert=True)
                assert all(torch.equal(a, b) for a, b in zip(first, again)), f"{split_k} splits, order {seed}"
        assert (sentinel == 1000).all(), "a split-by-expert launch used arrival counters"
        assert first[0].shape == first[2].shape == (6, K, D)  # the K terms, for the caller to sum
        check(first[0].sum(-2), flat[0], torch.float32, f"experts: {split_k} splits by expert vs flat")
        check(first[1], flat[1], torch.float32, f"map: {split_k} splits by expert vs flat")
        check(first[2].sum(-2), flat[2], torch.float32, f"reduce: {split_k} splits by expert vs flat")
    # SPLIT_BY_EXPERT = 0 turns SPLIT_E off: the flat split, which sums over K in registers
    monkeypatch.setattr(tm, "SPLIT_BY_EXPERT", 0)
    off = run_split(tm, inp, 4, 16, combine=False, by_expert=True)
    assert off[0].shape == (6, D) and all(torch.equal(a, b) for a, b in zip(flat, off))


def test_split_k_deterministic_and_self_resetting(tm, monkeypatch):
    """Bitwise the same result on every call and whichever program of a tile arrives last; the
    counters are back at zero after every launch, and grow when a launch needs more tiles."""
    # One expert, BLOCK_K 8, 3 splits: each split holds K steps of every row (gate_up and map have 5,
    # down and reduce 3), so all 3 partials of an output are non-zero and float32 shows their order.
    inp = expert_inputs(5, "one_expert", torch.float32, seed=11)
    first = run_split(tm, inp, 3, 8)
    assert_counters_zero(tm)
    assert all(torch.equal(a, b) for a, b in zip(first, run_split(tm, inp, 3, 8)))
    # no split: the same sums in another order, so equal only to rounding
    for got, want in zip(first, run_split(tm, inp, 1, 8)):
        check(got, want, torch.float32, "SPLIT_K=1 vs 3")
    for seed in range(2):
        with monkeypatch.context() as m:
            shuffled = shuffle_programs(m, seed)
            assert all(torch.equal(a, b) for a, b in zip(first, run_split(tm, inp, 3, 8))), f"order {seed}"
            assert shuffled["other_last"] > 0
        assert_counters_zero(tm)
    # a counter buffer smaller than the grid's column tiles is replaced by a larger zeroed one; the
    # old one stays referenced (a captured CUDA graph would still use it)
    key = next(iter(tm._ARRIVAL_COUNTERS))
    small = torch.zeros(1, dtype=torch.int32)
    monkeypatch.setitem(tm._ARRIVAL_COUNTERS, key, small)
    assert all(torch.equal(a, b) for a, b in zip(first, run_split(tm, inp, 3, 8)))
    assert tm._ARRIVAL_COUNTERS[key].numel() >= 3 and any(c is small for c in tm._RETIRED_COUNTERS)
    assert_counters_zero(tm)


# ---- the one-token CUDA-core kernel (config GEMV) ------------------------------------------------

# BLOCK_K 16: D = 40 leaves a ragged last K step (I = C = 24 too); 8 divides all three. BLOCK_N 16
# leaves a ragged column tile on I and C (24), 8 does not.
GEMV_CASES = [(16, 16, "random"), (8, 8, "random"), (16, 8, "repeated_expert"), (2, 16, "random")]


def gemv_cfg(block_n, block_k):
    return {**SMALL, "GEMV": True, "BLOCK_N": block_n, "BLOCK_K": block_k}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("block_n", "block_k", "kind"), GEMV_CASES)
@pytest.mark.parametrize("topk", [1, 2, 4])
def test_gemv_matches_reference(tm, monkeypatch, topk, block_n, block_k, kind, dtype):
    gen = torch.Generator().manual_seed(700 + 10 * topk + block_k)
    ids = (torch.randperm(E, generator=gen)[:topk] if kind == "random"
           else torch.randint(0, E, (1,), generator=gen).expand(topk))[None]
    x = torch.randn(1, D, generator=gen).to(dtype)
    w13 = (torch.randn(E, 2 * I, D, generator=gen) * 0.3).to(dtype)
    w2 = (torch.randn(E, D, I, generator=gen) * 0.3).to(dtype)
    w_map = (torch.randn(E, C, D, generator=gen) * 0.3).to(dtype)
    w_red = (torch.randn(E, D, C, generator=gen) * 0.3).to(dtype)
    h = torch.randn(1, topk, C, generator=gen).to(dtype)
    weights = torch.rand(1, topk, generator=gen).to(dtype)
    calls = []
    gemv = tm.moe_gemv
    monkeypatch.setattr(tm, "moe_gemv", lambda *a, **kw: calls.append(kw.get("sum_k")) or gemv(*a, **kw))
    cfg = gemv_cfg(block_n, block_k)
    y = tm.experts_fused(x, w13, w2, ids, weights, "silu", configs=(cfg, cfg), small=True)
    q = tm.map_fused(x, w_map, ids, cfg, small=True)
    o = tm.reduce_fused(h, w_red, ids, weights, cfg, small=True)
    assert calls == [False, True, False, True], "gate_up, down, map, reduce through the one-token kernel"
    assert y.dtype == q.dtype == o.dtype == dtype
    assert y.shape == (1, D) and q.shape == (1, topk, C) and o.shape == (1, D)
    f = [t.float() for t in (x, w13, w2, w_map, w_red, h, weights)]
    check(y, experts_reference(f[0], f[1], f[2], ids, f[6], F.silu), dtype, "experts")
    check(q, expert_map_reference(f[0], f[3], ids), dtype, "map")
    check(o, expert_reduce_reference(f[5], f[4], ids, f[6]), dtype, "reduce")


def test_gemv_reads_strided_inputs_and_weights(tm):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1, 2 * D, generator=gen)[:, ::2]  # every other element
    w_map = torch.randn(E, D, C, generator=gen).transpose(1, 2) * 0.3  # [E, C, D], D not contiguous
    ids = torch.tensor([[4, 1]])
    assert x.stride(1) == 2 and w_map.stride(2) != 1
    got = tm.map_fused(x, w_map, ids, gemv_cfg(8, 16), small=True)
    check(got, expert_map_reference(x, w_map, ids), torch.float32, "strided map")


def test_gemv_config_only_serves_one_token(tm, monkeypatch):
    """At more than one token a GEMV entry runs the tiled small kernel with the default block sizes
    (its narrow column slices would not fit the matrix units)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, D, generator=gen)
    w13, w2 = torch.randn(E, 2 * I, D, generator=gen) * 0.3, torch.randn(E, D, I, generator=gen) * 0.3
    ids, weights = routing(3, "random", gen), torch.rand(3, K, generator=gen)
    real = tm.moe_gemv
    monkeypatch.setattr(tm, "moe_gemv", lambda *a, **kw: pytest.fail("one-token kernel at 3 tokens"))
    cfg = gemv_cfg(2, 1024)  # as tuned entries read: 2 columns, 1024-element steps
    defaults, default_config = [], tm.default_config
    monkeypatch.setattr(tm, "default_config", lambda *a, **kw: defaults.append(a) or default_config(*a, **kw))
    got = tm.experts_fused(x, w13, w2, ids, weights, "silu", configs=(cfg, cfg), small=True)
    check(got, experts_reference(x, w13, w2, ids, weights, F.silu), torch.float32, "experts at T=3")
    assert len(defaults) == 2, "gate_up and down each fall back to the default block sizes"
    with pytest.raises(ValueError, match="one token"):
        real(x, w13, torch.empty(3 * K, 2 * I), ids.reshape(-1), K, cfg, a_div=K)


def test_decode_defaults_follow_the_tuned_entries(tm):
    """With no tuned entry, decode sizes on a GPU take `decode_config`: on the H200's shapes and SM
    count it picks what its tuners picked there: the same GEMV widths at one token, and at 2 and 4
    tokens the same number of programs a GEMM (column tiles x SPLIT_K) where the tuned entry splits
    flat; gate/up, whose tiles already fill the GPU, unsplit."""
    tables = json.loads((tm.CONFIG_DIR / "NVIDIA_H200.json").read_text())
    for key, table in tables.items():
        op, e, n, k, _ = key.split(",")
        n_out, k_dim = int(n[2:]), int(k[2:])
        for T in (1, 2, 4):
            tuned, got = table[str(T)], tm.decode_config(op, n_out, k_dim, T, 2 * T, sms=132)
            assert got.get("GEMV", False) == tuned.get("GEMV", False), (key, T)
            if got.get("GEMV"):
                assert got["BLOCK_N"] == tuned["BLOCK_N"], key
            elif not tuned.get("SPLIT_E"):
                programs = [-(-n_out // c["BLOCK_N"]) * c.get("SPLIT_K", 1) for c in (got, tuned)]
                assert programs[0] == programs[1], (key, T, got, tuned)
    # the lookup takes them for 2-byte floats at decode sizes on a GPU (sms > 0) with no entry
    assert tm._lookup("", "down", 16, 4096, 960, torch.float16, 1, 2, 132) == tm.decode_config(
        "down", 4096, 960, 1, 2, 132)
    assert tm._lookup("", "gate_up", 16, 960, 4096, torch.bfloat16, 8, 16, 132)["SPLIT_K"] == 8  # 15 tiles
    for args in (("down", 16, 4096, 960, torch.float32, 1, 2, 132), ("down", 16, 4096, 960, torch.bfloat16, 1, 2, 0),
                 ("down", 16, 4096, 960, torch.bfloat16, 64, 128, 132), ("down", 16, 4096, 960, torch.bfloat16, 1, 3, 132)):
        assert tm._lookup("", *args) == tm.default_config(args[6], args[4]), args  # fp32, CPU, sorted path, K=3
    # and the kernels give the reference's numbers with them (a 4-SM GPU splits these small GEMMs)
    gen = torch.Generator().manual_seed(11)
    w13, w2 = (torch.randn(E, 2 * I, D, generator=gen) * 0.3).bfloat16(), (torch.randn(E, D, I, generator=gen) * 0.3).bfloat16()
    w_map, w_red = (torch.randn(E, C, D, generator=gen) * 0.3).bfloat16(), (torch.randn(E, D, C, generator=gen) * 0.3).bfloat16()
    for T in (1, 8):
        x, h = torch.randn(T, D, generator=gen).bfloat16(), torch.randn(T, K, C, generator=gen).bfloat16()
        ids, weights = routing(T, "random", gen), torch.rand(T, K, generator=gen).bfloat16()
        cfg = {op: tm.decode_config(op, n, k, T, T * K, sms=4) for op, n, k in
               (("gate_up", I, D), ("down", D, I), ("map", C, D), ("reduce", D, C))}
        assert cfg["down"].get("GEMV", False) == (T == 1) and (T == 1 or cfg["down"]["SPLIT_K"] == 8)
        y = tm.experts_fused(x, w13, w2, ids, weights, "silu", configs=(cfg["gate_up"], cfg["down"]), small=True)
        q = tm.map_fused(x, w_map, ids, cfg["map"], small=True)
        o = tm.reduce_fused(h, w_red, ids, weights, cfg["reduce"], small=True)
        f = [t.float() for t in (x, w13, w2, w_map, w_red, h, weights)]
        check(y, experts_reference(f[0], f[1], f[2], ids, f[6], F.silu), torch.bfloat16, f"experts T={T}")
        check(q, expert_map_reference(f[0], f[3], ids), torch.bfloat16, f"map T={T}")
        check(o, expert_reduce_reference(f[5], f[4], ids, f[6]), torch.bfloat16, f"reduce T={T}")


def test_tuner_offers_both_splits(tm):
    """bench/tune_moe.py's candidates are valid config entries, and at decode sizes every split-K
    candidate comes both ways: the flat split and whole experts a program (SPLIT_E)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "tune_moe.py"
    spec = importlib.util.spec_from_file_location("tune_moe_under_test", path)
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    for T, gated, n_out in ((8, False, 2048), (16, True, 5632), (4096, False, 2048), (1, False, 4096)):
        cands = tune.candidates(T, gated, n_out)
        tm.check_configs({"op": {str(i + 1): c for i, c in enumerate(cands)}}, f"candidates at T={T}")
        by_expert = [c for c in cands if c.get("SPLIT_E")]
        assert all(c["SPLIT_K"] > 1 for c in by_expert)
        flat = [c for c in cands if c.get("SPLIT_K", 1) > 1 and not c.get("SPLIT_E")]
        def without_split_e(c):
            return sorted((k, v) for k, v in c.items() if k != "SPLIT_E")

        assert sorted(map(without_split_e, flat)) == sorted(map(without_split_e, by_expert))
        if T == 8:
            assert by_expert, "decode sizes: split candidates expected"
        if not tm.use_small_kernel(T * K, K):
            assert not by_expert and not flat
    # its compile workers each hold one shape's tensors: as many as fit the GPU's free memory
    jobs = [(name, T, "op", {}) for name in tune.SPECS for T in (1, 16384)]
    phimoe = 2 * (16 * 3 * 6400 * 4096 + 2 * 32768 * 2 * 6400 + 32768 * 4096) + (1 << 29)
    assert tune.job_bytes("phimoe", 16384) == phimoe == max(tune.job_bytes(n, T) for n, T, _, _ in jobs)
    gb = 1 << 30
    assert tune.workers_that_fit(jobs, 15, 79 * gb) == int(0.75 * 79 * gb) // (phimoe * 5 // 4) < 15
    assert tune.workers_that_fit(jobs, 12, 140 * gb) == 12
    assert tune.workers_that_fit(jobs, 12, gb) == 1
