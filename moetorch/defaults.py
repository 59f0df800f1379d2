"""Embedded default models, built locally so that the CLI runs on a fresh machine with no download.

`tiny-phimoe-random` is a 2-layer PhiMoE with RANDOM weights and a byte-level tokenizer: it shows
the whole pipeline working (load, prefill, cached decode, detokenise) but its text is noise.
Trained tiny checkpoints replace it as the default once they ship with the package.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

RANDOM_MODEL = "tiny-phimoe-random"
_VERSION = "v2"  # bump when the recipe below changes, so stale builds are not reused


def home() -> Path:
    return Path(os.environ.get("MOETORCH_HOME", Path.home() / ".cache" / "moetorch"))


CHAT_SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def byte_level_tokenizer():
    """A tokenizers.Tokenizer with one token per byte (256) plus <s>, </s>, <pad> and chat markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>", *CHAT_SPECIALS])
    return tok


def build_random_phimoe(path: Path, seed: int = 0) -> Path:
    """Write a tiny random PhiMoE checkpoint (config, safetensors, tokenizer.json) to `path`."""
    from .configuration import PhimoeConfig
    from .models.phimoe import PhimoeForCausalLM
    from .tokenizer import PHI35_CHAT_TEMPLATE

    tok = byte_level_tokenizer()
    config = PhimoeConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, max_position_embeddings=2048,
        bos_token_id=tok.token_to_id("<s>"), eos_token_id=[tok.token_to_id("</s>"), tok.token_to_id("<|end|>")],
        pad_token_id=tok.token_to_id("<pad>"), attention_bias=True, lm_head_bias=True,
    )
    torch.manual_seed(seed)
    model = PhimoeForCausalLM(config)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save(str(tmp / "tokenizer.json"))
    tokenizer_config = {
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": PHI35_CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (tmp / "README.md").write_text(
        "# tiny-phimoe-random\n\nRandom weights, built by moetorch for smoke tests: its output is noise.\n"
    )
    shutil.rmtree(path, ignore_errors=True)  # a partial build from an interrupted run
    os.replace(tmp, path)
    return path


def resolve_model(name_or_path: str | None) -> tuple[Path, bool]:
    """A checkpoint directory for `name_or_path` (None: the embedded default), and whether it is random."""
    if name_or_path in (None, RANDOM_MODEL):
        path = home() / f"{RANDOM_MODEL}-{_VERSION}"
        if not (path / "config.json").exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            build_random_phimoe(path)
        return path, True
    return Path(name_or_path), False
