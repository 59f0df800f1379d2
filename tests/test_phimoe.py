"""PhiMoE-specific behaviour not covered by the shared parity runner."""

from __future__ import annotations

import torch
from archs import PHIMOE, randomize_
from parity import close

from moetorch import PhimoeConfig
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
