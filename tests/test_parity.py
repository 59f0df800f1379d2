"""Numerical parity with Transformers on tiny random models, for every architecture in ARCHS."""

from __future__ import annotations

import itertools

import pytest
import torch
from archs import ARCH_IDS, ARCHS, JETMOE, PHIMOE, longrope_scaling
from parity import close, compare_outputs, make_inputs, make_pair

from moetorch import ConfigError, DynamicCache, StaticCache
from moetorch.utils import WARNED_ONCE

ALL = {"output_hidden_states": True, "output_attentions": True, "output_router_logits": True}


VARIANTS = [(a, v) for a in ARCHS for v in a.variants]
VARIANT_IDS = [f"{a.name}-{v}" for a, v in VARIANTS]


@pytest.mark.parametrize(("arch", "variant_name"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("direction", ["hf_to_ours", "ours_to_hf"])
def test_causal_lm_parity(arch, variant_name, direction, tmp_path):
    hf, ours = make_pair(arch, tmp_path, "causal_lm", direction, seed=3, **arch.variants[variant_name])
    for padding in (None, "none", "left", "right"):
        ids, mask = make_inputs(hf.config.vocab_size, 3, 9, padding, seed=7)
        labels = ids.masked_fill(mask == 0, -100) if mask is not None else ids
        with torch.no_grad():
            a = hf(ids, attention_mask=mask, labels=labels, **ALL)
            b = ours(ids, attention_mask=mask, labels=labels, **ALL)
        compare_outputs(a, b, mask)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_base_model_parity_and_inputs_embeds(arch, tmp_path):
    hf, ours = make_pair(arch, tmp_path, "model", "hf_to_ours", seed=4)
    ids, mask = make_inputs(hf.config.vocab_size, 2, 6, "left", seed=2)
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, output_hidden_states=True)
        b = ours(ids, attention_mask=mask, output_hidden_states=True)
        c = ours(inputs_embeds=ours.embed_tokens(ids), attention_mask=mask, output_hidden_states=True)
    valid = mask.bool()
    close(a.last_hidden_state[valid], b.last_hidden_state[valid], "last_hidden_state")
    close(b.last_hidden_state, c.last_hidden_state, "inputs_embeds path")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("head", ["model", "causal_lm"])
def test_output_fields_in_transformers_order(arch, head, tmp_path):
    """The fields each flag adds, in Transformers' order, by key and by position in the tuple
    (`return_dict=False`), with and without the cache."""
    hf, ours = make_pair(arch, tmp_path, head, "hf_to_ours", seed=6)
    ids, _ = make_inputs(hf.config.vocab_size, 2, 5, None, seed=3)
    for flags in itertools.product([False, True], repeat=4):
        kw = dict(zip(("output_attentions", "output_hidden_states", "output_router_logits", "use_cache"), flags))
        with torch.no_grad():
            a, b = hf(ids, **kw), ours(ids, **kw)
            assert list(b.keys()) == list(a.keys()), kw
            fields = hf(ids, return_dict=False, **kw), ours(ids, return_dict=False, **kw)
        assert len(fields[0]) == len(fields[1]), kw
        for key, x, y in zip(a.keys(), *fields):
            if key != "past_key_values":
                close(torch.stack(list(x)) if isinstance(x, tuple) else x,
                      torch.stack(list(y)) if isinstance(y, tuple) else y, f"{key}, {kw}")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_loss_arguments_and_accepted_flags(arch, tmp_path):
    """The loss arguments Transformers' causal LM passes to its loss: `ignore_index`, `shift_labels`
    (labels already shifted, which then take the place of the shifted `labels`), and
    `num_items_in_batch`; and `output_router_logits` on the classifier, which its output leaves out."""
    hf, ours = make_pair(arch, tmp_path / "lm", "causal_lm", "hf_to_ours", seed=8)
    ids, mask = make_inputs(hf.config.vocab_size, 2, 7, "left", seed=4)
    g = torch.Generator().manual_seed(5)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, 5, ids)
    shifted = torch.randint(0, hf.config.vocab_size, ids.shape, generator=g).masked_fill(mask == 0, -100)
    cases = [dict(labels=labels, ignore_index=5), dict(labels=ids, shift_labels=shifted),
             dict(labels=labels, ignore_index=5, num_items_in_batch=9), dict(labels=ids, shift_labels=shifted,
                                                                             output_router_logits=True)]
    with torch.no_grad():
        for kw in cases:
            close(hf(ids, attention_mask=mask, **kw).loss, ours(ids, attention_mask=mask, **kw).loss, f"loss, {kw.keys()}")
    hf, ours = make_pair(arch, tmp_path / "cls", "seq_cls", "hf_to_ours", seed=8)
    with torch.no_grad():
        a, b = (m(ids, attention_mask=mask, output_router_logits=True) for m in (hf, ours))
    assert list(a.keys()) == list(b.keys())
    close(a.logits, b.logits, "classifier logits")


