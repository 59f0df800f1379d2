"""Tokenizer on the `tokenizers` library, with Transformers' fast-tokenizer interface and jinja2
chat templates.

`Tokenizer.from_pretrained(dir)` reads tokenizer.json, tokenizer_config.json (special tokens,
chat_template, padding side), special_tokens_map.json, and chat_template.jinja and
additional_chat_templates/*.jinja (named templates) when present.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import operator
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tokenizers import AddedToken

from .chat_template import (
    assistant_masks,
    compile_template,
    mark_control_tokens,
    plain_data,
    render_chat,
    template_literals,
    token_patterns,
    tool_schema,
    warn_once,
)
from .configuration import CONFIG_NAME
from .defaults import checkpoint_path
from .hub import TOKENIZER_PATTERNS, PushToHubMixin, hub_options

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"  # Transformers 5's named templates besides "default": <name>.jinja
# Transformers 5's named special tokens, in its order (all_special_tokens lists them so)
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Tokenizer-loading options that have no meaning for a local fast tokenizer.
_IGNORED_KWARGS = {"trust_remote_code", "use_fast"}  # the Hub's options go to moetorch.hub
# Per-token keys that pad() pads besides input_ids and attention_mask, with their pad values (Transformers')
_PAD_VALUES = {"token_type_ids": 0, "special_tokens_mask": 1}

# A Phi-3.5-style template, used by `moetorch train-tokenizer` and tests.
PHI35_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] and message['content'] %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


class CharSpan(NamedTuple):
    """Characters [start, end) of the original text (Transformers' CharSpan)."""

    start: int
    end: int


class TokenSpan(NamedTuple):
    """Tokens [start, end) of an encoding (Transformers' TokenSpan)."""

    start: int
    end: int


class BatchEncoding(dict):
    """`input_ids` and `attention_mask` (lists, tensors or numpy arrays), readable as keys and
    attributes; from a tokenizer call it also keeps the `tokenizers.Encoding` of each row
    (`enc[i]`, `enc.tokens(i)`, `enc.word_ids(i)`, `enc.char_to_token(...)`), as Transformers' fast
    tokenizers do. Built by hand it takes Transformers' arguments (`tensor_type`, ...)."""

    def __init__(self, data: Mapping | None = None, encoding: Any = None, tensor_type: str | None = None,
                 prepend_batch_axis: bool = False, n_sequences: int | None = None, *,
                 encodings: list | None = None) -> None:
        super().__init__(data or {})
        encodings = encoding if encodings is None else encodings
        if encodings is not None and not isinstance(encodings, (list, tuple)):  # one tokenizers.Encoding
            encodings = [encodings]
        self._encodings = encodings
        if n_sequences is None and encodings:
            n_sequences = encodings[0].n_sequences
        self._n_sequences = n_sequences
        self.convert_to_tensors(tensor_type, prepend_batch_axis)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, str):
            return super().__getitem__(item)
        if self._encodings is not None:  # an int or slice gives the rows' Encodings, as Transformers
            return self._encodings[item]
        if isinstance(item, slice):
            return {k: v[item] for k, v in self.items()}
        raise KeyError(f"BatchEncoding keys are strings (input_ids, ...), slices, or integers for the rows' "
                       f"tokenizers.Encoding (only from a tokenizer call); got {item!r}")

    @property
    def data(self) -> BatchEncoding:
        return self

    @property
    def encodings(self) -> list | None:
        return self._encodings

    def _encoding(self, batch_index: int, method: str):
        if not self._encodings:
            raise ValueError(f"{method}() needs the encodings of a tokenizer call; this BatchEncoding has none")
        return self._encodings[batch_index]

    def tokens(self, batch_index: int = 0) -> list[str]:
        return self._encoding(batch_index, "tokens").tokens

    def word_ids(self, batch_index: int = 0) -> list[int | None]:
        return self._encoding(batch_index, "word_ids").word_ids

    def sequence_ids(self, batch_index: int = 0) -> list[int | None]:
        return self._encoding(batch_index, "sequence_ids").sequence_ids

    @property
    def is_fast(self) -> bool:
        """Whether the rows' `tokenizers.Encoding`s are kept (a tokenizer call's result)."""
        return self._encodings is not None

    @property
    def n_sequences(self) -> int | None:
        """1 for single texts, 2 for pairs; None when unknown."""
        return self.__dict__.get("_n_sequences")

    def _row(self, method: str, batch_or_index: int, index: int | None, token: bool = False):
        # Transformers' convention: (index) reads the first row, (batch_index, index) another; a
        # negative token index counts from the row's end (Transformers 5.23 fails on one)
        batch, index = (0, batch_or_index) if index is None else (batch_or_index, index)
        encoding = self._encoding(batch, method)
        return encoding, index + len(encoding.ids) if token and index < 0 else index

    def token_to_sequence(self, batch_or_token_index: int, token_index: int | None = None) -> int | None:
        """The sequence (0, or 1 for a pair's second text) of a token; None for added special tokens."""
        encoding, i = self._row("token_to_sequence", batch_or_token_index, token_index, token=True)
        return encoding.token_to_sequence(i)

    def token_to_word(self, batch_or_token_index: int, token_index: int | None = None) -> int | None:
        """The index of a token's word in its text; None for added special tokens."""
        encoding, i = self._row("token_to_word", batch_or_token_index, token_index, token=True)
        return encoding.token_to_word(i)

    def token_to_chars(self, batch_or_token_index: int, token_index: int | None = None) -> CharSpan | None:
        """A token's characters in its text; None for added special tokens."""
        encoding, i = self._row("token_to_chars", batch_or_token_index, token_index, token=True)
        span = encoding.token_to_chars(i)
        return None if span is None else CharSpan(*span)

    def word_to_tokens(self, batch_or_word_index: int, word_index: int | None = None,
                       sequence_index: int = 0) -> TokenSpan | None:
        """The tokens of a word of text `sequence_index` (1: a pair's second); None when it has none."""
        encoding, i = self._row("word_to_tokens", batch_or_word_index, word_index)
        span = encoding.word_to_tokens(i, sequence_index)
        return None if span is None else TokenSpan(*span)

    def word_to_chars(self, batch_or_word_index: int, word_index: int | None = None,
                      sequence_index: int = 0) -> CharSpan:
        """The characters of a word of text `sequence_index` (a TypeError for a word past the end, as
        in Transformers)."""
        encoding, i = self._row("word_to_chars", batch_or_word_index, word_index)
        return CharSpan(*encoding.word_to_chars(i, sequence_index))

    def char_to_token(self, batch_or_char_index: int, char_index: int | None = None,
                      sequence_index: int = 0) -> int | None:
        """The token holding a character of text `sequence_index`; None when none does."""
        encoding, i = self._row("char_to_token", batch_or_char_index, char_index)
        return encoding.char_to_token(i, sequence_index)

    def char_to_word(self, batch_or_char_index: int, char_index: int | None = None,
                     sequence_index: int = 0) -> int | None:
        """The word holding a character of text `sequence_index`; None when none does."""
        encoding, i = self._row("char_to_word", batch_or_char_index, char_index)
        return encoding.char_to_word(i, sequence_index)

    def convert_to_tensors(self, tensor_type: str | None = None, prepend_batch_axis: bool = False) -> BatchEncoding:
        """Make the values torch tensors ("pt") or numpy arrays ("np") in place, each in a batch of
        one with `prepend_batch_axis`; rows of different lengths are a ValueError (pad them)."""
        if tensor_type is None:
            return self
        tensor_type = getattr(tensor_type, "value", tensor_type)  # Transformers' TensorType
        if tensor_type not in ("pt", "np"):
            raise ValueError(f"tensor_type must be 'pt', 'np' or None, got {tensor_type!r}")
        for key, value in self.items():
            value = [value] if prepend_batch_axis else value
            if torch.is_tensor(value) if tensor_type == "pt" else isinstance(value, np.ndarray):
                continue
            empty = _no_values(value)  # an empty list of ids is int64, as in Transformers
            try:
                if tensor_type == "np":
                    self[key] = np.asarray(value, dtype=np.int64 if empty else None)
                elif isinstance(value, list) and value and isinstance(value[0], np.ndarray):
                    self[key] = torch.from_numpy(np.array(value))
                else:
                    self[key] = torch.tensor(value, dtype=torch.int64 if empty else None)
            except (ValueError, TypeError, RuntimeError) as e:
                raise ValueError(f"cannot make {tensor_type!r} tensors of {key!r}: rows of different lengths need "
                                 f"padding=True (and truncation=True); {e}") from e
        return self

    def to(self, device: torch.device | str | int, *, non_blocking: bool = False) -> BatchEncoding:
        """Move the tensors to `device` in place and return self; a dtype is refused with a warning
        (token ids must stay integers), as Transformers does."""
        if not isinstance(device, (str, int, torch.device)):
            logger.warning(f"Attempting to cast a BatchEncoding to type {device}. This is not supported.")
            return self
        for k, v in self.items():
            if torch.is_tensor(v):
                self[k] = v.to(device=device, non_blocking=non_blocking)
        return self


def _no_values(value: Any) -> bool:
    # an empty list, or lists of empty lists (Transformers' test for an int64 dtype)
    return isinstance(value, (list, tuple)) and (not value or isinstance(value[0], (list, tuple)) and
                                                 all(_no_values(v) for v in value))


