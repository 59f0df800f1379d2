"""Attention backends (eager, sdpa, flash_attention_2) and mask construction.

Legend: B batch, H query heads, G kv heads, T queries, S keys, d head_dim.
`kv_layout` says which kv head a query head reads: "grouped" (head i -> i // (H/G), GQA as in
Llama/PhiMoE) or "tiled" (head i -> i % G, JetMoE's MoA). No backend repeats K/V in memory except
eager, which must return the full attention weights anyway.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from . import fused
from .rope import apply_rotary

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def check_attn_implementation(impl: str | None) -> str:
    impl = impl or "sdpa"
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
        return causal & (segments_BT[:, None, :, None] == segments_BT[:, None, None, :]), False
    if attention_mask is not None and attention_mask.dim() == 4:
        m = attention_mask
        if m.dtype != torch.bool:
            m = m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m.bool()
        return m, False
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
    """Scaled dot-product attention; returns (out [B, T, H, d], weights [B, H, T, S] or None).

    `need_weights` forces the eager path, the only one that materialises the weights. One query
    per row (decode) at inference runs the fused decode kernel, which reads the cache in place.
    `rope_q` = (cos, sin [B or 1, T, d]): the queries are not yet rotated; the decode kernel rotates
    them as it loads them, every other path first (`ops.rope.apply_rotary`). With the tiled layout
    the sdpa / flash kernels read the query heads in the grouped order; at inference one kernel
    rotates and reorders them, and one copy brings the output back to the tiled order.
    `kv_rows` [B, S] (a cache's `slot_rows`): key and value slot s of row b are in row kv_rows[b, s]
    of k and v; the decode kernel reads them there, the other paths gather them first.
    """
    G = k_BGSd.shape[1]
    if kv_rows is not None and kv_rows.shape != (k_BGSd.shape[0], k_BGSd.shape[2]):
        raise ValueError(f"kv_rows must be [batch, keys] = {(k_BGSd.shape[0], k_BGSd.shape[2])}, "
                         f"got {tuple(kv_rows.shape)}")
    if _decode_fusable(q_BHTd, k_BGSd, v_BGSd, mask, is_causal, impl, dropout_p, need_weights):
        if rope_q is None or fused.active(q_BHTd, *rope_q):
            out = fused.kernels().decode_attention(
                q_BHTd, k_BGSd, v_BGSd, mask, scale, kv_layout == "tiled", rope_q=rope_q, kv_rows=kv_rows
            )
            return out, None
    if kv_rows is not None:
        k_BGSd, v_BGSd = gather_slot_rows(k_BGSd, kv_rows), gather_slot_rows(v_BGSd, kv_rows)
    tiled = kv_layout == "tiled" and G > 1
    if rope_q is not None and tiled and q_BHTd.shape[-1] % 2 == 0 and fused.active(q_BHTd, *rope_q):
        # one kernel rotates the queries and writes them in the grouped head order
        q_BHTd = fused.kernels().rope_qk(q_BHTd, None, *rope_q, q_groups=G)[0]
    else:
        if rope_q is not None:
            q_BHTd = apply_rotary(q_BHTd, *rope_q)
        if tiled:
            q_BHTd = _to_grouped(q_BHTd, G)
    if need_weights or impl == "eager":
        out, weights = _eager(q_BHTd, k_BGSd, v_BGSd, mask, is_causal, scale, dropout_p)
    elif impl == "flash_attention_2" and mask is None:
        out, weights = _flash(q_BHTd, k_BGSd, v_BGSd, is_causal, scale, dropout_p), None
    else:
        out = F.scaled_dot_product_attention(
            q_BHTd, k_BGSd, v_BGSd, attn_mask=mask, dropout_p=dropout_p,
            is_causal=is_causal and mask is None, scale=scale, enable_gqa=G != q_BHTd.shape[1],
        )
        weights = None
    if tiled:
        # back to the tiled head order, as [B, T, H, d] in its own memory: one copy
        if fused.active(out):
            out = fused.kernels().tiled_heads(out.transpose(1, 2), G)
        else:
            B, H, T, d = out.shape
            out = out.transpose(1, 2).unflatten(2, (G, H // G)).transpose(2, 3).reshape(B, T, H, d)
        return out, (_from_grouped(weights, G) if weights is not None else None)
    return out.transpose(1, 2), weights


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


def _eager(q, k, v, mask, is_causal, scale, dropout_p):
    H, G = q.shape[1], k.shape[1]
    k = k.repeat_interleave(H // G, dim=1)
    v = v.repeat_interleave(H // G, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if is_causal and mask is None:
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        # Add the dtype's minimum rather than -inf, as Transformers does: a fully masked (padding)
        # row stays finite and uniform, and its gradient is the same as Transformers'.
        scores = scores + torch.where(mask, 0.0, torch.finfo(scores.dtype).min).to(scores.dtype)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)
    return torch.matmul(weights, v), weights


def _flash(q, k, v, is_causal, scale, dropout_p):
    from flash_attn import flash_attn_func

    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        dropout_p=dropout_p, softmax_scale=scale, causal=is_causal,
    )
    return out.transpose(1, 2)
