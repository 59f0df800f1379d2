"""`pipeline("text-generation", model=..., tokenizer=...)`: strings, lists of strings and chats;
`pipeline("text-classification")` (or "sentiment-analysis"): labels and scores of a classifier."""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import os
import types
from typing import Any

import torch

from .hub import HUB_OPTIONS
from .tokenizer import Tokenizer

logger = logging.getLogger("moetorch")

TASKS = ("text-generation", "text-classification", "sentiment-analysis")
CLASSIFICATION_TASKS = ("text-classification", "sentiment-analysis")
# Transformers' text-generation pipeline defaults, for the parameters that neither the call, the
# pipeline's own arguments, a passed generation_config nor the model's generation config set; the
# temperature only where the call samples.
DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}


def pipeline(
    task: str,
    model: Any = None,
    tokenizer: Tokenizer | str | os.PathLike | None = None,
    device: Any = None,
    device_map: Any = None,
    dtype: Any = None,
    torch_dtype: Any = None,
    revision: str | None = None,
    token: str | bool | None = None,
    trust_remote_code: bool | None = None,
    model_kwargs: dict[str, Any] | None = None,
    use_fast: bool = True,
    config: Any = None,
    feature_extractor: Any = None,
    image_processor: Any = None,
    processor: Any = None,
    video_processor: Any = None,
    pipeline_class: Any = None,
    **kwargs: Any,
) -> TextGenerationPipeline | TextClassificationPipeline:
    """Build a pipeline; `model` is a loaded model, or a checkpoint directory, embedded model or
    Hub repository that `AutoModelForCausalLM.from_pretrained` (for text classification,
    `AutoModelForSequenceClassification`) loads with `model_kwargs` (and
    `revision`, `token`), as in Transformers; the tokenizer then comes from the same place. `use_fast`
    is accepted and ignored: moetorch has one tokenizer implementation. `config` (a config or its
    directory) is the loaded model's config, as in Transformers; the processors of other
    modalities, a `pipeline_class` and an `assistant_tokenizer` are taken when None (these models
    have none) and refused otherwise. Other keywords are the pipeline's defaults for every call
    (generation parameters, return_full_text, prefix, batch_size...)."""
    if task not in TASKS:
        raise ValueError(f"unsupported task {task!r}; moetorch pipelines support {TASKS}")
    if model is None:
        raise ValueError("pipeline needs model= (a loaded moetorch model or a checkpoint directory)")
    others = {"feature_extractor": feature_extractor, "image_processor": image_processor, "processor": processor,
              "video_processor": video_processor, "pipeline_class": pipeline_class,
              "assistant_tokenizer": kwargs.pop("assistant_tokenizer", None)}
    given = [name for name, value in others.items() if value is not None]
    if given:
        raise ValueError(f"pipeline: {given} not supported: moetorch's text pipelines take a model and a tokenizer "
                         "(an assistant model must share the model's tokenizer)")
    model_kwargs = dict(model_kwargs or {})
    if isinstance(device, int) and device < 0:  # Transformers' spelling of the CPU
        device = "cpu"
    elif isinstance(device, int) and not torch.cuda.is_available():
        logger.warning("pipeline: device=%d, but no CUDA device is available: running on the CPU, as Transformers "
                       "does", device)
        device = "cpu"
    hub = {k: v for k, v in (("revision", revision), ("token", token)) if v is not None}
    hub.update({k: model_kwargs[k] for k in HUB_OPTIONS if k in model_kwargs})  # the tokenizer's too
    if isinstance(model, (str, os.PathLike)):
        from .auto import AutoModelForCausalLM, AutoModelForSequenceClassification

        path = model
        if {"dtype", "torch_dtype"} & model_kwargs.keys() and (dtype is not None or torch_dtype is not None):
            raise ValueError("pipeline: the dtype is given both as an argument and in model_kwargs; pass one")
        candidates = (dtype, torch_dtype, model_kwargs.pop("dtype", None), model_kwargs.pop("torch_dtype", None))
        dtype = next((d for d in candidates if d is not None), None)
        for name, given in (("device_map", device_map), ("device", device)):
            if name in model_kwargs and given is not None:
                raise ValueError(f"pipeline: `{name}` is given both as an argument and in model_kwargs; pass one")
        device_map = model_kwargs.pop("device_map", device_map)
        device = model_kwargs.pop("device", device)
        if trust_remote_code is not None:
            model_kwargs["trust_remote_code"] = trust_remote_code
        auto = AutoModelForSequenceClassification if task in CLASSIFICATION_TASKS else AutoModelForCausalLM
        if config is not None:
            model_kwargs.setdefault("config", config)
        model = auto.from_pretrained(path, dtype=dtype, device=device, device_map=device_map,
                                     **{**model_kwargs, **hub})
        tokenizer = tokenizer if tokenizer is not None else path
    elif device is not None or device_map is not None:
        from .modeling_utils import resolve_device

        model = model.to(resolve_device(device, device_map))
    if tokenizer is None:
        name = getattr(model, "name_or_path", None)
        if not name:  # (a model built from a config has the name "")
            raise ValueError("pipeline needs tokenizer= when the model was not loaded from a directory")
        tokenizer = name
    if isinstance(tokenizer, tuple):  # (name, its from_pretrained keywords), as Transformers takes it
        if len(tokenizer) != 2 or not isinstance(tokenizer[1], dict):
            raise ValueError(f"pipeline: a tokenizer given as a tuple is (name, keywords), got {tokenizer!r}")
        tokenizer = Tokenizer.from_pretrained(tokenizer[0], **{**hub, **tokenizer[1]})
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer.from_pretrained(tokenizer, **hub)
    classifier = getattr(model, "loss_type", None) == "ForSequenceClassification"
    if task in CLASSIFICATION_TASKS:
        if not classifier:
            raise ValueError(f"pipeline({task!r}) needs a sequence classifier (PhimoeForSequenceClassification, "
                             f"JetMoeForSequenceClassification), got {type(model).__name__}")
        return TextClassificationPipeline(model, tokenizer, device=device, **kwargs)
    if not hasattr(model, "generate"):
        raise ValueError(f"pipeline({task!r}) needs a causal LM (PhimoeForCausalLM, JetMoeForCausalLM), "
                         f"got {type(model).__name__}")
    return TextGenerationPipeline(model, tokenizer, device=device, **kwargs)