def _token_text(tok: Any) -> str | None:
    if tok is None or isinstance(tok, str):
        return tok
    if isinstance(tok, AddedToken):
        return tok.content
    if isinstance(tok, dict):  # {"content": "<s>", "lstrip": ..., ...} as Transformers writes
        return tok.get("content")
    raise ValueError(f"special token must be a string or a dict with 'content', got {tok!r}")


def _token_value(tok: Any) -> str | AddedToken | None:
    # a special token as given: a string, or an AddedToken (one written as a dict becomes one), whose
    # lstrip / rstrip / ... Transformers keeps for a token it adds
    if isinstance(tok, dict) and tok.get("content") is not None:
        return AddedToken(tok["content"], **{k: bool(tok[k]) for k in ("single_word", "lstrip", "rstrip", "normalized",
                                                                      "special") if k in tok})
    return tok if isinstance(tok, AddedToken) else _token_text(tok)


def _to_py(x: Any) -> Any:
    # tensors, numpy arrays and scalars as Python ints / lists
    if torch.is_tensor(x) or isinstance(x, (np.ndarray, np.generic)):
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return [_to_py(v) for v in x]
    return x


class Tokenizer(PushToHubMixin):
    """A fast tokenizer with the calls a Transformers script makes: `__call__`, `encode`,
    `tokenize`, `decode`, `batch_decode`, `pad`, `apply_chat_template`, `add_tokens`,
    special-token attributes and padding."""

    model_input_names = ["input_ids", "attention_mask"]
    # the named special-token attributes, as Transformers lists them
    SPECIAL_TOKENS_ATTRIBUTES = list(SPECIAL_NAMES)
    # the files a fast tokenizer is read from, by the names Transformers gives them
    vocab_files_names = {"tokenizer_file": TOKENIZER_FILE}
    is_fast = True
    pad_token_type_id = 0
    split_special_tokens = False

    def __init__(
        self,
        tokenizer_object,
        *,
        bos_token: str | AddedToken | None = None,
        eos_token: str | AddedToken | None = None,
        unk_token: str | AddedToken | None = None,
        pad_token: str | AddedToken | None = None,
        sep_token: str | AddedToken | None = None,
        cls_token: str | AddedToken | None = None,
        mask_token: str | AddedToken | None = None,
        extra_special_tokens: list[str | AddedToken] | dict[str, str | AddedToken] | None = None,
        model_specific_special_tokens: dict[str, str | AddedToken] | None = None,
        chat_template: str | dict[str, str] | None = None,
        padding_side: str = "right",
        truncation_side: str = "right",
        model_max_length: int | None = None,
        clean_up_tokenization_spaces: bool = False,
        split_special_tokens: bool = False,
        name_or_path: str = "",
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        self._tok = tokenizer_object
        self._tok.no_padding()
        self._tok.no_truncation()
        self._special: dict[str, Any] = {}
        # named model-specific special tokens ({"image_token": "<image>"}): attributes `image_token`
        # and `image_token_id`, in special_tokens_map, as Transformers 5 keeps them
        self._named: dict[str, Any] = {}
        self._add_bos_token = self._add_eos_token = False  # as Transformers reports them unless set
        for name, value in zip(SPECIAL_NAMES, (bos_token, eos_token, unk_token, sep_token, pad_token, cls_token,
                                               mask_token)):
            setattr(self, name, value)
        if isinstance(extra_special_tokens, dict):  # Transformers 5: a dict names its tokens
            model_specific_special_tokens = {**(model_specific_special_tokens or {}), **extra_special_tokens}
            extra_special_tokens = None
        self.extra_special_tokens = extra_special_tokens
        for name, value in (model_specific_special_tokens or {}).items():
            if name in SPECIAL_NAMES:  # {"pad_token": ...} in such a dict sets that token, as in Transformers
                setattr(self, name, value)
            else:
                self._set_named(name, value)
        self.chat_template = chat_template
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = model_max_length or int(1e30)
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.name_or_path = name_or_path
        self._extra_config = dict(extra_config or {})
        self.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = bool(
            self._extra_config.pop("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))
        self.split_special_tokens = bool(split_special_tokens)
        self._tok.encode_special_tokens = self.split_special_tokens
        # what a Transformers script reads back from init_kwargs (from_pretrained gives the config's)
        self.init_kwargs = {**self.special_tokens_map, "extra_special_tokens": self.extra_special_tokens,
                            "chat_template": chat_template, "padding_side": padding_side,
                            "truncation_side": truncation_side, "model_max_length": model_max_length,
                            "clean_up_tokenization_spaces": clean_up_tokenization_spaces,
                            "split_special_tokens": self.split_special_tokens, "name_or_path": name_or_path,
                            **self._extra_config}
        self._register_special_tokens()

    def _register_special_tokens(self) -> None:
        """Make the special tokens added tokens, as Transformers 5 does on construction: a named one
        (bos_token, ..., a model-specific one) that is an ordinary vocabulary entry, or an added one
        marked special=false, becomes an added special token; an extra one missing from the added
        tokens is added (special, unless it is an AddedToken that says otherwise)."""
        added = {t.content: t for t in self._tok.get_added_tokens_decoder().values()}
        named = [*(self._special.get(n) for n in SPECIAL_NAMES), *self._named.values()]
        names = {str(t) for t in named if t is not None}
        tokens: dict[str, AddedToken] = {}
        for value in [*named, *self._extra_special]:
            text = None if value is None else str(value)
            if text is None or text in tokens or text in added and (added[text].special or text not in names):
                continue
            base = added.get(text, value)
            tokens[text] = AddedToken(text, special=True, normalized=False) if isinstance(base, str) else AddedToken(
                text, single_word=base.single_word, lstrip=base.lstrip, rstrip=base.rstrip,
                normalized=base.normalized, special=base.special or text in names)
        if tokens:
            self._tok.add_tokens(list(tokens.values()))

    # ---- loading and saving ------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> Tokenizer:
        """Load from a directory holding tokenizer.json (and optionally tokenizer_config.json), as
        Transformers 5 loads it: keywords override the config, tokenizer.json's truncation / padding
        sections give truncation_side, padding_side and pad_token where the config does not, and every
        special token becomes an added special token."""
        from tokenizers import Tokenizer as RustTokenizer

        directory = Path(checkpoint_path(path, TOKENIZER_PATTERNS, **hub_options(kwargs)))
        file = directory / TOKENIZER_FILE
        if not directory.is_dir():
            raise FileNotFoundError(f"{path!r} is not a directory (a tokenizer is a directory with {TOKENIZER_FILE})")
        if not file.exists():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory} (moetorch reads fast tokenizers only)")
        text = file.read_text(encoding="utf-8")
        try:
            rust = RustTokenizer.from_str(text)
        except Exception as e:
            raise ValueError(f"{file} is not a valid tokenizers file: {e}") from e
        config = _read_json(directory / CONFIG_FILE)
        for key, value in _read_json(directory / SPECIAL_MAP_FILE).items():
            config.setdefault(key, value)
        templates = _read_templates(directory)  # the template files take the config's place, as in Transformers
        if templates:
            config["chat_template"] = templates["default"] if list(templates) == ["default"] else templates
        for key in list(kwargs):
            if key in _IGNORED_KWARGS:
                kwargs.pop(key)
        # the pipeline and padding side follow the class: LlamaTokenizer's, or the one the config names
        # (a `tokenizer_class` keyword is only kept, as in Transformers)
        model_config = kwargs.pop("config", None)
        llama = kwargs.pop(_LLAMA_CLASS_KWARG, False) or (
            config.get("tokenizer_class") in LLAMA_CLASSES
            and _model_type(model_config, directory) not in NAMED_CLASS_OVERRIDDEN)
        config.update(kwargs)
        # tokenizer.json's truncation and padding sections are defaults for what the config does not
        # set, as in Transformers 5: the sides and pad_token take effect, the rest is only kept (init_kwargs)
        from_file: dict[str, Any] = {}
        if rust.truncation:
            t = rust.truncation
            from_file.update(max_length=t["max_length"], truncation_side=t["direction"], stride=t["stride"],
                             truncation_strategy=t["strategy"])
        if rust.padding:
            p = rust.padding
            from_file.update(pad_token=p["pad_token"], pad_token_type_id=p["pad_type_id"],
                             padding_side=p["direction"], pad_to_multiple_of=p["pad_to_multiple_of"])
            from_file.setdefault("max_length", p["length"])
        for key in ("truncation_side", "padding_side", "pad_token"):
            if key in from_file:
                config.setdefault(key, from_file[key])
        listed = _listed_tokens(config, file)
        if llama:
            for name, default in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")):
                config.setdefault(name, default)  # LlamaTokenizer's defaults
            rust = _as_llama_tokenizer(rust, config, json.loads(text).get("model", {}), file, listed)
        elif listed:
            # Transformers 5 adds the config's tokens again, in id order: their lstrip / rstrip / special /
            # ... flags replace tokenizer.json's (a chat token that strips the whitespace after it)
            rust.add_tokens([copy.copy(v) for _, v in sorted(listed.items())])
        known = {"chat_template", "padding_side", "truncation_side", "model_max_length", "clean_up_tokenization_spaces",
                 "extra_special_tokens", "additional_special_tokens", "add_bos_token", "add_eos_token",
                 "model_specific_special_tokens", "split_special_tokens"}
        specials = {name: _token_value(config.get(name)) for name in SPECIAL_NAMES}
        # Named model-specific tokens, as Transformers 5 reads them: other `*_token` keys holding a
        # token (a string, or an AddedToken written with its "__type"), then an `extra_special_tokens`
        # dict; the `model_specific_special_tokens` dict it also writes counts only without either
        # (it keeps that dict as loaded when a token changes, and the keys are then the truth).
        named = {k: v for k, v in config.items() if k.endswith("_token") and k not in SPECIAL_NAMES and
                 (isinstance(v, (str, AddedToken)) or (isinstance(v, dict) and v.get("__type") == "AddedToken"))}
        named_keys = set(named)
        # Transformers 5 writes `extra_special_tokens`; older files (and Transformers 4) `additional_special_tokens`
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(config.get("extra_special_tokens"), dict):
            named.update(config["extra_special_tokens"])
            extra = config.get("additional_special_tokens") or []
        saved = config.get("model_specific_special_tokens")
        if saved is not None and not isinstance(saved, dict):
            raise ValueError(f"model_specific_special_tokens must be a dict of named tokens, got {saved!r}")
        if not named and saved:
            named = dict(saved)
        if not isinstance(extra, (list, tuple)):
            raise ValueError(f"extra_special_tokens must be a list of tokens or a dict of named tokens, got {extra!r}")
        extra = [_token_value(t) for t in extra]
        named = {k: _token_value(v) for k, v in named.items()}
        template = config.get("chat_template")
        if isinstance(template, (list, tuple)):  # several named templates, as tokenizer_config.json lists them
            template = {t["name"]: t["template"] for t in template}
        rest = {k: v for k, v in config.items() if k not in known and k not in SPECIAL_NAMES and k not in named}
        tok = cls(
            rust,
            **specials,
            extra_special_tokens=extra,
            model_specific_special_tokens=named,
            chat_template=template,
            padding_side=config.get("padding_side", "left" if llama else "right"),  # LlamaTokenizer's: left
            truncation_side=config.get("truncation_side", "right"),
            model_max_length=config.get("model_max_length"),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            split_special_tokens=bool(config.get("split_special_tokens", False)),
            name_or_path=str(path),
            extra_config=rest,
        )
        flags = ("add_bos_token", "add_eos_token")
        tokens_set = all(tok._special.get(k[4:]) is not None for k in flags if config.get(k))
        if any(k in kwargs for k in flags):  # Transformers 5: these replace the config's; one not passed is False
            tok._add_bos_token, tok._add_eos_token = (bool(kwargs.get(k, False)) for k in flags)
            tok.update_post_processor()
        elif any(k in config for k in flags) and tokens_set:
            # moetorch applies the config's where their tokens are set (docs/differences.md), keeping
            # tokenizer.json's post-processor (its pair template too) where it adds just what they say
            tok._add_bos_token, tok._add_eos_token = (bool(config.get(k)) for k in flags)
            if rust.post_processor is None or not tok._post_processor_adds_flags():
                tok.update_post_processor()
        elif rust.post_processor is None:  # Transformers 5 builds one (a pair's second text gets type id 1)
            tok.update_post_processor()
        # init_kwargs as Transformers 5 keeps them: the config (its own add_bos/eos_token dropped) and
        # keywords, the extra special tokens under their new name, model-specific ones in a dict
        init = {k: v for k, v in config.items() if k != "tokenizer_class" and k not in named_keys
                and (k not in flags or k in kwargs)}
        init.update({k: v for k, v in specials.items() if k in init})
        if "additional_special_tokens" in init and not init.get("extra_special_tokens"):
            init["extra_special_tokens"] = init.pop("additional_special_tokens")
        if isinstance(init.get("extra_special_tokens"), dict):
            init.pop("extra_special_tokens")
        if named:
            init["model_specific_special_tokens"] = named
        # the config's tokens as it lists them, else all of them as loaded
        added = listed or dict(sorted(tok._tok.get_added_tokens_decoder().items()))
        tok.init_kwargs = {**init, **{k: v for k, v in from_file.items() if k not in init}, "name_or_path": str(path),
                           "added_tokens_decoder": added}
        return tok

    def _post_processor_adds_flags(self) -> bool:
        # whether the post-processor puts just bos_token before a text and eos_token after it, as
        # add_bos_token / add_eos_token say
        try:
            plain, full = (self._tok.encode("a", add_special_tokens=special).ids for special in (False, True))
        except Exception:
            return False
        want = [self.bos_token_id] * self._add_bos_token + plain + [self.eos_token_id] * self._add_eos_token
        return bool(plain) and full == want

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> tuple[str, ...]:
        """Write tokenizer.json and tokenizer_config.json as Transformers 5 writes them (the extra
        special tokens as `extra_special_tokens`); returns the files written."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / TOKENIZER_FILE))
        config = {k: v for k, v in self._extra_config.items() if k not in ("added_tokens_decoder",)}
        config.update(self.special_tokens_map)
        if self._extra_special:
            config["extra_special_tokens"] = self.extra_special_tokens
        if self._named:  # each as a key of its own too (above), as Transformers 5 writes them
            config["model_specific_special_tokens"] = {k: str(v) for k, v in self._named.items() if v is not None}
        config.update(
            tokenizer_class="PreTrainedTokenizerFast", padding_side=self.padding_side,
            truncation_side=self.truncation_side, clean_up_tokenization_spaces=self.clean_up_tokenization_spaces,
        )
        if self.split_special_tokens:
            config["split_special_tokens"] = True
        if self.model_max_length < int(1e29):
            config["model_max_length"] = self.model_max_length
        if isinstance(self.chat_template, dict):  # named templates: the list both libraries read back
            config["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_template.items()]
        elif self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return str(directory / CONFIG_FILE), str(directory / TOKENIZER_FILE)

    # ---- BOS / EOS added by the post-processor ------------------------------------------------
    @property
    def add_bos_token(self) -> bool:
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value: bool) -> None:
        self._add_bos_token = bool(value)
        self.update_post_processor()

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value: bool) -> None:
        self._add_eos_token = bool(value)
        self.update_post_processor()

    def update_post_processor(self) -> None:
        """Make the post-processor add bos_token / eos_token as `add_bos_token` / `add_eos_token`
        say (each dropped when that token is unset), as Transformers' fast tokenizers do."""
        from tokenizers import processors

        bos = self.bos_token if self._add_bos_token else None
        eos = self.eos_token if self._add_eos_token else None
        self._add_bos_token, self._add_eos_token = bos is not None, eos is not None
        single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
        specials = [(t, self.convert_tokens_to_ids(t)) for t in (bos, eos) if t is not None]
        self._tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    def __repr__(self) -> str:
        added = "".join(f"\n\t{i}: {token!r}," for i, token in self.added_tokens_decoder.items())
        if added:
            added += "\n"
        return (f"{type(self).__name__}(name_or_path='{self.name_or_path}', vocab_size={self.vocab_size}, "
                f"model_max_length={self.model_max_length}, padding_side='{self.padding_side}', "
                f"truncation_side='{self.truncation_side}', special_tokens={self.special_tokens_map}, "
                f"added_tokens_decoder={{{added}}})")

    # ---- vocabulary and special tokens -------------------------------------------------------
    @property
    def backend_tokenizer(self):
        return self._tok

    @property
    def decoder(self):
        """The backend tokenizer's decoder (the `tokenizers` object), as Transformers exposes it."""
        return self._tok.decoder

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=False)

    @property
    def max_len_single_sentence(self) -> int:
        return self.model_max_length - self.num_special_tokens_to_add(pair=False)

    @property
    def max_len_sentences_pair(self) -> int:
        return self.model_max_length - self.num_special_tokens_to_add(pair=True)

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return self._tok.num_special_tokens_to_add(pair)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self.get_vocab()

    def get_special_tokens_mask(self, token_ids_0: Any, token_ids_1: Any = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        """1 for each special token of ids that hold them already (`already_has_special_tokens=True`,
        as data collators call it), else 0. Ids without their special tokens are a
        NotImplementedError, as in Transformers 5's fast tokenizers."""
        if not already_has_special_tokens:
            raise NotImplementedError(f"{type(self).__name__}.get_special_tokens_mask needs ids that hold their "
                                      f"special tokens (already_has_special_tokens=True)")
        if token_ids_1 is not None:
            raise ValueError("get_special_tokens_mask: token_ids_1 must be None with already_has_special_tokens=True "
                             "(the ids hold both sequences already)")
        special = set(self.all_special_ids)
        return [int(int(i) in special) for i in _to_py(token_ids_0)]

    def save_vocabulary(self, save_directory: str | os.PathLike,
                        filename_prefix: str | None = None) -> tuple[str, ...] | None:
        """Write the model's vocabulary files (a BPE model's vocab.json and merges.txt, named
        `{filename_prefix}-...` with a prefix) and return their paths; a save_directory that is not a
        directory is logged and gives None, as in Transformers."""
        if not os.path.isdir(save_directory):
            logger.error(f"Vocabulary path ({save_directory}) should be a directory")
            return None
        return tuple(self._tok.model.save(str(save_directory), filename_prefix))

    def train_new_from_iterator(self, text_iterator: Any, vocab_size: int, length: int | None = None,
                                new_special_tokens: list[str | AddedToken] | None = None,
                                special_tokens_map: dict[str, str] | None = None, **kwargs: Any) -> Tokenizer:
        """A tokenizer like this one (pipeline, special tokens, settings) with a vocabulary the
        `tokenizers` library trains on `text_iterator` (batches of texts), as Transformers trains it:
        this one's special added tokens come first, then `new_special_tokens` (also extra special
        tokens); `special_tokens_map` renames special tokens ({old: new}); `kwargs` go to the trainer."""
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import pre_tokenizers, trainers

        data = json.loads(self._tok.to_str())
        added, post = data.pop("added_tokens"), data.pop("post_processor")
        model, rename = data["model"], special_tokens_map or {}
        kind = model.get("type")
        trainer_class = {"BPE": trainers.BpeTrainer, "Unigram": trainers.UnigramTrainer,
                         "WordLevel": trainers.WordLevelTrainer, "WordPiece": trainers.WordPieceTrainer}.get(kind)
        if trainer_class is None:
            raise ValueError(f"train_new_from_iterator: only BPE, Unigram, WordLevel and WordPiece models train; this "
                             f"tokenizer's is {kind}")
        if kind == "Unigram" and model.get("unk_id") is not None:
            unk = model["vocab"][model["unk_id"]][0]
            kwargs["unk_token"] = unk = rename.get(unk, unk)
            model["unk_id"], model["vocab"] = 0, [[unk, 0.0]]
        elif kind != "Unigram":
            model["vocab"] = {}
            if kind == "BPE":
                model["merges"] = []
                kwargs.update({k: model[k] for k in ("continuing_subword_prefix", "end_of_word_suffix")
                               if k not in kwargs and model.get(k) is not None})
        if model.get("unk_token") in rename:
            model["unk_token"] = rename[model["unk_token"]]
        pre = data.get("pre_tokenizer") or {}
        if pre.get("type") == "ByteLevel" or pre.get("type") == "Sequence" and any(
                p.get("type") == "ByteLevel" for p in pre.get("pretokenizers", [])):
            kwargs["initial_alphabet"] = pre_tokenizers.ByteLevel.alphabet()
        tok = RustTokenizer.from_str(json.dumps(data))
        specials = [AddedToken(**{k: v for k, v in t.items() if k not in ("id", "special", "content")},
                               content=rename.get(t["content"], t["content"]))
                    for t in added if t.get("special") or kind == "Unigram"]
        specials += list(new_special_tokens or [])
        trainer = trainer_class(vocab_size=vocab_size, special_tokens=specials, **kwargs)
        tok.train_from_iterator(text_iterator, trainer=trainer, length=length)

        def trained_id(token: str) -> int:
            i = tok.token_to_id(token)
            if i is None:
                raise ValueError(f"train_new_from_iterator: the post-processor's token {token!r} is not in the trained "
                                 f"vocabulary")
            return i

        if post is not None:  # its special tokens' ids in the new vocabulary
            for entry in post.get("special_tokens", {}).values():
                entry["tokens"] = [rename.get(t, t) for t in entry["tokens"]]
                entry["ids"] = [trained_id(t) for t in entry["tokens"]]
            for key in ("cls", "sep"):
                if key in post:
                    token = rename.get(post[key][0], post[key][0])
                    post[key] = [token, trained_id(token)]
            tok = RustTokenizer.from_str(json.dumps({**json.loads(tok.to_str()), "post_processor": post}))
        # Transformers re-adds the added tokens this one was loaded with (init_kwargs), renamed ones too
        loaded = self.init_kwargs.get("added_tokens_decoder") or {}
        tok.add_tokens([loaded[i] for i in sorted(loaded)])

        def renamed(value: str | AddedToken | None) -> str | AddedToken | None:
            if value is None or str(value) not in rename:
                return value
            if isinstance(value, str):
                return rename[value]
            return AddedToken(rename[str(value)], single_word=value.single_word, lstrip=value.lstrip,
                              rstrip=value.rstrip, normalized=value.normalized, special=True)

        new = type(self)(
            tok, **{name: renamed(self._special.get(name)) for name in SPECIAL_NAMES},
            extra_special_tokens=[*self._extra_special, *(new_special_tokens or [])],
            model_specific_special_tokens=dict(self._named), chat_template=self.chat_template,
            padding_side=self.padding_side, truncation_side=self.truncation_side,
            model_max_length=self.model_max_length if self.model_max_length < int(1e29) else None,
            clean_up_tokenization_spaces=self.clean_up_tokenization_spaces,
            split_special_tokens=self.split_special_tokens, name_or_path=self.name_or_path,
            extra_config=self._extra_config,
        )
        new._add_bos_token, new._add_eos_token = self._add_bos_token, self._add_eos_token  # the post-processor's
        new.init_kwargs = {**self.init_kwargs, **new.init_kwargs}
        return new

    def get_chat_template(self, chat_template: str | None = None, tools: Any = None) -> str:
        """The template apply_chat_template renders: `chat_template` (a template, or the name of one
        of the tokenizer's named templates), else the tokenizer's (of named ones "tool_use" when
        `tools` are given and there is one, else "default")."""
        own = self.chat_template
        if isinstance(own, dict):
            if chat_template is not None:
                return own.get(chat_template, chat_template)
            name = "tool_use" if tools is not None and "tool_use" in own else "default"
            if name not in own:
                raise ValueError(f"this tokenizer has several chat templates and none named 'default': pass "
                                 f"chat_template= a template or one of the names {sorted(own)}")
            return own[name]
        if chat_template is not None:
            return chat_template
        if own is None:
            raise ValueError("this tokenizer has no chat_template: pass chat_template= or set tokenizer.chat_template")
        return own

    def _token_to_id(self, token: str) -> int | None:
        # the unknown token's id for a token outside the vocabulary, as Transformers' fast tokenizers
        i = self._tok.token_to_id(token)
        unk = _token_text(self._special.get("unk_token"))
        return self._tok.token_to_id(unk) if i is None and unk is not None else i

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> str | None | list:
        ids = _to_py(ids)
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tok.id_to_token(int(i)) for i in ids if int(i) not in skip]

    # Transformers' private per-token converters, which its own helpers call on any tokenizer they
    # are handed (StopStringCriteria builds its tables with `_convert_id_to_token`)
    def _convert_id_to_token(self, index: int) -> str | None:
        return self.convert_ids_to_tokens(int(index))

    def _convert_token_to_id(self, token: str) -> int | None:
        return self.convert_tokens_to_ids(token)

    @property
    def extra_special_tokens(self) -> list[str]:
        return [str(t) for t in self._extra_special]

    @extra_special_tokens.setter
    def extra_special_tokens(self, value: list[str | AddedToken] | None) -> None:
        if value is not None and not (isinstance(value, (list, tuple))
                                      and all(isinstance(t, (str, AddedToken)) for t in value)):
            raise ValueError(f"extra_special_tokens must be a list of strings or AddedTokens, got {value!r}")
        self._extra_special = list(value or [])

    @property
    def extra_special_tokens_ids(self) -> list[int | None]:
        return self.convert_tokens_to_ids(self.extra_special_tokens)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set, the model-specific ones after the standard ones
        (Transformers 5: not the extra ones)."""
        standard = {name: getattr(self, name) for name in SPECIAL_NAMES if getattr(self, name) is not None}
        return {**standard, **{name: str(value) for name, value in self._named.items() if value is not None}}

    def _set_named(self, name: str, value: str | AddedToken | None) -> None:
        if not (isinstance(name, str) and name.endswith("_token") and name.isidentifier()):
            raise ValueError(f"a named special token's name must end in _token, got {name!r}")
        if name in SPECIAL_NAMES or name in ("extra_special_tokens",) or hasattr(type(self), name):
            raise ValueError(f"{name!r} cannot name a model-specific special token (it is an attribute already)")
        if value is not None and not isinstance(value, (str, AddedToken)):
            raise ValueError(f"special token {name} must be a string, an AddedToken or None, got {value!r}")
        self._named[name] = value  # None: unset (the name stays known)

    @staticmethod
    def _named_key(name: str) -> tuple[str, bool]:
        # `image_token_id` / `image_token_ids` -> ("image_token", True), as Transformers' suffixes
        for suffix in ("_ids", "_id"):
            if name.endswith(suffix):
                return name[: -len(suffix)], True
        return name, False

    def __getattr__(self, name: str) -> Any:
        # a named model-specific special token (`image_token`) and its id (`image_token_id`)
        named = self.__dict__.get("_named", {})
        key, as_id = self._named_key(name)
        if key in named:
            value = named[key]
            if value is None:
                return None
            return self.convert_tokens_to_ids(str(value)) if as_id else str(value)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        key, as_id = self._named_key(name)
        if key in self.__dict__.get("_named", {}):  # the token, or (an id) that id's token
            self._set_named(key, self.convert_ids_to_tokens(int(value)) if as_id and value is not None else value)
        else:
            super().__setattr__(name, value)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a Tokenizer pickled before named tokens existed has no `_named`
        self.__dict__.update(state)
        self.__dict__.setdefault("_named", {})
        self.__dict__.setdefault("init_kwargs", {})

    @property
    def all_special_tokens(self) -> list[str]:
        """The named special tokens, then the extra ones, each once (Transformers' order)."""
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self.extra_special_tokens]))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    @property
    def added_tokens_decoder(self) -> dict[int, Any]:
        """id -> `tokenizers.AddedToken` of every added token (special ones included)."""
        return dict(sorted(self._tok.get_added_tokens_decoder().items()))

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        return {token.content: i for i, token in self.added_tokens_decoder.items()}

    def get_added_vocab(self) -> dict[str, int]:
        return self.added_tokens_encoder

    def add_tokens(self, new_tokens: Any, special_tokens: bool = False) -> int:
        """Add tokens (strings or `tokenizers.AddedToken`) to the vocabulary, as Transformers' fast
        tokenizers do; returns how many were new (then resize the model's embeddings)."""
        if not new_tokens:
            return 0
        if isinstance(new_tokens, (str, AddedToken)):
            new_tokens = [new_tokens]
        if not all(isinstance(t, (str, AddedToken)) for t in new_tokens):
            raise TypeError(f"add_tokens: new_tokens must be strings or tokenizers.AddedToken, got {new_tokens!r}")
        tokens = [t if isinstance(t, AddedToken) else
                  AddedToken(t, special=special_tokens, normalized=not special_tokens) for t in new_tokens]
        return self._tok.add_special_tokens(tokens) if special_tokens else self._tok.add_tokens(tokens)

    def add_special_tokens(self, special_tokens_dict: dict[str, Any], replace_extra_special_tokens: bool = True) -> int:
        """Add and assign special tokens, e.g. {"pad_token": "<pad>"} or {"extra_special_tokens":
        [...]} (or its old name "additional_special_tokens"); values are strings or AddedTokens.
        Returns how many were new to the vocabulary."""
        special_tokens_dict = dict(special_tokens_dict)
        if "additional_special_tokens" in special_tokens_dict and not special_tokens_dict.get("extra_special_tokens"):
            special_tokens_dict["extra_special_tokens"] = special_tokens_dict.pop("additional_special_tokens")
        to_add = []
        for key, value in special_tokens_dict.items():
            if key not in (*SPECIAL_NAMES, *self._named, "extra_special_tokens"):
                allowed = (*SPECIAL_NAMES, *self._named, "extra_special_tokens", "additional_special_tokens")
                raise ValueError(f"add_special_tokens: unknown key {key!r}; allowed: {allowed}")
            as_added = (lambda t: AddedToken(t, special=True, normalized=False) if isinstance(t, str) else t)
            if key == "extra_special_tokens":
                if not (isinstance(value, (list, tuple)) and all(isinstance(t, (str, AddedToken)) for t in value)):
                    raise ValueError(f"add_special_tokens: {key} must be a list of strings or AddedTokens, "
                                     f"got {value!r}")
                new = [as_added(t) for t in value if replace_extra_special_tokens or str(t) not in
                       self.extra_special_tokens]
                if replace_extra_special_tokens and new:
                    self._extra_special = list(new)
                else:
                    self._extra_special.extend(new)
                to_add.extend(new)
            else:
                if not isinstance(value, (str, AddedToken)):
                    raise ValueError(f"add_special_tokens: {key} must be a string or an AddedToken, got {value!r}")
                setattr(self, key, as_added(value))
                to_add.append(as_added(value))
        return self.add_tokens(to_add, special_tokens=True)

    # ---- encoding ----------------------------------------------------------------------------
    def encode(self, text: Any, text_pair: Any = None, add_special_tokens: bool = True, padding: bool | str = False,
               truncation: bool | str | None = None, max_length: int | None = None, stride: int = 0,
               padding_side: str | None = None, return_tensors: str | None = None, **kwargs: Any):
        """The input_ids of `self(text, text_pair, ...)`; `text_target` and `text_pair_target` are
        ignored here, as in Transformers, and so is `tokenizer_kwargs` (with a warning: Transformers'
        encode takes it among the keywords it ignores)."""
        for key in ("text_target", "text_pair_target", "max_target_length"):
            kwargs.pop(key, None)
        if kwargs.pop("tokenizer_kwargs", None):
            warn_once("encode ignores tokenizer_kwargs, as Transformers' encode does: pass the arguments by name, or "
                      "call the tokenizer")
        return self(text, text_pair, add_special_tokens=add_special_tokens, padding=padding, truncation=truncation,
                    max_length=max_length, stride=stride, padding_side=padding_side, return_tensors=return_tensors,
                    **kwargs)["input_ids"]

    def tokenize(self, text: Any, pair: Any = None, add_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        """The tokens of `text` (of its first text, for a batch, as in Transformers). Of the keywords
        only `is_split_into_words` and `split_special_tokens` take effect; Transformers' fast
        tokenizers ignore the others here (no padding or truncation), and so does this."""
        enc = self(text, pair, add_special_tokens=add_special_tokens,
                   is_split_into_words=kwargs.get("is_split_into_words", False),
                   split_special_tokens=kwargs.get("split_special_tokens"))
        return enc.encodings[0].tokens

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        decoder = self._tok.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    def __call__(
        self,
        text: Any = None,
        text_pair: Any = None,
        text_target: Any = None,
        text_pair_target: Any = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        split_special_tokens: bool | None = None,
        verbose: bool = True,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> BatchEncoding:
        """Tokenise one text or a batch, in Transformers' argument order and as its fast tokenizers do.

        Pairs: `text_pair`, or a batch of (text, pair) tuples, joined as the post-processor's pair
        template joins them. Truncation to `max_length` (True / "longest_first", "only_first",
        "only_second"; the special tokens kept; `max_length` alone truncates too); padding
        ("longest"/True or "max_length", up to a multiple of `pad_to_multiple_of`) left or right.
        `return_overflowing_tokens=True`: each text's truncated-off tokens come back as more rows
        (windows overlapping by `stride` tokens), right after its row, padded like it; the result is
        a batch even for one text, with `overflow_to_sample_mapping` (each row's text).
        `is_split_into_words=True`: each text is a list of words (a batch: a list of such lists),
        each word tokenised on its own; `word_ids()` gives each token's word.
        `text_target` / `text_pair_target`: encoded with the same settings (`max_target_length`
        in place of `max_length` where given); their input_ids become `labels`, or, without `text`,
        their encoding is the result.
        `tokenizer_kwargs`: more of these arguments as a dict, which replace those given by name, as
        Transformers 5 merges them. Other keywords are ignored with a warning that names them (as
        Transformers ignores them, silently)."""
        if tokenizer_kwargs:
            given = {name: value for name, value in locals().items()
                     if name not in ("self", "tokenizer_kwargs", "kwargs", "__class__")}
            return self(**{**given, **dict(tokenizer_kwargs), **kwargs})
        sanitize = kwargs.pop("sanitize_control_tokens", False)
        max_target_length = kwargs.pop("max_target_length", None)
        if kwargs:
            warn_once(f"the tokenizer ignores the arguments {sorted(kwargs)}, which it does not have (as "
                      "Transformers' tokenizers ignore them)")
        if sanitize:  # the call apply_chat_template(..., sanitize_control_tokens=True) makes, as Transformers'
            if text_pair is not None or text_target is not None or is_split_into_words or not (
                    isinstance(text, str) or isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text)):
                raise ValueError("sanitize_control_tokens=True takes a text or a list of texts (rendered chats) "
                                 "alone: no text_pair, text_target or is_split_into_words")
            if add_special_tokens and self.num_special_tokens_to_add(False):
                raise NotImplementedError("`sanitize_control_tokens=True` needs a template that writes special "
                                          "tokens: pass add_special_tokens=False")
            batched = not isinstance(text, str)
            return self._encode_sanitized(list(text) if batched else [text], batched, padding, truncation, max_length,
                                          return_tensors, False, pad_to_multiple_of, padding_side,
                                          return_attention_mask, verbose)
        if text is None and text_target is None:
            raise ValueError("the tokenizer needs text or text_target; both are None")
        padding, strategy, max_length = self._strategies(padding, truncation, max_length, pad_to_multiple_of, verbose)
        if strategy is not None:  # stride is read only when truncating, as in Transformers
            try:
                stride = operator.index(stride)
            except TypeError:
                raise TypeError(f"stride must be an integer, got {stride!r}") from None
            if stride < 0:  # Transformers: the OverflowError of its conversion to an unsigned integer
                raise OverflowError(f"stride must not be negative, got {stride}")
        fields = {"input_ids": True, "token_type_ids": return_token_type_ids,
                  "attention_mask": return_attention_mask is not False,
                  "special_tokens_mask": return_special_tokens_mask, "offset_mapping": return_offsets_mapping}
        options = dict(
            words=bool(is_split_into_words), add_special_tokens=add_special_tokens, strategy=strategy, stride=stride,
            overflow=bool(return_overflowing_tokens), padding=padding, pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side, fields=fields, return_length=return_length, return_tensors=return_tensors,
            split=self.split_special_tokens if split_special_tokens is None else bool(split_special_tokens),
        )
        out = None if text is None else self._encode(text, text_pair, max_length, **options)
        if text_target is None:
            return out
        target_length = max_length if max_target_length is None else max_target_length
        target = self._encode(text_target, text_pair_target, target_length, **options)
        if out is None:
            return target
        out["labels"] = target["input_ids"]
        return out

    def _strategies(self, padding, truncation, max_length, pad_to_multiple_of, verbose):
        # Transformers' reading of padding, truncation and max_length, once for texts and targets:
        # (padding, the `tokenizers` truncation strategy or None, max_length)
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"  # Transformers: max_length alone truncates
        if padding is True and max_length is not None and truncation in (None, False, "do_not_truncate") and verbose:
            warnings.warn("`max_length` is ignored when `padding`=`True` and there is no truncation strategy. "
                          "To pad to max length, use `padding='max_length'`.", stacklevel=3)
        strategy = {True: "longest_first", "longest_first": "longest_first", "only_first": "only_first",
                    "only_second": "only_second"}.get(truncation)
        if truncation not in (False, None, "do_not_truncate") and strategy is None:
            raise ValueError(f"truncation must be True, False, 'longest_first', 'only_first' or 'only_second', "
                             f"got {truncation!r}")
        if max_length is None and (strategy is not None or padding == "max_length"):
            if self.model_max_length > int(1e29):  # no length to truncate or pad to: neither happens
                strategy, padding = None, (False if padding == "max_length" else padding)
            else:
                max_length = self.model_max_length
        multiple = pad_to_multiple_of
        if strategy is not None and padding not in (False, None, "do_not_pad") and isinstance(multiple, int) and \
                multiple > 0 and max_length % multiple:
            raise ValueError(f"truncation and padding are both on, but max_length ({max_length}) is not a multiple "
                             f"of pad_to_multiple_of ({multiple})")
        if padding not in (False, None, "do_not_pad") and self.pad_token is None:  # before encoding, as Transformers
            raise ValueError(NO_PAD_TOKEN)
        return padding, strategy, max_length

    def _encode(self, text, text_pair, max_length, *, words, add_special_tokens, strategy, stride, overflow, padding,
                pad_to_multiple_of, padding_side, fields, return_length, return_tensors, split) -> BatchEncoding:
        # one encoding pass of __call__ (its texts, or its targets)
        batched, inputs = _encode_inputs(text, text_pair, words)
        # the `tokenizers` object is shared: a write to it waits, holding the interpreter lock, for
        # any encode running in another thread (a huge prompt stalled every thread of a server), so
        # only a call that needs other settings writes them, and puts them back after
        switched = self._tok.encode_special_tokens != split
        if switched:
            self._tok.encode_special_tokens = split
        try:
            if strategy is not None:
                self._tok.enable_truncation(min(max_length, 2**31 - 1), stride=stride, strategy=strategy,
                                            direction=self.truncation_side)
            encodings = self._tok.encode_batch(inputs, add_special_tokens=add_special_tokens, is_pretokenized=words)
        except BaseException as e:
            # `tokenizers` checks stride against max_length less the special tokens (a ValueError), and
            # panics on encoding where it is not below the length a sequence is truncated to
            if "stride" not in str(e) or not (isinstance(e, ValueError) or type(e).__name__ == "PanicException"):
                raise
            raise ValueError(f"stride ({stride}) must be less than the length each sequence is truncated to: "
                             f"max_length ({max_length}) less the special tokens added (for a pair truncated "
                             f"'longest_first', that sequence's share of it). tokenizers: {e}") from None
        finally:
            if strategy is not None:
                self._tok.no_truncation()
            if switched:
                self._tok.encode_special_tokens = self.split_special_tokens
        target = self._padding_target([len(e.ids) for e in encodings], padding, max_length, pad_to_multiple_of)
        if target is not None:  # an encoding's overflowing rows are padded with it
            side = self._padding_side(padding_side)
            for e in encodings:
                e.pad(target, direction=side, pad_id=self.pad_token_id, pad_type_id=self.pad_token_type_id,
                      pad_token=self.pad_token)
        groups = [[e, *e.overflowing] if overflow else [e] for e in encodings]
        rows = [row for group in groups for row in group]
        batched = batched or overflow  # overflowing rows make a batch of one text too
        getters = {"input_ids": "ids", "token_type_ids": "type_ids", "offset_mapping": "offsets"}
        out = BatchEncoding(encodings=rows)
        for key, wanted in fields.items():
            if wanted:
                values = [getattr(row, getters.get(key, key)) for row in rows]
                out[key] = values if batched else values[0]
        if return_length:
            out["length"] = [len(row.ids) for row in rows]  # a list even for one text, as Transformers
        if overflow:
            out["overflow_to_sample_mapping"] = [i for i, group in enumerate(groups) for _ in group]
        return _as_tensors(out, return_tensors, batched)

    def pad(
        self,
        encoded_inputs: Any,
        padding: bool | str = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | None = None,
        verbose: bool = True,
    ) -> BatchEncoding:
        """Pad encoded rows (a list of dicts, or a dict of lists) as `__call__` pads: what data
        collators call. token_type_ids and special_tokens_mask are padded as Transformers pads them;
        other keys are kept as they are."""
        if isinstance(encoded_inputs, (list, tuple)):
            if not encoded_inputs or not all(isinstance(e, Mapping) for e in encoded_inputs):
                raise TypeError("pad() takes encodings: a dict of lists, or a non-empty list of dicts")
            encoded_inputs = {k: [e[k] for e in encoded_inputs] for k in encoded_inputs[0]}
        if "input_ids" not in encoded_inputs:
            raise ValueError(f"pad() needs input_ids among the encodings' keys, got {sorted(encoded_inputs)}")
        if return_tensors is None:  # rows given as tensors or arrays come back as such, as in Transformers
            return_tensors = _tensor_kind(encoded_inputs["input_ids"])
        encoded_inputs = {k: _to_py(v) for k, v in encoded_inputs.items()}
        rows = encoded_inputs["input_ids"]
        batched = len(rows) > 0 and not isinstance(rows[0], int)
        columns = {k: [list(map(int, x)) for x in (v if batched else [v])] for k, v in encoded_inputs.items()
                   if k in ("input_ids", "attention_mask", *_PAD_VALUES)}
        ids = columns["input_ids"]
        if return_attention_mask is not False and "attention_mask" not in columns:
            columns["attention_mask"] = [[1] * len(x) for x in ids]
        target = self._padding_target([len(x) for x in ids], padding, max_length, pad_to_multiple_of)
        if target is not None:
            side = self._padding_side(padding_side)
            values = {"input_ids": self.pad_token_id, "attention_mask": 0, **_PAD_VALUES}
            for key, rows_ in columns.items():
                for row in rows_:
                    fill = [values[key]] * (target - len(row))
                    if side == "left":
                        row[:0] = fill
                    else:
                        row.extend(fill)
        out = BatchEncoding({k: v for k, v in encoded_inputs.items() if k not in columns})
        out.update({k: v if batched else v[0] for k, v in columns.items()})
        if return_attention_mask is False:
            out.pop("attention_mask", None)
        return _as_tensors(out, return_tensors, batched, batch_axis=False)

    def _padding_side(self, side: str | None) -> str:
        side = side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        return side

    def _padding_target(self, lengths: list[int], padding, max_length, multiple) -> int | None:
        # the length rows are padded to (the longest, or max_length, rounded up to `multiple`); None: no padding
        if padding in (False, None, "do_not_pad"):
            return None
        if padding not in (True, "longest", "max_length"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        if padding == "max_length" and max_length is None:
            if self.model_max_length > int(1e29):
                return None  # Transformers: no max_length and no model_max_length -> no padding
            max_length = self.model_max_length
        target = max_length if padding == "max_length" else max(lengths, default=0)
        if multiple:  # (0, as None: no multiple, as Transformers reads it)
            if not (isinstance(multiple, int) and multiple > 0):
                raise ValueError(f"pad_to_multiple_of must be a positive integer, got {multiple!r}")
            target = -(-target // multiple) * multiple
        if self.pad_token is None:
            raise ValueError(NO_PAD_TOKEN)
        return target

    # ---- decoding ----------------------------------------------------------------------------
    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str | list[str]:
        """Decode ids (a list, tensor, numpy array or scalar); a batch (nested list, 2-D tensor)
        gives a list of strings, as Transformers 5."""
        kwargs.pop("use_source_tokenizer", None)
        token_ids = _to_py(token_ids)
        if isinstance(token_ids, Mapping):
            token_ids = token_ids["input_ids"]
        if isinstance(token_ids, list) and token_ids and isinstance(token_ids[0], list):
            return [self.decode(x, skip_special_tokens, clean_up_tokenization_spaces) for x in token_ids]
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        token_ids = list(token_ids)
        negative = [t for t in token_ids if isinstance(t, int) and t < 0]
        if negative:
            raise NegativeTokenId(f"decode(): token ids must be non-negative, got {negative[:5]} (training labels hold "
                             "-100 where no loss is taken: replace it with the pad id before decoding)")
        text = self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)
        clean = clean_up_tokenization_spaces
        if clean is None:
            clean = self.clean_up_tokenization_spaces
        # Transformers 5.23 skips the clean-up (meant for WordPiece) for a BPE model
        if clean and type(self._tok.model).__name__ == "BPE" and \
                not self.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output:
            clean = False
        return _clean_up(text) if clean else text

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        out = self.decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)
        return [out] if isinstance(out, str) else out

    def clean_up_tokenization(self, text: str) -> str:
        """The spaces before punctuation and English contractions removed, as `decode` does with
        `clean_up_tokenization_spaces=True` (" ." -> ".", " n't" -> "n't", ...)."""
        return _clean_up(text)

    # ---- chat --------------------------------------------------------------------------------
    def encode_message_with_chat_template(self, message: dict[str, Any],
                                          conversation_history: list[dict[str, Any]] | None = None,
                                          **kwargs: Any) -> list[int]:
        """The ids one message adds to a chat: the chat template applied to the history and the
        message, less the ids it gives the history alone (from the first id where the two differ,
        since a template may close the history's last message differently once another follows).
        For encoding a chat message by message; the generation prompt is not added (apply the
        template with `add_generation_prompt=True` for it)."""
        if "add_generation_prompt" in kwargs:
            raise ValueError("encode_message_with_chat_template does not add a generation prompt: leave out "
                             "add_generation_prompt, and apply the chat template with it to the whole chat")
        if not isinstance(message, Mapping):
            raise TypeError(f"encode_message_with_chat_template: message must be a dict (with 'role' and "
                            f"'content'), got {message!r}")

        def ids(chat):
            return self.apply_chat_template(chat, add_generation_prompt=False, tokenize=True, return_dict=False,
                                            **kwargs)

        history = list(conversation_history or ())
        whole = ids(history + [message])
        if not history:
            return whole
        before = ids(history)
        same = next((i for i, (a, b) in enumerate(zip(before, whole)) if a != b), min(len(before), len(whole)))
        return whole[same:]

    @property
    def chat_control_tokens(self) -> list[str] | None:
        """The added tokens besides the special ones that `apply_chat_template(...,
        sanitize_control_tokens=True)` encodes as text in the inputs (tokenizer_config.json's
        `chat_control_tokens`); None: the added tokens in the chat template's text."""
        return self._extra_config.get("chat_control_tokens")

    @chat_control_tokens.setter
    def chat_control_tokens(self, value: list[str] | None) -> None:
        if value is not None and not isinstance(value, (list, tuple)):
            raise TypeError(f"chat_control_tokens must be a list of strings or None, got {value!r}")
        self._extra_config.pop("chat_control_tokens", None)
        if value is not None:
            self._extra_config["chat_control_tokens"] = list(value)

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]] | list[list[dict[str, Any]]],
        tools: list[dict[str, Any] | Callable] | None = None,
        documents: list[dict[str, str]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        sanitize_control_tokens: bool = False,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = True,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **template_kwargs: Any,
    ):
        """Render messages with the jinja chat template, in Transformers 5's sandbox and argument
        order; tokenised (a BatchEncoding, or ids with return_dict=False) unless tokenize=False.
        Special tokens come from the template only. As in Transformers: `tools` (JSON-schema dicts,
        or functions whose schema `get_json_schema` builds) and `documents` reach the template, and
        so does any other keyword; `chat_template` may name one of the tokenizer's named templates;
        keys holding None are dropped and the reasoning fields copied to one another;
        `return_assistant_tokens_mask=True` adds `assistant_masks` (1 on the tokens of the
        template's {% generation %} blocks); `sanitize_control_tokens=True` encodes the control
        tokens typed in the inputs as plain text; `tokenizer_kwargs` go to the tokenizer call."""
        return_dict = return_dict and tokenize
        if return_assistant_tokens_mask and not return_dict:
            raise ValueError("apply_chat_template: return_assistant_tokens_mask=True requires return_dict=True and "
                             "tokenize=True")
        template = self.get_chat_template(chat_template, tools)
        if isinstance(conversation, (str, Mapping)):
            raise TypeError(f"apply_chat_template: the conversation must be a list of messages "
                            f"([{{\"role\": ..., \"content\": ...}}, ...]), or a list of such lists, got a "
                            f"{type(conversation).__name__}")
        if not conversation:
            raise ValueError("cannot apply a chat template to an empty conversation")
        batched = isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
        chats = [getattr(chat, "messages", chat) for chat in (conversation if batched else [conversation])]
        for chat in chats:
            for i, m in enumerate(chat):
                if not isinstance(m, Mapping):
                    raise ValueError(f"message {i} must be a dict (with 'role' and 'content'), got {m!r}")
        # keys holding None are dropped, as Transformers drops them (APIs send content=None)
        chats = [[{k: v for k, v in m.items() if v is not None} for m in chat] for chat in chats]
        if continue_final_message and add_generation_prompt:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be set")
        if continue_final_message and return_assistant_tokens_mask:
            raise ValueError("continue_final_message cannot be set with return_assistant_tokens_mask=True")
        if sanitize_control_tokens:
            if not tokenize or return_assistant_tokens_mask:
                raise ValueError("apply_chat_template: sanitize_control_tokens=True requires tokenize=True and "
                                 "return_assistant_tokens_mask=False")
            marks = token_patterns(self._control_tokens(template))[0]
            chats, tools, documents, template_kwargs = mark_control_tokens(
                [chats, tools, documents, template_kwargs], marks)
        if return_assistant_tokens_mask and not re.search(r"\{%-?\s*generation\s*-?%\}", template):
            warn_once("return_assistant_tokens_mask=True, but the chat template has no {% generation %} block: "
                       "the mask is all 0")
        compile_template(template)  # a syntax error first, as Transformers reports it
        tools = None if tools is None else [tool_schema(tool) for tool in tools]
        for document in documents or ():
            if not isinstance(document, dict):
                raise TypeError(f"apply_chat_template: documents must be dicts (with 'title' and 'text'), "
                                f"got {document!r}")
        variables = plain_data({**self.special_tokens_map, **template_kwargs, "tools": tools, "documents": documents})
        spans: list | None = [] if return_assistant_tokens_mask else None
        rendered = [render_chat(template, chat, add_generation_prompt, continue_final_message, variables, spans)
                    for chat in chats]
        text = rendered if batched else rendered[0]
        if not tokenize:
            return text
        if sanitize_control_tokens:
            out = self._encode_sanitized(rendered, batched, padding, truncation, max_length, return_tensors,
                                         add_special_tokens=False, **(tokenizer_kwargs or {}))
        else:
            out = self(text, add_special_tokens=False, padding=padding, truncation=truncation,
                       max_length=max_length, return_tensors=return_tensors, **(tokenizer_kwargs or {}))
        if return_assistant_tokens_mask:
            out["assistant_masks"] = assistant_masks(out, spans, batched, return_tensors)
        return out if return_dict else out["input_ids"]

    def _control_tokens(self, template: str) -> tuple[str, ...]:
        # the tokens sanitize_control_tokens encodes as text in the inputs: the special tokens, and the
        # added ones in chat_control_tokens, or else (not whitespace) in the template's literal text
        added = self.added_tokens_decoder.values()
        if self.chat_control_tokens is not None:
            listed = set(self.chat_control_tokens)
            return tuple(t.content for t in added if t.special or t.content in listed)
        literals = template_literals(template)
        return tuple(t.content for t in added if t.special or t.content in literals and not t.content.isspace())

    def _encode_sanitized(self, texts: list[str], batched: bool, padding, truncation, max_length, return_tensors,
                          add_special_tokens: bool, pad_to_multiple_of: int | None = None,
                          padding_side: str | None = None, return_attention_mask: bool | None = None,
                          verbose: bool = True, **_: Any) -> BatchEncoding:
        """The tokenizer call of apply_chat_template(..., sanitize_control_tokens=True), as Transformers
        makes it: each chat's ids (`_encode_marked`), cut to max_length when truncating, then padded;
        input_ids and attention_mask alone (its other keywords take no effect there; add_special_tokens
        is False, and a TypeError in tokenizer_kwargs, as in the call without sanitizing)."""
        padding, strategy, max_length = self._strategies(padding, truncation, max_length, pad_to_multiple_of, verbose)
        rows = [self._encode_marked(text) for text in texts]
        if strategy is not None:
            rows = [row[:max_length] if self.truncation_side == "right" else row[-max_length:] for row in rows]
        return self.pad({"input_ids": rows if batched or return_tensors else rows[0]}, padding=padding,
                        max_length=max_length, pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side,
                        return_attention_mask=return_attention_mask, return_tensors=return_tensors)

    def _encode_marked(self, chat: str) -> list[int]:
        """The ids of a chat rendered from inputs marked by `mark_control_tokens`: a marked token as
        plain text (a ValueError where the text encodes to that token anyway), the rest as usual;
        each piece after the first is encoded after a newline, then the newline's ids dropped."""
        pieces = token_patterns(tuple(self.added_tokens_encoder))[1].split(chat)
        newline = self.encode("\n", add_special_tokens=False)
        ids = self.encode(pieces[0], add_special_tokens=False)
        for i, piece in enumerate(pieces[1:], 1):
            if not piece:  # a lone marker (None) splits the text and is dropped
                continue
            as_text = i % 2 == 1
            encode = self._encode_as_text if as_text else functools.partial(self.encode, add_special_tokens=False)
            piece_ids = encode("\n" + piece)
            piece_ids = piece_ids[len(newline):] if piece_ids[:len(newline)] == newline else encode(piece)
            if as_text and self.convert_tokens_to_ids(piece) in piece_ids:
                raise ValueError(f"sanitize_control_tokens: cannot encode {piece!r} as text: this tokenizer "
                                 f"makes that token of its text")
            ids += piece_ids
        return ids

    def _encode_as_text(self, text: str) -> list[int]:
        # the ids of `text` without the added tokens: normalizer, pre-tokenizer and model alone
        rust = self._tok
        if rust.normalizer is not None:
            text = rust.normalizer.normalize_str(text)
        splits = [s for s, _ in rust.pre_tokenizer.pre_tokenize_str(text)] if rust.pre_tokenizer else [text]
        return [token.id for split in splits for token in rust.model.tokenize(split)]


