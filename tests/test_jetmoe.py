"""JetMoE-specific behaviour: config aliases, derived heads and validation; the tiled MoA head
mapping; the original-recipe router loss; tied embeddings through save/load and resizing; cache
continuation; the MoA expert seams (expert_map / expert_reduce)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
import transformers
from archs import JETMOE, randomize_
from parity import close, make_inputs, make_pair
from safetensors import safe_open

from moetorch import (
    ConfigError,
    DynamicCache,
    JetMoeConfig,
    JetMoeForCausalLM,
    JetMoeModel,
    StaticCache,
)
from moetorch.ops import moe


def tiny_lm(seed: int = 0, **overrides) -> JetMoeForCausalLM:
    model = JetMoeForCausalLM(JETMOE.our_config(**overrides))
    randomize_(model, seed)
    return model.eval()


# ---- configuration ----------------------------------------------------------------------------

SPEC_DEFAULTS = dict(
    vocab_size=32000, hidden_size=2048, num_hidden_layers=12, num_key_value_heads=16, kv_channels=128,
    intermediate_size=5632, max_position_embeddings=4096, activation_function="silu", num_local_experts=8,
    num_experts_per_tok=2, output_router_logits=False, aux_loss_coef=0.01, use_cache=True, bos_token_id=1,
    eos_token_id=2, pad_token_id=None, tie_word_embeddings=True, rms_norm_eps=1e-6, initializer_range=0.01,
    attention_dropout=0.0,
)


def test_spec_defaults_match_transformers():
    cfg = JetMoeConfig()
    for k, v in SPEC_DEFAULTS.items():
        assert getattr(cfg, k) == v, k
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    ours, theirs = cfg.to_dict(), transformers.JetMoeConfig().to_dict()
    for k in set(ours) & set(theirs) - {"id2label", "label2id"}:
        assert ours[k] == theirs[k], k
    assert "router_loss_recipe" not in ours and "router_z_loss_coef" not in ours


def test_derived_heads_are_read_only(caplog):
    cfg = JetMoeConfig(num_key_value_heads=3, num_experts_per_tok=2, num_local_experts=4, kv_channels=16)
    assert cfg.num_attention_heads == 6 and cfg.head_dim == 16
    assert cfg.to_dict()["num_attention_heads"] == 6  # written, as Transformers does
    with pytest.raises(AttributeError):
        cfg.num_attention_heads = 8
    # A stored value is not read: the heads follow the kv heads and top-k, with a warning if they differ.
    with caplog.at_level(logging.WARNING, logger="moetorch"):
        loaded = JetMoeConfig.from_dict({**cfg.to_dict(), "num_attention_heads": 99})
    assert loaded.num_attention_heads == 6 and "num_attention_heads" in caplog.text
    assert JetMoeConfig.from_dict(cfg.to_dict()) == cfg


def test_original_names_are_aliases(tmp_path):
    original = {
        "model_type": "jetmoe", "ffn_hidden_size": 40, "moe_num_experts": 6, "moe_top_k": 3,
        "num_attention_heads": 48, "num_key_value_heads": 16, "glu": True, "bias": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(original))
    cfg = JetMoeConfig.from_pretrained(tmp_path)
    assert (cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok) == (40, 6, 3)
    assert cfg.num_attention_heads == 48 and cfg.extra == {"glu": True, "bias": True}
    assert JetMoeConfig.from_dict({"head_dim": 64}).kv_channels == 64
    out = cfg.to_dict()
    assert out["intermediate_size"] == 40 and out["num_local_experts"] == 6 and out["num_experts_per_tok"] == 3
    assert not {"ffn_hidden_size", "moe_num_experts", "moe_top_k"} & set(out)
    # both names in a file: Transformers' wins (it reads its own), as keywords an error
    assert JetMoeConfig.from_dict({"moe_top_k": 1, "num_experts_per_tok": 2}).num_experts_per_tok == 2
    with pytest.raises(ConfigError, match="moe_top_k"):
        JetMoeConfig(moe_top_k=1, num_experts_per_tok=2)


def test_both_rope_forms():
    a = JetMoeConfig(rope_theta=5000.0)
    b = JetMoeConfig(rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    assert a.rope_parameters == b.rope_parameters == {"rope_type": "default", "rope_theta": 5000.0}
    assert a.rope_theta == 5000.0
    assert JetMoeConfig(rope_parameters={"rope_type": "linear", "factor": 2.0}).rope_parameters["factor"] == 2.0
    assert JetMoeConfig(rope_parameters={"rope_type": "dynamic", "factor": 2.0}).rope_parameters == {
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}  # (no original context filled in)
    with pytest.raises(ConfigError, match="`kv_channels`"):  # its base scales by d / (d - 2)
        JetMoeConfig(kv_channels=2, rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ConfigError, match="rope_type"):
        JetMoeConfig(rope_parameters={"rope_type": "ntk", "factor": 2.0})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"num_key_value_heads": 0}, "num_key_value_heads"),
        ({"kv_channels": 0}, "kv_channels"),
        ({"kv_channels": 7}, "kv_channels"),
        ({"intermediate_size": 0}, "intermediate_size"),
        ({"num_local_experts": 0}, "num_local_experts"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
        ({"num_experts_per_tok": 9, "num_local_experts": 8}, "num_experts_per_tok"),
        ({"max_position_embeddings": 0}, "max_position_embeddings"),
        ({"activation_function": "swiglu-ish"}, "activation_function"),
        ({"aux_loss_coef": -0.1}, "aux_loss_coef"),
        ({"router_z_loss_coef": -1.0}, "router_z_loss_coef"),
        ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
        ({"attention_dropout": 1.0}, "attention_dropout"),
        ({"router_loss_recipe": "switch"}, "router_loss_recipe"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"problem_type": "ranking"}, "problem_type"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        JetMoeConfig(**kwargs)


@pytest.mark.parametrize("recipe", ["transformers", "jetmoe"])
def test_config_json_loads_in_transformers(recipe, tmp_path):
    cfg = JETMOE.our_config(router_loss_recipe=recipe, router_z_loss_coef=0.1 if recipe == "transformers" else 0.2)
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert ("router_loss_recipe" in saved) == (recipe == "jetmoe")
    assert ("router_z_loss_coef" in saved) == (recipe == "jetmoe")
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(theirs) is transformers.JetMoeConfig
    for k in JETMOE.base:
        assert getattr(theirs, k) == getattr(cfg, k), k
    assert theirs.num_attention_heads == cfg.num_attention_heads
    again = JetMoeConfig.from_pretrained(tmp_path)
    assert again.router_loss_recipe == recipe and again.router_z_loss_coef == cfg.router_z_loss_coef


# ---- MoA: tiled head mapping ------------------------------------------------------------------


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def direct_moa(attn, x_BTD, cos_BTd, sin_BTd, kv_head_of):
    """The MoA layer written per token, slot and head: slot k's g-th query head is head h = k*G + g
    and reads kv head `kv_head_of(h)`. Returns the output and the [B, H, T, T] weights."""
    B, T, D = x_BTD.shape
    K, G, d = attn.top_k, attn.n_kv, attn.head_dim
    mo = attn.experts
    keys, values = (x_BTD @ attn.kv_proj.weight.T).chunk(2, dim=-1)
    keys, values = keys.view(B, T, G, d), values.view(B, T, G, d)
    out = torch.zeros(B, T, D)
    weights = torch.zeros(B, K * G, T, T)
    for b in range(B):
        for t in range(T):
            logits = mo.router.layer.weight @ x_BTD[b, t]
            top, experts = logits.topk(K)
            gates = top.softmax(-1)
            for slot in range(K):
                e = experts[slot]
                q = (mo.input_linear.weight[e] @ x_BTD[b, t]).view(G, d)
                heads = []
                for g in range(G):
                    h = slot * G + g
                    kv = kv_head_of(h)
                    q_h = _rotate(q[g], cos_BTd[b, t], sin_BTd[b, t])
                    k_h = _rotate(keys[b, : t + 1, kv], cos_BTd[b, : t + 1], sin_BTd[b, : t + 1])
                    p = torch.softmax(k_h @ q_h * d**-0.5, dim=-1)
                    weights[b, h, t, : t + 1] = p
                    heads.append(p @ values[b, : t + 1, kv])
                out[b, t] += gates[slot] * (mo.output_linear.weight[e] @ torch.cat(heads))
            out[b, t] += mo.bias
    return out, weights


@pytest.mark.parametrize(("kv_heads", "top_k"), [(2, 2), (3, 2), (2, 3)])
def test_tiled_head_mapping_matches_direct_reference(kv_heads, top_k):
    cfg = JETMOE.our_config(num_key_value_heads=kv_heads, num_experts_per_tok=top_k, kv_channels=8)
    model = JetMoeModel(cfg)
    randomize_(model, 1)
    attn = model.layers[0].self_attention.eval()
    B, T = 2, 5
    x = torch.randn(B, T, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    cos, sin = model.rotary_emb(torch.arange(T)[None].expand(B, -1), x.dtype, False)
    ref, ref_w = direct_moa(attn, x, cos, sin, kv_head_of=lambda h: h % kv_heads)
    with torch.no_grad():
        for impl in ("eager", "sdpa"):
            attn.attn_implementation = impl
            y, w, _ = attn(x, (cos, sin), None, True, None, torch.arange(T), impl == "eager")
            # the attention returns the combined experts; the decoder layer adds the bias with the residual
            close(y + attn.experts.bias, ref, f"MoA output ({impl})")
            if impl == "eager":
                close(w, ref_w, "attention weights in Transformers' head order")
    # The GQA mapping (head h -> kv head h // (H/G)) gives a different layer: the check can tell.
    grouped, _ = direct_moa(attn, x, cos, sin, kv_head_of=lambda h: h // top_k)
    assert not torch.allclose(grouped, ref, atol=1e-3)


# ---- router loss recipes ------------------------------------------------------------------------


def _capture_router_logits(model):
    """Every router's logits, in call order (each router fires once per layer)."""
    seen = []
    for layer in model.model.layers:
        for router in (layer.self_attention.experts.router.layer, layer.mlp.router.layer):
            router.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().float()))
    return seen


