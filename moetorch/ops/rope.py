"""Rotary position embeddings: plain RoPE, the scaled kinds of Transformers' `rope_type` (linear,
yarn, llama3: a fixed frequency table and attention factor), Phi-3's LongRoPE (short/long
factors and mscales) and the kinds whose table follows each forward's largest position
("dynamic" NTK scaling, and LongRoPE as Transformers' JetMoE switches it: `per_forward`).

Legend: B batch, T new tokens, S cached tokens, H heads, d head_dim.
LongRoPE follows the original Phi-3.5-MoE code: the long factors and mscale are used once the
sequence length, the largest position + 1, exceeds `original_max_position_embeddings`: read from
the positions a forward that starts a sequence is given, and counted on the host from there
(`modeling_utils.rope_length`, `Cache.rope_pad`).
Transformers 5 switches only the mscale there; see docs/differences.md.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import fused


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x_BHTd: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BTd.unsqueeze(1), sin_BTd.unsqueeze(1)
    return x_BHTd * cos + rotate_half(x_BHTd) * sin


def apply_rotary_qk(q_BHTd, k_BGTd, cos_BTd, sin_BTd) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`apply_rotary` on queries and keys (one kernel at inference); q None: the keys alone."""
    if fused.active(k_BGTd, q_BHTd, cos_BTd, sin_BTd) and k_BGTd.shape[-1] % 2 == 0:
        return fused.kernels().rope_qk(q_BHTd, k_BGTd, cos_BTd, sin_BTd)
    q = apply_rotary(q_BHTd, cos_BTd, sin_BTd) if q_BHTd is not None else None
    return q, apply_rotary(k_BGTd, cos_BTd, sin_BTd)


SCALED_ROPE_TYPES = ("linear", "yarn", "llama3")
# Kinds whose table a forward's largest position picks (Transformers' `dynamic_rope_update`), where
# the model asks for that (`RotaryEmbedding(per_forward=True)`: JetMoE).
PER_FORWARD_ROPE_TYPES = ("dynamic", "longrope")