SCALED_ROPE = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-defaults": {"rope_type": "yarn", "factor": 2.0},  # the original context filled in
    "yarn-mscales": {"rope_type": "yarn", "factor": 8.0, "mscale": 0.9, "mscale_all_dim": 0.7, "beta_fast": 16,
                     "beta_slow": 2, "truncate": False, "original_max_position_embeddings": 8},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("rope", list(SCALED_ROPE))
def test_jetmoe_scaled_rope_types_match_transformers(rope, tmp_path):
    """Transformers' linear, yarn and llama3 `rope_type`s of JetMoE (its PhiMoE config takes
    LongRoPE only): the logits of a prompt and of steps on a dynamic and a static cache, in both
    directions of save and load."""
    arch = JETMOE
    params = dict(SCALED_ROPE[rope], rope_theta=100.0)  # a small base: the scaling moves every dimension
    for direction in ("hf_to_ours", "ours_to_hf"):
        hf, ours = make_pair(arch, tmp_path / direction, "causal_lm", direction, seed=7, rope_parameters=params,
                             max_position_embeddings=64)
        ids, mask = make_inputs(hf.config.vocab_size, 2, 12, "left", seed=5)
        plain = arch.ours["causal_lm"](arch.our_config(max_position_embeddings=64))
        plain.load_state_dict(ours.state_dict())
        with torch.no_grad():
            want = hf(ids, attention_mask=mask).logits
            close(want[mask.bool()], ours(ids, attention_mask=mask).logits[mask.bool()], f"{rope} logits")
            assert (want - plain.eval()(ids, attention_mask=mask).logits).abs().max() > 1e-2, "the scaling did nothing"
            for cache in (DynamicCache(), StaticCache(ours.config, max_cache_len=16)):
                ours(ids[:, :9], attention_mask=mask[:, :9], past_key_values=cache, use_cache=True)
                got = ours(ids[:, 9:], attention_mask=mask, past_key_values=cache).logits
                close(want[:, 9:], got, f"{rope} after a {type(cache).__name__}")


def test_scaled_rope_errors_name_the_field():
    for params, field in (({"rope_type": "linear"}, "factor"), ({"rope_type": "yarn", "factor": -2.0}, "factor"),
                          ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "high_freq_factor"),
                          ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
                           "high_freq_factor"),
                          ({"rope_type": "dynamic"}, "factor"), ({"rope_type": "ntk", "factor": 2.0}, "rope_type"),
                          ({"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 4},
                           "short_factor"),
                          ({"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4,
                            "attention_factor": -1.0}, "attention_factor"),
                          ({"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4,
                            "original_max_position_embeddings": 1}, "original_max_position_embeddings"),
                          # inf, a zero or nan entry, or partial rotation: nan logits (or, in Transformers,
                          # a failing model) rather than an error
                          ({"rope_type": "dynamic", "factor": float("inf")}, "factor"),
                          ({"rope_type": "yarn", "factor": float("inf")}, "factor"),
                          ({"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4,
                            "factor": float("inf")}, "factor"),
                          ({"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4,
                            "attention_factor": float("inf")}, "attention_factor"),
                          ({"rope_type": "longrope", "short_factor": [1.0, 0.0, 1.0, 1.0], "long_factor": [1.0] * 4},
                           "short_factor"),
                          ({"rope_type": "longrope", "short_factor": [1.0] * 4,
                            "long_factor": [2.0, float("nan"), 8.0, 16.0]}, "long_factor"),
                          ({"rope_type": "dynamic", "factor": 2.0, "partial_rotary_factor": 0.5},
                           "partial_rotary_factor")):
        with pytest.raises(ConfigError, match=f"rope_parameters.{field}"):
            JETMOE.our_config(rope_parameters=params)
    with pytest.raises(ConfigError, match="rope_parameters.rope_type"):  # as Transformers' PhiMoE config
        PHIMOE.our_config(rope_parameters={"rope_type": "linear", "factor": 2.0})
    assert JETMOE.our_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "partial_rotary_factor": 1.0})