def _special_token_property(name: str) -> property:
    def get(self: Tokenizer) -> str | None:
        value = self._special.get(name)
        return None if value is None else str(value)

    def set_(self: Tokenizer, value: str | AddedToken | None) -> None:
        if value is not None and not isinstance(value, (str, AddedToken)):
            raise ValueError(f"{name} must be a string, a tokenizers.AddedToken or None, got {value!r}")
        self._special[name] = value

    return property(get, set_, doc=f"The {name} (a string), or None.")


def _special_id_property(name: str) -> property:
    def get(self: Tokenizer) -> int | None:
        token = getattr(self, name)
        return None if token is None else self.convert_tokens_to_ids(token)

    def set_(self: Tokenizer, value: int | None) -> None:  # sets the token of that id, as Transformers
        setattr(self, name, None if value is None else self.convert_ids_to_tokens(int(value)))

    return property(get, set_, doc=f"The id of the {name}, or None; setting it sets {name} to that id's token.")


for _name in SPECIAL_NAMES:
    setattr(Tokenizer, _name, _special_token_property(_name))
    setattr(Tokenizer, f"{_name}_id", _special_id_property(_name))


def _first_is_text(value: Any, depth: int = 3) -> bool:
    # Transformers' check of a text argument's shape: a string, or (up to three deep) lists whose
    # first element is one
    return isinstance(value, str) or isinstance(value, (list, tuple)) and (
        not value or depth > 0 and _first_is_text(value[0], depth - 1))