def scaled_inv_freq(params: dict, head_dim: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(the frequency table, the factor on cos and sin) of a scaled `rope_type`, from the plain
    table `inv_freq` [head_dim / 2]:
    - "linear": positions divided by `factor` (so each frequency is);
    - "llama3": wavelengths above `original_max_position_embeddings / low_freq_factor` divided by
      `factor`, those below `.. / high_freq_factor` kept, and a linear blend between;
    - "yarn" (Peng et al. 2023): dimensions that turn fewer than `beta_slow` times over the original
      context interpolated (divided by `factor`), more than `beta_fast` times kept, a linear ramp
      between, and cos/sin scaled by `attention_factor` (default 0.1 ln(factor) + 1, or the ratio of
      the `mscale` and `mscale_all_dim` forms)."""
    kind, factor = params["rope_type"], params.get("factor")
    if kind == "linear":
        return inv_freq / factor, 1.0
    original = params["original_max_position_embeddings"]
    if kind == "llama3":
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        blend = ((original / wavelen - low) / (high - low)).clamp(0, 1)  # 0: divided, 1: kept
        blend = torch.where(wavelen > original / low, 0.0, torch.where(wavelen < original / high, 1.0, blend))
        return inv_freq / factor * (1 - blend) + inv_freq * blend, 1.0

    # yarn
    def turns_to_dim(turns: float) -> float:  # the dimension whose frequency turns `turns` times over `original`
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(params["rope_theta"]))

    lo, hi = turns_to_dim(params.get("beta_fast") or 32), turns_to_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=inv_freq.device) - lo)
            / ((hi - lo) or 0.001)).clamp(0, 1)  # 0: kept (fast dims), 1: interpolated
    table = inv_freq * (1 - ramp) + inv_freq / factor * ramp

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return table, float(attention)


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) for given positions; holds both LongRoPE factor sets when configured.

    `per_forward=True` (JetMoE) runs "dynamic" and "longrope" as Transformers'
    `dynamic_rope_update` does for every model but PhiMoE: before each forward, `update(positions)`
    picks the table from the forward's largest position + 1 (`seq`), on the device, so that a
    CUDA graph replays it. "longrope": the long factors where `seq` exceeds
    `original_max_position_embeddings`, else the short ones, one attention factor for both; keys
    cached before keep the rotation they got. "dynamic" (NTK scaling): where `seq` exceeds the
    longest sequence seen since the last reset (at first `max_position_embeddings`), the base
    becomes theta * (factor * seq / max_position_embeddings - factor + 1) ** (d / (d - 2)); a
    forward whose `seq` is below `max_position_embeddings` puts the plain table back. That state
    lives in the module (`seq_len_cached`), as in Transformers, across forwards and `generate`
    calls. Without `per_forward`, "longrope" is PhiMoE's: the sequence's length decides, counted
    on the host, and the cache is rebuilt at the switch (`modeling_utils.sync_rope_cache`)."""

    def __init__(self, head_dim: int, rope_parameters: dict, max_position_embeddings: int | None = None,
                 per_forward: bool = False) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.params = dict(rope_parameters)
        kind = self.params["rope_type"]
        self.per_forward = kind if per_forward and kind in PER_FORWARD_ROPE_TYPES else None
        self.longrope = kind == "longrope" and self.per_forward is None
        self.max_positions = max_position_embeddings
        if self.per_forward is not None and max_position_embeddings is None:
            raise ValueError(f"RotaryEmbedding: rope_type {kind!r} per forward needs max_position_embeddings")
        self.original_max = self.params.get("original_max_position_embeddings") if kind == "longrope" else None
        self.short_mscale = self.long_mscale = 1.0  # the factors on cos and sin: set with the tables
        self.register_buffer("inv_freq_short", torch.empty(head_dim // 2, dtype=torch.float32), persistent=False)
        self.register_buffer("inv_freq_long", torch.empty(head_dim // 2, dtype=torch.float32), persistent=False)
        if self.per_forward is not None:  # the table in use, and (dynamic) the longest sequence since a reset
            self.register_buffer("inv_freq", torch.empty(head_dim // 2, dtype=torch.float32), persistent=False)
            self.register_buffer("seq_len_cached", torch.zeros((), dtype=torch.int64), persistent=False)
        self.init_buffers()

    def _apply(self, fn, recurse=True):
        # `model.to(bfloat16)` must not round the frequency tables: recompute them in float32.
        super()._apply(fn, recurse)
        if self.inv_freq_short.dtype != torch.float32:
            device = self.inv_freq_short.device
            self.inv_freq_short = torch.empty(self.head_dim // 2, dtype=torch.float32, device=device)
            self.inv_freq_long = torch.empty(self.head_dim // 2, dtype=torch.float32, device=device)
            if self.per_forward is None:
                self.init_buffers()
                return self
            self.inv_freq = torch.empty(self.head_dim // 2, dtype=torch.float32, device=device)
            seen = self.seq_len_cached.clone()  # (an integer: the cast left it as it was)
            self.init_buffers()
            if self.per_forward == "dynamic" and device.type != "meta":  # its table for the longest sequence
                self.seq_len_cached.copy_(seen)
                grown = self.dynamic_inv_freq(seen)
                self.inv_freq.copy_(torch.where(seen > self.max_positions, grown, self.inv_freq_short))
        return self

    def _exponents(self, device) -> torch.Tensor:
        """2i / d for each rotated pair i, in float32 (Transformers' steps)."""
        return torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim

    def dynamic_inv_freq(self, seq_len: int | torch.Tensor | None, device=None) -> torch.Tensor:
        """"dynamic" NTK scaling's table for a sequence of `seq_len` (a host int, or an int64 tensor
        on the device), in Transformers' float32 steps: at most `max_position_embeddings` gives the
        plain table."""
        theta, factor, limit, d = self.params["rope_theta"], self.params["factor"], self.max_positions, self.head_dim
        if isinstance(seq_len, torch.Tensor):
            seq_len, device = seq_len.clamp(min=limit), seq_len.device
        else:
            seq_len = limit if seq_len is None else max(seq_len, limit)
        base = theta * ((factor * seq_len / limit) - (factor - 1)) ** (d / (d - 2))
        return 1.0 / (base ** self._exponents(device))

    @torch.no_grad()
    def init_buffers(self) -> None:
        """(Re)compute the frequency tables and the factors on cos and sin (LongRoPE's mscales,
        yarn's attention factor); called after a model is materialised from `meta`. A per-forward
        table starts plain (the short factors, or dynamic's table at `max_position_embeddings`)."""
        device = self.inv_freq_short.device
        if device.type == "meta":
            return
        base = float(self.params["rope_theta"])
        exponents = self._exponents(device)
        inv_freq = 1.0 / (base**exponents)
        kind = self.params["rope_type"]
        if kind == "longrope":
            short = torch.tensor(self.params["short_factor"], dtype=torch.float32, device=device)
            long = torch.tensor(self.params["long_factor"], dtype=torch.float32, device=device)
            self.inv_freq_short.copy_(1.0 / (short * base**exponents))
            self.inv_freq_long.copy_(1.0 / (long * base**exponents))
            if self.per_forward is None:  # PhiMoE: a factor on cos and sin per set
                self.short_mscale = float(self.params.get("short_mscale", 1.0))
                self.long_mscale = float(self.params.get("long_mscale", 1.0))
            else:
                self.short_mscale = self.long_mscale = self._longrope_attention_factor()
        else:
            if kind in SCALED_ROPE_TYPES:
                inv_freq, attention = scaled_inv_freq(self.params, self.head_dim, inv_freq)
                self.short_mscale = self.long_mscale = attention
            elif kind == "dynamic":
                inv_freq = self.dynamic_inv_freq(None, device)
            self.inv_freq_short.copy_(inv_freq)
            self.inv_freq_long.copy_(inv_freq)
        if self.per_forward is not None:
            self.inv_freq.copy_(self.inv_freq_short)
            self.seq_len_cached.fill_(self.max_positions)

    def _longrope_attention_factor(self) -> float:
        """Transformers' one LongRoPE factor on cos and sin (both sets): `attention_factor`, else
        sqrt(1 + ln(factor) / ln(original)), `factor` defaulting to max_position_embeddings / original."""
        p, original = self.params, self.original_max
        if p.get("attention_factor") is not None:
            return float(p["attention_factor"])
        factor = p.get("factor") or self.max_positions / original
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))

    @torch.no_grad()
    def update(self, position_ids: torch.Tensor) -> None:
        """Pick a per-forward kind's table from the forward's positions (as the model is given them,
        padding included, as Transformers reads them): device ops only, no host read."""
        if self.per_forward is None or position_ids.numel() == 0:
            return
        seq = position_ids.max() + 1
        if self.per_forward == "longrope":
            self.inv_freq.copy_(torch.where(seq > self.original_max, self.inv_freq_long, self.inv_freq_short))
            return
        cached, limit = self.seq_len_cached, self.max_positions
        grow = seq > cached  # a longer sequence than any since the last reset: its own table
        reset = (seq < limit) & (cached > limit)  # back within the plain length: the plain table
        kept = torch.where(reset, self.inv_freq_short, self.inv_freq)
        self.inv_freq.copy_(torch.where(grow, self.dynamic_inv_freq(seq), kept))
        self.seq_len_cached.copy_(torch.where(grow, seq, torch.where(reset, limit, cached)))

    def use_long(self, seq_len: int) -> bool:
        """Whether a sequence of `seq_len` tokens (cached + new) uses the long factors."""
        return self.longrope and seq_len > self.original_max

    @torch.no_grad()
    def forward(
        self, position_ids_BT: torch.Tensor, dtype: torch.dtype, long: bool | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [*position_ids_BT.shape, d]. `long`: the LongRoPE factor set of every
        position, or per position a tensor broadcastable to `position_ids_BT` (nonzero: long), as
        continuous batching's rows each pick their own."""
        if isinstance(long, torch.Tensor):
            return self._per_position(position_ids_BT, dtype, long)
        if self.per_forward is not None:  # the table `update` picked for this forward
            inv_freq, mscale = self.inv_freq, self.short_mscale
        else:
            inv_freq = self.inv_freq_long if long else self.inv_freq_short
            mscale = self.long_mscale if long else self.short_mscale
        # one kernel, the same values
        if fused.STEP_INPUT_KERNELS and fused.active(inv_freq) and dtype in fused.KERNEL_DTYPES:
            return fused.kernels().rope_tables(position_ids_BT, inv_freq, mscale, dtype)
        freqs = position_ids_BT[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * mscale).to(dtype), (emb.sin() * mscale).to(dtype)

    def _per_position(self, position_ids_BT: torch.Tensor, dtype: torch.dtype, long_BT: torch.Tensor):
        """`forward` with a factor set per position: each position's values are those of its set."""
        long_BT = long_BT.expand(position_ids_BT.shape)
        if fused.STEP_INPUT_KERNELS and fused.active(self.inv_freq_short) and dtype in fused.KERNEL_DTYPES:
            return fused.kernels().rope_tables(position_ids_BT, self.inv_freq_short, self.short_mscale, dtype,
                                               long=(long_BT, self.inv_freq_long, self.long_mscale))
        is_long = (long_BT != 0)[..., None]
        inv_freq = torch.where(is_long, self.inv_freq_long, self.inv_freq_short)
        mscale = torch.where(is_long, self.long_mscale, self.short_mscale)
        freqs = position_ids_BT[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * mscale).to(dtype), (emb.sin() * mscale).to(dtype)
