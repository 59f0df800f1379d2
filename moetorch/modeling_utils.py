"""The Transformers-compatible façade shared by every architecture: loading, saving, init,
embedding resizing, gradient checkpointing, and the argument handling at the top of `forward`.

Model files keep their modules small and explicit; what is the same for every model lives here.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import checkpoint, placement
from .adapters import AdapterMixin, adapter_dir, adapter_only_base
from .cache import Cache, DynamicCache, StaticCache, _carry_over_hint, _kv_shape
from .configuration import CONFIG_NAME, MoeConfig, as_moetorch_config
from .defaults import checkpoint_path
from .generation.configuration import DEFAULTS as GENERATION_FIELDS
from .generation.configuration import GENERATION_CONFIG_NAME, GenerationConfig, as_generation_config
from .generation.custom import install_checkpoint_generate
from .hub import PUSH_OPTIONS, PushToHubMixin, hub_options, upload
from .ops.attention import Packed, build_mask, check_attn_implementation, token_runs, varlen_kernel_serves
from .ops.host import host_mapped_parameter, marked_host_mapped, module_device, repin
from .ops.losses import causal_lm_loss_function, sequence_classification_loss
from .ops.moe import copies_ahead, training_paths
from .ops.norms import Residual
from .outputs import MoeModelOutputWithPast
from .placement import format_size
from .utils import WARNED_ONCE, outside_vocabulary, warn_once

logger = logging.getLogger("moetorch")

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
}
# the dtypes a model is built in (torch's default dtype can be each of them)
_MODEL_DTYPES = {torch.float32, torch.bfloat16, torch.float16, torch.float64}


def resolve_dtype(dtype: Any, config: MoeConfig) -> torch.dtype:
    if isinstance(dtype, Mapping):  # by sub-config, as Transformers (deprecated there) takes it: the main one's
        logger.warning("dtype given by module (%s): these models have one, and the whole model takes the main "
                       "entry's (\"\"; else the default dtype), as in Transformers", dict(dtype))
        dtype = dtype.get("", torch.get_default_dtype())
    if dtype is None or dtype == "auto":
        dtype = config.dtype or "float32"
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype (the weights' type), got {dtype}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name in _DTYPES:
        return _DTYPES[name]
    # any other name of a dtype torch builds models in ("float64", "double"), as Transformers takes it
    found = getattr(torch, name, None) if isinstance(dtype, str) else None
    if not isinstance(found, torch.dtype) or found not in _MODEL_DTYPES:
        raise ValueError(f"dtype must be 'auto', a torch dtype or its name (one of {sorted(_DTYPES)}, 'float64', "
                         f"'double'), got {dtype!r}")
    return found


def checkpoint_generation_config(path: str | os.PathLike, overrides: dict[str, Any],
                                 built: GenerationConfig) -> GenerationConfig:
    """A loaded checkpoint's generation config, as Transformers reads it: generation_config.json
    with `overrides` (the generation fields among a model class's `from_pretrained` keywords; an
    Auto class's go to the config alone), else one made from config.json as it is on disk (the
    keywords left out), else `built` (the model's own)."""
    if os.path.isfile(os.path.join(path, GENERATION_CONFIG_NAME)):
        config = GenerationConfig.from_pretrained(path)
        config.update(**overrides)
        return config
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as f:
            return GenerationConfig.from_model_config(json.load(f))
    return built


def resolve_device(device: Any, device_map: Any) -> torch.device:
    """The one device of a whole model: `device`, else a device_map that names one device (a
    device, or a dict whose values are all the same), else the CPU. "auto": a GPU when there is one."""
    if device is None and device_map is not None:
        if isinstance(device_map, Mapping):
            targets = {placement.as_device(v, "device_map") for v in device_map.values()}
            if len(targets) != 1:
                raise ValueError("a device_map over several devices places a model loaded by from_pretrained; "
                                 "here, a model already built, move it to one device")
            device = targets.pop()
        elif isinstance(device_map, str) and device_map in placement.STRATEGIES:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif isinstance(device_map, str):
            try:
                return placement.as_device(device_map)
            except ValueError:
                raise ValueError(f"device_map must be one of {placement.STRATEGIES}, a device (cpu, cuda, cuda:N, "
                                 f"an index) or a dict of module names to devices; got {device_map!r}") from None
        else:
            device = device_map
    what = "device" if device_map is None else "device_map"
    return placement.as_device(device if device is not None else "cpu", what)


def check_fits(model: PreTrainedModel, where: torch.device | Mapping[str, torch.device], path: str,
               host: list[str] = ()) -> None:
    """Raise `torch.OutOfMemoryError` before allocating when the weights (parameters and buffers, at
    their dtype) that go to a CUDA device exceed its free memory, naming both. `where` is the one
    device of the whole model, or the device of each of `placement.units`; the parameters named in
    `host` stay in host memory."""
    if isinstance(where, torch.device):
        need = {where: model.get_memory_footprint()}
    else:
        params = dict(model.named_parameters())
        modules, skip, need = dict(placement.units(model)), _tied_ids(model) | {id(params[n]) for n in host}, {}
        for name, device in where.items():
            need[device] = need.get(device, 0) + placement.unit_bytes(modules[name], skip)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    for device, n in need.items():
        if device.type != "cuda":
            continue
        free, total = torch.cuda.mem_get_info(device)
        if n <= free:
            continue
        room = f"in {dtype}, but {device} has {format_size(free)} free of {format_size(total)}"
        if isinstance(where, torch.device):
            raise torch.OutOfMemoryError(
                f"{path}: {type(model).__name__} needs {format_size(n)} for its weights {room}. Loaded with "
                f"device= or one device in device_map, the whole model goes to one device: load it with "
                f"device_map=\"auto\" (and max_memory) to spread its layers over the GPUs and the CPU, on a GPU "
                f"with more free memory, or on the CPU."
            )
        names = [name for name, d in where.items() if d == device]
        raise torch.OutOfMemoryError(
            f"{path}: the {len(names)} module(s) that device_map places on {device} ({names[0]} to {names[-1]}) "
            f"need {format_size(n)} {room}: give it a smaller max_memory, or place fewer modules there."
        )


def meta_model(cls: type, config: MoeConfig, dtype: torch.dtype) -> PreTrainedModel:
    """`cls(config)` on the meta device, its floating parameters in `dtype` (for `materialize`)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return cls(config)
    finally:
        torch.set_default_dtype(previous)


def materialize(model: PreTrainedModel, planned: Mapping[str, torch.device], source: str) -> None:
    """Allocate the weights of a model built on the meta device where `planned` (see `place`) puts
    each of `placement.units`, after checking that they fit: the parameters uninitialised, the
    buffers computed, the tied weights tied. Where the plan uses a GPU
    and the CPU, the units on the CPU run on a GPU (`placement.run_on_gpus`) with their experts'
    weights in pinned host memory; a model left over several devices moves its hidden state
    between them (`run_layers`). `source` names the checkpoint in messages."""
    where, held = placement.run_on_gpus(planned, [n for n, _ in placement.units(model)])
    if _tied_ids(model):  # a head tied to the embeddings runs where they do
        where["lm_head"] = where[next(n for n in where if n.endswith("embed_tokens"))]
    mapped = host_mappable(model, held)
    devices = set(where.values())
    if len(devices) == 1 and not mapped:
        check_fits(model, next(iter(devices)), source)
        model.to_empty(device=next(iter(devices)))
    else:
        check_fits(model, where, source, mapped)
        modules = dict(placement.units(model))
        for name, d in where.items():
            _materialize(modules[name], d, {p[len(name) + 1:] for p in mapped if p.startswith(name + ".")})
    for m in model.modules():
        if hasattr(m, "init_buffers"):
            m.init_buffers()
    model.tie_weights()
    if len(devices) > 1:
        model.get_decoder().spread_over_devices = True  # `run_layers` moves the inputs of each layer
    if len(set(planned.values())) > 1:
        logger.info("%s: placed over %s: %s%s", source, ", ".join(sorted(map(str, set(planned.values())))),
                    placement.hf_device_map(planned),
                    f"; the {len(held)} module(s) placed on the CPU run on {', '.join(sorted(map(str, devices)))}, "
                    f"their experts' weights ({format_size(_bytes(model, mapped))}) read from pinned host memory"
                    if mapped else "")


def host_mappable(model: nn.Module, units: list[str]) -> list[str]:
    """The names of the parameters of `units` (see `placement.units`) that may stay in host memory
    while their module runs on a GPU: the MLP experts' stacked weights of a decoder layer (its
    `host_mappable`), which the expert kernels read over the bus (`ops.moe.host_weights`)."""
    modules = dict(placement.units(model))
    return [f"{u}.{p}" for u in units for p in getattr(modules[u], "host_mappable", ())]


def _materialize(module: nn.Module, device: torch.device, mapped: set[str]) -> None:
    """`module.to_empty(device)`, except that its parameters named in `mapped` become pinned host
    memory that the GPU reads in place (`ops.host.host_mapped_parameter`)."""
    owners: dict[str, list[str]] = {}
    for name in sorted(mapped):
        owner, _, leaf = name.rpartition(".")
        owners.setdefault(owner, []).append(leaf)
    held = {owner: (list(module.get_submodule(owner)._parameters),
                    {leaf: module.get_submodule(owner)._parameters.pop(leaf) for leaf in leaves})
            for owner, leaves in owners.items()}
    module.to_empty(device=device)
    for owner, (order, taken) in held.items():
        params = module.get_submodule(owner)._parameters
        both = {**params, **{leaf: host_mapped_parameter(p) for leaf, p in taken.items()}}
        params.clear()
        params.update((n, both[n]) for n in order)  # in their order (an optimizer's state follows it)


def _bytes(model: nn.Module, names: list[str]) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() * params[n].element_size() for n in names)


def _tied_ids(model: nn.Module) -> set[int]:
    # a head tied to the embeddings holds no bytes of its own
    head = getattr(model, "lm_head", None)
    return {id(head.weight)} if head is not None and getattr(model.config, "tie_word_embeddings", False) else set()


def place(model: PreTrainedModel, device: Any, device_map: Any, max_memory: Any) -> dict[str, torch.device]:
    """The device of each of `placement.units(model)` for from_pretrained's arguments: all on one
    device for `device`, one device or no device_map (see `resolve_device`), else as
    `placement` plans a strategy name or maps a dict."""
    named = placement.units(model)
    names = [n for n, _ in named]
    strategy = isinstance(device_map, str) and device_map in placement.STRATEGIES
    if device is not None or not (strategy or isinstance(device_map, Mapping)):
        if max_memory is not None and device_map is None:
            raise ValueError("max_memory applies to a device_map strategy ('auto', 'balanced', ...): pass "
                             "device_map=\"auto\" with it")
        one = resolve_device(device, device_map)
        return dict.fromkeys(names, one)
    # the rotary tables, and a head tied to the embeddings, go where the embeddings go
    embed, tied = next(e for e in names if e.endswith("embed_tokens")), _tied_ids(model)
    pinned = {n: embed for n in names if n.endswith("rotary_emb") or (tied and n == "lm_head")}
    if isinstance(device_map, Mapping):
        if max_memory is not None:
            raise ValueError("max_memory applies to a device_map strategy ('auto', 'balanced', ...), not to a "
                             "device_map dict, which says where each module goes")
        where = placement.from_dict(device_map, names, optional=pinned)
        for n, to in pinned.items():  # beside the embeddings, whatever the dict says
            where[n] = where[to]
    else:
        sizes = [(n, placement.unit_bytes(m, tied)) for n, m in named]
        # a unit placed on the CPU runs on a GPU, which holds all of it but a layer's experts
        resident = {n: size - _bytes(model, host_mappable(model, [n])) for n, size in sizes if n not in pinned}
        where = placement.plan(sizes, placement.gpu_budgets(max_memory), device_map, pinned, resident)
    placement.check_devices(where)
    return where


# Options of Transformers' from_pretrained with nothing to do here (remote code, memory, formats), accepted
# and ignored; the Hub's options (revision, token, ...) go to moetorch.hub.
_LOADER_ONLY_KWARGS = {
    "trust_remote_code", "low_cpu_mem_usage", "resume_download", "proxies",
    "offload_folder", "offload_state_dict", "offload_buffers",  # disk offload: moetorch never offloads to disk
    "weights_only", "disable_mmap", "tqdm_class", "use_kernels", "allow_all_kernels",
    "_from_auto", "_from_pipeline", "_commit_hash", "_fast_init", "mirror",
}
# Transformers' loading options moetorch lacks, with the value that asks for nothing: another value is
# an error that names the option (rather than a key that lands in config.json).
_LOADER_UNSUPPORTED = {
    "quantization_config": None, "gguf_file": None, "tp_plan": None,
    "tp_size": None, "distributed_config": None, "device_mesh": None,
    "kernel_config": None, "fusion_config": None, "from_tf": False, "from_flax": False,
}
# save_pretrained's options taken besides its named ones: each changes nothing for a local safetensors save
# or is read from the keywords below (save_peft_format, save_original_format)
_SAVE_OPTIONS = {"save_function", "save_peft_format", "save_original_format", "safe_serialization"}
# Transformers' experts kernels (`set_experts_implementation`): names taken, none of them changes moetorch's
_EXPERTS_IMPLEMENTATIONS = {"eager", "grouped_mm", "batched_mm", "deepgemm", "sonicmoe"}
# A module's flag, as Transformers names it: init_weights has filled it, or a checkpoint has.
_INITIALISED = "_is_hf_initialized"


def check_experts_implementation(experts_implementation: str | Mapping[str, str] | None, where: str) -> None:
    """A ValueError, naming `where` (the method and argument) and the names taken, unless
    `experts_implementation` is None or one of Transformers' experts kernels (a str, or a dict by
    sub-config whose "" entry is the model's). moetorch picks its experts' kernels itself (ops.moe)."""
    impl = (experts_implementation.get("", "eager") if isinstance(experts_implementation, Mapping)
            else experts_implementation)
    if impl is not None and impl not in _EXPERTS_IMPLEMENTATIONS:
        raise ValueError(f"{where}: {impl!r} is not an experts implementation; Transformers' are "
                         f"{sorted(_EXPERTS_IMPLEMENTATIONS)}")


def _tied_head_copied(module: PreTrainedModel, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """`state_dict()` hook: a head tied to the input embeddings gets a copy of the shared tensor
    (with keep_vars=False). Both keys stay, as in Transformers' models' state_dict, but no longer
    share memory, which safetensors refuses: Transformers' Trainer writes a non-Transformers
    model's state_dict with it, and stopped at JetMoE's first checkpoint. Loading it copies the
    same values into the one parameter."""
    head, embeddings = module.get_output_embeddings(), module.get_input_embeddings()
    if head is None or head.weight is not embeddings.weight:
        return
    key = prefix + next(name for name, m in module.named_modules() if m is head) + ".weight"
    value = state_dict.get(key)
    if value is not None and not isinstance(value, nn.Parameter):
        state_dict[key] = value.clone()


def _from_checkpoint_names(model: PreTrainedModel, state_dict: Mapping[str, torch.Tensor],
                           strict: bool) -> Mapping[str, torch.Tensor]:
    """`state_dict` with the names a checkpoint stores (PhiMoE's original per-expert
    `block_sparse_moe.experts.E.w1/w2/w3` and `gate`, as Transformers' `save_pretrained` and its
    Trainer write them) as this model's parameters: each piece copied into its place in a copy of
    the fused parameter. A state dict of the model's own names comes back as it is."""
    from_disk = checkpoint.name_maps(model.config.model_type)[0]
    targets = {key: from_disk(key, model.config) for key in state_dict}
    if all(t.name == key and t.index is None for key, t in targets.items()):
        return state_dict
    own, out, pieces = model.state_dict(), collections.OrderedDict(), {}
    if hasattr(state_dict, "_metadata"):  # (what nn.Module's loading reads beside the tensors)
        out._metadata = state_dict._metadata
    for key, t in targets.items():
        if t.index is None:
            out[t.name] = state_dict[key]
            continue
        if t.name not in own:  # (left for load_state_dict to report as unexpected)
            out[key] = state_dict[key]
            continue
        if t.name not in out:
            out[t.name] = own[t.name].detach().clone()
        out[t.name][t.index] = state_dict[key]
        pieces.setdefault(t.name, (set(), state_dict[key].numel()))[0].add(repr(t.index))
    for name, (seen, piece) in pieces.items():
        whole = own[name].numel() // piece  # (the pieces of one parameter are of one size)
        if strict and len(seen) != whole:
            raise RuntimeError(f"load_state_dict: {name} is stored as {whole} per-expert pieces, of which the state "
                               f"dict holds {len(seen)}")
    return out


