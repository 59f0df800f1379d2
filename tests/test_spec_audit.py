"""Spec items no other test pins, each against Transformers 5.23 on tiny models: `generate`'s
model keyword `position_ids` (forwarded to the forward, as the spec's `**kwargs` says),
`PhimoeConfig.validate_rope` (a method the 5.0 spec lists), classifier-free guidance with a padded
negative prompt and its `negative_prompt_attention_mask`, and the attentions and hidden states a
`return_dict_in_generate` call returns, compared by value."""

from __future__ import annotations

import pytest
import test_generation
import torch
import transformers
from archs import PHIMOE, longrope_scaling
from parity import close, make_inputs, make_pair

import moetorch

VOCAB = test_generation.VOCAB
_one_thread = test_generation._one_thread  # one intra-op thread for tiny models
pair = test_generation.pair  # (Transformers model, moetorch model), the same random weights


def test_generate_forwards_position_ids_as_transformers(pair):
    """`generate(ids, position_ids=...)`: Transformers runs the prompt at the given positions and
    counts on from each row's last one; positions with a gap give other tokens than the default."""
    hf, ours = pair
    ids, _ = make_inputs(VOCAB, 2, 6, None, seed=1)
    positions = torch.tensor([[0, 1, 2, 10, 11, 12], [0, 1, 2, 3, 4, 5]])
    want = hf.generate(ids, position_ids=positions, max_new_tokens=6)
    assert not torch.equal(want, hf.generate(ids, max_new_tokens=6))  # the positions matter
    got = ours.generate(ids, position_ids=positions, max_new_tokens=6)
    assert torch.equal(got, want), f"\nTransformers:\n{want}\nmoetorch:\n{got}"


@pytest.mark.parametrize("rope", ["default", "longrope"])
def test_phimoe_config_validate_rope(rope):
    """`PhimoeConfig.validate_rope()` (the spec's "Validate the `rope_parameters` configuration")
    is there and passes a valid configuration, as Transformers' does."""
    kwargs = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if rope == "longrope":
        kwargs["rope_scaling"] = longrope_scaling(8, original=16)
    theirs, ours = transformers.PhimoeConfig(**kwargs), moetorch.PhimoeConfig(**kwargs)
    assert theirs.validate_rope() is None
    assert ours.validate_rope() is None
    assert PHIMOE.our_config().validate_rope() is None


def test_classifier_free_guidance_with_a_padded_negative_prompt(pair):
    """Left-padded prompts and negative prompts with `negative_prompt_attention_mask`: the tokens
    of Transformers, and the mask is read (what the padding holds changes nothing, the mask
    itself does)."""
    hf, ours = pair
    ids, mask = make_inputs(VOCAB, 3, 6, "left", seed=1)
    negative, negative_mask = make_inputs(VOCAB, 3, 4, "left", seed=5)
    other_padding = negative.masked_fill(negative_mask == 0, 50)
    settings = dict(attention_mask=mask, max_new_tokens=6, guidance_scale=1.5)
    want = hf.generate(ids, negative_prompt_ids=negative, negative_prompt_attention_mask=negative_mask, **settings)
    got = ours.generate(ids, negative_prompt_ids=negative, negative_prompt_attention_mask=negative_mask, **settings)
    assert torch.equal(got, want), f"\nTransformers:\n{want}\nmoetorch:\n{got}"
    again = ours.generate(ids, negative_prompt_ids=other_padding, negative_prompt_attention_mask=negative_mask,
                          **settings)
    assert torch.equal(again, got)
    assert not torch.equal(ours.generate(ids, negative_prompt_ids=negative, **settings), got)


