"""Transformers' adapter methods on moetorch's models (its `PeftAdapterMixin`): `load_adapter`,
`add_adapter`, `set_adapter`, `disable_adapters`, `enable_adapters`, `active_adapters`,
`get_adapter_state_dict`, `delete_adapter` and `enable_peft_hotswap`, with PEFT doing the work.

PEFT puts its layers into the model in place, so the model stays a moetorch model with adapters,
as a Transformers model does. The files are PEFT's: adapter_config.json and
adapter_model.safetensors (keys under `base_model.model.`), so an adapter saved by PEFT, by
Transformers or by moetorch loads in each of them. PEFT is an optional dependency: it is imported
when one of these methods is called.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

import torch

from .configuration import CONFIG_NAME
from .defaults import checkpoint_path
from .hub import ADAPTER_PATTERNS, hub_options

logger = logging.getLogger("moetorch")

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_WEIGHTS_NAMES = (ADAPTER_WEIGHTS_NAME, "adapter_model.bin")
PEFT_PREFIX = "base_model.model."  # PEFT's files name the weights of a PeftModel around the model
# load_adapter's options that change nothing here (a Hub name takes moetorch.hub's options)
_NO_OPS = {"proxies", "use_auth_token", "load_config"}


def _peft(what: str):
    try:
        import peft
    except ImportError as e:
        raise ImportError(f"{what} needs the `peft` package (pip install peft)") from e
    return peft


def adapter_dir(path: str | os.PathLike) -> str | None:
    """`path` (a local directory) where it holds an adapter (adapter_config.json), else None."""
    path = os.fspath(path)
    return path if os.path.isfile(os.path.join(path, ADAPTER_CONFIG_NAME)) else None


def adapter_only_base(path: str, patterns: list[str] | None, hub: dict[str, Any]) -> tuple[str, str] | None:
    """For a local directory that holds an adapter and no config.json: the base model its config
    names and that model's local directory, which `from_pretrained` loads before the adapter, as in
    Transformers (fetched with `patterns` and `hub`'s options but the adapter's revision and
    subfolder). Else None."""
    if adapter_dir(path) is None or os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return None
    name = adapter_base(path)
    base_hub = {k: v for k, v in hub.items() if k not in ("revision", "subfolder")}  # another repository
    return name, checkpoint_path(name, patterns, **base_hub)


def adapter_base(path: str) -> str:
    """The base model an adapter directory names (its config's `base_model_name_or_path`)."""
    file = os.path.join(path, ADAPTER_CONFIG_NAME)
    try:
        with open(file, encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{file} is not a JSON object: {e}") from e
    if not base:
        raise ValueError(f"{path} holds an adapter and no config.json, and {file} names no base model "
                         "(base_model_name_or_path): load the base model and call load_adapter on it")
    return base


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    for name in ADAPTER_WEIGHTS_NAMES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(file)
            return torch.load(file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"load_adapter: no adapter weights ({' or '.join(ADAPTER_WEIGHTS_NAMES)}) in {path}")


def _adapter_path(peft_model_id: str | os.PathLike, need_config: bool, hub: dict[str, Any]) -> str:
    path = checkpoint_path(peft_model_id, ADAPTER_PATTERNS, **hub)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_adapter: {path} is not a directory (an adapter is a directory with "
                                f"{ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME})")
    if need_config and not os.path.isfile(os.path.join(path, ADAPTER_CONFIG_NAME)):
        raise ValueError(f"load_adapter: no {ADAPTER_CONFIG_NAME} in {path}: it is not an adapter directory")
    return path


def _named(state: dict[str, torch.Tensor], name: str, prefix: str) -> dict[str, torch.Tensor]:
    """An adapter's weights as the model names them: `...lora_A.weight` -> `...lora_A.{name}.weight`."""
    named = {}
    for key, value in state.items():
        if prefix in key:
            head, _, tail = key.rpartition(prefix)
            layer, dot, rest = tail.partition(".")
            key = f"{head}{prefix}{layer}.{name}{dot}{rest}"
        named[key] = value
    return named


def _tuner_layers(model: torch.nn.Module, with_saved_modules: bool = False):
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    kinds = (BaseTunerLayer, ModulesToSaveWrapper) if with_saved_modules else (BaseTunerLayer,)
    return [m for m in model.modules() if isinstance(m, kinds)]


def _inject(model, peft, config, name: str, **kwargs) -> None:
    """PEFT's injection of adapter `name`; where it fails (target modules that match nothing), the
    name it registered first goes again, so that it neither passes for loaded nor blocks a retry."""
    had = name in model.__dict__.get("peft_config", {})
    try:
        peft.inject_adapter_in_model(config, model, name, **kwargs)
    except BaseException:
        if not had:
            model.__dict__.get("peft_config", {}).pop(name, None)
        raise


def _base_weights(model, weights: dict[str, torch.Tensor], name: str) -> tuple[list, list[str]]:
    """(parameter, value) for the base weights an adapter's file holds beside its LoRA weights (the
    embeddings, where a LoRA targets them or the head tied to them), and the names that match no
    weight of the model (left out, as a fresh load leaves them). One of another shape is an error
    before anything changes."""
    params = dict(model.named_parameters(remove_duplicate=False))  # (a tied head's weight too)
    pairs, unmatched = [], []
    for key, value in weights.items():
        param = params.get(key)
        if param is None:
            unmatched.append(key)
        elif param.shape != value.shape:
            raise ValueError(f"load_adapter: hotswap of adapter {name!r}: its files hold {key} of shape "
                             f"{tuple(value.shape)}, and the model's is {tuple(param.shape)}")
        else:
            pairs.append((param, value))
    return pairs, unmatched


def _parameter_swaps(model, weights: dict[str, torch.Tensor], name: str) -> list:
    """(parameter, value) for LoRA weights kept as parameters (`<module>.lora_embedding_A.<name>`),
    checked before anything changes: each must exist, and fit its parameter (a smaller rank is padded
    with zeros, as PEFT pads layers)."""
    swaps = []
    for key, value in weights.items():
        module_name, kind, _ = key.rsplit(".", 2)
        try:
            module = model.get_submodule(module_name)
            param = getattr(module, kind)[name]
        except (AttributeError, KeyError):
            raise RuntimeError(f"load_adapter: hotswap of adapter {name!r}: the loaded adapter has no {key}") from None
        if value.dim() != param.dim() or any(n > m for n, m in zip(value.shape, param.shape)):
            raise ValueError(f"load_adapter: hotswap of adapter {name!r}: {key} has shape {tuple(value.shape)}, past "
                             f"the loaded {tuple(param.shape)} (enable_peft_hotswap(target_rank) pads the first)")
        swaps.append((param, value.to(param.device, param.dtype)))
    return swaps


def _scaling(config, key: str) -> float:
    """LoRA's scaling for the module named `key`, from the config's rank and alpha (and their patterns)."""
    import math

    from peft.utils.hotswap import get_pattern_key

    rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), key), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), key), config.lora_alpha)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


