"""Tokenizer on the `tokenizers` library, with Transformers' fast-tokenizer interface and jinja2
chat templates.

`Tokenizer.from_pretrained(dir)` reads tokenizer.json, tokenizer_config.json (special tokens,
chat_template, padding side), special_tokens_map.json and chat_template.jinja when present.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from .defaults import checkpoint_path
from .hub import TOKENIZER_PATTERNS, PushToHubMixin, hub_options

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# Tokenizer-loading options that have no meaning for a local fast tokenizer.
_IGNORED_KWARGS = {"trust_remote_code", "use_fast"}  # the Hub's options go to moetorch.hub

# A Phi-3.5-style template, used by `moetorch train-tokenizer` and tests.
PHI35_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] and message['content'] %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


class BatchEncoding(dict):
    """`input_ids` and `attention_mask` (lists or tensors), readable as keys and attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    def to(self, device: torch.device | str) -> BatchEncoding:
        return BatchEncoding({k: v.to(device) if torch.is_tensor(v) else v for k, v in self.items()})


def _token_text(tok: Any) -> str | None:
    if tok is None or isinstance(tok, str):
        return tok
    if isinstance(tok, dict):  # {"content": "<s>", "lstrip": ..., ...} as Transformers writes
        return tok.get("content")
    raise ValueError(f"special token must be a string or a dict with 'content', got {tok!r}")


