"""`pipeline("text-generation", model=..., tokenizer=...)`: strings, lists of strings and chats."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from .hub import HUB_OPTIONS
from .tokenizer import Tokenizer

TASKS = ("text-generation",)
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
    **kwargs: Any,
) -> TextGenerationPipeline:
    """Build a pipeline; `model` is a loaded model, or a checkpoint directory, embedded model or
    Hub repository that `AutoModelForCausalLM.from_pretrained` loads with `model_kwargs` (and
    `revision`, `token`), as in Transformers; the tokenizer then comes from the same place."""
    if task not in TASKS:
        raise ValueError(f"unsupported task {task!r}; moetorch pipelines support {TASKS}")
    if model is None:
        raise ValueError("pipeline needs model= (a loaded moetorch model or a checkpoint directory)")
    model_kwargs = dict(model_kwargs or {})
    hub = {k: v for k, v in (("revision", revision), ("token", token)) if v is not None}
    hub.update({k: model_kwargs[k] for k in HUB_OPTIONS if k in model_kwargs})  # the tokenizer's too
    if isinstance(model, (str, os.PathLike)):
        from .auto import AutoModelForCausalLM

        path = model
        # the pipeline's own argument first, as in Transformers
        candidates = (dtype, torch_dtype, model_kwargs.pop("dtype", None), model_kwargs.pop("torch_dtype", None))
        dtype = next((d for d in candidates if d is not None), None)
        for name, given in (("device_map", device_map), ("device", device)):
            if name in model_kwargs and given is not None:
                raise ValueError(f"pipeline: `{name}` is given both as an argument and in model_kwargs; pass one")
        device_map = model_kwargs.pop("device_map", device_map)
        device = model_kwargs.pop("device", device)
        if trust_remote_code is not None:
            model_kwargs["trust_remote_code"] = trust_remote_code
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, device=device, device_map=device_map, **{**model_kwargs, **hub})
        tokenizer = tokenizer if tokenizer is not None else path
    elif device is not None or device_map is not None:
        from .modeling_utils import resolve_device

        model = model.to(resolve_device(device, device_map))
    if tokenizer is None:
        name = getattr(model, "name_or_path", None)
        if name is None:
            raise ValueError("pipeline needs tokenizer= when the model was not loaded from a directory")
        tokenizer = name
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer.from_pretrained(tokenizer, **hub)
    return TextGenerationPipeline(model, tokenizer, **kwargs)


def _is_chat(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) and "role" in m for m in x)


class TextGenerationPipeline:
    """Generate continuations; returns [{"generated_text": ...}] per input, as Transformers does."""

    def __init__(self, model, tokenizer: Tokenizer, **generate_defaults: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.generate_defaults = generate_defaults
        if getattr(tokenizer, "padding_side", None) == "right":  # as Transformers' pipeline sets it
            tokenizer.padding_side = "left"

    def generate_kwargs(self, call: dict) -> dict:
        """The `generate` arguments of a call: the call's, on top of the pipeline's own (unless the
        call passes a generation_config), plus `DEFAULTS` where nothing set them (the tokenizer's
        pad id too), as Transformers' pipeline adds them."""
        kwargs = call if "generation_config" in call else {**self.generate_defaults, **call}
        given = kwargs.get("generation_config")
        set_params = {**self.model.generation_config.to_diff_dict(),
                      **(given.to_diff_dict() if given is not None else {}), **kwargs}
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

    def __call__(
        self,
        text_inputs: str | list[str] | list[dict] | list[list[dict]],
        return_full_text: bool = True,
        return_tensors: bool = False,
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool | None = None,
        continue_final_message: bool | None = None,
        **generate_kwargs: Any,
    ):
        if isinstance(text_inputs, str) or _is_chat(text_inputs):
            return self._one(text_inputs, return_full_text, return_tensors, skip_special_tokens,
                             clean_up_tokenization_spaces, continue_final_message, generate_kwargs)
        if isinstance(text_inputs, (list, tuple)) and text_inputs:
            return [
                self._one(x, return_full_text, return_tensors, skip_special_tokens, clean_up_tokenization_spaces,
                          continue_final_message, generate_kwargs)
                for x in text_inputs
            ]
        raise TypeError("text_inputs must be a string, a chat (list of {'role', 'content'} dicts) or a list of those")

    @torch.no_grad()
    def _one(self, prompt, return_full_text, return_tensors, skip_special_tokens, clean_up, continue_final, gen_kwargs):
        tok = self.tokenizer
        if isinstance(prompt, str):
            enc = tok(prompt, return_tensors="pt")
        elif _is_chat(prompt):
            if continue_final is None:
                continue_final = prompt[-1]["role"] == "assistant"
            enc = tok.apply_chat_template(
                list(prompt), add_generation_prompt=not continue_final, continue_final_message=continue_final,
                return_tensors="pt",
            )
        else:
            raise TypeError(f"each input must be a string or a chat, got {type(prompt).__name__}")
        input_ids = enc["input_ids"].to(self.model.device)
        kwargs = self.generate_kwargs(gen_kwargs)
        kwargs.setdefault("tokenizer", tok)
        sequences = self.model.generate(input_ids, attention_mask=enc["attention_mask"].to(input_ids.device), **kwargs)
        if not torch.is_tensor(sequences):
            sequences = sequences.sequences
        results = []
        for seq in sequences.tolist():
            if return_tensors:
                results.append({"generated_token_ids": seq})
                continue
            new_text = tok.decode(seq[input_ids.shape[1]:], skip_special_tokens=skip_special_tokens,
                                  clean_up_tokenization_spaces=clean_up)
            if not return_full_text:
                results.append({"generated_text": new_text})
            elif isinstance(prompt, str):
                results.append({"generated_text": prompt + new_text})
            elif continue_final:
                last = dict(prompt[-1], content=prompt[-1]["content"] + new_text)
                results.append({"generated_text": [*prompt[:-1], last]})
            else:
                results.append({"generated_text": [*prompt, {"role": "assistant", "content": new_text}]})
        return results