class PreTrainedModel(PushToHubMixin, AdapterMixin, nn.Module):
    """Base of every moetorch model: `from_pretrained`, `save_pretrained`, Transformers' helpers and
    its adapter methods (`load_adapter`, ...; see `moetorch.adapters`)."""

    config_class: type[MoeConfig] = MoeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # Transformers' name of the task loss ("ForCausalLM", "ForSequenceClassification"; None for a
    # base model). Its Trainer reads it: a causal LM's loss shifts the labels, so the Trainer counts
    # the tokens of `labels[..., 1:]` for `num_items_in_batch`.
    loss_type: str | None = None
    # Transformers' tensors a save leaves out (none here: a tied head is left out by its tie). Its
    # Trainer reads this when a checkpoint it resumes from lacks tensors.
    _keys_to_ignore_on_save: set[str] | None = None

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict`, which also takes the names a checkpoint stores (PhiMoE's
        original per-expert names, as Transformers' `save_pretrained` and its Trainer's checkpoints
        write them): Transformers' Trainer resumes a checkpoint that Transformers' model wrote this
        way, where that model's own `load_state_dict` leaves its experts as they were."""
        return super().load_state_dict(_from_checkpoint_names(self, state_dict, strict), strict=strict, assign=assign)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Each model class takes Transformers' own config of its model too (a script may still
        import `transformers.PhimoeConfig`): its values, as moetorch's config, reach the class's
        `__init__` and everything it builds."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_takes_transformers_config", False):
            @functools.wraps(init)
            def __init__(self, config, *args, **kw):
                init(self, as_moetorch_config(config), *args, **kw)

            __init__._takes_transformers_config = True
            cls.__init__ = __init__

    def __init__(self, config: MoeConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            kind = type(config)
            raise TypeError(f"{type(self).__name__} needs a moetorch.{self.config_class.__name__}, got "
                            f"{kind.__module__}.{kind.__qualname__}")
        config.validate_rope()  # (RoPE settings changed since the config was made: refused, not run as default)
        self.config = config
        self.name_or_path = config.name_or_path  # the checkpoint directory or name, once loaded
        self.model_tags: list[str] | None = None  # what trainers tag a model with (add_model_tags)
        self.attn_implementation = check_attn_implementation(config.attn_implementation)
        if config.attn_implementation is not None:  # (set as a dict, or "flex_attention": what the layers run)
            config.attn_implementation = self.attn_implementation
        self.gradient_checkpointing = False
        self.register_state_dict_post_hook(_tied_head_copied)

    # ---- initialisation --------------------------------------------------------------------
    def post_init(self) -> None:
        """The end of every model's `__init__`, as Transformers': `init_weights`, then gradient
        checkpointing on where the config asks for it (`gradient_checkpointing: true`, an older
        config.json key, which is then dropped from the config)."""
        self.init_weights()
        if getattr(self.config, "gradient_checkpointing", False):
            self.gradient_checkpointing_enable()
            del self.config.gradient_checkpointing

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init as Transformers does: normal(0, initializer_range), zero biases, unit norms,
        the rotary tables computed. Each module once: a module already initialised, or loaded from a
        checkpoint, is left as it is (`_is_hf_initialized`), so a second `post_init` changes nothing.
        Under a `torch.device("meta")` context nothing is initialised (there is nothing to fill):
        after `to_empty`, `init_weights()` then initialises every module."""
        if torch.get_default_device().type != "meta":
            for module in self.modules():
                if not getattr(module, _INITIALISED, False):
                    self._init_module(module)
                    if hasattr(module, "init_buffers"):
                        module.init_buffers()
                    setattr(module, _INITIALISED, True)
        self.tie_weights()

    def _init_module(self, module: nn.Module) -> None:
        # one module's own parameters, as init_weights sets them
        std = self.config.initializer_range
        if hasattr(module, "init_parameters") and module is not self:
            module.init_parameters(std)
        elif isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()

    @torch.no_grad()
    def _init_left_out(self, names: set[str]) -> None:
        """Initialise, as init_weights does, the parameters a checkpoint left out (a task head it
        lacks, a tensor of another shape); the loaded parameters of the same modules are kept."""
        for owner in sorted({n.rpartition(".")[0] for n in names}):
            module = self.get_submodule(owner)
            keep = {n: p.detach().clone() for n, p in module.named_parameters(recurse=False)
                    if f"{owner}.{n}" not in names}
            self._init_module(module)
            for n, value in keep.items():
                getattr(module, n).copy_(value)

    def _apply(self, fn, recurse: bool = True):
        # `to(dtype)`, `half()`, ...: expert weights held in pinned host memory stay pinned (ops.host)
        out = super()._apply(fn, recurse)
        repin(self)
        return out

    # ---- properties and small helpers ------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def parameter_devices(self) -> list[torch.device]:
        """The devices that hold the parameters, in order of first use (the embeddings' first); expert
        weights that a GPU reads from host memory count as the GPU's (`ops.host`)."""
        return list(dict.fromkeys(p.device for p in self.parameters() if not marked_host_mapped(p)))

    @property
    def spans_devices(self) -> bool:
        """Whether the model is placed over several devices (`from_pretrained(device_map=...)`)."""
        return len(self.parameter_devices()) > 1

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes of the parameters (and, with return_buffers, the buffers) held in memory."""
        tensors = list(self.parameters()) + (list(self.buffers()) if return_buffers else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        skip = {id(self.get_input_embeddings().weight)} if exclude_embeddings else set()
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if id(p) in seen or id(p) in skip or (only_trainable and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix, self)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.base_model.embed_tokens = value
        self.tie_weights()

    def get_decoder(self) -> nn.Module:
        """The decoder stack (`model` of a causal LM or classifier; the model itself otherwise)."""
        return self.base_model

    def set_decoder(self, decoder: nn.Module) -> None:
        if self.base_model is self:
            raise ValueError(f"{type(self).__name__} is the decoder itself: set its layers instead")
        setattr(self, self.base_model_prefix, decoder)

    def enable_input_require_grads(self) -> None:
        """Make the input embeddings' output require gradients, so that gradient checkpointing
        reaches trainable parameters behind frozen embeddings (adapters such as LoRA)."""
        def require_grads(module, inputs, output):
            output.requires_grad_(True)

        self.disable_input_require_grads()
        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(require_grads)

    def disable_input_require_grads(self) -> None:
        hook = self.__dict__.pop("_require_grads_hook", None)
        if hook is not None:
            hook.remove()

    def get_output_embeddings(self) -> nn.Linear | None:
        return getattr(self, "lm_head", None)

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        """Replace the head (`lm_head`), tied to the input embeddings at once where the config ties
        them. A model without a head (a base model, a classifier) raises, as in Transformers."""
        if self.get_output_embeddings() is None:
            raise AttributeError(f"set_output_embeddings: {type(self).__name__} has no output embeddings (lm_head) "
                                 "to replace with new_embeddings")
        self.lm_head = new_embeddings
        self.tie_weights()

    def tie_weights(self, missing_keys: set[str] | None = None, recompute_mapping: bool = True) -> None:
        """Tie the head to the input embeddings where the config says so, as Transformers does: the
        head's bias is padded with zeros (or cut) to the weight's rows. `missing_keys` loses the tied
        head's name; the config is read at every call (`recompute_mapping` changes nothing)."""
        head = self.get_output_embeddings()
        if head is None or not self.config.tie_word_embeddings:
            return
        head.weight = self.get_input_embeddings().weight
        _fit_head(head)
        if missing_keys is not None:
            missing_keys.discard("lm_head.weight")

    @classmethod
    def can_generate(cls) -> bool:
        """Whether the class generates text (`generate`): the causal LMs, not the base models or
        the classifiers. A class method, as in Transformers."""
        return hasattr(cls, "generate")

    @property
    def loss_function(self) -> Callable[..., torch.Tensor]:
        """The task loss with Transformers' signature for `loss_type`: `(logits, labels, vocab_size,
        num_items_in_batch=None, ignore_index=-100, shift_labels=None)` for a causal LM (and, as
        in Transformers, for a base model), `(labels, pooled_logits, config)` for a classifier."""
        if self.loss_type == "ForSequenceClassification":
            return sequence_classification_loss
        return causal_lm_loss_function

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Add tags to `model_tags`, each once, as Transformers does (TRL's trainers tag the models
        they train)."""
        if isinstance(tags, str):
            tags = [tags]
        if self.model_tags is None:
            self.model_tags = []
        self.model_tags.extend(t for t in dict.fromkeys(tags) if t not in self.model_tags)

    def set_attn_implementation(self, attn_implementation: str | Mapping[str, str]) -> None:
        """Switch the attention backend ("eager", "sdpa", "flash_attention_2"; "flex_attention" runs
        sdpa; a dict by sub-config as in Transformers, its "" entry the model's) of every layer."""
        impl = check_attn_implementation(attn_implementation)
        self.config.attn_implementation = impl
        for m in self.modules():
            if hasattr(m, "attn_implementation"):
                m.attn_implementation = impl

    def set_experts_implementation(self, experts_implementation: str | Mapping[str, str]) -> None:
        """Transformers' switch of the experts' kernels: taken, and changes nothing. moetorch picks
        the experts' kernel itself, per device and token count (`ops.moe.pick_backend`), each one
        computing the same function. A name Transformers does not know is a ValueError."""
        if experts_implementation is None:
            raise ValueError("set_experts_implementation: experts_implementation is None; Transformers' are "
                             f"{sorted(_EXPERTS_IMPLEMENTATIONS)}")
        check_experts_implementation(experts_implementation, "set_experts_implementation")

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False,
    ) -> None:
        """In training, recompute the decoder layers' activations in the backward instead of keeping
        them, as Transformers does: `activation_checkpointing_kwargs` go to
        `torch.utils.checkpoint.checkpoint` (default `use_reentrant=False`), `every_n_layers`
        checkpoints layers 0, n, 2n, ... only, and `offload` keeps what the checkpoints save in host
        memory. The embeddings' output is made to require gradients (`enable_input_require_grads`),
        so that gradients pass frozen embeddings (adapters) into checkpointed layers."""
        if activation_checkpointing_kwargs is not None and not isinstance(activation_checkpointing_kwargs, Mapping):
            raise TypeError("activation_checkpointing_kwargs must be a dict of torch.utils.checkpoint.checkpoint "
                            f"arguments, got {type(activation_checkpointing_kwargs).__name__}")
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive integer, got {every_n_layers!r}")
        kwargs = {} if activation_checkpointing_kwargs is None else {"kwargs": dict(activation_checkpointing_kwargs)}
        spec = Checkpointing(every_n_layers=every_n_layers, offload=bool(offload), **kwargs)
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = spec
        self.enable_input_require_grads()

    def activation_checkpointing_disable(self) -> None:
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = False
        if self._hf_peft_config_loaded:  # as Transformers: what enable set up for adapters goes
            self.disable_input_require_grads()

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    # Transformers' older names for the same
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    # an attribute Transformers' models carry: the config's until set (a plain attribute there,
    # which nothing reads back), and a resize sets it to the new size
    @property
    def vocab_size(self) -> int:
        return self.__dict__.get("_vocab_size", self.config.vocab_size)

    @vocab_size.setter
    def vocab_size(self, value: int) -> None:
        self.__dict__["_vocab_size"] = value

    # ---- embeddings resizing ---------------------------------------------------------------
    @torch.no_grad()
    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Grow or shrink the vocabulary in place, as Transformers does: the embeddings and head keep
        their modules and parameters (hooks, `requires_grad`, a subclass), whose tensors are replaced;
        new rows are drawn about the mean of the old ones (`mean_resizing`) or from normal(0,
        initializer_range), with Transformers' draws (a seeded resize gives its numbers). A tensor of
        the size asked is left as it is; a head tied to the embeddings stays tied."""
        embeddings = self.get_input_embeddings()
        if new_num_tokens is None and pad_to_multiple_of is None:
            return embeddings
        n = new_num_tokens if new_num_tokens is not None else embeddings.weight.shape[0]
        if pad_to_multiple_of is not None:
            step = pad_to_multiple_of
            if isinstance(step, bool) or not (isinstance(step, int) and step > 0):
                raise ValueError(f"pad_to_multiple_of must be a positive integer, got {step!r}")
            n = math.ceil(n / step) * step
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"new_num_tokens must be a non-negative integer, got {new_num_tokens!r}")
        std = self.config.initializer_range
        head = self.get_output_embeddings()
        tied = head is not None and head.weight is embeddings.weight
        old = embeddings.weight.detach()
        if old.shape[0] != n:
            embeddings.weight.data = _resized_embeddings(old, n, mean_resizing, std)
            embeddings.num_embeddings = n
            if embeddings.padding_idx is not None and embeddings.padding_idx >= n:
                embeddings.padding_idx = None
        if tied:  # the embeddings' weight: the bias as tie_weights fits it (new rows zero)
            _fit_head(head)
        elif head is not None:
            if head.weight.shape[0] != n:
                bias = head.bias.detach() if head.bias is not None else None
                head.weight.data, bias = _resized_head(head.weight.detach(), bias, n, mean_resizing, std)
                if bias is not None:
                    head.bias.data = bias
            head.out_features = n
        self.config.vocab_size = self.vocab_size = n
        self.tie_weights()
        return embeddings

    # ---- loading and saving ----------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None,
        *,
        config: MoeConfig | str | os.PathLike | None = None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        dtype: Any = None,
        torch_dtype: Any = None,
        device: Any = None,
        device_map: Any = None,
        max_memory: Mapping | None = None,
        attn_implementation: str | Mapping[str, str] | None = None,
        variant: str | None = None,
        output_loading_info: bool = False,
        ignore_mismatched_sizes: bool = False,
        generation_config: GenerationConfig | None = None,
        adapter_name: str | None = None,
        adapter_kwargs: dict[str, Any] | None = None,
        **config_overrides: Any,
    ) -> PreTrainedModel:
        """Load a checkpoint directory (config.json + safetensors) into `dtype` on `device`, or
        with `device_map` (and `max_memory`) over several devices (see `moetorch.placement`). A
        name that is not a directory is an embedded model's or a Hub repository's, fetched into the
        Hugging Face cache with `revision`, `cache_dir`, `token`, `local_files_only` and
        `force_download` as in Transformers (`moetorch.hub`).

        `dtype="auto"` (the default) uses the checkpoint's dtype. Weights are memory-mapped and
        copied straight into the allocated parameters: no random init happens first. With
        `trust_remote_code=True`, a `custom_generate/generate.py` in the directory becomes the
        model's `generate`, as in Transformers. As there: `variant` reads `model.{variant}.safetensors`
        (or its shards), `output_loading_info=True` returns `(model, info)`, `ignore_mismatched_sizes`
        newly initialises tensors of another shape (a classifier of another label count), and
        `generation_config` replaces the checkpoint's. `config` is a config, or where to read one (a
        directory, its config.json, a Hub name) instead of the checkpoint's. Other keywords set
        attributes of the config; one that is neither a loading option nor a config attribute is a
        TypeError, as in Transformers.

        A directory that holds a PEFT adapter (adapter_config.json) loads it after the model, as
        `load_adapter(path, adapter_name, **adapter_kwargs)` would; with no config.json there, the
        model is the base model that the adapter's config names (`base_model_name_or_path`).

        `state_dict` (a mapping of tensor names, as a checkpoint or a model's `state_dict()` names
        them, to tensors) gives the weights instead of the directory's files, as in Transformers;
        `from_pretrained(None, config=config, state_dict=sd)` then needs no directory at all.
        """
        hub = hub_options(config_overrides)
        trust_remote_code = bool(config_overrides.get("trust_remote_code"))
        from_auto = bool(config_overrides.get("_from_auto"))
        use_safetensors = config_overrides.pop("use_safetensors", None)  # (None: safetensors, else .bin)
        key_mapping = config_overrides.pop("key_mapping", None)
        checkpoint.key_renamer(key_mapping)  # (a bad mapping: an error before anything loads)
        check_experts_implementation(config_overrides.pop("experts_implementation", None),
                                     "from_pretrained: experts_implementation")  # taken, changing nothing
        for key in _LOADER_ONLY_KWARGS & config_overrides.keys():
            config_overrides.pop(key)  # remote-code and memory options: nothing to do here
        for key in _LOADER_UNSUPPORTED.keys() & config_overrides.keys():
            value = config_overrides.pop(key)
            if value not in (_LOADER_UNSUPPORTED[key], {}):
                raise ValueError(f"from_pretrained: `{key}` is a Transformers loading option that moetorch does not "
                                 f"support (got {value!r})")
        if generation_config is not None:
            generation_config = as_generation_config(generation_config, "from_pretrained: generation_config")
        generation_overrides = {k: v for k, v in config_overrides.items() if k in GENERATION_FIELDS}
        if state_dict is not None:
            state_dict = checkpoint.check_state_dict(state_dict)
        path = adapter = None
        if pretrained_model_name_or_path is None:  # the weights from `state_dict`, the config from `config`
            if state_dict is None or config is None:
                raise ValueError(f"{cls.__name__}.from_pretrained(None, ...) needs both `config` and `state_dict` "
                                 f"(got {'no config' if config is None else 'no state_dict'})")
        else:
            # a Hub name is fetched (moetorch.hub)
            path = checkpoint_path(pretrained_model_name_or_path, use_safetensors=use_safetensors, **hub)
            adapter = adapter_dir(path)
            base = adapter_only_base(path, None, hub)
            if base is not None:  # the model is the adapter's base, as in Transformers
                pretrained_model_name_or_path, path = base
        config = as_moetorch_config(config)  # (Transformers' own PhimoeConfig: its values)
        if config is None or isinstance(config, (str, os.PathLike)):
            source, where = (path, {}) if config is None else (config, hub)  # where: a Hub name's options
            config, unused = cls.config_class.from_pretrained(source, return_unused_kwargs=True, **where,
                                                              **config_overrides)
        elif not isinstance(config, cls.config_class):
            raise TypeError(f"{cls.__name__}.from_pretrained: config must be a {cls.config_class.__name__} or the "
                            f"path of a config.json (or its directory), got {type(config).__name__}")
        else:  # a copy, as in Transformers: the model's settings (dtype, attention) never reach the caller's
            unused = {k: v for k, v in config_overrides.items() if not hasattr(config, k)}
            config = config.copy()
            config.update({k: v for k, v in config_overrides.items() if k not in unused})
        if unused:
            raise TypeError(f"{cls.__name__}.from_pretrained() got unexpected keyword arguments {sorted(unused)}: "
                            f"neither loading options nor attributes of {cls.config_class.__name__}")
        if attn_implementation is not None:  # (a dict by sub-config, "flex_attention": what moetorch runs for it)
            config.attn_implementation = check_attn_implementation(attn_implementation)
        asked = dtype if dtype is not None else torch_dtype
        if asked in (None, "auto") and config.dtype is None:  # "auto" with no dtype in config.json: the weights'
            asked = checkpoint.stored_dtype(path, variant, state_dict, use_safetensors) or "auto"
        target_dtype = resolve_dtype(asked, config)
        model = meta_model(cls, config, target_dtype)
        planned = place(model, device, device_map, max_memory)
        source = path if path is not None else "state_dict"  # (for messages)
        materialize(model, planned, source)
        info = checkpoint.load_into(model, path, config, cls.base_model_prefix, variant, ignore_mismatched_sizes,
                                    state_dict, use_safetensors, key_mapping)
        left_out = info["missing_keys"] | {name for name, _, _ in info["mismatched_keys"]}
        if model.config.tie_word_embeddings:  # a tied head of another shape: the embeddings' loaded parameter
            left_out.discard("lm_head.weight")
        model._init_left_out(left_out)
        for m in model.modules():  # loaded or initialised: a later post_init leaves them (init_weights)
            setattr(m, _INITIALISED, True)
        if hasattr(model, "generate") and generation_config is not None:
            model.generation_config = generation_config
        elif hasattr(model, "generate") and path is not None:
            model.generation_config = checkpoint_generation_config(path, {} if from_auto else generation_overrides,
                                                                   model.generation_config)
        model.config.dtype = target_dtype
        if pretrained_model_name_or_path is not None:
            model.name_or_path = model.config.name_or_path = os.fspath(pretrained_model_name_or_path)  # as given
        if device_map is not None:
            model.hf_device_map = placement.hf_device_map(planned)
        if trust_remote_code and hasattr(model, "generate") and path is not None:
            install_checkpoint_generate(model, path)
        if adapter is not None:
            info = model.load_adapter(adapter, adapter_name=adapter_name, adapter_kwargs=adapter_kwargs)
        return (model.eval(), info) if output_loading_info else model.eval()

    @classmethod
    def _from_config(cls, config: MoeConfig, **kwargs: Any) -> PreTrainedModel:
        """A new, randomly initialised model of `config`, as Transformers' `_from_config`: built in
        `dtype` (or `torch_dtype`; default: the config's, else torch's default), which the config then
        records, with `attn_implementation` set on the config. Another keyword is a TypeError."""
        if not isinstance(config, cls.config_class):
            raise TypeError(f"{cls.__name__}._from_config: config must be a {cls.config_class.__name__}, got "
                            f"{type(config).__name__}")
        dtype = kwargs.pop("dtype", config.dtype)
        torch_dtype = kwargs.pop("torch_dtype", None)
        if torch_dtype is not None and dtype == config.dtype:  # both given: dtype wins, as in Transformers
            dtype = torch_dtype
        if "attn_implementation" in kwargs:
            config.attn_implementation = check_attn_implementation(kwargs.pop("attn_implementation"))
        check_experts_implementation(kwargs.pop("experts_implementation", None),
                                     "_from_config: experts_implementation")  # taken, changing nothing
        if kwargs:
            raise TypeError(f"{cls.__name__}._from_config() got unexpected keyword arguments {sorted(kwargs)}")
        dtype = None if dtype is None else resolve_dtype(dtype, config)
        config.dtype = dtype
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype or previous)
        try:
            return cls(config)
        finally:
            torch.set_default_dtype(previous)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        push_to_hub: bool = False,
        max_shard_size: int | str = "50GB",
        variant: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Write config.json and (sharded) safetensors that Transformers and moetorch both load.

        As in Transformers: `is_main_process=False` writes nothing but the directory (call it on
        every process of a distributed run), `save_original_format=False` writes the model's own
        tensor names (PhiMoE's experts fused) instead of the checkpoint's original ones, `state_dict`
        (in the model's names) is written instead of the model's own tensors, and `variant` names
        the files `model.{variant}.safetensors`. `push_to_hub=True`
        then uploads the directory to `repo_id` (default: the directory's name; with `token`,
        `private`, `commit_message`, `commit_description`, `create_pr`, `revision`)."""
        if kwargs.get("safe_serialization", True) is False:  # as Transformers 5, which dropped .bin saving
            logger.warning("save_pretrained: safe_serialization=False is ignored; the weights are written as "
                           "safetensors (as Transformers 5 writes them)")
        push = {k: kwargs.pop(k) for k in PUSH_OPTIONS if k in kwargs}
        unknown = sorted(kwargs.keys() - _SAVE_OPTIONS)
        if unknown:
            raise TypeError(f"save_pretrained() got unknown keyword arguments {unknown}")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_pretrained expects a directory, but {save_directory} is a file")
        os.makedirs(save_directory, exist_ok=True)  # (by every process, as Transformers makes it)
        if not is_main_process:
            return
        if self._hf_peft_config_loaded:  # the adapter alone, as Transformers saves a model with adapters
            self.save_adapter(save_directory, state_dict, save_peft_format=kwargs.get("save_peft_format", True))
        else:
            self.config.dtype = self.dtype
            self.config.architectures = [type(self).__name__]
            checkpoint.save_into(self, save_directory, self.config, max_shard_size, state_dict, variant,
                                 original_format=kwargs.get("save_original_format", True) is not False)
            self.config.save_pretrained(save_directory)
        gen = getattr(self, "generation_config", None)
        if gen is not None and hasattr(gen, "save_pretrained"):
            gen.save_pretrained(save_directory)
        if push_to_hub:
            repo_id = push.pop("repo_id", None) or os.path.basename(os.path.normpath(save_directory))
            upload(save_directory, repo_id, what=type(self).__name__, **push)


# Flash-attention's keywords for packed sequences (Transformers' FlashAttentionKwargs), which trainers
# such as TRL's pass with packed batches: moetorch reads the packing from `position_ids` instead.
PACKING_KWARGS = {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"}


# Transformers' forwards take `output_router_probs` (its MoE outputs' docs name it, with the config's
# `add_router_probs` / `output_router_probs`) and do nothing with it: router logits come back for
# `output_router_logits` alone. moetorch takes it the same way, and says so once a model class.
IGNORED_KWARGS = {"output_router_probs"}


def check_packing_kwargs(owner: str, kwargs: Mapping[str, Any]) -> None:
    """A forward's extra keywords: flash-attention's packing ones and IGNORED_KWARGS are taken; any
    other is ignored, as Transformers' forwards ignore what their **kwargs do not read (a batch's
    `token_type_ids`, ...), with one warning that names it (a class, a keyword), so that a misspelt
    argument does not pass unseen."""
    taken = PACKING_KWARGS | IGNORED_KWARGS
    unknown = sorted(k for k in kwargs.keys() - taken if ("forward", owner, k) not in WARNED_ONCE)
    if unknown:
        WARNED_ONCE.update(("forward", owner, k) for k in unknown)
        logger.warning("%s.forward() ignores the keyword arguments %s, which it does not take (as Transformers "
                       "ignores them)", owner, unknown)
    if kwargs.get("output_router_probs"):
        warn_once(("output_router_probs", owner), "%s.forward(): output_router_probs does nothing, as in "
                  "Transformers; pass output_router_logits=True for the router logits", owner)


def packed_segments(position_ids: torch.Tensor | None, attention_mask, cache: Cache | None, batch: int):
    """The sequence each token belongs to [B, T] when `position_ids` pack several sequences in a row
    (their positions start again at 0) with no attention mask and no cache, as Transformers reads a
    packed batch: a new sequence wherever a position does not follow its left neighbour. Else None."""
    if position_ids is None or attention_mask is not None or cache is not None:
        return None
    pos_BT = (position_ids if position_ids.dim() == 2 else position_ids[None]).expand(batch, -1)
    return (torch.diff(pos_BT, prepend=pos_BT[:, :1] - 1, dim=-1) != 1).cumsum(-1)


# Packed sequences without a cache (training, scoring) attend through the varlen flash kernel, with
# no [T, T] mask: None where that kernel serves (a GPU of sm80 or later, bf16 or fp16, sdpa's flash
# kernel on), True always (elsewhere each sequence through sdpa, as the tests run it), False never
# (a dense block-diagonal mask).
PACKED_VARLEN: bool | None = None


def _varlen_serves(model, switch: bool | None, output_attentions: bool, embeds_BTD: torch.Tensor) -> bool:
    """Whether a forward may take the varlen path (`switch`: a module's True / False / None): no
    attention weights asked for, not the eager implementation, the layers on one device, and (None)
    the varlen kernel here for the forward's dtype (autocast's where it is on)."""
    cfg = model.config
    if switch is False or output_attentions or getattr(model, "spread_over_devices", False) or \
            cfg._attn_implementation == "eager":
        return False
    if switch is None:
        device = embeds_BTD.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else embeds_BTD.dtype
        return varlen_kernel_serves(device, dtype, _kv_shape(cfg)[1])
    return True


def varlen_packing(model, segments_BT: torch.Tensor | None, window: int | None, output_attentions: bool,
                   embeds_BTD: torch.Tensor) -> Packed | None:
    """The packed sequences of `segments_BT` (`packed_segments`) as one `Packed` over the B x T
    tokens in order, for the attention's varlen path; None where the dense mask serves: attention
    weights asked for, the eager implementation, layers over several devices, or (PACKED_VARLEN
    None) no varlen kernel here. Reads the sequences' lengths to the host (one sync)."""
    if segments_BT is None or not _varlen_serves(model, PACKED_VARLEN, output_attentions, embeds_BTD):
        return None
    device = embeds_BTD.device
    B, T = segments_BT.shape
    starts = torch.diff(segments_BT, dim=-1, prepend=segments_BT[:, :1] - 1).flatten().nonzero().flatten()
    lens = torch.diff(starts, append=starts.new_tensor([B * T])).tolist()
    return Packed.of(lens, lens, device, window=window)


# A padded batch without a cache (a 2D attention mask whose rows each hold one run of real tokens:
# left or right padding) runs unpadded: its real tokens packed in one row, every layer computing
# those alone, each row one sequence of the varlen path; the outputs go back to [B, T] with zeros
# at the padding. None: where the varlen kernel serves and the loss reads no padding position's
# logits; True: also off the GPU (the tests); False: never.
UNPAD_ROWS: bool | None = None


def unpadded_rows(model, attention_mask: torch.Tensor | None, cache: Cache | None, window: int | None,
                  output_attentions: bool, embeds_BTD: torch.Tensor,
                  loss_positions_BT: torch.Tensor | None) -> tuple[torch.Tensor, Packed] | None:
    """(flat indices [N] of the real tokens in the B x T grid, their rows as one `Packed`) where
    a padded batch may run unpadded (UNPAD_ROWS); None where it runs as given: a cache (the caller
    passes none for the cache its forward built, `UnpaddedCacheWrites`), no 2D mask, one longer
    than the tokens or no padding in it, a row whose real tokens are not one run, a position the
    loss reads (`loss_positions_BT`) at the padding, or what keeps the varlen path off
    (`_varlen_serves`).
    Reads the mask to the host (one sync)."""
    if cache is not None or attention_mask is None or attention_mask.dim() != 2 or \
            not _varlen_serves(model, UNPAD_ROWS, output_attentions, embeds_BTD) or \
            attention_mask.shape[1] != embeds_BTD.shape[1]:
        return None
    grids = [attention_mask.bool()]
    if loss_positions_BT is not None:
        grids.append(loss_positions_BT.to(attention_mask.device).bool())
    host = torch.stack(grids).cpu()
    real = host[0]
    if bool(real.all()) or (loss_positions_BT is not None and bool((host[1] & ~real).any())):
        return None
    runs = token_runs(real)
    if runs is None:
        return None
    # each row's real tokens are one run, so the grid's real positions in order are those runs, row by row
    index = real.flatten().nonzero().flatten()
    length = runs[1][runs[1] > 0].tolist()
    return index.to(embeds_BTD.device), Packed.of(length, length, embeds_BTD.device, window=window)


def _scatter_rows(x_1N: torch.Tensor, index_N: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """[1, N, ...] values of the real tokens back to [B, T, ...], zeros at the padding."""
    flat = x_1N.new_zeros(B * T, *x_1N.shape[2:]).index_copy(0, index_N, x_1N[0])
    return flat.view(B, T, *x_1N.shape[2:])


class UnpaddedCacheWrites(Cache):
    """The cache the layers see where a padded batch runs unpadded with the dynamic cache that its
    forward built (Transformers' default `use_cache=True`, as in a Trainer's step): each layer's
    keys and values of the real tokens (one row of N) go into `cache` on the padded [B, T] grid,
    zeros at the padding, and the attention reads the real tokens' own."""

    def __init__(self, cache: Cache, index_N: torch.Tensor, batch: int, length: int) -> None:
        super().__init__()
        self.cache, self.index_N, self.batch, self.length = cache, index_N, batch, length

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        grid = (_scatter_rows(t.transpose(1, 2), self.index_N, self.batch, self.length).transpose(1, 2)
                for t in (key_states, value_states))
        self.cache.update(*grid, layer_idx, cache_kwargs)
        return key_states, value_states


def _writes_unpadded(past_key_values, cache: Cache | None) -> bool:
    """Whether a padded batch may run unpadded with this cache: the dynamic one that the forward
    built (no `past_key_values` given), which then holds zeros at the padding's slots
    (`UnpaddedCacheWrites`). A cache passed in (generate passes its own) keeps the batch padded."""
    return past_key_values is None and type(cache) is DynamicCache and len(cache) == 0 and cache.packed is None


# Resizing draws what Transformers' resize draws, in its order, so that a seeded resize gives its
# numbers: a new module of the new size (its own init's draws), then the added rows (drawn, or about
# the old rows' mean), then the old rows copied over its first rows.
def _resized_embeddings(old: torch.Tensor, n: int, mean_resizing: bool, std: float) -> torch.Tensor:
    """The input embeddings' [V, D] weight with `n` rows."""
    new = nn.Embedding(n, old.shape[1], device=old.device, dtype=old.dtype).weight.detach()
    if n > old.shape[0]:
        if mean_resizing:
            _about_the_mean(new, old)
        else:
            new.normal_(0.0, std)
    k = min(old.shape[0], n)
    new[:k] = old[:k]
    return new


def _resized_head(old: torch.Tensor, bias: torch.Tensor | None, n: int, mean_resizing: bool,
                  std: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's [V, D] weight and [V] bias (None: none) with `n` rows."""
    fresh = nn.Linear(old.shape[1], n, bias=bias is not None, device=old.device, dtype=old.dtype)
    new, new_bias = fresh.weight.detach(), (fresh.bias.detach() if bias is not None else None)
    added = n - old.shape[0]
    if added > 0 and not mean_resizing:
        new.normal_(0.0, std)
        if bias is not None:
            new_bias.zero_()
    elif added > 0:
        _about_the_mean(new, old)
        if bias is not None:  # (the mean and spread of the old bias, as Transformers reads them)
            new_bias[-added:].normal_(mean=float(bias.float().mean()), std=1e-9 * float(bias.std().float()))
    k = min(old.shape[0], n)
    new[:k] = old[:k]
    if bias is not None:
        new_bias[:k] = bias[:k]
    return new, new_bias


def _about_the_mean(new: torch.Tensor, old: torch.Tensor) -> None:
    """`new`'s rows past `old`'s drawn from a normal of the old rows' mean and 1e-9 times their
    covariance (Hewitt, "Initializing new word embeddings"), or set to the mean where that
    covariance is not positive definite (fewer rows than columns)."""
    added, rows = new.shape[0] - old.shape[0], old.float()
    mean = rows.mean(0)
    centered = rows - mean
    covariance = 1e-9 * (centered.T @ centered / old.shape[0])
    if torch.distributions.constraints.positive_definite.check(covariance).all():
        normal = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance)
        new[-added:] = normal.sample((added,)).to(new.dtype)
    else:
        new[-added:] = mean.expand(added, -1).to(new.dtype)


def _fit_head(head: nn.Module) -> None:
    """A head's bias padded with zeros (or cut) to its weight's rows and `out_features` set, as
    Transformers' `_adjust_bias` does after tying the weight to embeddings of another size."""
    rows = head.weight.shape[0]
    if getattr(head, "bias", None) is not None and head.bias.shape[0] != rows:
        head.bias.data = nn.functional.pad(head.bias.data, (0, rows - head.bias.shape[0]))
    if hasattr(head, "out_features"):
        head.out_features = rows


# ---- shared forward plumbing ----------------------------------------------------------------


@dataclass(frozen=True)
class Checkpointing:
    """How the decoder layers keep their activations in training (`activation_checkpointing_enable`).
    A model's `gradient_checkpointing` holds one (or True: the defaults) while it is on."""

    kwargs: dict = field(default_factory=lambda: {"use_reentrant": False})
    every_n_layers: int = 1
    offload: bool = False

    def __call__(self, index: int, layer: nn.Module, r: Residual, *args):
        """`layer(r, *args)`, checkpointed where `index` is a multiple of `every_n_layers`. The
        checkpoint sees the residual's tensors and the layer's outputs one by one, so that a
        reentrant checkpoint (which follows tensor arguments only) passes their gradients too."""
        if index % self.every_n_layers:
            return layer(r, *args)

        bias = []  # the output's bias: a parameter, not computed, so it stays out of the checkpoint

        def flat(x, delta, in_bias, *rest):
            with training_paths():  # the forward (no_grad when reentrant) and its recompute alike
                out, weights, logits = layer(Residual(x, delta, in_bias), *rest)
            bias[:] = [out.bias]
            return (out.x, out.delta, weights, *logits)

        saved = (torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if self.offload
                 else contextlib.nullcontext())
        with saved:
            x, delta, weights, *logits = torch.utils.checkpoint.checkpoint(flat, *r, *args, **self.kwargs)
        return Residual(x, delta, bias[0]), weights, tuple(logits)


@dataclass
class DecoderInputs:
    """What every decoder needs before its first layer, derived from the HF-style arguments."""

    embeds_BTD: torch.Tensor
    cache: Cache | None
    cache_position_T: torch.Tensor
    position_ids_BT: torch.Tensor
    past_len: int
    kv_len: int


def prepare_decoder_inputs(
    embed: nn.Embedding,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    past_key_values: Cache | None,
    use_cache: bool,
    cache_position: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
) -> DecoderInputs:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if past_key_values is not None and not isinstance(past_key_values, Cache):
        if isinstance(past_key_values, (tuple, list)):
            past_key_values = DynamicCache.from_legacy_cache(tuple(past_key_values))
        else:
            kind = type(past_key_values)
            raise TypeError(f"past_key_values must be a moetorch Cache (moetorch.DynamicCache or StaticCache), got "
                            f"{kind.__module__}.{kind.__name__}{_carry_over_hint(past_key_values)}")
    if use_cache and past_key_values is None:
        past_key_values = DynamicCache()
    if inputs_embeds is None:
        _check_ids(input_ids)
        inputs_embeds = _embed(embed, input_ids)
    else:
        inputs_embeds = _checked_embeds(inputs_embeds, embed)
    B, T = inputs_embeds.shape[:2]
    if B == 0:
        raise ValueError("the input batch is empty (batch size 0)")
    if T == 0:
        raise ValueError("input sequence is empty (sequence length 0)")
    if type(past_key_values) is DynamicCache and past_key_values.batch_size not in (-1, B):
        raise ValueError(f"past_key_values holds {past_key_values.batch_size} rows, but the input has {B}: a cache "
                         "serves the batch it was filled with (pass a new DynamicCache for another batch)")
    past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
    _check_positions(B, T, past_len, cache_position, position_ids, attention_mask, past_key_values is not None)
    if cache_position is None:
        cache_position = torch.arange(past_len, past_len + T, device=inputs_embeds.device)
    if position_ids is None:
        position_ids = cache_position.unsqueeze(0)
    elif position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    kv_len = past_key_values.kv_length(T) if past_key_values is not None else T
    return DecoderInputs(inputs_embeds, past_key_values, cache_position, position_ids, past_len, kv_len)


def _check_ids(input_ids) -> None:
    """input_ids must be an integer tensor [batch, seq] (its type and shape: nothing is read)."""
    if not isinstance(input_ids, torch.Tensor):
        hint = " (a tokenizer's output needs return_tensors=\"pt\")" if isinstance(input_ids, (list, tuple)) else ""
        raise TypeError(f"input_ids must be an integer tensor [batch, seq], got {type(input_ids).__name__}{hint}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor [batch, seq], got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, seq], got {tuple(input_ids.shape)}")


def _embed(embed: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The embeddings of `input_ids`; on the CPU, ids outside the vocabulary are a ValueError that
    names them (found from the lookup's own error: no read of the ids before it; on a GPU the lookup
    asserts on the device, as in Transformers)."""
    vocab = getattr(embed, "num_embeddings", None)
    if vocab is None or input_ids.device.type != "cpu" or torch.compiler.is_compiling():
        return embed(input_ids)
    try:
        return embed(input_ids)
    except IndexError as e:
        raise outside_vocabulary("input_ids", input_ids, vocab) from e


def _checked_embeds(inputs_embeds, embed: nn.Module) -> torch.Tensor:
    """inputs_embeds as a float tensor [batch, seq, hidden_size], in the embeddings' dtype (as generate
    takes them; under autocast as given)."""
    if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
        kind = inputs_embeds.dtype if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds).__name__
        raise TypeError(f"inputs_embeds must be a float tensor [batch, seq, hidden], got {kind}")
    width = getattr(embed, "embedding_dim", None)
    if inputs_embeds.dim() != 3 or (width is not None and inputs_embeds.shape[-1] != width):
        raise ValueError(f"inputs_embeds must have shape [batch, seq, hidden_size] = [batch, seq, {width}], got "
                         f"{tuple(inputs_embeds.shape)}")
    weight = getattr(embed, "weight", None)
    if (isinstance(weight, torch.Tensor) and weight.is_floating_point() and inputs_embeds.dtype != weight.dtype
            and not torch.is_autocast_enabled(inputs_embeds.device.type)):
        inputs_embeds = inputs_embeds.to(weight.dtype)
    return inputs_embeds


def _outside_slots(cache: Cache | None, cache_position: torch.Tensor) -> ValueError | None:
    """After a forward failed: the error to raise instead when `cache_position` (on the host) lies
    outside a static cache's slots, which the cache's write then failed on. (Read only on failure:
    a forward reads no positions back; on a GPU such a write is a device-side assert.)"""
    if not isinstance(cache, StaticCache) or cache_position.device.type != "cpu" or not cache_position.numel():
        return None
    low, high, slots = int(cache_position.min()), int(cache_position.max()), cache.max_cache_len
    if low >= 0 and high < slots:
        return None
    return ValueError(f"cache_position runs from {low} to {high}, outside the static cache's {slots} slots "
                      f"(0 to {slots - 1}): make the cache with a larger max_cache_len")


def _check_positions(B: int, T: int, past: int, cache_position, position_ids, attention_mask,
                     cached: bool = True) -> None:
    """Errors that name the argument whose shape does not fit B rows of T new tokens after `past`
    cached ones (shapes only: nothing is read from the device). A 2D mask may be wider with a cache
    (`cached`: a static cache's covers its slots); without one it is as wide as the tokens."""
    if cache_position is not None and tuple(cache_position.shape) != (T,):
        raise ValueError(f"cache_position must have shape [seq] = [{T}], got {tuple(cache_position.shape)}")
    if position_ids is not None and (position_ids.dim() not in (1, 2) or position_ids.shape[-1] != T
                                     or position_ids.dim() == 2 and position_ids.shape[0] not in (1, B)):
        raise ValueError(f"position_ids must have shape [batch, seq] = [{B}, {T}], got {tuple(position_ids.shape)}")
    if attention_mask is not None and attention_mask.dim() == 2 and (
            attention_mask.shape[0] != B or attention_mask.shape[1] < past + T):
        raise ValueError(f"attention_mask must have shape [batch, past + seq] = [{B}, {past + T}] (the {past} "
                         f"cached tokens and the {T} new ones), got {tuple(attention_mask.shape)}")
    if not cached and attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] != T:
        raise ValueError(f"attention_mask must have shape [batch, seq] = [{B}, {T}] for a forward without a cache, "
                         f"got {tuple(attention_mask.shape)}")


def keep_last(hidden_BTD: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """Slice positions whose logits are wanted, as Transformers does: the last N (0 = all), the
    positions of a 1D tensor for every row, those of an integer [B, n] tensor per row, or the True
    positions of a boolean [B, T] mask (flattened: [count, D])."""
    if isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool):
        return hidden_BTD if logits_to_keep == 0 else hidden_BTD[:, -logits_to_keep:]
    if not isinstance(logits_to_keep, torch.Tensor) or logits_to_keep.is_floating_point():
        kind = logits_to_keep.dtype if isinstance(logits_to_keep, torch.Tensor) else type(logits_to_keep).__name__
        raise TypeError(f"logits_to_keep must be an int (the last N positions, 0: all), an integer tensor of positions "
                        f"or a boolean mask, got {kind}")
    if logits_to_keep.dim() == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden_BTD[logits_to_keep.to(hidden_BTD.device)]
        return torch.take_along_dim(hidden_BTD, logits_to_keep.to(hidden_BTD.device)[..., None], dim=1)
    return hidden_BTD[:, logits_to_keep]


def run_layers(
    layers: nn.ModuleList,
    x_BTD: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
    is_causal: bool,
    cache: Cache | None,
    cache_position_T: torch.Tensor,
    norm: nn.Module,
    output_attentions: bool,
    output_hidden_states: bool,
    checkpointing: Checkpointing | None,
    spread: bool = False,
) -> tuple[torch.Tensor, tuple | None, tuple | None, tuple]:
    """The decoder stack. Each layer maps (Residual, ...) -> (Residual, attention weights, router
    logits tuple): its output's last add is left pending (`ops.norms.Residual`) for the next
    layer's first norm, or the final norm, to run in its kernel. `spread`: the layers may sit on
    several devices (`from_pretrained(device_map=...)`), and each layer's inputs go to its device.

    Returns the normed output and, as Transformers does, hidden states (embeddings, each layer's
    output, the last one after the final norm), attentions and all router logits.
    """
    if spread:
        with contextlib.ExitStack() as on_device:
            return _run_stack(layers, x_BTD, rope, mask, is_causal, cache, cache_position_T, norm,
                              output_attentions, output_hidden_states, checkpointing, on_device)
    return _run_stack(layers, x_BTD, rope, mask, is_causal, cache, cache_position_T, norm,
                      output_attentions, output_hidden_states, checkpointing, None)


def _run_stack(layers, x_BTD, rope, mask, is_causal, cache, cache_position_T, norm, output_attentions,
               output_hidden_states, checkpointing, on_device):
    hidden, attns, routers = [], [], []
    r = Residual(x_BTD)
    here = x_BTD.device
    # the experts of layers placed on the CPU cross the bus while the layers before them compute
    ahead = copies_ahead(layers, x_BTD)
    with ahead if ahead is not None else contextlib.nullcontext():
        for index, layer in enumerate(layers):
            if on_device is not None and (there := module_device(layer)) != here:
                # the layer's inputs go to its device, which becomes the current one
                r, rope, mask, cache_position_T = to_device((r, rope, mask, cache_position_T), there, on_device)
                here = there
            if ahead is not None:
                ahead.before_layer()
            if output_hidden_states:
                r = Residual(r.value())
                hidden.append(r.x)
            args = (r, rope, mask, is_causal, cache, cache_position_T, output_attentions)
            if checkpointing is not None:
                r, w, logits = checkpointing(index, layer, *args)
            else:
                r, w, logits = layer(*args)
            attns.append(w)
            routers.extend(logits)
    if on_device is not None and (there := module_device(norm)) != here:
        r = to_device(r, there, on_device)
    x_BTD = norm.add_norm(*r)[1]
    if output_hidden_states:
        hidden.append(x_BTD)
    return (
        x_BTD,
        tuple(hidden) if output_hidden_states else None,
        tuple(attns) if output_attentions else None,
        tuple(routers),
    )


def to_device(tensors: Any, device: torch.device, on_device: contextlib.ExitStack | None = None) -> Any:
    """`tensors` (nested tuples, NamedTuples and None) moved to `device`; with `on_device`, that CUDA
    device also becomes the current one until the stack closes (the Triton kernels launch there)."""
    if on_device is not None and device.type == "cuda":
        on_device.enter_context(torch.cuda.device(device))
    if isinstance(tensors, torch.Tensor):
        return tensors.to(device)
    if isinstance(tensors, tuple):
        moved = [to_device(t, device) for t in tensors]
        return type(tensors)(*moved) if hasattr(tensors, "_fields") else tuple(moved)
    return tensors


def rope_length(rotary, position_ids: torch.Tensor | None, cache: Cache | None, past_len: int) -> int | None:
    """LongRoPE's sequence length where the caller's positions decide it: positions given to a
    forward that starts a sequence (no cache, or an empty one: packed sequences, a window scored at
    an offset, a padded batch) read their largest value + 1, as Transformers does (one read to the
    host). None (the cached + new tokens decide, less the cache's `rope_pad`, which this first
    forward sets) without positions, for the steps after it (no host read on a decode step), for
    continuous batching's caches (their rows' factor sets or sequences' lengths), and inside a
    graph capture."""
    if not rotary.longrope or position_ids is None:
        return None
    if cache is not None and (cache.packed is not None or cache.rope_long_BT is not None or past_len > 0):
        return None
    if _capturing(position_ids):
        return None
    return int(position_ids.max()) + 1


def _capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the stream `t`'s work goes to."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def sync_rope_cache(rotary, inputs: DecoderInputs, seq_len: int | None = None,
                    attention_mask: torch.Tensor | None = None) -> tuple[DecoderInputs, bool, int]:
    """Choose LongRoPE's factor set for this step; rebuild the cache if it was computed with the other.

    Returns (inputs, long, prefix): when the cache is rebuilt, `inputs` is extended by the replayed
    `prefix` cached tokens and the caller drops their outputs. Decided from host integers: the
    cached and new tokens, the longest of packed sequences, or `seq_len` where the caller read it.
    A cache with `rope_long_BT` set gives the set per position instead (a tensor, nonzero: long).
    The rebuilt forward reads the prefix under the step's 2D `attention_mask` (its columns cover
    the cached tokens); a 4D mask, which holds the new tokens' rows alone, is an error there, raised
    before the cache is touched.
    """
    cache, T = inputs.cache, inputs.embeds_BTD.shape[1]
    if cache is not None and cache.rope_long_BT is not None and rotary.longrope:
        return inputs, cache.rope_long_BT, 0  # the caller's choice per position (continuous batching's rows)
    packed = cache.packed if cache is not None else None  # packed sequences: the longest decides
    if seq_len is None:
        pad = cache.rope_pad if cache is not None else 0  # slots past the largest position + 1
        seq_len = packed.rope_len if packed is not None else inputs.past_len + T - pad
    long = rotary.use_long(seq_len)
    prefix = 0
    if cache is not None and rotary.longrope:
        if cache.rope_long != long and inputs.past_len > 0:
            if attention_mask is not None and attention_mask.dim() == 4:
                raise ValueError(
                    f"attention_mask: this step takes the sequence to {seq_len} tokens, across LongRoPE's switch "
                    f"at original_max_position_embeddings={rotary.original_max}, so the {inputs.past_len} cached "
                    f"tokens are computed again under the other factors; a 4D mask holds the rows of the {T} new "
                    "tokens alone: pass the 2D mask (batch x all tokens) for this step, as generate does")
            prefix = inputs.past_len
            embeds, positions = cache.replay(prefix)
            cache.clear()
            B = inputs.embeds_BTD.shape[0]
            inputs = DecoderInputs(
                embeds_BTD=torch.cat([embeds.to(inputs.embeds_BTD.dtype), inputs.embeds_BTD], dim=1),
                cache=cache,
                cache_position_T=torch.arange(prefix + T, device=inputs.embeds_BTD.device),
                position_ids_BT=torch.cat([positions, inputs.position_ids_BT.expand(B, -1)], dim=1),
                past_len=0,
                kv_len=cache.kv_length(prefix + T),
            )
        cache.rope_long = long
        if cache.records_inputs:
            cache.record_inputs(inputs.embeds_BTD, inputs.position_ids_BT, inputs.cache_position_T,
                                rotary.original_max + max(cache.rope_pad, 0))
    return inputs, long, prefix


def drop_prefix(x, hidden, attns, routers, prefix: int, batch: int):
    """Keep only the outputs of the tokens after a replayed prefix of `prefix` tokens."""
    if prefix == 0:
        return x, hidden, attns, routers
    hidden = tuple(h[:, prefix:] for h in hidden) if hidden is not None else None
    attns = tuple(a[:, :, prefix:] for a in attns) if attns is not None else None
    routers = tuple(r.view(batch, -1, r.shape[-1])[:, prefix:].reshape(-1, r.shape[-1]) for r in routers)
    return x[:, prefix:], hidden, attns, routers


def decoder_forward(
    model: PreTrainedModel,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    past_key_values: Cache | None,
    inputs_embeds: torch.Tensor | None,
    use_cache: bool | None,
    output_attentions: bool | None,
    output_hidden_states: bool | None,
    output_router_logits: bool | None,
    cache_position: torch.Tensor | None,
    return_dict: bool | None,
    sliding_window: int | None = None,
    loss_positions_BT: torch.Tensor | None = None,
) -> MoeModelOutputWithPast | tuple:
    """The body of every decoder's `forward`: embed, RoPE, mask, layers, final norm, outputs.

    `model` holds `embed_tokens`, `rotary_emb`, `layers` (see `run_layers`) and `norm`; the output
    flags left None take the config's values. `loss_positions_BT`: the positions whose outputs a
    loss reads (a padded batch runs unpadded only where none is padding; `unpadded_rows`).
    """
    cfg = model.config
    output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
    output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
    output_router_logits = cfg.output_router_logits if output_router_logits is None else output_router_logits
    checkpointing = model.gradient_checkpointing if model.training else None
    checkpointing = Checkpointing() if checkpointing is True else checkpointing or None
    given_cache = None
    if checkpointing and (past_key_values is not None or use_cache):
        # as Transformers' checkpointed layers: no cache (a layer recomputed in backward would write it twice)
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise ValueError("gradient checkpointing in training runs the layers without a cache: past_key_values "
                             f"holds {past_key_values.get_seq_length()} earlier tokens that they could not attend "
                             "to; pass no cache, or train without gradient checkpointing")
        warn_once("checkpointing-cache", "`use_cache=True` (or a `past_key_values`) is incompatible with gradient "
                  "checkpointing in training: the layers run without a cache (use_cache=False)")
        given_cache, past_key_values = past_key_values, None
    use_cache = (cfg.use_cache if use_cache is None else use_cache) and not checkpointing
    inp = prepare_decoder_inputs(
        model.embed_tokens, input_ids, inputs_embeds, past_key_values, use_cache, cache_position, position_ids,
        attention_mask,
    )
    B, T = inp.embeds_BTD.shape[:2]
    model.rotary_emb.update(inp.position_ids_BT)  # (a table that follows each forward's largest position)
    segments_BT = packed_segments(position_ids, attention_mask, inp.cache, B)
    seq_len = rope_length(model.rotary_emb, position_ids, inp.cache, inp.past_len)
    held = inp.cache.num_layers if inp.cache is not None and inp.cache.is_static else None
    if held is not None and held < len(model.layers):
        raise ValueError(f"past_key_values: the StaticCache holds {held} layers, and the model has "
                         f"{len(model.layers)} (make the cache from this model's config)")
    # what a failure from here on puts back (a batching engine's packed caches write rows whose
    # counts the engine keeps)
    before = inp.cache.snapshot() if isinstance(inp.cache, (DynamicCache, StaticCache)) else None
    prefix = 0
    try:
        if inp.cache is not None and inp.past_len == 0 and not _capturing(inp.embeds_BTD):
            inp.cache.rope_pad = 0 if seq_len is None else T - seq_len  # the later steps count from it on the host
        inp, long, prefix = sync_rope_cache(model.rotary_emb, inp, seq_len, attention_mask)
        writes = _writes_unpadded(past_key_values, inp.cache)
        unpad = unpadded_rows(model, attention_mask, None if writes else inp.cache, sliding_window, output_attentions,
                              inp.embeds_BTD, loss_positions_BT) if prefix == 0 else None
        embeds_BTD, positions_BT, layer_cache = inp.embeds_BTD, inp.position_ids_BT, inp.cache
        if unpad is not None:  # the real tokens alone, packed in one row
            index_N, _ = unpad
            embeds_BTD = embeds_BTD.reshape(B * T, -1)[index_N][None]
            positions_BT = positions_BT.expand(B, T).reshape(-1)[index_N][None]
            if isinstance(long, torch.Tensor):
                long = long.expand(B, T).reshape(-1)[index_N][None]
            if writes:
                layer_cache = UnpaddedCacheWrites(inp.cache, index_N, B, T)
        rope = model.rotary_emb(positions_BT, inp.embeds_BTD.dtype, long)
        if unpad is not None:
            mask, is_causal = unpad[1], True
        elif inp.cache is not None and inp.cache.packed is not None:  # sequences packed in one row
            mask, is_causal = inp.cache.packed, True
        elif (varlen := varlen_packing(model, segments_BT, sliding_window, output_attentions,
                                       inp.embeds_BTD)) is not None:
            mask, is_causal = varlen, True
        else:
            mask, is_causal = build_mask(
                attention_mask, inp.cache_position_T, inp.kv_len, sliding_window, B,
                queries_at_end=inp.cache is None or not inp.cache.is_static, segments_BT=segments_BT,
            )
        x, hidden, attns, routers = run_layers(
            model.layers, embeds_BTD, rope, mask, is_causal, layer_cache, inp.cache_position_T, model.norm,
            output_attentions, output_hidden_states, checkpointing, getattr(model, "spread_over_devices", False),
        )
    except BaseException as e:
        if before is not None:  # a failed forward (out of memory, an interrupt) adds no tokens
            inp.cache.restore(before, recomputing=prefix > 0)
        if isinstance(e, IndexError) and (named := _outside_slots(inp.cache, inp.cache_position_T)) is not None:
            raise named from e
        raise
    if unpad is not None:  # back to the padded grid
        x = _scatter_rows(x, index_N, B, T)
        hidden = tuple(_scatter_rows(h, index_N, B, T) for h in hidden) if hidden is not None else None
        routers = tuple(_scatter_rows(r[None], index_N, B, T).flatten(0, 1) for r in routers)
    x, hidden, attns, routers = drop_prefix(x, hidden, attns, routers, prefix, B)
    out = MoeModelOutputWithPast(
        last_hidden_state=x,
        # the cache passed in is returned (and filled) with use_cache=False too, as in Transformers
        past_key_values=inp.cache if given_cache is None else given_cache,
        router_logits=routers if output_router_logits else None,
    )
    # Transformers' base models record the hidden states and attentions after the router logits:
    # their keys, and so the tuple positions, come after them
    out.hidden_states, out.attentions = hidden, attns
    return out if (cfg.return_dict if return_dict is None else return_dict) else out.to_tuple()