def _pipeline_device(model, device: Any) -> torch.device:
    """The device a pipeline reports and runs its inputs on: `device` as given (an index: that
    CUDA device, the CPU for -1 or where there is none), the model moved there if it is elsewhere;
    the model's own device when `device` is None."""
    if device is None:
        return model.device
    if isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}" if device >= 0 and torch.cuda.is_available() else "cpu"
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a torch.device, a string such as 'cuda:0' or an index, got {device!r}")
    device = torch.device(device)
    here = model.device
    if here.type != device.type or (device.index is not None and here.index not in (device.index, None)):
        model.to(device)
    return device


def _dataloader_seed_draw() -> None:
    """Transformers runs lists and generators through a torch DataLoader, whose iterator takes its
    base seed from torch's global RNG: one draw per call, before the first input is encoded."""
    torch.empty((), dtype=torch.int64).random_()


def _batch_size(value: Any) -> int:
    """A call's batch size (the pipeline's when the call gives none; 1 when neither does)."""
    value = 1 if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"batch_size should be a positive integer value, but got batch_size={value!r}")
    return value


def _key_dataset_chats(x: Any) -> list | None:
    """The items of Transformers' `KeyDataset` (by name: moetorch does not import Transformers)
    where they are chats, which Transformers' pipelines turn into a list of chats; else None (a
    dataset of texts stays lazy: only its first item is read here)."""
    if type(x).__name__ != "KeyDataset" or not isinstance(x, torch.utils.data.Dataset) or len(x) == 0 \
            or not _is_chat(x[0]):
        return None
    items = [x[i] for i in range(len(x))]
    return items if all(_is_chat(item) for item in items) else None


def _is_chat(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) and "role" in m for m in x)


_RETURN_TYPES = {0: "tensors", 1: "new_text", 2: "full_text"}


