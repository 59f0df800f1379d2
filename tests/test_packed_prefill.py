"""Sequences packed in one row: `ops.attention.Packed` / `packed_attention`, and `cache.PackedRows`,
which continuous batching's prefill runs on (its results against Transformers are in
test_batching.py and test_prefix_sharing.py). References here are written out with explicit
loops in float64."""

from __future__ import annotations

import random

import pytest
import torch

from moetorch.cache import PackedRows, StaticCache
from moetorch.ops import fused
from moetorch.ops.attention import Packed, attention, packed_attention

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def reference(q_NHd, k_NGd, v_NGd, lens_q, lens_k, scale, window=None, tiled=False):
    """Each sequence's attention, query by query: query t (the last Lq of Lk positions) sees key j
    when j <= t and, with a window, t - j < window; head h reads kv head h // (H/G) (grouped) or
    h % G (tiled)."""
    H, G = q_NHd.shape[1], k_NGd.shape[1]
    out = torch.zeros(q_NHd.shape, dtype=torch.float64)
    q0 = k0 = 0
    for Lq, Lk in zip(lens_q, lens_k):
        for i in range(Lq):
            t = Lk - Lq + i
            seen = [j for j in range(Lk) if j <= t and (window is None or t - j < window)]
            for h in range(H):
                g = h % G if tiled else h // (H // G)
                keys = k_NGd[[k0 + j for j in seen], g].double()
                weights = torch.softmax(keys @ q_NHd[q0 + i, h].double() * scale, 0)
                out[q0 + i, h] = weights @ v_NGd[[k0 + j for j in seen], g].double()
        q0, k0 = q0 + Lq, k0 + Lk
    return out


def random_lengths(rng: random.Random, n: int) -> tuple[list[int], list[int]]:
    lens_q = [rng.choice([1, rng.randint(1, 9)]) for _ in range(n)]
    return lens_q, [q + rng.choice([0, 0, rng.randint(1, 7)]) for q in lens_q]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window", [None, 3])
def test_packed_attention_against_loops(seed, window):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    H, G, d = rng.choice([(4, 2), (4, 4), (6, 2), (4, 1)]) + (8,)
    lens_q, lens_k = random_lengths(rng, rng.randint(1, 5))
    q = torch.randn(sum(lens_q), H, d)
    k, v = torch.randn(sum(lens_k), G, d), torch.randn(sum(lens_k), G, d)
    packed = Packed.of(lens_q, lens_k, q.device, window)
    got = packed_attention(q, k, v, packed, 0.3)
    torch.testing.assert_close(got.double(), reference(q, k, v, lens_q, lens_k, 0.3, window), atol=1e-5, rtol=1e-5)
    assert packed.cu_q.tolist() == [0, *torch.tensor(lens_q).cumsum(0).tolist()]
    assert packed.cu_k.tolist() == [0, *torch.tensor(lens_k).cumsum(0).tolist()]
    for cu in (packed.cu_q, packed.cu_k):  # as the flash kernel takes them
        assert cu.dtype == torch.int32 and cu.is_contiguous()


