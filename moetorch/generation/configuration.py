"""`GenerationConfig`: the settings of `generate`, read from and written to `generation_config.json`.

Every field has Transformers' default. The config also remembers which fields were set explicitly
(by the constructor, the json file or an assignment): `generate` layers the model's config, the
caller's config and keyword arguments by that, as Transformers does with its `None`-means-unset
fields, and a `max_length` left at its default means "20 new tokens", not "20 in all".
"""

from __future__ import annotations

import copy
import enum
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch

from ..defaults import checkpoint_path
from ..hub import CONFIG_PATTERNS, PushToHubMixin, hub_options
from ..utils import warn_once
from .logits_process import sequence_bias_key
from .watermarking import WatermarkingConfig

GENERATION_CONFIG_NAME = "generation_config.json"

DEFAULTS: dict[str, Any] = {
    # length
    "max_length": 20,
    "max_new_tokens": None,
    "min_length": 0,
    "min_new_tokens": None,
    "early_stopping": False,
    "max_time": None,
    "stop_strings": None,
    # strategy
    "do_sample": False,
    "num_beams": 1,
    "use_cache": True,
    "cache_implementation": None,
    "max_cache_len": None,  # a static cache's length, at least what the call needs
    "prefill_chunk_size": None,  # the prompt's forward in chunks of this many tokens (less memory)
    # Transformers' arguments of its quantized cache, which moetorch does not offer: kept, unused
    "cache_config": None,
    # moetorch compiles nothing by itself (decode steps replay CUDA graphs): kept, no effect
    "disable_compile": None,
    "compile_config": None,
    # logits manipulation
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "top_h": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": None,  # on the prompt's tokens (these models have no encoder)
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": None,  # n-grams of the prompt
    "bad_words_ids": None,
    "sequence_bias": None,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "exponential_decay_length_penalty": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "guidance_scale": None,
    "watermarking_config": None,  # a WatermarkingConfig (or its dict): green-list watermarking
    # outputs
    "num_return_sequences": 1,
    "output_attentions": False,
    "output_hidden_states": False,
    "output_scores": False,
    "output_logits": None,
    "return_dict_in_generate": False,
    # special tokens
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
    # the decoder's first token of an encoder-decoder model: kept for config files, unused here
    "decoder_start_token_id": None,
    # assisted decoding
    "num_assistant_tokens": 20,
    "num_assistant_tokens_schedule": "constant",
    "assistant_confidence_threshold": 0.4,
    # verify an assistant's drafts against w * p + (1 - w) * q (this model's p, the assistant's q):
    # more drafts kept, tokens no longer distributed as this model's (None: lossless)
    "assistant_ensemble_weight": None,
    # set by Transformers on its assistant's config while it drafts: kept for config files, unused
    "is_assistant": None,
    # Transformers reads these only for an assistant with another tokenizer, which moetorch does not
    # take (the assistant must share the vocabulary): kept for its config files, unused
    "assistant_lookbehind": 10,
    "target_lookbehind": 10,
    # prompt lookup decoding: drafts looked up in the sequence itself
    "prompt_lookup_num_tokens": None,
    "max_matching_ngram_size": None,
}

ASSISTANT_SCHEDULES = ("constant", "heuristic", "heuristic_transient")

CACHE_IMPLEMENTATIONS = ("dynamic", "static")
# Transformers' deprecated names of its static cache, read as "static"; "hybrid", which its older
# config files set for models with a sliding window, it reads as unset, and so does moetorch.
CACHE_ALIASES = {"sliding_window": "static", "hybrid_chunked": "static", "hybrid": None}
# Arguments of generate() itself, which a config must not carry.
_GENERATE_ARGUMENTS = (
    "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model",
    "streamer", "negative_prompt_ids", "negative_prompt_attention_mask",
)


