"""The architectures under test and their Transformers oracles.

Each entry gives tiny config kwargs (shared by both libraries) and the four classes on each side.
Test modules parameterise over ARCHS, so every architecture goes through the same checks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

import moetorch


@dataclass
class Arch:
    name: str
    ours: dict[str, Any]
    hf: dict[str, Any]
    base: dict[str, Any]
    # Variants every parity test runs: name -> config overrides.
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Config overrides for the training-gradient test (as many trainable pieces as possible).
    train_overrides: dict[str, Any] = field(default_factory=dict)

    def config_kwargs(self, **overrides: Any) -> dict[str, Any]:
        return {**self.base, **overrides}

    def hf_config(self, **overrides: Any):
        return self.hf["config"](**self.config_kwargs(**overrides))

    def our_config(self, **overrides: Any):
        return self.ours["config"](**self.config_kwargs(**overrides))


def longrope_scaling(head_dim: int, original: int = 8, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    return {
        "type": "longrope",
        "short_factor": [round(rng.uniform(1.0, 1.5), 3) for _ in range(head_dim // 2)],
        "long_factor": [round(rng.uniform(2.0, 8.0), 3) for _ in range(head_dim // 2)],
        "short_mscale": 1.1,
        "long_mscale": 1.3,
        "original_max_position_embeddings": original,
    }


PHIMOE = Arch(
    name="phimoe",
    ours={
        "config": moetorch.PhimoeConfig,
        "model": moetorch.PhimoeModel,
        "causal_lm": moetorch.PhimoeForCausalLM,
        "seq_cls": moetorch.PhimoeForSequenceClassification,
    },
    hf={
        "config": transformers.PhimoeConfig,
        "model": transformers.PhimoeModel,
        "causal_lm": transformers.PhimoeForCausalLM,
        "seq_cls": transformers.PhimoeForSequenceClassification,
    },
    base=dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        max_position_embeddings=64,
        pad_token_id=0,
        router_jitter_noise=0.3,
    ),
    variants={
        "default": {},
        "biases": {"attention_bias": True, "lm_head_bias": True},
        "mqa": {"num_key_value_heads": 1},
        "mha": {"num_key_value_heads": 4},
        "sliding_window": {"sliding_window": 3},
        "longrope": {"rope_scaling": longrope_scaling(8, original=16), "max_position_embeddings": 64},
        # head_dim set apart from hidden_size / heads (Transformers' PhiMoE reads it), with LongRoPE
        # factors for its width
        "head_dim": {"head_dim": 12, "rope_scaling": longrope_scaling(12, original=16)},
    },
    train_overrides={"attention_bias": True, "lm_head_bias": True, "sliding_window": 4},
)

JETMOE = Arch(
    name="jetmoe",
    ours={
        "config": moetorch.JetMoeConfig,
        "model": moetorch.JetMoeModel,
        "causal_lm": moetorch.JetMoeForCausalLM,
        "seq_cls": moetorch.JetMoeForSequenceClassification,
    },
    hf={
        "config": transformers.JetMoeConfig,
        "model": transformers.JetMoeModel,
        "causal_lm": transformers.JetMoeForCausalLM,
        "seq_cls": transformers.JetMoeForSequenceClassification,
    },
    base=dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_key_value_heads=2,
        kv_channels=8,
        intermediate_size=24,
        num_local_experts=4,
        max_position_embeddings=64,
        pad_token_id=0,
    ),
    variants={
        "default": {},  # tied embeddings, 4 query heads tiled over 2 kv heads
        "mqa": {"num_key_value_heads": 1},
        "untied": {"tie_word_embeddings": False},
        "top1": {"num_experts_per_tok": 1},
        "top3": {"num_experts_per_tok": 3, "num_key_value_heads": 3, "kv_channels": 6},
        # A large eps shows which norms read rms_norm_eps (only the final one, as in Transformers).
        "large_eps": {"rms_norm_eps": 0.5},
    },
    train_overrides={"tie_word_embeddings": False},
)

ARCHS = [PHIMOE, JETMOE]
ARCH_IDS = [a.name for a in ARCHS]


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Give every parameter (norms and biases too) fresh random values, so nothing is trivially 0/1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            shift = 1.0 if p.dim() == 1 and "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * std + shift)