class Tokenizer(PushToHubMixin):
    """A fast tokenizer with the calls a Transformers script makes: `__call__`, `encode`,
    `tokenize`, `decode`, `batch_decode`, `pad`, `apply_chat_template`, `add_tokens`,
    special-token attributes and padding."""

    model_input_names = ["input_ids", "attention_mask"]
    is_fast = True

    def __init__(
        self,
        tokenizer_object,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        padding_side: str = "right",
        truncation_side: str = "right",
        model_max_length: int | None = None,
        clean_up_tokenization_spaces: bool = False,
        name_or_path: str = "",
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        self._tok = tokenizer_object
        self._tok.no_padding()
        self._tok.no_truncation()
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.chat_template = chat_template
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = model_max_length or int(1e30)
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.name_or_path = name_or_path
        self._extra_config = dict(extra_config or {})

    # ---- loading and saving ------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> Tokenizer:
        """Load from a directory holding tokenizer.json (and optionally tokenizer_config.json)."""
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
        if (directory / TEMPLATE_FILE).exists():
            config["chat_template"] = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
        for key in list(kwargs):
            if key in _IGNORED_KWARGS:
                kwargs.pop(key)
        config.update(kwargs)
        if config.get("tokenizer_class") in LLAMA_CLASSES:
            _as_llama_tokenizer(rust, config, json.loads(text).get("model", {}), file)
        known = {"chat_template", "padding_side", "truncation_side", "model_max_length", "clean_up_tokenization_spaces"}
        specials = {name: _token_text(config.get(name)) for name in SPECIAL_NAMES}
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: use "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        extra = {k: v for k, v in config.items() if k not in known and k not in SPECIAL_NAMES}
        return cls(
            rust,
            **specials,
            chat_template=template,
            padding_side=config.get("padding_side", _CLASS_PADDING_SIDE.get(config.get("tokenizer_class"), "right")),
            truncation_side=config.get("truncation_side", "right"),
            model_max_length=config.get("model_max_length"),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            name_or_path=str(path),
            extra_config=extra,
        )

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (Transformers reads both)."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / TOKENIZER_FILE))
        config = {k: v for k, v in self._extra_config.items() if k not in ("added_tokens_decoder",)}
        config.update({name: getattr(self, name) for name in SPECIAL_NAMES if getattr(self, name) is not None})
        config.update(
            tokenizer_class="PreTrainedTokenizerFast", padding_side=self.padding_side,
            truncation_side=self.truncation_side, clean_up_tokenization_spaces=self.clean_up_tokenization_spaces,
        )
        if self.model_max_length < int(1e29):
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # ---- vocabulary and special tokens -------------------------------------------------------
    @property
    def backend_tokenizer(self):
        return self._tok

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._tok.token_to_id(tokens)
        return [self._tok.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(int(i)) for i in ids]

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id_of(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of(self.pad_token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in SPECIAL_NAMES if getattr(self, name) is not None}

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named special tokens, then any `additional_special_tokens` (Transformers' order)."""
        tokens = [*self.special_tokens_map.values(), *self._extra_config.get("additional_special_tokens", [])]
        ids = [self._id_of(_token_text(t)) for t in tokens]
        return list(dict.fromkeys(i for i in ids if i is not None))

    @property
    def all_special_tokens(self) -> list[str]:
        return self.convert_ids_to_tokens(self.all_special_ids)

    @property
    def added_tokens_decoder(self) -> dict[int, Any]:
        """id -> `tokenizers.AddedToken` of every added token (special ones included)."""
        return dict(sorted(self._tok.get_added_tokens_decoder().items()))

    def get_added_vocab(self) -> dict[str, int]:
        return {token.content: i for i, token in self.added_tokens_decoder.items()}

    def add_tokens(self, new_tokens: Any, special_tokens: bool = False) -> int:
        """Add tokens (strings or `tokenizers.AddedToken`) to the vocabulary, as Transformers' fast
        tokenizers do; returns how many were new (then resize the model's embeddings)."""
        from tokenizers import AddedToken

        if isinstance(new_tokens, (str, AddedToken)):
            new_tokens = [new_tokens]
        tokens = [t if isinstance(t, AddedToken) else
                  AddedToken(t, special=special_tokens, normalized=not special_tokens) for t in new_tokens]
        return self._tok.add_special_tokens(tokens) if special_tokens else self._tok.add_tokens(tokens)

    def add_special_tokens(self, special_tokens: dict[str, str]) -> int:
        """Add and assign special tokens, e.g. {"pad_token": "<pad>"}; returns how many were new."""
        from tokenizers import AddedToken

        before = len(self)
        for name, token in special_tokens.items():
            if name not in SPECIAL_NAMES:
                raise ValueError(f"unknown special token name {name!r}; allowed: {SPECIAL_NAMES}")
            self._tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
            setattr(self, name, token)
        return len(self) - before

    # ---- encoding ----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        return self(text, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]

    def tokenize(self, text: str, add_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).tokens

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        decoder = self._tok.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    def __call__(
        self,
        text: str | list[str],
        text_pair: str | list[str] | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        padding_side: str | None = None,
        pad_to_multiple_of: int | None = None,
        **kwargs: Any,
    ) -> BatchEncoding:
        """Tokenise one text or a batch (with `text_pair`: pairs, joined as the post-processor's
        pair template joins them); truncate to `max_length` as Transformers' fast tokenizers do
        (True / "longest_first", "only_first", "only_second"; the special tokens kept); pad
        ("longest"/True or "max_length", up to a multiple of `pad_to_multiple_of`) left or right."""
        kwargs.pop("sanitize_control_tokens", None)
        if kwargs:
            raise TypeError(f"unexpected tokenizer arguments: {sorted(kwargs)}")
        batched = isinstance(text, (list, tuple))
        texts = list(text) if batched else [text]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        inputs: list = texts
        if text_pair is not None:
            pairs = list(text_pair) if isinstance(text_pair, (list, tuple)) else [text_pair]
            if isinstance(text_pair, (list, tuple)) != batched or len(pairs) != len(texts):
                raise ValueError(f"text_pair must match text: {len(texts)} text(s) and {len(pairs)} pair(s)")
            if not all(isinstance(t, str) for t in pairs):
                raise TypeError("text_pair must be a string or a list of strings")
            inputs = list(zip(texts, pairs))
        strategy = {True: "longest_first", "longest_first": "longest_first", "only_first": "only_first",
                    "only_second": "only_second"}.get(truncation)
        if truncation not in (False, None, "do_not_truncate") and strategy is None:
            raise ValueError(f"truncation must be True, False, 'longest_first', 'only_first' or 'only_second', "
                             f"got {truncation!r}")
        if strategy is not None:
            limit = max_length or self.model_max_length
            self._tok.enable_truncation(min(limit, 2**31 - 1), strategy=strategy, direction=self.truncation_side)
        try:
            ids = [e.ids for e in self._tok.encode_batch(inputs, add_special_tokens=add_special_tokens)]
        finally:
            self._tok.no_truncation()
        masks = [[1] * len(x) for x in ids]
        self._pad_rows(ids, masks, padding, max_length, pad_to_multiple_of, padding_side)
        out = BatchEncoding(input_ids=ids if batched else ids[0])
        if return_attention_mask:
            out["attention_mask"] = masks if batched else masks[0]
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
        **kwargs: Any,
    ) -> BatchEncoding:
        """Pad encoded rows (a list of dicts, or a dict of lists) as `__call__` pads: what data
        collators call. Keys other than input_ids and attention_mask are kept as they are."""
        if isinstance(encoded_inputs, (list, tuple)):
            if not encoded_inputs or not all(isinstance(e, Mapping) for e in encoded_inputs):
                raise TypeError("pad() takes encodings: a dict of lists, or a non-empty list of dicts")
            encoded_inputs = {k: [e[k] for e in encoded_inputs] for k in encoded_inputs[0]}
        kwargs.pop("verbose", None)
        if kwargs:
            raise TypeError(f"pad() got unexpected arguments {sorted(kwargs)}")
        if "input_ids" not in encoded_inputs:
            raise ValueError(f"pad() needs input_ids among the encodings' keys, got {sorted(encoded_inputs)}")
        encoded_inputs = {k: v.tolist() if torch.is_tensor(v) else v for k, v in encoded_inputs.items()}
        rows = encoded_inputs["input_ids"]
        batched = len(rows) > 0 and not isinstance(rows[0], int)
        ids = [list(map(int, x)) for x in (rows if batched else [rows])]
        given = encoded_inputs.get("attention_mask")
        masks = [list(map(int, m)) for m in (given if batched else [given])] if given is not None else \
            [[1] * len(x) for x in ids]
        self._pad_rows(ids, masks, padding, max_length, pad_to_multiple_of, padding_side)
        out = BatchEncoding({k: v for k, v in encoded_inputs.items() if k not in ("input_ids", "attention_mask")})
        out["input_ids"] = ids if batched else ids[0]
        if return_attention_mask is not False:
            out["attention_mask"] = masks if batched else masks[0]
        return _as_tensors(out, return_tensors, batched, batch_axis=False)

    def _pad_rows(self, ids, masks, padding, max_length, multiple, side) -> None:
        # rows padded in place to the longest (or max_length), rounded up to `multiple`
        if padding in (False, None, "do_not_pad"):
            return
        if padding not in (True, "longest", "max_length"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        target = max_length if padding == "max_length" else max(len(x) for x in ids)
        if target is None:
            raise ValueError("padding='max_length' needs max_length")
        if multiple is not None:
            if not (isinstance(multiple, int) and multiple > 0):
                raise ValueError(f"pad_to_multiple_of must be a positive integer, got {multiple!r}")
            target = -(-target // multiple) * multiple
        pad_id = self.pad_token_id
        if pad_id is None:
            raise ValueError("this tokenizer has no pad_token; set tokenizer.pad_token = tokenizer.eos_token")
        side = side or self.padding_side
        for x, m in zip(ids, masks):
            n = target - len(x)
            if n > 0:
                if side == "left":
                    x[:0], m[:0] = [pad_id] * n, [0] * n
                else:
                    x.extend([pad_id] * n)
                    m.extend([0] * n)

    # ---- decoding ----------------------------------------------------------------------------
    def decode(
        self,
        token_ids: int | list[int] | torch.Tensor,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        if torch.is_tensor(token_ids):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        text = self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        clean = clean_up_tokenization_spaces
        if clean is None:
            clean = self.clean_up_tokenization_spaces
        return _clean_up(text) if clean else text

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        if torch.is_tensor(sequences):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in sequences]

    # ---- chat --------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]] | list[list[dict[str, Any]]],
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = True,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, str]] | None = None,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **template_kwargs: Any,
    ):
        """Render messages with the jinja chat template; tokenised (a BatchEncoding, or ids with
        return_dict=False) unless tokenize=False. Special tokens come from the template only.
        `tools` (JSON-schema dicts) and `documents` reach the template as in Transformers, and so
        does any other keyword; `tokenizer_kwargs` go to the tokenizer call."""
        if return_assistant_tokens_mask:
            raise ValueError("apply_chat_template: return_assistant_tokens_mask is not supported by moetorch "
                             "(it needs {% generation %} blocks in the template)")
        for what, items in (("tools", tools), ("documents", documents)):
            if items is not None and not (isinstance(items, (list, tuple)) and all(isinstance(t, dict) for t in items)):
                raise TypeError(f"apply_chat_template: {what} must be a list of dicts (JSON schemas for tools; "
                                f"Python functions are not converted), got {items!r}")
        template_kwargs.update({k: v for k, v in (("tools", tools), ("documents", documents)) if v is not None})
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat_template: pass chat_template= or set tokenizer.chat_template")
        if not conversation:
            raise ValueError("cannot apply a chat template to an empty conversation")
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be set")
        batched = isinstance(conversation[0], (list, tuple))
        chats = conversation if batched else [conversation]
        rendered = [
            render_chat(template, chat, add_generation_prompt, continue_final_message,
                        {**self.special_tokens_map, **template_kwargs})
            for chat in chats
        ]
        text = rendered if batched else rendered[0]
        if not tokenize:
            return text
        out = self(text, add_special_tokens=False, padding=padding, truncation=truncation,
                   max_length=max_length, return_tensors=return_tensors, **(tokenizer_kwargs or {}))
        return out if return_dict else out["input_ids"]


def render_chat(
    template: str, messages: list[dict[str, Any]], add_generation_prompt: bool, continue_final_message: bool,
    variables: dict[str, Any],
) -> str:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
    text = _compile(template).render(
        messages=[{k: v for k, v in m.items() if v is not None} for m in messages],
        add_generation_prompt=add_generation_prompt, **variables,
    )
    if continue_final_message:
        last = messages[-1].get("content")
        if not isinstance(last, str) or last.strip() not in text:
            raise ValueError("continue_final_message: the final message's content is not in the rendered chat")
        text = text[: text.rindex(last.strip()) + len(last.strip())]
    return text


_TEMPLATES: dict[str, Any] = {}


def _compile(template: str):
    if template not in _TEMPLATES:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            _TEMPLATES[template] = env.from_string(template)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"chat_template is not a valid jinja template: {e}") from e
    return _TEMPLATES[template]