# Fields whose None passed to generate() as a keyword is a setting of its own rather than "unset"
# (top_k=None turns top-k off, where its default is 50; eos_token_id=None drops the model's EOS);
# every other field passed as None takes its default. In a GenerationConfig, None is always unset
# (the model's value, else the default), as in Transformers.
# Transformers' GenerationConfig fields that moetorch's generate has no use for (strategies that
# Transformers 5 moved to the Hub, its own bookkeeping): read as None, their unset value there, so
# that Transformers' generate takes a moetorch config as it takes its own.
TRANSFORMERS_ONLY_FIELDS = frozenset({
    "_from_model_config", "assistant_early_exit", "constraints", "continuous_batching_config", "diversity_penalty",
    "dola_layers", "force_words_ids", "low_memory", "num_beam_groups", "penalty_alpha", "speculation_type",
    "token_healing", "transformers_version", "use_mtp",
})

NONE_IS_A_VALUE = {name for name, default in DEFAULTS.items() if default is None} | {
    "top_k", "assistant_confidence_threshold"}


def _plain(value: Any) -> Any:
    """A 0-d tensor or a numpy scalar as the Python number it holds (`max_new_tokens=np.int64(4)`,
    `pad_token_id=torch.tensor(5)`), also inside a list or tuple; anything else as it is."""
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 else value
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


@dataclass
class CompileConfig:
    """Transformers' `torch.compile` settings for generate's decode step (`compile_config=`). moetorch
    compiles nothing: its decode steps replay CUDA graphs of its own kernels. Taken, kept, unused
    (and, as in Transformers, not written to `generation_config.json`)."""

    fullgraph: bool = False
    dynamic: bool | None = None
    backend: str | Callable = "inductor"
    mode: str = "reduce-overhead"
    options: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(dict(self.__dict__))


class GenerationMode(str, enum.Enum):
    """The decoding modes of `GenerationConfig.get_generation_mode`, with Transformers' values."""

    CONTRASTIVE_SEARCH = "contrastive_search"
    GREEDY_SEARCH = "greedy_search"
    SAMPLE = "sample"
    ASSISTED_GENERATION = "assisted_generation"
    DOLA_GENERATION = "dola_generation"
    BEAM_SEARCH = "beam_search"
    BEAM_SAMPLE = "beam_sample"
    CONSTRAINED_BEAM_SEARCH = "constrained_beam_search"
    GROUP_BEAM_SEARCH = "group_beam_search"


