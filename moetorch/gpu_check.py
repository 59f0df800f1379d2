"""GPU checks, run by `moetorch bench` before it measures anything (and not by the CPU suite: CI
has no GPU). Alone: `python -m moetorch.gpu_check [--out results.json]` (or bench/gpu_check.py).

1. float32 on CUDA vs float32 on CPU, same random weights: relative error of the logits < 1e-4
   (bf16 vs float32 is reported too, for information: random routers flip near-ties in bf16).
2. Expert backends on CUDA in bf16 vs the float32 reference loop, at decode and prefill sizes.
3. A decode step with a StaticCache under `torch.cuda.set_sync_debug_mode("error")`: any host
   synchronisation on the decode path raises.
4. LongRoPE threshold crossing on CUDA equals a forward from scratch.
5. The triton expert backend at real sizes (PhiMoE and JetMoE MLP experts, JetMoE attention experts)
   in bf16 vs the float32 reference loop (rel err < 1e-2), float32 vs float32 (< 1e-4), no host sync,
   with tensor descriptors and with pointer loads.
6. The fused inference kernels (ops/triton_fused.py) at real sizes in bf16 against the torch code
   they replace (rel err < 1e-2; routing ids equal): add + LayerNorm / RMSNorm, sparsemixer,
   top-k softmax, rotary embedding, decode attention over a half-filled static cache.
7. The kernels before the first layer (rotary tables, attention mask) bit for bit against the torch
   code: bf16 tables at head dim 128 (LongRoPE short and long factors, plain RoPE), masks with
   padding, static-cache slots and a sliding window.
8. CUDA-graph decode with programmatic dependent launch equals it without, bit for bit; at batch 24
   (the sorted expert path) with tensor descriptors it matches pointer loads.
9. `generate()` reading its stop flag one step late (the CUDA default) returns the tokens of reading
   it each step, greedy and sampled, with EOS ids that stop rows early, and leaves the random
   generator where reading each step does.
10. Beam search on the static cache with graphed steps (the CUDA default) returns the tokens of the
   same cache stepped eagerly (a prompt of a prefill bucket's length, so no padding either way), and
   deciding to go on one step late (the CUDA default) returns those of deciding each step. Its
   cache read through `slot_rows` returns the tokens of moving the cache; its prompt, run once per
   group of beams, replays from its graph alike, and sampling several sequences per prompt does
   too (whether they equal every row's prompt, which rounds differently, is reported).
11. The sampling kernels (ops/triton_sample.py) at 32064 logits, bf16 as the models give them (ties
   among them), draw the tokens that torch's warpers (min-p too), softmax and `torch.multinomial`
   draw from the same seed, and leave the generator where they do (at most one draw in a thousand
   may differ: the two sum the probabilities in another order). CUDA's sort of a row keeps equal
   values in index order, as the kernels' top-p assumes, for rows of 97 to 32064 values (torch
   sorts short rows with other algorithms). `generate` draws the same tokens with the
   kernels and without: the warpers alone, after a repetition penalty, with min-p, and the draw only
   (top-p alone).
12. A model placed over the GPU and the CPU by `device_map` (and by `max_memory` with "sequential")
   runs on the GPU, the experts' weights of its CPU layers read from pinned host memory: it gives
   the float32 logits, losses and gradients of the model on the GPU alone, and `generate` its
   tokens (greedy, beam search, the static cache); in bf16 the same logits bit for bit, read in
   place and copied. What it saves loads onto the GPU with the same weights.
13. Assisted decoding (prompt lookup, an assistant) on the static cache replays its verify forwards
   from CUDA graphs (GraphedChunk); in float32 its tokens are greedy search's and the dynamic
   cache's (in bf16, reported).
Exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

import moetorch
from moetorch.ops.moe import (
    expert_map,
    expert_reduce,
    experts_forward,
    experts_reference,
)


@contextlib.contextmanager
def _switches(**values: bool):
    """`ops.triton_moe`'s switches (PDL, TMA: what MOETORCH_PDL / MOETORCH_TMA set at import) set
    for the block, then put back as they were."""
    from moetorch.ops import triton_moe

    before = {k: getattr(triton_moe, k) for k in values}
    for k, v in values.items():
        setattr(triton_moe, k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            setattr(triton_moe, k, v)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def real_rows(field: str, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The part of one tensor of output `field` that belongs to real tokens (`valid`: the bool
    attention mask [B, T]), where outputs are compared: padding rows are left out, as
    Transformers' own backends disagree on them. logits and hidden states [B, T, ...]: their
    real rows; router logits [B*T, E] (or [B, T, E]): the real tokens' rows; attentions
    [B, H, T, S]: the real queries' rows. Other fields, and all of them without a mask: as given."""
    if valid is None:
        return x
    if field in ("logits", "hidden_states") and x.dim() == 3 and x.shape[:2] == valid.shape:
        return x[valid]
    if field == "router_logits":
        return x.reshape(valid.numel(), -1)[valid.reshape(-1)]
    if field == "attentions":
        return x.transpose(1, 2)[valid]
    return x


def configs():
    phi = moetorch.PhimoeConfig(
        vocab_size=4096, hidden_size=1024, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=4, num_local_experts=8, max_position_embeddings=4096, attention_bias=True,
        lm_head_bias=True, pad_token_id=0,
    )
    out = {"phimoe": (phi, moetorch.PhimoeForCausalLM)}
    if hasattr(moetorch, "JetMoeConfig"):
        jet = moetorch.JetMoeConfig(
            vocab_size=4096, hidden_size=1024, intermediate_size=1536, num_hidden_layers=4, num_key_value_heads=8,
            kv_channels=64, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
        )
        out["jetmoe"] = (jet, moetorch.JetMoeForCausalLM)
    return out


def bf16_models():
    """(name, config, model) for each architecture: its small config, random bf16 weights on the GPU."""
    for name, (cfg, cls) in configs().items():
        torch.manual_seed(0)
        yield name, cfg, cls(cfg).to("cuda", torch.bfloat16).eval()


@torch.no_grad()
def check_model(name, config, cls, results):
    torch.manual_seed(0)
    ref = cls(config).eval()
    ids = torch.randint(1, config.vocab_size, (2, 48))
    want = ref(ids).logits
    fp32 = cls(config).to("cuda").eval()
    fp32.load_state_dict(ref.state_dict())
    err = rel_err(fp32(ids.cuda()).logits, want)
    results[f"{name}.fp32_cuda_vs_fp32_cpu_rel_err"] = err
    ok = err < 1e-4
    del fp32
    gpu = cls(config).to("cuda", torch.bfloat16).eval()
    gpu.load_state_dict(ref.state_dict())
    # Informative only: with random routers, bf16 rounding flips near-tied expert choices.
    results[f"{name}.bf16_cuda_vs_fp32_cpu_rel_err"] = rel_err(gpu(ids.cuda()).logits, want)
    fp16 = cls(config).to("cuda", torch.float16).eval()
    fp16.load_state_dict(ref.state_dict())
    results[f"{name}.fp16_cuda_vs_fp32_cpu_rel_err"] = rel_err(fp16(ids.cuda()).logits, want)  # informative too
    del fp16
    # decode without host sync
    cache = moetorch.StaticCache(config, max_cache_len=64)
    gpu(ids.cuda(), past_key_values=cache, use_cache=True)
    nxt = torch.ones(2, 1, dtype=torch.long, device="cuda")
    pos = torch.tensor([48], device="cuda")
    gpu(nxt, past_key_values=cache, cache_position=pos)  # warm-up allocations
    cache.truncate(48)
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        gpu(nxt, past_key_values=cache, cache_position=pos)
        results[f"{name}.decode_step_host_sync"] = "none"
    except RuntimeError as e:
        results[f"{name}.decode_step_host_sync"] = f"SYNC: {e}"
        ok = False
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return ok


@torch.no_grad()
def check_experts(results):
    ok = True
    E, D, I, K = 16, 1024, 1536, 2
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(E, 2 * I, D, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(E, D, I, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    for T in (1, 64, 1024):
        x = torch.randn(T, D, device="cuda", generator=g, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:K] for _ in range(T)])
        w = torch.rand(T, K, device="cuda", generator=g, dtype=torch.bfloat16)
        want = experts_reference(x.float(), w13.float(), w2.float(), ids, w.float(), F.silu)
        for backend in ("gather", "grouped_mm", "triton"):
            if backend == "gather" and T > 64:
                continue
            err = rel_err(experts_forward(x, w13, w2, ids, w, F.silu, backend=backend), want)
            results[f"experts.{backend}.T{T}.rel_err"] = err
            ok &= err < 1e-2
    return ok