def _encode_inputs(text: Any, text_pair: Any, words: bool) -> tuple[bool, list]:
    """(batched, the inputs of `tokenizers`' encode_batch) for a tokenizer call's text and
    text_pair, as Transformers reads them: a batch is a list (with `words`, is_split_into_words: a
    list of lists of words); one text's empty text_pair is no pair."""
    for name, value in (("text", text), ("text_pair", text_pair)):
        if value is not None and not _first_is_text(value):
            raise ValueError(f"{name} must be a string, a list of strings (a batch, or with is_split_into_words=True "
                             f"one text's words) or a list of such lists, got {value!r}")
    batched = isinstance(text, (list, tuple)) and (not words or bool(text) and isinstance(text[0], (list, tuple)))
    if batched:
        if text_pair is not None and not isinstance(text_pair, (list, tuple)):
            raise TypeError(f"text_pair must match text: a batch of texts takes a list of pairs, got {text_pair!r}")
        if text_pair is not None and len(text_pair) != len(text):
            raise ValueError(f"text_pair must match text: {len(text)} text(s) and {len(text_pair)} pair(s)")
        rows = list(zip(text, text_pair)) if text_pair is not None else list(text)
    else:
        rows = [(text, text_pair)] if text_pair else [text]

    def sequence(x: Any) -> bool:  # one text: a string, or with `words` a list of words
        return (isinstance(x, (list, tuple)) and all(isinstance(w, str) for w in x)) if words else isinstance(x, str)

    inputs = []
    for row in rows:
        if sequence(row):
            inputs.append(row)
        elif isinstance(row, (list, tuple)) and len(row) == 2 and all(sequence(x) for x in row):
            inputs.append(tuple(row))  # a (text, pair)
        elif words:
            raise TypeError(f"with is_split_into_words=True each text is a list of words (strings), and a pair two "
                            f"such lists; got {row!r}")
        else:
            raise TypeError(f"text must be a string, a list of strings or a list of (text, text_pair) pairs (a list of "
                            f"words needs is_split_into_words=True); got {row!r}")
    return batched, inputs