def test_router_loss_recipes():
    E, K, coef, z_coef = 4, 2, 0.05, 0.3
    model = tiny_lm(seed=4, router_loss_recipe="jetmoe", router_z_loss_coef=z_coef, aux_loss_coef=coef)
    seen = _capture_router_logits(model)
    ids, mask = make_inputs(97, 3, 7, "left", seed=3)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    assert len(seen) == 2 * model.config.num_hidden_layers and len(out.router_logits) == 3 * 2
    valid = mask.reshape(-1).bool()
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)

    # "jetmoe": each router once; its Switch loss normalises the top-k counts over all T*K
    # assignments (the original code's F.normalize), plus z_coef * mean logsumexp^2.
    expected = torch.zeros(())
    for logits in seen:
        z = logits[valid]
        probs_E = z.softmax(-1).sum(0)
        freq_E = F.one_hot(z.topk(K, dim=-1).indices, E).sum((0, 1)).float()
        switch = E * (F.normalize(probs_E, p=1, dim=0) * F.normalize(freq_E, p=1, dim=0)).sum()
        expected = expected + switch + z_coef * torch.logsumexp(z, -1).square().mean()
    close(out.aux_loss, expected, "jetmoe recipe aux_loss")
    close(out.loss, ce + coef * expected, "jetmoe recipe loss")

    # "transformers": one Switch loss over [attention, attention again, MLP] of every layer.
    model.config.router_loss_recipe = "transformers"
    seen.clear()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    entries = [r for a, m in zip(seen[0::2], seen[1::2]) for r in (a, a, m)]
    counts_E, probs_E = torch.zeros(E), torch.zeros(E)
    for logits in entries:
        z = logits[valid]
        counts_E += F.one_hot(z.topk(K, dim=-1).indices, E).sum((0, 1))
        probs_E += z.softmax(-1).sum(0)
    rows = valid.sum() * len(entries)
    expected = E * ((counts_E / rows) * (probs_E / rows)).sum()
    close(out.aux_loss, expected, "transformers recipe aux_loss")
    close(out.loss, ce + coef * expected, "transformers recipe loss")