def check_moa_experts(results):
    """JetMoE's attention-expert map/reduce: each backend's output and gradients vs the reference."""
    ok = True
    E, D, C, K, T = 8, 1024, 512, 2, 256
    g = torch.Generator(device="cuda").manual_seed(1)
    base = [torch.randn(T, D, device="cuda", generator=g), torch.randn(E, C, D, device="cuda", generator=g) * 0.03,
            torch.randn(E, D, C, device="cuda", generator=g) * 0.03, torch.randn(T, K, C, device="cuda", generator=g),
            torch.rand(T, K, device="cuda", generator=g)]
    cases = {"random": torch.stack([torch.randperm(E, device="cuda", generator=g)[:K] for _ in range(T)]),
             "one_expert": torch.full((T, K), E - 1, device="cuda")}
    for case, ids in cases.items():
        outs = {}
        for backend in ("reference", "gather", "grouped_mm", "triton"):
            dt = torch.float32 if backend == "reference" else torch.bfloat16
            args = [t.detach().to(dt).clone().requires_grad_() for t in base]
            x, wm, wr, h, gates = args
            y1, y2 = expert_map(x, wm, ids, backend), expert_reduce(h, wr, ids, gates, backend)
            (y1.float().square().sum() + y2.float().square().sum()).backward()
            outs[backend] = [y1.detach(), y2.detach(), *(a.grad for a in args)]
        for backend in ("gather", "grouped_mm", "triton"):
            # gather is the decode path (no training): its bf16 weight-gradient accumulation is not used.
            pairs = list(zip(outs[backend], outs["reference"]))[: 2 if backend == "gather" else None]
            err = max(rel_err(a, b) for a, b in pairs)
            results[f"moa.{backend}.{case}.max_rel_err"] = err
            ok &= err < 1e-2
    return ok


# Real sizes: kind, E, D, and I (SwiGLU experts) or C = kv heads * head dim (attention experts).
REAL_SIZES = {"phimoe": ("experts", 16, 4096, 6400), "jetmoe_mlp": ("experts", 8, 2048, 5632),
              "jetmoe_moa": ("moa", 8, 2048, 16 * 128)}


def _layer_outputs(kind, x, h, gates, w_a, w_b, ids, backend: str, combine: bool = True) -> list[torch.Tensor]:
    """A REAL_SIZES layer's expert outputs through `backend`: the SwiGLU experts' [T, D], or the
    attention experts' map [T, K, C] and reduce (combine=False: as `experts_forward` says)."""
    if kind == "experts":
        return [experts_forward(x, w_a, w_b, ids, gates, F.silu, backend, combine)]
    return [expert_map(x, w_a, ids, backend), expert_reduce(h, w_b, ids, gates, backend, combine)]


@torch.no_grad()
def check_triton(results):
    """The triton backend at real sizes against the float32 reference loop: bf16 at T in 1..4096
    (random routing; every token's first expert the same one at T=512), float32 at T=64, float16
    at T = 1, 64 and 4096 (through the bf16 entries of the config file, `_SAME_WIDTH`), pointer
    loads in place of tensor descriptors (MOETORCH_TMA=0) at T=512 and 4096, the K terms left
    uncombined (combine=False, as the models call it; summed here) at T=16, and a call under sync
    debug mode (any host sync raises)."""
    from moetorch.ops.triton_moe import tma_enabled

    results["tma.enabled"] = tma_enabled(torch.device("cuda"))
    ok, K = True, 2
    g = torch.Generator(device="cuda").manual_seed(2)
    for name, (kind, E, D, H) in REAL_SIZES.items():
        w_a = torch.randn(E, 2 * H if kind == "experts" else H, D, device="cuda", generator=g).bfloat16() * 0.02
        w_b = torch.randn(E, D, H, device="cuda", generator=g).bfloat16() * 0.02
        w32, w16 = (w_a.float(), w_b.float()), (w_a.half(), w_b.half())
        for T, case in ((1, "random"), (8, "random"), (64, "random"), (512, "random"), (4096, "random"),
                        (512, "one_expert"), (64, "fp32"), (64, "no_sync"), (512, "no_tma"), (4096, "no_tma"),
                        (16, "uncombined"), (1, "fp16"), (64, "fp16"), (4096, "fp16")):
            x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
            h = torch.randn(T, K, H, device="cuda", generator=g).bfloat16()
            gates = torch.rand(T, K, device="cuda", generator=g).bfloat16()
            ids = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=-1).indices
            if case == "one_expert":
                ids = torch.stack([torch.full((T,), E - 1, device="cuda"), ids[:, 1] % (E - 1)], dim=1)
            args32 = (x.float(), h.float(), gates.float())
            want = _layer_outputs(kind, *args32, *w32, ids, "reference")
            fp32 = case == "fp32"
            (xx, hh, gg), (wa, wb) = (args32, w32) if fp32 else ((x, h, gates), (w_a, w_b))
            if case == "fp16":
                (xx, hh, gg), (wa, wb) = (x.half(), h.half(), gates.half()), w16
            if case == "no_sync":
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                with _switches(TMA=False) if case == "no_tma" else contextlib.nullcontext():
                    combine = case != "uncombined"
                    got = _layer_outputs(kind, xx, hh, gg, wa, wb, ids, "triton", combine)
                    if not combine:  # [T, K, D] terms where the kernels left them
                        got[-1] = got[-1].float().sum(-2) if got[-1].dim() == 3 else got[-1]
            except RuntimeError as e:
                results[f"triton.{name}.host_sync"] = f"SYNC: {e}"
                ok = False
                continue
            finally:
                torch.cuda.set_sync_debug_mode("default")
            err = max(rel_err(a, b) for a, b in zip(got, want))
            results[f"triton.{name}.T{T}.{case}.rel_err"] = err
            ok &= err < (1e-4 if fp32 else 1e-2)
        del w_a, w_b, w32, w16
        torch.cuda.empty_cache()
    return ok


@torch.no_grad()
def check_decode_defaults(results):
    """The expert kernels with no config file, as on a GPU or a model shape with no tuned entry
    (`triton_moe.decode_config` at decode sizes: the CUDA-core kernel at one token, split-K past
    it; `default_config` at 4096 tokens), against the float32 reference: the real shapes and a
    PhiMoE with 960-wide experts, at 1, 4, 16 and 4096 tokens, in bf16 and fp16."""
    ok, K = True, 2
    g = torch.Generator(device="cuda").manual_seed(3)
    with _switches(_device_file=lambda device: None):
        for name, (kind, E, D, H) in {**REAL_SIZES, "phimoe_i960": ("experts", 16, 4096, 960)}.items():
            w_a = torch.randn(E, 2 * H if kind == "experts" else H, D, device="cuda", generator=g) * 0.02
            w_b = torch.randn(E, D, H, device="cuda", generator=g) * 0.02
            for T in (1, 4, 16, 4096):
                x, h = torch.randn(T, D, device="cuda", generator=g), torch.randn(T, K, H, device="cuda", generator=g)
                gates = torch.rand(T, K, device="cuda", generator=g)
                ids = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=-1).indices
                for dtype in (torch.bfloat16, torch.float16):
                    args = [t.to(dtype) for t in (x, h, gates, w_a, w_b)]
                    got = _layer_outputs(kind, *args, ids, "triton")
                    want = _layer_outputs(kind, *(t.float() for t in args), ids, "reference")
                    err = max(rel_err(a, b) for a, b in zip(got, want))
                    results[f"decode_defaults.{name}.T{T}.{str(dtype)[6:]}.rel_err"] = err
                    ok &= err < 1e-2
            del w_a, w_b
            torch.cuda.empty_cache()
    return ok