def _sanitize(return_full_text=None, return_tensors=None, return_text=None, clean_up_tokenization_spaces=None,
              prefix=None, handle_long_generation=None, stop_sequence=None, truncation=None, max_length=None,
              continue_final_message=None, skip_special_tokens=None, tokenizer_encode_kwargs=None, tools=None,
              documents=None, return_type=None, pipe_tokenizer=None, **generate_kwargs):
    """Split the arguments of a call (or the pipeline's own) into (preprocess, generate, postprocess)
    parameters, as Transformers' `TextGenerationPipeline._sanitize_parameters` does."""
    pre = {k: generate_kwargs.pop(k) for k in ("add_special_tokens", "padding") if k in generate_kwargs}
    named = dict(truncation=truncation, max_length=max_length, tools=tools, documents=documents, prefix=prefix,
                 continue_final_message=continue_final_message, tokenizer_encode_kwargs=tokenizer_encode_kwargs)
    pre.update({k: v for k, v in named.items() if v is not None})
    if max_length is not None:
        generate_kwargs["max_length"] = max_length
    if prefix:  # a total length given to generate() must count the prefix's tokens too
        ids = pipe_tokenizer(prefix, add_special_tokens=pre.get("add_special_tokens", False))["input_ids"]
        generate_kwargs["prefix_length"] = len(ids)
    if handle_long_generation is not None:
        if handle_long_generation != "hole":
            raise ValueError(f"{handle_long_generation} is not a valid value for `handle_long_generation` "
                             "parameter expected [None, 'hole']")
        pre["handle_long_generation"] = handle_long_generation
    pre.update(generate_kwargs)  # what 'hole' needs to know how many tokens will be generated
    if stop_sequence is not None:
        generate_kwargs["stop_strings"] = [stop_sequence] if isinstance(stop_sequence, str) else stop_sequence
        generate_kwargs["tokenizer"] = pipe_tokenizer
    post = {}
    if tools is not None:
        post["tools"] = tools
    # Transformers' `ReturnType` (TENSORS 0, NEW_TEXT 1, FULL_TEXT 2), which wins over the flags below
    return_type = _RETURN_TYPES.get(getattr(return_type, "value", return_type), return_type)
    if return_type not in (None, *_RETURN_TYPES.values()):
        raise ValueError(f"return_type must be a transformers ReturnType (or 0, 1, 2), got {return_type!r}")
    if return_full_text is not None and return_type is None:
        if return_text is not None:
            raise ValueError("`return_text` is mutually exclusive with `return_full_text`")
        if return_tensors is not None:
            raise ValueError("`return_full_text` is mutually exclusive with `return_tensors`")
        return_type = "full_text" if return_full_text else "new_text"
    if return_tensors is not None and return_type is None:
        if return_text is not None:
            raise ValueError("`return_text` is mutually exclusive with `return_tensors`")
        return_type = "tensors"
    named = dict(return_type=return_type, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                 continue_final_message=continue_final_message, skip_special_tokens=skip_special_tokens)
    post.update({k: v for k, v in named.items() if v is not None})
    return pre, generate_kwargs, post


class _Pipeline:
    """What every pipeline has, as Transformers' `Pipeline`: `device`, `dtype` (`torch_dtype`),
    `save_pretrained` / `push_to_hub` of its model and tokenizer, `device_placement()`, scikit's
    `predict` / `transform` (a call), and `call_count`."""

    model: Any
    tokenizer: Tokenizer
    _device: torch.device
    call_count = 0

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype | None:
        return getattr(self.model, "dtype", None)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return self.dtype

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """The model and the tokenizer into one directory, as Transformers' pipelines save them."""
        if os.path.isfile(save_directory):
            raise ValueError(f"pipeline.save_pretrained: {save_directory} is a file; give a directory")
        os.makedirs(save_directory, exist_ok=True)
        self.model.save_pretrained(save_directory, **kwargs)
        self.tokenizer.save_pretrained(save_directory, **{k: v for k, v in kwargs.items() if k == "push_to_hub"})

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """The model and the tokenizer to one Hub repository."""
        self.tokenizer.push_to_hub(repo_id, **kwargs)
        return self.model.push_to_hub(repo_id, **kwargs)

    @contextlib.contextmanager
    def device_placement(self):
        """Transformers' context for work on the pipeline's device: its CUDA device made current."""
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                yield
        else:
            yield

    def __repr__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.") if self.dtype is not None else None
        return f"{type(self).__name__}: {{'model': {type(self.model).__name__!r}, 'dtype': {dtype!r}, " \
               f"'device': {str(self.device)!r}}}"

    def predict(self, X):
        return self(X)

    def transform(self, X):
        return self(X)

    def _count(self) -> None:
        self.call_count += 1