def _as_tensors(out: BatchEncoding, return_tensors: str | None, batched: bool,
                batch_axis: bool = True) -> BatchEncoding:
    # "pt" (torch tensors) or "np" (numpy arrays); an unbatched encoding gets a batch axis of 1 (as
    # a tokenizer call returns it), unless not `batch_axis` (as pad returns it)
    if return_tensors is None:
        return out
    if return_tensors not in ("pt", "np"):
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
    if batched and len({len(x) for x in out["input_ids"]}) > 1:
        raise ValueError("sequences have different lengths: pass padding=True to return tensors")
    data = {k: v if batched or not batch_axis or k == "length" else [v] for k, v in out.items()}
    return BatchEncoding(data, encodings=out.encodings).convert_to_tensors(return_tensors)


class NegativeTokenId(ValueError, OverflowError):
    """decode() of a negative id: a ValueError that names it, and the OverflowError Transformers'
    fast tokenizers raise there (so that code catching either catches it)."""


NO_PAD_TOKEN = "this tokenizer has no pad_token; set tokenizer.pad_token = tokenizer.eos_token"


def _tensor_kind(rows: Any) -> str | None:
    """"pt" or "np" where the first id of `rows` (or its first non-empty row) is held in a torch
    tensor or a numpy array, else None: the type `pad()` returns by default, as Transformers'."""
    first = rows[0] if len(rows) else None
    if isinstance(first, (list, tuple)):
        first = next((row[0] for row in rows if len(row)), None)
    return "pt" if isinstance(first, torch.Tensor) else "np" if isinstance(first, np.ndarray) else None