class GenerationConfig(PushToHubMixin):
    """The parameters of `generate`, with Transformers' names and defaults.

    `GenerationConfig(max_new_tokens=32, do_sample=True, top_p=0.9)`; unknown keys are kept as
    attributes and written back by `save_pretrained`. Invalid combinations raise `ValueError`
    (see `validate`).
    """

    def __init__(self, **kwargs: Any) -> None:
        object.__setattr__(self, "_explicit", set())
        object.__setattr__(self, "_extra", [])
        for name, value in DEFAULTS.items():
            object.__setattr__(self, name, copy.deepcopy(value))
        for name, value in kwargs.items():
            setattr(self, name, value)
        self.validate(user_set_attributes=set(kwargs))

    def __setattr__(self, name: str, value: Any) -> None:
        if name in DEFAULTS:
            value = _plain(value)
            if name == "cache_implementation" and value in CACHE_ALIASES:
                value = CACHE_ALIASES[value]
            if value is None:
                # None means unset, as in Transformers: the field's default (a generate() keyword's
                # None may mean more: `set_as_keyword`)
                object.__setattr__(self, name, copy.deepcopy(DEFAULTS[name]))
                self._explicit.discard(name)
                return
        object.__setattr__(self, name, value)
        if name in DEFAULTS:
            self._explicit.add(name)
        elif not name.startswith("_") and name not in self._extra:
            self._extra.append(name)

    def __getattr__(self, name: str) -> Any:
        # (called only for names the config does not hold)
        if name in TRANSFORMERS_ONLY_FIELDS:
            return None
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def set_as_keyword(self, name: str, value: Any) -> None:
        """`name` set as generate()'s keyword sets it: None is explicitly None where None is a
        setting of its own (`NONE_IS_A_VALUE`: top-k off, no EOS, ...), else unset; any other value
        as an attribute."""
        if value is None and name in NONE_IS_A_VALUE:
            object.__setattr__(self, name, None)
            self._explicit.add(name)
        else:
            setattr(self, name, value)

    def is_set(self, name: str) -> bool:
        """Whether `name` was given explicitly (as opposed to holding its default)."""
        return name in self._explicit

    def explicit_items(self) -> dict[str, Any]:
        """The explicitly set fields and the unknown keys, by name."""
        names = [n for n in DEFAULTS if n in self._explicit] + list(self._extra)
        return {n: getattr(self, n) for n in names}

    # ---- validation ------------------------------------------------------------------------
    def validate(self, strict: bool = False, user_set_attributes: set[str] | None = None) -> None:
        """Raise `ValueError`, naming the field, for values or combinations that cannot work. Then
        the minor issues Transformers lists (a sampling flag without `do_sample`, a beam flag with
        one beam, a cache setting with `use_cache=False`, an output flag without
        `return_dict_in_generate`, a negative `pad_token_id`): with `strict` a `ValueError` listing
        them, else a warning naming them (once a process). `user_set_attributes`: the fields given
        explicitly, as there (a flag left over from a checkpoint's file, under an explicit
        `do_sample` or `num_beams`, is no issue); None: every field counts as given."""
        self._check_values()
        issues = self._minor_issues(user_set_attributes)
        if not issues:
            return
        listed = "\n".join(f"- `{name}`: {issue}" for name, issue in issues.items())
        listed += ("\nIf you're using a pretrained model, note that some of these attributes may be set through the "
                   "model's `generation_config.json` file.")
        if strict:
            raise ValueError("GenerationConfig is invalid: \n" + listed)
        warn_once(("generation flags", tuple(issues)), "The following generation flags are not valid and may be "
                  "ignored: %s.\n%s", list(issues), listed)

    def _minor_issues(self, given: set[str] | None) -> dict[str, str]:
        """Transformers' "minor issues" of `validate`: field -> what is wrong."""
        def counts(outer: str, inner: str) -> bool:  # not when only the mode was given (the flag is inherited)
            return given is None or not (outer in given and inner not in given)

        issues = {}
        if self.pad_token_id is not None and self.pad_token_id < 0:
            issues["pad_token_id"] = (
                f"`pad_token_id` should be positive but got {self.pad_token_id}. This will cause errors when batch "
                "generating, if there is padding. Please set `pad_token_id` explicitly as "
                "`model.generation_config.pad_token_id=PAD_TOKEN_ID` to avoid errors in generation")
        if self.do_sample is not True:
            for name, off in (("temperature", 1.0), ("top_p", 1.0), ("min_p", None), ("top_h", None),
                              ("typical_p", 1.0), ("top_k", 50), ("epsilon_cutoff", 0.0), ("eta_cutoff", 0.0)):
                value = getattr(self, name)
                if value is not None and value != off and counts("do_sample", name):
                    issues[name] = (f"`do_sample` is not set to `True`. However, `{name}` is set to `{value}` -- this "
                                    "flag is only used in sample-based generation modes. You should set "
                                    f"`do_sample=True` or unset `{name}`.")
        if self.num_beams == 1:
            for name, off in (("early_stopping", False), ("length_penalty", 1.0)):
                value = getattr(self, name)
                if value is not None and value is not off and value != off and counts("num_beams", name):
                    beams = 1 if self.is_set("num_beams") else None  # (unset reads None there)
                    issues[name] = (f"`num_beams` is set to {beams}. However, `{name}` is set to `{value}` -- this "
                                    "flag is only used in beam-based generation modes. You should set `num_beams>1` "
                                    f"or unset `{name}`.")
        if self.use_cache is False:
            for name in ("cache_implementation", "cache_config"):
                if getattr(self, name) is not None:
                    issues[name] = (f"You have not set `use_cache` to `True`, but {name} is set to "
                                    f"{getattr(self, name)}.{name} will have no effect.")
        if self.return_dict_in_generate is not True:
            for name in ("output_attentions", "output_hidden_states", "output_scores", "output_logits"):
                if getattr(self, name) is True:
                    issues[name] = (f"`return_dict_in_generate` is NOT set to `True`, but `{name}` is. When "
                                    f"`return_dict_in_generate` is not `True`, `{name}` is ignored.")
        return issues

    def get_generation_mode(self, assistant_model: Any = None) -> GenerationMode:
        """The decoding `generate` runs for these settings (Transformers' `GenerationMode`):
        greedy or beam search, sampling or beam sampling, assisted generation with an assistant
        model or prompt lookup (greedy and sampling only)."""
        if self.num_beams == 1:
            mode = GenerationMode.SAMPLE if self.do_sample is True else GenerationMode.GREEDY_SEARCH
        else:
            mode = GenerationMode.BEAM_SAMPLE if self.do_sample is True else GenerationMode.BEAM_SEARCH
        assisted = assistant_model is not None or self.prompt_lookup_num_tokens is not None
        if assisted and mode in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
            return GenerationMode.ASSISTED_GENERATION
        return mode

    def _check_values(self) -> None:
        """`validate`'s errors."""

        def fail(name: str, msg: str) -> None:
            raise ValueError(f"GenerationConfig: `{name}` {msg}")

        for arg in _GENERATE_ARGUMENTS:
            if arg in self._extra:
                fail(arg, "is an argument of generate(), not a generation setting: pass it to generate() directly")
        for name in ("max_length", "num_beams", "num_return_sequences", "num_assistant_tokens"):
            v = getattr(self, name)
            if not (_is_int(v) and v > 0):
                fail(name, f"must be a positive integer, got {v!r}")
        for name in ("max_new_tokens", "prompt_lookup_num_tokens", "max_matching_ngram_size", "max_cache_len",
                     "prefill_chunk_size"):
            v = getattr(self, name)
            if v is not None and not (_is_int(v) and v > 0):
                fail(name, f"must be a positive integer, got {v!r}")
        if self.num_assistant_tokens_schedule not in ASSISTANT_SCHEDULES:
            fail("num_assistant_tokens_schedule",
                 f"must be one of {ASSISTANT_SCHEDULES}, got {self.num_assistant_tokens_schedule!r}")
        threshold = self.assistant_confidence_threshold
        if threshold is not None and not (_is_number(threshold) and 0 <= threshold <= 1):
            fail("assistant_confidence_threshold", f"must be a probability in [0, 1] or None, got {threshold!r}")
        compile_config = self.compile_config
        if compile_config is not None and type(compile_config).__name__ != "CompileConfig":
            fail("compile_config", f"must be a CompileConfig, got {type(compile_config).__name__}")
        weight = self.assistant_ensemble_weight
        if weight is not None and not (_is_number(weight) and 0 < weight < 1):
            fail("assistant_ensemble_weight", f"must be in the open interval (0, 1), or None for lossless "
                 f"verification, got {weight!r}")
        for name in ("min_length", "min_new_tokens", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
                     "assistant_lookbehind", "target_lookbehind"):
            v = getattr(self, name)
            if v is not None and not (_is_int(v) and v >= 0):
                fail(name, f"must be a non-negative integer, got {v!r}")
        if self.early_stopping not in (True, False, "never"):
            fail("early_stopping", f"must be True, False or 'never', got {self.early_stopping!r}")
        if self.cache_implementation not in (None, *CACHE_IMPLEMENTATIONS):
            fail("cache_implementation", f"must be one of {CACHE_IMPLEMENTATIONS}, got {self.cache_implementation!r}")
        if self.max_time is not None and not (_is_number(self.max_time) and self.max_time >= 0):
            fail("max_time", f"must be a non-negative number of seconds, got {self.max_time!r}")
        if not (_is_number(self.repetition_penalty) and self.repetition_penalty > 0):
            fail("repetition_penalty", f"must be a positive number, got {self.repetition_penalty!r}")
        penalty = self.encoder_repetition_penalty
        if penalty is not None and not (_is_number(penalty) and penalty > 0):
            fail("encoder_repetition_penalty", f"must be a positive number, got {penalty!r}")
        if self.disable_compile not in (None, True, False):
            fail("disable_compile", f"must be True, False or None, got {self.disable_compile!r}")
        if not _is_number(self.length_penalty):
            fail("length_penalty", f"must be a number, got {self.length_penalty!r}")
        if self.guidance_scale is not None and not _is_number(self.guidance_scale):
            fail("guidance_scale", f"must be a number, got {self.guidance_scale!r}")
        if self.do_sample:
            if not (_is_number(self.temperature) and self.temperature > 0):
                hint = " (for greedy decoding set do_sample=False)" if self.temperature == 0 else ""
                fail("temperature", f"must be a positive number when do_sample=True, got {self.temperature!r}{hint}")
            if not (_is_number(self.top_p) and 0 <= self.top_p <= 1):  # (0: the top token, as Transformers)
                fail("top_p", f"must be in [0, 1], got {self.top_p!r}")
            if self.top_k is not None and not (_is_int(self.top_k) and self.top_k >= 0):
                fail("top_k", f"must be a non-negative integer (0 disables it), got {self.top_k!r}")
            if self.min_p is not None and not (_is_number(self.min_p) and 0 <= self.min_p <= 1):
                fail("min_p", f"must be in [0, 1], got {self.min_p!r}")
            if self.top_h is not None and not (_is_number(self.top_h) and 0 < self.top_h <= 1):
                fail("top_h", f"must be in (0, 1], got {self.top_h!r}")
            if not (_is_number(self.typical_p) and 0 < self.typical_p <= 1):
                fail("typical_p", f"must be in (0, 1] (1 disables it), got {self.typical_p!r}")
            for name in ("epsilon_cutoff", "eta_cutoff"):
                v = getattr(self, name)
                if not (_is_number(v) and 0 <= v < 1):
                    fail(name, f"must be in [0, 1) (0 disables it), got {v!r}")
        if self.num_return_sequences > 1:
            if self.num_beams == 1 and not self.do_sample:
                fail("num_return_sequences", f"must be 1 with greedy decoding, got {self.num_return_sequences} "
                     "(use num_beams > 1 or do_sample=True)")
            if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
                fail("num_return_sequences", f"({self.num_return_sequences}) must be <= num_beams ({self.num_beams})")
        if self.cache_config is not None and not isinstance(self.cache_config, dict):
            fail("cache_config", f"must be a dict, got {self.cache_config!r}")
        # A negative pad or EOS id is taken, as Transformers takes it (its own tests pass -1 to
        # generate to the maximum length): an EOS id that no token matches, a pad id that `generate`
        # writes into the output but never feeds to the model (`GenerationMixin._sample`).
        if self.pad_token_id is not None and not _is_int(self.pad_token_id):
            fail("pad_token_id", f"must be an integer, got {self.pad_token_id!r}")
        for name in ("bos_token_id", "forced_bos_token_id"):
            v = getattr(self, name)
            if v is not None and not (_is_int(v) and v >= 0):
                fail(name, f"must be a non-negative integer, got {v!r}")
        for name in ("eos_token_id", "forced_eos_token_id"):
            eos = getattr(self, name)
            if isinstance(eos, torch.Tensor):  # as Transformers takes it; kept as ids
                eos = eos.tolist()
                object.__setattr__(self, name, eos)
            if eos is not None:
                ids = [eos] if _is_int(eos) else eos
                signed = name == "eos_token_id"
                if not (isinstance(ids, (list, tuple)) and ids and all(_is_int(i) and (signed or i >= 0) for i in ids)):
                    kind = "an integer" if signed else "a non-negative integer"
                    fail(name, f"must be {kind} or a non-empty list of them, got {eos!r}")
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (list, tuple)) and all(_is_int(i) and i >= 0 for i in v)):
                fail(name, f"must be a list of non-negative token ids, got {v!r}")
        if isinstance(self.watermarking_config, dict):
            object.__setattr__(self, "watermarking_config", WatermarkingConfig.from_dict(self.watermarking_config))
        elif self.watermarking_config is not None and not isinstance(self.watermarking_config, WatermarkingConfig):
            to_dict = getattr(self.watermarking_config, "to_dict", None)  # Transformers' config
            if to_dict is None:
                fail("watermarking_config", f"must be a WatermarkingConfig or a dict, got {self.watermarking_config!r}")
            object.__setattr__(self, "watermarking_config", WatermarkingConfig.from_dict(to_dict()))
        if self.watermarking_config is not None:
            self.watermarking_config.validate()
        if self.suppress_tokens is not None:  # all logits -inf at the forced step: nan probabilities
            for name in ("forced_bos_token_id", "forced_eos_token_id"):
                forced = getattr(self, name)
                forced = set() if forced is None else {forced} if _is_int(forced) else set(forced)
                if forced and forced <= set(self.suppress_tokens):
                    fail(name, f"({sorted(forced)}) is suppressed too (suppress_tokens): the forced step "
                         "would leave no token to pick")
        decay = self.exponential_decay_length_penalty
        if decay is not None and not (isinstance(decay, (list, tuple)) and len(decay) == 2 and _is_number(decay[0])
                                      and decay[0] >= 0 and _is_number(decay[1]) and decay[1] > 0):
            fail("exponential_decay_length_penalty",
                 f"must be (start index >= 0, decay factor > 0), got {decay!r}")
        if not isinstance(self.remove_invalid_values, bool):
            fail("remove_invalid_values", f"must be True or False, got {self.remove_invalid_values!r}")
        if self.bad_words_ids is not None:
            ok = isinstance(self.bad_words_ids, list) and self.bad_words_ids and all(
                isinstance(w, list) and w and all(_is_int(i) and i >= 0 for i in w) for w in self.bad_words_ids
            )
            if not ok:
                fail("bad_words_ids", f"must be a non-empty list of token id lists, got {self.bad_words_ids!r}")
        if self.stop_strings is not None:
            s = [self.stop_strings] if isinstance(self.stop_strings, str) else self.stop_strings
            if not (isinstance(s, (list, tuple)) and s and all(isinstance(x, str) and x for x in s)):
                fail("stop_strings", f"must be a non-empty string or list of them, got {self.stop_strings!r}")

    # ---- construction and I/O --------------------------------------------------------------
    @classmethod
    def from_model_config(cls, model_config: Any) -> GenerationConfig:
        """The generation settings a model config carries, as Transformers takes them: every
        generation field it holds a value for (its special tokens, `use_cache`, the output flags,
        ...), set explicitly (so saved); an output flag that is on turns `return_dict_in_generate`
        on. Marked as made from the model config (`_from_model_config` in the saved file)."""
        data = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
        # the generation settings its config.json carried, which the config itself does not keep
        data.update(getattr(model_config, "_generation_settings", None) or {})
        config = cls(**{k: data[k] for k in DEFAULTS if data.get(k) is not None})
        if not config.return_dict_in_generate and any(
                getattr(config, flag) for flag in ("output_attentions", "output_hidden_states", "output_scores",
                                                   "output_logits")):
            config.return_dict_in_generate = True
        object.__setattr__(config, "_from_model_config", True)
        object.__setattr__(config, "_read_as", config.to_json_string())
        return config

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> GenerationConfig:
        config = cls(**{**config_dict, **kwargs})
        object.__setattr__(config, "_read_as", config.to_json_string())  # (save_pretrained: changed since?)
        return config

    @classmethod
    def from_pretrained(cls, pretrained_model_name: str | os.PathLike, config_file_name: str | None = None,
                        **kwargs: Any) -> GenerationConfig:
        """Read `generation_config.json` from a directory (or a path to the json file itself)."""
        path = checkpoint_path(pretrained_model_name, CONFIG_PATTERNS, **hub_options(kwargs))
        if os.path.isdir(path):
            path = os.path.join(path, config_file_name or GENERATION_CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {GENERATION_CONFIG_NAME} at {path}")
        from ..configuration import read_json_object

        data = read_json_object(path, GENERATION_CONFIG_NAME)
        made_from_model_config = bool(data.pop("_from_model_config", False))
        config = cls.from_dict(data, **kwargs)
        object.__setattr__(config, "_from_model_config", made_from_model_config)
        object.__setattr__(config, "_read_as", config.to_json_string())
        return config

    def to_dict(self) -> dict[str, Any]:
        """Every field and unknown key."""
        out = {name: copy.deepcopy(getattr(self, name)) for name in DEFAULTS}
        out.update({name: copy.deepcopy(getattr(self, name)) for name in self._extra})
        if out["watermarking_config"] is not None:
            out["watermarking_config"] = out["watermarking_config"].to_dict()
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """The fields set explicitly or holding other values than their defaults, and the unknown
        keys (what `save_pretrained` writes): Transformers 5 writes each field given a value."""
        return {k: v for k, v in self.to_dict().items() if k not in DEFAULTS or v != DEFAULTS[k] or self.is_set(k)}

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        """Write `to_json_string(use_diff)` to a file, as Transformers' method."""
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string(use_diff=use_diff))

    def to_json_string(self, use_diff: bool = True) -> str:
        """The JSON of the fields (those of `to_diff_dict` with `use_diff`), without `compile_config`,
        which Transformers does not write either, nor the `transformers_version` of a file read (kept
        for what it decides, `uses_model_defaults`: moetorch writes no version of Transformers);
        `_from_model_config` where the model config made it."""
        fields = self.to_diff_dict() if use_diff else self.to_dict()
        fields.pop("compile_config", None)
        fields.pop("transformers_version", None)
        if getattr(self, "_from_model_config", False):
            fields["_from_model_config"] = True
        bias = fields.get("sequence_bias")
        if isinstance(bias, dict):  # {tuple: bias} as the [[token ids], bias] pairs both libraries read back
            keys = [sequence_bias_key(seq) for seq in bias]
            fields["sequence_bias"] = [[list(k) if isinstance(k, (tuple, list)) else k, b]
                                       for k, b in zip(keys, bias.values())]
        return json.dumps(_string_keys(fields), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike, config_file_name: str | None = None) -> None:
        """Write `generation_config.json` (non-default fields only) into `save_directory`. A negative
        `pad_token_id`, which `generate` takes, is not saved: Transformers refuses it there too."""
        if self.pad_token_id is not None and self.pad_token_id < 0:
            raise ValueError(f"GenerationConfig: `pad_token_id` is {self.pad_token_id}: generate takes a negative "
                             "pad id, but it is not saved (Transformers refuses it too)")
        # as Transformers: a config changed since it was read (or made here) saves only without issues
        try:
            self.validate(strict=self.__dict__.get("_read_as") != self.to_json_string())
        except ValueError as e:
            raise ValueError(f"{e}\n\nFix these issues to save the configuration.") from None
        if os.path.isfile(save_directory):
            raise ValueError(f"save_pretrained expects a directory, but {save_directory} is a file")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, config_file_name or GENERATION_CONFIG_NAME)
        text = self.to_json_string()  # (a value JSON cannot hold fails here, before a file is opened)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)

    def update(self, defaults_only: bool = False, allow_custom_entries: bool = False, **kwargs: Any) -> dict[str, Any]:
        """Set the given fields; return the keys that are not fields (they are left untouched).
        Transformers 5's options: `defaults_only` sets only the fields not set explicitly,
        `allow_custom_entries` keeps unknown keys too."""
        unused = {}
        for name, value in kwargs.items():
            if name in DEFAULTS or name in self._extra or allow_custom_entries:
                # (a default given for a field that holds it already changes nothing, nor marks it set)
                if not (defaults_only and (self.is_set(name) or getattr(self, name, None) == value)):
                    setattr(self, name, value)
            else:
                unused[name] = value
        return unused

    @staticmethod
    def _get_default_generation_params() -> dict[str, Any]:
        """Transformers 5's global defaults of the fields it leaves unset (None): here every field
        holds its default already, so these are the defaults themselves."""
        return copy.deepcopy(DEFAULTS)

    def copy(self) -> GenerationConfig:
        return copy.deepcopy(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GenerationConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"GenerationConfig {self.to_json_string()}"


def _string_keys(value: Any) -> Any:
    """`value` with every dict key written as a string (JSON's keys), as Transformers writes them."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): _string_keys(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_string_keys(v) for v in value]
    return value


def as_generation_config(config: Any, what: str = "generation_config") -> GenerationConfig:
    """`config` itself, or a moetorch GenerationConfig of the fields set on a Transformers
    `GenerationConfig` (a script may still import that one); anything else is a TypeError that
    names `what`."""
    if isinstance(config, GenerationConfig):
        return config
    kind = type(config)
    if kind.__name__ == "GenerationConfig" and kind.__module__.startswith("transformers.") and hasattr(
            config, "to_diff_dict"):
        fields = {k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in config.to_diff_dict().items()
                  if k not in ("transformers_version", "_from_model_config", "_commit_hash")}
        return GenerationConfig(**fields)
    raise TypeError(f"{what} must be a moetorch GenerationConfig (or Transformers' own), got "
                    f"{kind.__module__}.{kind.__qualname__}")