@pytest.mark.parametrize("n, L", [(1, 7), (3, 5), (2, 1)])
def test_packed_attention_of_equal_lengths(n, L):
    """Sequences of one length without prefixes (sdpa's causal kernel over them as a batch)."""
    torch.manual_seed(n * 10 + L)
    q, k, v = torch.randn(n * L, 4, 8), torch.randn(n * L, 2, 8), torch.randn(n * L, 2, 8)
    k = k.transpose(0, 1).contiguous().transpose(0, 1)  # strided, as the projections give them
    got = packed_attention(q, k, v, Packed.of([L] * n, [L] * n, q.device), 0.4)
    torch.testing.assert_close(got.double(), reference(q, k, v, [L] * n, [L] * n, 0.4), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tiled", [False, True])
def test_attention_takes_packed_sequences_as_its_mask(tiled):
    """`attention` with a `Packed` mask in the models' layouts ([1, H, N, d] queries, [1, G, Nk, d]
    keys, JetMoE's tiled heads with unrotated queries) equals the loops; its output is [1, N, H, d]."""
    torch.manual_seed(5)
    H, G, d = 6, 3, 8
    lens_q, lens_k = [3, 1, 5], [3, 4, 9]
    q = torch.randn(1, H, sum(lens_q), d)
    k, v = torch.randn(1, G, sum(lens_k), d), torch.randn(1, G, sum(lens_k), d)
    packed = Packed.of(lens_q, lens_k, q.device)
    rope_q = None
    if tiled:  # queries rotated by the attention: compare with the reference over rotated queries
        angle = torch.randn(1, sum(lens_q), d // 2)
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
        rope_q = (cos, sin)
        half = torch.cat([-q[..., d // 2:], q[..., :d // 2]], -1)
        rotated = q * cos[:, None] + half * sin[:, None]
    else:
        rotated = q
    out, weights = attention(q, k, v, packed, True, 0.5, kv_layout="tiled" if tiled else "grouped", rope_q=rope_q)
    want = reference(rotated[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), lens_q, lens_k, 0.5,
                     tiled=tiled)
    assert weights is None and out.shape == (1, sum(lens_q), H, d)
    torch.testing.assert_close(out[0].double(), want, atol=1e-5, rtol=1e-5)


def test_packed_bad_input():
    with pytest.raises(ValueError, match="queries <= keys"):
        Packed.of([3], [2], torch.device("cpu"))
    with pytest.raises(ValueError, match="queries <= keys"):
        Packed.of([0], [2], torch.device("cpu"))
    with pytest.raises(ValueError, match="queries <= keys"):
        Packed.of([1, 2], [2], torch.device("cpu"))
    packed = Packed.of([2], [2], torch.device("cpu"))
    q, kv = torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4)
    with pytest.raises(ValueError, match="no weights"):
        attention(q, kv, kv, packed, True, 1.0, need_weights=True)
    with pytest.raises(ValueError, match="no kv_rows"):
        attention(q, kv, kv, packed, True, 1.0, kv_rows=torch.zeros(1, 2, dtype=torch.long))


def filled_cache(B=4, G=2, S=12, d=4, layers=2, seed=0, dtype=torch.float32) -> StaticCache:
    torch.manual_seed(seed)
    cache = StaticCache(max_cache_len=S, num_layers=layers)
    cache._allocate(B, G, d, torch.device("cpu"), dtype)
    for t in cache._all:
        t.copy_(torch.randn_like(t))
    return cache


@pytest.mark.parametrize("shares", [True, False])
@pytest.mark.parametrize("key_major", [False, True])
@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_rows_write_and_read_their_slots(shares, key_major, kernels, dtype):
    """Each sequence's keys and values (its prefix from a row, then its new tokens) land in its row
    at its slots, come back in that order for the attention, and nothing else of the cache moves.
    One sequence moves its prefix within its own row (read before written). The copy kernels
    (`triton_fused.pack_keys` / `place_keys`, under the interpreter) move the same bits as the
    torch indexing."""
    cache = filled_cache(d=8, dtype=dtype)
    before = [t.clone() for t in cache._all]
    rows, starts, new = [1, 2, 3], [4, 0, 5], [3, 2, 4]
    # row 3 reads slots 2..4 and writes 5..11
    shared = [(0, 6, 2), (0, 0, 0), (3, 2, 3)] if shares else [(0, 0, 0)] * 3
    packed = PackedRows(cache, rows, starts, new, shared)
    assert packed.packed.lens_q == (3, 2, 4)
    assert packed.packed.lens_k == ((5, 2, 7) if shares else (3, 2, 4))
    N, G, d = sum(new), 2, 8
    for layer in range(2):
        if key_major:  # the projections' layout: [1, N, G, d] in memory
            k_new, v_new = (torch.randn(1, N, G, d).to(dtype).transpose(1, 2) for _ in range(2))
        else:
            k_new, v_new = torch.randn(1, G, N, d).to(dtype), torch.randn(1, G, N, d).to(dtype)
        with fused.forced(kernels):
            k_all, v_all = packed.update(k_new, v_new, layer)
        for got_all, new_t, old, store in ((k_all, k_new, before[0][layer], cache.keys[layer]),
                                           (v_all, v_new, before[1][layer], cache.values[layer])):
            want_all, want_store, n0 = [], old.clone(), 0
            for row, start, n, (src, first, p) in zip(rows, starts, new, shared):
                seq = torch.cat([old[src, :, first:first + p], new_t[0, :, n0:n0 + n]], dim=1)
                want_all.append(seq)
                want_store[row, :, start:start + p + n] = seq
                n0 += n
            torch.testing.assert_close(got_all[0], torch.cat(want_all, dim=1), atol=0, rtol=0)
            torch.testing.assert_close(store, want_store, atol=0, rtol=0)
    assert packed.get_seq_length() == 0 and packed.slot_rows is None and not packed.records_inputs


def test_packed_rows_bad_input():
    cache = filled_cache()
    with pytest.raises(ValueError, match="one entry per sequence"):
        PackedRows(cache, [1, 2], [0], [3, 3])
    with pytest.raises(ValueError, match="within the 12"):
        PackedRows(cache, [1], [10], [3])
    with pytest.raises(ValueError, match="within the 12"):
        PackedRows(cache, [1], [8], [2], [(0, 0, 3)])
    with pytest.raises(ValueError, match="a new token"):
        PackedRows(cache, [1], [0], [0])


def test_place_keys_needs_a_store_with_contiguous_rows():
    """`place_keys` writes in place, so a store whose last dimension is strided (which a copy would
    hide) is an error that names it."""
    from moetorch.ops import triton_fused

    store = torch.zeros(2, 2, 8, 4).transpose(2, 3)  # [B, G, d, S] memory
    with pytest.raises(ValueError, match="store's last dimension must be contiguous"):
        triton_fused.place_keys(torch.zeros(1, 2, 8), store, torch.zeros(1, dtype=torch.long),
                                torch.zeros(1, dtype=torch.long))