def _as_tensors(out: BatchEncoding, return_tensors: str | None, batched: bool,
                batch_axis: bool = True) -> BatchEncoding:
    # an unbatched encoding gets a batch axis of 1 (as a tokenizer call returns it), unless not
    # `batch_axis` (as pad returns it)
    if return_tensors is None:
        return out
    if return_tensors != "pt":
        raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
    if batched and len({len(x) for x in out["input_ids"]}) > 1:
        raise ValueError("sequences have different lengths: pass padding=True to return tensors")
    try:
        return BatchEncoding({k: torch.tensor(v if batched or not batch_axis else [v]) for k, v in out.items()})
    except (ValueError, TypeError) as e:
        raise ValueError(f"cannot make tensors of the encodings' {sorted(out)}: {e}") from e


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
_CLASS_PADDING_SIDE = dict.fromkeys(LLAMA_CLASSES, "left")


def _as_llama_tokenizer(rust, config: dict[str, Any], model: dict[str, Any], file: Path) -> None:
    """Give `rust` Transformers 5's LlamaTokenizer pipeline: a byte-fallback BPE of the file's
    vocabulary and merges, no normalizer, a Metaspace pre-tokenizer that puts "▁" before the
    text's first word only (`legacy=False`, the default; before every piece between special tokens
    with `legacy=True`; never with `add_prefix_space=False`), and the matching decoder. `model`:
    tokenizer.json's model section (`file` names it in errors)."""
    from tokenizers import decoders, models, pre_tokenizers

    if model.get("type") != "BPE":
        raise ValueError(f"{file}: tokenizer_class {config['tokenizer_class']} needs a BPE model, got "
                         f"{model.get('type')!r}")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    rust.model = models.BPE(vocab=model.get("vocab", {}), merges=merges, fuse_unk=True, byte_fallback=True)
    prefix = config.get("add_prefix_space")
    prefix = True if prefix is None else bool(prefix)
    scheme = ("always" if config.get("legacy") else "first") if prefix else "never"
    rust.normalizer = None
    rust.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    rust.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))


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


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(dir)` returns a moetorch `Tokenizer`."""

    def __init__(self) -> None:
        raise TypeError("use AutoTokenizer.from_pretrained(path)")

    @staticmethod
    def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> Tokenizer:
        return Tokenizer.from_pretrained(path, **kwargs)