class _Undo:
    """What a failed `load_adapter` puts back: the modules PEFT wrapped (the originals, which its
    wrappers hold), the new adapter's part of layers that held others, which parameters train, the
    adapter configs and the active adapters."""

    def __init__(self, model, name: str):
        self.model, self.name = model, name
        self.modules = dict(model.named_modules())
        self.grads = {p: p.requires_grad for p in model.parameters()}
        self.configs = dict(model.__dict__.get("peft_config", {}))
        self.loaded = model._hf_peft_config_loaded
        self.active = model.active_adapters() if self.loaded and _tuner_layers(model) else []

    def __call__(self) -> None:
        from peft.functional import delete_adapter

        model, name = self.model, self.name
        config = model.__dict__.get("peft_config", {}).get(name)
        if config is not None:
            delete_adapter(model, adapter_name=name, prefix=f"{config.peft_type.value.lower()}_")
        for path, module in list(model.named_modules()):
            original = self.modules.get(path)
            if path and original is not None and original is not module:
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child, original)
        if self.configs:
            model.peft_config = self.configs
        else:
            model.__dict__.pop("peft_config", None)
        model._hf_peft_config_loaded = self.loaded
        if self.active:
            model.set_adapter(self.active if len(self.active) > 1 else self.active[0])
        for param, grad in self.grads.items():
            param.requires_grad_(grad)


