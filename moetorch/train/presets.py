"""Named model configs for training from scratch, and how a `TrainingConfig.model` becomes a model.

The `tiny-*` presets are the embedded default models' recipes (see bench/train_tiny.sh): ~3.6M
parameters each, so that their float32 safetensors stay under 16 MB, and four query heads of 40
channels in both. Vocabulary size and special-token ids are left out: they come from the tokenizer.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..auto import model_type_of, registry
from ..checkpoint import CheckpointError, checkpoint_files
from ..configuration import ConfigError, read_config_dict

logger = logging.getLogger("moetorch")

PRESETS: dict[str, dict[str, Any]] = {
    # 4 x (attention 77k + 8 experts x 61k) + untied embeddings and biased head (2 x 4096 x 160)
    "tiny-phimoe": {
        "model_type": "phimoe",
        "hidden_size": 160,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 1024,
        "rope_theta": 10000.0,
        "attention_bias": True,
        "lm_head_bias": True,
        "tie_word_embeddings": False,
    },
    # 4 x (MoA 8 x 2 x 80 x 160 + kv 26k + 8 MLP experts x 61k) + tied embeddings (4096 x 160)
    "tiny-jetmoe": {
        "model_type": "jetmoe",
        "hidden_size": 160,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_key_value_heads": 2,
        "kv_channels": 40,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 1024,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    },
}


def aux_loss_coef(model) -> float:
    """The coefficient the model multiplies its router loss by before adding it to `loss` (its
    own attribute, which its config gave it when it was built)."""
    if model.config.model_type == "phimoe":
        return float(model.router_aux_loss_coef)
    return float(model.aux_loss_coef)


def _config_dict(spec: str | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The config dict a `model` spec names, and a description of where it came from."""
    if isinstance(spec, dict):
        return copy.deepcopy(spec), "the model config dict"
    if spec in PRESETS:
        return copy.deepcopy(PRESETS[spec]), f"preset {spec!r}"
    path = Path(spec)
    if path.is_dir() or (path.is_file() and path.suffix == ".json"):
        return read_config_dict(path), str(path)
    raise ConfigError(
        f"model: {spec!r} is not a preset ({', '.join(PRESETS)}), a model config .json file or a "
        "checkpoint directory"
    )


def has_weights(spec: Any) -> bool:
    """Whether `spec` is a checkpoint directory with weights, safetensors or PyTorch .bin files
    (training continues from them)."""
    if not isinstance(spec, (str, os.PathLike)) or not Path(spec).is_dir():
        return False
    try:
        return bool(checkpoint_files(spec))
    except CheckpointError:
        return False


def check_overrides(model_type: str, overrides: dict[str, Any]) -> None:
    """Raise unless every `overrides` key names a field of `model_type`'s config (or an alias of one):
    an unknown key would only be kept as an unused extra, and the run would silently train without it."""
    config_class = registry()[model_type]["config"]
    names = {f.name for f in dataclasses.fields(config_class)} | set(getattr(config_class, "aliases", None) or {})
    unknown = sorted(k for k in overrides if k not in names and not hasattr(config_class, k))
    if unknown:
        raise ConfigError(f"model_overrides (--set): unknown {model_type} config field(s) {unknown}")


def build_model(spec: str | dict[str, Any], tokenizer, overrides: dict[str, Any], seed: int, device):
    """A float32 causal-LM model for `spec` on `device`: loaded from a checkpoint directory with
    weights, or freshly initialised (seeded with `seed`) from a preset or config.

    Vocabulary size and bos/eos/pad ids that the config leaves out are taken from `tokenizer`; a
    vocabulary smaller than the tokenizer's is an error.
    """
    data, source = _config_dict(spec)
    model_type = model_type_of(data, source)
    classes = registry()[model_type]
    check_overrides(model_type, overrides)
    if tokenizer is not None:
        n = len(tokenizer)
        data.setdefault("vocab_size", n)
        vocab = overrides.get("vocab_size", data["vocab_size"])
        if isinstance(vocab, int) and vocab < n:
            where = "model_overrides (--set)" if "vocab_size" in overrides else f"model: {source}"
            raise ConfigError(f"{where} has vocab_size {vocab}, smaller than the tokenizer's {n} tokens")
        # An explicit preset/config value wins; otherwise the tokenizer's ids.
        for name, token_id in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
                               ("pad_token_id", tokenizer.pad_token_id)):
            if name not in data and token_id is not None:
                data[name] = token_id
    data.update(overrides)
    if has_weights(spec):
        model = classes["causal_lm"].from_pretrained(spec, dtype=torch.float32, device=device, **overrides)
        if model.config.vocab_size < (len(tokenizer) if tokenizer is not None else 0):
            raise ConfigError(f"model: {spec} has vocab_size {model.config.vocab_size}, smaller than the tokenizer's")
        logger.info("continuing from the weights in %s", spec)
        return model
    config = classes["config"].from_dict(data)
    torch.manual_seed(seed)
    model = classes["causal_lm"](config)
    return model.to(device=device, dtype=torch.float32)