PER_FORWARD_ROPE = {
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "dynamic-factor-1.5": {"rope_type": "dynamic", "factor": 1.5},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 16.0],
                 "original_max_position_embeddings": 12},
    "longrope-factor": {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 2.0],
                        "long_factor": [3.0, 2.0, 5.0, 9.0], "original_max_position_embeddings": 10, "factor": 4.0},
}


def _rope_state(hf, ours) -> tuple:
    """(Transformers' longest sequence since a reset, moetorch's) for "dynamic"."""
    return int(hf.model.rotary_emb.max_seq_len_cached), int(ours.model.rotary_emb.seq_len_cached)


@pytest.mark.parametrize("rope", list(PER_FORWARD_ROPE))
def test_jetmoe_per_forward_rope_types_match_transformers(rope, tmp_path):
    """JetMoE's "dynamic" and "longrope" `rope_type`s, whose table follows each forward's largest
    position, as Transformers' `dynamic_rope_update` picks it: whole forwards of growing and
    shrinking lengths around `max_position_embeddings` (the dynamic table's growth and reset carry
    from one forward to the next), then greedy search past it with a left-padded batch on a dynamic
    cache, a static cache, without a cache, by beam search and with the prompt in chunks (each
    chunk's largest position picks its table), and prompt lookup, in both directions of save and
    load. Each library starts from a fresh model (its state: the plain table)."""
    arch = JETMOE
    params = dict(PER_FORWARD_ROPE[rope], rope_theta=100.0)
    kw = dict(rope_parameters=params, max_position_embeddings=16, num_key_value_heads=2, kv_channels=8)
    for direction in ("hf_to_ours", "ours_to_hf"):
        hf, ours = make_pair(arch, tmp_path / direction, "causal_lm", direction, seed=7, **kw)
        plain = arch.ours["causal_lm"](arch.our_config(**{**kw, "rope_parameters": {"rope_theta": 100.0}}))
        plain.load_state_dict(ours.state_dict())
        ids = make_inputs(hf.config.vocab_size, 2, 40, None, seed=5)[0]
        with torch.no_grad():
            for T in (10, 30, 20, 12, 25, 16, 40, 17):
                want = hf(ids[:, :T]).logits
                close(want, ours(ids[:, :T]).logits, f"{rope}, a forward of {T} tokens after the ones before")
                if rope.startswith("dynamic"):
                    assert _rope_state(hf, ours)[0] == _rope_state(hf, ours)[1], f"{rope}: state after {T} tokens"
            assert (want - plain.eval()(ids[:, :T]).logits).abs().max() > 1e-2, "the scaling did nothing"
        ids, mask = make_inputs(hf.config.vocab_size, 3, 10, "left", seed=11)
        # the prompt in chunks of 8: one past the length where the table changes, so that the last
        # chunk's largest position, not the one before it, picks the table of the chunk's keys
        crossing = params.get("original_max_position_embeddings", 16) + 1
        chunked = make_inputs(hf.config.vocab_size, 2, crossing, "left", seed=12)
        cases = [(ids, mask, dict()), (ids, mask, dict(cache_implementation="static")),
                 (ids, mask, dict(use_cache=False)), (ids, mask, dict(num_beams=3)),
                 (*chunked, dict(prefill_chunk_size=8)),
                 (*chunked, dict(prefill_chunk_size=8, cache_implementation="static"))]
        for prompt, prompt_mask, case in cases:
            fresh_hf, fresh = make_pair(arch, tmp_path / direction / "fresh", "causal_lm", direction, seed=7, **kw)
            settings = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                            output_logits=True, **case)
            a = fresh_hf.generate(prompt, attention_mask=prompt_mask, **settings)
            b = fresh.generate(prompt, attention_mask=prompt_mask, **settings)
            assert torch.equal(a.sequences, b.sequences), f"{rope}, {case}: tokens"
            if case.get("num_beams") is None:
                for step, (x, y) in enumerate(zip(a.logits, b.logits)):
                    close(x, y, f"{rope}, {case}: logits of new token {step}")
            if rope.startswith("dynamic"):
                assert _rope_state(fresh_hf, fresh)[0] == _rope_state(fresh_hf, fresh)[1] > 16, f"{rope}, {case}"
        fresh_hf, fresh = make_pair(arch, tmp_path / direction / "lookup", "causal_lm", direction, seed=7, **kw)
        row = torch.cat([ids[:1], ids[:1, 2:8]], dim=1)  # repeats, so that drafts are found
        a, b = (m.generate(row, max_new_tokens=20, do_sample=False, pad_token_id=0, prompt_lookup_num_tokens=3)
                for m in (fresh_hf, fresh))
        assert torch.equal(a, b), f"{rope}: prompt lookup"


