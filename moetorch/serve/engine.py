"""The server's engine: a model's continuous-batching manager, driven from an asyncio event loop.

A request goes to the manager with its own settings (`add_request(..., do_sample=, temperature=,
top_k=, top_p=, seed=)`), and its tokens come back through a result handler on the loop. The
engine turns them into text as they come (`Detokenizer`), ends the request at a stop string
(cancelling it in the manager), and hands out `Piece`s: the new text, the new tokens with their
log-probabilities, and at the end why it finished.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..engine.batching import ContinuousBatchingConfig, RequestStatus
from ..engine.row_sampling import FLOAT_SETTINGS, SAMPLING_ONLY, fits_float32
from ..generation.grammar import Grammar
from ..generation.utils import chat_eos_ids, eos_ids

logger = logging.getLogger("moetorch")
GRAMMAR_CACHE = 64  # compiled response_format schemas kept
SAMPLING_EPS = 1e-5  # a temperature below it decodes greedily (as vLLM's _SAMPLING_EPS): scores / it overflow


class Detokenizer:
    """Text of a growing list of token ids, a piece at a time, decoding only a few tokens per
    step. Text is held back while it ends in an incomplete character (U+FFFD). A window of tokens
    before the new ones is decoded with them, so that the tokenizer's rules for a word's first
    piece (SentencePiece's leading space) see the same context as a decode of the whole list."""

    def __init__(self, tokenizer, prompt_tail: list[int] | None = None) -> None:
        self.tok = tokenizer
        self.ids: list[int] = list(prompt_tail or [])
        # decoded context starts at prefix; text is out up to read: the prompt's tail is the first
        # window's context (a SentencePiece decode strips the space of its first piece alone)
        self.prefix, self.read = 0, len(self.ids)

    def _text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _new_text(self) -> str:
        # the text of the tokens past `read`, decoded in the window from `prefix`. The text before
        # is a prefix of the text after, but where a prompt ends inside a character (token ids cut
        # there): its U+FFFD becomes the character the new tokens complete, which is theirs
        before = self._text(self.ids[self.prefix:self.read])
        after = self._text(self.ids[self.prefix:])
        if not after.startswith(before):
            before = os.path.commonprefix([before, after])
        return after[len(before):] if len(after) > len(before) else ""

    def add(self, new_ids: list[int]) -> str:
        """The text that `new_ids` add (possibly empty: held back)."""
        self.ids.extend(new_ids)
        text = self._new_text()
        if text and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text
        return ""

    def flush(self) -> str:
        """What is still held back (at the end of the request), replacement characters and all."""
        text = self._new_text()
        self.prefix = self.read = len(self.ids)
        return text


class StopText:
    """Text out with stop strings: text that could be the start of a stop string is held until
    it is known not to be; at a stop string the text ends before it."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""

    def add(self, text: str) -> tuple[str, bool]:
        """(text to send, whether a stop string ended it)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        cut = max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Piece:
    """What a request produced since its last piece."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token, when asked
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", or None: not finished
    prompt_tokens: int = 0
    completion_tokens: int = 0


class PromptError(ValueError):
    """A request the engine cannot take (an empty prompt, one too long); `param`: the field,
    `code`: OpenAI's error code (`context_length_exceeded`) or None."""

    def __init__(self, message: str, param: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


class EngineError(RuntimeError):
    """The manager failed a request (not a cancellation by the engine)."""


def admit(settings: dict[str, Any], vocab: int) -> dict[str, Any]:
    """A request's settings (`add_request`'s keywords) as the batch's loop will hold them, checked
    here so that a bad one fails its own request (PromptError naming the setting), never the loop
    that every request shares: numbers must fit the batch's tensors (float32, int64); a temperature
    below SAMPLING_EPS decodes greedily; a top_k of the vocabulary's size or more filters nothing."""
    out = dict(settings)
    for name in FLOAT_SETTINGS:
        value = out.get(name)
        if value is not None and not fits_float32(value):
            raise PromptError(f"{name}: {value!r} is not a finite number within float32's range", name)
    for tok, bias in (out.get("logit_bias") or {}).items():
        if not fits_float32(bias):
            raise PromptError(f"logit_bias[{tok!r}]: {bias!r} is not a finite number", "logit_bias")
    for name in ("top_k", "seed", "top_logprobs"):
        value = out.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not -2**63 <= value < 2**63):
            raise PromptError(f"{name}: {value!r} is not an integer within int64's range", name)
    if out.get("do_sample") and out.get("temperature", 1.0) < SAMPLING_EPS:
        out = {k: v for k, v in out.items() if k not in SAMPLING_ONLY}
        out["do_sample"] = False
    if (out.get("top_k") or 0) >= vocab:
        out["top_k"] = 0
    return out


def build_manager(model, eos: list[int], pad: int | None, max_model_len: int | None = None,
                  max_batch: int | None = None, max_batch_tokens: int | None = None,
                  prefix_sharing: bool = True, prefill_chunk_tokens: int | None = None,
                  paged: bool | None = None) -> tuple[Any, dict]:
    """The server's continuous-batching manager for `model` (greedy by default, log-probabilities
    returned, rows of `max_model_len` slots, prompts starting from cached prefixes unless
    `prefix_sharing` is False, long prompts computed in chunks of `prefill_chunk_tokens` while
    requests decode) and what the engine's front needs to know of it:
    `max_model_len`, `eos` (the model's EOS ids, else `eos`, the tokenizer's), `vocab_size`,
    `rows`, `batch_tokens`, `device`."""
    from ..generation.configuration import GenerationConfig

    limit = getattr(model.config, "max_position_embeddings", None)
    max_model_len = max_model_len or min(4096, limit or 4096)
    if limit is not None and max_model_len > limit:
        raise ValueError(f"max_model_len={max_model_len} is past the model's max_position_embeddings ({limit})")
    eos = eos_ids(model.generation_config.eos_token_id) or eos
    pad = pad if pad is not None else (eos[0] if eos else 0)
    gen = GenerationConfig(do_sample=False, max_new_tokens=None, eos_token_id=eos or None, pad_token_id=pad)
    cfg = ContinuousBatchingConfig(max_requests_per_batch=max_batch, max_cache_len=max_model_len,
                                   max_batch_tokens=max_batch_tokens, return_logprobs=True,
                                   allow_block_sharing=prefix_sharing, prefill_chunk_tokens=prefill_chunk_tokens,
                                   paged=paged)
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cfg)
    return manager, {"max_model_len": max_model_len, "eos": eos, "vocab_size": model.config.vocab_size,
                     "rows": manager.rows, "batch_tokens": manager.batch_tokens, "device": model.device.type}