class TextGenerationPipeline(_Pipeline):
    """Generate continuations; returns [{"generated_text": ...}] per input, as Transformers does."""

    task = "text-generation"

    def __init__(self, model, tokenizer: Tokenizer, batch_size: int | None = None, num_workers: int | None = None,
                 device: Any = None, **kwargs: Any) -> None:
        from .generation.configuration import DEFAULTS as GENERATION_FIELDS

        self.model = model
        self.tokenizer = tokenizer
        self._device = _pipeline_device(model, device)
        self.binary_output = bool(kwargs.pop("binary_output", False))  # (Transformers' serving flag: no effect here)
        if getattr(tokenizer, "padding_side", None) == "right":  # as Transformers' pipeline sets it
            tokenizer.padding_side = "left"
        # generation parameters apply to every call unless it passes a generation_config; the rest are
        # the pipeline's own defaults (return_full_text, prefix, ...), as in Transformers
        keys = {*GENERATION_FIELDS, "generation_config"} & kwargs.keys()
        self.generate_defaults = {k: kwargs.pop(k) for k in keys}
        self._batch_size = batch_size
        self._params = _sanitize(pipe_tokenizer=tokenizer, **kwargs)
        config_prefix = getattr(model.config, "prefix", None)
        if "prefix" not in self._params[0] and config_prefix is not None:
            pre, gen, _ = _sanitize(pipe_tokenizer=tokenizer, prefix=config_prefix, **self._params[1])
            self._params = ({**self._params[0], **pre}, {**self._params[1], **gen}, self._params[2])

    def generate_kwargs(self, call: dict) -> dict:
        """The `generate` arguments of a call: the call's, on top of the pipeline's own (unless the
        call passes a generation_config), plus `DEFAULTS` where nothing set them (the tokenizer's
        pad id too), as Transformers' pipeline adds them."""
        kwargs = call if "generation_config" in call else {**self.generate_defaults, **call}
        given = kwargs.get("generation_config")
        set_params = self._set_params(kwargs)
        defaults = dict(DEFAULTS)
        if getattr(self.tokenizer, "pad_token_id", None) is not None:
            defaults["pad_token_id"] = self.tokenizer.pad_token_id
        added = {k: v for k, v in defaults.items()
                 if k not in set_params and not (k == "max_new_tokens" and "max_length" in set_params)}
        if not {**set_params, **added}.get("do_sample"):
            added.pop("temperature", None)
        if given is None:
            return {**kwargs, **added}
        given = copy.deepcopy(given)
        given.update(**added)
        return {**kwargs, "generation_config": given}

    def _set_params(self, kwargs: dict) -> dict:
        """The generation parameters set by the model's generation config, a generation_config
        in `kwargs` and `kwargs` themselves."""
        given = kwargs.get("generation_config")
        return {**self.model.generation_config.to_diff_dict(),
                **(given.to_diff_dict() if given is not None else {}), **kwargs}

    def __call__(self, text_inputs, *, num_workers: int | None = None, batch_size: int | None = None,
                 **kwargs: Any):
        """Complete a prompt or chat, a list of them (a list of results), or a generator or torch
        Dataset of them (an iterator of results, run as they are asked for; a `KeyDataset` of chats
        gives a list, as in Transformers); `batch_size` > 1 generates that many prompts together,
        left-padded."""
        self._count()
        if isinstance(text_inputs, types.GeneratorType):
            try:  # a generator of messages is one chat, as in Transformers
                first = next(text_inputs)
            except StopIteration:
                text_inputs = []
            else:
                text_inputs = itertools.chain([first], text_inputs)
                if isinstance(first, dict) and "role" in first:
                    text_inputs = list(text_inputs)
        pre, gen, post = (({**own, **call}) for own, call in
                          zip(self._params, _sanitize(pipe_tokenizer=self.tokenizer, **kwargs)))
        if isinstance(text_inputs, str) or _is_chat(text_inputs):  # one input: no batches (nor their size)
            return self._run([self.preprocess(text_inputs, **pre)], gen, post)[0]
        batch_size = _batch_size(self._batch_size if batch_size is None else batch_size)
        if isinstance(text_inputs, itertools.chain):
            return self._iterate(text_inputs, batch_size, pre, gen, post)
        if (chats := _key_dataset_chats(text_inputs)) is not None:  # a list of chats there: a list of results
            text_inputs = chats
        elif isinstance(text_inputs, torch.utils.data.Dataset):  # (Transformers' KeyDataset, say): lazily, as there
            items = iter(text_inputs) if isinstance(text_inputs, torch.utils.data.IterableDataset) else \
                (text_inputs[i] for i in range(len(text_inputs)))
            return self._iterate(items, batch_size, pre, gen, post)
        if isinstance(text_inputs, (list, tuple)):
            return list(self._iterate(text_inputs, batch_size, pre, gen, post))
        raise TypeError("text_inputs must be a string, a chat (list of {'role', 'content'} dicts), a list of those, "
                        f"a generator of those or a torch Dataset of those, got {type(text_inputs).__name__}")

    def _iterate(self, inputs, batch_size: int, pre: dict, gen: dict, post: dict):
        if batch_size > 1 and self.tokenizer.pad_token_id is None:
            raise ValueError("batch_size > 1 needs a tokenizer with a pad token; you can set one with "
                             "`pipe.tokenizer.pad_token_id = model.config.eos_token_id`")
        return self._batches(inputs, batch_size, pre, gen, post)

    def _batches(self, inputs, batch_size: int, pre: dict, gen: dict, post: dict):
        _dataloader_seed_draw()
        batch = []
        for x in inputs:
            batch.append(self.preprocess(x, **pre))
            if len(batch) == batch_size:
                yield from self._run(batch, gen, post)
                batch = []
        if batch:
            yield from self._run(batch, gen, post)

    def preprocess(self, prompt, prefix="", handle_long_generation=None, add_special_tokens=None, truncation=None,
                   padding=None, max_length=None, continue_final_message=None, tokenizer_encode_kwargs=None,
                   tools=None, documents=None, **generate_kwargs) -> dict:
        """Encode one prompt (prefix + text) or chat, as Transformers' `preprocess`."""
        tok = self.tokenizer
        named = dict(add_special_tokens=add_special_tokens, truncation=truncation, padding=padding,
                     max_length=max_length)
        tok_kwargs = {k: v for k, v in named.items() if v is not None}
        tok_kwargs.update(tokenizer_encode_kwargs or {})
        if _is_chat(prompt):
            tok_kwargs.pop("add_special_tokens", None)  # the template places the special tokens
            if continue_final_message is None:
                continue_final_message = prompt[-1]["role"] == "assistant"
            enc = tok.apply_chat_template(
                list(prompt), add_generation_prompt=not continue_final_message,
                continue_final_message=continue_final_message, return_dict=True, return_tensors="pt",
                tools=tools, documents=documents, **tok_kwargs)
        elif isinstance(prompt, str):
            enc = tok(prefix + prompt, return_tensors="pt", **tok_kwargs)
        else:
            raise TypeError(f"each input must be a string or a chat, got {type(prompt).__name__}")
        enc = {"input_ids": enc["input_ids"], "attention_mask": enc.get("attention_mask")}
        if handle_long_generation == "hole":
            cur_len = enc["input_ids"].shape[-1]
            # as in Transformers, a call's max_length went to the tokenizer: it is not counted here
            params = self._set_params(self.generate_kwargs(generate_kwargs))
            new_tokens = params.get("max_new_tokens")
            if new_tokens is None:
                new_tokens = params["max_length"] - cur_len
                if new_tokens < 0:
                    raise ValueError(f"handle_long_generation='hole': we cannot infer how many new tokens are "
                                     f"expected (max_length {params['max_length']} < the prompt's {cur_len} tokens)")
            if cur_len + new_tokens > tok.model_max_length:
                keep_length = tok.model_max_length - new_tokens
                if keep_length <= 0:
                    raise ValueError(f"handle_long_generation='hole': the {new_tokens} new tokens asked for exceed "
                                     f"the model's max length (tokenizer.model_max_length={tok.model_max_length})")
                enc = {k: v[:, -keep_length:] if v is not None else None for k, v in enc.items()}
        enc["prompt"] = prompt
        return enc

    def _pad(self, items: list[dict], key: str, value: int) -> torch.Tensor:
        """Left- (or right-) pad the [1, L] tensors of `items` into one [B, max L] tensor."""
        width = max(x[key].shape[1] for x in items)
        out = torch.full((len(items), width), value, dtype=items[0][key].dtype)
        for i, x in enumerate(items):
            n = x[key].shape[1]
            if n:
                if self.tokenizer.padding_side == "left":
                    out[i, width - n:] = x[key][0]
                else:
                    out[i, :n] = x[key][0]
        return out

    @torch.no_grad()
    def _run(self, items: list[dict], gen_kwargs: dict, post: dict) -> list:
        """Generate for a batch of encoded prompts; one list of records per prompt."""
        if len(items) == 1:
            input_ids, mask = items[0]["input_ids"], items[0]["attention_mask"]
        else:
            input_ids = self._pad(items, "input_ids", self.tokenizer.pad_token_id)
            mask = None if items[0]["attention_mask"] is None else self._pad(items, "attention_mask", 0)
        in_b = input_ids.shape[0]
        if input_ids.shape[1] == 0:  # an empty prompt: generate() starts from the BOS token
            input_ids = mask = None
            in_b = 1
        else:
            input_ids = input_ids.to(self.device)
            mask = None if mask is None else mask.to(self.device)
        gen_kwargs = dict(gen_kwargs)
        prefix_length = gen_kwargs.pop("prefix_length", 0)
        kwargs = self.generate_kwargs(gen_kwargs)
        if prefix_length:  # a total length (rather than a number of new tokens) includes the prefix
            params = self._set_params(kwargs)
            for length, new_tokens in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
                if length in params and new_tokens not in params:
                    kwargs[length] = params[length] + prefix_length
        kwargs.setdefault("tokenizer", self.tokenizer)
        output = self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        sequences = output if torch.is_tensor(output) else output.sequences
        out_b = sequences.shape[0]
        extras = {}  # with return_dict_in_generate: the other per-sequence tensors, as Transformers adds them
        if not torch.is_tensor(output):
            for key, value in output.items():
                if key in ("sequences", "past_key_values"):
                    continue
                if isinstance(value, tuple) and value and torch.is_tensor(value[0]) and len(value[0]) == out_b:
                    value = torch.stack(value).swapaxes(0, 1)
                if torch.is_tensor(value) and value.shape[0] == out_b:
                    extras[key] = value.reshape(in_b, out_b // in_b, *value.shape[1:]).cpu()
        sequences = sequences.reshape(in_b, out_b // in_b, -1).cpu()
        prompt_len = 0 if input_ids is None else input_ids.shape[1]
        return [self.postprocess(items[i]["prompt"], sequences[i].tolist(), prompt_len,
                                 {k: v[i].tolist() for k, v in extras.items()}, **post) for i in range(in_b)]

    def postprocess(self, prompt, sequences: list, prompt_len: int, extras: dict, return_type="full_text",
                    clean_up_tokenization_spaces=None, continue_final_message=None, skip_special_tokens=None,
                    tools=None) -> list[dict]:
        """Decode each returned sequence of one prompt, as Transformers' `postprocess`."""
        skip = True if skip_special_tokens is None else skip_special_tokens
        records = []
        for idx, seq in enumerate(sequences):
            if return_type == "tensors":
                records.append({"generated_token_ids": seq})
                continue
            text = self.tokenizer.decode(seq[prompt_len:], skip_special_tokens=skip,
                                         clean_up_tokenization_spaces=clean_up_tokenization_spaces)
            if return_type == "full_text":
                if isinstance(prompt, str):
                    text = prompt + text
                else:
                    final = continue_final_message
                    if final is None:
                        final = prompt[-1]["role"] == "assistant"
                    if final:
                        text = [*prompt[:-1], dict(role=prompt[-1]["role"], content=prompt[-1]["content"] + text)]
                    else:
                        text = [*prompt, {"role": "assistant", "content": text}]
            records.append({"generated_text": text, **{k: v[idx] for k, v in extras.items()}})
        return records


_SCORE_FUNCTIONS = ("sigmoid", "softmax", "none")


class TextClassificationPipeline(_Pipeline):
    """Classify texts with a sequence classifier, as Transformers' text-classification pipeline:
    `pipe("text")` gives `[{"label", "score"}]` for the likeliest label; `top_k=k` the k likeliest,
    best first (`None`: every label); a list of inputs gives a list of results. An input is a text
    or a `{"text", "text_pair"}` dict (a pair). Scores are the logits through `function_to_apply`:
    by default none for regression, a sigmoid for one label or multi-label classification, else a
    softmax. Other keywords go to the tokenizer (truncation, max_length, ...). Inputs run one at a
    time (`batch_size` is taken and changes nothing: the scores are those of unpadded rows)."""

    task = "text-classification"

    def __init__(self, model, tokenizer: Tokenizer, batch_size: int | None = None, num_workers: int | None = None,
                 device: Any = None, **kwargs: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._device = _pipeline_device(model, device)
        self._batch_size = batch_size
        self._params = self._sanitize(**kwargs)

    @staticmethod
    def _sanitize(function_to_apply=None, top_k="", **tokenizer_kwargs) -> tuple[dict, dict]:
        """(tokenizer, postprocess) parameters; `top_k` counts only as an int or None, as there."""
        post = {}
        if isinstance(top_k, int) or top_k is None:
            if isinstance(top_k, bool) or (top_k is not None and top_k < 1):
                raise ValueError(f"top_k must be a positive integer or None (every label), got {top_k!r}")
            post.update(top_k=top_k, _legacy=False)
        if function_to_apply is not None:
            name = getattr(function_to_apply, "value", function_to_apply)  # (Transformers' ClassificationFunction)
            if not isinstance(name, str) or name.lower() not in _SCORE_FUNCTIONS:
                raise ValueError(f"function_to_apply must be one of {_SCORE_FUNCTIONS}, got {function_to_apply!r}")
            post["function_to_apply"] = name.lower()
        return tokenizer_kwargs, post

    def __call__(self, inputs, *, num_workers: int | None = None, batch_size: int | None = None, **kwargs: Any):
        self._count()
        pre, post = (({**own, **call}) for own, call in zip(self._params, self._sanitize(**kwargs)))
        if isinstance(inputs, (str, dict, tuple)):  # (a tuple is one tokenizer input, as there)
            result = self._classify(inputs, pre, post)
            return [result] if isinstance(inputs, str) and "top_k" not in kwargs else result
        _batch_size(self._batch_size if batch_size is None else batch_size)  # checked for batches, as there
        if isinstance(inputs, (list, types.GeneratorType, torch.utils.data.Dataset)):
            _dataloader_seed_draw()
            results = (self._classify(x, pre, post) for x in inputs)
            return list(results) if isinstance(inputs, list) else results
        raise TypeError("inputs must be a text, a {'text', 'text_pair'} dict, or a list (or generator) of those, "
                        f"got {type(inputs).__name__}")

    @torch.no_grad()
    def _classify(self, x, pre: dict, post: dict):
        if isinstance(x, list) and len(x) == 1 and isinstance(x[0], list) and len(x[0]) == 2:
            x = {"text": x[0][0], "text_pair": x[0][1]}  # ([[text, pair]], Transformers' older form of a pair)
        if isinstance(x, dict):
            encoded = self.tokenizer(**x, return_tensors="pt", **pre)
        elif isinstance(x, (str, tuple)):
            encoded = self.tokenizer(x, return_tensors="pt", **pre)
        else:
            raise ValueError("The pipeline received invalid inputs, if you are trying to send text pairs, you can try "
                             'to send a dictionary `{"text": "My text", "text_pair": "My pair"}` in order to send a '
                             "text pair.")
        encoded = {k: v.to(self.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
        logits = self.model(**encoded, use_cache=False).logits[0]
        return self.postprocess(logits, **post)

    def postprocess(self, logits: torch.Tensor, function_to_apply: str | None = None, top_k: int | None = 1,
                    _legacy: bool = True):
        config = self.model.config
        if function_to_apply is None:
            if config.problem_type == "regression":
                function_to_apply = "none"
            elif config.problem_type == "multi_label_classification" or config.num_labels == 1:
                function_to_apply = "sigmoid"
            else:
                function_to_apply = "softmax"
        x = logits.float().cpu()
        if function_to_apply == "sigmoid":
            scores = 1.0 / (1.0 + torch.exp(-x))
        elif function_to_apply == "softmax":
            shifted = torch.exp(x - x.max())
            scores = shifted / shifted.sum()
        else:
            scores = x
        if top_k == 1 and _legacy:
            return {"label": config.id2label[int(scores.argmax())], "score": scores.max().item()}
        ranked = [{"label": config.id2label[i], "score": score} for i, score in enumerate(scores.tolist())]
        if not _legacy:
            ranked.sort(key=lambda r: r["score"], reverse=True)
            ranked = ranked if top_k is None else ranked[:top_k]
        return ranked