def _clean_up(text: str) -> str:
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


# Transformers 5 builds the pipeline of a tokenizer whose tokenizer_config.json names a model's
# tokenizer class in that class, from tokenizer.json's vocabulary, merges, added tokens and
# post-processor alone. Phi-3.5-MoE and JetMoE name Llama's, whose pipeline differs from the one
# their tokenizer.json spells out (a Prepend("▁") normalizer, which also puts "▁" after every special
# token): the same text must give the same ids as there.
LLAMA_CLASSES = {"LlamaTokenizer", "LlamaTokenizerFast"}
# Model types whose checkpoints name a tokenizer class that does not fit their tokenizer.json, so
# that Transformers 5 reads the file as it is instead (part of its
# MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS): Phi-3.5-MoE's tokenizer_config.json names
# LlamaTokenizer, and beside a phimoe config.json its tokenizer.json's own pipeline runs.
NAMED_CLASS_OVERRIDDEN = {"phimoe", "phi3"}


def _model_type(config: Any, directory: Path) -> str | None:
    """The model type a tokenizer is loaded for: the `config=` keyword's (a config or its dict),
    else that of the config.json beside tokenizer.json, else None."""
    if config is not None:
        return config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    return _read_json(directory / CONFIG_NAME).get("model_type")


_LLAMA_CLASS_KWARG = "_llama_tokenizer_class"  # LlamaTokenizer.from_pretrained's, to Tokenizer.from_pretrained


