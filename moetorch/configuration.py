"""Model configurations: plain dataclasses that read and write Transformers' `config.json`.

`MoeConfig` holds what every architecture shares (I/O, labels, output flags, RoPE normalisation);
each architecture's config (e.g. `PhimoeConfig`) lists its own fields in the spec's order and
validates them in `__post_init__`, naming the field at fault.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import numbers
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .defaults import checkpoint_path
from .hub import CONFIG_PATTERNS, PUSH_OPTIONS, PushToHubMixin, hub_options, upload
from .ops.activations import ACTIVATIONS
from .ops.rope import PER_FORWARD_ROPE_TYPES, SCALED_ROPE_TYPES

CONFIG_NAME = "config.json"

logger = logging.getLogger("moetorch")

# Keys that Transformers writes for every model and that carry no meaning here.
_IGNORED_KEYS = {"transformers_version", "_name_or_path", "auto_map", "torch_dtype", "_commit_hash"}
# Transformers' shared fields that hold nothing here at these values (`to_dict` writes them so)
_SHARED_DEFAULTS = {"is_encoder_decoder": False, "chunk_size_feed_forward": 0}
# Generation settings a config.json may carry (Transformers' `GenerationConfig._get_default_generation_params`).
# As in Transformers, they are taken off the config when it is made: a checkpoint without a
# generation_config.json hands them to `model.generation_config` (`_generation_settings`), and
# neither config.json nor the config's attributes keep them.
GENERATION_KEYS = frozenset({
    "assistant_confidence_threshold", "assistant_lookbehind", "bad_words_ids", "begin_suppress_tokens",
    "diversity_penalty", "do_sample", "early_stopping", "encoder_no_repeat_ngram_size",
    "encoder_repetition_penalty", "epsilon_cutoff", "eta_cutoff", "exponential_decay_length_penalty",
    "forced_bos_token_id", "forced_eos_token_id", "length_penalty", "max_length", "min_length",
    "no_repeat_ngram_size", "num_assistant_tokens", "num_assistant_tokens_schedule", "num_beam_groups", "num_beams",
    "num_return_sequences", "output_scores", "remove_invalid_values", "repetition_penalty",
    "return_dict_in_generate", "suppress_tokens", "target_lookbehind", "temperature", "top_k", "top_p", "typical_p",
})
# Fields that describe the runtime, not the checkpoint: never written to config.json.
_RUNTIME_FIELDS = {"attn_implementation", "extra"}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"invalid config field `{field_name}`: {msg}")


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_positive(x: Any) -> bool:
    """A finite number above 0 (not inf: a factor or theta of inf gives nan logits)."""
    return _is_number(x) and math.isfinite(x) and x > 0


def as_torch_dtype(value: Any, what: str = "dtype") -> torch.dtype | None:
    """`value` as a torch.dtype, as Transformers keeps a config's `dtype` in memory: a torch.dtype,
    or its name ("bfloat16", "torch.float16"); None stays None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    found = getattr(torch, str(value).removeprefix("torch."), None) if isinstance(value, str) else None
    _check(isinstance(found, torch.dtype), what, f"must be a torch dtype or its name (e.g. 'bfloat16'), got {value!r}")
    return found


