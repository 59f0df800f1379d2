"""Parity with Transformers on randomly drawn tiny configurations.

The shared parity runner goes through a few hand-picked variants per architecture. Here each seed
draws a whole configuration (head counts, head width, experts and top-k, biases, tied embeddings,
sliding window, RoPE kind, norm eps, router jitter), random weights, a batch with or without
padding, and one library saves what the other loads. Then every output field with labels, a
training step's loss and gradients (the same random draws), greedy search, sampling and beam
search on both caches, and what beam search records (scores, logits, hidden states) must match
Transformers.

LongRoPE draws keep sequences within `original_max_position_embeddings`: past it moetorch applies
the long factors and Transformers does not (docs/differences.md).
"""

from __future__ import annotations

import random

import pytest
import torch
from archs import JETMOE, PHIMOE, longrope_scaling
from parity import compare_outputs, make_inputs, make_pair

ALL = {"output_hidden_states": True, "output_attentions": True, "output_router_logits": True}
SEEDS = range(24)


def draw_phimoe(rng: random.Random) -> dict:
    heads = rng.choice([1, 2, 4, 8])
    kw = dict(
        vocab_size=rng.randint(40, 130), hidden_size=rng.choice([16, 24, 32, 48]),
        intermediate_size=rng.choice([8, 16, 24, 40]), num_hidden_layers=rng.randint(1, 3),
        num_attention_heads=heads, num_key_value_heads=rng.choice([g for g in (1, 2, 4, 8) if heads % g == 0]),
        num_local_experts=rng.randint(2, 6), max_position_embeddings=64, pad_token_id=0,
        router_jitter_noise=rng.choice([0.0, 0.01, 0.3, 1.0]), attention_bias=rng.random() < 0.5,
        lm_head_bias=rng.random() < 0.5, tie_word_embeddings=rng.random() < 0.3,
        rms_norm_eps=rng.choice([1e-5, 1e-2, 0.5]),
    )
    if rng.random() < 0.5:
        kw["head_dim"] = rng.choice([4, 8, 12, 16])
    elif kw["hidden_size"] % heads or (kw["hidden_size"] // heads) % 2:
        kw["hidden_size"] = heads * 8
    if rng.random() < 0.3:
        kw["sliding_window"] = rng.randint(2, 8)
    if rng.random() < 0.4:
        head_dim = kw.get("head_dim", kw["hidden_size"] // heads)
        kw["rope_scaling"] = longrope_scaling(head_dim, original=rng.choice([32, 48]), seed=rng.randint(0, 99))
    if rng.random() < 0.3:
        kw["rope_theta"] = rng.choice([100.0, 10000.0])
    return kw


def draw_jetmoe(rng: random.Random) -> dict:
    top_k = rng.choice([1, 2, 3])
    kw = dict(
        vocab_size=rng.randint(40, 130), hidden_size=rng.choice([16, 24, 32, 48]),
        num_hidden_layers=rng.randint(1, 3), num_key_value_heads=rng.choice([1, 2, 3, 4]),
        kv_channels=rng.choice([4, 6, 8, 16]), intermediate_size=rng.choice([8, 16, 24]),
        num_local_experts=rng.randint(top_k, 6), num_experts_per_tok=top_k, max_position_embeddings=64,
        pad_token_id=0, tie_word_embeddings=rng.random() < 0.7, rms_norm_eps=rng.choice([1e-6, 1e-2, 0.5]),
    )
    r = rng.random()
    if r < 0.15:
        kw["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    elif r < 0.3:
        kw["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                 "rope_theta": 10000.0}
    elif r < 0.5:
        kw["rope_theta"] = rng.choice([100.0, 10000.0])
    return kw


def _same(want, got, what):
    assert torch.equal(want, got), f"{what}\nTransformers:\n{want}\nmoetorch:\n{got}"


@pytest.mark.parametrize("seed", SEEDS)
def test_random_config_matches_transformers(seed, tmp_path):
    rng = random.Random(seed)
    arch = rng.choice([PHIMOE, JETMOE])
    kw = (draw_phimoe if arch is PHIMOE else draw_jetmoe)(rng)
    direction = rng.choice(["hf_to_ours", "ours_to_hf"])
    hf, ours = make_pair(arch, tmp_path, "causal_lm", direction, seed=seed, **kw)
    B, T, padding = rng.randint(1, 3), rng.randint(2, 20), rng.choice([None, "left", "right"])
    ids, mask = make_inputs(kw["vocab_size"], B, T, padding, seed=seed)
    labels = ids.masked_fill(mask == 0, -100) if mask is not None else ids
    with torch.no_grad():
        compare_outputs(hf(ids, attention_mask=mask, labels=labels, **ALL),
                        ours(ids, attention_mask=mask, labels=labels, **ALL), mask)

    # a training step: loss with the aux loss, and every gradient (the same jitter and routing draws)
    steps = []
    for model in (hf, ours):
        model.train()
        torch.manual_seed(seed + 1)
        model(ids, attention_mask=mask, labels=labels, output_router_logits=True).loss.backward()
        steps.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
        model.eval()
    assert steps[0].keys() == steps[1].keys()
    for k, g in steps[0].items():
        torch.testing.assert_close(steps[1][k], g, rtol=1e-3, atol=1e-5, msg=lambda m, k=k: f"grad of {k}: {m}")

    if padding == "right":  # generate continues each row after its last column
        return
    n = rng.randint(1, 8)
    common = dict(attention_mask=mask, max_new_tokens=n, pad_token_id=0)
    sampling = dict(do_sample=True, temperature=rng.choice([0.7, 1.0, 1.5]), top_k=rng.choice([0, 5, 50]),
                    top_p=rng.choice([1.0, 0.9, 0.5]), min_p=rng.choice([None, 0.1]),
                    repetition_penalty=rng.choice([1.0, 1.3]), num_return_sequences=rng.randint(1, 2))
    beams = rng.randint(2, 3)
    beam = dict(do_sample=False, num_beams=beams, num_return_sequences=beams, early_stopping=rng.random() < 0.5,
                length_penalty=rng.choice([1.0, 0.5, 2.0]))
    with torch.no_grad():
        for what, settings in (("greedy", dict(do_sample=False)), ("sampling", sampling), ("beams", beam)):
            torch.manual_seed(seed)
            want = hf.generate(ids, **common, **settings)
            for cache in ("dynamic", "static"):
                torch.manual_seed(seed)
                _same(want, ours.generate(ids, cache_implementation=cache, **common, **settings), f"{what}, {cache}")
        # what generate records, step by step: scores, raw logits, the hidden states of real positions
        record = dict(common, return_dict_in_generate=True, output_scores=True, output_logits=True,
                      output_hidden_states=True, **beam)
        a, b = hf.generate(ids, **record), ours.generate(ids, cache_implementation="dynamic", **record)
        _same(a.sequences, b.sequences, "recorded beams")
        assert torch.equal(a.beam_indices.long(), b.beam_indices)
        torch.testing.assert_close(b.sequences_scores, a.sequences_scores, atol=1e-4, rtol=1e-4)
        for step, (x, y) in enumerate(zip(a.scores + a.logits, b.scores + b.logits, strict=True)):
            torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4, msg=lambda m, s=step: f"scores/logits {s}: {m}")
        for step, (xs, ys) in enumerate(zip(a.hidden_states, b.hidden_states, strict=True)):
            real = None if mask is None else mask.repeat_interleave(beams, 0)[:, -xs[0].shape[1]:].bool()
            for x, y in zip(xs, ys, strict=True):
                torch.testing.assert_close(y if real is None else y[real], x if real is None else x[real],
                                           atol=1e-4, rtol=1e-4, msg=lambda m, s=step: f"hidden states {s}: {m}")


def test_window_of_one_decodes_as_the_whole_forward(tmp_path):
    """With `sliding_window=1` each token attends to itself alone. Transformers' cached decoding
    then parts from its own whole-sequence forward (5.23); ours gives the tokens that the whole
    forward of either library picks."""
    hf, ours = make_pair(PHIMOE, tmp_path, "causal_lm", "ours_to_hf", seed=2, sliding_window=1)
    ids, _ = make_inputs(PHIMOE.base["vocab_size"], 2, 5, None, seed=3)
    with torch.no_grad():
        for cache in ("dynamic", "static"):
            seq = ours.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation=cache)
            for model in (hf, ours):
                picks = model(seq).logits[:, ids.shape[1] - 1 : -1].argmax(-1)
                _same(picks, seq[:, ids.shape[1] :], f"{cache} cache against a whole forward")


def test_random_draws_cover_the_space():
    """The seeds reach both architectures and the options that the draws offer."""
    seen = set()
    for seed in SEEDS:
        rng = random.Random(seed)
        arch = rng.choice([PHIMOE, JETMOE])
        kw = (draw_phimoe if arch is PHIMOE else draw_jetmoe)(rng)
        seen |= {arch.name} | {f"{arch.name}.{k}" for k in ("head_dim", "sliding_window", "rope_scaling",
                                                             "rope_parameters") if k in kw}
        if arch is JETMOE:
            seen.add(f"jetmoe.top{kw['num_experts_per_tok']}")
    want = {"phimoe", "jetmoe", "phimoe.head_dim", "phimoe.sliding_window", "phimoe.rope_scaling",
            "jetmoe.rope_parameters", "jetmoe.top1", "jetmoe.top2", "jetmoe.top3"}
    assert want <= seen, want - seen