@pytest.mark.parametrize("settings", [dict(), dict(num_beams=2)], ids=["greedy", "beams"])
def test_generate_attentions_and_hidden_states_match_transformers(pair, settings):
    """`return_dict_in_generate=True, output_attentions=True, output_hidden_states=True`: the
    same output class and fields, and every step's attentions and hidden states by value."""
    hf, ours = pair
    ids, mask = make_inputs(VOCAB, 3, 6, "left", seed=1)
    kw = dict(attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True, output_attentions=True,
              output_hidden_states=True, output_scores=True, **settings)
    a, b = hf.generate(ids, **kw), ours.generate(ids, **kw)
    assert type(a).__name__ == type(b).__name__
    assert torch.equal(a.sequences, b.sequences)
    for field in ("attentions", "hidden_states"):
        x, y = getattr(a, field), getattr(b, field)
        assert len(x) == len(y) == 3, field
        for step, (xs, ys) in enumerate(zip(x, y)):
            assert len(xs) == len(ys), f"{field}[{step}]"
            for layer, (u, v) in enumerate(zip(xs, ys)):
                assert u.shape == v.shape, f"{field}[{step}][{layer}]: {tuple(u.shape)} vs {tuple(v.shape)}"
                # the prompt step: compare the real rows only (padding rows differ by backend)
                rows = mask.repeat_interleave(u.shape[0] // mask.shape[0], 0).bool() if step == 0 else None
                if rows is not None and field == "hidden_states":
                    u, v = u[rows], v[rows]
                elif rows is not None:
                    u, v = u.transpose(1, 2)[rows], v.transpose(1, 2)[rows]
                close(u, v, f"{field}[{step}][{layer}]", atol=1e-4, rtol=1e-4)


def test_generate_refuses_position_ids_unlike_the_prompt(pair):
    """position_ids of another length than the prompt, or not integers, are refused by name; one
    row serves every row of the batch."""
    hf, ours = pair
    ids, _ = make_inputs(VOCAB, 2, 6, None, seed=2)
    with pytest.raises(ValueError, match="position_ids must be"):
        ours.generate(ids, position_ids=torch.arange(5)[None], max_new_tokens=2)
    with pytest.raises(ValueError, match="position_ids must be"):
        ours.generate(ids, position_ids=torch.zeros(2, 6), max_new_tokens=2)
    one = torch.arange(3, 9)[None]
    assert torch.equal(ours.generate(ids, position_ids=one, max_new_tokens=3, do_sample=False),
                       ours.generate(ids, position_ids=one.expand(2, 6), max_new_tokens=3, do_sample=False))


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_generate_position_ids_past_the_slots_pick_longrope_factors_as_transformers(cache_implementation, tmp_path):
    """Positions given past the prompt's slots (a negative count of padding): the prompt of 5
    tokens at positions 10-14 keeps LongRoPE's short factors (threshold 16), as in Transformers,
    also where the static cache's prefill pads the prompt to a bucket whose positions run past 16."""
    hf, ours = make_pair(PHIMOE, tmp_path, seed=7, rope_scaling=longrope_scaling(8, original=16),
                         max_position_embeddings=64)
    ids, pos = torch.tensor([[3, 9, 4, 22, 17]]), torch.arange(10, 15)[None]
    with torch.no_grad():
        want = hf(ids, position_ids=pos).logits[:, -1]
        out = ours.generate(ids, position_ids=pos, max_new_tokens=3, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, pad_token_id=0, eos_token_id=None,
                            cache_implementation=cache_implementation)
    close(out.logits[0], want, "the first step's logits")
    with pytest.raises(ValueError, match="position_ids must be"):
        ours.generate(ids, position_ids=torch.ones(1, 5, dtype=torch.bool), max_new_tokens=1)


def test_validate_rope_names_parameters_changed_since():
    """`validate_rope()` checks `rope_parameters` as they are now: a value changed after the config
    was made is named (Transformers raises too), for PhiMoE's LongRoPE and JetMoE's scaled kinds."""
    def kwargs():  # (each config its own dict: Transformers keeps the one passed)
        return dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    rope_scaling=longrope_scaling(8, original=16))

    theirs, ours = transformers.PhimoeConfig(**kwargs()), moetorch.PhimoeConfig(**kwargs())
    theirs.rope_parameters["long_mscale"] = ours.rope_parameters["long_mscale"] = "x"
    with pytest.raises(TypeError):
        theirs.validate_rope()
    with pytest.raises(ValueError, match=r"rope_parameters.long_mscale"):
        ours.validate_rope()
    ours = moetorch.PhimoeConfig(**kwargs())
    ours.rope_parameters["short_factor"] = [1.0]
    with pytest.raises(ValueError, match=r"rope_parameters.short_factor.*4 entries"):
        ours.validate_rope()
    jet = moetorch.JetMoeConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert jet.validate_rope() is None
    jet.rope_parameters["factor"] = -1.0
    with pytest.raises(ValueError, match=r"rope_parameters.factor"):
        jet.validate_rope()
