"""Linear layers that read the same rows, run together: `linears(x, q_proj, k_proj, v_proj)`.

At decode sizes (at most `fused.LINEAR_MAX_ROWS` rows, inference) one Triton kernel reads all the
weights (`triton_fused.linear_small`): a GEMV with no split-K reduction kernel after it, one launch
for up to three layers. Elsewhere each layer runs as torch runs it.

`linears_rotated` adds the rotary embedding of q and k to that kernel, and with a static cache's
storage the write of k and v into their slots: at decode, a layer's q/k/v projections (PhiMoE) or
kv projection (JetMoE, whose queries the attention kernel rotates), rotary and cache write are one
launch.
"""

from __future__ import annotations

import torch
from torch import nn

from . import fused


def linears(x: torch.Tensor, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    """`tuple(layer(x) for layer in layers)`; fused (the outputs are views of one tensor) at decode sizes."""
    if _fusable(x, layers):
        weights = [layer.weight for layer in layers]
        out = fused.kernels().linear_small(x.reshape(-1, x.shape[-1]), weights, [layer.bias for layer in layers])
        out = out.view(*x.shape[:-1], out.shape[-1])
        return tuple(out.split([w.shape[0] for w in weights], dim=-1))
    return tuple(layer(x) for layer in layers)


# Whether `linears_rotated` may take JetMoE's MoA map into its kernel (`experts=`); an int so that
# bench/decode_ab.py can run decode without it.
MAP_WITH_KV = 1


def linears_rotated(x_BTD, layers, head_dim: int, cos_BTd, sin_BTd, cache_kv=None, experts=None):
    """(q [B, H, T, d], k, v) of `layers` = (q_proj, k_proj, v_proj), with q and k rotated
    (`ops.rope.apply_rotary`); `layers` = (kv_proj,), whose outputs are k then v (JetMoE): q is None.
    `cache_kv` = (k_cache, v_cache [B, G, S, d], slots [T]): k and v are written into those slots
    and the caches returned in their place. One kernel; None where it does not serve these inputs
    (the caller then runs `linears` and the rotary itself).

    `experts` = (w [E, C, D], ids [B*T, k]) with (kv_proj,): the same kernel also projects the row
    with each of its k experts (`ops.moe.expert_map`) and q is that, [B, k*C/d, T, d], unrotated.
    Only for one row; elsewhere q stays None and the caller maps."""
    if len(layers) not in (1, 3) or not _fusable(x_BTD, layers) or not fused.active(x_BTD, cos_BTd, sin_BTd):
        return None
    if cos_BTd.dim() != 3 or cos_BTd.shape[-1] != head_dim or cos_BTd.shape != sin_BTd.shape:
        return None
    B, T, D = x_BTD.shape
    if cos_BTd.shape[1] != T or cos_BTd.shape[0] not in (1, B):
        return None
    if len(layers) == 3:
        weights, biases = [layer.weight for layer in layers], [layer.bias for layer in layers]
    else:  # one kv projection: its two halves
        (kv,) = layers
        if kv.out_features % 2:
            return None
        weights = list(kv.weight.chunk(2, dim=0))
        biases = list(kv.bias.chunk(2)) if kv.bias is not None else [None, None]
    ns = [w.shape[0] for w in weights]
    x_MK = x_BTD.reshape(-1, D)
    kernels = fused.kernels()
    if not kernels.linear_rope_fits(x_MK, ns, head_dim):
        return None
    if cache_kv is not None:
        k_cache, v_cache, _ = cache_kv
        if not fused.active(x_BTD, k_cache, v_cache) or k_cache.shape != v_cache.shape:
            return None
        if k_cache.shape[0] != B or k_cache.shape[1] * head_dim != ns[-2] or k_cache.shape[-1] != head_dim:
            return None
    cos_BTd, sin_BTd = cos_BTd.contiguous(), sin_BTd.contiguous()
    if experts is not None and not (MAP_WITH_KV and len(layers) == 1 and fused.active(experts[0])
                                    and kernels.linear_experts_fit(x_MK, weights, biases, head_dim, *experts)):
        experts = None
    out = kernels.linear_small(
        x_MK, weights, biases,
        rope=(cos_BTd, sin_BTd, T, *(cache_kv if cache_kv is not None else (None, None, None))), experts=experts,
    ).view(B, T, -1)

    def heads(t):
        return t.view(B, T, -1, head_dim).transpose(1, 2)

    parts = [heads(t) for t in out[..., : sum(ns)].split(ns, dim=-1)]
    q = parts[0] if len(ns) == 3 else heads(out[..., sum(ns):]) if experts is not None else None
    if cache_kv is not None:
        return q, cache_kv[0], cache_kv[1]
    return q, parts[-2], parts[-1]


def plain_weight(layer: nn.Module) -> torch.Tensor | None:
    """The weight of a layer whose forward is `nn.Linear`'s, else None. A kernel that reads a
    weight may stand in for the layer's call only then: a wrapper in its place (PEFT's LoRA layers,
    a quantised layer) exposes its base weight but computes something else."""
    return layer.weight if type(layer).forward is nn.Linear.forward else None


def _fusable(x: torch.Tensor, layers) -> bool:
    if not 1 <= len(layers) <= 3 or x.dim() == 0 or not 0 < x.numel() // x.shape[-1] <= fused.LINEAR_MAX_ROWS:
        return False
    if any(plain_weight(layer) is None for layer in layers):
        return False
    biases = [layer.bias for layer in layers]
    if any((b is None) != (biases[0] is None) for b in biases):
        return False
    if any(layer.in_features != x.shape[-1] for layer in layers):
        return False
    return fused.active(x, *(layer.weight for layer in layers), *biases)