def _as_llama_tokenizer(rust, config: dict[str, Any], model: dict[str, Any], file: Path,
                        listed: dict[int, AddedToken]):
    """Transformers 5's LlamaTokenizer pipeline, built anew as it builds it: a byte-fallback BPE of
    the file's vocabulary and merges, no normalizer, a Metaspace pre-tokenizer that puts "▁" before
    the text's first word only (`legacy=False`, the default; before every piece between special
    tokens with `legacy=True`; never with `add_prefix_space=False`), the matching decoder, `rust`'s
    post-processor, and as added tokens, in id order, the config's `added_tokens_decoder` (`listed`)
    where it has one, else tokenizer.json's. `model`: tokenizer.json's model section (`file` names
    it in errors)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    if model.get("type") != "BPE":
        kind = config.get("tokenizer_class", "LlamaTokenizer")
        raise ValueError(f"{file}: tokenizer_class {kind} needs a BPE model, got {model.get('type')!r}")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    fresh = RustTokenizer(models.BPE(vocab=model.get("vocab", {}), merges=merges, fuse_unk=True, byte_fallback=True))
    prefix = config.get("add_prefix_space")
    prefix = True if prefix is None else bool(prefix)
    scheme = ("always" if config.get("legacy") else "first") if prefix else "never"
    fresh.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    fresh.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    if rust.post_processor is not None:
        fresh.post_processor = rust.post_processor
    tokens = listed or rust.get_added_tokens_decoder()
    fresh.add_tokens([copy.copy(t) for _, t in sorted(tokens.items())])
    return fresh


def _listed_tokens(config: dict[str, Any], file: Path) -> dict[int, AddedToken]:
    """The config's `added_tokens_decoder` as {id: AddedToken} (a bare string: a special token)."""
    listed = config.get("added_tokens_decoder")
    if listed is not None and not isinstance(listed, dict):
        raise ValueError(f"{file.parent / CONFIG_FILE}: added_tokens_decoder must be a dict of token ids to tokens, "
                         f"got {type(listed).__name__}")
    return {int(k): AddedToken(v, special=True) if isinstance(v, str) else _token_value(v)
            for k, v in (listed or {}).items()}