def test_per_forward_rope_state_follows_dtype_and_device_moves(tmp_path):
    """"dynamic" keeps its longest sequence in the module across forwards and calls, and across a
    dtype change, which remakes the tables in float32 (as Transformers keeps them, against its
    model on the same calls); the graphed prompt and verify chunks, whose padding would move the
    table, leave such a model's forwards unpadded."""
    from moetorch.engine.cuda_graph import GraphedChunk, GraphedPrefill

    model = JETMOE.ours["causal_lm"](JETMOE.our_config(
        rope_parameters={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16)).eval()
    rotary = model.model.rotary_emb
    plain = rotary.inv_freq.clone()
    model(torch.randint(1, 50, (1, 30)))
    assert int(rotary.seq_len_cached) == 30 and not torch.equal(rotary.inv_freq, plain)
    torch.testing.assert_close(rotary.inv_freq, rotary.dynamic_inv_freq(torch.tensor(30)), rtol=0, atol=0)
    model(torch.randint(1, 50, (1, 20)))  # shorter, still past the plain length: the table stays
    assert int(rotary.seq_len_cached) == 30
    model(torch.randint(1, 50, (1, 5)))  # within it: the plain table again
    assert int(rotary.seq_len_cached) == 16 and torch.equal(rotary.inv_freq, plain)
    model(torch.randint(1, 50, (1, 30)))
    grown = rotary.inv_freq.clone()
    model.to(torch.float64)
    assert int(rotary.seq_len_cached) == 30 and rotary.inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, grown)
    hf, ours = make_pair(JETMOE, tmp_path, "causal_lm", "ours_to_hf", seed=2, max_position_embeddings=16,
                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 100.0})
    ids = make_inputs(hf.config.vocab_size, 1, 30, None, seed=3)[0]
    with torch.no_grad():
        for step, T in enumerate((30, 20, 25)):  # the table of 30 kept across the move
            close(hf(ids[:, :T]).logits, ours(ids[:, :T]).logits, f"{T} tokens")
            if step == 0:
                hf.double()
                ours.double()
    cache = StaticCache(model.config, max_cache_len=64)
    assert GraphedPrefill(model, cache, 1)(torch.ones(1, 5, dtype=torch.long), None, None) is None
    assert GraphedChunk(model, cache, 1)(torch.ones(1, 3, dtype=torch.long), None, None, 0) is None


def test_continuous_batching_refuses_a_per_forward_rope_table():
    model = JETMOE.ours["causal_lm"](JETMOE.our_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ValueError, match="rope_type 'dynamic'.*generate"):
        model.generate_batch([[1, 2, 3]], max_new_tokens=2)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_float64_models_match_transformers(arch, impl, tmp_path):
    """A model in float64 (`model.double()`): logits and greedy tokens of Transformers' model in
    float64 (its PhiMoE experts made eager: its grouped ones take no float64). The eager
    attention's mask once failed there (the dtype's minimum built as a float32 tensor)."""
    hf, ours = make_pair(arch, tmp_path, "causal_lm", "hf_to_ours", seed=3)
    if arch is PHIMOE:
        hf.set_experts_implementation("eager")
    for model in (hf, ours):
        model.set_attn_implementation(impl)
        model.double()
    ids, _ = make_inputs(hf.config.vocab_size, 2, 9, None, seed=7)
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids).logits
    assert got.dtype == torch.float64
    close(want, got, f"float64 {impl} logits", atol=1e-10, rtol=1e-10)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(hf.generate(ids, **kw), ours.generate(ids, **kw))


