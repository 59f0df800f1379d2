"""`GenerationMixin.generate`: greedy search, multinomial sampling, beam search (and beam sampling),
assisted decoding and classifier-free guidance, with Transformers' arguments, processors, stopping
rules and outputs.

Legend: B prompts, R rows (prompts times beams or returned sequences), N beams per prompt,
K candidates kept per prompt and step, L tokens in the id sequence, V vocabulary.

Each step feeds the model only the tokens its cache lacks and asks for the last logits only
(`logits_to_keep`). The loop reads the device once per step to decide whether to stop, and not at
all when only `max_length` can stop it (no EOS, stop strings or custom criteria). On a GPU it reads
the step before's stop flag (`_OneStepLate`), so the next step is queued before the host waits, and
drops the step past the last.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..cache import Cache, DynamicCache, StaticCache, _carry_over_hint
from ..engine.batching import ContinuousBatchingMixin
from ..engine.cuda_graph import (
    CHUNK_BUCKETS,
    GraphedChunk,
    GraphedDecodeStep,
    GraphedPrefill,
    _longrope,
    _rotary,
    own_forward,
)
from ..ops import fused
from ..outputs import ModelOutput, takes_cache_name
from ..utils import outside_vocabulary, warn_once
from .configuration import DEFAULTS, GenerationConfig, as_generation_config
from .custom import (
    PeerSync,
    load_custom_generate,
    model_defaults_layer,
    own_arguments,
    synced,
    uses_model_defaults,
)
from .logits_process import (
    NEG_INF,
    EncoderNoRepeatNGramLogitsProcessor,
    EncoderRepetitionPenaltyLogitsProcessor,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    ExponentialDecayLengthPenalty,
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
    UnbatchedClassifierFreeGuidanceLogitsProcessor,
)
from .stopping_criteria import (
    ConfidenceCriteria,
    EosTokenCriteria,
    MaxLengthCriteria,
    MaxTimeCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)

logger = logging.getLogger("moetorch")

# Slots a static cache's length rounds up to, so that calls of nearby lengths share a kept one.
STATIC_CACHE_BUCKET = 256
# Keyword arguments of generate() that are model inputs rather than GenerationConfig fields.
MODEL_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "past_key_values", "tokenizer")
# Transformers settings moetorch does not implement, with their no-op values. Those that pick a decoding
# mode of Transformers' that moetorch lacks (`_other_modes`) are an error where the caller sets them (a
# keyword argument, or the generation_config passed), a warning where the model's own config does;
# the rest change no token (hints, or no effect with the other settings): a warning.
_UNSUPPORTED = {
    "penalty_alpha": None, "num_beam_groups": 1, "diversity_penalty": 0.0, "constraints": None,
    "force_words_ids": None, "dola_layers": None, "token_healing": False,
    "assistant_early_exit": None, "low_memory": None, "use_mtp": False, "speculation_type": None,
}
# Model inputs Transformers hands to every forward that change nothing generate returns: accepted.
_IGNORED_INPUTS = ("output_router_logits", "logits_to_keep")
class GenerateArgumentError(TypeError, ValueError):
    """An unknown or unsupported keyword argument to `generate()`: a TypeError, as Python raises for
    a keyword a function does not take, and a ValueError, as Transformers raises for model keywords
    the model does not use, so that either `except` catches it."""


# Transformers' "impossible" score: large enough to never win, small enough to stay finite.
_NEVER = -1.0e9


@dataclass(repr=False, eq=False)
class GenerateDecoderOnlyOutput(ModelOutput):
    """`generate(..., return_dict_in_generate=True)` for greedy search, sampling and assisted decoding.

    `scores`/`logits`: one [R, V] tensor per generated token (processed / raw); `attentions` and
    `hidden_states`: the model's, per step; `past_key_values`: the cache.
    """

    sequences: torch.LongTensor | None = None
    scores: tuple[torch.FloatTensor, ...] | None = None
    logits: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    past_key_values: Any = None


@dataclass(repr=False, eq=False)
class GenerateBeamDecoderOnlyOutput(ModelOutput):
    """`generate(..., return_dict_in_generate=True)` for beam search.

    `sequences_scores` (with `output_scores`): each returned beam's length-penalised log-probability;
    `scores`: the processed log-probabilities of every running beam, per step; `beam_indices`: for
    each returned sequence and step, the (batch-flattened) beam its token was chosen from.
    """

    sequences: torch.LongTensor | None = None
    sequences_scores: torch.FloatTensor | None = None
    scores: tuple[torch.FloatTensor, ...] | None = None
    logits: tuple[torch.FloatTensor, ...] | None = None
    beam_indices: torch.LongTensor | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    past_key_values: Any = None


class _Context:
    """What a forward needs beside the token ids.

    `mask`/`positions`: the prompt's padding mask and position ids (None without padding; later
    tokens are real and follow the last prompt position). `embeds`: prompt embeddings, fed by the
    first forward only. `offset`: leading context tokens that are not in the id sequence (a prompt
    given only as embeddings).
    """

    def __init__(self, mask, positions, embeds, offset: int) -> None:
        self.mask_BP, self.positions_BP, self.embeds, self.offset = mask, positions, embeds, offset
        self.step = None  # a GraphedDecodeStep for single-token steps, when one is in use
        self.prefill = None  # a GraphedPrefill for the prompt, when one is in use
        self.chunk = None  # a GraphedChunk for verify forwards (assisted decoding), when one is in use
        # The key width of the attentions a step returns, where a cache generate made is wider than
        # Transformers' would be (`_attention_width`); None: as the forward gives them.
        self.key_width: Callable[[], int] | None = None
        self._pad: int | None = None

    @property
    def rope_pad(self) -> int:
        """Prompt columns past the largest position + 1 (read once; 0 without positions): every
        row's left padding, or positions the caller gave. LongRoPE's sequence length, that largest
        position + 1, is the cached + new tokens less these."""
        if self._pad is None:
            p = self.positions_BP
            self._pad = 0 if p is None else p.shape[1] - 1 - int(p.max())
        return self._pad

    def mask(self, end: int) -> torch.Tensor | None:
        m = self.mask_BP
        if m is None or end <= m.shape[1]:
            return m if m is None else m[:, :end]
        return torch.cat([m, m.new_ones(m.shape[0], end - m.shape[1])], dim=1)

    def positions(self, start: int, end: int) -> torch.Tensor | None:
        p = self.positions_BP
        if p is None:
            return None
        P = p.shape[1]
        parts = [p[:, start:end]] if start < P else []
        if end > P:
            parts.append(p[:, -1:] + torch.arange(max(start, P) - P + 1, end - P + 1, device=p.device))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _forward(model, seq_RL: torch.Tensor, ctx: _Context, cache: Cache | None, keep: int,
             output_attentions: bool = False, output_hidden_states: bool = False):
    """Run `model` on the tokens of `seq_RL` (plus context) that `cache` does not hold yet."""
    past = cache.get_seq_length() if cache is not None else 0
    end = ctx.offset + seq_RL.shape[1]
    if ctx.embeds is not None:
        ids, embeds, ctx.embeds = None, ctx.embeds[:, past:], None
    else:
        ids, embeds = seq_RL[:, past - ctx.offset :], None
    start = end - (ids if ids is not None else embeds).shape[1]
    device = seq_RL.device
    if isinstance(cache, _OwnCache):  # an assistant of another library, on its own cache
        out = model(input_ids=ids, attention_mask=ctx.mask(end), position_ids=ctx.positions(start, end),
                    past_key_values=cache.inner, use_cache=True, cache_position=torch.arange(start, end, device=device),
                    logits_to_keep=keep, return_dict=True)
        cache.inner = out.past_key_values
        return out
    if cache is not None and _longrope(model) is not None:
        cache.rope_pad = ctx.rope_pad  # (LongRoPE counts the batch's real tokens, as its positions do)
    # the graphed runs take token ids, record nothing, and serve the cache they were made for (not,
    # say, an assistant's draft cache)
    graphs = ids is not None and not (output_attentions or output_hidden_states)
    if graphs and ctx.prefill is not None and ctx.prefill.cache is cache and past == 0 and keep == 1:
        logits = ctx.prefill(ids, ctx.mask(end), ctx.positions(start, end))
        if logits is not None:
            return _StepOutput(logits[:, None])
    if graphs and ctx.step is not None and ctx.step.cache is cache and ids.shape[1] == 1 and past > 0:
        # the prompt's mask (later columns are ones) and host ints where every row shares the value:
        # the step then writes its buffers only where they change
        positions = ctx.positions(start, end)
        logits = ctx.step(ids, ctx.mask_BP, start if positions is None else positions, start)
        return _StepOutput(logits[:, None])
    if graphs and ctx.chunk is not None and ctx.chunk.cache is cache and ids.shape[1] > 1 and past > 0:
        # a verify forward (every token's logits), or an assistant catching up on the kept tokens (the last's)
        logits = ctx.chunk(ids, ctx.mask_BP, ctx.positions(start, end), start)
        if logits is not None:
            return _StepOutput(logits[:, -keep:])
    out = model(
        input_ids=ids,
        inputs_embeds=embeds,
        attention_mask=ctx.mask(end),
        position_ids=ctx.positions(start, end),
        past_key_values=cache,
        use_cache=cache is not None,
        cache_position=torch.arange(start, end, device=device) if cache is not None else None,
        logits_to_keep=keep,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        output_router_logits=False,
        return_dict=True,
    )
    if out.logits.device != device:  # a head placed on another device than the embeddings
        out.logits = out.logits.to(device)
    return out


class _HeldDecode:
    """The static cache, graphed decode step, graphed prefill and graphed verify chunks a model
    keeps between `generate` calls. Copies and pickles of the model carry an empty one (graphs cannot be copied)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.key, self.cache, self.step, self.prefill, self.chunk = None, None, None, None, None
        # rows that repeat a prompt (beams, num_return_sequences) -> (the cache's view of one row per
        # prompt, that view's graphed prefill)
        self.prompt_views: dict[int, tuple[StaticCache, GraphedPrefill]] = {}

    def runner_for(self, kind: str, model, cache: StaticCache, batch: int):
        """The held cache's graphed runner of `kind` ("step": GraphedDecodeStep, "prefill":
        GraphedPrefill, "chunk": GraphedChunk), made on first use; None for any other cache."""
        if self.cache is not cache:
            return None
        if getattr(self, kind) is None:
            make = {"step": GraphedDecodeStep, "prefill": GraphedPrefill, "chunk": GraphedChunk}[kind]
            setattr(self, kind, make(model, cache, batch))
        return getattr(self, kind)

    def prompt_view_for(self, model, cache: StaticCache, repeats: int, rows: int):
        """(The held cache's view of every `repeats`-th of its `rows` rows, that view's graphed
        prefill), made on first use, for a prompt run once for the rows that repeat it; None for
        any other cache."""
        if self.cache is not cache:
            return None
        if repeats not in self.prompt_views:
            view = cache.rows_view(repeats, rows, model.device, model.dtype)
            self.prompt_views[repeats] = view, GraphedPrefill(model, view, rows // repeats)
        return self.prompt_views[repeats]

    def __deepcopy__(self, memo) -> _HeldDecode:
        return _HeldDecode()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.clear()


class _OwnCache:
    """The cache of an assistant of another library (a Transformers model): the assistant makes its
    own in its first forward, and this holds it; it is truncated as moetorch's caches are."""

    def __init__(self) -> None:
        self.inner = None

    def get_seq_length(self) -> int:
        return 0 if self.inner is None else self.inner.get_seq_length()

    def truncate(self, length: int) -> None:
        excess = self.get_seq_length() - length
        if excess > 0:
            self.inner.crop(-excess)  # Transformers' caches drop the last -n tokens for a negative n


class _StepOutput:
    """The part of a model output the decode loop reads, from a graphed step."""

    attentions = hidden_states = None

    def __init__(self, logits) -> None:
        self.logits = logits


class _Record:
    """The per-step outputs `return_dict_in_generate` asked for (None where not asked)."""

    def __init__(self, gen: GenerationConfig, key_width: Callable[[], int] | None = None) -> None:
        on = bool(gen.return_dict_in_generate)
        self.scores = () if on and gen.output_scores else None
        self.logits = () if on and gen.output_logits else None
        self.attentions = () if on and gen.output_attentions else None
        self.hidden_states = () if on and gen.output_hidden_states else None
        self.key_width = key_width

    def add(self, scores, logits, out) -> None:
        if self.scores is not None:
            self.scores += (scores,)
        if self.logits is not None:
            self.logits += (logits,)
        if self.attentions is not None:
            attentions = out.attentions
            if self.key_width is not None:
                width = self.key_width()
                attentions = tuple(_key_columns(a, width) for a in attentions)
            self.attentions += (attentions,)
        if self.hidden_states is not None:
            self.hidden_states += (out.hidden_states,)


def _key_columns(a: torch.Tensor, width: int) -> torch.Tensor:
    """Attention weights [..., keys] cut, or padded with zeros (a static cache's unwritten slots,
    which the mask gives weight 0), to `width` keys."""
    extra = a.shape[-1] - width
    return a[..., :width] if extra >= 0 else torch.nn.functional.pad(a, (0, -extra))


def _same_kind(custom: Any, built: Any) -> bool:
    """Whether `custom` is of the built-in's class, or of Transformers' class of that name (which a
    script may still import): either replaces the built-in, as in Transformers."""
    kind = type(custom)
    return kind is type(built) or (kind.__name__ == type(built).__name__
                                   and kind.__module__.startswith("transformers."))


def _merge(default: list, custom: list | None, kind: str) -> list:
    """Transformers' merge: a custom item replaces the default of the same class, the rest follow."""
    if not custom:
        return default
    merged = type(default)()
    for item in default:
        same = next((c for c in custom if _same_kind(c, item)), None)
        if same is not None:
            logger.warning("a custom %s %s replaces the one generate() built from its settings",
                           kind, type(item).__name__)
        merged.append(same if same is not None else item)
    merged.extend(c for c in custom if not any(c is m for m in merged))
    return merged


def _gather_beams(t: torch.Tensor, idx_BN: torch.Tensor) -> torch.Tensor:
    """t[b, idx[b, n], ...] for a [B, M, ...] tensor."""
    idx = idx_BN.reshape(*idx_BN.shape, *([1] * (t.dim() - 2)))
    return torch.take_along_dim(t, idx, dim=1)


class GenerationMixin(ContinuousBatchingMixin):
    """`generate()` for causal LMs whose forward takes Transformers' arguments (moetorch models).

    `model.generation_config` starts from the model config's special tokens and is replaced by
    `generation_config.json` when `from_pretrained` finds one.
    """

    # Replay single-token decode steps on a StaticCache as CUDA graphs (on CUDA devices).
    decode_graphs: bool = True
    # With them, replay prompts of a length bucket seen before from CUDA graphs too (GraphedPrefill).
    prefill_graphs: bool = True
    # Greedy search, sampling and beam search read whether to stop (and a streamer's tokens) one
    # step late (`_OneStepLate`): None on CUDA devices only, True or False everywhere. Only where
    # nothing outside generate() sees the step past the end that this computes.
    lagged_stop: bool | None = None
    # Beam search on a StaticCache reorders the cache's slot_rows (one index per row and slot) and
    # leaves the keys and values in place (`StaticCache.use_slot_rows`); False moves them instead.
    beam_slot_rows: bool = True
    # On a StaticCache, a prompt repeated for several rows (beams, num_return_sequences) runs once,
    # into the first row of its group, which the group's other rows read through the cache's
    # slot_rows (`_prompt_once`); for beam search only with beam_slot_rows.
    prompt_once: bool = True

    @property
    def generation_config(self) -> GenerationConfig:
        gen = self.__dict__.get("_generation_config")
        if gen is None:
            gen = GenerationConfig.from_model_config(self.config)
            self.__dict__["_generation_config"] = gen
        return gen

    @generation_config.setter
    def generation_config(self, value: GenerationConfig) -> None:
        self.__dict__["_generation_config"] = as_generation_config(value)

    @takes_cache_name
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The forward's keyword arguments for one generation step, built as Transformers'
        `GenerationMixin.prepare_inputs_for_generation` builds them: the last
        `next_sequence_length` ids (or, on the first iteration, `inputs_embeds` in their place),
        `past_key_values`, `position_ids` cut to the same length, the attention mask, and every
        other keyword except `labels`; tensors moved to the model's device when the ids are
        elsewhere. The attention mask passes as given: moetorch's forward builds its own masks
        from a 2D one, for a static cache too, where Transformers makes it 4D first.

        Libraries that wrap a model call it (PEFT reads it when it wraps a causal LM). moetorch's
        own `generate` builds its steps itself and does not call it."""
        inputs: dict[str, Any] = {}
        if inputs_embeds is not None and is_first_iteration:
            if next_sequence_length is not None:
                inputs_embeds = inputs_embeds[:, -next_sequence_length:]
            inputs["input_ids"] = None
            inputs["inputs_embeds"] = inputs_embeds.clone(memory_format=torch.contiguous_format)
            length = inputs_embeds.shape[1]
        else:
            if next_sequence_length is not None:
                input_ids = input_ids[:, -next_sequence_length:]
            inputs["input_ids"] = input_ids.clone(memory_format=torch.contiguous_format)
            length = input_ids.shape[1]
        if past_key_values is not None:
            inputs["past_key_values"] = past_key_values
        position_ids = kwargs.pop("position_ids", None)
        if position_ids is not None:
            if position_ids.shape[-1] != length:
                position_ids = position_ids[..., -length:].clone(memory_format=torch.contiguous_format)
            inputs["position_ids"] = position_ids
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        for key, value in kwargs.items():
            if key not in ("labels", "next_sequence_length") and key not in inputs:
                inputs[key] = value
        first = inputs["inputs_embeds"] if inputs["input_ids"] is None else inputs["input_ids"]
        if first is not None and self.device.type != "meta" and first.device != self.device:
            inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        return inputs

    @takes_cache_name
    @torch.no_grad()
    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]] | None = None,
        synced_gpus: bool | None = None,
        assistant_model: Any = None,
        streamer: Any = None,
        negative_prompt_ids: torch.LongTensor | None = None,
        negative_prompt_attention_mask: torch.LongTensor | None = None,
        use_model_defaults: bool | None = None,
        custom_generate: str | os.PathLike | Callable | None = None,
        **kwargs: Any,
    ) -> Any:
        """Generate token ids after a prompt, as Transformers' `generate` does.

        The prompt is `inputs` (or `input_ids=`) [B, L], with `attention_mask` for left padding, or
        `inputs_embeds` [B, L, D]. Settings come from `generation_config` (default:
        `self.generation_config`) and keyword arguments, which override it: e.g.
        `max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`, `min_p`, `num_beams`,
        `repetition_penalty`, `eos_token_id`, `stop_strings` (with `tokenizer=`), `use_cache`,
        `cache_implementation`, `return_dict_in_generate`, `output_scores`, `output_logits`.
        A `past_key_values` cache may be passed to continue from it.

        Strategy: beam search when `num_beams > 1`, assisted decoding with `assistant_model`
        (greedy, batch 1), otherwise greedy search or sampling (`do_sample`). `guidance_scale != 1`
        adds classifier-free guidance against `negative_prompt_ids` (default: the prompt's last
        token). `streamer.put`/`end` receive the tokens as they come (batch 1, not beam search).

        `use_model_defaults=False` runs a passed `generation_config` without the model's defaults
        (its special tokens aside). `custom_generate`: a callable that replaces the decoding loop,
        or a local directory whose `custom_generate/generate.py` replaces this method
        (`generation/custom.py`; a Hub repository's with `trust_remote_code=True`). `synced_gpus=True`
        keeps stepping until every process of the default torch.distributed group is done (the
        default under FSDP with several processes).

        Returns the sequences [R, L + new] (for an embeddings-only prompt: the new tokens only),
        or a `GenerateDecoderOnlyOutput` / `GenerateBeamDecoderOnlyOutput` with
        `return_dict_in_generate=True`. Finished rows are padded with `pad_token_id`.
        """
        trust_remote_code = bool(kwargs.pop("trust_remote_code", False))
        if isinstance(custom_generate, (str, os.PathLike)):
            fn = load_custom_generate(custom_generate, trust_remote_code)
            return fn(
                model=self, inputs=inputs, generation_config=generation_config, logits_processor=logits_processor,
                stopping_criteria=stopping_criteria, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
                synced_gpus=synced_gpus, assistant_model=assistant_model, streamer=streamer,
                negative_prompt_ids=negative_prompt_ids, negative_prompt_attention_mask=negative_prompt_attention_mask,
                use_model_defaults=use_model_defaults, **kwargs,
            )
        if custom_generate is not None and not callable(custom_generate):
            raise TypeError("custom_generate must be a callable or a local directory path, "
                            f"got {type(custom_generate).__name__}")
        own = {} if custom_generate is None else {
            k: kwargs.pop(k) for k in own_arguments(custom_generate) if k in kwargs
        }
        _check_no_input_hook(self)
        sync = synced(synced_gpus, self)
        gen, model_inputs = self._generation_settings(generation_config, kwargs, use_model_defaults)
        tokenizer = model_inputs.pop("tokenizer", None)
        cache = model_inputs.pop("past_key_values", None)
        given_positions = model_inputs.pop("position_ids", None)
        seq, embeds, offset, mask = self._prompt(inputs, gen, model_inputs, _held_tokens(cache))
        user_cache = cache is not None
        device = seq.device

        eos = None if gen.eos_token_id is None else torch.tensor(
            [gen.eos_token_id] if isinstance(gen.eos_token_id, int) else list(gen.eos_token_id), device=device
        )
        pad_id = gen.pad_token_id if gen.pad_token_id is not None else _first_eos(gen)
        _warn_negative_ids(gen)
        mask, positions = _padding(seq, mask, pad_id, eos)
        if given_positions is not None:  # the prompt's positions as given; later tokens count on from each row's last
            positions = _given_positions(given_positions, seq.shape[0], offset + seq.shape[1]).to(device)

        expand = max(gen.num_beams, gen.num_return_sequences)
        _check_token_ids(gen, getattr(self.config, "vocab_size", None))
        if cache is not None:
            _check_user_cache(cache, gen, expand)
            _uncache_the_last_prompt_token(cache, offset + seq.shape[1])
            if isinstance(cache, StaticCache) and self.spans_devices:
                raise ValueError("a StaticCache holds every layer's keys on one device, but this model is placed "
                                 f"over {', '.join(map(str, self.parameter_devices()))}: pass a DynamicCache, or none")
        if expand > 1:
            seq = seq.repeat_interleave(expand, dim=0)
            mask, positions, embeds = (
                None if t is None else t.repeat_interleave(expand, dim=0) for t in (mask, positions, embeds)
            )
        # an embeddings-only prompt counts in max_length and min_length, a cache's tokens do not
        max_length, min_length = self._lengths(gen, seq.shape[1], offset, counted=embeds is not None)
        if isinstance(cache, StaticCache) and cache.max_cache_len < max_length + offset - 1:
            raise ValueError(f"past_key_values: the StaticCache's max_cache_len={cache.max_cache_len} is shorter than "
                             f"the {max_length + offset - 1} tokens this call caches (the prompt and the new tokens "
                             "but the last): make a longer one, or ask for fewer new tokens")
        drafted = assistant_model is not None or gen.prompt_lookup_num_tokens is not None
        # LongRoPE with a batch whose every row pads (or positions given that stop short of the
        # slots): its switch comes past `original_max_position_embeddings` slots, so the replay
        # record that rebuilds the cache is longer than a held cache's graphs write: a fresh cache,
        # eagerly (a held cache's record always ends at that many slots)
        ctx = _Context(mask, positions, embeds, offset)
        padded_switch = _longrope(self) is not None and ctx.rope_pad > 0
        if cache is None and gen.use_cache:
            # On a GPU, greedy search, sampling, beam search and assisted decoding default to the
            # static cache, whose steps replay as CUDA graphs.
            one_device = not self.spans_devices
            default_static = (gen.cache_implementation is None and self.device.type == "cuda" and one_device
                              and custom_generate is None and not sync)
            if gen.cache_implementation == "static" and not one_device:
                logger.warning("cache_implementation='static' needs the model on one device; this model is "
                               "placed over %s, so generate uses a dynamic cache (the same tokens, without "
                               "CUDA graphs)", ", ".join(map(str, self.parameter_devices())))
            elif gen.cache_implementation == "static" or default_static:
                # The last token is never fed back, hence the -1; assisted decoding feeds every
                # token, and pads its verify chunks past the last (GraphedChunk). A cache that is
                # not handed back may be the last call's, with its captured decode graphs.
                reuse = custom_generate is None and not gen.return_dict_in_generate and not padded_switch
                room = max(CHUNK_BUCKETS[-1], gen.prompt_lookup_num_tokens or 0) if drafted else -1
                cache = self._static_cache(seq.shape[0], _cache_length(gen, max_length + offset, room), reuse)
                ctx.key_width = self._attention_width(gen, max_length + offset - 1, cache, default_static)
            else:
                cache = DynamicCache()

        processors = self._logits_processors(
            gen, seq, min_length, max_length, mask, eos, prefix_allowed_tokens_fn, logits_processor,
            negative_prompt_ids, negative_prompt_attention_mask,
        )
        criteria = self._stopping_criteria(gen, max_length, eos, tokenizer, stopping_criteria)
        if streamer is not None:
            if gen.num_beams > 1:
                raise ValueError("`streamer` cannot be used with beam search: set num_beams=1")
            missing = [m for m in ("put", "end") if not callable(getattr(streamer, m, None))]
            if missing:
                raise TypeError(f"streamer: a {type(streamer).__name__} has no {' or '.join(missing)} method; a "
                                "streamer takes each step's tokens with put(ids) and is told end() (BaseStreamer)")
            streamer.put(seq.cpu())
        if custom_generate is not None:
            return custom_generate(self, seq, logits_processor=processors, stopping_criteria=criteria,
                                   generation_config=gen, **own, **self._loop_inputs(seq, ctx, cache, gen))

        if isinstance(cache, StaticCache) and self.decode_graphs and not sync and not padded_switch and not (
            gen.output_attentions or gen.output_hidden_states
        ):
            held, R = self._held_decode(), seq.shape[0]
            ctx.step = held.runner_for("step", self, cache, R) or GraphedDecodeStep(self, cache, R)
            if self.prefill_graphs:  # a cache used once pads its prompt alike, without capturing
                ctx.prefill = (held.runner_for("prefill", self, cache, R)
                               or GraphedPrefill(self, cache, R, capture=False))
            if drafted:
                ctx.chunk = held.runner_for("chunk", self, cache, R) or GraphedChunk(self, cache, R)
        # With graphed steps, a torch.compile of the model's forward is set aside for the call
        # (`engine.own_forward`): the graphs replay the fused kernels, which the compiled code lacks.
        def graphed():
            return own_forward(self) if ctx.step is not None and ctx.step.enabled else contextlib.nullcontext()

        # (as Transformers: assisted decoding and prompt lookup verify the whole prompt in their first forward)
        if gen.prefill_chunk_size is not None and not drafted:
            if cache is None:
                raise ValueError("prefill_chunk_size runs the prompt into the cache in chunks: it needs use_cache=True")
            with graphed():
                _prefill_in_chunks(self, seq, ctx, cache, gen.prefill_chunk_size)
        if drafted:
            what = "assistant_model" if assistant_model is not None else "prompt_lookup_num_tokens"
            if assistant_model is not None and gen.prompt_lookup_num_tokens is not None:
                raise ValueError("pass assistant_model or prompt_lookup_num_tokens, not both: each drafts the tokens "
                                 "this model checks")
            if sync:
                raise ValueError(f"synced_gpus=True cannot be combined with {what}: the processes' "
                                 "draft lengths differ")
            if gen.num_beams > 1:
                raise ValueError(f"{what} supports greedy search and sampling, not beam search (num_beams=1)")
            if gen.guidance_scale not in (None, 1):
                raise ValueError(f"{what} cannot be combined with guidance_scale != 1")
            with graphed():
                return self._assisted_decoding(seq, ctx, cache, gen, processors, criteria, max_length, eos,
                                               assistant_model, streamer)
        # A step past the last one is computed, then dropped: only where no one sees its cache write,
        # scores or callbacks (built-in stopping rules that stay on the device, no custom processors).
        # A streamer gets each step's tokens one step late.
        lag = (self.lagged_stop if self.lagged_stop is not None else device.type == "cuda") and not (
            sync or user_cache or gen.return_dict_in_generate or logits_processor
            or prefix_allowed_tokens_fn is not None
            or not _device_stops(criteria)
        )
        lag = _OneStepLate(device, seq.shape[0]) if lag else None
        sync = PeerSync(self, device) if sync else None
        with graphed():
            if gen.num_beams > 1:  # the cache is reordered in place between the graphed steps
                return self._beam_search(seq, ctx, cache, gen, processors, criteria, max_length, eos, lag, sync)
            return self._sample(seq, ctx, cache, gen, processors, criteria, pad_id, streamer, lag, sync)

    # ---- the reusable static cache --------------------------------------------------------------
    def _static_cache(self, batch: int, length: int, reuse: bool) -> StaticCache:
        """A StaticCache of at least `length` slots: rounded up to a multiple of STATIC_CACHE_BUCKET
        (within max_position_embeddings). With `reuse` the model holds it with its decode step
        after the call: the next such call with the same batch, length bucket, weights
        (the same tensors), dtype, device and mode zeroes it and replays the decode graphs captured
        before, instead of allocating a cache and capturing again. One is held at a time; none for
        a model that holds modules of another library (`_foreign_modules`)."""
        max_pos = getattr(self.config, "max_position_embeddings", None)
        S = -(-length // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET
        if max_pos is not None:
            S = max(length, min(S, max_pos))
        if not reuse:  # the same length, so that the prompt is padded alike (GraphedPrefill)
            return StaticCache(config=self.config, max_cache_len=S)
        if _foreign_modules(self):
            self._held_decode().clear()  # graphs of the model as it was before
            return StaticCache(config=self.config, max_cache_len=S)
        # graphs read the weights by address: other tensors (a `.to()`, a replaced parameter) make a new key
        tensors = tuple(t.data_ptr() for t in (*self.parameters(), *self.buffers()))
        key = (batch, S, self.device, self.dtype, self.training, tensors)
        held = self._held_decode()
        if held.key == key:
            held.cache.reset()
            return held.cache
        held.clear()  # let the old cache and graphs go before allocating
        held.key, held.cache = key, StaticCache(config=self.config, max_cache_len=S)
        return held.cache

    def _attention_width(self, gen: GenerationConfig, tokens: int, cache: StaticCache, default: bool):
        """The key width of the attentions a step returns from a static cache generate made, which
        rounds its slots up (STATIC_CACHE_BUCKET) or is one held from a longer call: where the
        static cache is only a GPU's default (Transformers decodes on a dynamic cache), the tokens
        cached so far; where asked for, the slots of Transformers' cache: the `tokens` cached, at
        least `max_cache_len` and the longest such cache of an earlier call on this model."""
        if default:
            return cache.get_seq_length
        width = max(tokens, gen.max_cache_len or 0, self.__dict__.get("_previous_max_cache_length", -1))
        self.__dict__["_previous_max_cache_length"] = width
        return lambda: width

    @classmethod
    def _supports_logits_to_keep(cls) -> bool:
        """Transformers' query (its assisted decoding asks it of an assistant): forwards take `logits_to_keep`."""
        return True

    def _held_decode(self) -> _HeldDecode:
        held = self.__dict__.get("_held")
        if held is None:
            held = self.__dict__["_held"] = _HeldDecode()
        return held

    def compute_transition_scores(self, sequences: torch.Tensor, scores: tuple[torch.Tensor, ...],
                                  beam_indices: torch.Tensor | None = None,
                                  normalize_logits: bool = False) -> torch.Tensor:
        """The score of each generated token at the step that chose it, [R, new tokens], from
        `generate(..., return_dict_in_generate=True, output_scores=True)`'s `sequences` and `scores`
        (or `logits`), as Transformers computes them. With beam search pass its `beam_indices`:
        a returned sequence's token at step t was scored in row `beam_indices[r, t]` of that
        step's scores, and steps past its end (index -1) read 0. `normalize_logits=True` takes
        log-softmax over the vocabulary first (for raw `logits`, or scores left unnormalized)."""
        if not scores:
            raise ValueError("compute_transition_scores: `scores` is empty (generate with output_scores=True)")
        steps = len(scores)
        rows_S = torch.stack(scores, dim=1)  # [rows scored at each step, steps, vocab]
        if normalize_logits:
            rows_S = rows_S.float().log_softmax(dim=-1).to(rows_S.dtype)
        R = sequences.shape[0]
        if beam_indices is None:
            if rows_S.shape[0] != R:
                raise ValueError(f"compute_transition_scores: {R} sequences but scores of {rows_S.shape[0]} "
                                 "rows: pass beam_indices for beam search")
            beam_indices = torch.arange(R, device=sequences.device)[:, None].expand(R, steps)
        if beam_indices.shape[0] != R:
            raise ValueError(f"compute_transition_scores: beam_indices has {beam_indices.shape[0]} rows, "
                             f"sequences {R}")
        beam_indices = beam_indices.to(device=rows_S.device, dtype=torch.long)
        ended = beam_indices < 0
        n = int((~ended).sum(dim=1).max())  # the longest returned sequence's new tokens
        beam_indices, ended = beam_indices[:, :n], ended[:, :n]
        if n > steps or n > sequences.shape[1]:
            raise ValueError(f"compute_transition_scores: {n} generated tokens but {steps} steps of scores")
        tokens = sequences[:, sequences.shape[1] - n :].to(rows_S.device)
        step = torch.arange(n, device=rows_S.device)[None, :].expand(R, n)
        out = rows_S[beam_indices.clamp(min=0), step, tokens]
        return out.masked_fill(ended, 0.0)

    def release_decode_cache(self) -> None:
        """Free the static cache and the decode and prompt graphs that `generate` keeps between calls."""
        self._held_decode().clear()

    # ---- preparation -------------------------------------------------------------------------
    def _generation_settings(self, generation_config, kwargs: dict,
                             use_model_defaults: bool | None = None) -> tuple[GenerationConfig, dict]:
        """Layer the model's config, the caller's config and keyword arguments (later wins for
        fields each sets explicitly); split off the model inputs. Without the model's defaults
        (`uses_model_defaults`), a passed config takes only the model's special tokens."""
        if generation_config is not None:
            generation_config = as_generation_config(generation_config)
        else:
            _check_config_holds_no_generation_settings(self.config, self.generation_config)
        gen = GenerationConfig()
        use_defaults = uses_model_defaults(use_model_defaults, self.generation_config)
        model_layer = model_defaults_layer(self.generation_config, generation_config, use_defaults)
        for layer in (model_layer, generation_config.explicit_items() if generation_config is not None else {}):
            for k, v in layer.items():
                setattr(gen, k, copy.deepcopy(v))
        model_inputs, unknown = {}, []
        callers = {k for k in _UNSUPPORTED if generation_config is not None and k in generation_config._extra}
        for k, v in kwargs.items():
            if k in DEFAULTS:
                gen.set_as_keyword(k, v)
            elif k in MODEL_INPUTS:
                model_inputs[k] = v
            elif k in _UNSUPPORTED:
                setattr(gen, k, v)
                callers.add(k)
            elif k not in _IGNORED_INPUTS:
                unknown.append(k)
        if unknown:
            raise GenerateArgumentError(
                f"generate() got unknown keyword arguments {unknown}: they are neither GenerationConfig fields "
                f"nor model inputs {list(MODEL_INPUTS)}"
            )
        modes = _other_modes(gen)
        if set(modes) & callers:
            raise GenerateArgumentError(f"generate(): {modes} pick a decoding mode of Transformers' that moetorch does "
                                        "not implement (docs/generation.md lists them)")
        ignored = [k for k, noop in _UNSUPPORTED.items() if getattr(gen, k, noop) not in (None, noop)]
        if ignored:
            logger.warning("generate(): these generation settings are not supported by moetorch and are "
                           "ignored: %s", ignored)
        gen._check_values()  # (the errors: the minor issues are warned of where a config is made)
        return gen, model_inputs

    def _loop_inputs(self, seq: torch.Tensor, ctx: _Context, cache: Cache | None, gen: GenerationConfig) -> dict:
        """The model inputs a custom decoding loop receives beside the ids, as Transformers hands
        them over: the 2D attention mask (ones without padding), the prompt's embeddings, the
        cache, `use_cache`, `logits_to_keep=1` and the outputs the settings ask for. The cache
        goes as `past_key_values`, Transformers 5.23's name (5.24 hands it over as `cache`): a
        loop that takes it out and passes the rest on must not pass it on a second time."""
        end = ctx.offset + seq.shape[1]
        mask = ctx.mask(end)
        out = {"attention_mask": mask if mask is not None else seq.new_ones(seq.shape[0], end)}
        if ctx.embeds is not None:
            out["inputs_embeds"] = ctx.embeds
        if cache is not None:
            out["past_key_values"] = cache
        out["use_cache"] = gen.use_cache
        out["logits_to_keep"] = 1
        for name in ("output_attentions", "output_hidden_states"):
            if getattr(gen, name):
                out[name] = True
        return out

    def _prompt(self, inputs, gen: GenerationConfig, model_inputs: dict, held: int = 0):
        """(ids [B, L], embeds or None, offset, mask or None) from the caller's prompt arguments.
        `offset`: the context before the ids, an embeddings-only prompt's tokens or, where the ids
        are the tokens after the `held` ones a passed cache holds and the mask covers both (as
        Transformers takes them), the cache's."""
        ids = model_inputs.pop("input_ids", None)
        if inputs is not None and ids is not None:
            raise ValueError("pass the prompt as `inputs` or as `input_ids`, not both")
        ids = inputs if inputs is not None else ids
        embeds = model_inputs.pop("inputs_embeds", None)
        mask = model_inputs.pop("attention_mask", None)
        device = self.device
        if ids is not None:
            if not (torch.is_tensor(ids) and ids.dim() == 2 and not ids.is_floating_point()):
                shape = tuple(ids.shape) if torch.is_tensor(ids) else type(ids).__name__
                raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {shape} "
                                 "(pass embeddings as inputs_embeds=)")
            if ids.shape[0] == 0:
                raise ValueError("generate(): the input batch is empty (input_ids of batch size 0)")
            vocab = getattr(self.config, "vocab_size", None)
            if vocab is not None and ids.numel():  # (one read of the prompt, before a GPU would assert on it)
                if bool(((ids < 0) | (ids >= vocab)).any()):
                    raise outside_vocabulary("generate(): input_ids", ids, vocab)
            ids = ids.to(device=device, dtype=torch.long)
        offset = 0
        if embeds is not None:
            if not (torch.is_tensor(embeds) and embeds.dim() == 3):
                shape = tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__
                raise ValueError(f"inputs_embeds must be a [batch, seq, hidden] tensor, got {shape}")
            embeds = embeds.to(device=device, dtype=self.dtype)
            if ids is None:
                ids, offset = torch.empty(embeds.shape[0], 0, dtype=torch.long, device=device), embeds.shape[1]
            elif ids.shape != embeds.shape[:2]:
                raise ValueError(f"input_ids {tuple(ids.shape)} and inputs_embeds {tuple(embeds.shape)} "
                                 "must cover the same tokens")
            gen.use_cache = True  # the embeddings feed the first forward only, then the cache carries them
        if ids is None:
            if gen.bos_token_id is None:
                raise ValueError("generate() needs input_ids, inputs_embeds or a bos_token_id to start from")
            ids = torch.full((1, 1), gen.bos_token_id, dtype=torch.long, device=device)
        if mask is not None:
            if (held and embeds is None and torch.is_tensor(mask)
                    and mask.shape == (ids.shape[0], held + ids.shape[1])):
                offset = held
            if not (torch.is_tensor(mask) and mask.shape == (ids.shape[0], offset + ids.shape[1])):
                raise ValueError(f"attention_mask must be 2D [batch, seq] like the prompt "
                                 f"{(ids.shape[0], offset + ids.shape[1])}, got {getattr(mask, 'shape', mask)}")
            mask = mask.to(device=device, dtype=torch.long)
        if ids.shape[1] + offset == 0:
            raise ValueError("the prompt is empty")
        return ids, embeds, offset, mask

    def _lengths(self, gen: GenerationConfig, L: int, offset: int, counted: bool = True) -> tuple[int, int]:
        """(max_length, min_length) of the id sequence, as Transformers derives them; `counted`:
        whether the `offset` tokens before the ids count in max_length and min_length."""
        max_pos = getattr(self.config, "max_position_embeddings", None)
        # ("dynamic" RoPE scales its table to the sequence's length: past max_position_embeddings is its use)
        scales = getattr(_rotary(self), "per_forward", None) == "dynamic"
        if max_pos is not None and L + offset > max_pos and not scales:
            raise ValueError(f"the prompt has {L + offset} tokens, more than the model's "
                             f"max_position_embeddings ({max_pos})")
        if gen.max_new_tokens is not None:
            max_length = gen.max_new_tokens + L
        elif not gen.is_set("max_length"):
            # The default max_length (20) means 20 new tokens, within the model's positions.
            max_length = gen.max_length + L
            if max_pos is not None:
                max_length = min(max_length, max_pos)
        else:
            max_length = gen.max_length - (offset if counted else 0)
        if L >= max_length:
            raise ValueError(f"the prompt has {L} tokens but max_length is {max_length}: nothing to generate "
                             "(set max_new_tokens, or a larger max_length)")
        if max_pos is not None and max_length + offset > max_pos and not scales:  # (offset: positions before the ids)
            # (Transformers says so once a sequence has run past it; here the length is known up front,
            # and the decode loop reads nothing back to the host)
            warn_once(("generate: past max_position_embeddings", max_pos),
                      "generate(): this call may run to %d tokens, past the model's max_position_embeddings (%d): "
                      "positions beyond it are outside what the model was made for", max_length + offset, max_pos)
        if gen.min_new_tokens is not None:
            min_length = gen.min_new_tokens + L
        else:
            min_length = max((gen.min_length or 0) - (offset if counted else 0), 0)
        return max_length, min_length

    def _logits_processors(self, gen, prompt, min_length, max_length, mask, eos, prefix_fn, custom, neg_ids,
                           neg_mask):
        """Transformers' processors for these settings, in its order; `custom` merged; warpers last.
        `prompt`: the prompt's ids [rows, L] (no columns for a prompt given as embeddings only)."""
        L = prompt.shape[1]
        procs = LogitsProcessorList()
        if gen.guidance_scale is not None and gen.guidance_scale != 1:
            procs.append(UnbatchedClassifierFreeGuidanceLogitsProcessor(
                gen.guidance_scale, self, neg_ids, neg_mask, use_cache=gen.use_cache))
        if gen.sequence_bias is not None:
            procs.append(SequenceBiasLogitsProcessor(gen.sequence_bias))
        # Transformers reads the "encoder" settings from a decoder-only model's prompt ids, padding included
        by_prompt = [name for name in ("encoder_repetition_penalty", "encoder_no_repeat_ngram_size")
                     if getattr(gen, name) not in (None, 0, 1.0)]
        if by_prompt and L == 0:
            logger.warning("generate(): %s read the prompt's ids; a prompt of embeddings only has none, so they are "
                           "ignored", by_prompt)
        elif gen.encoder_repetition_penalty not in (None, 1.0):
            procs.append(EncoderRepetitionPenaltyLogitsProcessor(gen.encoder_repetition_penalty, prompt))
        if gen.repetition_penalty != 1.0:
            # Left padding is not part of the prompt: skip it, per row.
            skip = (mask != 0).int().argmax(dim=1) if mask is not None else None
            procs.append(RepetitionPenaltyLogitsProcessor(gen.repetition_penalty, prompt_ignore_length=skip))
        if gen.no_repeat_ngram_size:
            procs.append(NoRepeatNGramLogitsProcessor(gen.no_repeat_ngram_size))
        if gen.encoder_no_repeat_ngram_size and L:
            procs.append(EncoderNoRepeatNGramLogitsProcessor(gen.encoder_no_repeat_ngram_size, prompt))
        if gen.bad_words_ids is not None:
            procs.append(NoBadWordsLogitsProcessor(gen.bad_words_ids, eos))
        if eos is not None and min_length > 0:
            procs.append(MinLengthLogitsProcessor(min_length, eos))
        if eos is not None and gen.min_new_tokens:
            procs.append(MinNewTokensLengthLogitsProcessor(L, gen.min_new_tokens, eos))
        if prefix_fn is not None:
            # batch_id by the rows a prompt expands to, so that it is the prompt's index with
            # num_return_sequences too (as Transformers 5.24 fixed it; 5.23 handed sampled rows their
            # own row index); a sampled row that no allowed token is left to falls back alone
            procs.append(PrefixConstrainedLogitsProcessor(prefix_fn, max(gen.num_beams, gen.num_return_sequences),
                                                          beams=gen.num_beams))
        if gen.forced_bos_token_id is not None:
            procs.append(ForcedBOSTokenLogitsProcessor(gen.forced_bos_token_id))
        if gen.forced_eos_token_id is not None:
            procs.append(ForcedEOSTokenLogitsProcessor(max_length, gen.forced_eos_token_id))
        if gen.remove_invalid_values:
            procs.append(InfNanRemoveLogitsProcessor())
        if gen.exponential_decay_length_penalty is not None:
            if eos is None:
                raise ValueError("exponential_decay_length_penalty raises the EOS scores: it needs an eos_token_id")
            procs.append(ExponentialDecayLengthPenalty(gen.exponential_decay_length_penalty, eos, L))
        if gen.suppress_tokens is not None:
            procs.append(SuppressTokensLogitsProcessor(gen.suppress_tokens))
        if gen.begin_suppress_tokens is not None:
            # the first new token; after a prompt of at most one token (an embeddings-only prompt
            # counts none) with a forced BOS, the one after it, as Transformers counts it
            begin = L + 1 if L <= 1 and gen.forced_bos_token_id is not None else L
            procs.append(SuppressTokensAtBeginLogitsProcessor(gen.begin_suppress_tokens, begin))
        procs = _merge(procs, custom, "logits processor")
        if gen.do_sample:
            # Beam sampling keeps one non-EOS token beyond the EOS ones, so a beam can always go on.
            keep = (len(eos) + 1 if eos is not None else 2) if gen.num_beams > 1 else 1
            procs.extend(sampling_warpers(gen, keep))
        if gen.watermarking_config is not None:  # after every other processor but the normalization
            procs.append(gen.watermarking_config.construct_processor(self.config.vocab_size, prompt.device))
        if gen.renormalize_logits:
            procs.append(LogitNormalization())
        return procs

    def _stopping_criteria(self, gen, max_length, eos, tokenizer, custom) -> StoppingCriteriaList:
        max_pos = getattr(self.config, "max_position_embeddings", None)
        crit = StoppingCriteriaList([MaxLengthCriteria(max_length, max_pos)])
        if gen.max_time is not None:
            crit.append(MaxTimeCriteria(gen.max_time))
        if gen.stop_strings is not None:
            if tokenizer is None:
                raise ValueError("stop_strings need the tokenizer: call generate(..., stop_strings=..., tokenizer=tok)")
            crit.append(StopStringCriteria(tokenizer, gen.stop_strings))
        if eos is not None:
            crit.append(EosTokenCriteria(eos))
        if gen.is_assistant and gen.assistant_confidence_threshold:  # drafting for another model's generate
            crit.append(ConfidenceCriteria(gen.assistant_confidence_threshold))
        return _merge(crit, custom, "stopping criterion")

    # ---- strategies --------------------------------------------------------------------------
    def _sample(self, seq, ctx, cache, gen, processors, criteria, pad_id, streamer, lag=None, sync=None):
        """Greedy search (argmax) or multinomial sampling, one token per step. With `lag` (a
        _OneStepLate) the loop stops one step after the device's flag says so and drops that step,
        and the streamer gets each step's tokens one step late. With `sync` (a PeerSync) every
        step ends with the processes' all-reduce, and a process done first idles until all are."""
        record = _Record(gen, ctx.key_width)
        running_R = torch.ones(seq.shape[0], dtype=torch.bool, device=seq.device)
        eos_criteria = [c for c in criteria if hasattr(c, "eos_token_id")]
        if eos_criteria and pad_id is None:
            pad_id = int(eos_criteria[0].eos_token_id.reshape(-1)[0])
        # A negative pad id (Transformers takes one) is written into the output for a row that has
        # stopped; where a step after that would feed it to the model (an embedding lookup out of
        # range: Transformers' IndexError, a device-side assert on a GPU), that step raises
        # instead, before the model sees it. Each step's stop is read as it comes: a step computed
        # ahead of the read (`lag`) would feed it first.
        negative_pad = bool(eos_criteria) and pad_id is not None and pad_id < 0
        padded = False
        if negative_pad:
            lag = None
        # With max_length the only rule, the host knows when to stop without reading the device.
        max_length = criteria.max_length
        host_only = max_length is not None and all(isinstance(c, MaxLengthCriteria) for c in criteria)
        if host_only and streamer is None:
            lag = None  # nothing to read
        if lag is not None and not host_only:
            eos_ids = torch.cat([c.eos_token_id.to(seq.device).reshape(-1) for c in eos_criteria]) \
                if eos_criteria else None
            stop_strings = [c for c in criteria if isinstance(c, StopStringCriteria)]
        # Plain greedy (nothing recorded) takes the argmax of the model's logits as they come: the
        # float32 copy holds the same values, so the same index.
        plain_argmax = not (processors or gen.do_sample or gen.return_dict_in_generate)
        sampler = _fused_sampler(processors, gen, seq.device)
        rng = None
        N = gen.num_return_sequences
        once = self._runs_prompt_once(cache, N, record)
        while True:
            if once:  # the first step: each prompt once for the N rows that repeat it
                out, once = self._prompt_once(seq, ctx, cache, N), False
            else:
                if padded:
                    raise ValueError(
                        f"generate(): a row stopped before the others and was padded with pad_token_id={pad_id}, "
                        "a negative id, which the next step would feed to the model (Transformers fails there "
                        "with an IndexError): set pad_token_id to an id of the vocabulary"
                    )
                out = _forward(self, seq, ctx, cache, 1, record.attentions is not None,
                               record.hidden_states is not None)
            if plain_argmax:
                next_R = out.logits[:, -1].argmax(dim=-1)
            elif sampler is not None:
                if lag is not None:
                    rng = _rng_state(seq.device)
                next_R = sampler(seq, out.logits[:, -1])
            else:
                logits_RV = out.logits[:, -1].to(dtype=torch.float32, copy=True)
                scores_RV = processors(seq, logits_RV)
                record.add(scores_RV, logits_RV, out)
                if not gen.do_sample:
                    next_R = scores_RV.argmax(dim=-1)
                else:
                    if lag is not None:  # a dropped step gives back its draw, as if it never ran
                        rng = _rng_state(seq.device)
                    next_R = torch.multinomial(scores_RV.softmax(dim=-1), num_samples=1).squeeze(1)
            if eos_criteria:
                if negative_pad:
                    padded = not bool(running_R.all())
                next_R = torch.where(running_R, next_R, pad_id)
            seq = torch.cat([seq, next_R[:, None]], dim=-1)
            if lag is None:
                if streamer is not None:
                    streamer.put(next_R.cpu())
                if host_only:
                    done = seq.shape[1] >= max_length
                else:
                    running_R = running_R & ~criteria(seq, record.scores)
                    done = not bool(running_R.any())
                if sync.stop(done, seq) if sync is not None else done:
                    break
                continue
            if not host_only:  # lag mode's rules: EOS ids (EosTokenCriteria in 3 kernels), stop strings, max_length
                if eos_ids is not None:
                    running_R = running_R & (next_R[:, None] != eos_ids).all(dim=1)
                for c in stop_strings:
                    running_R = running_R & ~c(seq, None)
            ran, shown = lag.push(None if host_only else running_R, None if streamer is None else next_R)
            if shown is not None:
                streamer.put(shown)  # the step before's tokens
            if ran is False:  # every row had stopped by the step before: drop this step
                seq = seq[:, :-1]
                if rng is not None:
                    _set_rng_state(seq.device, rng)
                break
            if seq.shape[1] >= max_length:  # known on the host
                if streamer is not None:
                    streamer.put(lag.latest_tokens())
                break
        if streamer is not None:
            streamer.end()
        if isinstance(cache, StaticCache):
            cache.settle_slot_rows()  # each row's keys and values in its own storage again
        if not gen.return_dict_in_generate:
            return seq
        return GenerateDecoderOnlyOutput(
            sequences=seq, scores=record.scores, logits=record.logits, attentions=record.attentions,
            hidden_states=record.hidden_states, past_key_values=cache,
        )

    def _beam_search(self, seq, ctx, cache, gen, processors, criteria, max_length, eos, lag=None, sync=None):
        """Beam search (or beam sampling with do_sample), as Transformers' vectorised version.

        Per prompt it keeps N running beams and the N best finished ones. Each step scores every
        continuation of every running beam, takes the K = N * max(2, 1 + #EOS) best (or samples
        them), moves the ones that hit a stopping rule into the finished set (length-penalised)
        and continues with the N best others. With `lag` (a _OneStepLate) it reads whether to go on
        one step late, and a step past the last gives back its finished set and random draws.
        With `sync` (a PeerSync) the processes step together, as in `_sample`.
        """
        N, lp, early = gen.num_beams, gen.length_penalty, gen.early_stopping
        R, prompt_len = seq.shape
        B, device = R // N, seq.device
        K = max(2, 1 + (len(eos) if eos is not None else 0)) * N
        first_N_K = torch.arange(K, device=device) < N
        record = _Record(gen, ctx.key_width)
        # Finished beams shorter than the longest are padded as Transformers pads them: with the pad
        # id, or the first EOS id where the pad id is unset or 0, and with -1 where there is no EOS id.
        fill = (gen.pad_token_id or _first_eos(gen)) if eos is not None else -1
        running_seq = torch.full((B, N, max_length), fill, dtype=torch.long, device=device)
        running_seq[:, :, :prompt_len] = seq.view(B, N, prompt_len)
        done_seq = running_seq.clone()
        # Only beam 0 starts live, so the first step does not pick the same token N times.
        running_lp = torch.zeros(B, N, device=device)
        running_lp[:, 1:] = _NEVER
        done_lp = torch.full((B, N), _NEVER, device=device)
        done_BN = torch.zeros(B, N, dtype=torch.bool, device=device)
        improvable_B1 = torch.ones(B, 1, dtype=torch.bool, device=device)
        running_src = torch.full((B, N, max_length - prompt_len), -1, dtype=torch.long, device=device)
        done_src = running_src.clone()
        batch_offset_B1 = torch.arange(B, device=device)[:, None] * N
        cur_len, flat = prompt_len, seq
        kept, rng = None, None  # with `lag`: the step before's finished set; this step's generator state
        once = self.beam_slot_rows and self._runs_prompt_once(cache, N, record)
        while True:
            if once:  # the first step: each prompt once for its N beams
                out, once = self._prompt_once(flat, ctx, cache, N), False
            else:
                out = _forward(self, flat, ctx, cache, 1, record.attentions is not None,
                               record.hidden_states is not None)
            logits_RV = out.logits[:, -1].to(dtype=torch.float32, copy=True)
            logp_RV = processors(flat, logits_RV.log_softmax(dim=-1))
            record.add(logp_RV, logits_RV, out)
            V = logp_RV.shape[-1]
            total_BNV = (logp_RV.view(B, N, V) + running_lp[:, :, None]).view(B, N * V)
            if gen.do_sample:
                if lag is not None:
                    rng = _rng_state(device)
                top_idx = torch.multinomial(total_BNV.softmax(dim=-1), num_samples=K)
                top_lp = total_BNV.gather(1, top_idx)
            else:
                top_lp, top_idx = torch.topk(total_BNV, K)
            beam_BK, token_BK = top_idx // V, top_idx % V
            top_src = _gather_beams(running_src, beam_BK)
            top_seq = _gather_beams(running_seq, beam_BK)
            top_seq[:, :, cur_len] = token_BK
            top_src[:, :, cur_len - prompt_len] = beam_BK + batch_offset_B1
            hits_BK = criteria(top_seq[:, :, : cur_len + 1].reshape(B * K, -1), record.scores).view(B, K)

            # The N best continuations that did not just stop keep running.
            live_lp = top_lp + hits_BK.to(torch.float32) * _NEVER
            keep = torch.topk(live_lp, N)[1]
            running_seq, running_lp, running_src = (_gather_beams(t, keep) for t in (top_seq, live_lp, top_src))

            # Continuations that stopped (among the top N) compete with the finished beams.
            stopped_BK = hits_BK & first_N_K
            cand_lp = top_lp / ((cur_len + 1 - prompt_len) ** lp)
            cand_lp += (done_BN.all(-1, keepdim=True) & (early is True)).to(torch.float32) * _NEVER
            cand_lp += (~improvable_B1).to(torch.float32) * _NEVER
            cand_lp += (~stopped_BK) * _NEVER
            best = torch.topk(torch.cat([done_lp, cand_lp], dim=1), N)[1]
            done_seq = _gather_beams(torch.cat([done_seq, top_seq], dim=1), best)
            done_lp = _gather_beams(torch.cat([done_lp, cand_lp], dim=1), best)
            done_src = _gather_beams(torch.cat([done_src, top_src], dim=1), best)
            done_BN = _gather_beams(torch.cat([done_BN, stopped_BK], dim=1), best)

            if cache is not None:
                if cache.is_static and self.beam_slot_rows and cache.slot_rows is None:
                    cache.use_slot_rows()
                cache.reorder_cache(running_src[..., cur_len - prompt_len].reshape(-1))
            cur_len += 1
            # Can a running beam still beat the worst finished one? (Transformers' heuristic.)
            best_len = max_length - prompt_len if (early == "never" and lp > 0) else cur_len - prompt_len
            best_running = running_lp[:, :1] / (best_len**lp)
            worst_done = torch.where(done_BN, done_lp.min(dim=1, keepdim=True)[0], _NEVER)
            improvable_B1 = improvable_B1 & (best_running > worst_done).any(dim=-1, keepdim=True)
            go_on = improvable_B1.any() & ~(done_BN.all() & (early is True)) & ~hits_BK.all()
            if lag is None:
                done = not bool(go_on)
                if sync.stop(done, flat) if sync is not None else done:
                    break
            else:
                if lag.push(go_on, None)[0] is False:  # the step before was the last: drop this one
                    done_seq, done_lp, done_src = kept
                    if rng is not None:
                        _set_rng_state(device, rng)
                    break
                if cur_len >= max_length:  # every continuation hits max_length: go_on is False
                    break
                kept = (done_seq, done_lp, done_src)
            flat = running_seq[:, :, :cur_len].reshape(R, cur_len)

        if cache is not None and cache.is_static:
            cache.settle_slot_rows()  # each row's keys and values in its own storage again
        n_ret = gen.num_return_sequences
        sequences = done_seq[:, :n_ret].reshape(B * n_ret, -1)
        beam_indices = done_src[:, :n_ret].reshape(B * n_ret, -1)
        new_tokens = int((beam_indices >= 0).sum(dim=1).max())
        sequences, beam_indices = sequences[:, : prompt_len + new_tokens], beam_indices[:, :new_tokens]
        if not gen.return_dict_in_generate:
            return sequences
        return GenerateBeamDecoderOnlyOutput(
            sequences=sequences,
            sequences_scores=done_lp[:, :n_ret].reshape(-1) if gen.output_scores else None,
            scores=record.scores, logits=record.logits, beam_indices=beam_indices.to(torch.int32),  # (its dtype there)
            attentions=record.attentions, hidden_states=record.hidden_states, past_key_values=cache,
        )

    def _runs_prompt_once(self, cache: Cache | None, N: int, record: _Record) -> bool:
        """Whether the first step runs each prompt once for the N rows that repeat it (`_prompt_once`):
        on an empty static cache, with `prompt_once`, where no step's attentions or hidden states
        are recorded (those need every row's forward)."""
        return (N > 1 and isinstance(cache, StaticCache) and self.prompt_once and cache.get_seq_length() == 0
                and record.attentions is None and record.hidden_states is None)

    def _prompt_once(self, seq_RL: torch.Tensor, ctx: _Context, cache: StaticCache, N: int) -> _StepOutput:
        """The prompt's forward on a static cache once per prompt instead of once per row that
        repeats it (beams, num_return_sequences): the first row of each group of N into those rows
        of the cache, whose other rows then read the prompt's slots through `slot_rows`
        (`StaticCache.take_prompt`). Its logits, repeated for every row: [R, 1, V]."""
        R = seq_RL.shape[0]
        held = self._held_decode().prompt_view_for(self, cache, N, R)
        if held is not None:
            view, prefill = held
            view._seen, view.rope_long = 0, False
        else:
            view = cache.rows_view(N, R, self.device, self.dtype)
            prefill = GraphedPrefill(self, view, R // N, capture=False)
        sub = _Context(*(None if t is None else t[::N] for t in (ctx.mask_BP, ctx.positions_BP, ctx.embeds)),
                       ctx.offset)
        sub.prefill = prefill if ctx.prefill is not None else None
        ctx.embeds = None  # consumed, as `_forward` does
        out = _forward(self, seq_RL[::N], sub, view, 1)
        cache.take_prompt(view, N)
        return _StepOutput(out.logits.repeat_interleave(N, dim=0))

    def _assisted_decoding(self, seq, ctx, cache, gen, processors, criteria, max_length, eos, assistant, streamer):
        """Decoding checked in chunks: the assistant drafts up to `num_assistant_tokens` tokens
        (stopping early after a draft it gives less than `assistant_confidence_threshold`; the
        "heuristic" schedules adapt the count from round to round, as Transformers' do), one
        forward of this model scores them all, and a prefix of them plus one token of this model's
        is kept. Greedy: the drafts are the assistant's argmax, the longest prefix agreeing with this
        model's argmax is kept, and the result equals plain greedy search. Sampling (speculative
        sampling, Leviathan et al. 2023, algorithm 1): the drafts are drawn from the assistant's
        processed distribution q, draft x is kept with probability min(1, p(x) / q(x)) under this
        model's p, and the first rejected position draws from max(p - q, 0) renormalised, so each
        token follows this model's processed distribution, as plain sampling's does.

        Without an assistant (`prompt_lookup_num_tokens`), the drafts are the tokens that followed
        the sequence's last n-gram where it occurred before (`_prompt_lookup`), checked the same
        way: greedy keeps the agreeing prefix, sampling treats them as drafts of probability 1."""
        if seq.shape[0] != 1:
            raise ValueError(f"assisted decoding supports batch size 1 only, got {seq.shape[0]}")
        if cache is None:
            raise ValueError("assisted decoding needs a cache (use_cache=True)")
        if ctx.embeds is not None:
            raise ValueError("assisted decoding and prompt lookup need input_ids alone (an assistant cannot read this "
                             "model's inputs_embeds, and prompt lookup searches ids): pass input_ids without "
                             "inputs_embeds")
        if ctx.offset:
            raise ValueError("assisted decoding needs the whole sequence as input_ids, the cached tokens too")
        if assistant is not None and (
                getattr(assistant.config, "vocab_size", None) != getattr(self.config, "vocab_size", None)):
            raise ValueError("assistant_model must share this model's vocabulary (same vocab_size)")
        record = _Record(gen, ctx.key_width)
        draft_device = assistant.device if assistant is not None else None
        draft_cache, draft_ctx = self._drafting(assistant, draft_device, cache, ctx, max_length)
        num, schedule, threshold = _draft_settings(gen, assistant) if assistant is not None else (0, "constant", 0)
        weight = gen.assistant_ensemble_weight
        if weight is not None and assistant is None:
            raise ValueError("assistant_ensemble_weight mixes an assistant's distribution into verification: "
                             "prompt lookup's drafts have none (pass assistant_model, or leave it None)")
        aside = (own_forward(assistant) if draft_ctx.step is not None and draft_ctx.step.enabled
                 else contextlib.nullcontext())
        # The sequence on the host too: prompt lookup searches it there, and a round's bookkeeping (the
        # kept count, EOS, the built-in stop rules) reads one copy of the drafts and choices back.
        host = seq[0].cpu()
        eos_ids = set() if eos is None else set(eos.tolist())
        stop_on_host = _host_stop(criteria)
        with aside:
            while True:
                L = seq.shape[1]
                # the round's length cap: max_length, or one token a round past it, undrafted, where a
                # custom MaxLengthCriteria (which replaces generate's own) lets the sequence run on
                limit = max(max_length, L + 1)
                # An assistant's drafts may run past EOS: verification cuts there.
                cand, draft_q = seq, []
                draft_cache.truncate(L - 1)
                if assistant is None:
                    room = cache.max_cache_len - L if isinstance(cache, StaticCache) else None
                    begin, count = _prompt_lookup(host, gen.prompt_lookup_num_tokens,
                                                  gen.max_matching_ngram_size or 2, limit, eos_ids, room,
                                                  _lookup_allowed(processors, seq, self.config.vocab_size))
                    cand = torch.cat([seq, seq[:, begin : begin + count]], dim=-1)
                for _ in range(min(num, limit - L - 1)):
                    # an assistant on another device reads the tokens there, and gives its logits back
                    logits = _forward(assistant, cand.to(draft_device), draft_ctx, draft_cache, 1).logits[:, -1]
                    logits = logits.to(cand.device)
                    if processors or gen.do_sample or weight is not None:  # the assistant drafts under the
                        logits = processors(cand, logits.to(dtype=torch.float32, copy=True))  # same processors
                    if gen.do_sample or weight is not None:  # the assistant's distribution
                        q = logits.softmax(dim=-1)
                        draft_q.append(q)
                    if gen.do_sample:
                        token = torch.multinomial(q, num_samples=1)
                    else:
                        token = logits.argmax(dim=-1, keepdim=True)
                    cand = torch.cat([cand, token], dim=-1)
                    if threshold:  # the assistant's probability of its draft, read on the host
                        p = q[0, token[0, 0]] if gen.do_sample else logits[0].float().softmax(dim=-1).max()
                        if float(p) < threshold:
                            break
                n_cand = cand.shape[1] - L
                out = _forward(self, cand, ctx, cache, n_cand + 1, record.attentions is not None,
                               record.hidden_states is not None)
                # a copy: a graphed chunk's logits are its graph's output, which the next round overwrites
                raw = out.logits[:, -(n_cand + 1) :].to(dtype=torch.float32, copy=True)
                scores = raw.clone()
                for i in range(n_cand + 1):
                    scores[:, i] = processors(cand[:, : L + i], scores[:, i])
                if gen.do_sample:
                    if assistant is None:  # looked-up drafts: each has probability 1 under its drafter
                        draft_q = list(torch.nn.functional.one_hot(cand[:, L:], scores.shape[-1]).to(scores.dtype)
                                       .unbind(dim=1))
                    new, n_ok = _speculative_pick(cand[:, L:], draft_q, scores.softmax(dim=-1), weight)
                    new_h = new[0].tolist()
                else:
                    chosen = scores.argmax(dim=-1)
                    if weight is not None and n_cand:  # the drafts checked against w * p + (1 - w) * q
                        mixed = weight * scores[:, :n_cand].softmax(dim=-1) + (1 - weight) * torch.stack(draft_q, 1)
                        chosen = torch.cat([mixed.argmax(dim=-1), chosen[:, n_cand:]], dim=-1)
                    both = torch.cat([cand[0, L:], chosen[0]]).tolist()  # the round's one read
                    drafts_h, chosen_h = both[:n_cand], both[n_cand:]
                    n_ok = next((i for i, (d, c) in enumerate(zip(drafts_h, chosen_h)) if d != c), n_cand)
                    new_h = drafts_h[:n_ok] + chosen_h[n_ok : n_ok + 1]
                    new = torch.cat([cand[:, L : L + n_ok], chosen[:, n_ok : n_ok + 1]], dim=-1)
                if schedule != "constant":  # Transformers' heuristic: 2 more after a round with every draft kept
                    num = num + 2 if n_ok == n_cand else max(1, num - 1)
                new_h = new_h[: limit - L]
                at_eos = next((i for i, t in enumerate(new_h) if t in eos_ids), None)
                if at_eos is not None:
                    new_h = new_h[: at_eos + 1]
                n_ok = len(new_h) - 1
                seq = torch.cat([seq, new[:, : n_ok + 1]], dim=-1)
                new_host = torch.tensor([new_h], dtype=host.dtype)
                host = torch.cat([host, new_host[0]])
                if streamer is not None:
                    streamer.put(new_host)
                cache.truncate(L + n_ok)  # drop the rejected drafts; the last new token is fed next round
                if record.scores is not None:
                    record.scores += tuple(scores[:, i] for i in range(n_ok + 1))
                if record.logits is not None:
                    record.logits += tuple(raw[:, i] for i in range(n_ok + 1))
                if record.attentions is not None:
                    record.attentions += _per_token(out.attentions, L, n_cand, n_ok, attention=True)
                if record.hidden_states is not None:
                    record.hidden_states += _per_token(out.hidden_states, L, n_cand, n_ok, attention=False)
                if stop_on_host(host) if stop_on_host is not None else bool(criteria(seq, record.scores).all()):
                    break
        if schedule == "heuristic" and getattr(assistant, "generation_config", None) is not None:
            assistant.generation_config.num_assistant_tokens = num  # the next call starts from it
        if streamer is not None:
            streamer.end()
        if not gen.return_dict_in_generate:
            return seq
        return GenerateDecoderOnlyOutput(sequences=seq, scores=record.scores, logits=record.logits,
                                         attentions=record.attentions, hidden_states=record.hidden_states,
                                         past_key_values=cache)

    def _drafting(self, assistant, device, cache: Cache, ctx: _Context, max_length: int) -> tuple[Cache, _Context]:
        """The assistant's cache and context for its drafting forwards. Where this model verifies on
        a static cache and the assistant is another moetorch model on one device, the assistant
        drafts on a static cache of its own, which it holds between calls as this model holds its:
        its prompt, single tokens and catch-up chunks (the tokens kept in the last round) replay
        CUDA graphs on a GPU. Otherwise it drafts on a dynamic cache, eagerly. `device`: the
        assistant's (None for prompt lookup). An assistant of another library (a Transformers
        model of the same vocabulary) drafts on a cache of its own making (`_OwnCache`)."""
        draft_ctx = _Context(*(None if t is None else t.to(device) for t in (ctx.mask_BP, ctx.positions_BP)), None, 0)
        if assistant is not None and not isinstance(assistant, GenerationMixin):
            return _OwnCache(), draft_ctx  # a model of another library drafts on a cache of its own
        if _longrope(assistant) is not None and draft_ctx.rope_pad:
            return DynamicCache(), draft_ctx  # (a padded prompt's LongRoPE record: see `padded_switch`)
        if not (isinstance(cache, StaticCache) and isinstance(assistant, GenerationMixin) and assistant is not self
                and assistant.decode_graphs and not assistant.spans_devices):
            return DynamicCache(), draft_ctx
        # as long as this model's cache, with the same room for a padded chunk past the last token
        draft = assistant._static_cache(1, max_length + CHUNK_BUCKETS[-1], reuse=True)
        held = assistant._held_decode()
        draft_ctx.step = held.runner_for("step", assistant, draft, 1) or GraphedDecodeStep(assistant, draft, 1)
        if assistant.prefill_graphs:
            draft_ctx.prefill = (held.runner_for("prefill", assistant, draft, 1)
                                 or GraphedPrefill(assistant, draft, 1, capture=False))
        draft_ctx.chunk = held.runner_for("chunk", assistant, draft, 1) or GraphedChunk(assistant, draft, 1)
        return draft, draft_ctx


def eos_ids(value) -> list[int]:
    """EOS ids in their order, from None, an id or a list of them."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def chat_eos_ids(eos: list[int], tokenizer) -> list[int]:
    """The ids that end a chat turn: `eos`, then `<|end|>` where the tokenizer has it (Phi-3.5's
    template ends each turn with it, and only the conversation with EOS)."""
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    return list(dict.fromkeys([*eos, *([end] if isinstance(end, int) else [])]))


def sampling_warpers(gen: GenerationConfig, keep: int = 1) -> list:
    """Transformers' sampling warpers for `gen`, in its order (temperature, top-h, top-k, top-p,
    min-p, typical, epsilon, eta), each keeping at least `keep` tokens. None reads the sequence."""
    procs = []
    if gen.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(gen.temperature))
    if gen.top_h is not None:
        procs.append(TopHLogitsWarper(gen.top_h))
    if gen.top_k:
        procs.append(TopKLogitsWarper(gen.top_k, min_tokens_to_keep=keep))
    if gen.top_p < 1.0:
        procs.append(TopPLogitsWarper(gen.top_p, min_tokens_to_keep=keep))
    if gen.min_p is not None:
        procs.append(MinPLogitsWarper(gen.min_p, min_tokens_to_keep=keep))
    if gen.typical_p < 1.0:
        procs.append(TypicalLogitsWarper(gen.typical_p, min_tokens_to_keep=keep))
    if 0 < gen.epsilon_cutoff < 1:
        procs.append(EpsilonLogitsWarper(gen.epsilon_cutoff, min_tokens_to_keep=keep))
    if 0 < gen.eta_cutoff < 1:
        procs.append(EtaLogitsWarper(gen.eta_cutoff, min_tokens_to_keep=keep))
    return procs


def _cache_length(gen: GenerationConfig, tokens: int, room: int) -> int:
    """A static cache's length for a call that caches up to `tokens - 1` tokens, plus `room` slots
    (a padded verify chunk's; -1: the last token is never fed): at least `gen.max_cache_len`."""
    if gen.max_cache_len is None:
        return tokens + room
    if gen.max_cache_len < tokens - 1:
        raise ValueError(f"max_cache_len={gen.max_cache_len} is shorter than the {tokens - 1} tokens this call "
                         "caches (the prompt and the new tokens but the last)")
    return max(gen.max_cache_len, tokens + room)


def _prefill_in_chunks(model, seq_RL: torch.Tensor, ctx: _Context, cache: Cache, size: int) -> None:
    """The prompt in chunks of `size` tokens a forward (`prefill_chunk_size`: a long prompt's
    forward in less memory), as Transformers splits it: all chunks but the last into `cache` here;
    the decoding loop's first forward runs the last one (1 to `size` tokens) and gives its logits."""
    if ctx.embeds is not None:
        raise ValueError("prefill_chunk_size runs the prompt's ids in chunks: pass input_ids, not inputs_embeds")
    L = seq_RL.shape[1]
    # (the ids may follow tokens a cache passed in holds: `ctx.offset` of them before the first id)
    for end in range(cache.get_seq_length() - ctx.offset + size, L, size):
        _forward(model, seq_RL[:, :end], ctx, cache, 1)


def _prompt_lookup(row_L: torch.Tensor, max_new: int, max_ngram: int, max_length: int,
                   eos_ids: set[int], room: int | None = None,
                   allowed: Callable[[int, int], int] | None = None) -> tuple[int, int]:
    """Prompt lookup decoding's drafts in the sequence `row_L` (on the host): (where they begin, how
    many). For n-gram sizes from `max_ngram` down to 1, the first earlier occurrence of the
    sequence's last n tokens gives the drafts: up to `max_new` of the tokens that followed it, none
    from index `max_length` on, cut before an EOS id, and none where one token is left, as
    Transformers' prompt lookup takes them. Drafts may run past `max_length` (verification drops
    them; their positions still reach the verify forward, as in Transformers, which a rotary table
    picked per forward reads). `room`: a static cache's free slots past the sequence, a further
    cap; no occurrence: no drafts. `allowed(begin, count)`: how many of the drafts the logits
    processors let through (`_lookup_allowed`); an occurrence whose first draft they forbid gives
    way to the next one."""
    L = row_L.shape[0]
    if max_length == L + 1:
        return L, 0
    most = max_new if room is None else min(max_new, max(room, 0))
    for n in range(min(max_ngram, L - 1), 0, -1):
        windows = row_L.unfold(0, n, 1)[:-1]  # every earlier n-gram (the last is the pattern itself)
        for start in (windows == row_L[L - n :]).all(dim=1).nonzero()[:, 0].tolist():
            begin = start + n
            count = min(begin + most, max_length, L) - begin
            if count > 0 and allowed is not None:
                count = allowed(begin, count)
            if count > 0:
                drafts = row_L[begin : begin + count].tolist()
                return begin, next((i for i, t in enumerate(drafts) if t in eos_ids), count)
    return L, 0


def _lookup_allowed(processors: LogitsProcessorList, seq: torch.Tensor, vocab: int) -> Callable[[int, int], int] | None:
    """For `_prompt_lookup`: how many of the drafts seq[0, begin : begin + count] the logits processors
    let through, as Transformers' prompt lookup checks them: each draft's score after the processors
    run on scores of ones and the sequence with the drafts before it, forbidden at -inf or float32's
    lowest value. One read to the host a check; none without processors."""
    if not processors:
        return None

    def allowed(begin: int, count: int) -> int:
        drafts = seq[:, begin : begin + count]
        ones = torch.ones((1, vocab), dtype=torch.float32, device=seq.device)
        kept = torch.stack([processors(torch.cat([seq, drafts[:, :i]], dim=-1), ones.clone())[0, drafts[0, i]]
                            for i in range(count)])
        forbidden = ((kept == float("-inf")) | (kept == torch.finfo(torch.float32).min)).tolist()
        return next((i for i, f in enumerate(forbidden) if f), count)

    return allowed


def _builtin_stops(criteria: StoppingCriteriaList) -> bool:
    """Whether every stopping rule is a built-in one that the sequence alone decides (max_length,
    EOS ids), so that it can be read late (the lagged stop) or on the host (assisted decoding)."""
    return all(type(c) in (MaxLengthCriteria, EosTokenCriteria) for c in criteria)


def _device_stops(criteria: StoppingCriteriaList) -> bool:
    """Whether every stopping rule is decided on the device from the sequence alone: the built-in
    ones, and stop strings matched by their tables (`StopStringCriteria.on_device`)."""
    return all(type(c) in (MaxLengthCriteria, EosTokenCriteria) or (type(c) is StopStringCriteria and c.on_device)
               for c in criteria)


def _per_token(layers: tuple, L: int, n_cand: int, n_ok: int, attention: bool) -> tuple:
    """A verify forward's per-layer attentions ([B, H, rows, keys]) or hidden states ([B, rows, D]) as
    greedy search records them: one entry per kept token, each a tuple over the layers. The forward
    ran on the tokens from position L + n_cand - rows on; kept token i comes from position L - 1 + i,
    whose row attends to the first L + i keys. The round's first entry starts at the forward's first
    row: in the first round that is the prompt's (greedy search's first entry), later it is the one
    row. Transformers slices the first round's later entries from the prompt's first rows (the
    shapes greedy search gives, other numbers); these are the rows the kept tokens came from."""
    rows = layers[0].shape[-2]
    past = L + n_cand - rows  # the cache's length before the forward
    entries = []
    for i in range(n_ok + 1):
        start, end = (0 if i == 0 else L - 1 + i - past), L + i - past
        if attention:
            entries.append(tuple(a[..., start:end, : L + i] for a in layers))
        else:
            entries.append(tuple(h[:, start:end] for h in layers))
    return tuple(entries)


def _host_stop(criteria: StoppingCriteriaList):
    """Where `_builtin_stops`, a function of the host's sequence [L] that says whether to stop; else None."""
    if not _builtin_stops(criteria):
        return None
    lengths = [c.max_length for c in criteria if isinstance(c, MaxLengthCriteria)]
    eos_ids = {int(t) for c in criteria if isinstance(c, EosTokenCriteria) for t in c.eos_token_id.reshape(-1)}
    return lambda row_L: any(row_L.shape[0] >= n for n in lengths) or int(row_L[-1]) in eos_ids


def _draft_settings(gen: GenerationConfig, assistant) -> tuple[int, str, float | None]:
    """(num_assistant_tokens, its schedule, the confidence threshold) of an assisted call: each from
    the call's settings where they set it (keyword arguments, a passed config or this model's
    config), else from the assistant's generation config, where Transformers reads them (and where
    the "heuristic" schedule leaves the draft length it reached), else the default."""
    own = getattr(assistant, "generation_config", None)

    def pick(name: str):
        if gen.is_set(name) or own is None:
            return getattr(gen, name)
        if isinstance(own, GenerationConfig):
            return getattr(own, name) if own.is_set(name) else getattr(gen, name)
        value = getattr(own, name, None)
        return getattr(gen, name) if value is None else value

    settings, names = GenerationConfig(), ("num_assistant_tokens", "num_assistant_tokens_schedule",
                                           "assistant_confidence_threshold")
    for name in names:
        settings.set_as_keyword(name, pick(name))  # (a None threshold stays off)
    settings.validate(user_set_attributes=set(names))
    return (settings.num_assistant_tokens, settings.num_assistant_tokens_schedule,
            settings.assistant_confidence_threshold)


def _speculative_pick(drafts_1C: torch.Tensor, draft_q: list[torch.Tensor], p_1PV: torch.Tensor,
                      weight: float | None = None):
    """(the kept tokens [1, n + 1], n): the first n drafts, each kept with probability
    min(1, p(x) / q(x)) until the first rejection, then one token drawn from max(p - q, 0)
    renormalised at that position (from p itself past the last draft, or where p equals q there).
    With an ensemble `weight` w, the drafts are checked against v = w * p + (1 - w) * q, kept with
    probability min(1, v(x) / q(x)); max(v - q, 0) = w * max(p - q, 0) draws as above."""
    C = drafts_1C.shape[1]
    n = 0
    if C:
        q_CV = torch.cat(draft_q, dim=0)
        x_C = drafts_1C[0]
        idx = torch.arange(C, device=x_C.device)
        ratio_C = p_1PV[0, idx, x_C] / q_CV[idx, x_C]
        if weight is not None:
            ratio_C = 1 - weight + weight * ratio_C
        # strictly below: a uniform draw of exactly 0 never keeps a token that p gives 0
        kept_C = torch.rand(C, device=x_C.device) < ratio_C
        n = int((kept_C.long().cumprod(dim=0)).sum())
    p_V = p_1PV[0, n]
    if n < C:
        residual = (p_V - q_CV[n]).clamp(min=0)
        total = residual.sum()
        floor = 0.0 if weight is None else torch.finfo(total.dtype).tiny  # (as Transformers for each)
        p_V = residual / total if float(total) > floor else p_V
    token = torch.multinomial(p_V, num_samples=1)
    return torch.cat([drafts_1C[:, :n], token[None]], dim=-1), n


class _OneStepLate:
    """What the host reads from the device each step (whether any row runs; the new tokens, for a
    streamer), read one step late. Each step's values are copied into pinned host memory behind an
    event, and the host waits only for the step before's: the step just queued keeps the GPU busy
    meanwhile, where reading its own values would leave the GPU idle while the host prepares the
    next step."""

    def __init__(self, device: torch.device, rows: int) -> None:
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.current_stream(device) if self.cuda else None
        pin = self.cuda
        self.flags = [torch.zeros((), dtype=torch.bool, pin_memory=pin) for _ in range(2)]
        self.tokens = [torch.zeros(rows, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self.events = [torch.cuda.Event() if self.cuda else None for _ in range(2)]
        self.steps = 0

    def push(self, running_R: torch.Tensor | None, next_R: torch.Tensor | None):
        """Queue this step's values (None: not wanted); return the step before's (flag, tokens), each
        None where not wanted or at the first step."""
        now, before = self.steps % 2, (self.steps + 1) % 2
        if running_R is not None:
            self.flags[now].copy_(running_R.any(), non_blocking=self.cuda)
        if next_R is not None:
            self.tokens[now].copy_(next_R, non_blocking=self.cuda)
        if self.cuda:
            self.events[now].record(self.stream)
        self.steps += 1
        if self.steps == 1:
            return None, None
        self._wait(before)
        return (None if running_R is None else bool(self.flags[before]),
                None if next_R is None else self.tokens[before].clone())

    def latest_tokens(self) -> torch.Tensor:
        """The tokens of the last step pushed."""
        last = (self.steps + 1) % 2
        self._wait(last)
        return self.tokens[last].clone()

    def _wait(self, i: int) -> None:
        if self.cuda:
            self.events[i].synchronize()


def _fused_sampler(processors: LogitsProcessorList, gen: GenerationConfig, device: torch.device):
    """A step's draw through `ops.triton_sample.sample`, or None (the processors, softmax and
    `torch.multinomial`): for sampling (not beams) with nothing recorded, on a device the fused
    kernels serve. The kernel computes Transformers' temperature, top-k (at most `MAX_K`), top-p
    (after such a top-k) and min-p warpers, which end the processor list in that order; the
    processors before them run first, in torch on float32 logits."""
    if not (gen.do_sample and gen.num_beams == 1 and not gen.return_dict_in_generate):
        return None
    if not (fused.SAMPLE_KERNEL and fused.serves(device)):
        return None
    from ..ops import triton_sample

    procs = list(processors)
    end, temperature, top_k, top_p, min_p = len(procs), None, None, None, None
    last = procs[end - 1] if end else None
    if type(last) is MinPLogitsWarper and last.filter_value == NEG_INF and last.min_tokens_to_keep == 1:
        min_p, end = last.min_p, end - 1
    last = procs[end - 1] if end else None
    if type(last) is TopPLogitsWarper and last.filter_value == NEG_INF and last.min_tokens_to_keep == 1:
        top_p, end = last.top_p, end - 1
    last = procs[end - 1] if end else None
    if type(last) is TopKLogitsWarper and last.filter_value == NEG_INF:
        top_k, end = last.top_k, end - 1
    last = procs[end - 1] if end else None
    if type(last) is TemperatureLogitsWarper:
        temperature, end = last.temperature, end - 1
    # top-p orders the survivors of the kernel's own top-k; otherwise the kernel only draws
    if (top_k is not None and top_k > triton_sample.MAX_K) or (top_p is not None and top_k is None):
        end, temperature, top_k, top_p, min_p = len(procs), None, None, None, None
    head = LogitsProcessorList(procs[:end])

    def draw(seq_RL: torch.Tensor, logits_RV: torch.Tensor) -> torch.Tensor:
        if head:
            logits_RV = head(seq_RL, logits_RV.to(dtype=torch.float32, copy=True))
        return triton_sample.sample(logits_RV, temperature, top_k, top_p, min_p)

    return draw


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _foreign_modules(model) -> bool:
    """Whether a module of another library than moetorch and torch sits in the model (PEFT's
    adapter layers, a quantised layer, a subclass). Graphs replay what they captured, and such a
    module's Python state can change between calls (an adapter switched off, merged or swapped)
    where the held graphs' key does not see it: such a model captures its graphs anew each call."""
    return any(not type(m).__module__.startswith(("moetorch.", "torch.")) for m in model.modules())


def _check_no_input_hook(model) -> None:
    """generate() builds each step's inputs itself: a `prepare_inputs_for_generation` put in the
    place of moetorch's (a subclass's, or an instance attribute) would be ignored, so it is an
    error. PEFT sets its own there while it generates; for adapters that change weights (LoRA,
    DoRA, IA3, ...) it only calls moetorch's, so it may stay. Prompt learning (prompt tuning,
    p-tuning, prefix tuning) adds its virtual tokens there and cannot."""
    hook = model.__dict__.get("prepare_inputs_for_generation")
    if getattr(hook, "__self__", None) is model and \
            getattr(hook, "__func__", None) is type(model).prepare_inputs_for_generation:
        return  # its own method, put back as an attribute (PEFT's generate does so when it ends)
    if hook is None:
        if type(model).prepare_inputs_for_generation.__module__.startswith("moetorch."):
            return
        raise NotImplementedError(
            f"{type(model).__name__} overrides prepare_inputs_for_generation, which moetorch's generate() "
            "does not call (it builds each step's inputs itself)"
        )
    peft_config = getattr(getattr(hook, "__self__", None), "active_peft_config", None)
    if peft_config is not None and not getattr(peft_config, "is_prompt_learning", True):
        return
    if peft_config is not None:
        method = getattr(peft_config.peft_type, "value", peft_config.peft_type)
        raise NotImplementedError(
            f"PEFT {method} adds its virtual tokens in prepare_inputs_for_generation, which "
            "moetorch's generate() does not call. Adapters that change weights (LoRA, DoRA, IA3, ...) "
            "generate; for a prompt-tuned model, pass inputs_embeds with the prompt's embeddings in front"
        )
    raise NotImplementedError(
        "model.prepare_inputs_for_generation was replaced, and moetorch's generate() does not call it "
        "(it builds each step's inputs itself)"
    )


def _warn_negative_ids(gen: GenerationConfig) -> None:
    """Transformers' warnings for the negative special ids it takes: an EOS id that never comes
    (each call), a negative pad id (once)."""
    eos, pad_id = eos_ids(gen.eos_token_id), gen.pad_token_id
    if any(i < 0 for i in eos):
        logger.warning("generate(): `eos_token_id` %s holds negative ids, which no token matches: generation "
                       "will not stop at them, only at the maximum length or another stopping rule", eos)
    if pad_id is not None and pad_id < 0:
        warn_once("generate: negative pad_token_id", "generate(): `pad_token_id` is negative (%d): a row that stops "
                  "before the others is padded with it, and a step that would then feed it to the model is an "
                  "error", pad_id)


def _first_eos(gen: GenerationConfig) -> int | None:
    """The first EOS id (the pad id Transformers falls back to), or None."""
    eos = gen.eos_token_id
    if eos is None:
        return None
    return eos if isinstance(eos, int) else eos[0]


def _given_positions(position_ids, batch: int, length: int) -> torch.Tensor:
    """`generate(position_ids=...)`: the prompt's positions, [batch, length] or one row for all."""
    if (not torch.is_tensor(position_ids) or position_ids.dim() not in (1, 2) or position_ids.is_floating_point()
            or position_ids.dtype == torch.bool):
        raise ValueError(f"position_ids must be an integer tensor [batch, seq] like the prompt {(batch, length)}, "
                         f"got {getattr(position_ids, 'shape', type(position_ids).__name__)}")
    p = position_ids if position_ids.dim() == 2 else position_ids[None]
    if p.shape[1] != length or p.shape[0] not in (1, batch):
        raise ValueError(f"position_ids must be [batch, seq] like the prompt {(batch, length)}, got {tuple(p.shape)}")
    return p.long().expand(batch, length).contiguous()


def _other_modes(gen: GenerationConfig) -> list[str]:
    """The `_UNSUPPORTED` settings of `gen` that pick one of Transformers' decoding modes moetorch
    lacks, by Transformers' rules (`get_generation_mode`): constrained beam search, contrastive search
    (penalty_alpha > 0 with top_k > 1, greedy), group beam search (groups > 1 with beams), DoLa
    (greedy or sampling), token healing and multi-token prediction."""
    value = {k: getattr(gen, k, noop) for k, noop in _UNSUPPORTED.items()}
    one, greedy = gen.num_beams == 1, gen.num_beams == 1 and not gen.do_sample
    picked = {
        "constraints": value["constraints"] is not None,
        "force_words_ids": value["force_words_ids"] is not None,
        "penalty_alpha": greedy and (value["penalty_alpha"] or 0) > 0 and (gen.top_k or 0) > 1,
        "num_beam_groups": not one and (value["num_beam_groups"] or 1) > 1,
        "dola_layers": one and value["dola_layers"] is not None,
        "token_healing": bool(value["token_healing"]),
        "use_mtp": bool(value["use_mtp"]),
    }
    return [k for k, on in picked.items() if on]


def _padding(seq, mask, pad_id, eos):
    """(mask, positions) for the prompt, both None when nothing is padded.

    Without a mask, padding is inferred from `pad_id` in the ids (unless it is an EOS id), as in
    Transformers, also where inputs_embeds come with them (embeds alone tell nothing). Positions
    count real tokens only: cumsum(mask) - 1 (0 on padding).
    """
    if mask is None and pad_id is not None:
        pad_is_eos = eos is not None and bool(torch.isin(eos, torch.tensor(pad_id, device=eos.device)).any())
        if not pad_is_eos and bool((seq == pad_id).any()):
            mask = (seq != pad_id).long()
    if mask is None or bool((mask == 1).all()):
        return None, None
    if bool((mask[:, -1] == 0).any()):
        logger.warning("generate(): the prompt looks right-padded; decoder-only models need left padding "
                       "(tokenizer.padding_side = 'left') for correct results")
    positions = (mask.cumsum(dim=-1) - 1).masked_fill(mask == 0, 0)
    return mask, positions


def _check_config_holds_no_generation_settings(config, model_generation_config: GenerationConfig) -> None:
    """Transformers' rule: generation settings set on `model.config` (rather than on
    `model.generation_config`) are an error, not silently ignored. Those a checkpoint's config.json
    carried, and which `model.generation_config` took over, are fine."""
    declared = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    stray = {}
    for name in DEFAULTS:
        if name == "use_cache" or name in declared:
            continue
        value = getattr(config, name, None)
        if value is not None and value != getattr(model_generation_config, name):
            stray[name] = value
    if stray:
        raise ValueError(f"generation settings are set on the model config: {stray}. Set them on "
                         "model.generation_config (or pass them to generate()) instead; moetorch, like "
                         "Transformers, does not read them from model.config")


def _check_token_ids(gen: GenerationConfig, vocab_size: int | None) -> None:
    """Token ids that a processor forces or bans must be in the vocabulary (a forced id past its end
    would come out as another token)."""
    if vocab_size is None:
        return
    for name in ("forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens"):
        value = getattr(gen, name)
        ids = [] if value is None else [value] if isinstance(value, int) else list(value)
        outside = [i for i in ids if i >= vocab_size]
        if outside:
            raise ValueError(f"generate(): `{name}` holds {outside}, outside the vocabulary of {vocab_size} tokens")


def _held_tokens(cache) -> int:
    """The tokens a passed cache holds (0 for anything else, which `_check_user_cache` rejects)."""
    return cache.get_seq_length() if isinstance(cache, Cache) else 0


def _uncache_the_last_prompt_token(cache, prompt_length: int) -> None:
    """A cache that already holds the whole prompt (a forward over it, then generate with the same
    prompt) gives up the prompt's last token, whose forward then gives the first new token's
    logits. One that holds more than the prompt is an error."""
    held = cache.get_seq_length()
    if held > prompt_length:
        raise ValueError(f"past_key_values holds {held} tokens but the prompt has {prompt_length}: pass the whole "
                         "sequence the cache holds, followed by the tokens it does not hold yet")
    if held == prompt_length:
        cache.truncate(held - 1)


def _check_user_cache(cache, gen: GenerationConfig, expand: int) -> None:
    if not isinstance(cache, Cache):
        kind = type(cache)
        raise TypeError(f"past_key_values must be a moetorch Cache (moetorch.DynamicCache or StaticCache), got "
                        f"{kind.__module__}.{kind.__qualname__}: moetorch's models keep their keys and values "
                        f"in moetorch's caches{_carry_over_hint(cache)}")
    if gen.cache_implementation is not None:
        raise ValueError("pass either past_key_values or cache_implementation, not both")
    if not gen.use_cache:
        raise ValueError("past_key_values was given with use_cache=False")
    if expand > 1 and cache.get_seq_length() > 0:
        raise ValueError("a past_key_values that holds tokens cannot be combined with num_beams or "
                         "num_return_sequences > 1 (an empty one can)")


__all__ = ["GenerateBeamDecoderOnlyOutput", "GenerateDecoderOnlyOutput", "GenerationMixin"]