def _jsonable(value: Any) -> Any:
    """`value` with every torch.dtype in it (in dicts and lists too) as its name, as config.json holds it."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


_NUMBER_CHECKS = {"int": (_is_int, "an integer"), "float": (_is_number, "a number")}
_PLAIN_CHECKS = {"bool": (lambda x: isinstance(x, bool), "true or false (a bool)"),
                 "str": (lambda x: isinstance(x, str), "a string"),
                 "dict[str, Any]": (lambda x: isinstance(x, dict), "a dict")}
_ALL_CHECKS = {**_NUMBER_CHECKS, **_PLAIN_CHECKS}


def _check_type(name: str, annotation: str, value: Any, numbers_too: bool = True) -> None:
    """A config field's value has its type (None where the field takes it), as Transformers'
    strict configs check it: a bool field takes no "False" (a string, which reads as true), a
    string field no None. `numbers_too`: integer and float fields as well (on assignment; at
    construction `__post_init__` checks them with their ranges)."""
    kind, _, rest = annotation.partition(" | ")
    checks = _ALL_CHECKS if numbers_too else _PLAIN_CHECKS
    if kind in checks and rest in ("", "None") and not (value is None and rest == "None"):
        test, what = checks[kind]
        _check(test(value), name, f"must be {what}{' or None' if rest else ''}, got {value!r}")


def check_positive_ints(cfg: Any, names: list[str]) -> None:
    for name in names:
        v = getattr(cfg, name)
        _check(_is_int(v) and v > 0, name, f"must be a positive integer, got {v!r}")


def takes_any_key(cls):
    """Let a config class's constructor take any keyword, as Transformers' configs do: the original
    names (`_rename_legacy_keys`), `torch_dtype` for `dtype`, `model_type` when it is the class's,
    and unknown keys kept in `extra` (read as attributes, written back by `save_pretrained`).
    `from_dict` builds through it."""
    init, names = cls.__init__, {f.name for f in dataclasses.fields(cls)}

    @functools.wraps(init)
    def __init__(self, **kwargs: Any) -> None:
        model_type = kwargs.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ConfigError(f"config has model_type {model_type!r}, but {cls.__name__} expects {cls.model_type!r}")
        kwargs = cls._rename_legacy_keys(kwargs)
        if "torch_dtype" in kwargs and kwargs.get("dtype") is None:
            kwargs["dtype"] = kwargs["torch_dtype"]
        if "num_experts" in kwargs and "num_local_experts" in names:  # the alias `num_experts` reads and sets
            experts = kwargs.pop("num_experts")
            _check(kwargs.setdefault("num_local_experts", experts) == experts, "num_experts",
                   f"{experts!r} conflicts with num_local_experts = {kwargs['num_local_experts']!r} (same field)")
        if "use_return_dict" in kwargs:
            raise ConfigError("invalid config field `use_return_dict`: it reads return_dict; set return_dict instead")
        # runtime state, as Transformers keeps it: never a field, never saved
        name_or_path = os.fspath(kwargs.pop("name_or_path", ""))
        experts_implementation = kwargs.pop("experts_implementation", None)
        generation = {k: kwargs.pop(k) for k in list(kwargs) if k in GENERATION_KEYS and k not in names}
        extra = dict(kwargs.pop("extra", None) or {})
        extra.update({k: v for k, v in kwargs.items() if k not in names and k not in _IGNORED_KEYS
                      and not (k in _SHARED_DEFAULTS and v == _SHARED_DEFAULTS[k])})
        for f in dataclasses.fields(cls):  # (before __post_init__ reads them)
            if f.name in kwargs:
                _check_type(f.name, str(f.type), kwargs[f.name], numbers_too=False)
        init(self, **{k: v for k, v in kwargs.items() if k in names}, extra=extra)
        object.__setattr__(self, "_generation_settings", generation)
        object.__setattr__(self, "_experts_implementation", experts_implementation)
        if name_or_path:
            object.__setattr__(self, "_name_or_path", name_or_path)
        object.__setattr__(self, "_built", True)  # from here on, `MoeConfig.__setattr__` applies its rules

    cls.__init__ = __init__
    cls.__repr__ = _json_repr
    return cls


def _json_repr(self) -> str:
    """`print(config)` as Transformers prints it: the class name, then the JSON of the values that
    differ from the defaults."""
    return f"{type(self).__name__} {self.to_json_string()}"


@dataclass(kw_only=True)
class MoeConfig(PushToHubMixin):
    """Fields and behaviour shared by every moetorch model config."""

    model_type: ClassVar[str] = ""
    is_encoder_decoder: ClassVar[bool] = False
    # derived values (properties) that Transformers' config of the same model keeps as attributes
    # (iterated with the fields: `__iter__`)
    derived_keys: ClassVar[tuple[str, ...]] = ()
    # output fields Transformers' Trainer leaves out of its predictions, as for Transformers' models
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]
    # Transformers' map of attribute names read as others (JetMoE: head_dim -> kv_channels, a property here)
    attribute_map: ClassVar[dict[str, str]] = {}
    # Where the config was loaded from, as `from_pretrained` was given it ("" for a new config): Transformers'
    # `_name_or_path`, which tools read (TRL makes its reference model from it). Not a field: never saved.
    _name_or_path: ClassVar[str] = ""
    architectures: list[str] | None = None
    # a torch.dtype in memory (given as one or by name), its name in config.json, as in Transformers
    dtype: torch.dtype | str | None = None
    output_attentions: bool | None = False  # (None taken, as Transformers' strict fields take it)
    output_hidden_states: bool | None = False
    return_dict: bool | None = True
    num_labels: int | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    # Runtime choice of attention backend ("sdpa", "eager", "flash_attention_2"); not saved.
    attn_implementation: str | None = None
    # Unknown keys read from config.json, kept so that saving loses nothing.
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- shared validation -------------------------------------------------------------------
    def _post_init_common(self) -> None:
        if self.id2label is None and self.label2id is not None:
            # label2id alone names the labels (Transformers drops it and names them LABEL_i, so that
            # the two maps disagree); its ids must be 0..n-1
            ids = list(self.label2id.values())
            _check(all(_is_int(i) for i in ids) and sorted(ids) == list(range(len(ids))), "label2id",
                   f"ids must be 0..{len(ids) - 1}, each once, to name the labels without id2label; got {ids}")
            _check(self.num_labels is None or self.num_labels == len(ids), "num_labels",
                   f"{self.num_labels} does not match label2id with {len(ids)} entries")
            self.id2label = {int(i): name for name, i in sorted(self.label2id.items(), key=lambda kv: kv[1])}
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            if self.num_labels is None:
                self.num_labels = len(self.id2label)
            _check(
                len(self.id2label) == self.num_labels,
                "num_labels",
                f"{self.num_labels} does not match id2label with {len(self.id2label)} entries",
            )
        if self.num_labels is None:
            self.num_labels = 2
        _check(_is_int(self.num_labels) and self.num_labels > 0, "num_labels", "must be a positive integer")
        if self.id2label is None:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if self.label2id is None:
            self.label2id = {v: k for k, v in self.id2label.items()}
        allowed = (None, "regression", "single_label_classification", "multi_label_classification")
        _check(self.problem_type in allowed, "problem_type", f"must be one of {allowed}, got {self.problem_type!r}")
        _check(self.problem_type != "single_label_classification" or self.num_labels > 1, "problem_type",
               "'single_label_classification' needs num_labels > 1 (its loss over one class is always 0): use "
               "num_labels=2 for two classes, or problem_type='regression' for one output")
        if isinstance(self.attn_implementation, dict):  # by sub-config, as Transformers takes it: the model's
            self.attn_implementation = self.attn_implementation.get("")
        allowed_attn = (None, "eager", "sdpa", "flash_attention_2", "flex_attention")  # (flex: sdpa runs)
        _check(
            self.attn_implementation in allowed_attn,
            "attn_implementation",
            f"must be one of {allowed_attn[1:]}, got {self.attn_implementation!r}",
        )
        self.dtype = as_torch_dtype(self.dtype)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name, None)
            ids = v if name == "eos_token_id" and isinstance(v, (list, tuple)) else [v]
            _check(v is None or all(_is_int(i) for i in ids), name,
                   f"must be a token id (an integer{', or a list of them' if name == 'eos_token_id' else ''}) or "
                   f"None, got {v!r}")
        pad = getattr(self, "pad_token_id", None)
        vocab = getattr(self, "vocab_size", None)
        if pad is not None and _is_int(vocab):  # (the embedding's padding row)
            _check(-vocab <= pad < vocab, "pad_token_id", f"{pad} is outside the vocabulary of {vocab} tokens")
        act = getattr(self, "hidden_act", None)
        if act is not None:
            _check(act in ACTIVATIONS, "hidden_act", f"unknown activation {act!r}; allowed: {sorted(ACTIVATIONS)}")

    def _normalize_rope(self, allowed_types: tuple[str, ...]) -> None:
        """Merge the Transformers-4 form (rope_theta + rope_scaling) into `rope_parameters` (v5)."""
        params = dict(self.rope_parameters or {})
        if self.rope_scaling:
            _check(isinstance(self.rope_scaling, dict), "rope_scaling", "must be a dict")
            for k, v in self.rope_scaling.items():
                params.setdefault(k, v)
        if "type" in params:
            params.setdefault("rope_type", params["type"])  # ("type" kept, as Transformers keeps it)
        params.setdefault("rope_type", "default")
        if params["rope_type"] == "su":  # Phi-3's earlier name for LongRoPE
            params["rope_type"] = "longrope"
        theta = params.get("rope_theta", self.rope_theta)
        if theta is None:
            theta = self.default_rope_theta
        params["rope_theta"] = theta
        _check(_is_positive(theta), "rope_theta", f"must be a positive number, got {theta!r}")
        _check(
            params["rope_type"] in allowed_types,
            "rope_parameters.rope_type",
            f"{params['rope_type']!r} is not supported; allowed: {allowed_types}",
        )
        if "partial_rotary_factor" in self.extra:  # given as a keyword: RoPE's, as Transformers files it
            params.setdefault("partial_rotary_factor", self.extra.pop("partial_rotary_factor"))
        partial = params.get("partial_rotary_factor", 1.0)
        if partial != 1.0:
            # Transformers' models of both families rotate every dimension of a head whatever the
            # factor says under the default RoPE (kept, read by neither), and fail under the others
            _check(params["rope_type"] == "default", "rope_parameters.partial_rotary_factor",
                   f"must be 1.0 for rope_type {params['rope_type']!r}: this model rotates every dimension of "
                   f"a head, got {partial!r}")
            logger.warning("rope_parameters.partial_rotary_factor = %r is ignored, as in Transformers: this model "
                           "rotates every dimension of a head", partial)
        self.rope_parameters = params
        self.rope_theta = float(theta)
        self.rope_scaling = params  # Transformers 5 reads `rope_scaling` as `rope_parameters`; not saved
        if params["rope_type"] in SCALED_ROPE_TYPES:
            self._validate_scaled_rope(params)

    def validate_rope(self, ignore_keys: set[str] | None = None) -> None:
        """Check `rope_parameters` again, as the config checked them when made (Transformers' method,
        for parameters changed since): a ConfigError naming the field at fault, else None.
        `ignore_keys` is taken for Transformers' signature; every key a kind reads is checked."""
        self._check_rope()

    def _check_rope(self) -> None:
        raise NotImplementedError

    def _validate_scaled_rope(self, p: dict) -> None:
        """The fields a linear, yarn or llama3 `rope_type` reads (`ops.rope.scaled_inv_freq`), with
        Transformers' fill-in: the original context defaults to max_position_embeddings."""
        kind = p["rope_type"]
        if kind != "linear":
            omp = p.setdefault("original_max_position_embeddings", self.max_position_embeddings)
            _check(_is_int(omp) and omp > 0, "rope_parameters.original_max_position_embeddings",
                   f"must be a positive integer, got {omp!r}")
        _check(_is_positive(p.get("factor")), "rope_parameters.factor",
               f"must be a positive number for rope_type {kind!r}, got {p.get('factor')!r}")
        names = {"llama3": ("low_freq_factor", "high_freq_factor"),
                 "yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")}.get(kind, ())
        for name in names:
            v = p.get(name)
            if kind == "llama3" or v is not None:
                _check(_is_positive(v), f"rope_parameters.{name}", f"must be a positive number, got {v!r}")
        if kind == "llama3":
            _check(p["high_freq_factor"] > p["low_freq_factor"], "rope_parameters.high_freq_factor",
                   f"must exceed low_freq_factor ({p['low_freq_factor']}), got {p['high_freq_factor']}")

    def _validate_longrope_factors(self, omp) -> None:
        """LongRoPE's original context (written back as an int) and its two factor lists, one entry
        per rotated pair of a head."""
        p = self.rope_parameters
        _check(
            _is_int(omp) and omp > 0, "rope_parameters.original_max_position_embeddings", "must be a positive integer"
        )
        p["original_max_position_embeddings"] = int(omp)
        half = self.head_dim // 2
        for name in ("short_factor", "long_factor"):
            v = p.get(name)
            _check(
                isinstance(v, (list, tuple)) and all(_is_positive(x) for x in v),
                f"rope_parameters.{name}",
                f"must be a list of positive numbers (each divides a frequency), got {v!r}",
            )
            _check(
                len(v) == half,
                f"rope_parameters.{name}",
                f"must have head_dim // 2 = {half} entries, got {len(v)}",
            )

    # ---- Transformers compatibility ----------------------------------------------------------
    @property
    def name_or_path(self) -> str:
        return self._name_or_path

    @name_or_path.setter
    def name_or_path(self, value: str | os.PathLike) -> None:
        self._name_or_path = os.fspath(value)

    @property
    def num_experts(self) -> int:
        """`num_local_experts` under the name other MoE configs use, which TRL's MoE loss reads
        (Transformers' PhiMoE and JetMoE configs lack it: docs/differences.md)."""
        return self.num_local_experts

    @num_experts.setter
    def num_experts(self, value: int) -> None:
        self.num_local_experts = value

    @property
    def _attn_implementation(self) -> str:
        return self.attn_implementation or "sdpa"

    @_attn_implementation.setter
    def _attn_implementation(self, value: str) -> None:
        self.attn_implementation = value

    @property
    def use_return_dict(self) -> bool:
        return self.return_dict

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """Transformers' older name of `dtype`."""
        return self.dtype

    @torch_dtype.setter
    def torch_dtype(self, value: torch.dtype | str | None) -> None:
        self.dtype = value

    def __setattr__(self, name: str, value: Any) -> None:
        """As Transformers' configs: an attribute set after construction that is no field joins the
        unknown keys (`extra`: read back, written by `to_dict` and `save_pretrained`); `dtype` is kept
        as a torch.dtype; a new `num_labels` makes new `id2label` / `label2id`, and a new `id2label`
        sets `num_labels`. Private names (`_x`) are plain attributes, never saved."""
        built = self.__dict__.get("_built", False)  # constructed and validated (`takes_any_key`)
        if not built or name.startswith("_") or name in self.__dataclass_fields__ or hasattr(type(self), name):
            if built and name in self.__dataclass_fields__:
                _check_type(name, str(self.__dataclass_fields__[name].type), value)
            if built and name == "dtype":
                value = as_torch_dtype(value)
            elif built and name == "num_labels" and value != len(self.id2label):
                _check(_is_int(value) and value > 0, "num_labels", f"must be a positive integer, got {value!r}")
                labels = {i: f"LABEL_{i}" for i in range(value)}
                object.__setattr__(self, "id2label", labels)
                object.__setattr__(self, "label2id", {v: k for k, v in labels.items()})
            elif built and name == "id2label" and value is not None:
                value = {int(k): v for k, v in value.items()}
                object.__setattr__(self, "num_labels", len(value))
            elif built and name in ("rope_parameters", "rope_scaling"):
                # one dict under both names, as in Transformers 5 (`rope_scaling` its older name), with
                # its kind and theta filled in as Transformers' `standardize_rope_params` fills them
                if isinstance(value, dict):
                    value.setdefault("rope_type", value.get("type", "default"))
                    value.setdefault("rope_theta", self.rope_theta)
                    if _is_positive(value["rope_theta"]):
                        object.__setattr__(self, "rope_theta", float(value["rope_theta"]))
                object.__setattr__(self, "rope_parameters" if name == "rope_scaling" else "rope_scaling", value)
            object.__setattr__(self, name, value)
        else:
            self.extra[name] = value

    def __delattr__(self, name: str) -> None:
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra and name not in self.__dict__:
            del extra[name]
        else:
            object.__delattr__(self, name)

    def validate(self) -> None:
        """Check every field again, as the config checked them when made (Transformers' method, for
        values set since): a ConfigError naming the field at fault, else None. (A model built from
        the config checks its RoPE fields, `validate_rope`, not the others.)"""
        type(self).from_dict(self.to_dict())

    def get_text_config(self, *args: Any, **kwargs: Any) -> MoeConfig:
        return self

    def __iter__(self) -> Iterator[str]:
        """The config's attribute names, as Transformers 5's configs iterate (`for key in config`,
        `"hidden_size" in config`): the fields, then the unknown keys (`extra`); no private names."""
        yield from (k for k in self.__dict__ if not k.startswith("_") and k != "extra")
        yield from self.derived_keys
        yield from self.extra

    def __getattr__(self, name: str) -> Any:
        # Unknown keys from config.json read as attributes, as in Transformers.
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        if name == "chunk_size_feed_forward":  # Transformers' shared field (feed-forward chunking, unused here)
            return 0
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # ---- dict / json I/O ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **overrides: Any) -> MoeConfig:
        """Build a config from a `config.json`-style dict; unknown keys are kept in `extra`. With
        `return_unused_kwargs=True`, (config, the overrides that name no attribute of it), those not
        applied, as Transformers returns them."""
        if cls is MoeConfig:  # (`PretrainedConfig.from_dict` / `.from_pretrained`: the base class holds no model's
            from .auto import model_type_of, registry  # fields, so the config.json's model_type picks the class)
            model_type = model_type_of(config_dict, "PretrainedConfig.from_dict")
            return registry()[model_type]["config"].from_dict(config_dict, **overrides)
        if overrides.pop("return_unused_kwargs", False):
            probe = cls.from_dict(config_dict)
            unused = {k: v for k, v in overrides.items() if not hasattr(probe, k)}
            return cls.from_dict(config_dict, **{k: v for k, v in overrides.items() if k not in unused}), unused
        config_dict = cls._settle_stored_names(config_dict)
        data = {**config_dict, **overrides}
        stored = config_dict.get("rope_parameters") or {}
        theta = overrides.get("rope_theta", stored.get("rope_theta", config_dict.get("rope_theta")))
        if overrides.get("rope_scaling") and "rope_parameters" not in overrides:
            # RoPE given in the Transformers-4 form replaces the stored RoPE (as in Transformers),
            # keeping the stored rope_theta unless it sets its own
            data["rope_parameters"] = None if theta is None else {"rope_theta": theta}
        elif isinstance(overrides.get("rope_parameters"), dict) and "rope_theta" not in overrides["rope_parameters"]:
            # new RoPE parameters without a theta keep the stored one (not the class default)
            if theta is not None:
                data["rope_parameters"] = {"rope_theta": theta, **overrides["rope_parameters"]}
        elif "rope_theta" in overrides and "rope_parameters" not in overrides and isinstance(stored, dict):
            # a new theta alone replaces the stored RoPE's (which would otherwise win over it)
            data["rope_parameters"] = {**stored, "rope_theta": overrides["rope_theta"]}
        if "num_experts" in overrides and "num_local_experts" not in overrides and "num_experts" not in config_dict:
            data["num_local_experts"] = data.pop("num_experts")  # the alias overrides the stored field
        if "num_labels" in overrides and "id2label" not in overrides:
            # A new label count replaces the stored label names, as in Transformers.
            data.pop("id2label", None)
            data.pop("label2id", None)
        return cls(**data)

    @classmethod
    def _rename_legacy_keys(cls, data: dict[str, Any]) -> dict[str, Any]:
        return data

    @classmethod
    def _settle_stored_names(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A config.json's dict before it is read (`from_dict`): where it holds one field under two
        names that disagree (JetMoE: Transformers writes the original names it was given beside its
        own and reads its own), the Transformers-5 name's value, with a warning."""
        return data

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` content, in the Transformers-5 form."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in _RUNTIME_FIELDS:
                continue
            out[f.name] = copy.deepcopy(getattr(self, f.name))
        # The v5 form keeps RoPE in rope_parameters only.
        out.pop("rope_scaling", None)
        out.pop("rope_theta", None)
        if out.get("original_max_position_embeddings", 0) is None:
            out.pop("original_max_position_embeddings")
        if out.get("id2label") is not None and len(out["id2label"]) != self.num_labels:
            out["id2label"] = {i: f"LABEL_{i}" for i in range(self.num_labels)}
            out["label2id"] = {v: k for k, v in out["id2label"].items()}
        if out.get("id2label") is not None:  # the labels' count, which Transformers writes as id2label alone
            out.pop("num_labels", None)
        out["model_type"] = self.model_type
        # Transformers' shared fields that no field here holds, at the values its configs give them
        out.update(_SHARED_DEFAULTS, _name_or_path=self._name_or_path)
        out.update(copy.deepcopy(self.extra))
        # id2label keeps its int keys, as Transformers' to_dict (JSON writes them as strings);
        # torch dtypes are written by name
        return _jsonable(dict(sorted(out.items())))

    def to_diff_dict(self) -> dict[str, Any]:
        """`to_dict` less the fields every model shares (output flags, labels, dtype, ...) where
        they hold their defaults, as Transformers' diff against its base config leaves them out."""
        shared = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                  for f in dataclasses.fields(MoeConfig)}
        shared.update(_SHARED_DEFAULTS, num_labels=2, id2label={0: "LABEL_0", 1: "LABEL_1"},
                      label2id={"LABEL_0": 0, "LABEL_1": 1})
        out = self.to_dict()
        out.pop("_name_or_path")  # where it was loaded from: never written to a file
        for name, default in shared.items():
            value = getattr(self, name, None) if name in self.__dataclass_fields__ else out.get(name)
            if name in out and value == default:
                del out[name]
        return out

    def to_json_string(self, use_diff: bool = True) -> str:
        """config.json's text, as Transformers writes it: with `use_diff`, the fields every model
        shares are left out where they hold their defaults (`to_diff_dict`); else every field."""
        fields = self.to_diff_dict() if use_diff else self.to_dict()
        return json.dumps(encode_special_floats(fields), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string(use_diff))

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write `config.json` into `save_directory` (created if missing). As in Transformers,
        `push_to_hub=True` then uploads the directory to `repo_id` (default: the directory's name;
        with `token`, `private`, `commit_message`, `commit_description`, `create_pr`, `revision`)."""
        push = {k: kwargs.pop(k) for k in PUSH_OPTIONS if k in kwargs}
        if kwargs:
            raise TypeError(f"save_pretrained() got unknown keyword arguments {sorted(kwargs)}; it takes "
                            f"push_to_hub and its options {list(PUSH_OPTIONS)}")
        if os.path.isfile(save_directory):
            raise ConfigError(f"save_pretrained expects a directory, but {save_directory} is a file")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        os.replace(tmp, path)
        if push_to_hub:
            repo_id = push.pop("repo_id", None) or os.path.basename(os.path.normpath(save_directory))
            upload(save_directory, repo_id, what=type(self).__name__, **push)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> MoeConfig:
        """Read `config.json` from a checkpoint directory (or a path to the json file itself, or a
        Hub repository: `revision`, `cache_dir`, `token`, ... as in Transformers)."""
        hub = hub_options(overrides)
        for key in _LOADER_KEYS:  # loading options, not fields: never written to config.json
            overrides.pop(key, None)
        config = cls.from_dict(read_config_dict(path, **hub), **overrides)
        (config[0] if isinstance(config, tuple) else config).name_or_path = path
        return config

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: str | os.PathLike,
                        **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """(config.json's dict, the keywords left once the Hub's options are taken), as Transformers'
        `PretrainedConfig.get_config_dict` returns them."""
        hub = hub_options(kwargs)
        for key in _LOADER_KEYS:
            kwargs.pop(key, None)
        return read_config_dict(pretrained_model_name_or_path, **hub), kwargs

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> MoeConfig:
        """A config from a JSON file (only a file: `from_pretrained` reads directories and the Hub)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"from_json_file: no file at {path}")
        return cls.from_dict(read_config_dict(path))

    def update(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            setattr(self, k, v)

    def update_from_string(self, update_str: str) -> None:
        """Set existing fields from "a=1,b=0.5,c=true,d=text", each parsed as the field's current type."""
        for item in update_str.split(","):
            k, sep, v = item.partition("=")
            if not sep or not hasattr(self, k):
                raise ValueError(f"update_from_string: {item!r} does not set a field of this config")
            old = getattr(self, k)
            if isinstance(old, bool):
                if v.lower() not in ("true", "1", "y", "yes", "false", "0", "n", "no"):
                    raise ValueError(f"update_from_string: cannot read true or false from {v!r} (field `{k}`)")
                v = v.lower() in ("true", "1", "y", "yes")
            elif isinstance(old, (int, float)):
                v = type(old)(v)
            elif not isinstance(old, str):
                raise ValueError(f"update_from_string: field `{k}` holds a {type(old).__name__}, not a scalar")
            setattr(self, k, v)

    def copy(self) -> MoeConfig:
        return copy.deepcopy(self)


# from_pretrained's options that a config takes along from a model's call (AutoConfig, pipelines)
_LOADER_KEYS = ("trust_remote_code", "proxies", "_from_auto", "_from_pipeline", "_commit_hash", "resume_download")


def as_moetorch_config(config: Any) -> Any:
    """A Transformers config of a model moetorch runs (`transformers.PhimoeConfig`, a script may
    still import that one) as moetorch's config of the same values (its `to_dict()`, as config.json
    holds them); anything else as it is (the caller checks it)."""
    if isinstance(config, MoeConfig) or not type(config).__module__.startswith("transformers.") \
            or not hasattr(config, "to_dict"):
        return config
    from .auto import registry

    data = config.to_dict()
    if data.get("model_type") not in registry():
        return config
    return registry()[data["model_type"]]["config"].from_dict(data)


def read_config_dict(path: str | os.PathLike, **hub: Any) -> dict[str, Any]:
    """Load a config.json as a dict, with errors that name the file. `path`: a directory, the
    file, an embedded model's name or a Hub repository (`hub`: its options, `moetorch.hub`)."""
    path = checkpoint_path(path, CONFIG_PATTERNS, **hub)
    file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"no {CONFIG_NAME} found at {file}")
    return decode_special_floats(read_json_object(file, CONFIG_NAME))


def read_json_object(file: str | os.PathLike, kind: str) -> dict[str, Any]:
    """The JSON object in `file` (a `kind`: config.json, generation_config.json), with errors that
    name the file: not valid JSON, not text, not an object, or a directory in the file's place."""
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from e
    except UnicodeDecodeError as e:  # a weights file, say
        raise ConfigError(f"{file} is not a {kind} (not text); pass the checkpoint's directory") from e
    except IsADirectoryError as e:
        raise ConfigError(f"{file} is a directory, where a {kind} file belongs") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


_SPECIAL_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def decode_special_floats(value: Any) -> Any:
    """`value` with Transformers' JSON form of a non-finite float, {"__float__": "Infinity"} (or
    "-Infinity", "NaN"), read back as the float, in dicts and lists too."""
    if isinstance(value, dict):
        if len(value) == 1 and value.get("__float__") in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[value["__float__"]]
        return {k: decode_special_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_special_floats(v) for v in value]
    return value


def encode_special_floats(value: Any) -> Any:
    """`value` with each non-finite float written as Transformers writes it ({"__float__": "NaN"}, ...),
    so that config.json stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"}
    if isinstance(value, dict):
        return {k: encode_special_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_special_floats(v) for v in value]
    return value


@takes_any_key
@dataclass
class PhimoeConfig(MoeConfig):
    """Configuration of a PhiMoE model (Phi-3.5-MoE). Defaults match microsoft/Phi-3.5-MoE-instruct.

    RoPE can be given in the Transformers-4 form (`rope_theta` and `rope_scaling` with
    `type: longrope`) or the Transformers-5 form (`rope_parameters`); both end in `rope_parameters`.
    """

    model_type: ClassVar[str] = "phimoe"
    default_rope_theta: ClassVar[float] = 1000000.0

    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 6400
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096 * 32
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    attention_dropout: float = 0.0
    num_experts_per_tok: int = 2
    num_local_experts: int = 16
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.01
    input_jitter_noise: float = 0.0
    attention_bias: bool = False
    lm_head_bias: bool = False
    rope_parameters: dict[str, Any] | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self._post_init_common()
        check_positive_ints(
            self,
            ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "num_local_experts", "num_experts_per_tok"],
        )
        head_dim = self.extra.get("head_dim")
        if head_dim is None:
            _check(
                self.hidden_size % self.num_attention_heads == 0,
                "num_attention_heads",
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}",
            )
        else:  # rotary pairs column j with j + head_dim / 2
            _check(_is_int(head_dim) and head_dim > 0 and head_dim % 2 == 0, "head_dim",
                   f"must be a positive even integer (or unset: hidden_size / num_attention_heads), "
                   f"got {head_dim!r}")
        _check(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"num_attention_heads {self.num_attention_heads} is not divisible by "
            f"num_key_value_heads {self.num_key_value_heads}",
        )
        _check(
            self.num_experts_per_tok <= self.num_local_experts,
            "num_experts_per_tok",
            f"{self.num_experts_per_tok} is larger than num_local_experts {self.num_local_experts}",
        )
        # sparsemixer is defined for exactly two experts (Phi-3.5-MoE and Transformers always pick 2).
        _check(
            self.num_experts_per_tok == 2,
            "num_experts_per_tok",
            "PhiMoE's sparsemixer routing selects exactly 2 experts",
        )
        _check(
            self.sliding_window is None or (_is_int(self.sliding_window) and self.sliding_window > 0),
            "sliding_window",
            f"must be None or a positive integer, got {self.sliding_window!r}",
        )
        for name in (
            "router_jitter_noise", "input_jitter_noise", "router_aux_loss_coef", "rms_norm_eps", "initializer_range"
        ):
            v = getattr(self, name)
            _check(_is_number(v) and v >= 0, name, f"must be a non-negative number, got {v!r}")
        _check(0 <= self.attention_dropout < 1, "attention_dropout", "must be in [0, 1)")
        self._check_rope()

    def _check_rope(self) -> None:
        self._normalize_rope(("default", "longrope"))  # Transformers' PhiMoE takes no other scaled kind
        if self.rope_parameters["rope_type"] == "longrope":
            self._validate_longrope()

    @property
    def head_dim(self) -> int:
        """Width of an attention head: `head_dim` where the config sets it (Transformers' PhiMoE
        reads it, though its config class does not list it), else hidden_size / num_attention_heads.
        Kept with the unknown keys, so that a config without it saves without it."""
        return self.extra.get("head_dim") or self.hidden_size // self.num_attention_heads

    @head_dim.setter
    def head_dim(self, value: int | None) -> None:
        if value is None:  # back to hidden_size / heads, and not saved
            self.extra.pop("head_dim", None)
        else:
            self.extra["head_dim"] = value

    def _validate_longrope(self) -> None:
        p = self.rope_parameters
        # As in Transformers 5, the dict's original_max_position_embeddings wins over a top-level one,
        # which is then set to it; a dict without one takes the top-level value.
        omp = p.get("original_max_position_embeddings") or self.original_max_position_embeddings
        omp = omp or self.max_position_embeddings
        self._validate_longrope_factors(omp)
        self.original_max_position_embeddings = int(omp)
        for name in ("short_mscale", "long_mscale"):
            v = p.get(name)
            _check(_is_positive(v), f"rope_parameters.{name}", f"must be a positive number, got {v!r}")


@takes_any_key
@dataclass
class JetMoeConfig(MoeConfig):
    """Configuration of a JetMoE model. Field names and defaults match Transformers' `JetMoeConfig`.

    `num_attention_heads` is derived (`num_key_value_heads * num_experts_per_tok`: each of a token's
    K attention experts brings `num_key_value_heads` query heads): setting another value is an
    AttributeError. The original JetMoE names `ffn_hidden_size`, `moe_num_experts` and `moe_top_k` are read
    as aliases of `intermediate_size`, `num_local_experts` and `num_experts_per_tok`; `head_dim` of
    `kv_channels` (read and set, as Transformers' `attribute_map` makes it).

    `router_loss_recipe` picks the router loss behind `aux_loss` (a moetorch option, written to
    config.json only when not the default):
    - "transformers": Transformers' Switch loss over [attention router, attention router again,
      MLP router] of every layer; `loss += aux_loss_coef * aux_loss`.
    - "jetmoe": the original JetMoE training recipe: every router counted once, each contributing
      its own Switch loss (assignment fractions normalised over all T*K assignments) plus
      `router_z_loss_coef` times its z-loss; the router terms are summed.
    """

    derived_keys: ClassVar[tuple[str, ...]] = ("num_attention_heads",)
    model_type: ClassVar[str] = "jetmoe"
    attribute_map: ClassVar[dict[str, str]] = {"head_dim": "kv_channels"}
    default_rope_theta: ClassVar[float] = 10000.0
    # Other names for fields: the original JetMoE code's, and Transformers' (its attribute_map).
    aliases: ClassVar[dict[str, str]] = {
        "ffn_hidden_size": "intermediate_size",
        "moe_num_experts": "num_local_experts",
        "moe_top_k": "num_experts_per_tok",
        **attribute_map,
    }
    router_loss_recipes: ClassVar[tuple[str, ...]] = ("transformers", "jetmoe")
    # moetorch-only options, left out of config.json at these values so that the file stays Transformers'.
    option_defaults: ClassVar[dict[str, Any]] = {"router_loss_recipe": "transformers", "router_z_loss_coef": 0.1}

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 12
    num_key_value_heads: int = 16
    kv_channels: int = 128
    intermediate_size: int = 5632
    max_position_embeddings: int = 4096
    activation_function: str = "silu"
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    output_router_logits: bool = False
    aux_loss_coef: float = 0.01
    use_cache: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.01
    attention_dropout: float = 0.0
    router_loss_recipe: str = "transformers"
    router_z_loss_coef: float = 0.1

    def __post_init__(self) -> None:
        self._post_init_common()
        check_positive_ints(
            self,
            ["vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "kv_channels",
             "intermediate_size", "max_position_embeddings", "num_local_experts", "num_experts_per_tok"],
        )
        _check(
            self.num_experts_per_tok <= self.num_local_experts,
            "num_experts_per_tok",
            f"{self.num_experts_per_tok} is larger than num_local_experts {self.num_local_experts}",
        )
        # RoPE rotates pairs of channels. (hidden_size needs no divisibility: kv_channels sets the head size.)
        _check(
            self.kv_channels % 2 == 0,
            "kv_channels",
            f"must be even (RoPE rotates channel pairs), got {self.kv_channels}",
        )
        _check(
            self.activation_function in ACTIVATIONS,
            "activation_function",
            f"unknown activation {self.activation_function!r}; allowed: {sorted(ACTIVATIONS)}",
        )
        for name in ("aux_loss_coef", "router_z_loss_coef", "rms_norm_eps", "initializer_range"):
            v = getattr(self, name)
            _check(_is_number(v) and v >= 0, name, f"must be a non-negative number, got {v!r}")
        _check(
            _is_number(self.attention_dropout) and 0 <= self.attention_dropout < 1,
            "attention_dropout",
            f"must be in [0, 1), got {self.attention_dropout!r}",
        )
        _check(
            self.router_loss_recipe in self.router_loss_recipes,
            "router_loss_recipe",
            f"must be one of {self.router_loss_recipes}, got {self.router_loss_recipe!r}",
        )
        self._check_rope()

    def _check_rope(self) -> None:
        self._normalize_rope(("default", *SCALED_ROPE_TYPES, *PER_FORWARD_ROPE_TYPES))
        p = self.rope_parameters
        if p["rope_type"] == "dynamic":  # (Transformers reads `factor` alone; its context is max_position_embeddings)
            _check(_is_positive(p.get("factor")), "rope_parameters.factor",
                   f"must be a positive number for rope_type 'dynamic', got {p.get('factor')!r}")
            _check(self.kv_channels > 2, "kv_channels",
                   f"must exceed 2 for rope_type 'dynamic' (its base scales by d / (d - 2)), got {self.kv_channels}")
        elif p["rope_type"] == "longrope":
            self._validate_longrope_factors(p.setdefault("original_max_position_embeddings",
                                                         self.max_position_embeddings))
            for name in ("factor", "attention_factor"):
                v = p.get(name)
                _check(v is None or _is_positive(v), f"rope_parameters.{name}",
                       f"must be a positive number, got {v!r}")
            omp = p["original_max_position_embeddings"]  # (the default attention factor divides by ln of it)
            _check(p.get("attention_factor") is not None or omp > 1, "rope_parameters.original_max_position_embeddings",
                   f"must exceed 1 for LongRoPE's default attention factor (or set attention_factor), got {omp}")

    @property
    def num_attention_heads(self) -> int:
        """Query heads per token: K attention experts of `num_key_value_heads` heads each."""
        return self.num_key_value_heads * self.num_experts_per_tok

    @num_attention_heads.setter
    def num_attention_heads(self, value: int) -> None:
        # Transformers stores any value and its model never reads it; here it is derived (read-only), so
        # only its own value is taken (scripts that copy it back), and another one is an error that says why
        if value != self.num_attention_heads:
            raise AttributeError(
                f"config field `num_attention_heads` is read-only: JetMoE derives it as num_key_value_heads * "
                f"num_experts_per_tok = {self.num_attention_heads}; set those instead of {value!r}")

    @property
    def head_dim(self) -> int:
        """`kv_channels` under Transformers' other name (its `attribute_map`), read and set."""
        return self.kv_channels

    @head_dim.setter
    def head_dim(self, value: int) -> None:
        self.kv_channels = value

    @classmethod
    def _rename_legacy_keys(cls, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        for old, new in cls.aliases.items():
            if old not in data:
                continue
            value = data.pop(old)
            if new in data and data[new] != value:
                if old in cls.attribute_map:  # Transformers' own alias wins over the field, as there
                    data[new] = value
                    continue
                raise ConfigError(
                    f"invalid config field `{old}`: {value!r} conflicts with `{new}` = {data[new]!r} (same field)"
                )
            data[new] = value
        # Derived, not read. Transformers lets a stored value override the attribute but its model
        # never uses it, so a mismatch is only worth a warning.
        heads = data.pop("num_attention_heads", None)
        kv = data.get("num_key_value_heads", cls.num_key_value_heads)
        k = data.get("num_experts_per_tok", cls.num_experts_per_tok)
        if heads is not None and _is_int(kv) and _is_int(k) and heads != kv * k:
            logger.warning(
                "config field `num_attention_heads` = %r ignored: JetMoE derives it as "
                "num_key_value_heads * num_experts_per_tok = %d", heads, kv * k,
            )
        return data

    @classmethod
    def _settle_stored_names(cls, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        for old, new in cls.aliases.items():
            if old in data and new in data and data[old] != data[new] and old not in cls.attribute_map:
                logger.warning("config field `%s` = %r ignored: `%s` = %r is set too, and Transformers reads it",
                               old, data.pop(old), new, data[new])
        return data

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["num_attention_heads"] = self.num_attention_heads  # Transformers writes the derived value too
        for name, default in self.option_defaults.items():
            if out.get(name) == default:
                out.pop(name)
        return dict(sorted(out.items()))