@pytest.mark.parametrize(("arch", "variant_name"), VARIANTS, ids=VARIANT_IDS)
def test_sdpa_and_eager_agree_with_transformers(arch, variant_name, tmp_path):
    hf, ours = make_pair(arch, tmp_path, "causal_lm", "hf_to_ours", seed=5, **arch.variants[variant_name])
    ids, mask = make_inputs(hf.config.vocab_size, 3, 8, "left", seed=9)
    valid = mask.bool()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        for impl in ("eager", "sdpa"):
            ours.set_attn_implementation(impl)
            out = ours(ids, attention_mask=mask).logits
            assert torch.isfinite(out).all(), impl
            close(ref[valid], out[valid], f"logits with {impl}")
        # sdpa cannot return weights: asking for them computes this call eagerly.
        w = ours(ids, attention_mask=mask, output_attentions=True).attentions
        assert w is not None and w[0].shape == (3, hf.config.num_attention_heads, 8, 8)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("problem_type", ["regression", "single_label_classification", "multi_label_classification"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_sequence_classification_parity(arch, problem_type, padding, tmp_path):
    num_labels = 1 if problem_type == "regression" else 3
    hf, ours = make_pair(arch, tmp_path, "seq_cls", "ours_to_hf", seed=6, num_labels=num_labels)
    ids, mask = make_inputs(hf.config.vocab_size, 4, 7, padding, seed=11)
    g = torch.Generator().manual_seed(3)
    if problem_type == "regression":
        labels = torch.randn(4, generator=g)
    elif problem_type == "single_label_classification":
        labels = torch.randint(0, num_labels, (4,), generator=g)
    else:
        labels = (torch.rand(4, num_labels, generator=g) > 0.5).float()
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, labels=labels)
        b = ours(ids, attention_mask=mask, labels=labels)
    assert hf.config.problem_type == ours.config.problem_type == problem_type
    close(a.logits, b.logits, "pooled logits")
    close(a.loss, b.loss, "loss")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_sequence_classification_without_pad_token(arch, tmp_path):
    ours = arch.ours["seq_cls"](arch.our_config(pad_token_id=None, num_labels=2)).eval()
    ids = torch.randint(1, 50, (2, 5))
    with pytest.raises(ValueError, match="no padding token"):
        ours(ids)
    assert ours(ids[:1]).logits.shape == (1, 2)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_training_gradients_match(arch, tmp_path):
    """Train mode, no input jitter: with the same seed both libraries draw the same routing
    samples, so losses and every parameter gradient agree."""
    hf, ours = make_pair(arch, tmp_path, "causal_lm", "hf_to_ours", seed=8, **arch.train_overrides)
    hf.train()
    ours.train()
    ids, mask = make_inputs(hf.config.vocab_size, 2, 7, "left", seed=4)
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(123)
    a = hf(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    torch.manual_seed(123)
    b = ours(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    close(a.loss, b.loss, "train loss")
    close(a.aux_loss, b.aux_loss, "train aux_loss")
    a.loss.backward()
    b.loss.backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    n_checked = 0
    for name, p in ours.named_parameters():
        ref = hf_grads[name]
        assert (ref is None) == (p.grad is None), name
        if ref is not None:
            close(ref, p.grad, f"grad of {name}", atol=1e-5, rtol=1e-4)
            n_checked += 1
    assert n_checked == len(list(ours.parameters()))


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_logits_to_keep(arch, tmp_path):
    hf, ours = make_pair(arch, tmp_path, "causal_lm", "hf_to_ours", seed=2)
    ids, _ = make_inputs(hf.config.vocab_size, 2, 6, None)
    with torch.no_grad():
        full = ours(ids).logits
        close(ours(ids, logits_to_keep=1).logits, full[:, -1:], "logits_to_keep=1")
        close(ours(ids, logits_to_keep=torch.tensor([0, 3])).logits, full[:, [0, 3]], "logits_to_keep=indices")
        close(hf(ids, logits_to_keep=2).logits, ours(ids, logits_to_keep=2).logits, "vs transformers")
        # Transformers' 2D forms: positions per row, and a boolean mask (flattened)
        rows = torch.tensor([[5, 1], [0, 2]])
        mask = torch.tensor([[True, False, True, False, False, True], [False] * 5 + [True]])
        for keep in (rows, mask):
            want = hf(ids, logits_to_keep=keep).logits
            got = ours(ids, logits_to_keep=keep).logits
            assert got.shape == want.shape == ((2, 2, hf.config.vocab_size) if keep is rows else (4, hf.config.vocab_size))
            close(want, got, f"logits_to_keep {keep.dtype} [2, n]")
        close(ours(ids, logits_to_keep=rows).logits, torch.stack([full[0, [5, 1]], full[1, [0, 2]]]), "rows")


def _autocast_run(model, ids, mask, enabled=True):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled), torch.no_grad():
        return model(ids, attention_mask=mask).logits.float().log_softmax(-1)


@pytest.mark.parametrize("train", [False, True])
def test_jetmoe_under_bf16_autocast_is_transformers_bit_for_bit(train, tmp_path):
    """bf16 autocast over float32 weights (mixed-precision training): each matmul rounds where
    Transformers' does, and the experts' weighted sums stay in float32 as Transformers keeps them,
    so the logits are Transformers' exactly; the loss's gradients agree to bf16's rounding."""
    hf, ours = make_pair(JETMOE, tmp_path, "causal_lm", "hf_to_ours", seed=5)
    ids, mask = make_inputs(hf.config.vocab_size, 3, 11, "left", seed=6)
    hf.train(train)
    ours.train(train)
    assert torch.equal(_autocast_run(ours, ids, mask), _autocast_run(hf, ids, mask))
    grads = []
    for model in (hf, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[1].items():
        ref = grads[0][name]
        assert (g - ref).norm() <= 2e-2 * ref.norm() + 1e-6, name


def test_phimoe_under_bf16_autocast_is_as_close_to_float32_as_transformers(tmp_path):
    """Transformers 5.23 runs PhiMoE's experts in their weights' float32 under autocast (its
    grouped_mm is no autocast op); moetorch multiplies in bf16 as autocast does (docs/differences.md)
    and, as Transformers, weights and sums the experts' outputs in float32. Its bf16 logits are as
    close to the float32 ones as Transformers' (before the float32 sum: 6x further)."""
    hf, ours = make_pair(PHIMOE, tmp_path, "causal_lm", "hf_to_ours", seed=5)
    ids, mask = make_inputs(hf.config.vocab_size, 8, 24, "left", seed=6)
    want = _autocast_run(hf, ids, mask, enabled=False)
    valid = mask.bool()
    err_hf = (_autocast_run(hf, ids, mask) - want)[valid].abs().mean()
    err_ours = (_autocast_run(ours, ids, mask) - want)[valid].abs().mean()
    assert err_ours <= 1.5 * err_hf, (err_ours, err_hf)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_packed_sequences_attend_within_their_own_as_in_transformers(arch, tmp_path, caplog):
    """A packed batch (several sequences in a row, positions starting again at 0, no attention
    mask; what TRL's packing and padding-free collators give, with flash-attention's keywords
    beside): each token sees its own sequence only, as Transformers reads it, so each sequence's
    logits are those of its own forward."""
    hf, ours = make_pair(arch, tmp_path, "causal_lm", "hf_to_ours", seed=6)
    ids, _ = make_inputs(hf.config.vocab_size, 2, 12, None, seed=8)
    lengths = [[5, 7], [3, 4, 5]]
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    cu = torch.tensor([0, 5, 12, 15, 19, 24], dtype=torch.int32)
    packing = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)
    with torch.no_grad():
        a = hf(ids, position_ids=pos, labels=ids, use_cache=False, **packing)
        b = ours(ids, position_ids=pos, labels=ids, use_cache=False, **packing)
        close(b.logits, a.logits, "packed logits")
        close(b.loss, a.loss, "packed loss")
        for row, ns in enumerate(lengths):
            start = 0
            for n in ns:
                alone = ours(ids[row : row + 1, start : start + n], use_cache=False).logits[0]
                close(b.logits[row, start : start + n], alone, f"sequence at {start} of row {row}")
                start += n
        base = ours.model(ids, position_ids=pos, use_cache=False, **packing).last_hidden_state
        close(base, hf.model(ids, position_ids=pos, use_cache=False, **packing).last_hidden_state, "base model")
    # a keyword the forward does not take is ignored, as Transformers ignores it, with a warning that names it

    WARNED_ONCE.clear()
    with caplog.at_level("WARNING", logger="moetorch"), torch.no_grad():
        close(ours(ids, position_ids=pos, cu_seqlens=cu).logits, hf(ids, position_ids=pos, cu_seqlens=cu).logits,
              "an unknown keyword changes nothing")
    assert any("cu_seqlens" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("head", ["model", "causal_lm", "seq_cls"])
def test_output_router_probs_is_taken_as_transformers_takes_it(arch, head, tmp_path, caplog):
    """`output_router_probs=True` (which the MoE outputs' docs name, with the config's
    `add_router_probs`) changes nothing in Transformers' output; moetorch takes it the same way,
    with one warning a class that points to `output_router_logits`."""

    hf, ours = make_pair(arch, tmp_path, head, "hf_to_ours", seed=9)
    ids, _ = make_inputs(hf.config.vocab_size, 2, 6, None, seed=5)
    for model in (hf, ours):
        model.config.add_router_probs = True
    WARNED_ONCE.clear()
    with torch.no_grad():
        a = hf(ids, output_router_probs=True)
        with caplog.at_level("WARNING", logger="moetorch"):
            b = ours(ids, output_router_probs=True)
            ours(ids, output_router_probs=True)
        plain = ours(ids)
    assert list(b.keys()) == list(a.keys()) == list(plain.keys())
    for key in a.keys():
        if key != "past_key_values":
            close(a[key], b[key], key)
            close(plain[key], b[key], key)
    told = [r for r in caplog.records if "output_router_probs does nothing" in r.getMessage()]
    assert len(told) == 1 and "output_router_logits=True" in told[0].getMessage()
    with caplog.at_level("WARNING", logger="moetorch"), torch.no_grad():  # a misspelt keyword: ignored, and said
        typo, theirs = ours(ids, output_router_prob=True), hf(ids, output_router_prob=True)
    for key in theirs.keys() - {"past_key_values"}:
        close(typo[key], theirs[key], key)
    assert any("output_router_prob'" in r.getMessage() for r in caplog.records)


def test_int32_position_ids_on_a_longrope_cache_as_transformers(tmp_path):
    """int32 `position_ids` on a LongRoPE PhiMoE whose forward fills a cache (the default
    use_cache=True records the positions for a rebuild): Transformers' logits, as with int64."""
    head_dim = PHIMOE.our_config().head_dim
    hf, ours = make_pair(PHIMOE, tmp_path, rope_scaling=longrope_scaling(head_dim, original=16))
    ids, _ = make_inputs(PHIMOE.base["vocab_size"], 2, 6, None)
    pos = torch.arange(6, dtype=torch.int32)[None].expand(2, 6)
    with torch.no_grad():
        want = hf(ids, position_ids=pos).logits
        close(ours(ids, position_ids=pos).logits, want, "int32 positions")
        cache = DynamicCache()
        ours(ids[:, :4], position_ids=pos[:, :4], past_key_values=cache)
        close(ours(ids[:, 4:], position_ids=pos[:, 4:], past_key_values=cache).logits, want[:, 4:], "continued")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_aux_loss_reads_the_new_tokens_columns_of_a_cache_long_mask(arch, tmp_path):
    """A 2D mask that spans a static cache's free slots too (ones for the tokens so far, zeros past
    them, as a static-cache loop may keep it): the router loss weighs the new tokens by their own
    columns, as attention reads them, giving Transformers' aux_loss and loss for the mask cut to the
    tokens (Transformers' own loss has no answer for the long mask: a shape error)."""
    hf, ours = make_pair(arch, tmp_path)
    ids, _ = make_inputs(arch.base["vocab_size"], 1, 3, None)
    long_mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        want = hf(ids, attention_mask=long_mask[:, :3], output_router_logits=True, labels=ids)
        first = ours(ids, attention_mask=long_mask, past_key_values=StaticCache(ours.config, max_cache_len=8),
                     output_router_logits=True, labels=ids)
        steps = []
        for mask in (long_mask, long_mask[:, :3]):  # a decode step after two tokens: the long mask, the cut one
            cache = StaticCache(ours.config, max_cache_len=8)
            ours(ids[:, :2], attention_mask=mask[:, : max(2, mask.shape[1] - 5)], past_key_values=cache)
            steps.append(ours(ids[:, 2:], attention_mask=mask, past_key_values=cache, output_router_logits=True))
    close(first.aux_loss, want.aux_loss, "aux_loss")
    close(first.loss, want.loss, "loss")
    assert torch.isfinite(steps[0].aux_loss)
    close(steps[0].aux_loss, steps[1].aux_loss, "a decode step's aux_loss, long mask against the cut one")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_float64_attentions_stay_float64(arch, tmp_path):
    """float64 on a left-padded batch: with `output_attentions=True` under sdpa (computed eagerly to
    return the weights) the softmax stays float64, so the real tokens get Transformers' sdpa numbers
    to float64 precision; under eager attention it runs in float32, as Transformers' eager (whose
    logits test_float64_models_match_transformers compares), with float32's minimum as the mask's:
    no nan (float64's minimum is -inf in float32, so a fully masked padding row would be nan and
    reach the real tokens of the next layer, as in Transformers' eager attention)."""
    hf, ours = make_pair(arch, tmp_path, head="model")
    hf.set_attn_implementation("sdpa")
    if arch is PHIMOE:
        hf.set_experts_implementation("eager")  # (its default grouped experts take no float64)
    hf.double(), ours.double()
    ids, mask = make_inputs(arch.base["vocab_size"], 3, 6, "left")
    real = mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).last_hidden_state
        for impl in ("sdpa", "eager"):
            ours.set_attn_implementation(impl)
            out = ours(ids, attention_mask=mask, output_attentions=True)
            assert not out.last_hidden_state.isnan().any(), impl
            tol = 1e-12 if impl == "sdpa" else 1e-5  # (eager: float32 weights)
            close(out.last_hidden_state[real], want[real], f"{impl}, float64", atol=tol, rtol=tol)
            assert out.attentions[0].dtype == torch.float64


def test_bf16_router_loss_and_its_gradients_as_transformers(tmp_path):
    """A bf16 model's router loss: its softmax and top-k in the router logits' dtype (bf16 for
    PhiMoE; JetMoE's router gives float32), the sums in float32, as Transformers' loss: on random
    logits of each dtype, the loss and its gradient bit for bit, masked or not; and a bf16 PhiMoE's
    aux_loss and router gradients bit for bit."""
    from transformers.models.phimoe.modeling_phimoe import load_balancing_loss_func

    from moetorch.ops.routing import switch_aux_loss

    g = torch.Generator().manual_seed(0)
    for dtype, masked, k in itertools.product((torch.bfloat16, torch.float16, torch.float32, torch.float64),
                                              (False, True), (1, 2, 3)):
        logits = [(torch.randn(12, 6, generator=g) * 3).to(dtype).requires_grad_() for _ in range(3)]
        mask = torch.randint(0, 2, (2, 6), generator=g) if masked else None
        losses, grads = [], []
        for fn in (load_balancing_loss_func, switch_aux_loss):
            loss = fn(tuple(logits), 6, k, mask)
            losses.append(loss.detach())
            grads.append(torch.autograd.grad(loss, logits))
        assert torch.equal(losses[0], losses[1]), (dtype, masked, k)
        assert all(torch.equal(a, b) for a, b in zip(*grads)), (dtype, masked, k)
    hf, ours = make_pair(PHIMOE, tmp_path)
    hf, ours = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
    for seed in range(3):
        ids, mask = make_inputs(PHIMOE.base["vocab_size"], 2, 7, "left" if seed else None, seed=seed)
        outs = []
        for model in (hf, ours):
            model.zero_grad()
            out = model(ids, attention_mask=mask, output_router_logits=True)
            out.aux_loss.backward()
            outs.append((out.aux_loss.detach(), {n: p.grad for n, p in model.named_parameters()
                                                 if "router" in n and p.grad is not None}))
        assert torch.equal(outs[0][0], outs[1][0]), seed
        assert outs[1][1].keys() == outs[0][1].keys() and outs[1][1], sorted(outs[1][1])
        for name, grad in outs[0][1].items():
            assert torch.equal(outs[1][1][name], grad), (seed, name)