def _pad_config(config, target_rank: int) -> None:
    """A LoRA config padded to `target_rank` (as hotswapping pads its weights with zeros): every
    rank becomes `target_rank`, and each alpha grows with it, so that alpha / r (or alpha / sqrt(r)
    with rsLoRA), the scaling the model runs with, stays what it was."""
    import math

    def grown(alpha: float, r: int) -> float:
        ratio = target_rank / r
        return alpha * (math.sqrt(ratio) if config.use_rslora else ratio)

    r, alpha = config.r, config.lora_alpha
    alphas = dict(config.alpha_pattern or {})
    for key, rank in (config.rank_pattern or {}).items():
        alphas[key] = grown(alphas.get(key, alpha), rank)
        config.rank_pattern[key] = target_rank
    for key in set(alphas) - set(config.rank_pattern or {}):
        alphas[key] = grown(alphas[key], r)
    config.alpha_pattern = alphas
    config.lora_alpha = grown(alpha, r)
    config.r = target_rank


class AdapterMixin:
    """What Transformers' models offer for PEFT adapters, with Transformers' names and behaviour."""

    _hf_peft_config_loaded = False  # Transformers' flag, which PEFT and Transformers' Trainer read

    def _check_adapters(self, what: str) -> None:
        _peft(what)
        if not self._hf_peft_config_loaded:
            raise ValueError(f"{what}: no adapter loaded. Load one first (load_adapter or add_adapter)")

    def _check_names(self, what: str, names: list[str]) -> None:
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"{what}: no adapter named {', '.join(map(repr, missing))}; loaded: "
                             f"{list(self.peft_config)}")

    def load_adapter(
        self,
        peft_model_id: str | os.PathLike | None = None,
        adapter_name: str | None = None,
        peft_config: Any = None,
        adapter_state_dict: dict[str, torch.Tensor] | None = None,
        low_cpu_mem_usage: bool = False,
        is_trainable: bool = False,
        hotswap: bool | str = "auto",
        adapter_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, list]:
        """Put the adapter of a directory (adapter_config.json + adapter_model.safetensors; a Hub
        name is fetched, with `revision`, `cache_dir`, `token`, ... as in Transformers), or of
        `peft_config` with `adapter_state_dict`, into the model under `adapter_name`
        ("default") and make it the active one. It is frozen and the model is put in eval mode unless
        `is_trainable=True`. `hotswap=True` replaces the weights of the LoRA adapter of that name in
        place (with `enable_peft_hotswap` first where ranks differ). Returns the loading info:
        `missing_keys` (this adapter's weights that the files lack) and `unexpected_keys`."""
        peft = _peft("load_adapter")
        options = {**(adapter_kwargs or {}), **kwargs}
        hub = hub_options(options)
        unknown = sorted(options.keys() - _NO_OPS)
        if unknown:
            raise TypeError(f"load_adapter() got unknown keyword arguments {unknown}")
        loaded = self.__dict__.get("peft_config", {}) if self._hf_peft_config_loaded else {}
        if hotswap == "auto":
            hotswap = bool(getattr(self, "_hotswap_enabled", False) and adapter_name in loaded)
        name = adapter_name if adapter_name is not None else "default"
        if hotswap and name not in loaded:
            raise ValueError(f"load_adapter: hotswap=True replaces a loaded adapter's weights, and no adapter named "
                             f"{name!r} is loaded (loaded: {sorted(loaded)})")
        if not hotswap and name in loaded:
            raise ValueError(f"load_adapter: an adapter named {name!r} is already loaded: pass another adapter_name, "
                             "or hotswap=True to replace its weights")
        if peft_model_id is None and (peft_config is None or adapter_state_dict is None):
            raise ValueError("load_adapter: pass peft_model_id (an adapter directory), or peft_config together "
                             "with adapter_state_dict")
        path = None if peft_model_id is None else _adapter_path(peft_model_id, peft_config is None, hub)
        if peft_config is None:
            peft_config = peft.PeftConfig.from_pretrained(path)
        elif isinstance(peft_config, dict):
            peft_config = peft.get_peft_config(peft_config)
        if peft_config.is_prompt_learning:
            raise ValueError(f"load_adapter: {peft_config.peft_type.value} is a prompt-learning adapter, which adds "
                             "virtual tokens rather than layers and cannot be put into the model's layers; "
                             "moetorch's generate does not run it either")
        if hotswap and peft_config.peft_type.value != "LORA":
            raise ValueError("load_adapter: hotswap replaces LoRA adapters only; pass hotswap=False")
        state = adapter_state_dict if adapter_state_dict is not None else _read_weights(path)
        state = {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}
        if hasattr(peft_config, "inference_mode"):
            peft_config.inference_mode = not is_trainable

        # the configs as their files give them, before any padding: what a hotswap compares
        as_given = self.__dict__.setdefault("_adapter_configs_as_given", {})
        pad = getattr(self, "_prepare_peft_hotswap_kwargs", None) and not loaded
        if pad and getattr(peft_config, "target_parameters", None):
            raise ValueError(f"load_adapter: enable_peft_hotswap pads the adapter's LoRA layers, and PEFT cannot pad "
                             f"the experts' stacked weights that target_parameters {peft_config.target_parameters} "
                             "names; load it without enable_peft_hotswap (same-rank adapters still swap in place)")
        if hotswap:
            from peft.utils.hotswap import check_hotswap_configs_compatible, hotswap_adapter_from_state_dict

            named = _named(state, name, "lora_")
            # PEFT's swap parses `<module>.lora_A.<name>.weight`; the embeddings' LoRA weights are
            # parameters, `<module>.lora_embedding_A.<name>`, swapped here, and their files also hold
            # the embeddings' own weights
            layers = {k: v for k, v in named.items() if "lora_" in k and "lora_embedding_" not in k}
            params = {k: v for k, v in named.items() if "lora_embedding_" in k}
            base, unexpected = _base_weights(self, {k: v for k, v in named.items() if "lora_" not in k}, name)
            swaps = _parameter_swaps(self, params, name)
            check_hotswap_configs_compatible(as_given.get(name, loaded[name]), peft_config)
            given = copy.deepcopy(peft_config)
            hotswap_adapter_from_state_dict(self, layers, name, peft_config)
            with torch.no_grad():
                for param, value in swaps:
                    param.zero_()
                    param[tuple(slice(0, n) for n in value.shape)].copy_(value)
                for param, value in base:
                    param.copy_(value)
                # each layer's scaling from its module's name (PEFT's swap matches rank_pattern and
                # alpha_pattern against weight names, which they never match)
                for module_name, module in self.named_modules():
                    scaling = getattr(module, "scaling", None)
                    if isinstance(scaling, dict) and name in scaling:
                        value = _scaling(peft_config, module_name)
                        if isinstance(scaling[name], torch.Tensor):  # (as padding for hotswap leaves it)
                            scaling[name].fill_(value)
                        else:
                            scaling[name] = value
            # the adapter is now this one: its config goes with it (a save then reloads what runs),
            # at the padded rank where the first adapter was padded (its rank_pattern too), else at
            # the rank of the weights it was copied into
            padded = self.__dict__.get("_hotswap_padded_rank") or (loaded[name].r if peft_config.r != loaded[name].r
                                                                    else None)
            self.peft_config[name] = peft_config
            as_given[name] = given
            if padded:
                _pad_config(peft_config, padded)
            missing: list[str] = []
        else:
            undo = _Undo(self, name)
            _inject(self, peft, peft_config, name, low_cpu_mem_usage=low_cpu_mem_usage)
            self._hf_peft_config_loaded = True
            try:
                result = peft.set_peft_model_state_dict(self, state, adapter_name=name,
                                                        low_cpu_mem_usage=low_cpu_mem_usage)
            except BaseException:  # weights of another shape, say: the model as it was, the name free
                undo()
                raise
            unexpected = list(result.unexpected_keys)
            missing = [k for k in result.missing_keys if name in k.split(".")]  # this adapter's, not the base's
            as_given[name] = copy.deepcopy(peft_config)
            if pad and len(self.peft_config) == 1:
                from peft.utils.hotswap import prepare_model_for_compiled_hotswap

                # pad the first adapter to the highest rank, so that later ones replace it in place; its
                # config's rank follows, and its alpha with it (the scaling PEFT keeps: a save reloads alike)
                prepare_model_for_compiled_hotswap(self, **self._prepare_peft_hotswap_kwargs)
                _pad_config(peft_config, self._prepare_peft_hotswap_kwargs["target_rank"])
                self._hotswap_padded_rank = self._prepare_peft_hotswap_kwargs["target_rank"]
        if peft_config.inference_mode:
            self.eval()
            for module in _tuner_layers(self):
                module.requires_grad_(False)
        where = path or "adapter_state_dict"
        if unexpected:
            logger.warning("load_adapter %s: %d weights match no adapter layer of the model: %s", where,
                           len(unexpected), ", ".join(unexpected[:8]))
        if missing:
            logger.warning("load_adapter %s: %d weights of adapter %r are not in the files and keep their "
                           "initial values: %s", where, len(missing), name, ", ".join(missing[:8]))
        return {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": [], "error_msgs": []}

    def enable_peft_hotswap(self, target_rank: int = 128, check_compiled: str = "error") -> None:
        """Let `load_adapter(..., hotswap=True)` (then the default for an adapter name already loaded)
        replace LoRA adapters of ranks up to `target_rank` in place. Call it before the first adapter
        is loaded: that adapter is then padded to `target_rank`."""
        if check_compiled not in ("error", "warn", "ignore"):
            raise ValueError(f"enable_peft_hotswap: check_compiled must be 'error', 'warn' or 'ignore', "
                             f"got {check_compiled!r}")
        if self._hf_peft_config_loaded:
            if check_compiled == "error":
                raise RuntimeError("enable_peft_hotswap: call it before loading the first adapter")
            if check_compiled == "warn":
                logger.warning("enable_peft_hotswap: called after an adapter was loaded; it pads only adapters "
                               "loaded from now on")
        self._hotswap_enabled = True
        self._prepare_peft_hotswap_kwargs = {"target_rank": target_rank, "check_compiled": check_compiled}

    def add_adapter(self, adapter_config: Any, adapter_name: str | None = None) -> None:
        """Add a new adapter of `adapter_config` (a PEFT config of a method that adds layers: LoRA,
        IA3, ...) for training, and make it the active one."""
        peft = _peft("add_adapter")
        name = adapter_name or "default"
        if self._hf_peft_config_loaded and name in self.peft_config:
            raise ValueError(f"add_adapter: an adapter named {name!r} is already loaded; pass another adapter_name")
        if not isinstance(adapter_config, peft.PeftConfig):
            raise TypeError(f"add_adapter: adapter_config must be a PEFT config (peft.LoraConfig, ...), "
                            f"got {type(adapter_config).__name__}")
        if adapter_config.is_prompt_learning:
            raise ValueError(f"add_adapter: {adapter_config.peft_type.value} is a prompt-learning method, which "
                             "adds virtual tokens rather than layers; use peft.get_peft_model")
        adapter_config.base_model_name_or_path = self.__dict__.get("name_or_path") or None
        _inject(self, peft, adapter_config, name)
        self._hf_peft_config_loaded = True
        self.set_adapter(name)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make `adapter_name` (or a list of names) the active adapter(s), and no other."""
        self._check_adapters("set_adapter")
        self._check_names("set_adapter", adapter_name if isinstance(adapter_name, list) else [adapter_name])
        layers = _tuner_layers(self, with_saved_modules=True)
        if not layers:
            raise ValueError("set_adapter: the model holds no adapter layers")
        for module in layers:
            if hasattr(module, "check_set_adapter"):  # a saved copy (modules_to_save), as PEFT's own set_adapter:
                # another adapter's copy is switched off where the one named has none
                chosen = module.check_set_adapter(adapter_name)
                module.set_adapter(chosen if chosen in module._adapters else [])
            else:
                module.set_adapter(adapter_name)

    def disable_adapters(self) -> None:
        """Run the base model alone, the adapters kept (`enable_adapters` brings them back)."""
        self._check_adapters("disable_adapters")
        for module in _tuner_layers(self, with_saved_modules=True):
            module.enable_adapters(enabled=False)

    def enable_adapters(self) -> None:
        """Run the active adapters again after `disable_adapters`."""
        self._check_adapters("enable_adapters")
        for module in _tuner_layers(self, with_saved_modules=True):  # the modules_to_save copies too
            module.enable_adapters(enabled=True)

    def active_adapters(self) -> list[str]:
        """The names of the active adapters."""
        self._check_adapters("active_adapters")
        active = _tuner_layers(self)[0].active_adapter
        return [active] if isinstance(active, str) else list(active)

    def get_adapter_state_dict(self, adapter_name: str | None = None, state_dict: dict | None = None) -> dict:
        """The weights of one adapter (the first active one by default), named as PEFT saves them
        (without the adapter's name)."""
        self._check_adapters("get_adapter_state_dict")
        from peft import get_peft_model_state_dict

        name = adapter_name if adapter_name is not None else self.active_adapters()[0]
        self._check_names("get_adapter_state_dict", [name])
        return get_peft_model_state_dict(self, state_dict=state_dict, adapter_name=name)

    def delete_adapter(self, adapter_names: str | list[str]) -> None:
        """Remove adapters and their layers' weights from the model."""
        self._check_adapters("delete_adapter")
        from peft.functional import delete_adapter

        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names("delete_adapter", names)
        for name in names:
            delete_adapter(self, adapter_name=name, prefix=f"{self.peft_config[name].peft_type.value.lower()}_")
            self.peft_config.pop(name, None)
        if not self.peft_config:
            del self.peft_config
            self._hf_peft_config_loaded = False
            self.__dict__.pop("_hotswap_padded_rank", None)
        for name in names:
            self.__dict__.get("_adapter_configs_as_given", {}).pop(name, None)

    def save_adapter(self, save_directory: str | os.PathLike, state_dict: dict | None = None,
                     save_peft_format: bool = True) -> None:
        """The adapter part of what `save_pretrained` writes for a model with adapters, as
        Transformers does: the active adapter in PEFT's files (adapter_config.json and
        adapter_model.safetensors); no config.json and no base weights."""
        active = self.active_adapters()
        if len(active) > 1:
            raise ValueError(f"save_pretrained: adapters {active} are active at once; save one at a time "
                             "(set_adapter(name), then save_pretrained)")
        from safetensors.torch import save_file

        weights = self.get_adapter_state_dict(active[0], state_dict=state_dict)
        if save_peft_format:
            weights = {PEFT_PREFIX + k: v for k, v in weights.items()}
        weights = {k: v.detach().contiguous() for k, v in weights.items()}
        save_file(weights, os.path.join(save_directory, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        self.peft_config[active[0]].save_pretrained(save_directory)
