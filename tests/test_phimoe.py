"""PhiMoE-specific behaviour not covered by the shared parity runner."""

from __future__ import annotations

import pytest
import torch
from archs import PHIMOE, longrope_scaling, randomize_
from parity import close

from moetorch import ConfigError, PhimoeConfig
from moetorch.models.phimoe import PhimoeSparseMoeBlock
from moetorch.ops.routing import sparsemixer


def test_input_jitter_is_applied_once_and_leaves_the_input_alone():
    cfg = PhimoeConfig(**PHIMOE.config_kwargs(input_jitter_noise=0.5))
    block = PhimoeSparseMoeBlock(cfg)
    randomize_(block, 1)
    block.train()
    x = torch.randn(2, 5, cfg.hidden_size)
    x_before = x.clone()
    torch.manual_seed(7)
    got, logits = block(x)
    assert torch.equal(x, x_before), "the block must not modify its input in place"
    # The same draws by hand: one uniform factor for the whole block, then sparsemixer's draws.
    torch.manual_seed(7)
    xj = (x * torch.empty_like(x).uniform_(0.5, 1.5)).reshape(-1, cfg.hidden_size)
    want_logits = block.router(xj)
    w, ids = sparsemixer(want_logits, cfg.router_jitter_noise, training=True)
    want = block.experts(xj, ids, w).view_as(x)
    close(logits, want_logits, "router logits")
    close(got, want, "block output")


def test_eval_mode_ignores_jitter():
    cfg = PhimoeConfig(**PHIMOE.config_kwargs(input_jitter_noise=0.5))
    block = PhimoeSparseMoeBlock(cfg)
    randomize_(block, 2)
    block.eval()
    x = torch.randn(1, 4, cfg.hidden_size)
    a, _ = block(x)
    b, _ = block(x)
    assert torch.equal(a, b)


def test_head_dim_apart_from_hidden_size(tmp_path):
    """`head_dim` set in config.json: Transformers' PhiMoE sizes its heads by it, even where
    it differs from hidden_size / heads; so do we, on every cache, and the key is saved
    only where it was set."""
    import transformers

    from moetorch import PhimoeForCausalLM, StaticCache

    cfg = PHIMOE.our_config(hidden_size=24, head_dim=10, num_attention_heads=4, num_key_value_heads=2)
    assert cfg.head_dim == 10 and cfg.to_dict()["head_dim"] == 10
    assert "head_dim" not in PHIMOE.our_config().to_dict() and PHIMOE.our_config().head_dim == 8
    torch.manual_seed(0)
    ours = PhimoeForCausalLM(cfg).eval()
    randomize_(ours, seed=2)
    assert ours.model.layers[0].self_attn.q_proj.weight.shape == (40, 24)
    ours.save_pretrained(tmp_path)
    hf = transformers.PhimoeForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.head_dim == 10
    ids = torch.randint(1, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        close(hf(ids).logits, ours(ids).logits, "logits")
        want = hf.generate(ids, max_new_tokens=6, do_sample=False)
        for cache in (None, StaticCache(cfg, max_cache_len=32)):
            assert torch.equal(ours.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=cache), want)
    assert PhimoeForCausalLM.from_pretrained(tmp_path).config.head_dim == 10


def test_head_dim_errors_name_the_field():
    for bad in (0, 7, -4, 2.5, "8"):
        with pytest.raises(ConfigError, match="`head_dim`"):
            PHIMOE.our_config(head_dim=bad)
    with pytest.raises(ConfigError, match="num_attention_heads"):  # no head_dim: hidden must divide
        PHIMOE.our_config(hidden_size=30)
    # LongRoPE's factors cover head_dim / 2 pairs of the head that is set
    with pytest.raises(ConfigError, match="head_dim // 2 = 6"):
        PHIMOE.our_config(head_dim=12, rope_scaling=longrope_scaling(8, original=16))
    cfg = PHIMOE.our_config()
    cfg.head_dim = 16
    assert cfg.head_dim == 16 and cfg.to_dict()["head_dim"] == 16
    cfg.head_dim = None
    assert cfg.head_dim == 8 and "head_dim" not in cfg.to_dict()
