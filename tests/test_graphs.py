"""The CUDA-graph decode step, through its CPU fallback (same buffers, same host bookkeeping)."""

from __future__ import annotations

import pytest
import torch
from archs import ARCH_IDS, ARCHS, PHIMOE, longrope_scaling, randomize_
from parity import close, make_inputs

from moetorch import DynamicCache, StaticCache
from moetorch.engine import GraphedDecodeStep


def tiny(arch, seed=0, **overrides):
    model = arch.ours["causal_lm"](arch.our_config(**overrides))
    randomize_(model, seed, std=0.3)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@torch.no_grad()
def test_graphed_step_fallback_equals_plain_decode(arch):
    model = tiny(arch, seed=1)
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 5, "left")
    cache = StaticCache(model.config, max_cache_len=12)
    model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    step = GraphedDecodeStep(model, cache, batch=2)
    assert not step.enabled  # CPU
    ref_cache = DynamicCache()
    model(ids, attention_mask=mask, past_key_values=ref_cache, use_cache=True)
    tok = torch.tensor([[3], [4]])
    for t in range(5, 10):
        m = torch.cat([mask, torch.ones(2, t - 5 + 1, dtype=torch.long)], 1)
        pos = (m.cumsum(-1) - 1)[:, -1:]
        got = step(tok, m, pos, torch.tensor([t]))
        want = model(tok, attention_mask=m, position_ids=pos, past_key_values=ref_cache).logits[:, -1]
        close(got, want, f"step {t}")
        tok = got.argmax(-1, keepdim=True)
    assert cache.get_seq_length() == 10


@torch.no_grad()
def test_graphed_step_handles_the_longrope_switch():
    model = tiny(PHIMOE, seed=2, rope_scaling=longrope_scaling(8, original=8), max_position_embeddings=64)
    ids, _ = make_inputs(97, 1, 12, None, seed=4)
    cache = StaticCache(model.config, max_cache_len=16)
    model(ids[:, :5], past_key_values=cache, use_cache=True)
    step = GraphedDecodeStep(model, cache, batch=1)
    for t in range(5, 12):
        got = step(ids[:, t : t + 1], None, torch.tensor([[t]]), torch.tensor([t]))
        close(got, model(ids[:, : t + 1]).logits[:, -1], f"step {t}")
    assert cache.rope_long


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_generate_with_static_cache_uses_the_step_and_matches_dynamic(arch, monkeypatch):
    model = tiny(arch, seed=3)
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 4, "left")
    calls = []
    original = GraphedDecodeStep.__call__

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(GraphedDecodeStep, "__call__", counting)
    static = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert len(calls) == 5  # every token after the first comes from the graphed step
    dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(static, dynamic)
    model.decode_graphs = False
    calls.clear()
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert not calls


def test_graphed_step_needs_a_static_cache():
    model = tiny(PHIMOE)
    with pytest.raises(TypeError, match="StaticCache"):
        GraphedDecodeStep(model, DynamicCache(), batch=1)