def _read_templates(directory: Path) -> dict[str, str]:
    """The chat templates in template files, by name: chat_template.jinja ("default") and
    additional_chat_templates/<name>.jinja."""
    files = [directory / TEMPLATE_FILE, *sorted((directory / TEMPLATE_DIR).glob("*.jinja"))]
    return {("default" if f.parent == directory else f.name.removesuffix(".jinja")): f.read_text(encoding="utf-8")
            for f in files if f.is_file()}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


class LlamaTokenizer(Tokenizer):
    """Transformers 5's `LlamaTokenizer` (`LlamaTokenizerFast` is the same class), which the
    PhiMoE docs name as that model's tokenizer: a checkpoint's tokenizer.json read with the Llama
    pipeline rebuilt from its vocabulary and merges (`_as_llama_tokenizer`: byte-fallback BPE, "▁"
    before the text's first word, no normalizer), whatever `tokenizer_class` its config names, left
    padding and `<s>`, `</s>`, `<unk>` as bos, eos and unk tokens unless the config says otherwise."""

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> LlamaTokenizer:
        return super().from_pretrained(path, **{**kwargs, _LLAMA_CLASS_KWARG: True})


LlamaTokenizerFast = LlamaTokenizer


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(dir)` returns a moetorch `Tokenizer`."""

    def __init__(self) -> None:
        raise TypeError("use AutoTokenizer.from_pretrained(path)")

    @staticmethod
    def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> Tokenizer:
        return Tokenizer.from_pretrained(path, **kwargs)
