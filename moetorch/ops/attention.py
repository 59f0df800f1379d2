"""Attention backends (eager, sdpa, flash_attention_2) and mask construction.

Legend: B batch, H query heads, G kv heads, T queries, S keys, d head_dim.
`kv_layout` says which kv head a query head reads: "grouped" (head i -> i // (H/G), GQA as in
Llama/PhiMoE) or "tiled" (head i -> i % G, JetMoE's MoA). No backend repeats K/V in memory except
eager, which must return the full attention weights anyway, and a masked sdpa call on a torch
whose fused kernels take no grouped heads with a mask (`masked_gqa_served`).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..utils import warn_once
from . import fused
from .host import to_device
from .rope import apply_rotary

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


@dataclass(frozen=True, eq=False)
class Packed:
    """Sequences packed along the token axis of one row (B = 1), given to `attention` as its mask.

    Sequence i has queries `cu_q[i] .. cu_q[i + 1] - 1` and keys `cu_k[i] .. cu_k[i + 1] - 1`, and
    its queries are the last of its keys: query t sees key j of its own sequence when j <= t
    (counted from the sequence's end, so that keys before the queries are a cached prefix) and,
    with `window`, t - j < window. `cu_q` / `cu_k` are int32 on the device; `lens_q` / `lens_k`
    are the lengths on the host (the per-sequence path), `max_q` / `max_k` bounds on them (the
    varlen kernel's grid), and `rope_len` the longest sequence's keys (LongRoPE's factor set).

    `Packed.static` makes one for a CUDA graph: offsets in buffers that each replay reads (empty
    sequences allowed), no host lengths, bounds fixed at capture."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    lens_q: tuple[int, ...] | None
    lens_k: tuple[int, ...] | None
    window: int | None = None
    max_q: int = 0
    max_k: int = 0
    rope_len: int = 0

    @classmethod
    def of(cls, lens_q, lens_k, device: torch.device, window: int | None = None) -> Packed:
        lens_q, lens_k = tuple(lens_q), tuple(lens_k)
        if not lens_q or len(lens_q) != len(lens_k) or any(q < 1 or k < q for q, k in zip(lens_q, lens_k)):
            raise ValueError(f"Packed: every sequence needs 1 <= queries <= keys, got {lens_q} and {lens_k}")
        offsets = to_device(cls.offsets(lens_q, lens_k), device)
        return cls(offsets[0], offsets[1], lens_q, lens_k, window, max(lens_q), max(lens_k), max(lens_k))

    @staticmethod
    def offsets(lens_q, lens_k, sequences: int | None = None) -> torch.Tensor:
        """The host offsets [2, n + 1] int32 (rows `cu_q`, `cu_k`, each contiguous) of sequences
        of `lens_q` queries and `lens_k` keys; with `sequences`, empty ones after them up to that
        many (a graph's fixed shape)."""
        cu = torch.tensor([[0, *lens_q], [0, *lens_k]]).cumsum(1, dtype=torch.int32)
        if sequences is not None:
            cu = torch.cat([cu, cu[:, -1:].expand(2, sequences + 1 - cu.shape[1])], dim=1)
        return cu

    @classmethod
    def static(cls, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int, rope_len: int,
               window: int | None = None) -> Packed:
        """Offsets that a graph replay reads from `cu_q` / `cu_k` (int32, contiguous, one shape):
        every sequence within `max_q` queries and `max_k` keys. Only the varlen kernel serves it."""
        for name, cu in (("cu_q", cu_q), ("cu_k", cu_k)):
            if cu.dtype != torch.int32 or cu.dim() != 1 or not cu.is_contiguous():
                raise ValueError(f"Packed.static: {name} must be a contiguous 1D int32 tensor")
        return cls(cu_q, cu_k, None, None, window, max_q, max_k, rope_len)


@dataclass(eq=False)
class Mixed:
    """Packed sequences, then one decode token for each of the first `rows` rows of a static cache,
    in one forward (continuous batching's prompt chunk with a decode step riding along), given to
    `attention` as its mask. The first `tokens` queries attend as `packed` says, over the keys and
    values that the cache's update returns; query `tokens + b` attends row b's keys and values,
    which `kv()` gives for the layer in progress ([rows, G, S, d]), under `decode_mask` [rows, 1,
    1, S] (bool, True = attend), as a decode step does."""

    packed: Packed
    tokens: int
    rows: int
    decode_mask: torch.Tensor
    kv: object  # () -> (keys, values) of the rows, the layer in progress

    @property
    def rope_len(self) -> int:
        return self.packed.rope_len


def _mixed_attention(q_BHTd, k_BGSd, v_BGSd, mixed: Mixed, scale: float, impl: str, kv_layout: str,
                     rope_q) -> torch.Tensor:
    """`attention` over a `Mixed` forward: the packed queries over the packed keys, the decode
    queries each over its row of the cache; out [1, tokens + rows, H, d]."""
    n = mixed.tokens
    if q_BHTd.shape[0] != 1 or q_BHTd.shape[2] != n + mixed.rows:
        raise ValueError(f"a Mixed forward runs one row of {n} packed + {mixed.rows} decode tokens, got queries of "
                         f"shape {tuple(q_BHTd.shape)}")
    rope_packed = rope_rows = None
    if rope_q is not None:  # (cos, sin) [1, T, d]: the decode tokens' as [rows, 1, d]
        rope_packed = tuple(t[:, :n] for t in rope_q)
        rope_rows = tuple(t[0, n:, None] for t in rope_q)
    out_packed, _ = attention(q_BHTd[:, :, :n], k_BGSd, v_BGSd, mixed.packed, True, scale, impl,
                              kv_layout=kv_layout, rope_q=rope_packed)
    k_rows, v_rows = mixed.kv()
    out_rows, _ = attention(q_BHTd[0, :, n:, None].transpose(0, 1), k_rows, v_rows, mixed.decode_mask, False,
                            scale, impl, kv_layout=kv_layout, rope_q=rope_rows)
    return torch.cat([out_packed, out_rows.transpose(0, 1)], dim=1)


def token_runs(mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(first real token [B], real tokens [B]) of a host bool mask [B, T] whose rows each hold
    their real tokens in one run (left or right padding, or both; an empty row counts 0 tokens);
    None if a row's real tokens have a gap."""
    lengths = mask_BT.sum(1)
    starts = mask_BT.int().argmax(1)
    t = torch.arange(mask_BT.shape[1])[None] - starts[:, None]
    return (starts, lengths) if torch.equal(mask_BT, (t >= 0) & (t < lengths[:, None])) else None


@functools.cache
def _ampere_or_later(device_index: int | None) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 8


def varlen_kernel_serves(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether torch's varlen flash-attention kernel runs packed attention here: a GPU of sm80 or
    later, bf16 or fp16, a head size that is a multiple of 8 up to 256, sdpa's flash kernel on."""
    return (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and head_dim % 8 == 0
            and head_dim <= 256 and torch.backends.cuda.flash_sdp_enabled() and _ampere_or_later(device.index))


def packed_attention(q_NHd: torch.Tensor, k_NGd: torch.Tensor, v_NGd: torch.Tensor, packed: Packed,
                     scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of packed sequences (see `Packed`): queries [N, H, d], keys and values [Nk, G, d]
    (query head h reads kv head h // (H/G)); returns [N, H, d]. On a GPU in bf16 or fp16, one
    varlen flash-attention kernel; else each sequence through sdpa. Both have a backward. Under
    autocast the inputs take autocast's dtype first, as sdpa's do."""
    device = q_NHd.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        q_NHd, k_NGd, v_NGd = (t.to(dtype) for t in (q_NHd, k_NGd, v_NGd))
    d = q_NHd.shape[-1]
    flash = varlen_kernel_serves(q_NHd.device, q_NHd.dtype, d)
    if packed.lens_q is None:
        if not flash:
            raise ValueError("a static Packed (no host lengths) needs the varlen flash kernel: a GPU of sm80 or "
                             f"later, bf16 or fp16 and head_dim a multiple of 8 up to 256 (got {q_NHd.device}, "
                             f"{q_NHd.dtype}, head_dim {d})")
    else:
        n, L = len(packed.lens_q), packed.lens_q[0]
        whole = L * n == q_NHd.shape[0] == k_NGd.shape[0]  # no padding beyond the sequences
        if packed.window is None and packed.lens_k == packed.lens_q == (L,) * n and whole:
            # sequences of one length, no prefixes: a batch of them through sdpa's causal kernel (on
            # the H200, cuDNN's: about twice the varlen flash kernel's rate)
            q, k, v = (t.unflatten(0, (n, L)).transpose(1, 2) for t in (q_NHd, k_NGd, v_NGd))
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale,
                                                 enable_gqa=k.shape[1] != q.shape[1])
            return out.transpose(1, 2).reshape(q_NHd.shape)
    if flash:
        window = {} if packed.window is None else {"window_size_left": packed.window - 1, "window_size_right": 0}
        return torch.ops.aten._flash_attention_forward(
            q_NHd, k_NGd, v_NGd, packed.cu_q, packed.cu_k, packed.max_q, packed.max_k, dropout_p, True,
            False, scale=scale, **window,
        )[0]
    out = torch.empty_like(q_NHd)
    q0 = k0 = 0
    for Lq, Lk in zip(packed.lens_q, packed.lens_k):
        q = q_NHd[q0:q0 + Lq].transpose(0, 1)[None]
        k, v = k_NGd[k0:k0 + Lk].transpose(0, 1)[None], v_NGd[k0:k0 + Lk].transpose(0, 1)[None]
        mask = None
        if Lq != Lk or packed.window is not None:
            q_pos = torch.arange(Lk - Lq, Lk, device=q.device)[:, None]
            k_pos = torch.arange(Lk, device=q.device)[None]
            mask = k_pos <= q_pos
            if packed.window is not None:
                mask = mask & (k_pos > q_pos - packed.window)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None,
                                           scale=scale, enable_gqa=k.shape[1] != q.shape[1])
        out[q0:q0 + Lq] = o[0].transpose(0, 1)
        q0, k0 = q0 + Lq, k0 + Lk
    return out


def check_attn_implementation(impl: str | Mapping[str, str | None] | None) -> str:
    """The implementation a model runs for `attn_implementation`, as Transformers takes it: a name,
    or a dict by sub-config whose "" entry is the model's; None is sdpa. "flex_attention" runs
    sdpa (the same function), with a warning once."""
    if isinstance(impl, Mapping):
        impl = impl.get("")
    impl = impl or "sdpa"
    if impl == "flex_attention":
        warn_once("flex_attention", "attn_implementation='flex_attention': moetorch runs its own sdpa attention "
                  "for it (the same function; it has no flex-attention kernels)")
        impl = "sdpa"
    if impl not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {impl!r}")
    if impl == "flash_attention_2" and not flash_attn_available():
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the `flash-attn` package and a CUDA GPU; "
            "use 'sdpa' (the default) otherwise"
        )
    return impl


def build_mask(
    attention_mask: torch.Tensor | None,
    cache_position_T: torch.Tensor,
    kv_len: int,
    sliding_window: int | None,
    batch: int,
    queries_at_end: bool = True,
    segments_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """Boolean mask [B, 1, T, S] (True = attend), or None with `is_causal` when no mask is needed.

    Key slot j is visible to query slot q when j <= q, q - j < sliding_window, and the 2D
    `attention_mask` (covering all S slots) is 1 at j. Built on device with no host sync.
    `queries_at_end` says the T queries are the last T of the S slots (a dynamic cache).
    `segments_BT` (no cache: S = T): the packed sequence of each token; a query sees its own only.
    """
    T = cache_position_T.shape[0]
    if segments_BT is not None:
        causal, _ = build_mask(attention_mask, cache_position_T, kv_len, sliding_window, batch, queries_at_end)
        if causal is None:
            causal = torch.ones(T, kv_len, dtype=torch.bool, device=cache_position_T.device).tril()[None, None]
        elif causal.is_floating_point():  # an additive 4D mask: its masked places (a large negative value)
            causal = causal > torch.finfo(causal.dtype).min / 2
        return causal & (segments_BT[:, None, :, None] == segments_BT[:, None, None, :]), False
    if attention_mask is not None and attention_mask.dim() == 4:
        # as Transformers takes a 4D mask: boolean (or integer) True attends; float is added to the
        # scores (0 attends, a large negative value masks)
        m = attention_mask
        return (m if m.dtype == torch.bool or m.is_floating_point() else m.bool()), False
    if attention_mask is None and sliding_window is None:
        if kv_len == T:
            return None, True
        if T == 1 and queries_at_end:
            return None, False
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be 2D [batch, seq] or 4D, got shape {tuple(attention_mask.shape)}")
    device = cache_position_T.device
    same_device = attention_mask is None or attention_mask.device == device
    if fused.STEP_INPUT_KERNELS and fused.serves(device) and same_device:
        # the torch ops below in one kernel (the same mask)
        return fused.kernels().causal_mask(attention_mask, cache_position_T, kv_len, sliding_window, batch), False
    kv_S = torch.arange(kv_len, device=device)
    q_T1 = cache_position_T[:, None]
    allowed_TS = kv_S[None, :] <= q_T1
    if sliding_window is not None:
        allowed_TS = allowed_TS & (kv_S[None, :] > q_T1 - sliding_window)
    mask = allowed_TS[None, None].expand(batch, 1, T, kv_len)
    if attention_mask is not None:
        pad_BS = attention_mask.bool()
        if pad_BS.shape[-1] < kv_len:  # a static cache is longer than the mask: unseen slots are masked anyway
            pad_BS = F.pad(pad_BS, (0, kv_len - pad_BS.shape[-1]), value=True)
        mask = mask & pad_BS[:, None, None, :kv_len]
    return mask, False


def _to_grouped(q_BHTd: torch.Tensor, groups: int) -> torch.Tensor:
    """Reorder tiled query heads (i -> kv i % G) so that kv head of new head j is j // (H/G)."""
    B, H, T, d = q_BHTd.shape
    return q_BHTd.view(B, H // groups, groups, T, d).transpose(1, 2).reshape(B, H, T, d)


def _from_grouped(o_BHTd: torch.Tensor, groups: int) -> torch.Tensor:
    B, H, T, d = o_BHTd.shape
    return o_BHTd.view(B, groups, H // groups, T, d).transpose(1, 2).reshape(B, H, T, d)


def attention(
    q_BHTd: torch.Tensor,
    k_BGSd: torch.Tensor,
    v_BGSd: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    impl: str = "sdpa",
    dropout_p: float = 0.0,
    kv_layout: str = "grouped",
    need_weights: bool = False,
    rope_q: tuple[torch.Tensor, torch.Tensor] | None = None,
    kv_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention; returns (out [B, T, H, d], weights [B, H, T, S] where
    `need_weights`, else None).

    `need_weights` forces the eager path, the only one that materialises the weights. One query
    per row (decode) at inference runs the fused decode kernel, which reads the cache in place.
    `rope_q` = (cos, sin [B or 1, T, d]): the queries are not yet rotated; the decode kernel rotates
    them as it loads them, every other path first (`ops.rope.apply_rotary`). With the tiled layout
    the sdpa / flash kernels read the query heads in the grouped order; at inference one kernel
    rotates and reorders them, and one copy brings the output back to the tiled order.
    `kv_rows` [B, S] (a cache's `slot_rows`): key and value slot s of row b are in row kv_rows[b, s]
    of k and v; the decode kernel reads them there, the other paths gather them first.
    `mask` a `Packed`: sequences packed along the B x T tokens taken in order (`packed_attention`),
    whatever `impl` says; a `Mixed`: packed sequences, then decode tokens over a cache's rows.
    """
    if isinstance(mask, Mixed):
        if need_weights or kv_rows is not None or dropout_p:
            raise ValueError("attention over a Mixed forward returns no weights, takes no kv_rows and no dropout")
        return _mixed_attention(q_BHTd, k_BGSd, v_BGSd, mask, scale, impl, kv_layout, rope_q), None
    G = k_BGSd.shape[1]
    packed = mask if isinstance(mask, Packed) else None
    if packed is not None and (need_weights or kv_rows is not None):
        raise ValueError("attention over packed sequences returns no weights and takes no kv_rows")
    if kv_rows is not None and kv_rows.shape != (k_BGSd.shape[0], k_BGSd.shape[2]):
        raise ValueError(f"kv_rows must be [batch, keys] = {(k_BGSd.shape[0], k_BGSd.shape[2])}, "
                         f"got {tuple(kv_rows.shape)}")
    if packed is None and _decode_fusable(q_BHTd, k_BGSd, v_BGSd, mask, is_causal, impl, dropout_p, need_weights):
        if rope_q is None or fused.active(q_BHTd, *rope_q):
            out = fused.kernels().decode_attention(
                q_BHTd, k_BGSd, v_BGSd, mask, scale, kv_layout == "tiled", rope_q=rope_q, kv_rows=kv_rows
            )
            return out, None
    if kv_rows is not None:
        k_BGSd, v_BGSd = gather_slot_rows(k_BGSd, kv_rows), gather_slot_rows(v_BGSd, kv_rows)
    if dropout_p and kv_layout == "tiled" and G > 1 and packed is None:
        # dropout draws its mask over the query heads in their order: keep the tiled order, with the
        # keys and values repeated to it (query head h reads kv head h % G), as Transformers draws it
        H = q_BHTd.shape[1]
        k_BGSd, v_BGSd = (t.repeat(1, H // G, 1, 1) for t in (k_BGSd, v_BGSd))
        G, kv_layout = H, "grouped"
    tiled = kv_layout == "tiled" and G > 1
    if rope_q is not None and tiled and q_BHTd.shape[-1] % 2 == 0 and fused.active(q_BHTd, *rope_q):
        # one kernel rotates the queries and writes them in the grouped head order
        q_BHTd = fused.kernels().rope_qk(q_BHTd, None, *rope_q, q_groups=G)[0]
    else:
        if rope_q is not None:
            q_BHTd = apply_rotary(q_BHTd, *rope_q)
        if tiled:
            q_BHTd = _to_grouped(q_BHTd, G)
    if packed is not None:
        B, H, T, d = q_BHTd.shape
        out = packed_attention(*(t.transpose(1, 2).reshape(-1, t.shape[1], d) for t in (q_BHTd, k_BGSd, v_BGSd)),
                               packed, scale, dropout_p).view(B, T, H, d).transpose(1, 2)
        weights = None
    elif need_weights or impl == "eager":
        # weights returned with the tiled layout: _eager gives them in the tiled order, the tensor the
        # output is computed from (so that a gradient reaches them, as Transformers' do)
        # (standing in for sdpa to return the weights, a float64 softmax stays float64, as sdpa computes it)
        out, weights = _eager(q_BHTd, k_BGSd, v_BGSd, mask, is_causal, scale, dropout_p,
                              tiled_groups=G if tiled and need_weights else 1, as_sdpa=impl != "eager")
        weights = weights if need_weights else None
    elif impl == "flash_attention_2" and mask is None:
        out, weights = _flash(q_BHTd, k_BGSd, v_BGSd, is_causal, scale, dropout_p), None
    else:
        H = q_BHTd.shape[1]
        if G != H and mask is not None and not masked_gqa_served(q_BHTd, k_BGSd, v_BGSd, mask, dropout_p):
            # this torch would take the math kernel, which holds [B, H, T, S] for the backward
            k_BGSd, v_BGSd = (t.repeat_interleave(H // G, dim=1) for t in (k_BGSd, v_BGSd))
        if mask is not None and mask.is_floating_point() and mask.dtype != q_BHTd.dtype:
            mask = mask.to(q_BHTd.dtype)  # (sdpa adds a float mask of the queries' dtype)
        out = F.scaled_dot_product_attention(
            q_BHTd, k_BGSd, v_BGSd, attn_mask=mask, dropout_p=dropout_p,
            is_causal=is_causal and mask is None, scale=scale, enable_gqa=k_BGSd.shape[1] != H,
        )
        weights = None
    if tiled:
        # back to the tiled head order, as [B, T, H, d] in its own memory: one copy
        if fused.active(out):
            out = fused.kernels().tiled_heads(out.transpose(1, 2), G)
        else:
            B, H, T, d = out.shape
            out = out.transpose(1, 2).unflatten(2, (G, H // G)).transpose(2, 3).reshape(B, T, H, d)
        return out, weights
    return out.transpose(1, 2), weights


def masked_gqa_served(q_BHTd: torch.Tensor, k_BGSd: torch.Tensor, v_BGSd: torch.Tensor, mask: torch.Tensor,
                      dropout_p: float) -> bool:
    """Whether sdpa serves a masked call with `enable_gqa` by a fused kernel on this torch and GPU.
    Where it would not (older torch: the fused kernels took no grouped heads with a mask), the math
    kernel would run, so `attention` repeats the kv heads instead, as Transformers does on CUDA.
    Off CUDA, sdpa handles grouped heads itself."""
    if not q_BHTd.is_cuda:
        return True
    backends = torch.backends.cuda
    params = backends.SDPAParams(q_BHTd, k_BGSd, v_BGSd, mask, dropout_p, False, True)
    return backends.can_use_efficient_attention(params) or backends.can_use_cudnn_attention(params)


def gather_slot_rows(x_BGSd: torch.Tensor, rows_BS: torch.Tensor) -> torch.Tensor:
    """x[rows[b, s], :, s] at [b, :, s]: each row's keys (or values) gathered from the rows that
    hold them (a copy)."""
    slots = torch.arange(x_BGSd.shape[2], device=x_BGSd.device)
    return x_BGSd[rows_BS, :, slots].permute(0, 2, 1, 3)


def _decode_fusable(q, k, v, mask, is_causal, impl, dropout_p, need_weights) -> bool:
    if q.shape[2] != 1 or need_weights or impl == "eager" or dropout_p > 0:
        return False
    if is_causal and mask is None and k.shape[2] != 1:  # sdpa's top-left causal: not a decode step
        return False
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1):
        return False
    return q.shape[1] % k.shape[1] == 0 and fused.active(q, k, v)


def _eager(q, k, v, mask, is_causal, scale, dropout_p, tiled_groups: int = 1, as_sdpa: bool = False):
    """(out, weights) with the query heads in the grouped order. `tiled_groups` > 1: the weights are
    returned in the tiled head order (`_from_grouped`), and the output is computed from that tensor,
    brought back to the grouped order: the same numbers, and the returned weights are in the graph.
    The softmax runs in float32, as Transformers' eager attention (float64 inputs too, unless
    `as_sdpa`: then in float64, as sdpa)."""
    H, G = q.shape[1], k.shape[1]
    k = k.repeat_interleave(H // G, dim=1)
    v = v.repeat_interleave(H // G, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    softmax_dtype = scores.dtype if as_sdpa and scores.dtype == torch.float64 else torch.float32
    if is_causal and mask is None:
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None and mask.is_floating_point():  # an additive mask, as given
        scores = scores + mask.to(scores.dtype)
    elif mask is not None:
        # Add the dtype's minimum rather than -inf, as Transformers does: a fully masked (padding)
        # row stays finite and uniform, and its gradient is the same as Transformers'. (Float64
        # scores under a float32 softmax take float32's minimum: float64's would be -inf there,
        # and a fully masked row nan, as Transformers' eager attention gives it.)
        lowest = max(torch.finfo(scores.dtype).min, torch.finfo(softmax_dtype).min)
        scores = scores + torch.where(mask, scores.new_zeros(()), lowest)
    weights = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(q.dtype)
    weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)
    if tiled_groups > 1:
        weights = _from_grouped(weights, tiled_groups)
        return torch.matmul(_to_grouped(weights, tiled_groups), v), weights
    return torch.matmul(weights, v), weights


def _flash(q, k, v, is_causal, scale, dropout_p):
    from flash_attn import flash_attn_func

    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        dropout_p=dropout_p, softmax_scale=scale, causal=is_causal,
    )
    return out.transpose(1, 2)