def warm_prefills(model, manager, max_model_len: int) -> list[tuple[int, int]]:
    """Prefill random prompts of every power-of-two token count from 16 up to a prefill group's,
    so that the kernels (and block sizes) that a first request's prefill picks are compiled before
    one comes, not while it waits; then capture the manager's prefill graphs of one prompt
    (`warm_prefill_graphs`). Returns the (prompts, length) shapes run."""
    import torch

    longest = max_model_len - 1
    top = min(manager.batch_tokens, manager.rows * longest)
    shapes, tokens = [], 16
    while tokens <= top:
        length = min(tokens, longest)
        shapes.append((max(1, tokens // length), length))
        tokens *= 2
    vocab = model.config.vocab_size
    with torch.no_grad():
        for rows, length in shapes:
            ids = torch.randint(1, vocab, (rows, length), device=model.device)
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    manager.warm_prefill_graphs()
    return shapes


def score_prompt(model, manager, ids: list[int], top_n: int) -> tuple[list, list]:
    """Each prompt token's log-probability given the tokens before it (None for the first), and
    the `top_n` likeliest (id, log-probability) there: one forward over the prompt, run while the
    manager's loop is paused (between two steps)."""
    import torch

    from ..ops.host import on_device

    device = model.device
    with manager.pause(), torch.no_grad(), on_device(device):
        logits = model(torch.tensor([ids], device=device)).logits[0, :-1]
        lsm = logits.float().log_softmax(dim=-1)
        chosen = lsm.gather(1, torch.tensor(ids[1:], device=lsm.device)[:, None]).squeeze(1).tolist()
        tops: list = [[] for _ in chosen]
        if top_n:
            values, top_ids = lsm.topk(top_n, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), values.tolist())]
    return [None, *chosen], [None, *tops]


def _tokenizer_ids(tokenizer) -> dict:
    """`build_manager`'s `eos` and `pad` from the tokenizer (the model's EOS ids come first there)."""
    return {"eos": eos_ids(getattr(tokenizer, "eos_token_id", None)), "pad": tokenizer.pad_token_id}


def cached_grammar(cache: dict, key, build) -> Grammar:
    """`cache[key]`, built by `build()` when absent; the cache keeps the GRAMMAR_CACHE latest used."""
    grammar = cache.pop(key, None) or build()
    cache[key] = grammar
    if len(cache) > GRAMMAR_CACHE:
        cache.pop(next(iter(cache)))
    return grammar


class StreamedOutput:
    """A request's results so far, as `GenerationOutput` holds them (what `Engine.generate` reads),
    added up from deltas."""

    __slots__ = ("request_id", "status", "generated_tokens", "logprobs", "top_logprobs", "error")

    def __init__(self, request_id: str) -> None:
        self.request_id, self.status, self.error = request_id, RequestStatus.PENDING, None
        self.generated_tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list = []

    def extend(self, status, tokens: list[int], logprobs: list[float], tops: list, error: str | None) -> None:
        self.generated_tokens += tokens
        self.logprobs += logprobs
        self.top_logprobs += tops
        self.status, self.error = RequestStatus(status), error

    def is_finished(self) -> bool:
        return self.status >= RequestStatus.FINISHED


class Engine:
    """A model and its tokenizer behind a running continuous-batching manager.

    `max_model_len`: slots of a batch row, the longest prompt + completion a request may have.
    `max_batch`: rows (requests decoding at once); None: at most 256 (64 on the CPU), as many as
    the GPU's memory holds at `max_model_len` slots each, or all 256 with a paged cache. `paged`:
    the cache's memory follows what running requests use (`ContinuousBatchingConfig.paged`; None:
    on a GPU where the memory would hold fewer than `max_batch` rows of whole slots).
    `Engine.spawn` runs the model and its manager in a process of their own instead
    (`worker.py`)."""

    def __init__(self, model, tokenizer, name: str, max_model_len: int | None = None, max_batch: int | None = None,
                 max_batch_tokens: int | None = None, prefix_sharing: bool = True,
                 prefill_chunk_tokens: int | None = None, paged: bool | None = None) -> None:
        manager, info = build_manager(model, **_tokenizer_ids(tokenizer), max_model_len=max_model_len,
                                      max_batch=max_batch, max_batch_tokens=max_batch_tokens,
                                      prefix_sharing=prefix_sharing, prefill_chunk_tokens=prefill_chunk_tokens,
                                      paged=paged)
        self._setup(model, manager, tokenizer, name, info)

    def _setup(self, model, manager, tokenizer, name: str, info: dict) -> None:
        self.model, self.manager, self.tokenizer, self.name = model, manager, tokenizer, name
        self.max_model_len, self.eos, self.vocab_size = info["max_model_len"], info["eos"], info["vocab_size"]
        self.device = info["device"]
        self.chat_eos = chat_eos_ids(self.eos, tokenizer)
        self._ids = itertools.count()
        self._grammars: dict[str, Grammar] = {}  # JSON schemas' grammars, the latest used last

    def json_grammar(self, schema: dict | None) -> Grammar:
        """The grammar of JSON that `schema` describes (None: any object) over this engine's
        tokenizer, compiled once per schema (ValueError: a schema it cannot follow)."""
        key = json.dumps(schema)  # (key order counts: the output's properties come in the schema's order)
        return cached_grammar(self._grammars, key,
                              lambda: Grammar.json(self.tokenizer, schema, vocab_size=self.vocab_size))

    @classmethod
    def spawn(cls, loader, tokenizer, name: str, max_model_len: int | None = None, max_batch: int | None = None,
              max_batch_tokens: int | None = None, prefix_sharing: bool = True,
              prefill_chunk_tokens: int | None = None, paged: bool | None = None,
              start_method: str = "spawn") -> Engine:
        """An engine whose model and manager run in a process of their own: `loader()` (a
        picklable callable, e.g. `functools.partial(worker.load_pretrained, path, device, dtype)`)
        builds the model there, which then warms its prefills and starts its manager. This process
        keeps the tokenizer, the text and the HTTP side, so they no longer share an interpreter
        lock with the batch's loop. Returns once the engine process is ready."""
        from .worker import ManagerClient

        client = ManagerClient(loader, dict(**_tokenizer_ids(tokenizer), max_model_len=max_model_len,
                                            max_batch=max_batch, max_batch_tokens=max_batch_tokens,
                                            prefix_sharing=prefix_sharing,
                                            prefill_chunk_tokens=prefill_chunk_tokens, paged=paged), start_method)
        engine = cls.__new__(cls)
        engine._setup(None, client, tokenizer, name, client.info)
        return engine

    def start(self) -> None:
        """Warm the prefill kernels (on a GPU), then start the manager (which captures the decode
        graphs). An engine process has done both before `spawn` returned."""
        if self.model is None:
            return
        if self.device == "cuda":
            self.warm_prefills()
        self.manager.start()

    def warm_prefills(self) -> list[tuple[int, int]]:
        """See `warm_prefills` (the module's function)."""
        return warm_prefills(self.model, self.manager, self.max_model_len)

    async def prompt_logprobs(self, ids: list[int], top_n: int) -> tuple[list, list]:
        """See `score_prompt`: in a thread, here or in the engine process."""
        if self.model is None:
            return await asyncio.to_thread(self.manager.score, ids, top_n)
        return await asyncio.to_thread(score_prompt, self.model, self.manager, ids, top_n)

    def stop(self) -> None:
        if self.manager.is_running():
            self.manager.stop(block=True, hard_stop=True)

    def ensure_running(self) -> None:
        """EngineError (a 500 that says why) where the batch's loop, or the engine process, has
        stopped: a request queued there would wait forever. (A loop not started yet is fine: it
        serves what was queued when it starts. A step that failed and that the loop survived,
        `ContinuousBatchingManager.recovered_errors`, failed its own requests only, each an
        EngineError from `generate`.)"""
        manager = self.manager
        if self.model is None:  # the engine process
            if not manager.is_running():
                raise EngineError(f"the engine process is not running{manager._why()}")
        elif manager._thread is not None and not manager.is_running():
            why = manager.fatal_error
            raise EngineError("the batch's loop is not running" +
                              (f" ({type(why).__name__}: {why})" if why is not None else " (stopped)"))

    def check_prompt(self, ids: list[int], max_tokens: int | None, where: str, param: str | None = None) -> int:
        """The completion's token limit, or PromptError naming the field at fault (`where` in the
        message, e.g. "prompt[1]"; `param` the request's field, default `where`)."""
        param = param or where
        if not ids:
            raise PromptError(f"{where}: the prompt is empty", param)
        room = self.max_model_len - len(ids)  # prompt + completion <= max_model_len
        # OpenAI's wording and code, which clients (LiteLLM, LangChain) read as a context overflow
        what = "messages" if param == "messages" else "prompt"
        limit = f"{where}: This model's maximum context length is {self.max_model_len} tokens"
        if room < 0 or (room == 0 and max_tokens != 0):
            raise PromptError(f"{limit}. However, your {what} resulted in {len(ids)} tokens"
                              f"{', which leaves no room for a completion' if room == 0 else ''}. Please reduce the "
                              f"length of the {what} (this server's --max-model-len)", param, "context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise PromptError(f"{limit}. However, you requested {len(ids) + max_tokens} tokens ({len(ids)} in the "
                              f"{what}, {max_tokens} in the completion). Please reduce the length of the {what} or "
                              "completion (max_tokens; this server's --max-model-len)", param,
                              "context_length_exceeded")
        return room if max_tokens is None else max_tokens

    async def generate(self, ids: list[int], max_tokens: int, sampling: dict[str, Any], stop: list[str],
                       eos: list[int], stream: bool) -> AsyncIterator[Piece]:
        """Pieces of one completion of prompt `ids` until it finishes; cancelled in the manager
        when the caller stops iterating early (a client that went away). `sampling`: the
        manager's per-request settings (`do_sample`, `temperature`, `top_k`, `top_p`, `seed`,
        `top_logprobs`)."""
        self.ensure_running()
        rid = f"srv-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        sofar = StreamedOutput(rid)  # results come as deltas (a whole one would copy every token so far)

        def take(out) -> None:
            sofar.extend(out.status, out.generated_tokens, out.logprobs, out.top_logprobs, out.error)
            queue.put_nowait(sofar)

        sampling = admit(sampling, self.vocab_size)  # (a setting the batch cannot hold fails here, not in its loop)
        self.manager.register_result_handler(rid, take, deltas=True)
        try:
            # streaming results let a stop string end the request early; without stops, the last will do
            self.manager.add_request(ids, request_id=rid, max_new_tokens=max_tokens, streaming=stream or bool(stop),
                                     eos_token_id=eos or [], **sampling)
        except BaseException:
            self.manager.unregister_result_handler(rid)
            raise
        detok, text = Detokenizer(self.tokenizer, ids[-4:]), StopText(stop)
        seen, done = 0, False
        # tokens (and their log-probabilities) go out with the first piece whose text reaches where
        # theirs starts: one whose text is held back (a stop string's start, perhaps) waits with it
        new_ids: list[int] = []
        new_lps: list[float] = []
        new_tops: list = []
        starts: list[int] = []  # where each of new_ids' text starts in the completion's text
        made = sent = 0  # characters decoded; characters sent
        try:
            while not done:
                out = await queue.get()
                while not queue.empty():  # results hold every token so far: the latest will do
                    out = queue.get_nowait()
                if out.status == RequestStatus.FAILED:
                    raise EngineError(out.error or "the request failed")
                # the new tokens one at a time: at a stop string the request ends with the token that
                # completes it, however many the batch decoded past it before this read (usage and
                # log-probabilities do not depend on how far the host lagged)
                chunk, stopped, used = "", False, 0
                for token in out.generated_tokens[seen:]:
                    starts.append(made)
                    decoded = detok.add([token])
                    made += len(decoded)
                    piece, stopped = text.add(decoded)
                    chunk, used = chunk + piece, used + 1
                    if stopped:
                        break
                new_ids += out.generated_tokens[seen:seen + used]
                new_lps += out.logprobs[seen:seen + used]
                new_tops += out.top_logprobs[seen:seen + used]
                seen += used
                reason = None
                if stopped:
                    reason = "stop"
                elif out.is_finished():
                    tail, stopped = text.add(detok.flush())
                    chunk += tail if stopped else tail + text.flush()
                    last = out.generated_tokens[-1] if out.generated_tokens else None
                    # ended short of max_tokens: at EOS, or where its grammar could take no further token
                    short = len(out.generated_tokens) < max_tokens
                    reason = "stop" if stopped or last in eos or short else "length"
                done = reason is not None
                if chunk or done:
                    sent += len(chunk)
                    out_n = len(new_ids) if done else sum(start < sent for start in starts)
                    yield Piece(chunk, new_ids[:out_n], new_lps[:out_n], new_tops[:out_n], reason, len(ids), seen)
                    del new_ids[:out_n], new_lps[:out_n], new_tops[:out_n], starts[:out_n]
        finally:
            if not done:
                self.manager.cancel_request(rid)
            elif not out.is_finished():
                self.manager.cancel_request(rid)  # ended at a stop string: the manager may stop too