# ---- tied embeddings --------------------------------------------------------------------------


def _keys(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def _check_reload(model, path, ids):
    model.save_pretrained(path)
    ours = JetMoeForCausalLM.from_pretrained(path)
    hf = transformers.JetMoeForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tied = model.config.tie_word_embeddings
    assert ("lm_head.weight" in _keys(path)) != tied  # as Transformers writes it
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tied
    with torch.no_grad():
        ref = model(ids).logits
        close(ours(ids).logits, ref, "reloaded by moetorch")
        close(hf(ids).logits, ref, "loaded by Transformers")


@pytest.mark.parametrize("tied", [True, False])
def test_embeddings_tie_through_save_load_and_resize(tied, tmp_path):
    model = tiny_lm(seed=5, tie_word_embeddings=tied)
    ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    _check_reload(model, tmp_path / "before", ids)
    old_head = model.lm_head.weight.detach().clone()
    model.resize_token_embeddings(120)
    assert model.config.vocab_size == 120 and model.lm_head.weight.shape == (120, 32)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    close(model.lm_head.weight[:97], old_head, "kept rows of the head")
    _check_reload(model, tmp_path / "after", ids)


# ---- cache continuation -------------------------------------------------------------------------


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("padding", [None, "left"])
def test_cache_continuation_equals_full_forward(cache_kind, padding):
    model = tiny_lm(seed=6, num_key_value_heads=2, kv_channels=8)
    B, P, N = 3, 5, 4
    ids, mask = make_inputs(97, B, P + N, padding, seed=8)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        cache = DynamicCache() if cache_kind == "dynamic" else StaticCache(model.config, max_cache_len=12)
        steps = [model(ids[:, :P], attention_mask=None if mask is None else mask[:, :P], past_key_values=cache)]
        for t in range(P, P + N):
            m = None if mask is None else mask[:, : t + 1]
            steps.append(model(ids[:, t : t + 1], attention_mask=m, past_key_values=cache))
    assert all(s.past_key_values is cache for s in steps)
    inc = torch.cat([s.logits for s in steps], dim=1)
    valid = torch.ones(B, P + N, dtype=torch.bool) if mask is None else mask.bool()
    close(inc[valid], full[valid], f"{cache_kind} cache continuation")
    # The cache holds the shared K/V once: G heads of kv_channels, not the K*G tiled heads.
    k, v = cache[0]
    assert k.shape[:2] == v.shape[:2] == (B, 2) and k.shape[-1] == 8
    assert cache.get_seq_length() == P + N


# ---- MoA expert seams ---------------------------------------------------------------------------


def _routing(case: str, T: int, K: int, E: int, g: torch.Generator) -> torch.Tensor:
    if case == "random":
        return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    if case == "empty_experts":  # experts 1 and 3 get no token
        pool = torch.tensor([0, 2])
        return torch.stack([pool[torch.randperm(2, generator=g)[:K]] for _ in range(T)])
    return torch.full((T, K), E - 1)  # every assignment on one expert


# grouped_mm runs on CUDA only: moetorch/gpu_check.py checks it there against the same reference.
BACKENDS = ["gather"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["random", "empty_experts", "one_expert"])
@pytest.mark.parametrize("K", [1, 2])
def test_expert_map_and_reduce_backends_match_reference(backend, case, K):
    T, E, D, C = 7, 4, 16, 24
    g = torch.Generator().manual_seed(K)
    ids = _routing(case, T, K, E, g)
    x = torch.randn(T, D, generator=g)
    w_map, w_red = torch.randn(E, C, D, generator=g), torch.randn(E, D, C, generator=g)
    h = torch.randn(T, K, C, generator=g)
    gates = torch.rand(T, K, generator=g)
    # The definitions, written out per (token, slot).
    want_map = torch.stack([torch.stack([w_map[ids[t, k]] @ x[t] for k in range(K)]) for t in range(T)])
    want_red = torch.stack([sum(gates[t, k] * (w_red[ids[t, k]] @ h[t, k]) for k in range(K)) for t in range(T)])
    close(moe.expert_map(x, w_map, ids, "reference"), want_map, "reference map")
    close(moe.expert_reduce(h, w_red, ids, gates, "reference"), want_red, "reference reduce")

    # Gradients sum products of O(100) terms in different orders: float32 round-off is ~1e-5 absolute.
    device, dtype, tol = ("cuda", torch.bfloat16, 3e-2) if backend == "grouped_mm" else ("cpu", torch.float32, 1e-4)
    args = [t.to(device, dtype).requires_grad_() for t in (x, w_map, w_red, h, gates)]
    grads = {}
    for name in ("reference", backend):
        xs, wm, wr, hs, gs = args
        y_map = moe.expert_map(xs, wm, ids.to(device), name)
        y_red = moe.expert_reduce(hs, wr, ids.to(device), gs, name)
        (y_map.float().square().sum() + y_red.float().square().sum()).backward()
        grads[name] = (y_map.detach(), y_red.detach(), *(a.grad.clone() for a in args))
        for a in args:
            a.grad = None
    for i, (a, b) in enumerate(zip(grads["reference"], grads[backend])):
        close(b.float(), a.float(), f"{backend} vs reference, output/grad {i}", atol=tol, rtol=tol)


# ---- attention weights in the graph -------------------------------------------------------------


@pytest.mark.parametrize("padding", [None, "left"])
def test_returned_attentions_get_gradients_as_in_transformers(padding, tmp_path):
    """output_attentions=True: the returned weights are the tensor the output is computed from (with
    the tiled heads too), so after retain_grad() a backward from the output reaches them, as in
    Transformers (its test_retain_grad_hidden_states_attentions); the gradients are Transformers'."""
    hf, ours = make_pair(JETMOE, tmp_path, "model", "hf_to_ours", seed=9)
    assert ours.config.num_attention_heads > ours.config.num_key_value_heads > 1  # the tiled layout
    ids, mask = make_inputs(hf.config.vocab_size, 3, 7, padding, seed=5)
    valid = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
    g = torch.Generator().manual_seed(3)
    probe = torch.randn(*ids.shape, hf.config.hidden_size, generator=g) * valid[..., None]
    grads = []
    for model in (hf, ours):
        out = model(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        kept = [*out.attentions, *out.hidden_states]
        for t in kept:
            t.retain_grad()
        (out.last_hidden_state * probe).sum().backward()
        assert all(t.grad is not None for t in kept)
        grads.append((out.attentions, [t.grad for t in out.attentions], [t.grad for t in out.hidden_states[:-1]]))
    (hf_attn, hf_attn_grads, hf_hidden_grads), (attn, attn_grads, hidden_grads) = grads
    for layer, (a, b, ga, gb) in enumerate(zip(hf_attn, attn, hf_attn_grads, attn_grads)):
        # [B, H, T, S], the real queries' rows
        a, b, ga, gb = (t.transpose(1, 2)[valid] for t in (a.detach(), b.detach(), ga, gb))
        close(b, a, f"attentions[{layer}]")  # the same numbers as before
        close(gb, ga, f"attentions[{layer}].grad", atol=1e-5, rtol=1e-4)
    for layer, (ga, gb) in enumerate(zip(hf_hidden_grads, hidden_grads)):
        close(gb[valid], ga[valid], f"hidden_states[{layer}].grad", atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", [None, "left"])
def test_attention_dropout_draws_as_transformers(impl, padding, tmp_path):
    """Training with attention dropout under a seed: the same dropout masks as Transformers (drawn
    over the query heads in their tiled order, with the keys and values repeated to it), so the
    same loss and gradients, eager and sdpa, with and without padding."""
    hf, ours = make_pair(JETMOE, tmp_path, seed=4, attention_dropout=0.3)
    for model in (hf, ours):
        model.set_attn_implementation(impl)
        model.train()
    ids, mask = make_inputs(JETMOE.base["vocab_size"], 2, 9, padding)
    seed = int(torch.randint(0, 2**31, (1,)))
    runs = []
    for model in (hf, ours):
        torch.manual_seed(seed)
        loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                     torch.rand(2)))
    (want, want_grads, want_rng), (got, got_grads, got_rng) = runs
    close(got, want, "loss with attention dropout")
    assert torch.equal(got_rng, want_rng)
    for name, grad in want_grads.items():
        close(got_grads[name], grad, f"gradient of {name}", atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("top_k", [3, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sums_k_experts_as_transformers(top_k, dtype, tmp_path):
    """In half precision a token's K expert terms (MLP and attention experts) are summed in float32
    and rounded once, as Transformers' one index_add of every term does on the CPU: three or four
    experts a token give Transformers' outputs bit for bit (adding term by term rounded after each)."""
    cfg = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
               intermediate_size=16, num_local_experts=5, num_experts_per_tok=top_k, max_position_embeddings=64)
    src = JetMoeModel(JetMoeConfig(**cfg))
    gen = torch.Generator().manual_seed(top_k)
    with torch.no_grad():
        for name, p in sorted(src.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if "norm" in name else 0.0))
    src.save_pretrained(tmp_path)
    hf = transformers.JetMoeModel.from_pretrained(tmp_path, dtype=dtype).eval()
    ours = JetMoeModel.from_pretrained(tmp_path, dtype=dtype).eval()
    ids = torch.randint(1, 100, (2, 12), generator=gen)
    with torch.no_grad():
        want, got = hf(ids).last_hidden_state, ours(ids).last_hidden_state
    assert got.dtype == dtype and torch.equal(got, want)
