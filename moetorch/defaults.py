"""Embedded default models: no download is ever needed to run the CLI.

- `tiny-phimoe` (the default) and `tiny-jetmoe`: ~3.6M-parameter models trained by this project on
  Python's standard library (bench/train_tiny.sh, on an H200); shipped in `moetorch/assets/` with
  their tokenizer and `recipe.json` (the exact commands and held-out perplexities). They write
  Python-flavoured text: small, but on topic.
- `tiny-phimoe-random`: a 2-layer PhiMoE with RANDOM weights and a byte-level tokenizer, built
  locally on first use, for smoke tests: its text is noise.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

RANDOM_MODEL = "tiny-phimoe-random"
DEFAULT_MODEL = "tiny-phimoe"
ASSETS = Path(__file__).parent / "assets"
EMBEDDED = ("tiny-phimoe", "tiny-jetmoe")
HELDOUT_SAMPLE = ASSETS / "heldout_sample.txt"
_VERSION = "v2"  # bump when the recipe below changes, so stale builds are not reused


def checkpoint_path(path: str | os.PathLike, patterns: list[str] | None = None, subfolder: str | None = None,
                    **hub: Any) -> str:
    """The local directory (or file) `path` names: `path` itself where it exists; the embedded
    model's directory where it names one ("tiny-phimoe", "tiny-jetmoe"), so that
    `from_pretrained("tiny-phimoe")` loads the shipped model as Transformers loads a hub name;
    else the Hub repository of that name, fetched into the Hugging Face cache (`moetorch.hub`;
    `patterns`: the files fetched, default a model's; `hub`: revision, cache_dir, token,
    local_files_only, force_download). `subfolder`: a directory inside it, as in Transformers."""
    path = os.fspath(path)
    if os.path.exists(path):
        root = path
    elif path in EMBEDDED:
        root = str(ASSETS / path)
    else:
        from .hub import snapshot

        try:
            root = snapshot(path, patterns=patterns, **hub)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{str(e).rstrip('.')}. Embedded models: {', '.join(EMBEDDED)}") from e.__cause__
    return os.path.join(root, subfolder) if subfolder else root


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
    """A checkpoint directory for `name_or_path` (None: the default; a Hub name is fetched), and
    whether it is random."""
    name = DEFAULT_MODEL if name_or_path is None else name_or_path
    if name in EMBEDDED:
        return ASSETS / name, False
    if name == RANDOM_MODEL:
        path = home() / f"{RANDOM_MODEL}-{_VERSION}"
        if not (path / "config.json").exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            build_random_phimoe(path)
        return path, True
    return Path(checkpoint_path(name)), False


@torch.no_grad()
def heldout_perplexity(model, tokenizer, text: str, seq_len: int = 256) -> float:
    """exp(mean next-token loss) over consecutive `seq_len` windows of `text` (float32, as recorded)."""
    ids = torch.tensor(tokenizer(text)["input_ids"])
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"the text is shorter than one window of {seq_len} tokens")
    windows = ids[: n * seq_len].view(n, seq_len).to(model.device)
    losses = [model(w[None], labels=w[None]).loss.float() for w in windows]
    return float(torch.stack(losses).mean().exp())