@torch.no_grad()
def check_fused(results):
    from moetorch.ops import fused
    from moetorch.ops.attention import attention, build_mask
    from moetorch.ops.linear import linears
    from moetorch.ops.norms import LayerNorm, RMSNorm
    from moetorch.ops.rope import apply_rotary_qk
    from moetorch.ops.routing import route_topk, sparsemixer

    ok = True
    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(3)

    def both(fn, *args):
        with fused.forced(False):
            want = fn(*args)
        return fn(*args), want

    def record(name, got, want, limit=1e-2):
        nonlocal ok
        err = max(rel_err(a, b) for a, b in zip(got, want))
        results[f"fused.{name}.rel_err"] = err
        ok &= err < limit

    for B in (1, 16, 64):
        x = torch.randn(B, 1, 4096, device=dev, generator=g).to(bf)
        a = torch.randn(B, 1, 4096, device=dev, generator=g).to(bf)
        ln = LayerNorm(4096).to(dev, bf).eval()
        ln.weight.normal_(1.0, 0.1, generator=g)
        ln.bias.normal_(0.0, 0.1, generator=g)
        record(f"add_layernorm.B{B}", *both(ln.add_norm, x, a))
        # a MoE output handed over with its K axis: the add sums it
        a_k = torch.randn(B, 1, 2, 4096, device=dev, generator=g).to(bf)
        record(f"add_layernorm_sum_k.B{B}", *both(ln.add_norm, x, a_k))
        rms = RMSNorm(2048, 1e-6).to(dev, bf).eval()
        rms.weight.normal_(1.0, 0.1, generator=g)
        bias = torch.randn(2048, device=dev, generator=g).to(bf)
        record(f"add_rmsnorm.B{B}", *both(rms.add_norm, x[..., :2048], a[..., :2048], bias))
        logits = torch.randn(B * 8, 16, device=dev, generator=g).to(bf)
        # ids compared by the logits they pick: bf16 logits tie often, and either tied expert is right
        (w, ids), (w0, ids0) = both(sparsemixer, logits, 0.01, False)
        same = torch.equal(logits.gather(1, ids), logits.gather(1, ids0))
        results[f"fused.sparsemixer.B{B}.picks_equal"] = same
        ok &= same
        record(f"sparsemixer.B{B}", [w], [w0])
        (w, ids, l32), (w0, ids0, l0) = both(route_topk, logits[:, :8], 2, bf)
        same = torch.equal(logits.gather(1, ids), logits.gather(1, ids0))
        results[f"fused.topk.B{B}.picks_equal"] = same
        ok &= same
        record(f"topk.B{B}", [w, l32], [w0, l0])
        for name, H, G, layout in (("phimoe", 32, 8, "grouped"), ("jetmoe", 32, 16, "tiled")):
            d, S = 128, 4096
            q = torch.randn(B, 1, H * 128, device=dev, generator=g).to(bf).view(B, 1, H, d).transpose(1, 2)
            k = torch.randn(B, 1, G * 128, device=dev, generator=g).to(bf).view(B, 1, G, d).transpose(1, 2)
            ang = torch.randn(B, 1, d // 2, device=dev, generator=g) * 100
            cos, sin = torch.cat((ang, ang), -1).cos().to(bf), torch.cat((ang, ang), -1).sin().to(bf)
            record(f"rope.{name}.B{B}", *both(apply_rotary_qk, q, k, cos, sin), limit=1e-6)
            kc = torch.randn(B, G, S, d, device=dev, generator=g).to(bf)
            vc = torch.randn(B, G, S, d, device=dev, generator=g).to(bf)
            pad = torch.ones(B, S, dtype=torch.long, device=dev)
            pad[0, :7] = 0
            mask, _ = build_mask(pad, torch.tensor([S // 2], device=dev), S, None, B, queries_at_end=False)
            got, want = both(attention, q, kc, vc, mask, False, d**-0.5, "sdpa", 0.0, layout)
            record(f"decode_attention.{name}.B{B}", [got[0]], [want[0]])
            # a beam-search cache's slot_rows: the kernel reads them; torch gathers the keys first
            rows = torch.randint(0, B, (B, S), device=dev, generator=g)
            got, want = both(functools.partial(attention, kv_rows=rows), q, kc, vc, mask, False, d**-0.5, "sdpa",
                             0.0, layout)
            record(f"decode_attention_slot_rows.{name}.B{B}", [got[0]], [want[0]])
        # norm + router in one kernel, against the norm then the router's GEMV and routing
        for name, norm, D, E, delta, add_bias, eps in (
            ("phimoe", ln, 4096, 16, a, None, 0.01), ("jetmoe", rms, 2048, 8, a[..., :2048], bias, None),
        ):
            router = (torch.randn(E, D, device=dev, generator=g) / 16).to(bf)
            x_in = x[..., :D]
            s, h, (w, ids, lg) = norm.add_norm_route(x_in, delta, add_bias, router, 2, eps, eps is None)
            s0, h0 = norm.add_norm(x_in, delta, add_bias)
            with fused.forced(False):
                lg0 = torch.nn.functional.linear(h0, router).reshape(-1, E)
            record(f"add_norm_route.{name}.B{B}", [s, h, lg], [s0, h0, lg0.to(lg.dtype)])
            with fused.forced(False):  # the torch routing of the kernel's own logits
                w0, ids0 = sparsemixer(lg, eps, False) if eps is not None else route_topk(lg, 2, bf)[:2]
            same = torch.equal(lg.gather(1, ids), lg.gather(1, ids0))
            results[f"fused.add_norm_route.{name}.B{B}.picks_equal"] = same
            ok &= same
            record(f"add_norm_route.{name}.B{B}.weights", [w], [w0])
        # q, k, v (and o, kv_proj) as one small-row GEMV against torch's Linear
        if B <= fused.LINEAR_MAX_ROWS:
            for name, D, outs, has_bias in (("phimoe.qkv", 4096, (4096, 1024, 1024), True),
                                            ("phimoe.o", 4096, (4096,), True), ("jetmoe.kv", 2048, (4096,), False)):
                layers = [torch.nn.Linear(D, n, bias=has_bias).to(dev, bf) for n in outs]
                record(f"linears.{name}.B{B}", *both(linears, x[..., :D], *layers))
            # the q/k/v (PhiMoE) and kv (JetMoE) GEMVs with the rotary and the cache write, against
            # linears + rotary kernel + cache write (the same sums and roundings: exact) and torch
            for name, D, outs, has_bias in (("phimoe", 4096, (4096, 1024, 1024), True),
                                            ("jetmoe", 2048, (4096,), False)):
                layers = [torch.nn.Linear(D, n, bias=has_bias).to(dev, bf) for n in outs]
                got, fused_want, torch_want = _check_projection_rotated(x[..., :D], layers, g)
                record(f"projection_rotated.{name}.B{B}.vs_two_kernels", got, fused_want, limit=1e-6)
                record(f"projection_rotated.{name}.B{B}", got, torch_want)
            if B == 1:  # JetMoE's MoA map in the kv kernel: against the map's own kernel, and torch
                got, alone, torch_want = _check_map_with_kv(x[..., :2048], g)
                record("projection_rotated.jetmoe_map.B1.vs_separate", got, alone)
                record("projection_rotated.jetmoe_map.B1", got, torch_want)
    # JetMoE prefill attention: one kernel rotates the queries into the grouped head order, sdpa,
    # one kernel brings the output back to the tiled order; against rotating and reordering in torch
    T, H, G, d = 2048, 32, 16, 128
    q = torch.randn(1, T, H * d, device=dev, generator=g).to(bf).view(1, T, H, d).transpose(1, 2)
    k, v = (torch.randn(1, G, T, d, device=dev, generator=g).to(bf) for _ in range(2))
    ang = torch.randn(1, T, d // 2, device=dev, generator=g) * 100
    cos, sin = torch.cat((ang, ang), -1).cos().to(bf), torch.cat((ang, ang), -1).sin().to(bf)
    got, want = both(attention, q, k, v, None, True, d**-0.5, "sdpa", 0.0, "tiled", False, (cos, sin))
    record("prefill_attention.jetmoe.T2048", [got[0]], [want[0]])
    return ok


def _check_map_with_kv(x, g):
    # (q, k, v) of ops.linear.linears_rotated with the experts, without them (k, v) with the map by
    # ops.moe.expert_map (triton), and with torch's (reference) map
    from moetorch.ops import fused
    from moetorch.ops.linear import linears_rotated
    from moetorch.ops.moe import expert_map

    d, E = 128, 8
    kv_proj = torch.nn.Linear(2048, 4096, bias=False).to(x.device, x.dtype)
    w_map = (torch.randn(E, 2048, 2048, device=x.device, generator=g) / 45).to(x.dtype)
    ids = torch.randperm(E, device=x.device, generator=g)[:2].view(1, 2)
    ang = torch.randn(1, 1, d // 2, device=x.device, generator=g) * 100
    cos, sin = torch.cat((ang, ang), -1).cos().to(x.dtype), torch.cat((ang, ang), -1).sin().to(x.dtype)
    got = linears_rotated(x, (kv_proj,), d, cos, sin, None, (w_map, ids))
    _, k, v = linears_rotated(x, (kv_proj,), d, cos, sin)

    def as_heads(q):
        return q.view(1, 1, -1, d).transpose(1, 2)

    alone = as_heads(expert_map(x.view(1, -1), w_map, ids, "triton"))
    with fused.forced(False):
        ref = as_heads(expert_map(x.view(1, -1), w_map, ids, "reference"))
    return list(got), [alone, k, v], [ref, k, v]


def _check_projection_rotated(x, layers, g):
    # (q, k cache slot, v cache slot) from cache.project_rotated, from linears + update_rotated
    # (fused kernels), and from torch. One layer: JetMoE's kv_proj, whose queries (here: random)
    # the attention kernel rotates, compared through `attention(..., rope_q=)`.
    from moetorch import StaticCache
    from moetorch.ops import fused
    from moetorch.ops.attention import attention
    from moetorch.ops.linear import linears

    B, d, S, pos = x.shape[0], 128, 256, 100
    ang = torch.randn(B, 1, d // 2, device=x.device, generator=g) * 100
    cos, sin = torch.cat((ang, ang), -1).cos().to(x.dtype), torch.cat((ang, ang), -1).sin().to(x.dtype)
    slots = {"cache_position": torch.tensor([pos], device=x.device)}
    kv_only = len(layers) == 1
    q_in = torch.randn(B, 32, 1, d, device=x.device, generator=g).to(x.dtype) if kv_only else None
    mask = torch.zeros(B, 1, 1, S, dtype=torch.bool, device=x.device)
    mask[..., : pos + 1] = True

    def attend(q, kc, vc, rope_q=None):  # JetMoE: the queries' rotation shows in the attention
        return attention(q, kc, vc, mask, False, d**-0.5, "sdpa", 0.0, "tiled", rope_q=rope_q)[0]

    def two_kernels(fused_on):
        cache = StaticCache(num_layers=1, max_cache_len=S)
        with contextlib.nullcontext() if fused_on else fused.forced(False):
            outs = linears(x, *layers)
            outs = [q_in, *outs[0].chunk(2, -1)] if kv_only else outs
            parts = [t if t is q_in else t.view(B, 1, -1, d).transpose(1, 2) for t in outs]
            q, kc, vc = cache.update_rotated(*parts, cos, sin, 0, slots)
            first = attend(q, kc, vc) if kv_only else q
        return [first, kc[:, :, pos], vc[:, :, pos]]

    cache = StaticCache(num_layers=1, max_cache_len=S)
    q, kc, vc = cache.project_rotated(x, layers, d, cos, sin, 0, slots)
    first = attend(q_in, kc, vc, rope_q=(cos, sin)) if kv_only else q
    return [first, kc[:, :, pos], vc[:, :, pos]], two_kernels(True), two_kernels(False)


@torch.no_grad()
def check_prelayer(results):
    """The two kernels before the first layer against the torch code they replace, bit for bit:
    `rope_tables` (cos / sin in bf16 at head dim 128: PhiMoE's LongRoPE short and long factor sets,
    a set per position and per row, JetMoE's plain RoPE, and the bench's PhiMoE (plain, theta 1e6);
    every position up to 128k, and [B, T] positions) and `causal_mask`
    (`build_mask`'s general case: padding, static-cache slots past the mask, sliding window). fp32
    tables are reported too: their equality says libdevice's cos / sin are torch's."""
    from moetorch.ops import fused
    from moetorch.ops.attention import build_mask
    from moetorch.ops.rope import RotaryEmbedding

    ok = True
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(4)
    # factor sets shaped like Phi-3.5-MoE's (rising from 1 to ~2.5 and to ~64 across the 64 frequencies)
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 4096,
                "short_factor": torch.logspace(0, 0.4, 64, dtype=torch.float64).tolist(),
                "long_factor": torch.logspace(0, 1.8, 64, dtype=torch.float64).tolist(),
                "short_mscale": 1.243163121016122, "long_mscale": 1.243163121016122}
    every = torch.arange(131072, device=dev)[None]
    batch = torch.randint(0, 131072, (4, 37), device=dev, generator=g)
    # a factor set per position (continuous batching's rows), distinct mscales so that both show
    rows = torch.rand(4, 37, device=dev, generator=g) < 0.5
    mixed = dict(longrope, long_mscale=1.31)
    ropes = {"phimoe.short": (longrope, False), "phimoe.long": (longrope, True),
             "phimoe.per_position": (mixed, rows), "phimoe.per_row": (mixed, rows[:, :1]),
             "jetmoe": ({"rope_type": "default", "rope_theta": 10000.0}, False),
             "phimoe.bench": ({"rope_type": "default", "rope_theta": 1e6}, False)}  # the bench's config
    for name, (params, long) in ropes.items():
        rotary = RotaryEmbedding(128, params).to(dev)
        for dtype in (torch.bfloat16, torch.float32):
            for pname, pos in (("all", every), ("B4", batch)):
                if isinstance(long, torch.Tensor) and pname == "all":
                    continue
                got = rotary(pos, dtype, long)
                with fused.forced(False):
                    want = rotary(pos, dtype, long)
                same = all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, want))
                key = f"prelayer.rope_tables.{name}.{'bf16' if dtype == torch.bfloat16 else 'fp32'}.{pname}"
                results[f"{key}.bitwise_equal"] = same
                if not same:
                    results[f"{key}.differing"] = sum(int((a != b).sum()) for a, b in zip(got, want))
                if dtype == torch.bfloat16:  # what the models use; fp32 is reported for information
                    ok &= same
    S = 4096
    pad = torch.ones(3, S, dtype=torch.long, device=dev)
    pad[0, :7] = 0
    pad[1, :1000] = 0
    short = pad[:, : S // 2].bool()
    cases = {  # (2D mask, cache positions, kv_len, sliding window)
        "decode.static": (pad, torch.tensor([S // 2], device=dev), S, None),
        "decode.static.window": (pad, torch.tensor([S // 2], device=dev), S, 2047),
        "decode.short_mask": (short, torch.tensor([S // 2 - 1], device=dev), S, None),
        "prefill.dynamic": (pad[:, :512], torch.arange(512, device=dev), 512, None),
        "prefill.window": (pad[:, :512], torch.arange(512, device=dev), 512, 100),
        "prefill.window_no_mask": (None, torch.arange(512, device=dev), 512, 100),
        "chunk.static": (pad, torch.arange(1000, 1064, device=dev), S, None),
    }
    for name, (am, pos, kv_len, window) in cases.items():
        got, _ = build_mask(am, pos, kv_len, window, 3, queries_at_end=False)
        with fused.forced(False):
            want, _ = build_mask(am, pos, kv_len, window, 3, queries_at_end=False)
        same = got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)
        results[f"prelayer.causal_mask.{name}.equal"] = same
        ok &= same
    return ok


@torch.no_grad()
def check_longrope(results):
    head = 64
    scaling = {"type": "longrope", "short_factor": [1.0 + i / head for i in range(head // 2)],
               "long_factor": [2.0 + i / 4 for i in range(head // 2)], "short_mscale": 1.1, "long_mscale": 1.3,
               "original_max_position_embeddings": 32}
    cfg = moetorch.PhimoeConfig(vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                max_position_embeddings=256, rope_scaling=scaling)
    torch.manual_seed(1)
    m = moetorch.PhimoeForCausalLM(cfg).cuda().eval()
    ids = torch.randint(0, 512, (2, 40), device="cuda")
    cache = moetorch.StaticCache(cfg, max_cache_len=64)
    m(ids[:, :30], past_key_values=cache, use_cache=True)
    worst = 0.0
    for t in range(30, 40):
        step = m(ids[:, t : t + 1], past_key_values=cache, cache_position=torch.tensor([t], device="cuda")).logits
        worst = max(worst, rel_err(step[:, 0], m(ids[:, : t + 1]).logits[:, -1]))
    results["longrope.crossing_vs_scratch_rel_err"] = worst
    return worst < 1e-4


@torch.no_grad()
def check_pdl(results):
    """Graphed decode launched with programmatic dependent launch gives bitwise the logits it gives
    without (MOETORCH_PDL=0): a kernel that touched memory before waiting for the one before it
    would race, and show here as a difference. At batch 24 (the experts' sorted path, whose GEMMs
    load through tensor descriptors inside the graph) it also matches pointer loads (MOETORCH_TMA=0).
    The steps are fed fixed tokens, so every run sees the same inputs."""
    from moetorch.engine import GraphedDecodeStep
    from moetorch.ops.triton_moe import pdl_enabled

    results["pdl.enabled"] = pdl_enabled(torch.device("cuda"))
    ok = True
    for name, cfg, model in bf16_models():
        for B in (1, 4, 24):
            prompt = torch.randint(1, cfg.vocab_size, (B, 40), device="cuda")
            toks = torch.randint(1, cfg.vocab_size, (32, B, 1), device="cuda")
            runs = []
            for pdl, tma in ((True, True), (False, True)) + (((True, False),) if B == 24 else ()):
                with _switches(PDL=pdl, TMA=tma):
                    cache = moetorch.StaticCache(cfg, max_cache_len=80)
                    model(prompt, past_key_values=cache, use_cache=True)
                    step = GraphedDecodeStep(model, cache, B, enabled=True)
                    steps = []
                    for i, t in enumerate(range(40, 72)):
                        pos = torch.full((B, 1), t, device="cuda")
                        steps.append(step(toks[i], None, pos, torch.tensor([t], device="cuda")).clone())
                    runs.append(torch.stack(steps))
            same = torch.equal(runs[0], runs[1])
            results[f"pdl.{name}.B{B}.graph_decode_bitwise_equal"] = same
            ok &= same
            if len(runs) > 2:
                err = rel_err(runs[0], runs[2])
                results[f"tma.{name}.B{B}.graph_decode_rel_err_vs_pointer_loads"] = err
                ok &= err < 1e-2
        del model
    return ok


@torch.no_grad()
def check_launcher(results):
    """Eager prefills (the sorted expert path, descriptors included) and eager decode steps give
    bitwise the logits through moetorch's launcher (`ops.launch`: a call specialised like an
    earlier one launches its compiled kernel directly) as through Triton's launch path: an argument
    passed wrongly, or a kernel of another specialisation, would show here. Each run repeats its
    forwards, so the second and later launch directly."""
    from moetorch.ops import launch

    ok = True
    for name, cfg, model in bf16_models():
        ids = torch.randint(1, cfg.vocab_size, (2, 300), device="cuda")
        runs = []
        for enabled in (True, False):
            launch.ENABLED = enabled
            try:
                logits = []
                for _ in range(2):
                    cache = moetorch.DynamicCache()
                    logits.append(model(ids, past_key_values=cache, use_cache=True).logits)
                    for t in range(8):
                        logits.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
                runs.append(torch.cat([x.flatten() for x in logits]))
            finally:
                launch.ENABLED = True
        same = torch.equal(runs[0], runs[1])
        results[f"launch.{name}.eager_bitwise_equal_to_triton_launches"] = same
        ok &= same
        del model
    results["launch.specialisations_kept"] = sum(
        len(k.kernels) for m in _triton_modules() for k in vars(m).values() if isinstance(k, launch.Launcher))
    return ok and results["launch.specialisations_kept"] > 0


def _triton_modules():
    from moetorch.ops import triton_fused, triton_moe, triton_sample

    return triton_fused, triton_moe, triton_sample


@torch.no_grad()
def check_lagged_stop(results):
    ok = True
    for name, cfg, model in bf16_models():
        ids = torch.randint(1, cfg.vocab_size, (3, 24), device="cuda")
        free = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None)[:, 24:]
        eos = [int(free[r, 3 + 6 * r]) for r in range(3)]  # rows stop at different steps, all before the end
        for how, settings in (("greedy", {}), ("sample", dict(do_sample=True, top_k=3, temperature=0.5))):
            outs, after = [], []
            for lag in (False, True):
                model.lagged_stop = lag
                torch.manual_seed(3)
                outs.append(model.generate(ids, max_new_tokens=24, eos_token_id=eos, **settings))
                after.append(torch.rand(2, device="cuda"))
            same = torch.equal(*outs) and torch.equal(*after)
            results[f"lagged_stop.{name}.{how}.same_tokens_and_rng"] = same
            results[f"lagged_stop.{name}.{how}.new_tokens"] = outs[1].shape[1] - 24
            ok &= same
        del model
    return ok


@torch.no_grad()
def check_scaled_rope_and_chunked_prefill(results):
    """JetMoE with yarn and llama3 RoPE scaling (a frequency table and a factor on cos and sin that
    the rotary-table kernel and the graphed steps take) against the same float32 weights on the
    CPU: logits, and greedy tokens through the graphed decode steps. Then `prefill_chunk_size` on
    the static cache (the first chunk through the graphed prefill) against the whole prompt."""
    ok = True
    cfg, cls = configs()["jetmoe"]
    scalings = {"yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
                "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 256}}
    ids = torch.randint(1, cfg.vocab_size, (2, 40))
    for kind, rope in scalings.items():
        ok &= _gpu_against_cpu(cls, cfg, {"rope_parameters": rope}, ids, results, f"scaled_rope.{kind}") is not None
    for name, (cfg, cls) in configs().items():  # float32: chunks of other lengths round alike
        torch.manual_seed(0)
        model = cls(cfg).to("cuda").eval()
        ids = torch.randint(1, cfg.vocab_size, (2, 100), device="cuda")
        want = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None)
        for size in (16, 64):
            got = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, prefill_chunk_size=size)
            results[f"prefill_chunks.{name}.{size}.same_tokens"] = same = torch.equal(want, got)
            ok &= same
        del model
    return ok


def _gpu_against_cpu(cls, cfg, changes: dict, ids, results, prefix: str):
    """A random float32 model of `cfg` with `changes`, on the CPU and a copy on the GPU: their
    logits (relative error < 1e-4) and greedy tokens (the GPU's graphed). The GPU model where
    both hold, else None."""
    torch.manual_seed(0)
    cpu = cls(type(cfg).from_dict({**cfg.to_dict(), **changes})).eval()
    gpu = copy.deepcopy(cpu).to("cuda")
    err = results[f"{prefix}.logits_rel_err"] = rel_err(gpu(ids.cuda()).logits.cpu(), cpu(ids).logits)
    want = cpu.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None)
    got = gpu.generate(ids.cuda(), max_new_tokens=16, do_sample=False, eos_token_id=None).cpu()
    results[f"{prefix}.same_greedy_tokens"] = same = torch.equal(want, got)
    return gpu if err < 1e-4 and same else None


@torch.no_grad()
def check_head_dim(results):
    """PhiMoE with `head_dim` apart from hidden_size / heads (a power of two and not): float32 logits
    and graphed greedy tokens on the GPU against the CPU. bf16 greedy, graphed against the dynamic
    cache's eager steps, is recorded (rounding may part them)."""
    ok = True
    cfg, cls = configs()["phimoe"]
    ids = torch.randint(1, cfg.vocab_size, (2, 40))
    for width in (96, 32):
        gpu = _gpu_against_cpu(cls, cfg, {"head_dim": width}, ids, results, f"head_dim.{width}")
        if gpu is None:
            ok = False
            continue
        gpu.to(torch.bfloat16)
        graphed = gpu.generate(ids.cuda(), max_new_tokens=16, do_sample=False, eos_token_id=None)
        eager = gpu.generate(ids.cuda(), max_new_tokens=16, do_sample=False, eos_token_id=None,
                             cache_implementation="dynamic")
        results[f"head_dim.{width}.bf16_graphed_vs_dynamic_same_tokens"] = torch.equal(graphed, eager)
        del gpu
    return ok


def check_checkpointing(results):
    """Activation checkpointing's options on the GPU (the reentrant checkpoint, every second layer,
    activations offloaded to pinned host memory): float32 training gradients equal those of the
    plain backward (relative error < 1e-5); the peak memory of each backward is recorded."""
    ok = True
    for name, (cfg, cls) in configs().items():
        ids = torch.randint(1, cfg.vocab_size, (4, 256), device="cuda")
        grads, peaks = {}, {}
        for option, kw in {"none": None, "default": {}, "reentrant": {"activation_checkpointing_kwargs": {
                "use_reentrant": True}}, "every_2nd": {"every_n_layers": 2}, "offload": {"offload": True}}.items():
            torch.manual_seed(0)
            model = cls(cfg).to("cuda").train()
            if kw is not None:
                model.activation_checkpointing_enable(**kw)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            torch.manual_seed(1)
            model(ids, labels=ids).loss.backward()
            peaks[option] = (torch.cuda.max_memory_allocated() - base) / 2**20
            grads[option] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            del model
        for option in peaks:
            err = max(rel_err(grads[option][n], g) for n, g in grads["none"].items())
            results[f"checkpointing.{name}.{option}.grad_rel_err"] = err
            results[f"checkpointing.{name}.{option}.peak_mib"] = round(peaks[option], 1)
            ok &= err < 1e-5 and grads[option].keys() == grads["none"].keys()
    return ok


@torch.no_grad()
def check_beam_graphs(results):
    # beam search, and sampling several sequences per prompt, on the held cache's graphs
    ok = True
    for name, cfg, model in bf16_models():
        ids = torch.randint(1, cfg.vocab_size, (2, 32), device="cuda")
        free = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)[:, 32:]
        eos = [int(free[0, 3]), int(free[1, 6])]  # beams that finish early, so the lagged stop drops a step
        outs = []
        # graphed three times (the prompt's view captured on its second use, replayed on the third),
        # eager steps, stop read each step; then with every beam's prompt run (not once per prompt),
        # read through slot_rows, and moved instead
        for graphs, lag, slot_rows, once in ((True, True, True, True), (True, True, True, True),
                                             (True, True, True, True), (False, True, True, True),
                                             (True, False, True, True), (True, True, True, False),
                                             (True, True, False, False)):
            model.decode_graphs, model.lagged_stop, model.beam_slot_rows = graphs, lag, slot_rows
            model.prompt_once = once
            outs.append(model.generate(ids, max_new_tokens=12, num_beams=3, num_return_sequences=2,
                                       eos_token_id=eos, do_sample=False))
        model.beam_slot_rows = model.prompt_once = True
        replays = torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
        same = torch.equal(outs[0], outs[3])
        results[f"beam_graphs.{name}.same_tokens_replayed"] = replays
        results[f"beam_graphs.{name}.same_tokens_as_eager_steps"] = same
        results[f"beam_graphs.{name}.lagged_stop_same_tokens"] = torch.equal(outs[0], outs[4])
        results[f"beam_graphs.{name}.slot_rows_same_tokens_as_moving_the_cache"] = torch.equal(outs[5], outs[6])
        # the prompt once per group of beams rounds differently from every beam's (other row counts)
        results[f"beam_graphs.{name}.prompt_once_same_tokens_as_every_beams"] = torch.equal(outs[0], outs[5])
        results[f"beam_graphs.{name}.new_tokens"] = outs[0].shape[1] - 32
        ok &= replays and same and torch.equal(outs[0], outs[4]) and torch.equal(outs[5], outs[6])
        # sampling several sequences per prompt: the prompt once (captured on its second use), then every row's
        draws = []
        for once in (True, True, True, False):
            model.prompt_once = once
            torch.manual_seed(3)
            draws.append(model.generate(ids, max_new_tokens=12, do_sample=True, top_k=20, num_return_sequences=3,
                                        eos_token_id=eos))
        model.prompt_once = True
        replays = torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
        results[f"sequences.{name}.same_tokens_replayed"] = replays
        results[f"sequences.{name}.prompt_once_same_tokens_as_every_rows"] = torch.equal(draws[0], draws[3])
        ok &= replays
        del model
    return ok


@torch.no_grad()
def check_sampling_kernel(results):
    from moetorch.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    from moetorch.ops import fused, triton_sample

    V = 32064
    g = torch.Generator(device="cuda").manual_seed(0)
    # torch sorts short rows with other algorithms than long ones: tiny vocabularies up to this one's
    stable = True
    for size in (97, 1000, 4096, 4097, V):
        ties = (torch.randn(4, size, device="cuda", generator=g) * 3).bfloat16().float()
        values, order = torch.sort(ties, descending=False)
        same_value = values[:, 1:] == values[:, :-1]
        stable &= bool((order[:, 1:][same_value] > order[:, :-1][same_value]).all())
    results["sampling.cuda_sort_keeps_ties_in_index_order"] = stable
    ok, draws, differ, rng_differ = stable, 0, 0, 0
    for temperature, top_k, top_p, min_p in ((0.7, 50, 0.9, None), (None, 50, None, None), (1.3, 256, 0.8, None),
                                             (None, 200, 0.95, None), (0.5, None, None, None), (0.7, 50, 0.9, 0.05),
                                             (1.0, None, None, 0.1)):
        warpers = LogitsProcessorList(
            ([TemperatureLogitsWarper(temperature)] if temperature is not None else [])
            + ([TopKLogitsWarper(top_k)] if top_k is not None else [])
            + ([TopPLogitsWarper(top_p)] if top_p is not None else [])
            + ([MinPLogitsWarper(min_p)] if min_p is not None else []))
        for R in (1, 16):
            for seed in range(25):
                logits = (torch.randn(R, V, device="cuda", generator=g) * 3).bfloat16()
                torch.manual_seed(seed)
                want = torch.multinomial(warpers(None, logits.float()).softmax(-1), 1).squeeze(1)
                after_want = torch.rand(2, device="cuda")
                torch.manual_seed(seed)
                got = triton_sample.sample(logits, temperature, top_k, top_p, min_p)
                after_got = torch.rand(2, device="cuda")
                draws += R
                differ += int((want != got).sum())
                rng_differ += not torch.equal(after_want, after_got)
    results["sampling.draws"] = draws
    results["sampling.draws_that_differ"] = differ
    results["sampling.generator_states_that_differ"] = rng_differ
    ok &= differ * 1000 <= draws and rng_differ == 0
    name, cfg, model = next(bf16_models())
    ids = torch.randint(1, cfg.vocab_size, (3, 24), device="cuda")
    for how, settings in (("warpers", dict(temperature=0.7, top_k=50, top_p=0.9)),
                          ("after_processors", dict(repetition_penalty=1.2, top_k=40, top_p=0.8)),
                          ("min_p", dict(temperature=0.7, min_p=0.05)),
                          ("draw_only", dict(top_k=0, top_p=0.9))):
        outs = []
        for kernel in (1, 0):
            fused.SAMPLE_KERNEL = kernel
            torch.manual_seed(7)
            outs.append(model.generate(ids, max_new_tokens=24, do_sample=True, eos_token_id=None, **settings))
        fused.SAMPLE_KERNEL = 1
        same = torch.equal(*outs)
        results[f"sampling.{name}.generate_{how}_same_tokens"] = same
        ok &= same
    return ok


@torch.no_grad()
def check_assisted_graphs(results):
    """Assisted decoding on the static cache (the GPU default): prompt lookup's and an assistant's
    verify forwards replay GraphedChunk's graphs, padded to their bucket, and a moetorch assistant
    drafts on its own held static cache, replaying its own graphs. In float32 the tokens are greedy
    search's and those of the dynamic cache's eager forwards, and so are the returned logits (each
    round's a copy of the graph's output); in bf16 the tokens are reported. An assistant on the CPU
    drafts for the model on the GPU."""
    from moetorch.engine import GraphedChunk, GraphedDecodeStep

    ok = True
    replays = {"target": 0, "assistant": 0}
    originals = {cls: cls.__call__ for cls in (GraphedChunk, GraphedDecodeStep)}
    target = None

    def counting(self, *args, _cls):  # the target's chunks, and every graphed run of the assistant's
        out = originals[_cls](self, *args)
        role = "target" if self.model is target else "assistant"
        if out is not None and self.enabled and (role == "assistant" or _cls is GraphedChunk):
            replays[role] += 1
        return out

    for cls in originals:
        cls.__call__ = functools.partialmethod(counting, _cls=cls)
    try:
        for name, (cfg, cls) in configs().items():
            torch.manual_seed(0)
            model = target = cls(cfg).to("cuda").eval()
            base = torch.randint(1, cfg.vocab_size, (1, 16), device="cuda")
            ids = torch.cat([base, base, base[:, :8]], dim=1)
            for dtype in (torch.float32, torch.bfloat16):
                model.to(dtype)
                twin = copy.deepcopy(model)  # the same weights: every draft kept
                kw = dict(max_new_tokens=48, do_sample=False, eos_token_id=None)
                greedy = model.generate(ids, **kw)
                arms = {"prompt_lookup": dict(prompt_lookup_num_tokens=8),
                        "assistant": dict(assistant_model=twin, num_assistant_tokens=6,
                                          assistant_confidence_threshold=0.0)}
                if dtype == torch.float32:
                    arms["assistant_on_cpu"] = dict(arms["assistant"], assistant_model=copy.deepcopy(twin).cpu())
                for how, extra in arms.items():
                    replays.update(target=0, assistant=0)
                    graphed = model.generate(ids, **kw, **extra)
                    eager = model.generate(ids, **kw, **extra, cache_implementation="dynamic")
                    key = f"assisted_graphs.{name}.{how}.{str(dtype).removeprefix('torch.')}"
                    results[f"{key}.chunks_replayed"] = replays["target"]
                    results[f"{key}.assistant_replays"] = replays["assistant"]
                    results[f"{key}.same_tokens_as_greedy"] = torch.equal(graphed, greedy)
                    results[f"{key}.same_tokens_as_dynamic_cache"] = torch.equal(graphed, eager)
                    if dtype != torch.float32:
                        continue
                    ok &= replays["target"] > 0 and torch.equal(graphed, greedy) and torch.equal(graphed, eager)
                    ok &= replays["assistant"] > 0 if how == "assistant" else replays["assistant"] == 0
                    logits = [torch.stack(model.generate(ids, **kw, **extra, cache_implementation=c,
                                                         return_dict_in_generate=True, output_logits=True).logits)
                              for c in ("static", "dynamic")]
                    err = results[f"{key}.logits_rel_err_vs_dynamic_cache"] = rel_err(*logits)
                    ok &= err < 1e-4
            del model, twin
    finally:
        for cls, original in originals.items():
            cls.__call__ = original
    return ok


def check_device_map(results):
    """A model that `device_map` places over the GPU and the CPU (the layers alternating, the head
    on the CPU) runs on the GPU with the experts' weights of the CPU's layers in pinned host memory:
    it gives the logits, losses and gradients of the same float32 weights on the GPU alone, and
    `generate` its tokens: greedy, beam search and a static cache (graphed steps: the model counts
    as one device). `max_memory` with "sequential" spills layers to the CPU. In bf16 the expert
    kernels read the host weights in place for a few tokens and from a copy for more: the same
    logits bit for bit as the GPU alone, at decode and prefill sizes, and the same tokens."""
    import tempfile

    from .ops.host import is_host_mapped

    ok = True
    split = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": "cpu",
             "model.layers.3": 0, "model.norm": 0, "lm_head": "cpu"}
    for name, (cfg, cls) in configs().items():
        torch.manual_seed(0)
        if name == "jetmoe":
            cfg.router_loss_recipe = "jetmoe"  # its z-loss sums over the routers of both devices
        with tempfile.TemporaryDirectory() as path:
            cls(cfg).save_pretrained(path)
            one = cls.from_pretrained(path, dtype="float32", device="cuda")
            two = cls.from_pretrained(path, dtype="float32", device_map=split)
            key = f"device_map.{name}"
            results[f"{key}.devices"] = sorted({str(p.device) for p in two.parameters()})
            mapped = [n for n, p in two.named_parameters() if is_host_mapped(p) and p.is_pinned()]
            results[f"{key}.host_mapped"] = mapped
            one_device = two.parameter_devices() == [torch.device("cuda", 0)] and not two.spans_devices
            results[f"{key}.runs_on_one_device"] = one_device
            ok &= one_device and len(mapped) == 4 and all(".layers.1." in n or ".layers.2." in n for n in mapped)
            two.save_pretrained(f"{path}/saved")  # written from both devices, read back onto the GPU
            saved = cls.from_pretrained(f"{path}/saved", device="cuda")
            same = all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), one.state_dict().values()))
            results[f"{key}.saved_weights_equal"] = same
            ok &= same
            del saved
            ids = torch.randint(1, cfg.vocab_size, (2, 40), device="cuda")
            outs = [m(ids, labels=ids, output_router_logits=True, output_hidden_states=True) for m in (one, two)]
            for field in ("logits", "loss", "aux_loss"):
                err = rel_err(getattr(outs[1], field).float().cuda(), getattr(outs[0], field).float())
                results[f"{key}.{field}_rel_err"] = err
                ok &= err < 1e-4
            for out in outs:
                out.loss.backward()
            grad = rel_err(two.model.embed_tokens.weight.grad, one.model.embed_tokens.weight.grad)
            results[f"{key}.embedding_grad_rel_err"] = grad  # through the layers placed on the CPU
            ok &= grad < 1e-4
            held = dict(two.named_parameters())[mapped[0]]
            grad = rel_err(held.grad.cuda(), dict(one.named_parameters())[mapped[0]].grad)
            results[f"{key}.host_expert_grad_rel_err"] = grad  # a gradient of a weight in host memory
            ok &= grad < 1e-4 and held.grad.device.type == "cpu"
            with torch.no_grad():
                ids = ids[:, :24]
                ways = (("greedy", {}), ("beam", dict(num_beams=3)), ("static", dict(cache_implementation="static")))
                for how, kw in ways:
                    got = [m.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, **kw)
                           for m in (one, two)]
                    same = torch.equal(got[0], got[1].to(got[0].device))
                    results[f"{key}.{how}_same_tokens"] = same
                    ok &= same
            first = (one.model.embed_tokens, one.model.layers[0], one.model.layers[1])
            budget = sum(p.numel() * 4 for m in first for p in m.parameters())
            spill = cls.from_pretrained(path, dtype="float32", device_map="sequential",
                                        max_memory={0: budget + 2**20, "cpu": "64GiB"})
            results[f"{key}.sequential_map"] = spill.hf_device_map
            with torch.no_grad():
                err = rel_err(spill(ids).logits.float().cuda(), one(ids).logits)
            results[f"{key}.sequential_logits_rel_err"] = err
            ok &= err < 1e-4 and spill.hf_device_map.get("model.layers.2") == "cpu"
            del one, two, spill
            with torch.no_grad():
                bf16 = [cls.from_pretrained(path, dtype="bfloat16", device="cuda"),
                        cls.from_pretrained(path, dtype="bfloat16", device_map=split)]
                got = [m.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None) for m in bf16]
                for T in (1, 2, 256):  # read in place (ops.moe.reads_host_in_place); copied
                    x = torch.randint(1, cfg.vocab_size, (1, T), device="cuda")
                    same = torch.equal(*(m(x).logits for m in bf16))
                    results[f"{key}.bf16_logits_equal_T{T}"] = same
                    ok &= same
            results[f"{key}.bf16_new_tokens"] = got[1].shape[1] - ids.shape[1]
            results[f"{key}.bf16_same_tokens"] = torch.equal(got[0], got[1])
            ok &= got[1].shape[1] - ids.shape[1] == 16 and torch.equal(got[0], got[1])
            ok &= _check_host_extras(results, key, path, cls, cfg, split, bf16, mapped)
    return ok


@torch.no_grad()
def _check_host_extras(results, key, path, cls, cfg, split, bf16, mapped) -> bool:
    """What `check_device_map` adds for host-held experts: `model.to(dtype)` pins the converted
    host weights again (`ops.host.repin`: the same logits and static-cache tokens as a bf16 load);
    continuous batching on such a model (its cache sized to leave room for one layer's copy) gives
    the GPU-alone model's tokens; and a `max_memory` plan leaves the GPU room for the parts of the
    layers it places on the CPU (what the GPU then holds stays within the budget)."""
    import moetorch

    from .ops import moe as moe_ops
    from .ops.host import is_host_mapped

    ok = True
    conv = cls.from_pretrained(path, dtype="float32", device_map=split).to(torch.bfloat16)
    pinned = [n for n, p in conv.named_parameters() if is_host_mapped(p) and p.is_pinned()]
    results[f"{key}.repinned_after_to"] = pinned == mapped
    ok &= pinned == mapped
    for T in (1, 256):
        x = torch.randint(1, cfg.vocab_size, (1, T), device="cuda")
        same = torch.equal(conv(x).logits, bf16[1](x).logits)
        results[f"{key}.converted_logits_equal_T{T}"] = same
        ok &= same
    # the copies started ahead of the host layers (ops.moe.CopiesAhead): each layer takes its own
    taken, take, shipped = [], moe_ops.CopiesAhead.take, moe_ops.COPY_AHEAD
    moe_ops.CopiesAhead.take = lambda self, weights: taken.append(take(self, weights)) or taken[-1]
    x = torch.randint(1, cfg.vocab_size, (1, 256), device="cuda")
    try:
        moe_ops.COPY_AHEAD = True
        got = conv(x).logits
        moe_ops.COPY_AHEAD = False
        same = torch.equal(got, conv(x).logits)
    finally:
        moe_ops.CopiesAhead.take, moe_ops.COPY_AHEAD = take, shipped
    results[f"{key}.copies_ahead_taken"] = sum(t is not None for t in taken)
    results[f"{key}.copies_ahead_logits_equal"] = same
    ok &= same and sum(t is not None for t in taken) == 2
    # graphed decode steps at a batch whose steps copy the host experts: captured with the copies
    # ahead (each replay runs them on the side stream), the same tokens as without them
    E, K = cfg.num_local_experts, cfg.num_experts_per_tok
    B = next(b for b in range(1, 64) if not moe_ops.reads_host_in_place(b, E, K))
    ids = torch.randint(1, cfg.vocab_size, (B, 24), device="cuda")
    runs, taken = {}, []
    moe_ops.CopiesAhead.take = lambda self, weights: taken.append(take(self, weights)) or taken[-1]
    try:
        for arm in (True, False):
            moe_ops.COPY_AHEAD = arm
            runs[arm] = conv.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                      cache_implementation="static")
            runs[f"{arm}_taken"] = sum(t is not None for t in taken)
            taken.clear()
    finally:
        moe_ops.CopiesAhead.take, moe_ops.COPY_AHEAD = take, shipped
    same = torch.equal(runs[True], runs[False])
    results[f"{key}.copies_ahead_graphed_batch"] = B
    results[f"{key}.copies_ahead_graphed_taken"] = [runs["True_taken"], runs["False_taken"]]
    results[f"{key}.copies_ahead_graphed_same_tokens"] = same
    ok &= same and runs["True_taken"] > 0 and runs["False_taken"] == 0
    ids = torch.randint(1, cfg.vocab_size, (2, 24), device="cuda")
    got = [m.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, cache_implementation="static")
           for m in (bf16[0], conv)]
    same = torch.equal(got[0], got[1])
    results[f"{key}.converted_static_same_tokens"] = same
    ok &= same
    gen = moetorch.GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, cfg.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 40, (9,), generator=g)]
    outs = [[r.generated_tokens for r in m.generate_batch(prompts, generation_config=gen).values()]
            for m in (bf16[0], conv)]
    same = outs[0] == outs[1] and all(len(t) == 12 for t in outs[1])
    results[f"{key}.generate_batch_same_tokens"] = same
    ok &= same
    del conv
    torch.cuda.empty_cache()
    full = bf16[0]
    unit = sum(p.numel() * p.element_size() for p in full.model.layers[0].parameters())
    budget = sum(p.numel() * p.element_size() for p in full.model.embed_tokens.parameters()) + 2 * unit
    model = cls.from_pretrained(path, dtype="bfloat16", device_map="auto", max_memory={0: budget, "cpu": "64GiB"})
    rotary = {id(t) for n, m in model.named_modules() if n.endswith("rotary_emb") for t in m.buffers()}
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
               if t.device.type == "cuda" and id(t) not in rotary)  # the tables count no bytes in a plan
    results[f"{key}.planned_map"] = model.hf_device_map
    results[f"{key}.planned_gpu_bytes"] = [held, budget]
    x = torch.randint(1, cfg.vocab_size, (1, 64), device="cuda")
    same = torch.equal(model(x).logits, full(x).logits)
    results[f"{key}.planned_logits_equal"] = same
    ok &= held <= budget and same and "cpu" in model.hf_device_map.values()
    return ok


def _loss_and_grads(model, use_cache: bool | None = False, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's loss (no cache; None: the cache the forward builds by default) and every
    parameter's gradient, flattened, in float32."""
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, use_cache=use_cache).loss
    loss.backward()
    return loss.detach().float(), torch.cat([p.grad.float().flatten() for p in model.parameters()])


def _two_arms_against_float32(results: dict, key: str, runs: dict) -> bool:
    """`runs`: arm -> `_loss_and_grads`, "float32" the reference and two arms. Records each arm's
    relative errors under `key`; whether each arm's are within twice the other's (plus 1e-3)."""
    want_loss, want_grads = runs.pop("float32")
    errs = {arm: (abs(loss - want_loss).item() / abs(want_loss).item(), rel_err(grads, want_grads))
            for arm, (loss, grads) in runs.items()}
    for arm, (loss_err, grad_err) in errs.items():
        results[f"{key}{arm.replace(' ', '_')}_loss_rel_err"] = loss_err
        results[f"{key}{arm.replace(' ', '_')}_grads_rel_err"] = grad_err
    a, b = errs.values()
    return all(a[i] <= 2 * b[i] + 1e-3 and b[i] <= 2 * a[i] + 1e-3 for i in range(2))


def check_packed_training(results) -> bool:
    """Packed sequences in train mode (position_ids that start again, no mask): the varlen path
    (bf16, the GPU's default for them) and the dense block-diagonal mask (bf16), each against the
    float32 dense mask on the GPU: loss and every gradient. Random routers flip near-tied experts
    in bf16 on either path, so each path's error is held to twice the other's (plus 1e-3). The same
    for a right-padded batch (eval mode), unpadded (UNPAD_ROWS) and as given, and unpadded with the
    cache the forward builds by default (the same loss as without it). Also grouped
    heads under a dense mask (`masked_gqa_served` says whether sdpa's enable_gqa serves them with a
    fused kernel here) against float32 with the kv heads repeated."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from moetorch import modeling_utils
    from moetorch.ops import attention as attention_ops

    ok = True
    lengths = [[40, 88, 1, 127], [256]]
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths]).cuda()
    for name, (cfg, cls) in configs().items():
        torch.manual_seed(0)
        ref = cls(cfg).cuda().train()
        ids = torch.randint(1, cfg.vocab_size, pos.shape, device="cuda")
        bf16 = cls(cfg).to("cuda", torch.bfloat16).train()
        bf16.load_state_dict(ref.state_dict())
        runs = {}
        for arm, model, varlen in (("float32", ref, False), ("varlen", bf16, None), ("dense", bf16, False)):
            modeling_utils.PACKED_VARLEN = varlen
            torch.manual_seed(1)
            runs[arm] = _loss_and_grads(model, input_ids=ids, position_ids=pos, labels=ids)
        modeling_utils.PACKED_VARLEN = None
        used = modeling_utils.varlen_packing(bf16.model, modeling_utils.packed_segments(pos, None, None, 2), None,
                                             False, torch.zeros(1, device="cuda", dtype=torch.bfloat16))
        results[f"packed_training.{name}.varlen_serves"] = used is not None
        ok &= used is not None
        ok &= _two_arms_against_float32(results, f"packed_training.{name}.", runs)
        # a right-padded batch (eval mode: no routing draws), unpadded and as given, against float32
        ids_pad = ids.view(4, -1)[:, :128].clone()
        mask = (torch.arange(128, device="cuda")[None] < torch.tensor([[128], [40], [97], [1]], device="cuda")).long()
        labels = ids_pad.masked_fill(mask == 0, -100)
        runs = {}
        for arm, model, unpad in (("float32", ref, False), ("unpadded", bf16, None), ("as given", bf16, False)):
            modeling_utils.UNPAD_ROWS = unpad
            runs[arm] = _loss_and_grads(model.eval(), input_ids=ids_pad, attention_mask=mask, labels=labels)
        # the cache the forward builds by default: the keys and values written on the padded grid,
        # the same step (the same loss; gradients to the order of the flash backward's sums)
        modeling_utils.UNPAD_ROWS = None
        loss, grads = _loss_and_grads(bf16.eval(), None, input_ids=ids_pad, attention_mask=mask, labels=labels)
        same_loss, err = bool(loss == runs["unpadded"][0]), rel_err(grads, runs["unpadded"][1])
        results[f"packed_training.{name}.padded_default_cache_same_loss"] = same_loss
        results[f"packed_training.{name}.padded_default_cache_grads_rel_err"] = err
        ok &= same_loss and err < 1e-4
        ok &= _two_arms_against_float32(results, f"packed_training.{name}.padded_", runs)
        del ref, bf16
    torch.manual_seed(2)
    B, H, G, T, d = 2, 16, 4, 512, 64
    q, k, v = (torch.randn(B, h, T, d, device="cuda", dtype=torch.bfloat16) for h in (H, G, G))
    mask = torch.rand(B, 1, T, T, device="cuda") < 0.7
    mask |= torch.eye(T, dtype=torch.bool, device="cuda")
    grad = torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16)
    served = attention_ops.masked_gqa_served(q, k, v, mask, 0.0)
    results["packed_training.masked_gqa_served"] = served
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = attention_ops.attention(*leaves, mask, False, d**-0.5)
    out.backward(grad)
    ref = [t.float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel([SDPBackend.MATH]):
        ref_out = F.scaled_dot_product_attention(ref[0], *(t.repeat_interleave(H // G, dim=1) for t in ref[1:]),
                                                 attn_mask=mask, scale=d**-0.5).transpose(1, 2)
    ref_out.backward(grad.float())
    for field, a, b in zip(("out", "dq", "dk", "dv"), [out, *(t.grad for t in leaves)],
                           [ref_out, *(t.grad for t in ref)]):
        err = rel_err(a, b)
        results[f"packed_training.masked_gqa_vs_float32.{field}"] = err
        ok &= err < 1e-2
    return ok


def check_loss_kernel(results) -> bool:
    """The loss kernels (`ops.triton_loss`) at a real vocabulary against `F.cross_entropy` over a
    float32 copy of the logits, as Transformers computes the loss: each row's loss, the logits'
    gradient (and the share of its elements with the same bits), and the memory each path takes
    beyond the logits."""
    from moetorch.ops import triton_loss

    ok = True
    g = torch.Generator(device="cuda").manual_seed(0)
    N, V = 8192, 32064
    for dtype in (torch.bfloat16, torch.float32):
        key = f"loss_kernel.{str(dtype).removeprefix('torch.')}"
        logits = (torch.randn(N, V, device="cuda", generator=g) * 3).to(dtype)
        target = torch.randint(0, V, (N,), device="cuda", generator=g)
        target[::7] = -100
        grad = torch.rand(N, device="cuda", generator=g)
        runs = {}
        for arm in ("kernel", "torch"):
            x = logits.clone().requires_grad_()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
            loss = (triton_loss.row_losses(x, target) if arm == "kernel"
                    else F.cross_entropy(x.float(), target, reduction="none"))
            loss.backward(grad)
            results[f"{key}.{arm}_peak_beyond_logits_gib"] = (torch.cuda.max_memory_allocated() - held) / 2**30
            runs[arm] = (loss.detach(), x.grad)
            del x, loss
        (loss, dx), (want_loss, want_dx) = runs["kernel"], runs["torch"]
        results[f"{key}.loss_rel_err"] = rel_err(loss, want_loss)
        results[f"{key}.ignored_rows_zero"] = bool((loss[::7] == 0).all() and (dx[::7] == 0).all())
        results[f"{key}.grad_rel_err"] = rel_err(dx, want_dx)
        results[f"{key}.grad_same_bits"] = (dx == want_dx).float().mean().item()
        ok &= (results[f"{key}.loss_rel_err"] < 1e-5 and results[f"{key}.grad_rel_err"] < 1e-2
               and results[f"{key}.ignored_rows_zero"])
    return ok


class _Cycle:
    """An object in a reference cycle: only the cyclic garbage collector frees it."""

    def __init__(self, held) -> None:
        self.held, self.me = held, self


def _stray_graph() -> None:
    """A captured CUDA graph left unreachable in a reference cycle (as an earlier batch's graphs
    may be), for the next collection to destroy."""
    x = torch.zeros(8, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.add_(1)
    _Cycle((graph, x))


def check_graph_gc(results) -> bool:
    """A capture during which the garbage collector's counters run out, with stray graphs to
    destroy: `engine.capture` holds the collector off and captures. The bare torch.cuda.graph, for
    comparison, is recorded (torch >= 2.9 no longer collects before a capture). The bare arm runs
    in a child process: its failed capture leaves CUDA's random generator marked as capturing, and
    every later draw of the process that ran it fails."""
    results["graph_gc.capture"] = capture_arm = graph_gc_arm("capture")
    code = "import moetorch.gpu_check as c; print(c.graph_gc_arm('bare'))"
    try:
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        lines = child.stdout.strip().splitlines()
        bare = lines[-1] if child.returncode == 0 and lines else \
            f"failed: the child process exited {child.returncode}: {child.stderr.strip()[-160:]}"
    except subprocess.TimeoutExpired:
        bare = "failed: the child process timed out"
    results["graph_gc.bare"] = bare
    return capture_arm == "captured"


def graph_gc_arm(how: str) -> str:
    """One arm of `check_graph_gc` ("capture": `engine.capture`; "bare": torch.cuda.graph):
    "captured", "wrong output" or "failed: <error>"."""
    import gc

    from .engine.cuda_graph import capture

    x = torch.arange(4.0, device="cuda")

    def work():
        if torch.cuda.is_current_stream_capturing():  # a collection is due now, not before the capture
            gc.set_threshold(1, 1, 1)
            junk = [[i] for i in range(2000)]
            del junk
        return x * 2

    keep, was_on = gc.get_threshold(), gc.isenabled()
    try:
        gc.collect()
        gc.set_threshold(10**9, 10**9, 10**9)  # the strays stay young and uncollected until work()
        gc.enable()
        for _ in range(3):
            _stray_graph()
        try:
            if how == "capture":
                graph, out = capture(work)
            else:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = work()
            x.add_(1)
            graph.replay()
            torch.cuda.synchronize()
            return "captured" if torch.equal(out, x * 2) else "wrong output"
        except RuntimeError as e:
            return f"failed: {str(e).splitlines()[0][:160]}"
    finally:
        gc.set_threshold(*keep)
        (gc.enable if was_on else gc.disable)()
        gc.collect()


def check_models(results) -> bool:
    ok = True
    for name, (cfg, cls) in configs().items():
        ok &= check_model(name, cfg, cls, results)
    return ok


CHECKS = {
    "experts": check_experts, "moa_experts": check_moa_experts, "triton": check_triton,
    "decode_defaults": check_decode_defaults, "fused": check_fused, "prelayer": check_prelayer,
    "models": check_models, "longrope": check_longrope, "pdl": check_pdl, "launcher": check_launcher,
    "lagged_stop": check_lagged_stop, "beam_graphs": check_beam_graphs, "sampling_kernel": check_sampling_kernel,
    "device_map": check_device_map, "assisted_graphs": check_assisted_graphs,
    "scaled_rope_and_chunked_prefill": check_scaled_rope_and_chunked_prefill, "head_dim": check_head_dim,
    "checkpointing": check_checkpointing, "packed_training": check_packed_training,
    "loss_kernel": check_loss_kernel, "graph_gc": check_graph_gc,
}


def run_checks(only: list[str] | None = None) -> dict:
    """Every check (or those named in `only`, keys of CHECKS); the results, with "ok" saying
    whether all passed."""
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    ok = True
    for name in only or CHECKS:
        ok &= CHECKS[name](results)
    results["ok"] = bool(ok)
    return results


def check_names(text: str) -> list[str]:
    """An argparse type for `--only`: a comma list of CHECKS' names."""
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in CHECKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown checks {unknown}: expected a comma list of {', '.join(CHECKS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moetorch.gpu_check")
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", type=check_names, default=None, help="a comma list of checks to run (all by "
                        "default): " + ", ".join(CHECKS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    results = run_checks(args.only)
    report(results, args.out)
    return 0 if results["ok"] else 1


def report(results: dict, out: str | None) -> None:
    """Print the results as JSON, and write them to `out` when given."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
