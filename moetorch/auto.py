"""`AutoModelForCausalLM` and friends: pick the architecture from a checkpoint's config.json."""

from __future__ import annotations

import os
from typing import Any

from .adapters import adapter_only_base
from .configuration import ConfigError, MoeConfig, as_moetorch_config, read_config_dict
from .defaults import checkpoint_path
from .hub import CONFIG_PATTERNS, HUB_OPTIONS

# Architecture names used by original (remote-code) checkpoints.
ARCHITECTURE_ALIASES = {"PhiMoEForCausalLM": "phimoe", "JetMoEForCausalLM": "jetmoe"}


def registry() -> dict[str, dict[str, type]]:
    """model_type -> the classes for each role ("config", "model", "causal_lm", "seq_cls")."""
    from .configuration import JetMoeConfig, PhimoeConfig
    from .models import jetmoe, phimoe

    return {
        "phimoe": {"config": PhimoeConfig, "model": phimoe.PhimoeModel, "causal_lm": phimoe.PhimoeForCausalLM,
                   "seq_cls": phimoe.PhimoeForSequenceClassification},
        "jetmoe": {"config": JetMoeConfig, "model": jetmoe.JetMoeModel, "causal_lm": jetmoe.JetMoeForCausalLM,
                   "seq_cls": jetmoe.JetMoeForSequenceClassification},
    }


def model_type_of(config_dict: dict[str, Any], source: str) -> str:
    """The model_type of a config.json, falling back to its `architectures` entry."""
    reg = registry()
    model_type = config_dict.get("model_type")
    if model_type is None:
        for arch in config_dict.get("architectures") or []:
            names = {c["causal_lm"].__name__: t for t, c in reg.items()}
            model_type = ARCHITECTURE_ALIASES.get(arch) or names.get(arch)
            if model_type:
                break
    if model_type is None:
        raise ConfigError(f"{source}: a config with no model_type (nor an architecture moetorch knows) is not "
                          f"supported: the model_type picks the class; supported: {sorted(reg)} (or build "
                          "PhimoeConfig / JetMoeConfig directly)")
    if model_type not in reg:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported by moetorch; supported: {sorted(reg)}"
        )
    return model_type


class _Auto:
    role = ""

    def __init__(self) -> None:
        raise TypeError(f"use {type(self).__name__}.from_pretrained(path) or .from_config(config)")

    @classmethod
    def class_for(cls, path: str | os.PathLike, **hub: Any) -> type:
        local = checkpoint_path(path, CONFIG_PATTERNS, **hub)  # the config alone: the class loads the weights
        base = adapter_only_base(local, CONFIG_PATTERNS, hub) if cls.role != "config" else None
        data = read_config_dict(base[1] if base else local)  # an adapter's: its base model's class
        return registry()[model_type_of(data, os.fspath(path))][cls.role]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load the checkpoint (a directory, an embedded model or a Hub repository) with the
        class its config.json names, or that `config` names (a config, or where to read one)."""
        hub = {k: kwargs[k] for k in HUB_OPTIONS if k in kwargs}
        config = as_moetorch_config(kwargs.get("config")) if cls.role != "config" else None
        if isinstance(config, MoeConfig):
            kwargs["config"] = config  # (Transformers' own PhimoeConfig: its values)
            model_class = cls.class_of(config)
        else:
            model_class = cls.class_for(pretrained_model_name_or_path if config is None else config, **hub)
        if cls.role != "config":  # (an Auto class's config keywords do not reach the generation config)
            kwargs.setdefault("_from_auto", True)
        return model_class.from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def class_of(cls, config: MoeConfig) -> type:
        if not isinstance(config, MoeConfig) or config.model_type not in registry():
            raise TypeError(f"{cls.__name__}: config must be a moetorch config ({sorted(registry())}), got "
                            f"{type(config).__name__}")
        return registry()[config.model_type][cls.role]

    @classmethod
    def from_config(cls, config: MoeConfig, **kwargs: Any):
        """A new model of `config`'s architecture, as Transformers' `from_config`: `dtype` (or
        `torch_dtype`) and `attn_implementation` as `_from_config` takes them; `trust_remote_code`
        is taken and changes nothing (no remote code here)."""
        kwargs.pop("trust_remote_code", None)
        config = as_moetorch_config(config)
        return cls.class_of(config)._from_config(config, **kwargs)


class AutoConfig(_Auto):
    role = "config"

    @classmethod
    def for_model(cls, model_type: str, **kwargs: Any) -> MoeConfig:
        """A config of `model_type` ("phimoe", "jetmoe") built with `kwargs`, as Transformers'."""
        reg = registry()
        if model_type not in reg:
            raise ValueError(f"AutoConfig.for_model: model_type {model_type!r} is not supported by moetorch; "
                             f"supported: {sorted(reg)}")
        return reg[model_type]["config"](**kwargs)


class AutoModel(_Auto):
    role = "model"


class AutoModelForCausalLM(_Auto):
    role = "causal_lm"


class AutoModelForSequenceClassification(_Auto):
    role = "seq_cls"
