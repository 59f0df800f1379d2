"""Continuous batching: Transformers 5's `generate_batch` and `init_continuous_batching`.

Requests join and leave a running batch between decode steps. The batch lives in one
`StaticCache` of R rows x S slots, and every running request owns a row. All rows write their
next key into the same slot, the batch's column `col`, so one decode step serves every row with a
single cache position: the step `generate` already captures in a CUDA graph. What differs between
rows is held on the device, where the step reads it:

- a row's attention mask, `mask[r, j] = 1` from the row's first slot on (the causal rule hides the
  slots past `col`);
- a row's rotary position (its own length), independent of the slot;
- the next token to feed.

A request with a prompt of L tokens joins at column `col` by a prefill whose keys land in slots
`col - L .. col - 1` of a free row; its first token comes from that prefill. Requests that join
together are prefilled in one forward (at most `max_batch_tokens` computed tokens), their prompts
packed in one row without padding, each attending its own keys (`cache.PackedRows`). While
requests decode, a forward computes at most `prefill_chunk_tokens` (2048): a longer prompt is
computed in chunks, one decode step of the running rows between them, so that no prefill holds them
up for longer than one chunk. A chunk that runs eagerly carries that step in its own forward
(`MIX_CHUNKS`, `cache.MixedRows`). A request
needs `col + max_new_tokens - 1 <= S` to finish in place; when a waiting request would not fit,
the cache's live columns move in one shift (keys are rotated by position, not slot, so moving
them changes nothing they compute), to the left when the batch has run far, or to the right to
make room for a long prompt.

Paged (`ContinuousBatchingConfig.paged`; by default on a GPU where whole rows would not fit),
the cache lies slot-major in one reserved range (`engine.pages`), and memory is mapped only behind
the slots that requests hold (`_spans`): a running request's prompt and new tokens, a request in
chunks, and finished rows that prompts may start from. A prefill group takes the requests whose
pages are free (`_fit_pages`). A running request's pages reach the batch's horizon, a page past
the column, and grow a page at a time as it decodes (`_grow`); where no page is left, the latest
request gives its pages up and is computed again later (`_preempt`), as vLLM's recompute
preemption does.

Decode runs over the rows below the highest one in use, rounded up to a bucket (powers of two),
one CUDA graph per bucket on a GPU. A free row inside that range computes a throwaway token that
attends only its slot 0 and writes its key at the column; paged on poisoned host pages, a request
that takes the row has the slots before its first one on its first page zeroed
(`_Batch.clear_before`), since masked slots still enter its attention.

LongRoPE (PhiMoE): each row rotates by its own factor set (`_Batch.long`, which the decode
steps' rotary tables read per row), as its request's own `generate` call would. A prompt past
`original_max_position_embeddings` takes the long factors from its prefill on. A shorter one
whose sequence grows past it is computed again, as `generate` does there: in the step that would
feed the token at that position, its row joins no decode; its whole sequence (prompt and tokens
so far) runs as one prefill with the long factors into the same slots, whose last logits give its
next token (`_recompute`).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import gc
import heapq
import itertools
import logging
import numbers
import threading
import time
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
import torch

from ..cache import PackedRows, StaticCache, _kv_shape, slot_major_bytes
from ..ops.host import host_copy_bytes, on_device, to_device
from . import prefixes
from .cuda_graph import (
    PREFILL_BUCKETS,
    PREFILL_CAPTURE_AFTER,
    DecodeRows,
    GraphedPackedPrefill,
    _rotary,
    capture,
    mixed_forward,
    own_forward,
    packed_forward,
    packed_inputs,
)
from .pages import DevicePages, HostPages, Pages, granularity
from .prefixes import PrefixIndex
from .row_sampling import RowSettings, Sampling, TokenCounts, draw_rows, penalize_rows, single_token_bias

logger = logging.getLogger("moetorch")

# Decode batch sizes that get a graph of their own; the manager's row count closes the list.
DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MAX_ROWS = 256
# Rows without a hint of the workload or a GPU to size them by.
DEFAULT_ROWS = 64
# Tokens of one prefill forward unless the config says otherwise.
DEFAULT_BATCH_TOKENS = 16384
# While requests decode, tokens of one prefill forward (a longer prompt is computed in chunks, a
# decode step between them) unless the config says otherwise.
DEFAULT_CHUNK_TOKENS = 2048
# A cache without a hint has this many slots a row (within max_position_embeddings).
DEFAULT_SLOTS = 4096
SLOT_ROUND = 256
# While requests run, waiting ones join once an eighth of the rows is free, or after waiting 8
# decode steps: a prefill holds up every running row, and one of a few prompts costs about what a
# large one does on the host.
ADMIT_SHARE = 8
ADMIT_AFTER_STEPS = 8
# Steps in flight while the host reads a step's tokens (0: each step is read before the next).
READ_LAG = 1
# A request of a prefill group starts from the prompt of an earlier one in a second prefill
# phase if the group's requests save at least this many tokens that way (a forward's host time
# is worth a few hundred tokens).
FOLLOW_MIN_TOKENS = 512
# A prefill's attention gathers each layer's keys and values of its prompts' shared prefixes: they
# may take this share of the free GPU memory (a forward costs tens of milliseconds of host time,
# so fewer, wider ones pay), else as many keys as a forward computes.
PREFIX_KEYS_SHARE = 0.5
# Prefill groups replayed from CUDA graphs (`cuda_graph.GraphedPackedPrefill`): None, as the
# config's `use_cuda_graph` says (on a GPU where torch's varlen flash kernel serves the model);
# False, never; True, the padded forward everywhere, eagerly where no graph can run (the tests'
# path on the CPU).
PREFILL_GRAPHS: bool | None = None
# While requests decode, a request computed again past LongRoPE's switch runs in chunks of
# `prefill_chunk_tokens` where its row has room (`_recompute`); False: in one forward.
RECOMPUTE_CHUNKS = True
# While requests decode, a prompt chunk that runs eagerly (no prefill graph serves its shape:
# past GRAPHED_FLOPS, LongRoPE's long factors, prefill graphs off, the CPU) carries the running
# rows' decode step in its forward (`_Batch.mixed`) instead of a step of their own after it.
# True: every chunk, a graph-served one from a CUDA graph per chunk shape and row count (on the
# H200, JetMoE 0.5-1% more tokens/s once captured, for more captures); False: never.
MIX_CHUNKS: bool | str = "eager"
# A manager's cache is paged (`ContinuousBatchingConfig.paged`) unless its config says: None, on a
# GPU where the free memory holds fewer rows of `max_cache_len` slots than the requests (or
# `max_requests_per_batch`) ask for.
PAGED: bool | None = None
# Slots a page of a paged cache (None: the config's `page_size`).
PAGE_SLOTS: int | None = None
# The batch cache's layout: False, [layers, rows, kv heads, slots, head_dim] per keys and values;
# True, one range [rows, slots, 2, layers, kv heads, head_dim] (`cache.slot_major`), in which
# the slots a row uses are one run of bytes (what a cache backed page by page needs).
SLOT_MAJOR = False
# Paged, a running request holds pages up to the batch's horizon, the first page boundary past the
# column, which moves on by a page as the rows decode (`_grow`); where the pages run out, the
# request that came last gives its pages up and waits at the queue's head, to be computed again
# (its prompt and tokens so far) once pages are free (`_preempt`). False: a request holds the
# pages of all its new tokens (`max_new_tokens`) from its prefill on.
PAGES_ON_DEMAND = True
# Paged with pages on demand, a row has this many times `max_cache_len` slots (`row_slots`). All
# rows write one column, and a request joins only where its row has room right of the column for
# every token it may make: with rows of the longest request's slots, a request that may run to the
# row's end (a chat without max_tokens) waits until no running request is far along; with twice
# that, it joins after a cache shift to the longest running sequence. Requests stay bounded by
# `max_cache_len`. None: 2 on a GPU, where slots without tokens cost addresses only, and 1 on the
# host, where every page of the range has memory (`HostPages`).
PAGED_ROW_SPAN: int | None = None
# A cache shift moves its slots in place in at most this many chunks, else through a copy.
SHIFT_CHUNKS = 8
# The most top log-probabilities a request may ask for per token (OpenAI's limit).
MAX_TOP_LOGPROBS = 20
# How long `add_request` waits for room in a full queue (max_queue_size).
QUEUE_WAIT_S = 10.0
# A turn of the loop that raises fails the requests it held, and the loop resets its batch and goes
# on (`ContinuousBatchingManager.recovered_errors`); it stops for good at this many failed turns in
# a row (no turn that did its work between them, and each within STEP_FAILURE_WINDOW_S seconds of
# the one before: failures an idle stretch apart, one bad request now and then, are not a row), or at
# once on a CUDA error other than running out of memory (`_STICKY_ERRORS`: the CUDA context is
# unusable after one).
MAX_STEP_FAILURES = 3
STEP_FAILURE_WINDOW_S = 60.0
_STICKY_ERRORS = ("CUDA error", "Triton Error [CUDA]")
_ACCELERATOR_ERROR = getattr(torch, "AcceleratorError", RuntimeError)

# Generation settings the batch does not apply (Transformers' continuous batching drops their
# processors too), with their no-op values.
_DROPPED = {
    "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0, "min_new_tokens": 0,
    "sequence_bias": None, "guidance_scale": 1.0, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "exponential_decay_length_penalty": None,
    "stop_strings": None, "max_time": None, "watermarking_config": None, "renormalize_logits": False,
    "remove_invalid_values": False, "prompt_lookup_num_tokens": None, "output_scores": False,
    "output_logits": False, "return_dict_in_generate": False, "output_attentions": False,
    "output_hidden_states": False,
}


class RequestStatus(IntEnum):
    """Where a request is in its life, as Transformers numbers it."""

    PENDING = 0
    PREFILLING = 1
    DECODING = 2
    FINISHED = 3
    FAILED = 4


@dataclass
class GenerationOutput:
    """A request's result (or, streaming, its state after each token), as Transformers' class.
    `lifespan`: (when it left the queue, when it finished), `time.perf_counter()` values. A
    request's results share one `prompt_ids` list: read it, do not change it."""

    request_id: str
    prompt_ids: list[int] = field(default_factory=list)
    generated_tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    # moetorch: with add_request(top_logprobs=k), each token's k likeliest (id, log-probability)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    error: str | None = None
    status: RequestStatus = RequestStatus.PENDING
    created_time: float = field(default_factory=time.perf_counter)
    lifespan: tuple[float, float] = (-1, -1)
    timestamps: list[float] | None = None

    def is_finished(self) -> bool:
        """Whether the request finished or failed."""
        return self.status >= RequestStatus.FINISHED


@dataclass
class ContinuousBatchingConfig:
    """Settings of a continuous-batching manager, under Transformers' names.

    `max_requests_per_batch`: rows of the batch (requests decoding at once). Default: the
    requests `generate_batch` was given, within what `max_memory_percent` of the free GPU memory
    holds (0.9, or 0.8 with sampling), at most 256; 64 off the GPU.
    `max_batch_tokens`: prompt tokens of one prefill group (16384).
    `prefill_chunk_tokens` (moetorch): while requests decode, the most prompt tokens one prefill
    forward computes (2048); a longer prompt is computed in chunks of this many tokens, with a
    decode step of the running rows between them. 0: a group's prompts in one forward, as when
    nothing decodes.
    `max_cache_len` (moetorch): slots of a row, the longest prompt + new tokens a request may
    have. Default: twice what `generate_batch`'s longest request needs (fewer shifts of the
    cache), else 4096 within `max_position_embeddings`.
    `use_cuda_graph`: CUDA graphs on a GPU (default: on), as in Transformers a bool for both paths
    or a tuple (prefill, decode): the prefill groups that fit a graph's shape
    (`cuda_graph.GraphedPackedPrefill`), and the decode steps.
    `return_logprobs`: each generated token's log-probability (after the sampling warpers).
    `seed`: seeds torch's generator when the loop starts.
    `max_queue_size`: requests that may wait (0: no limit); `add_request` waits up to 10 s for room.
    `drop_unsupported_processors`: generation settings the batch does not apply (repetition
    penalty, stop strings, ...) are dropped with a warning; False makes them an error.

    `paged` (moetorch): the cache's memory follows what the running requests use (below);
    default (None, `batching.PAGED`): paged on a GPU where the free memory would hold fewer rows
    of `max_cache_len` slots than the requests (or `max_requests_per_batch`) ask for.
    `page_size`: its slots a page (rounded up to the GPU's 2 MB mapping unit). `num_blocks`: the
    most pages with memory at once (default: what `max_memory_percent` of the free GPU memory
    holds).

    Paged, the cache of R rows x S slots is one range of addresses (`engine.pages`): a running
    request holds memory for its prompt's and its tokens' slots only, a page ahead as it decodes
    (`PAGES_ON_DEMAND`), so that rows are not bound by memory (R defaults to the requests, at most
    256), and a request waits for pages, not rows; where pages run out, the latest request gives
    its pages up and is computed again later (`stats["preempted"]`).

    The compile and distributed fields of Transformers' class (`use_async_batching`, ...) are
    accepted and have no effect here.
    """

    max_requests_per_batch: int | None = None
    max_batch_tokens: int | None = None
    prefill_chunk_tokens: int | None = None
    max_cache_len: int | None = None
    max_memory_percent: float | None = None
    use_cuda_graph: bool | tuple[bool, bool] | None = None
    return_logprobs: bool = False
    seed: int | None = None
    max_queue_size: int = 0
    scheduler_type: str = "fifo"
    drop_unsupported_processors: bool = True
    paged: bool | None = None
    page_size: int = 256
    # Transformers' other paged-cache, compile and distributed settings: no effect here
    num_blocks: int | None = None
    max_blocks_per_request: int | None = None
    allow_block_sharing: bool = True
    use_async_batching: bool | None = None
    q_padding_interval_size: int = 0
    kv_padding_interval_size: int = 0
    varlen_compile_config: Any = None
    decode_compile_config: Any = None
    default_compile_level: int = 0
    safety_margin: float | None = None
    auto_switch_to_flash: bool = True
    cpu_offload_space: float = 0.0
    cpu_offload_space_safety_threshold: float = 0.8
    per_request_processors: bool = False
    disable_nccl_graph_mixing: bool = True
    cpu_group_timeout: float | None = 300.0
    block_size: int | None = None
    use_default_compile_configs: bool | None = None
    max_cached_graphs: int | None = None

    def __post_init__(self) -> None:
        """The fields this engine reads, typed: a string, a float or a bool where an int belongs (a
        JSON value, say) was compared or truncated deep in the manager, or taken as true."""
        def fail(name: str, wanted: str):
            raise ValueError(f"continuous_batching_config.{name} must be {wanted}, got {getattr(self, name)!r}")

        def integer(value) -> bool:  # (numpy's integers too; a bool is no count)
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)

        def flag(value) -> bool:  # True / False, numpy's too, or 0 / 1
            return isinstance(value, (bool, np.bool_)) or (integer(value) and value in (0, 1))

        # (max_batch_tokens and prefill_chunk_tokens: checked with their defaults by the manager; the
        # page settings where it pages)
        for name in ("max_requests_per_batch", "max_cache_len"):
            value = getattr(self, name)
            if value is not None and not (integer(value) and value > 0):
                fail(name, "a positive int or None")
            elif value is not None:
                setattr(self, name, int(value))
        if self.max_queue_size is None:
            self.max_queue_size = 0
        if not (integer(self.max_queue_size) and self.max_queue_size >= 0):
            fail("max_queue_size", "a non-negative int (0 or None: no limit)")
        if self.seed is not None and not (integer(self.seed) and -(2**63) <= self.seed < 2**64):
            fail("seed", "an int (torch.manual_seed's range) or None")
        share = self.max_memory_percent
        if share is not None and not (isinstance(share, numbers.Real) and not isinstance(share, bool)
                                      and 0 < share <= 1):
            fail("max_memory_percent", "a fraction in (0, 1] or None")
        for name in ("return_logprobs", "drop_unsupported_processors"):
            if not flag(getattr(self, name)):
                fail(name, "True or False")
            setattr(self, name, bool(getattr(self, name)))
        if self.paged is not None and not flag(self.paged):
            fail("paged", "True, False or None")
        graphs = self.use_cuda_graph
        pair = isinstance(graphs, (tuple, list)) and len(graphs) == 2 and all(isinstance(g, bool) for g in graphs)
        if not (graphs is None or isinstance(graphs, bool) or pair):
            fail("use_cuda_graph", "True, False, None or a (prefill, decode) pair of them")

    @classmethod
    def of(cls, config: Any) -> ContinuousBatchingConfig:
        """This class from None, itself, a dict, or Transformers' ContinuousBatchingConfig."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return dataclasses.replace(config)
        names = {f.name for f in dataclasses.fields(cls)}
        if isinstance(config, dict):
            unknown = sorted(set(config) - names)
            if unknown:
                raise TypeError(f"continuous_batching_config: unknown fields {unknown}")
            return cls(**config)
        if type(config).__name__ == "ContinuousBatchingConfig":  # Transformers' class
            return cls(**{n: getattr(config, n) for n in names if hasattr(config, n)})
        raise TypeError("continuous_batching_config must be a ContinuousBatchingConfig or a dict, "
                        f"got {type(config).__name__}")


@dataclass
class WorkloadHints:
    """What `generate_batch` knows of its requests, to size the batch."""

    max_prompt_length: int = 0
    max_generated_length: int = 0
    num_requests: int = 0


class _Request:
    """A request's state in the manager."""

    __slots__ = ("id", "prompt", "max_new", "eos", "streaming", "stamps", "tokens", "logprobs", "status",
                 "created", "started", "start", "since", "error", "sampling", "seed", "first", "top_n", "tops",
                 "matcher", "sent", "long", "hash_memo")

    def __init__(self, request_id: str, prompt: list[int], max_new: int, eos: frozenset[int], streaming: bool,
                 record_timestamps: bool, sampling: Sampling | None = None, top_n: int = 0, matcher=None) -> None:
        self.id, self.prompt, self.max_new, self.eos = request_id, prompt, max_new, eos
        self.streaming = streaming
        self.sampling = sampling  # its own settings, or None: the manager's generation config
        # the key of its draws (its own seed, else one drawn from torch's generator when it starts),
        # and the decode step of its first draw: its n-th token draws at counter n
        self.seed, self.first = 0, 0
        self.top_n = top_n  # top log-probabilities wanted per token
        self.tops: list[list[tuple[int, float]]] = []
        self.stamps: list[float] | None = [] if record_timestamps else None
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.status = RequestStatus.PENDING
        self.created, self.started = time.perf_counter(), -1.0
        self.start = 0  # its first cache slot, while it runs
        self.since = 0  # the decode step at which the loop took it
        self.error: str | None = None
        self.matcher = matcher  # its place in its grammar (generation/grammar.py), or None
        self.sent = 0  # tokens handed to a handler that takes deltas
        self.long = False  # its keys take LongRoPE's long factors (its prompt, or it crossed the switch)
        self.hash_memo: dict = {}  # its sequence's block hashes, kept between prefix look-ups (prefixes.block_hashes)

    def output(self, since: int = 0) -> GenerationOutput:
        """Its result so far: the tokens (and their log-probabilities, ...) from the `since`-th on."""
        finished = time.perf_counter() if self.status >= RequestStatus.FINISHED else -1
        return GenerationOutput(
            request_id=self.id, prompt_ids=self.prompt, generated_tokens=self.tokens[since:],
            logprobs=self.logprobs[since:], top_logprobs=self.tops[since:], error=self.error, status=self.status,
            created_time=self.created,
            lifespan=(self.started, finished), timestamps=None if self.stamps is None else self.stamps[since:],
        )

    def prefilling(self, now: float) -> None:
        """Its prompt (or, after a preemption, its sequence) is being computed; `started` stays the
        time it first left the queue."""
        self.status = RequestStatus.PREFILLING
        if self.started < 0:
            self.started = now

    def sequence(self) -> list[int]:
        """The tokens its prefill computes: its prompt, and once it gave its pages up while it ran
        (`_preempt`), its tokens so far too."""
        return self.prompt + self.tokens if self.tokens else self.prompt

    def add(self, token: int, logprob) -> bool:
        """Take a generated token (`logprob`: None, its log-probability, or a step's row of it
        and the top log-probabilities, `_top_logprobs`); whether the request is now done."""
        self.tokens.append(token)
        if isinstance(logprob, list):
            if self.top_n:
                k = (len(logprob) - 1) // 2
                self.tops.append([(int(logprob[1 + k + j]), logprob[1 + j]) for j in range(self.top_n)])
            logprob = logprob[0]
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.stamps is not None:
            self.stamps.append(time.perf_counter())
        if token in self.eos or len(self.tokens) >= self.max_new:
            return True
        if self.matcher is None:
            return False
        self.matcher.consume(token)
        if self.matcher.error is not None:
            self.error = f"the output left its grammar at token {token}: {self.matcher.error}"
            return True
        return self.matcher.done  # the grammar can take no further token


class _Batch:
    """The rows of the batch: the cache, the per-row step inputs and the decode steps."""

    def __init__(self, model, rows: int, slots: int, graphs: bool, share: bool = False,
                 prefill_graphs: bool | None = None, longrope: bool = False, pages: Pages | None = None) -> None:
        device, config = model.device, model.config
        self.model, self.R, self.S = model, rows, slots
        # paged: the cache lies slot-major in `pages`, and only the pages of `hold`'s slots have memory
        self.pages, self.slot_bytes, self._held = pages, _slot_bytes(config, model.dtype), set()
        storage = pages.tensor if pages is not None else None
        if SLOT_MAJOR and pages is None:
            layers, (kv_heads, head_dim) = config.num_hidden_layers, _kv_shape(config)
            nbytes = slot_major_bytes(layers, rows, slots, kv_heads, head_dim, model.dtype)
            storage = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self.cache = StaticCache(config, max_cache_len=slots, max_batch_size=rows, device=device, dtype=model.dtype,
                                 storage=storage)
        self.cache.records_inputs = False
        # LongRoPE: each row's factor set (True: long), which its decode steps' rotary tables read
        self.long = torch.zeros(rows, 1, dtype=torch.bool, device=device) if longrope else None
        self.mask = torch.zeros(rows, slots, dtype=torch.long, device=device)
        self.mask[:, 0] = 1  # a free row attends its slot 0 only
        self.slot_ids = torch.arange(slots, device=device)
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.cpos = torch.zeros(1, dtype=torch.long, device=device)
        self.col = 0
        self.counts: TokenCounts | None = None  # rows' token counts, once a request with penalties runs
        self.graphs_on = graphs
        self.views: dict[int, StaticCache] = {}
        self.graphs: dict[int, tuple] = {}
        self.pool = None
        self.prefill_graphs_on = graphs if prefill_graphs is None else prefill_graphs
        self.packed_graphs: GraphedPackedPrefill | None = None
        self.window = getattr(config, "sliding_window", None)
        # the rows whose cached prompts (and finished requests' tokens) new prompts may start from
        self.prefixes = PrefixIndex() if share else None

    def pages_of(self, spans: dict[int, list[tuple[int, int]]]) -> set[int]:
        """The pages that hold slots `spans` (row -> [first, end) slot ranges) of the rows."""
        need: set[int] = set()
        sb, S = self.slot_bytes, self.S
        for row, ranges in spans.items():
            for first, end in ranges:
                first, end = max(first, 0), min(end, S)
                if end > first:
                    need.update(self.pages.covering((row * S + first) * sb, (row * S + end) * sb))
        return need

    def hold(self, spans: dict[int, list[tuple[int, int]]]) -> None:
        """Paged: memory behind exactly the pages of `spans` (row -> slot ranges) from now on.
        Pages no longer held are released once the work launched so far is done; new ones are
        mapped with the GPU idle (mapping is not ordered with a stream's work), so this waits for
        the work in flight when it maps."""
        need = self.pages_of(spans)
        gone, new = self._held - need, need - self._held
        on_gpu = self.model.device.type == "cuda"
        if gone:
            event = None
            if on_gpu:
                event = torch.cuda.Event()
                event.record()
            self.pages.release(sorted(gone), after=event)
        if new:
            if on_gpu:
                torch.cuda.current_stream().synchronize()
            self.pages.back(sorted(new))
        self._held = need

    def bucket(self, rows_in_use: int) -> int:
        return next((b for b in DECODE_BUCKETS if b >= rows_in_use and b <= self.R), self.R)

    def view(self, b: int) -> StaticCache:
        """A StaticCache over the first b rows (the same storage)."""
        if b not in self.views:
            self.views[b] = view = self.cache.rows_slice(slice(0, b))
            view.rope_long_BT = self.long[:b] if self.long is not None else None
        return self.views[b]

    def scrub(self) -> None:
        """Paged: before a forward, pages without memory hold nothing anyone wrote
        (`Pages.scrub`; on the CPU, a read of a slot no request holds shows)."""
        if self.pages is not None:
            self.pages.scrub()

    def _forward(self, b: int) -> torch.Tensor:
        self.scrub()
        cache = self.view(b)
        cache._seen = 0  # the rows' lengths live in `pos` (and LongRoPE's factor sets in `long`)
        out = self.model(self.ids[:b], attention_mask=self.mask[:b], position_ids=self.pos[:b],
                         past_key_values=cache, use_cache=True, cache_position=self.cpos, logits_to_keep=1,
                         return_dict=True)
        return out.logits[:, -1]

    def graph(self, b: int) -> tuple:
        """The captured step of the first b rows (captured at the current column on first use:
        its runs write that column's slots, which the next step writes anyway)."""
        if b not in self.graphs:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            self.cpos.fill_(self.col)
            self.graphs[b] = capture(lambda: self._forward(b), rewind=(self.view(b), 0), pool=self.pool)
        return self.graphs[b]

    def step(self, b: int) -> torch.Tensor:
        """One decode step of the first b rows at column `col`: their next-token logits [b, V]."""
        self.cpos.fill_(self.col)
        if not self.graphs_on:
            logits = self._forward(b)
        else:
            graph, logits = self.graph(b)
            graph.replay()
        self.col += 1
        self.pos[:b] += 1
        return logits

    def prefill(self, prompts: list[list[int]], rows: list[int],
                shared: list[tuple[int, int, int]] | None = None, long: list[bool] | None = None) -> torch.Tensor:
        """The prompts' forward, packed in one row, whose keys land in `rows` at `col - L .. col -
        1`; their rows' masks, positions set. The last prompt tokens' logits. A group that a CUDA
        graph serves is padded to its shape and replayed (`GraphedPackedPrefill`); any other runs
        eagerly with no padding.

        `shared`: per prompt, (row, first slot, p): its first p tokens' keys and values lie in that
        row of the batch's cache (p = 0: none). The forward computes the rest, which attends over
        them where they lie, and copies them into the prompt's row. `long`: per prompt, whether it
        takes LongRoPE's long factors (`forward`)."""
        device, k = self.model.device, len(prompts)
        lengths = [len(p) for p in prompts]
        logits = self.forward(prompts, rows, [self.col - n for n in lengths], shared or [(0, 0, 0)] * k, long=long)
        rows_t, lengths_t = to_device(torch.tensor(rows), device), to_device(torch.tensor(lengths), device)
        self.set_starts(rows_t, self.col - lengths_t)
        self.pos[rows_t, 0] = lengths_t
        return logits

    def forward(self, prompts: list[list[int]], rows: list[int], starts: list[int],
                shared: list[tuple[int, int, int]], long: list[bool] | None = None) -> torch.Tensor:
        """The prompts' packed forward alone, their keys landing in `rows` from slots `starts` on
        (`PackedRows`); masks and positions unchanged. The last prompt tokens' logits. With
        LongRoPE, `long` gives each prompt's factor set (default: the short), and the rows take it."""
        if self.long is not None:
            long = long or [False] * len(prompts)
            self.long[to_device(torch.tensor(rows), self.long.device), 0] = \
                to_device(torch.tensor(long, dtype=torch.bool), self.long.device)
        self.scrub()
        graphs = self._packed_graphs()
        logits = graphs(prompts, rows, starts, shared, long) if graphs is not None else None
        if logits is None:  # unpadded, eagerly
            logits = packed_forward(self.model, self.cache, prompts, rows, starts, shared, self.window,
                                    long if self.long is not None else None)
        self.clear_before(rows, starts)
        return logits

    def mixed(self, prompt: list[int], row: int, start: int, shared: tuple[int, int, int], long: bool,
              b: int) -> torch.Tensor:
        """A prompt chunk's forward, as `forward` runs it, with the decode step of the first b rows
        at column `col` in it (`cuda_graph.mixed_forward`): from a CUDA graph where one serves the
        chunk's shape (`GraphedPackedPrefill.mixed`), else eagerly. The rows' next-token logits
        [b, V]; the column moves on, as after `step`."""
        if self.long is not None:
            self.long[row, 0] = long
        self.cpos.fill_(self.col)
        step = DecodeRows(self.ids, self.pos, self.mask, self.long, self.cpos, b)
        self.scrub()
        graphs = self._packed_graphs()
        logits = graphs.mixed(prompt, row, start, shared, long, step) if graphs is not None else None
        if logits is None:  # unpadded, eagerly
            device, rest = self.model.device, len(prompt) - shared[2]
            ids, positions, _ = packed_inputs([prompt], [shared])
            chunk = PackedRows(self.cache, [row], [start], [rest], [shared], window=self.window)
            logits = mixed_forward(self.model, chunk, to_device(ids, device), to_device(positions, device), step,
                                   self.window, long)
        self.clear_before([row], [start])
        self.col += 1
        self.pos[:b] += 1
        return logits

    def eager_chunk(self, prompt: list[int], shared: tuple[int, int, int], long: bool) -> bool:
        """Whether a chunk's forward runs eagerly (no prefill graph serves its shape)."""
        graphs = self._packed_graphs()
        return graphs is None or graphs.key([len(prompt)], [len(prompt) - shared[2]], [long]) is None

    def _packed_graphs(self) -> GraphedPackedPrefill | None:
        """The prefill's graph runner, where `PREFILL_GRAPHS` says to use one."""
        mode = PREFILL_GRAPHS
        if mode is False or (mode is None and not self.prefill_graphs_on):
            return None
        if self.packed_graphs is None:
            self.packed_graphs = GraphedPackedPrefill(self.model, self.cache, self.window,
                                                      enabled=self.prefill_graphs_on)
        return self.packed_graphs if mode or self.packed_graphs.enabled else None

    def clear_before(self, rows: list[int], starts: list[int]) -> None:
        """Paged on poisoned pages (`HostPages`): zero each row's slots that lie before its first one
        (`starts`) on the page that holds that slot. The row's request masks them, but masked slots
        still enter its attention with weight 0, and 0 x NaN is NaN: a free row's step attends its
        slot 0, where no page may be held (the poison, whose large values make its key and value
        non-finite), and writes them at the column into the row, onto a page that stays held (a
        finished request's tokens kept for prompts to start from, or the page a request now takes).
        On a GPU's mapped pages (`DevicePages`) an unheld slot reads the shared page, which holds
        keys and values some step wrote, finite, so masked slots add 0 and nothing is cleared.
        Called after the forward that copied any prefix the row's prompt starts from."""
        if self.pages is None or not self.pages.poisons:
            return
        sb, S, page = self.slot_bytes, self.S, self.pages.page
        for row, start in zip(rows, starts):
            lo = max((row * S + start) * sb // page * page // sb - row * S, 0)
            if lo < start:
                for t in self.cache._all:
                    t[:, row, :, lo:start].zero_()

    def set_starts(self, rows_R: torch.Tensor, starts_R: torch.Tensor) -> None:
        """The rows' masks: each attends its slots from its first one (`starts_R`) on."""
        self.mask[rows_R] = (self.slot_ids[None] >= starts_R[:, None]).long()

    def release(self, row: int) -> None:
        self.mask[row].zero_()
        self.mask[row, 0] = 1
        self.pos[row] = 0
        if self.long is not None:
            self.long[row] = False

    def shift(self, new_col: int, starts: dict[int, int], lo: int | None = None) -> None:
        """Move the live slots so that the column becomes `new_col`; `starts`: row -> first slot
        of the running rows, whose masks follow. Every row's slots `lo ..` move (default: the
        running rows' first)."""
        d = self.col - new_col
        if d == 0:
            return
        if lo is None:
            lo = min(starts.values(), default=self.col)  # live slots are lo .. col - 1
        width = self.col - lo
        chunks = range(0, width, abs(d))
        if len(chunks) <= SHIFT_CHUNKS:
            # in place, in chunks no wider than the move: moving left, from the left end; right,
            # from the right end, so that no chunk overwrites slots another has still to read
            for off in (chunks if d > 0 else reversed(chunks)):
                n = min(abs(d), width - off)
                src = lo + off
                for t in self.cache._all:
                    t[:, :, :, src - d:src - d + n].copy_(t[:, :, :, src:src + n])
        else:  # a short move of a wide span: through a copy, one layer at a time
            for t in self.cache._all:
                for layer in t:
                    layer[:, :, lo - d:self.col - d].copy_(layer[:, :, lo:self.col].clone())
        self.col = new_col
        if starts:
            self.set_starts(to_device(torch.tensor(list(starts)), self.mask.device),
                            to_device(torch.tensor(list(starts.values())) - d, self.mask.device))


class _Chunked:
    """A request whose prompt is computed in chunks while other rows decode (`_next_chunk`): its
    row, the column at which it joins (its prompt then ending at the slot before), its prefix in
    the cache so far ((row, first slot, tokens), as `PackedRows` takes it), and the tokens each
    chunk still to run computes. `tokens`: what the chunks compute (default: the prompt); with
    `recompute`, a running request's prompt and tokens so far, computed again past LongRoPE's
    switch (`_rejoin`)."""

    __slots__ = ("req", "row", "join", "shared", "sizes", "tokens", "recompute")

    def __init__(self, req: _Request, row: int, join: int, shared: tuple[int, int, int], chunks: int,
                 tokens: list[int] | None = None, recompute: bool = False) -> None:
        self.req, self.row, self.join, self.shared = req, row, join, shared
        self.tokens = req.prompt if tokens is None else tokens
        self.recompute = recompute
        cost = len(self.tokens) - shared[2]
        # even chunks, the shorter first (a chunk of none only where chunks outnumber the tokens)
        self.sizes = [cost // chunks + (i >= chunks - cost % chunks) for i in range(chunks)]


class _Step:
    """A decode step's tokens (and log-probabilities), copied to the host behind an event, with the
    (row, request) pairs it ran."""

    def __init__(self, rows: list, tokens: torch.Tensor, logprobs: torch.Tensor | None) -> None:
        self.rows = rows
        if tokens.device.type == "cuda":
            pinned = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.tokens = pinned.copy_(tokens, non_blocking=True)
            self.logprobs = None if logprobs is None else torch.empty(
                logprobs.shape, dtype=logprobs.dtype, pin_memory=True).copy_(logprobs, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.tokens, self.logprobs, self.event = tokens, logprobs, None

    def read(self) -> tuple[list[int], list[float] | None]:
        if self.event is not None:
            self.event.synchronize()
        return self.tokens.tolist(), None if self.logprobs is None else self.logprobs.tolist()


def _slot_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of a cache slot of one row: a token's keys and values in every layer."""
    G, d = _kv_shape(config)
    return 2 * config.num_hidden_layers * G * d * dtype.itemsize


def _keys_in(nbytes: int, config, dtype: torch.dtype) -> int:
    """Tokens whose keys and values of one layer `nbytes` hold."""
    return nbytes * config.num_hidden_layers // _slot_bytes(config, dtype)


def _find(index: PrefixIndex, req: _Request, users: dict[int, int] | None = None):
    """`index.find` for a waiting request's sequence, its block hashes kept on the request."""
    return index.find(req.sequence(), users, mode=req.long, memo=req.hash_memo)


def _free_memory(device: torch.device) -> int:
    """The GPU's free bytes, with what torch's allocator holds for reuse (a manager destroyed just
    before, a prefill's activations) counted free."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _keys_bound(shared: list[int], rest: list[int], limit: int) -> list[list[int]]:
    """Prompts (their shared and computed token counts) in forwards of at most `limit` keys, in
    order (a prompt alone may pass it)."""
    out: list[list[int]] = [[]]
    keys = 0
    for i, (p, n) in enumerate(zip(shared, rest)):
        if out[-1] and keys + p + n > limit:
            out.append([])
            keys = 0
        out[-1].append(i)
        keys += p + n
    return out


class ContinuousBatchingManager:
    """Runs requests in a continuous batch on a background thread. Made by the model's
    `init_continuous_batching`; `start()`, then `add_request(s)`, `get_result` / iteration, and
    `stop()`.

    A turn of the loop that raises an `Exception` (a forward out of GPU memory, a bug that one odd
    request sets off) fails the requests it held: the running rows, the request whose prompt runs
    in chunks, and those whose prefill it began, each FAILED with an error naming the exception
    ("a step of the batch failed: RuntimeError: ..."). The batch is then built afresh (every row
    free, no step in flight, no shared prefix; its GPU memory given back first), and the loop goes
    on with the requests still waiting and new ones. `recovered_errors` counts the failures it
    survived. It stops for good, as on any other error, at MAX_STEP_FAILURES failed turns in a row
    (each within STEP_FAILURE_WINDOW_S of the one before), on a CUDA error other than running out
    of memory, or where the reset itself fails: `fatal_error` then holds the exception, and every
    request left fails with it."""

    def __init__(self, model, generation_config, continuous_batching_config: ContinuousBatchingConfig,
                 workload_hints: WorkloadHints | None = None) -> None:
        self.model = model.eval()  # as Transformers' manager: inference routing, and the model left in eval mode
        self.generation_config = generation_config
        self.continuous_batching_config = cfg = continuous_batching_config
        self._settings(generation_config)
        rotary = _rotary(model)
        if getattr(rotary, "per_forward", None) is not None:  # one table a forward, picked by its largest position
            raise ValueError(
                f"continuous batching does not run rope_type {rotary.per_forward!r} with a table per forward "
                "(config.rope_parameters): its table would follow the other requests in the step. Use "
                "generate(), which runs it as Transformers does")
        # LongRoPE's original_max_position_embeddings, where it switches factors (None: no switch)
        self.rope_limit = rotary.original_max if rotary is not None and rotary.longrope else None
        hints = workload_hints or WorkloadHints()
        paged = PAGED if cfg.paged is None else cfg.paged
        self.paged: bool | None = None if paged is None else bool(paged)
        self._paged_by_default = paged is None
        self.slots = self._slots(hints)
        self.rows = self._rows(hints)  # (decides `paged` where it was left open)
        self._pages_plan: tuple[int, int, int] | None = None  # paged: (page bytes, pages, capacity), once asked
        self.batch_tokens = DEFAULT_BATCH_TOKENS if cfg.max_batch_tokens is None else cfg.max_batch_tokens
        if not isinstance(self.batch_tokens, int) or isinstance(self.batch_tokens, bool) or self.batch_tokens < 1:
            raise ValueError("continuous_batching_config.max_batch_tokens must be a positive int (None: "
                             f"{DEFAULT_BATCH_TOKENS}), got {cfg.max_batch_tokens!r}")
        chunk = DEFAULT_CHUNK_TOKENS if cfg.prefill_chunk_tokens is None else cfg.prefill_chunk_tokens
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
            raise ValueError("continuous_batching_config.prefill_chunk_tokens must be a non-negative int (0: no "
                             f"chunks), got {cfg.prefill_chunk_tokens!r}")
        self.chunk_tokens = chunk
        self._chunked: _Chunked | None = None  # the request whose prompt is being computed in chunks
        self._recomputing: dict[int, _Request] = {}
        self._ride: tuple | None = None  # a prompt chunk that the next decode step carries (`_next_chunk`)
        if cfg.scheduler_type not in ("fifo",):
            raise ValueError(f"continuous_batching_config.scheduler_type: only 'fifo' is supported, got "
                             f"{cfg.scheduler_type!r}")
        graphs = cfg.use_cuda_graph
        prefill, decode = graphs if isinstance(graphs, (tuple, list)) else (graphs, graphs)  # Transformers' order
        on_gpu = model.device.type == "cuda"
        self.use_graphs = on_gpu and (decode is None or bool(decode))
        self.use_prefill_graphs = on_gpu and (prefill is None or bool(prefill))
        self._batch: _Batch | None = None
        self._lock = threading.Condition()
        self._incoming: deque[_Request] = deque()
        self._cancels: set[str] = set()
        self._known: set[str] = set()  # ids queued or running
        self._results: deque[GenerationOutput] = deque()
        self._handlers: dict[str, tuple] = {}  # request id -> (callback, event loop, deltas)
        self._outbox: list = []  # ((callback, loop), result) not yet handed to their loops
        self._pauses, self._paused = 0, False
        self._counter = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop: int = 0  # 0 run, 1 finish what was added, 2 fail what is left
        self.fatal_error: BaseException | None = None
        self.recovered_errors = 0  # failed steps the loop survived (its requests failed, the batch reset)
        self._owned: dict[int, _Request] = {}  # the loop's requests not finished yet, by id()
        self.warmed_up = False
        self._rows_changed = 0  # counts changes of the running rows, which key _decode_rows' memo
        self._steps = 0  # decode steps the loop has run (a request's draw index counts from its first)
        self._horizon = 0  # paged, pages on demand: running requests hold their slots below this column
        self._rows_of: tuple = (None, [], {})
        self._grammar_rows: tuple = (None, False)
        self._versions: list[int] = []  # the parameters' version counters when prefixes were last used
        # What the loop did: rows decoded each step (the running requests), prompt tokens computed
        # by forward, cache shifts, requests computed again past LongRoPE's switch, wall seconds in
        # decode steps and in prefills (each ends reading tokens: the GPU's work is in), prompt
        # tokens shared, requests whose prompts ran in chunks, recomputes that ran in chunks, and
        # decode steps that rode along with a prompt chunk (`MIX_CHUNKS`; such a forward's time
        # counts as decode time), requests a paged cache's pages held back from a prefill group,
        # and running requests that gave their pages up (`_preempt`).
        self.stats: dict[str, Any] = {"decode_rows": [], "prefill_tokens": [], "shifts": 0, "recomputed": 0,
                                      "decode_s": 0.0, "prefill_s": 0.0, "shared_tokens": 0,
                                      "chunked": 0, "recomputed_in_chunks": 0, "mixed": 0, "waited_for_pages": 0,
                                      "preempted": 0}

    # ---- settings -------------------------------------------------------------------------------
    def _settings(self, gen) -> None:
        from ..generation.utils import sampling_warpers

        cfg = self.continuous_batching_config
        if gen.num_beams not in (None, 1):
            raise ValueError(f"continuous batching decodes by greedy search or sampling, not beam search "
                             f"(num_beams={gen.num_beams})")
        bias = single_token_bias(getattr(gen, "sequence_bias", None))  # None: a longer sequence, dropped
        dropped = [k for k, noop in _DROPPED.items() if getattr(gen, k, noop) not in (noop, None)
                   and not (k == "sequence_bias" and bias is not None)]
        if dropped:
            if not cfg.drop_unsupported_processors:
                raise ValueError(f"continuous batching does not apply these generation settings: {dropped} "
                                 "(drop_unsupported_processors=False)")
            logger.warning("continuous batching does not apply these generation settings, which are dropped: %s",
                           dropped)
        self.do_sample = bool(gen.do_sample)
        self.return_logprobs = cfg.return_logprobs
        self.warpers = sampling_warpers(gen) if self.do_sample else []
        # what a request's own settings start from, and the config's warpers they cannot express
        self.default_sampling = Sampling(
            self.do_sample, float(gen.temperature or 1.0), int(gen.top_k or 0),
            float(1.0 if gen.top_p is None else gen.top_p), float(gen.min_p or 0.0) if self.do_sample else 0.0,
            repetition_penalty=float(1.0 if gen.repetition_penalty is None else gen.repetition_penalty),
            logit_bias=bias or ())
        self._other_warpers = [type(w).__name__ for w in self.warpers if type(w).__name__ not in
                               ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper")]
        self.num_return_sequences = gen.num_return_sequences or 1
        if gen.eos_token_id is None:  # as Transformers: no EOS, with a warning
            logger.warning("continuous batching: the generation config sets no eos_token_id, so requests stop at "
                           "max_new_tokens only")
        self.eos = _id_set(gen.eos_token_id)
        self.pad_id = gen.pad_token_id if gen.pad_token_id is not None else 0
        self.max_new_tokens = gen.max_new_tokens

    def _crosses(self, req: _Request) -> int | None:
        """For a request that runs with LongRoPE's short factors and will pass the switch: the
        decode step that would feed its token at position `rope_limit` (its sequence is then one
        token longer than the limit), which `_recompute` replaces. Else None."""
        if self.rope_limit is None or req.long or len(req.prompt) + req.max_new - 1 <= self.rope_limit:
            return None
        return req.first + self.rope_limit - len(req.prompt)

    def _slots(self, hints: WorkloadHints) -> int:
        cfg = self.continuous_batching_config
        max_pos = getattr(self.model.config, "max_position_embeddings", None) or DEFAULT_SLOTS
        if cfg.max_cache_len is not None:
            if cfg.max_cache_len < 2:
                raise ValueError("continuous_batching_config.max_cache_len must be at least 2, got "
                                 f"{cfg.max_cache_len}")
            return int(cfg.max_cache_len)
        need = hints.max_prompt_length + max(hints.max_generated_length, 1)
        hinted = -(-2 * need // SLOT_ROUND) * SLOT_ROUND
        if hints.max_prompt_length and hints.max_generated_length:
            return hinted
        return max(min(DEFAULT_SLOTS, max_pos), hinted if hints.max_prompt_length else 0)

    def _rows(self, hints: WorkloadHints) -> int:
        cfg = self.continuous_batching_config
        asked = cfg.max_requests_per_batch
        if asked is not None and asked < 1:
            raise ValueError(f"continuous_batching_config.max_requests_per_batch must be positive, got {asked}")
        want = int(asked) if asked is not None else min(MAX_ROWS, hints.num_requests or MAX_ROWS)
        if self.model.device.type != "cuda":
            self.paged = bool(self.paged)
            return want if asked is not None else min(want, DEFAULT_ROWS)
        fits = None if self.paged or (self.paged is False and asked is not None) else self._static_rows()
        if self.paged is None:  # paged where the free memory holds fewer rows of all their slots
            self.paged = fits < want
        if self.paged or asked is not None:
            return want
        if fits < 1:
            row = self.slots * _slot_bytes(self.model.config, self.model.dtype)
            raise RuntimeError(f"continuous batching: one row of {self.slots} cache slots ({row / 2**30:.2f} GiB) is "
                               "more than the free GPU memory holds within max_memory_percent; lower max_cache_len, "
                               "or leave `paged` on")
        return min(want, fits)

    @property
    def row_slots(self) -> int:
        """Slots of a batch row: `slots` (the longest request), times PAGED_ROW_SPAN with pages on demand."""
        span = PAGED_ROW_SPAN if self.paged and PAGES_ON_DEMAND else 1
        if span is None:
            span = 2 if self.model.device.type == "cuda" else 1
        if not isinstance(span, int) or span < 1:
            raise ValueError(f"batching.PAGED_ROW_SPAN must be a positive int or None, got {span!r}")
        return self.slots * span

    def _memory(self) -> int:
        """The GPU memory the batch may take: `max_memory_percent` of the free memory (0.9, or 0.8
        with sampling), less what a layer whose experts are held in host memory copies over
        (`ops.host.host_copy_bytes`)."""
        share = self.continuous_batching_config.max_memory_percent or (0.8 if self.do_sample else 0.9)
        gc.collect()  # an earlier manager's cache and graphs, left in a reference cycle, are free memory
        return int(max(0, _free_memory(self.model.device) - host_copy_bytes(self.model)) * share)

    def _logits_bytes(self) -> int:
        """A row's share of a step's float32 logits and their softmax."""
        return 3 * 4 * self.model.config.vocab_size

    def _static_rows(self) -> int:
        """Rows of `slots` slots each that the free GPU memory holds (within `max_memory_percent`)."""
        return self._memory() // (self.slots * _slot_bytes(self.model.config, self.model.dtype) + self._logits_bytes())

    def _plan_pages(self) -> tuple[int, int, int]:
        """A paged cache's page size (bytes), its pages, and how many of them may have memory at
        once (worked out on first use: the GPU's mapping unit and free memory)."""
        if self._pages_plan is not None:
            return self._pages_plan
        cfg, model = self.continuous_batching_config, self.model
        slots = PAGE_SLOTS or cfg.page_size
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ValueError(f"continuous_batching_config.page_size must be a positive int, got {slots!r}")
        sb = _slot_bytes(model.config, model.dtype)
        page = slots * sb
        if model.device.type == "cuda":
            unit = granularity(model.device)
            page = -(-page // unit) * unit
        count = -(-self.rows * self.row_slots * sb // page)
        if cfg.num_blocks is not None:
            if not isinstance(cfg.num_blocks, int) or isinstance(cfg.num_blocks, bool) or cfg.num_blocks < 1:
                raise ValueError("continuous_batching_config.num_blocks must be a positive int, got "
                                 f"{cfg.num_blocks!r}")
            capacity = cfg.num_blocks
        elif model.device.type == "cuda":
            capacity = (self._memory() - self.rows * self._logits_bytes()) // page
        else:
            capacity = count
        self._pages_plan = (page, count, min(capacity, count))
        need = self._request_pages(self.slots)
        if need > self._pages_plan[2]:
            self._pages_plan = None
            raise RuntimeError(f"continuous batching: a request of {self.slots} slots (max_cache_len) needs {need} "
                               f"pages of {page / 2**20:.1f} MiB, and the paged cache may hold {min(capacity, count)}; "
                               "lower max_cache_len or raise num_blocks / max_memory_percent")
        return self._pages_plan

    def _request_pages(self, slots: int) -> int:
        """The most pages that `slots` slots in a row lie on, wherever they start (their first and
        last pages partly used)."""
        page, count, _ = self._plan_pages()
        sb = _slot_bytes(self.model.config, self.model.dtype)
        if page % sb == 0:  # k whole slots a page: n slots from any slot lie on (n + k - 2) // k + 1
            k = page // sb
            return min((slots + k - 2) // k + 1, count)
        return min(-(-slots * sb // page) + 1, count)

    # ---- control ----------------------------------------------------------------------------------
    def warmup(self) -> None:
        """Allocate the batch and, on a GPU, capture its decode graphs for every bucket (`start`
        does it first if it was not done: a capture inside the running loop would fail on CUDA
        work that another thread launches meanwhile)."""
        with torch.no_grad(), on_device(self.model.device):
            batch = self._ensure_batch()
            if batch.graphs_on:
                with own_forward(self.model):
                    for b in sorted({batch.bucket(n) for n in DECODE_BUCKETS}):
                        batch.graph(b)
        self.warmed_up = True

    def warm_prefill_graphs(self) -> list[int]:
        """On a GPU with prefill graphs on, capture the prefill of one prompt of each
        `PREFILL_BUCKETS` length shorter than a row (the shape of every lone prompt of up to that
        length), so that a server's first requests replay them instead of capturing them. Call it
        before the loop starts (`start`). Returns the lengths captured."""
        with torch.no_grad(), own_forward(self.model), on_device(self.model.device):
            graphs = self._ensure_batch()._packed_graphs()
            if graphs is None or not graphs.enabled:
                return []
            lengths = [n for n in PREFILL_BUCKETS if n < self.slots and graphs.key([n], [n]) is not None]
            for n in lengths:  # into free row 0's first slots, which a request's prefill writes anew
                for _ in range(PREFILL_CAPTURE_AFTER):
                    graphs([[1] * n], [0], [0], [(0, 0, 0)])
        return lengths

    def _ensure_batch(self) -> _Batch:
        if self._batch is None:
            share = self.continuous_batching_config.allow_block_sharing
            pages = None
            if self.paged:
                device = self.model.device
                page, count, capacity = self._plan_pages()
                try:
                    pages = (DevicePages(count, capacity, device, page) if device.type == "cuda" else
                             HostPages(count, page, capacity, device=device))
                except RuntimeError as e:  # a driver without virtual memory management, say
                    if not self._paged_by_default:
                        raise
                    logger.warning("continuous batching: no paged cache (%s); rows of whole slots instead", e)
                    self.paged, self.rows = False, max(1, min(self.rows, self._static_rows()))
            self._batch = _Batch(self.model, self.rows, self.row_slots, self.use_graphs, share=bool(share),
                                 prefill_graphs=self.use_prefill_graphs, longrope=self.rope_limit is not None,
                                 pages=pages)
        return self._batch

    def is_running(self) -> bool:
        """Whether the background thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the background thread."""
        if self.is_running():
            logger.warning("the continuous batching manager is already running")
            return
        self._stop = 0
        self.fatal_error = None
        if self.use_graphs and not self.warmed_up:
            self.warmup()
        if self.continuous_batching_config.seed is not None:
            torch.manual_seed(self.continuous_batching_config.seed)
        self._thread = threading.Thread(target=self._loop, name="moetorch-continuous-batching", daemon=True)
        self._thread.start()

    def stop(self, block: bool = True, timeout: float | None = None, keep_for_next_session: bool = False,
             hard_stop: bool = False) -> None:
        """Stop the thread once the requests already added are done (`hard_stop`: at once, the
        unfinished ones failed). `keep_for_next_session`: the model keeps this manager (its cache
        and graphs) for its next `init_continuous_batching`."""
        if self._thread is None:
            logger.warning("the continuous batching manager was not started")
            return
        with self._lock:
            if self._pauses:
                raise RuntimeError("stop(): a pause() is held; the paused loop cannot finish its requests. Leave the "
                                   "pause first")
            self._stop = max(self._stop, 2 if hard_stop else 1)
            self._lock.notify_all()
        if block:
            self.join(timeout)
        if keep_for_next_session:
            self.model._cached_continuous_batching_manager = self
        else:
            self._batch, self.warmed_up = None, False

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end (at most `timeout` seconds)."""
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("the continuous batching thread did not stop within %s s", timeout)
        else:
            self._thread = None
            self._stop = 0  # stopped: requests added now wait for the next start

    def destroy(self) -> None:
        """Stop and let the cache and graphs go."""
        if self.is_running():
            self.stop(block=True)
        self._drop_batch()
        self.warmed_up = False

    def _drop_batch(self) -> None:
        """Let the batch go: its graphs, and the memory its paged cache maps."""
        old, self._batch = self._batch, None
        if old is not None:
            old.graphs.clear()
            if old.pages is not None:
                old.pages.close()

    # ---- requests ---------------------------------------------------------------------------------
    def add_request(self, input_ids, request_id: str | None = None, max_new_tokens: int | None = None,
                    streaming: bool = False, record_timestamps: bool = False,
                    eos_token_id: int | list[int] | None = None, **logit_processor_kwargs: Any) -> str:
        """Queue a prompt (a list of token ids). Returns its request id (`req_<n>` unless given).
        With `num_return_sequences = n` in the generation config, n - 1 more requests sample from
        the same prompt, with ids `<id>__child#<i>`. `streaming`: a result after every token."""
        return self._queue(*self._requests(input_ids, request_id, max_new_tokens, streaming, record_timestamps,
                                           eos_token_id, logit_processor_kwargs))

    def _requests(self, input_ids, request_id, max_new_tokens, streaming, record_timestamps, eos_token_id,
                  logit_processor_kwargs) -> tuple[str, list[_Request]]:
        """A checked request and its children, not queued: (request id, requests)."""
        top_n = top_logprobs_of(logit_processor_kwargs.pop("top_logprobs", 0), request_id)
        grammar = grammar_of(logit_processor_kwargs.pop("grammar", None), self.model.config.vocab_size, request_id)
        if top_n and not self.return_logprobs:
            raise ValueError(f"add_request({request_id!r}): top_logprobs needs the manager's "
                             "continuous_batching_config.return_logprobs=True")
        sampling = None
        if logit_processor_kwargs:
            sampling = Sampling.of(logit_processor_kwargs, self.default_sampling, request_id,
                                   self.model.config.vocab_size)
            if sampling == self.default_sampling:
                sampling = None  # the config's own: the batch's plain path
            elif self._other_warpers:  # (greedy too: a step with such a row draws every row by row settings)
                raise ValueError(f"add_request: per-request settings combine with the generation config's temperature, "
                                 f"top_k and top_p, but it also sets {self._other_warpers}")
        prompt = _prompt_list(input_ids, self.model.config.vocab_size, request_id)
        if request_id is None:
            request_id = f"req_{next(self._counter)}"
        elif not isinstance(request_id, str) or not request_id:
            raise ValueError(f"add_request: request_id must be a non-empty string, got {request_id!r}")
        max_new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        eos = self.eos if eos_token_id is None else _request_eos(eos_token_id, request_id)
        for name, flag in (("streaming", streaming), ("record_timestamps", record_timestamps)):
            if not isinstance(flag, bool):
                raise TypeError(f"add_request({request_id!r}): {name} must be True or False, got {flag!r}")
        if max_new is None:
            max_new = self.slots - len(prompt) + 1  # until EOS or the row is full
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
            raise ValueError(f"add_request({request_id!r}): max_new_tokens must be a positive int, got {max_new!r}")
        if self.paged:
            self._plan_pages()  # (a request of a whole row's slots must fit in its pages)
        if len(prompt) + max_new - 1 > self.slots:
            raise ValueError(
                f"add_request({request_id!r}): the prompt's {len(prompt)} tokens + max_new_tokens={max_new} exceed "
                f"a row of the batch's cache ({self.slots} slots): raise continuous_batching_config.max_cache_len")
        ids = [f"{request_id}__child#{i}" for i in range(self.num_return_sequences - 1)] + [request_id]
        # a seed keys the request's draws; children draw from seed + 1, ...
        own = [sampling if sampling is None or sampling.seed is None or i == len(ids) - 1 else
               dataclasses.replace(sampling, seed=(sampling.seed + i + 1) % 2**63) for i in range(len(ids))]
        reqs = [_Request(i, prompt, max_new, eos, streaming, record_timestamps, sp, top_n,
                         None if grammar is None else grammar.matcher()) for i, sp in zip(ids, own)]
        for req in reqs:  # a prompt past LongRoPE's switch takes the long factors from its prefill on
            req.long = self.rope_limit is not None and len(prompt) > self.rope_limit
        return request_id, reqs

    def _queue(self, request_id: str, requests: list[_Request]) -> str:
        """Queue a request and its children, waiting up to QUEUE_WAIT_S for room."""
        ids = [r.id for r in requests]
        deadline = time.monotonic() + QUEUE_WAIT_S
        with self._lock:
            taken = [i for i in ids if i in self._known]
            if taken:
                raise ValueError(f"add_request: request id {taken[0]!r} is already queued or running")
            if self._stop:
                raise RuntimeError("add_request: the manager is stopping and takes no new requests (add them "
                                   "once stop() has returned, for the next start())")
            cap = self.continuous_batching_config.max_queue_size
            while cap and len(self._incoming) + len(requests) > cap:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"add_request({request_id!r}): the queue stayed full ({cap} requests) for "
                                       f"{QUEUE_WAIT_S:g} s")
                self._lock.wait(left)
            self._incoming.extend(requests)
            self._known.update(ids)
            self._lock.notify_all()
        return request_id

    def add_requests(self, inputs: list, max_new_tokens: int | None = None, streaming: bool = False,
                     record_timestamps: bool = False, **logit_processor_kwargs: Any) -> list[str]:
        """Queue several prompts; their request ids, in order."""
        return [self.add_request(p, max_new_tokens=max_new_tokens, streaming=streaming,
                                 record_timestamps=record_timestamps, **logit_processor_kwargs) for p in inputs]

    def cancel_request(self, request_id: str) -> None:
        """Stop a queued or running request; its result comes back FAILED, error "cancelled"."""
        with self._lock:
            if request_id in self._known:
                self._cancels.add(request_id)
                self._lock.notify_all()

    def get_result(self, request_id: str | None = None, timeout: float | None = None) -> GenerationOutput | None:
        """The next result (of `request_id` when given), waiting up to `timeout` seconds (None:
        until one comes or the thread ends); None if none came."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                for i, out in enumerate(self._results):
                    if request_id is None or out.request_id == request_id:
                        del self._results[i]
                        return out
                if not self.is_running():
                    return None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._lock.wait(left if left is not None else 0.1)

    def __iter__(self) -> Generator[GenerationOutput]:
        """Results as they come, until the thread ends."""
        return self._results_of(None)

    def request_id_iter(self, request_id: str) -> Generator[GenerationOutput]:
        """A request's results (each token's when streaming) until its last."""
        return self._results_of(request_id)

    def _results_of(self, request_id: str | None) -> Generator[GenerationOutput]:
        # results (of `request_id`: until its last) while the thread runs
        while True:
            out = self.get_result(request_id, timeout=0.1)
            if out is not None:
                yield out
                if request_id is not None and out.is_finished():
                    return
            elif not self.is_running():
                return

    def register_result_handler(self, request_id: str, callback, loop=None, deltas: bool = False) -> None:
        """Deliver `request_id`'s results (each token's when streaming, else its last) to
        `callback(output)` on the calling asyncio event loop (`call_soon_threadsafe`), instead of
        `get_result`; the handler goes once the request finishes. Call it from a coroutine, or pass
        `loop` (moetorch: any object with `call_soon_threadsafe(fn, items)`, which must call
        `fn(items)`; a step's results for that loop come in one call). (moetorch) `deltas=True`:
        each result holds only the tokens (log-probabilities, ...) since the one before, so that a
        streamed result costs the same at any length (a full one copies every token so far)."""
        import asyncio

        loop = loop or asyncio.get_running_loop()
        with self._lock:
            self._handlers[request_id] = (callback, loop, deltas)

    def unregister_result_handler(self, request_id: str) -> None:
        """Drop `request_id`'s result handler (its results go to `get_result` again)."""
        with self._lock:
            self._handlers.pop(request_id, None)

    @contextlib.contextmanager
    def pause(self):
        """Inside, the loop waits between steps (its running and queued requests kept), so that the
        caller may use the model, e.g. to update its weights in place; it resumes on exit. Several
        threads may hold a pause at once."""
        if not self.is_running():
            raise RuntimeError("pause(): the manager's loop is not running")
        with self._lock:
            self._pauses += 1
            self._lock.notify_all()
            while not self._paused and self.is_running():
                self._lock.wait(0.1)
        try:
            yield
        finally:
            with self._lock:
                self._pauses -= 1
                self._lock.notify_all()

    # ---- the loop -----------------------------------------------------------------------------------
    def _deliver(self, req: _Request) -> None:
        with self._lock:
            handler = self._handlers.get(req.id)
        if handler is not None and handler[2]:  # the tokens since the last result
            out = req.output(req.sent)
            req.sent = len(req.tokens)
        else:
            out = req.output()
        with self._lock:
            if handler is None:
                self._results.append(out)
            if req.status >= RequestStatus.FINISHED:
                self._known.discard(req.id)
                self._cancels.discard(req.id)
                self._handlers.pop(req.id, None)
            self._lock.notify_all()
        if handler is not None:
            self._outbox.append((handler[:2], out))  # handed over once per turn of the loop (_post)

    def _post(self) -> None:
        """Hand the results gathered for result handlers to their event loops: one call a loop, so
        that a step's results for many requests wake an event loop once."""
        if not self._outbox:
            return
        by_loop: dict = {}
        for (callback, loop), out in self._outbox:
            by_loop.setdefault(loop, []).append((callback, out))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_call_each, items)
            except RuntimeError:  # the loop was closed: nobody is waiting there
                logger.warning("continuous batching: a result handler's event loop is closed; %d results dropped",
                               len(items))

    def _hold_while_paused(self, running: dict, batch: _Batch) -> None:
        """Wait (after the steps in flight) while a pause is held."""
        with self._lock:
            if not self._pauses:
                return
        self._drain(running, batch)
        self._post()
        if batch.model.device.type == "cuda":
            torch.cuda.synchronize(batch.model.device)
        with self._lock:
            self._paused = True
            self._lock.notify_all()
            while self._pauses and self._stop != 2:
                self._lock.wait(0.1)
            self._paused = False
        if batch.prefixes is not None:  # the weights may have changed (what pauses are for)
            batch.prefixes.clear()

    def _finish(self, req: _Request, error: str | None = None) -> None:
        self._owned.pop(id(req), None)
        req.status = RequestStatus.FAILED if error is not None else RequestStatus.FINISHED
        req.error = error
        if req.started < 0:
            req.started = time.perf_counter()
        self._deliver(req)

    def _loop(self) -> None:
        waiting: deque[_Request] = deque()
        running: dict[int, _Request] = {}
        self._owned = {}  # id(request) -> request: every request the loop took and has not finished
        self._pending: deque[_Step] = deque()
        self._ride: tuple | None = None
        self._recomputing = {}  # row -> request computed again past LongRoPE's switch, now
        # (step, order, row, request): requests that pass LongRoPE's switch at that decode step
        self._crossings: list[tuple[int, int, int, _Request]] = []
        self._order = itertools.count()
        self._steps = 0
        self._horizon = 0
        self._rows_changed += 1
        failures = 0  # turns that failed since the last one that did its work
        last_failure = -float("inf")  # when the last of them failed (time.monotonic)
        logged: BaseException | None = None  # (a failure whose traceback is in the log already)
        try:
            with torch.no_grad(), own_forward(self.model), on_device(self.model.device):
                batch = self._ensure_batch()
                if batch.prefixes is not None:  # each run starts afresh: the weights may have changed since
                    batch.prefixes.clear()
                while True:
                    failed = None
                    try:
                        self._post()
                        with self._lock:
                            for req in self._incoming:
                                req.since = self._steps
                                self._owned[id(req)] = req
                            waiting.extend(self._incoming)
                            self._incoming.clear()
                            self._lock.notify_all()  # room in the queue
                            cancels, stop = set(self._cancels), self._stop
                        if cancels:
                            self._cancel(cancels, waiting, running, batch)
                        self._hold_while_paused(running, batch)
                        if stop == 2:
                            break
                        if not waiting and not running and self._chunked is None:
                            self._drain(running, batch)
                            if stop:
                                break
                            with self._lock:
                                if not self._incoming and not self._stop and not self._cancels:
                                    self._lock.wait(0.1)
                            continue
                        self._admit(waiting, running, batch)
                        if running:
                            self._decode(running, batch, waiting)
                        else:
                            self._drain(running, batch)
                        failures = 0
                    except Exception as e:  # noqa: BLE001 -- the step's requests fail; the loop goes on if it can
                        now = time.monotonic()
                        failures = 1 if now - last_failure > STEP_FAILURE_WINDOW_S else failures + 1
                        last_failure = now
                        fatal = self._fatal_step_error(e, failures)
                        logger.exception("continuous batching: a step failed (%s: %s); %s", type(e).__name__, e,
                                         f"the loop stops ({fatal})" if fatal else
                                         "its requests fail, the batch is reset and the loop goes on")
                        if fatal:
                            logged = e
                            raise
                        failed = f"a step of the batch failed: {type(e).__name__}: {e}"
                        self._fail_step(failed, waiting, running)
                        # (leaving the handler drops the exception: its traceback's frames hold the
                        # step's tensors, whose memory the reset gives back)
                    if failed is not None:
                        batch = None
                        batch = self._reset_batch(failed)
                        self.recovered_errors += 1
        except BaseException as e:  # noqa: BLE001 -- every request gets the error, then the caller
            self.fatal_error = e
            if e is logged:
                logger.error("continuous batching stopped on an error: %r", e)
            else:
                logger.error("continuous batching stopped on an error: %r", e, exc_info=e)
        finally:
            reason = (f"the manager failed: {self.fatal_error!r}" if self.fatal_error is not None
                      else "the manager was stopped (hard_stop) before the request finished")
            with self._lock:
                waiting.extend(self._incoming)
                self._incoming.clear()
            chunked = [self._chunked.req] if self._chunked is not None else []
            self._chunked = None
            seen: set[int] = set()
            # the running, the one in chunks, the waiting, and any the loop held elsewhere when it failed
            for req in [*running.values(), *chunked, *waiting, *self._owned.values()]:
                if id(req) not in seen and req.status < RequestStatus.FINISHED:
                    seen.add(id(req))
                    self._finish(req, reason)
            self._owned = {}
            self._post()

    def _fatal_step_error(self, error: Exception, failures: int) -> str | None:
        """Why a failed step stops the loop for good (None: the loop resets the batch and goes on):
        a CUDA error other than running out of memory (it leaves the CUDA context unusable), or
        the MAX_STEP_FAILURES-th failed turn in a row."""
        if not isinstance(error, torch.OutOfMemoryError) and isinstance(error, (RuntimeError, _ACCELERATOR_ERROR)):
            text = str(error)
            if any(s in text for s in _STICKY_ERRORS) and "out of memory" not in text:
                return "a CUDA error that leaves the device unusable"
        if failures >= MAX_STEP_FAILURES:
            return f"{failures} steps failed in a row"
        return None

    def _fail_step(self, error: str, waiting: deque, running: dict) -> None:
        """A step raised: every request that it held fails with `error`. Those are the running
        rows, the request in chunks, the requests computed again past LongRoPE's switch, and those
        that left the queue or began their prefill in this turn (wherever the error caught them);
        the requests still waiting untouched stay queued."""
        untouched = [req for req in waiting if req.status == RequestStatus.PENDING]
        keep = {id(req) for req in untouched}
        victims = [*running.values(), *([self._chunked.req] if self._chunked is not None else []),
                   *self._recomputing.values(), *self._owned.values()]
        running.clear()
        self._chunked = None
        self._recomputing = {}
        waiting.clear()
        waiting.extend(untouched)
        seen: set[int] = set()
        for req in victims:
            if id(req) not in keep and id(req) not in seen and req.status < RequestStatus.FINISHED:
                seen.add(id(req))
                self._finish(req, error)

    def _reset_batch(self, error: str) -> _Batch:
        """After a failed step (`_fail_step`): a batch built afresh, every row free, and nothing
        left of the old one's steps in flight, chunk to ride, LongRoPE crossings, horizon or shared
        prefixes; on a GPU its memory (an out-of-memory forward's too) goes back to the device
        before the new one is made. A reset that fails stops the loop."""
        try:
            self._pending.clear()
            self._ride = None
            self._recomputing = {}
            self._crossings = []
            self._horizon = 0
            self._rows_changed += 1
            self._rows_of = (None, [], {})
            self._grammar_rows = (None, False)
            self._versions = []
            on_gpu = self.model.device.type == "cuda"
            if on_gpu:
                torch.cuda.synchronize(self.model.device)  # (the old batch's work done before its memory goes)
            self._drop_batch()
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
            batch = self._ensure_batch()
            if batch.graphs_on and self.warmed_up:  # the decode graphs captured again, as `warmup` did
                for b in sorted({batch.bucket(n) for n in DECODE_BUCKETS}):
                    batch.graph(b)
            return batch
        except Exception as e:
            raise RuntimeError(f"continuous batching could not reset its batch after {error}: "
                               f"{type(e).__name__}: {e}") from e

    def _cancel(self, ids: set[str], waiting: deque, running: dict, batch: _Batch) -> None:
        if self._chunked is not None and self._chunked.req.id in ids:
            ch, self._chunked = self._chunked, None
            batch.release(ch.row)
            self._finish(ch.req, "cancelled")
        for req in [r for r in waiting if r.id in ids]:
            waiting.remove(req)
            self._finish(req, "cancelled")
        for row in [row for row, r in running.items() if r.id in ids]:
            self._end(row, running, batch, "cancelled")

    def _admit(self, waiting: deque, running: dict, batch: _Batch) -> None:
        """Prefill the waiting requests that fit, in order, in groups of at most `batch_tokens`
        computed prompt tokens; while requests decode, one forward of at most `chunk_tokens` a
        turn, a longer prompt alone and in chunks (`_next_chunk`)."""
        if self._chunked is not None:
            self._next_chunk(running, batch)
            return
        # requests decoding when the turn began: a prefill holds them up
        chunk = self._chunk(running)
        while waiting:
            free = [r for r in range(batch.R) if r not in running]
            if running and len(free) < max(1, batch.R // ADMIT_SHARE) and \
                    self._steps - waiting[0].since < ADMIT_AFTER_STEPS:
                return  # a prefill stalls every running row: wait for more rows, a few steps at most
            budget = chunk or self.batch_tokens
            group: list[_Request] = []
            col, work, ahead = batch.col, 0, 0
            for req in waiting:
                if len(group) == len(free):
                    break
                # the tokens its prefill computes: those past a prefix that a row holds
                seq = req.sequence()
                found = _find(batch.prefixes, req) if batch.prefixes is not None else None
                cost = len(seq) - (found[1] if found is not None else 0)
                if group and work + cost > budget:
                    break
                # a prompt longer than a chunk, alone: its chunks run a column apart, and it joins
                # at the column of its last
                ahead = -(-cost // chunk) - 1 if chunk else 0
                c = self._column(batch, running, [*group, req], ahead)
                if c is None:
                    break
                group.append(req)
                col, work = c, work + cost
                if ahead:
                    break
            if batch.pages is not None:
                group, col = self._fit_pages(batch, running, group, col, ahead)
            if not group:
                return
            if col != batch.col:
                self.stats["shifts"] += bool(running)
                self._shift(batch, col, running)
            rows, found, phases = self._place(group, free, running, batch)
            shared = [(f[0].row, f[0].start, f[1]) if f is not None else (0, 0, 0) for f in found]
            if ahead:
                req = waiting.popleft()
                req.prefilling(time.perf_counter())
                self._chunked = _Chunked(req, rows[0], batch.col + ahead, shared[0], ahead + 1, tokens=req.sequence())
                self.stats["chunked"] += 1
                self._hold(batch, running)
                self._next_chunk(running, batch)
                return
            self._prefill_group(group, rows, shared, phases, running, batch, waiting)
            if chunk:
                return  # one forward a turn while requests decode

    def _fit_pages(self, batch: _Batch, running: dict, group: list[_Request], col: int,
                   ahead: int) -> tuple[list[_Request], int]:
        """Paged: the first requests of `group` that the cache's pages hold, and their column.
        Finished rows that prompts may start from give their pages up first, the oldest first,
        those that the group's prompts start from last."""
        index = batch.prefixes
        # the rows the group's prompts start from, and the prompts that found none (None: look the
        # whole group up). Dropping a row no prompt starts from changes no look-up but those that
        # found none (a hash collision at the deepest shared block hides shallower sources until
        # the colliding row goes): only those are looked up again.
        used, unmatched = set(), None
        while group and not self._room(batch, running, group, col, ahead):
            finished = index.finished_rows() if index is not None else {}
            if finished:
                if unmatched is None:
                    used, unmatched = set(), group
                found = [(r, _find(index, r)) for r in unmatched]
                used.update(f[0].row for _, f in found if f is not None)
                unmatched = [r for r, f in found if f is None]
            spare = [row for row in finished if row not in used]
            if spare or (finished and len(group) == 1):
                gone = min(spare or finished, key=index.age)
                index.drop(gone)
                if gone in used:
                    unmatched = None
                continue
            group, unmatched = group[:-1], None
            self.stats["waited_for_pages"] += 1
            col = self._column(batch, running, group) if group else batch.col
        return group, col

    def _chunk(self, running: dict) -> int:
        """The most tokens of a prefill forward in chunks while `running` requests decode (0: none
        decode, or chunks are off, so a prompt runs whole)."""
        return min(self.batch_tokens, self.chunk_tokens) if running and self.chunk_tokens else 0

    def _next_chunk(self, running: dict, batch: _Batch) -> None:
        """Compute the next chunk of the prompt in `_chunked`; with its last, the request joins
        the running ones. Chunk j runs at column `join - (chunks - 1 - j)`, so that a decode step
        of the running rows lies between two chunks. Such a step writes a throwaway key into the
        request's row at its column, a slot that a later chunk (which computes at least one token
        a column) writes over."""
        ch = self._chunked
        due = ch.join - (len(ch.sizes) - 1)
        if batch.col != due:
            if running or batch.col > due:
                raise RuntimeError(f"continuous batching: request {ch.req.id}'s next prompt chunk is due at column "
                                   f"{due}, but the batch is at column {batch.col}")
            batch.col = due  # no request decoded since the chunk before: the column moves on alone
        if len(ch.sizes) == 1:  # the last: the request joins as a group of one
            if ch.recompute:
                self._rejoin(ch, running, batch)
                return
            # the prefill counts the tokens in its row as shared: the chunks computed or counted them
            self.stats["shared_tokens"] -= ch.shared[2]
            self._prefill_group([ch.req], [ch.row], [ch.shared], [[0]], running, batch)
            self._chunked = None
            return
        n = ch.sizes.pop(0)
        if not n:
            return
        t0 = time.perf_counter()
        prompt, first = ch.tokens, ch.join - len(ch.tokens)
        done = ch.shared[2]
        if ch.shared[0] != ch.row or ch.shared[1] != first:
            self.stats["shared_tokens"] += done  # a prefix that another row (or another place) held
        chunk = (prompt[:done + n], ch.row, first, ch.shared, ch.req.long)
        if running and MIX_CHUNKS and (MIX_CHUNKS != "eager" or batch.eager_chunk(chunk[0], ch.shared, ch.req.long)):
            self._ride = chunk  # the turn's decode step runs it (`_decode`)
        else:
            batch.forward([chunk[0]], [ch.row], [first], [ch.shared], long=[ch.req.long])
        ch.shared = (ch.row, first, done + n)  # from now on its row holds its first tokens
        self.stats["prefill_tokens"].append(n)
        self.stats["prefill_s"] += time.perf_counter() - t0

    def _prefill_group(self, group: list[_Request], rows: list[int], shared: list[tuple[int, int, int]],
                       phases: list[list[int]], running: dict, batch: _Batch, waiting: deque | None = None) -> None:
        """Prefill `group` into `rows` (its prompts joining at the batch's column), in `phases`
        (`_place`); `shared`: each prompt's prefix in the cache, (row, first slot, tokens), for the
        first phase. Its requests then run (and leave `waiting`, where given)."""
        now = t0 = time.perf_counter()
        self._track_counts(batch, group, rows)
        seqs = [req.sequence() for req in group]
        for req, seq in zip(group, seqs):
            req.prefilling(now)
            req.start = batch.col - len(seq)
            # its n-th token draws at counter n: a request that gave its pages up while it ran
            # (`_preempt`) goes on from its token count, under the key it had
            req.first = self._steps - len(req.tokens)
            if not req.tokens:
                own = req.sampling.seed if req.sampling is not None else None
                req.seed = own if own is not None else int(torch.randint(0, 2**62, ()))
        if batch.pages is not None:  # the group's slots, and the prefixes it copies, before it writes
            extra = collections.defaultdict(list)
            cap = self._cap(batch)
            for req, row, (src, first, n) in zip(group, rows, shared):
                extra[row].append(_request_span(req, cap))
                if n:
                    extra[src].append((first, first + n))
            self._hold(batch, running, extra)
        tokens = torch.empty(len(group), dtype=torch.long, device=batch.ids.device)
        logprobs: list | None = [] if self.return_logprobs else None  # (part, its log-probabilities)
        for n, phase in enumerate(phases):
            if n:  # requests that start from a request of the phase before
                for i in phase:
                    f = _find(batch.prefixes, group[i])
                    shared[i] = (f[0].row, f[0].start, f[1]) if f is not None else (0, 0, 0)
            rest = [len(seqs[i]) - shared[i][2] for i in phase]
            # a forward's attention holds each layer's keys of its prompts, shared prefixes
            # included: as many as a forward computes, or a share of the free memory
            limit = max(self.batch_tokens, self._keys_room())
            todo = deque([phase[j] for j in part] for part in
                         _keys_bound([shared[i][2] for i in phase], rest, limit))
            while todo:
                part = todo.popleft()
                try:
                    logits = batch.prefill([seqs[i] for i in part], [rows[i] for i in part],
                                           [shared[i] for i in part], long=[group[i].long for i in part])
                except torch.OutOfMemoryError:
                    # a forward too wide for the free memory: retried in halves. The rows it
                    # wrote in part are the part's own; a prompt whose prefix lay in its own row
                    # (which the forward may have overwritten) is computed whole.
                    if len(part) == 1:
                        raise
                    for i in part:
                        if shared[i][2] and shared[i][0] == rows[i]:
                            shared[i] = (0, 0, 0)
                    logger.warning("continuous batching: a prefill of %d prompts ran out of memory; retried in "
                                   "halves", len(part))
                    todo.extendleft([part[len(part) // 2:], part[:len(part) // 2]])
                    continue
                computed = [len(seqs[i]) - shared[i][2] for i in part]
                self.stats["prefill_tokens"].append(sum(computed))
                self.stats["shared_tokens"] += sum(shared[i][2] for i in part)
                t, lp = self._choose(logits, [group[i] for i in part], [rows[i] for i in part])
                index = to_device(torch.tensor(part), tokens.device)
                tokens[index] = t
                if logprobs is not None:
                    logprobs.append((part, lp))
            if batch.prefixes is not None:
                for i in phase:
                    batch.prefixes.running(rows[i], group[i])
        batch.ids[to_device(torch.tensor(rows), tokens.device), 0] = tokens
        for req in group:  # left waiting until here, so that an error above fails them too
            if waiting is not None:
                waiting.popleft()
            req.status = RequestStatus.DECODING
        # the steps in flight ran before this prefill: their tokens go out now, not once the
        # prefill's tokens are read
        self._drain(running, batch)
        self._take(group, rows, tokens, logprobs, running, batch)
        self.stats["prefill_s"] += time.perf_counter() - t0

    def _shift(self, batch: _Batch, col: int, running: dict) -> None:
        """Move the cache's slots so that the column becomes `col`: the running rows', and the
        finished rows' that prompts may start from, where they land inside the cache."""
        d = batch.col - col
        starts = {row: r.start for row, r in running.items()}
        lo = min(starts.values(), default=batch.col)
        if batch.prefixes is not None:
            lo = min([lo, *(s for s in batch.prefixes.finished_rows().values() if s - d >= 0)])
        if batch.pages is not None:  # the slots moved from and to, while they move
            batch.hold(_and_moved(self._spans(batch, running), d))
        if batch.prefixes is not None:
            batch.prefixes.shift(lo, d)
        batch.shift(col, starts, lo=lo)
        for r in running.values():
            r.start -= d
        self._horizon = max(self._horizon - d, 0)
        self._hold(batch, running)

    def _spans(self, batch: _Batch, running: dict, extra: dict | None = None) -> dict[int, list[tuple[int, int]]]:
        """Paged: the slots that hold or will hold keys and values someone reads, row -> [first,
        end) ranges: each running request's prompt and new tokens (below the horizon, `_cap`), the
        request in chunks and the prefix its riding chunk copies, the finished rows that prompts may
        start from, and `extra` (row -> ranges)."""
        spans: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
        cap = self._cap(batch)
        for row, req in [*running.items(), *self._recomputing.items()]:
            spans[row].append(_request_span(req, cap))
        if self._chunked is not None:
            for row, ranges in _chunk_spans(self._chunked, cap).items():
                spans[row].extend(ranges)
        if self._ride is not None:  # a chunk waiting for its step copies its prefix from where it lay before it
            src, first, n = self._ride[3]
            if n:
                spans[src].append((first, first + n))
        if batch.prefixes is not None:
            for row, (first, end) in batch.prefixes.finished_spans().items():
                spans[row].append((first, end))
        for row, ranges in (extra or {}).items():
            spans[row].extend(ranges)
        return spans

    def _hold(self, batch: _Batch, running: dict, extra: dict | None = None) -> None:
        """Paged: memory behind the pages `_spans` names, and only those."""
        if batch.pages is not None:
            batch.hold(self._spans(batch, running, extra))

    def _pages_hold(self, batch: _Batch, running: dict, chunked: _Chunked) -> bool:
        """Whether the cache's pages hold what is held now with `chunked` (none runs in chunks
        now) as the request in chunks (always, unpaged)."""
        if batch.pages is None:
            return True
        spans = self._spans(batch, running, _chunk_spans(chunked, self._cap(batch)))
        return len(batch.pages_of(spans)) <= batch.pages.capacity

    def _room(self, batch: _Batch, running: dict, group: list[_Request], col: int, ahead: int) -> bool:
        """Paged: whether the cache's pages hold `group` joining at column `col` (+ `ahead`) with
        what is held now, through the cache shift to `col` that holds the old and new slots at once;
        with pages on demand, through the horizon's next move too (a page more for each request
        that will grow past it)."""
        d = batch.col - col
        spans = self._spans(batch, running)
        held = len(batch.pages_of(_and_moved(spans, d)))
        join = col + ahead
        end, grow, cap = batch.S, 0, self._cap(batch)
        if cap is not None:
            end = self._grown(batch, max(self._horizon - d, join))
            grow = sum(_request_span(r)[1] > cap for r in running.values())
        # each request's most pages (a page more where it will grow past the horizon, but never
        # more than its whole span's: a lone request of a whole row fits the fewest pages allowed),
        # and no more than the pages not held (the row it takes is not known yet: it may share a
        # page with a row's held slots)
        new = 0
        for r in group:
            first, last = join - len(r.prompt) - len(r.tokens), min(join + r.max_new - len(r.tokens), batch.S)
            now = self._request_pages(min(last, end) - first) + (last > end)
            new += min(now, self._request_pages(last - first))
        return held + min(new + grow, batch.pages.count - held) <= batch.pages.capacity

    def _cap(self, batch: _Batch) -> int | None:
        """Paged, pages on demand (`PAGES_ON_DEMAND`): the slot below which running requests hold
        their slots, the horizon (at least the column: a prompt's slots are below it); else None."""
        if batch.pages is None or not PAGES_ON_DEMAND:
            return None
        return max(self._horizon, batch.col)

    def _grown(self, batch: _Batch, col: int) -> int:
        """The horizon that holds column `col`: the first page boundary past it (in a row's slots)."""
        k = max(1, batch.pages.page // batch.slot_bytes)
        return min((col // k + 1) * k, batch.S)

    def _grow(self, waiting: deque, running: dict, batch: _Batch) -> None:
        """Paged, pages on demand: before a step writes the column, the horizon moves past it and
        the running rows take the pages up to it. Where the pages would run out: requests that
        ended in the steps in flight give theirs up first, then finished rows that prompts may
        start from (the oldest first), then the running requests that came last (`_preempt`)."""
        if self._cap(batch) is None or batch.col < self._horizon:
            return
        before, self._horizon = self._horizon, self._grown(batch, batch.col)
        index = batch.prefixes
        while len(batch.pages_of(spans := self._spans(batch, running))) > batch.pages.capacity:
            if self._pending:
                self._drain(running, batch)
                continue
            finished = index.finished_rows() if index is not None else {}
            if finished:
                index.drop(min(finished, key=index.age))
                continue
            # the running requests first, then those that this step computes again (`_recompute`)
            rows = running or self._recomputing
            if not rows:  # nothing writes the column now: the horizon stays where it was
                self._horizon = before
                return
            self._preempt(max(rows, key=lambda row: (rows[row].created, row)), waiting, rows, batch)
        batch.hold(spans)

    def _preempt(self, row: int, waiting: deque, running: dict, batch: _Batch) -> None:
        """A running request (of `running`: the running rows, or those computed again past
        LongRoPE's switch at this step) gives its row and pages up and waits at the head of the
        queue: its prompt and tokens so far are computed again when it joins (`_Request.sequence`),
        with the long factors past the switch, its draws going on from its token count, as a
        request computed again past LongRoPE's switch does (`_recompute`)."""
        req = running.pop(row)
        self._rows_changed += 1
        batch.release(row)
        if batch.prefixes is not None:
            batch.prefixes.drop(row)
        if any(c[3] is req for c in self._crossings):  # its crossing step follows its token count when it joins
            self._crossings = [c for c in self._crossings if c[3] is not req]
            heapq.heapify(self._crossings)
        if self.rope_limit is not None and len(req.prompt) + len(req.tokens) > self.rope_limit:
            req.long = True  # (one that passes the switch at this step)
        req.status = RequestStatus.PENDING
        waiting.appendleft(req)
        self.stats["preempted"] += 1

    def _keys_room(self) -> int:
        """Keys (with their values) of one layer that PREFIX_KEYS_SHARE of the free GPU memory holds
        (0 off the GPU): what a prefill's attention may gather from shared prefixes."""
        if self.model.device.type != "cuda":
            return 0
        return _keys_in(int(PREFIX_KEYS_SHARE * _free_memory(self.model.device)), self.model.config, self.model.dtype)

    def _weights_changed(self) -> bool:
        """Whether a parameter was changed in place (its version counter moved) since the last
        call: the cached prefixes' keys and values are then stale. (`param.data` writes bypass
        the counter; a `pause()` or a new run forgets the prefixes in any case.)"""
        versions = [p._version for p in self.model.parameters()]
        changed = versions != self._versions
        self._versions = versions
        return changed

    def _place(self, group: list[_Request], free: list[int], running: dict, batch: _Batch) -> tuple[list, list, list]:
        """The free rows that `group` takes; per request, the cached prefix it starts from ((source,
        length) or None); and the group's prefill phases (lists of indices into `group`). A request
        whose prompt shares at least a block more with an earlier one of the group than with any row
        waits for a second phase, which starts from the first's rows, when that saves at least
        FOLLOW_MIN_TOKENS. A finished row that one request starts from goes to that request (its
        prefill copies the prefix out before it writes the row). Other requests take free rows inside
        the decode steps' bucket, those without a finished request's tokens first; then the lowest
        (decode runs up to the highest row in use); rows that requests start from last."""
        index = batch.prefixes
        everyone = list(range(len(group)))
        if index is None:
            return free[:len(group)], [None] * len(group), [everyone]
        if self._weights_changed():
            index.clear()
        users: collections.Counter = collections.Counter()  # finished rows -> requests that start from them
        found = []
        for req in group:  # spread over rows that hold the same tokens, so that each may go to its user
            f = _find(index, req, users)
            found.append(f)
            if f is not None and f[0].req is None:
                users[f[0].row] += 1
        rows: list = [None] * len(group)
        for i, f in enumerate(found):  # a finished row that one request starts from: that request takes it
            if f is not None and f[0].req is None and users[f[0].row] == 1:
                rows[i] = f[0].row
        # rows inside the decode steps' current bucket first (keeping finished rows' tokens, the
        # oldest first), then the lowest
        inside = batch.bucket(max(running) + 1) if running else 1
        others = iter(sorted((r for r in free if r not in rows), key=lambda r: (
            r in users, r >= inside, index.age(r) if r < inside else 0, r)))
        rows = [r if r is not None else next(others) for r in rows]
        for r in rows:
            index.drop(r)
        found = [_find(index, req) if f is not None and f[0].row in rows and f[0].row != row
                 else f for req, f, row in zip(group, found, rows)]
        local, follow, gain = PrefixIndex(), [], 0
        for i, req in enumerate(group):
            mine, have = _find(local, req), found[i][1] if found[i] is not None else 0
            if mine is not None and mine[1] >= have + prefixes.BLOCK:
                follow.append(i)
                gain += mine[1] - have
            else:
                local.running(i, req)
        if not follow or gain < FOLLOW_MIN_TOKENS:
            return rows, found, [everyone]
        followers = set(follow)
        lead = [i for i in everyone if i not in followers]
        return rows, found, [lead, follow]

    def _column(self, batch: _Batch, running: dict, group: list[_Request], ahead: int = 0) -> int | None:
        """The column from which `group` can join the running requests `ahead` columns later
        (a prompt in chunks): the current one if they all fit there, else the lowest that holds
        every running request's past; None if none."""
        S = batch.S
        longest = max(len(r.prompt) + len(r.tokens) for r in group)

        def fits(col: int) -> bool:
            # every request must be able to write its remaining tokens' keys by slot S - 1 (a
            # running request's count may lag the device by the step in flight: one more write
            # than needed is allowed for)
            if col + ahead < longest or any(col + ahead + r.max_new - len(r.tokens) - 1 > S for r in group):
                return False
            return all(col + (r.max_new - len(r.tokens)) <= S for r in running.values())

        if fits(batch.col):
            return batch.col
        lowest = max([longest - ahead, *(batch.col - r.start for r in running.values())])
        return lowest if fits(lowest) else None

    def _take(self, group, rows, tokens, logprobs, running, batch) -> None:
        """Hand the tokens of a prefill to their requests, which then run in their rows."""
        host = tokens.tolist()
        lps = [None] * len(host)
        for part, lp in logprobs or []:
            for i, value in zip(part, lp.tolist()):
                lps[i] = value
        self._rows_changed += 1
        for req, row, tok, lp in zip(group, rows, host, lps):
            running[row] = req
            due = self._crosses(req)
            if due is not None:
                heapq.heappush(self._crossings, (due, next(self._order), row, req))
            self._hand(req, row, tok, lp, running, batch)

    def _hand(self, req: _Request, row: int, token: int, logprob: float | None, running: dict,
              batch: _Batch) -> None:
        """A running request's next token: it ends there (EOS, its length) or goes on."""
        if req.add(token, logprob):
            self._end(row, running, batch, req.error)
        elif req.streaming:
            self._deliver(req)

    def _end(self, row: int, running: dict, batch: _Batch, error: str | None = None) -> None:
        """A running request finishes (or fails with `error`), and its row is free."""
        req = running.pop(row)
        self._rows_changed += 1
        batch.release(row)
        if batch.prefixes is not None:
            batch.prefixes.finished(row, req)
        self._finish(req, error)

    def _decode(self, running: dict, batch: _Batch, waiting: deque) -> None:
        """Launch a step for the running rows; read the tokens of the step READ_LAG steps before
        it: the host reads a step's tokens while the next one runs on the GPU, and a request that
        ended in the first has its row computed once more, then dropped. A request that passes
        LongRoPE's switch at this step leaves it and is computed again after it (`_recompute`).
        A prompt chunk left to ride (`_next_chunk`) runs in the step's forward (`_Batch.mixed`),
        or alone where no row is left to step."""
        t0 = time.perf_counter()
        ride = self._ride  # a prompt chunk that this step carries (`_next_chunk`), held until it ran (`_spans`)
        if batch.col >= batch.S:
            self._ride = None
            # the last column is written: every running request has ended in a step in flight
            # (each joined where its last token's key fits), which reading them now shows
            self._drain(running, batch)
            if not running:
                return
            raise RuntimeError(f"continuous batching: requests {[r.id for r in running.values()]} still run at the "
                               f"cache's last column {batch.S}")
        crossing = self._due(running) if self._crossings else {}
        if crossing:  # their recompute reads every token so far
            self._drain(running, batch)
            crossing = {row: req for row, req in crossing.items() if running.get(row) is req}
            for row in crossing:
                del running[row]
            self._rows_changed += 1
        self._recomputing = crossing  # their rows keep their slots (`_spans`) until they run again
        if running or crossing:  # (a recompute rewrites the slot that this step writes)
            self._grow(waiting, running, batch)
            if not running and not crossing and ride is None:  # every running request gave its pages up
                self.stats["decode_s"] += time.perf_counter() - t0
                return
        if running and ride is not None:
            b = batch.bucket(max(running) + 1)
            logits = batch.mixed(*ride, b)
            self.stats["mixed"] += 1
        elif running:
            b = batch.bucket(max(running) + 1)
            logits = batch.step(b)
        elif ride is not None:  # every row left the step: the chunk runs alone
            prompt, row, first, shared, long = ride
            batch.forward([prompt], [row], [first], [shared], long=[long])
        self._ride = None
        if running:
            self._steps += 1
            if self._constrained(running):
                # a grammar's mask needs the tokens so far: read the steps in flight while this one runs
                self._drain(running, batch)
            self.stats["decode_rows"].append(len(running))
            tokens, logprobs = self._choose(logits, self._decode_rows(running, b))
            batch.ids[:b, 0] = tokens
            self._pending.append(_Step(sorted(running.items()), tokens, logprobs))
            while len(self._pending) > READ_LAG:
                self._collect(self._pending.popleft(), running, batch)
        else:  # the step of the recomputed rows alone: the column moves on
            batch.col += 1
            self._steps += 1
        self.stats["decode_s"] += time.perf_counter() - t0
        for row, req in crossing.items():
            self._recompute(row, req, running, batch)
        self._recomputing = {}

    def _due(self, running: dict) -> dict[int, _Request]:
        """The running requests (row -> request) whose next step passes LongRoPE's switch."""
        due = {}
        while self._crossings and self._crossings[0][0] <= self._steps:
            _, _, row, req = heapq.heappop(self._crossings)
            if running.get(row) is req:
                due[row] = req
        return due

    def _recompute(self, row: int, req: _Request, running: dict, batch: _Batch) -> None:
        """A request whose sequence passed LongRoPE's switch: its prompt and tokens so far computed
        again with the long factors (the step just run wrote a throwaway key in its row's last
        slot), and its next token drawn from the last logits, as `generate` does when its sequence
        passes `original_max_position_embeddings`. It then runs on with the long factors.

        While other rows decode, a sequence longer than a chunk runs in chunks, one a turn as a
        long prompt does (`_next_chunk`, then `_rejoin`), its row rejoining at the column of its
        last chunk, where its remaining tokens must fit; else (or while another request runs in
        chunks) in one forward into the same slots, now."""
        seq = req.prompt + req.tokens
        if len(seq) != self.rope_limit + 1 or req.start + len(seq) != batch.col:
            raise RuntimeError(f"continuous batching: request {req.id} passes LongRoPE's switch with {len(seq)} "
                               f"tokens ending at slot {req.start + len(seq) - 1}, not {self.rope_limit + 1} tokens "
                               f"ending at the column before {batch.col}")
        req.long = True
        if batch.prefixes is not None:
            batch.prefixes.drop(row)
        chunk = self._chunk(running) if RECOMPUTE_CHUNKS else 0
        chunks = -(-len(seq) // chunk) if chunk else 1
        join = batch.col + chunks - 1
        ch = _Chunked(req, row, join, (0, 0, 0), chunks, tokens=seq, recompute=True)
        if chunks > 1 and self._chunked is None and join + req.max_new - len(req.tokens) - 1 <= batch.S and \
                self._pages_hold(batch, running, ch):
            self._chunked = ch
            self.stats["recomputed_in_chunks"] += 1
            self._hold(batch, running)  # its sequence moves right with each chunk after the first
            return
        t0 = time.perf_counter()
        logits = batch.forward([seq], [row], [req.start], [(0, 0, 0)], long=[True])
        batch.pos[row, 0] = len(seq)
        self.stats["prefill_tokens"].append(len(seq))
        self._resume(row, req, logits, running, batch)
        self.stats["prefill_s"] += time.perf_counter() - t0

    def _rejoin(self, ch: _Chunked, running: dict, batch: _Batch) -> None:
        """The last chunk of a request computed again past LongRoPE's switch (`_recompute`): its
        sequence then ends at the column before this one, and the request runs on from there."""
        t0 = time.perf_counter()
        req, seq = ch.req, ch.tokens
        logits = batch.prefill([seq], [ch.row], [ch.shared], long=[True])  # its row's mask and position too
        req.start = batch.col - len(seq)
        self.stats["prefill_tokens"].append(len(seq) - ch.shared[2])
        self._drain(running, batch)  # the steps in flight ran before this forward: their tokens go out first
        self._chunked = None
        self._resume(ch.row, req, logits, running, batch)
        self.stats["prefill_s"] += time.perf_counter() - t0

    def _resume(self, row: int, req: _Request, logits: torch.Tensor, running: dict, batch: _Batch) -> None:
        """A recomputed request (`_recompute`) runs again in `row`: its token counts rebuilt, its
        next token drawn from the sequence's last `logits` and handed to it. Its draws go on from
        its token count (steps it sat out while its chunks ran do not count)."""
        req.first = self._steps - len(req.tokens)
        self._track_counts(batch, [req], [row])  # the steps' throwaway tokens were counted in the row
        tokens, lp = self._choose(logits, [req], [row])
        batch.ids[row, 0] = tokens[0]
        running[row] = req
        self._rows_changed += 1
        if batch.prefixes is not None:
            batch.prefixes.running(row, req)
        self.stats["recomputed"] += 1
        self._hand(req, row, int(tokens[0]), None if lp is None else lp.tolist()[0], running, batch)

    def _constrained(self, running: dict) -> bool:
        """Whether a running request follows a grammar (remembered until the rows change)."""
        if self._grammar_rows[0] != self._rows_changed:
            self._grammar_rows = (self._rows_changed, any(r.matcher is not None for r in running.values()))
        return self._grammar_rows[1]

    def _drain(self, running: dict, batch: _Batch) -> None:
        """Read every step in flight."""
        while self._pending:
            self._collect(self._pending.popleft(), running, batch)

    def _collect(self, step: _Step, running: dict, batch: _Batch) -> None:
        host, lps = step.read()
        for row, req in step.rows:
            if running.get(row) is req:  # else it ended (or was cancelled) at the step before
                self._hand(req, row, host[row], None if lps is None else lps[row], running, batch)

    def _decode_rows(self, running: dict, b: int) -> list:
        """The requests of a decode step's rows (None: a free row), remembered until rows change."""
        key = self._rows_changed
        if self._rows_of[0] != (key, b):
            self._rows_of = ((key, b), [running.get(r) for r in range(b)], {})
        return self._rows_of[1]

    def _memo(self, reqs: list) -> dict:
        """What is derived from a decode step's rows, kept until they change (`_decode_rows`); a
        fresh dict for other row lists (a prefill's)."""
        return self._rows_of[2] if reqs is self._rows_of[1] else {}

    def _choose(self, logits_BV: torch.Tensor, reqs: list, rows: list[int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next tokens [B] (greedy or sampled through the warpers) of the rows of requests `reqs`
        (None: a free row) and, when asked, their log-probabilities under the distribution they
        were drawn from. `rows`: the batch rows of `reqs` (None: rows 0 .. B - 1, a decode step's)."""
        want_lp = self.return_logprobs
        memo = self._memo(reqs)
        if "grammar" not in memo:
            memo["grammar"] = [i for i, r in enumerate(reqs) if r is not None and r.matcher is not None]
        if memo["grammar"]:
            logits_BV = self._constrain(logits_BV, reqs, memo["grammar"])
        if "own" not in memo:
            memo["own"] = any(r is not None and r.sampling is not None for r in reqs)
        if memo["own"]:
            return self._choose_per_row(logits_BV, reqs, rows)
        processes = self.default_sampling.processes  # the config's repetition penalty or sequence bias
        if not self.do_sample and not want_lp and not processes:
            return logits_BV.argmax(dim=-1), None
        scores, settings, rows_B = logits_BV.float(), None, None
        if self.do_sample:
            if "free" not in memo:
                free = [i for i, r in enumerate(reqs) if r is None]
                memo["free"] = to_device(torch.tensor(free), scores.device) if free else None
            if memo["free"] is not None:  # a free row's logits may be anything, NaN too (its slots hold
                scores = scores.index_fill(0, memo["free"], 0.0)  # no request's keys): a draw, discarded
        if processes:
            settings, _, _ = self._row_settings(reqs, logits_BV.device)
            scores, rows_B = self._penalize(scores, settings, reqs, rows)
        for w in self.warpers:
            scores = w(None, scores)
        if self.do_sample:
            tokens = torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        if rows_B is not None:
            self._batch.counts.add(rows_B, tokens)
        return tokens, self._logprobs(scores, tokens, reqs) if want_lp else None

    def _constrain(self, logits_BV: torch.Tensor, reqs: list, index: list[int]) -> torch.Tensor:
        """The logits with each grammar-held row's disallowed tokens at -inf (`index`: those rows)."""
        from ..generation.grammar import apply_bitmask, fill_rows

        cuda = logits_BV.device.type == "cuda"
        by_width: dict[int, list[int]] = {}  # grammars built over vocabularies of other widths
        for i in index:
            by_width.setdefault(reqs[i].matcher.grammar.vocab.words, []).append(i)
        width = max(by_width)
        for words, rows in by_width.items():
            bitmask = torch.zeros(len(rows), width, dtype=torch.int32, pin_memory=cuda)
            part = bitmask if words == width else torch.empty(len(rows), words, dtype=torch.int32)
            fill_rows([reqs[i].matcher for i in rows], [reqs[i].eos for i in rows], part)
            if part is not bitmask:
                bitmask[:, :words] = part
            logits_BV = apply_bitmask(logits_BV, bitmask.to(logits_BV.device, non_blocking=cuda),
                                      to_device(torch.tensor(rows), logits_BV.device))
        return logits_BV

    def _logprobs(self, scores_BV: torch.Tensor, tokens_B: torch.Tensor, reqs: list) -> torch.Tensor:
        """The drawn tokens' log-probabilities [B]; where a row asks for top log-probabilities,
        [B, 1 + 2K] for the most any row asks: the token's, then the K largest, then their ids
        (exact as float32 below 2**24)."""
        lsm = scores_BV.log_softmax(dim=-1)
        lp = lsm.gather(1, tokens_B[:, None]).squeeze(1)
        memo = self._memo(reqs)
        if "top" not in memo:
            memo["top"] = max((r.top_n for r in reqs if r is not None), default=0)
        k = memo["top"]
        if not k:
            return lp
        values, ids = lsm.topk(k, dim=-1)
        return torch.cat([lp[:, None], values, ids.to(lsm.dtype)], dim=1)

    def _row_settings(self, reqs: list, device: torch.device) -> tuple[RowSettings, torch.Tensor, torch.Tensor]:
        """The rows' settings on the device, and their requests' seeds and first draws' steps [B]
        (free rows: 0), remembered for a decode step's rows."""
        memo = self._memo(reqs)
        if "settings" in memo:
            return memo["settings"]
        greedy = Sampling(False)
        ss = [greedy if r is None else (r.sampling or self.default_sampling) for r in reqs]
        settings = RowSettings.of(ss, lambda values, dtype: to_device(torch.tensor(values, dtype=dtype), device))
        seeds = to_device(torch.tensor([0 if r is None else r.seed for r in reqs]), device)
        firsts = to_device(torch.tensor([0 if r is None else r.first for r in reqs]), device)
        memo["settings"] = out = (settings, seeds, firsts)
        return out

    def _choose_per_row(self, logits_BV: torch.Tensor, reqs: list, rows: list[int] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`_choose` where rows carry settings of their own: each row's logit bias and penalties
        (`row_sampling`), then its temperature, top-k, top-p and min-p, then sampled (`draw_rows`:
        an exponential race keyed by the request's seed and its token's index) or greedy."""
        settings, seeds, firsts = self._row_settings(reqs, logits_BV.device)
        scores, rows_B = self._penalize(logits_BV.float(), settings, reqs, rows)
        tokens, scores = draw_rows(scores, settings, seeds, firsts, self._steps)
        if rows_B is not None:
            self._batch.counts.add(rows_B, tokens)
        return tokens, self._logprobs(scores, tokens, reqs) if self.return_logprobs else None

    def _penalize(self, scores_BV: torch.Tensor, settings: RowSettings, reqs: list, rows: list[int] | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows' logit bias and penalties on their scores (`row_sampling.penalize_rows`), and
        the rows' indices in the batch [B] when their token counts are read (the step's tokens are
        then counted), else None. `rows`: as `_choose`'s."""
        if not settings.counts:
            if settings.bias is not None:
                scores_BV = penalize_rows(scores_BV, None, None, settings)
            return scores_BV, None
        if rows is not None:  # a prefill's rows
            rows_B = to_device(torch.tensor(rows), scores_BV.device)
        else:  # a decode step's: 0 .. B - 1, kept until its rows change
            memo = self._memo(reqs)
            if "rows" not in memo:
                memo["rows"] = to_device(torch.tensor(range(len(reqs))), scores_BV.device)
            rows_B = memo["rows"]
        counts = self._batch.counts
        return penalize_rows(scores_BV, counts.generated[rows_B], counts.prompt[rows_B], settings), rows_B

    def _track_counts(self, batch: _Batch, group: list[_Request], rows: list[int]) -> None:
        """Reset the token counts of the rows that requests with penalties take: their prompts and
        the tokens they generated so far."""
        taken = [(row, req) for row, req in zip(rows, group) if (req.sampling or self.default_sampling).counts]
        if not taken:
            return
        device = batch.ids.device
        if batch.counts is None:
            batch.counts = TokenCounts(batch.R, self.model.config.vocab_size, device)
        batch.counts.reset([row for row, _ in taken], [req.prompt for _, req in taken],
                           lambda values, dtype: to_device(torch.tensor(values, dtype=dtype), device),
                           [req.tokens for _, req in taken])


def _request_span(req: _Request, cap: int | None = None) -> tuple[int, int]:
    """A running request's slots: its prompt's and its new tokens' keys (the last one's written by
    the step in flight when it ends), [start, start + prompt + max_new), below `cap` if given."""
    end = req.start + len(req.prompt) + req.max_new
    return req.start, end if cap is None else min(end, cap)


def _chunk_spans(ch: _Chunked, cap: int | None = None) -> dict[int, list[tuple[int, int]]]:
    """The slots of a request in chunks: from its first chunk's to its join column + the tokens
    it has still to make (below `cap` if given, but its chunks' own), and the prefix its chunks copy."""
    end = ch.join + ch.req.max_new - len(ch.req.tokens)
    if cap is not None:
        end = min(end, max(cap, ch.join))
    spans = {ch.row: [(ch.join - len(ch.tokens), end)]}
    src, first, n = ch.shared
    if n:
        spans.setdefault(src, []).append((first, first + n))
    return spans


def _and_moved(spans: dict[int, list[tuple[int, int]]], d: int) -> dict[int, list[tuple[int, int]]]:
    """`spans` and the same slots after a cache shift by -d, together (what a shift holds while it
    moves them)."""
    if not d:
        return spans
    return {row: ranges + [(a - d, e - d) for a, e in ranges] for row, ranges in spans.items()}


def _call_each(items: list) -> None:
    """On an event loop: each result to its handler (one failing handler does not stop the rest)."""
    for callback, out in items:
        try:
            callback(out)
        except Exception:  # noqa: BLE001 -- a handler's own error, logged as asyncio would
            logger.exception("continuous batching: the result handler of %s raised", out.request_id)


def _id_set(eos) -> frozenset[int]:
    if eos is None:
        return frozenset()
    ids = [eos] if isinstance(eos, int) else list(torch.as_tensor(eos).reshape(-1).tolist())
    return frozenset(int(i) for i in ids if int(i) >= 0)


def _request_eos(eos, request_id) -> frozenset[int]:
    """`add_request`'s `eos_token_id`: a token id or a list of them (ints). As in `generate`, an id no
    token has (-1, say: a model without an end token) ends nothing."""
    if isinstance(eos, (torch.Tensor, np.ndarray)):
        kind = str(eos.dtype)
        if "int" not in kind:  # (float, bool, complex)
            raise TypeError(f"add_request({request_id!r}): eos_token_id must hold token ids (ints), got a "
                            f"{kind} {type(eos).__name__}")
        eos = eos.reshape(-1).tolist()
    ids = [eos] if not isinstance(eos, (list, tuple)) else list(eos)
    for i in ids:
        if not isinstance(i, numbers.Integral) or isinstance(i, (bool, np.bool_)):
            raise TypeError(f"add_request({request_id!r}): eos_token_id must be a token id or a list of them, "
                            f"got {eos!r}")
    return _id_set(ids)


def grammar_of(grammar, vocab_size: int, request_id):
    """`add_request`'s `grammar` (None, or a `Grammar` no wider than the model's vocabulary), checked."""
    if grammar is None:
        return None
    from ..generation.grammar import Grammar

    if not isinstance(grammar, Grammar):
        raise ValueError(f"add_request({request_id!r}): grammar must be a moetorch Grammar (Grammar.json, "
                         f"Grammar.regex, Grammar.lark), got {type(grammar).__name__}")
    if grammar.vocab.size > vocab_size:
        raise ValueError(f"add_request({request_id!r}): the grammar's vocabulary ({grammar.vocab.size} tokens) is "
                         f"wider than the model's ({vocab_size})")
    return grammar


def top_logprobs_of(value, request_id) -> int:
    """`add_request`'s `top_logprobs` (None or 0: none), checked."""
    top_n = value or 0
    if isinstance(top_n, bool) or not isinstance(top_n, int) or not 0 <= top_n <= MAX_TOP_LOGPROBS:
        raise ValueError(f"add_request({request_id!r}): top_logprobs must be an int in 0..{MAX_TOP_LOGPROBS}, "
                         f"got {top_n!r}")
    return top_n


def _prompt_list(input_ids, vocab: int, request_id) -> list[int]:
    """A prompt as a list of ints, checked: non-empty, within the vocabulary."""
    what = f"add_request({request_id!r})" if request_id is not None else "add_request"
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2 and input_ids.shape[0] == 1:
            input_ids = input_ids[0]
        if input_ids.dim() != 1 or input_ids.is_floating_point():
            raise ValueError(f"{what}: input_ids must be one sequence of token ids, got a tensor of shape "
                             f"{tuple(input_ids.shape)} and dtype {input_ids.dtype}")
        input_ids = input_ids.tolist()
    try:
        prompt = [int(t) for t in input_ids]
        if any(isinstance(t, float) for t in input_ids):
            raise TypeError
    except (TypeError, ValueError):
        raise TypeError(f"{what}: input_ids must be a list of token ids (ints), got "
                        f"{type(input_ids).__name__}") from None
    if not prompt:
        raise ValueError(f"{what}: the prompt is empty")
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{what}: token id {bad[0]} is outside the vocabulary (0 .. {vocab - 1})")
    return prompt


@contextlib.contextmanager
def _running(manager: ContinuousBatchingManager, keep: bool, block: bool = True, timeout: float | None = None):
    """The manager's loop runs inside; on exit it finishes what was added and stops (kept on the
    model with `keep`, else destroyed)."""
    manager.start()
    try:
        yield manager
    finally:
        manager.stop(block=block, timeout=timeout, keep_for_next_session=keep)
        if not keep:
            manager.destroy()


class ContinuousBatchingMixin:
    """Transformers 5's continuous-batching methods on a causal LM."""

    def init_continuous_batching(self, generation_config=None, continuous_batching_config=None,
                                 workload_hints: WorkloadHints | None = None) -> ContinuousBatchingManager:
        """A manager for continuous batching (the model's kept one, if `stop(keep_for_next_session=True)`
        left one). `generation_config` defaults to the model's."""
        cached = self.__dict__.get("_cached_continuous_batching_manager")
        if isinstance(cached, ContinuousBatchingManager):
            return cached
        if getattr(self, "spans_devices", False):
            raise ValueError("continuous batching keeps one static cache on one device, but this model is placed over "
                             f"{', '.join(map(str, self.parameter_devices()))}: load it on one device")
        gen = self._continuous_settings(generation_config)
        cfg = ContinuousBatchingConfig.of(continuous_batching_config)
        return ContinuousBatchingManager(self, gen, cfg, workload_hints)

    def _continuous_settings(self, generation_config):
        # As Transformers' continuous batching: the config passed, or else the model's, unlayered
        from ..generation.configuration import as_generation_config

        gen = as_generation_config(generation_config) if generation_config is not None else self.generation_config
        gen = copy.deepcopy(gen)
        gen._check_values()
        return gen

    def destroy_cached_continuous_batching_manager(self) -> None:
        """Let the kept manager (and its cache and graphs) go."""
        cached = self.__dict__.pop("_cached_continuous_batching_manager", None)
        if isinstance(cached, ContinuousBatchingManager):
            cached.destroy()

    @contextlib.contextmanager
    def continuous_batching_context_manager(self, generation_config=None, block: bool = True,
                                            timeout: float | None = None, continuous_batching_config=None,
                                            persistent_manager: bool = False, warmup: bool = True,
                                            workload_hints: WorkloadHints | None = None):
        """A started manager; on exit it finishes the requests added and stops."""
        manager = self.init_continuous_batching(generation_config, continuous_batching_config, workload_hints)
        if warmup and not manager.warmed_up:
            manager.warmup()
        with _running(manager, persistent_manager, block, timeout):
            yield manager

    @torch.no_grad()
    def generate_batch(self, inputs: list, generation_config=None, continuous_batching_config=None,
                       record_timestamps: bool = False, progress_bar: bool = False, persistent_manager: bool = False,
                       warmup: bool = True, **kwargs: Any) -> dict[str, GenerationOutput]:
        """Generate for every prompt in `inputs` (lists of token ids) by continuous batching.
        Returns {request id: GenerationOutput} in the inputs' order (`req_0`, ...; with
        `num_return_sequences` > 1 each prompt's children `req_0__child#0`, ... before it). Keyword
        arguments: `max_new_tokens`. A failed request comes back with its `error` set. A 2-D tensor
        of ids is taken as one prompt a row (all of its tokens: no padding is dropped)."""
        if isinstance(inputs, torch.Tensor):
            if inputs.dim() != 2:
                raise ValueError(f"generate_batch(): inputs must be a list of prompts (lists of token ids) or a 2-D "
                                 f"tensor of them, got a tensor of shape {tuple(inputs.shape)}")
            inputs = inputs.tolist()
        if not isinstance(inputs, (list, tuple)):
            raise TypeError(f"generate_batch(): inputs must be a list of prompts (lists of token ids), got "
                            f"{type(inputs).__name__}")
        if not inputs:
            return {}
        max_new = kwargs.pop("max_new_tokens", None)
        if kwargs:
            raise TypeError(f"generate_batch() got unexpected keyword arguments {sorted(kwargs)} (it takes "
                            "max_new_tokens; other settings go in generation_config)")
        gen = self._continuous_settings(generation_config)
        if max_new is None:
            max_new = gen.max_new_tokens
        elif isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:  # (before it sizes the cache)
            raise ValueError(f"generate_batch(): max_new_tokens must be a positive int, got {max_new!r}")
        prompts = [_prompt_list(p, self.config.vocab_size, f"inputs[{i}]") for i, p in enumerate(inputs)]
        n = gen.num_return_sequences or 1
        hints = WorkloadHints(max(map(len, prompts)), max_new or 0, len(prompts) * n)
        from tqdm.auto import tqdm

        results: dict[str, GenerationOutput] = {}
        manager = self.init_continuous_batching(gen, continuous_batching_config, hints)
        if warmup and not manager.warmed_up:
            manager.warmup()
        # every request checked before any is queued (a bad one queues none), and queued before the
        # loop starts, so that its first prefills are as full as the config allows (and the same
        # from one call to the next), unless max_queue_size holds fewer
        made = [manager._requests(p, None, max_new, False, record_timestamps, None, {}) for p in prompts]
        # each prompt's children before it, as Transformers orders them
        order = [req.id for _, requests in made for req in requests]
        total = len(order)
        cap = manager.continuous_batching_config.max_queue_size
        bar = tqdm(total=total, disable=not progress_bar, desc=f"Solving {total} requests", unit="request")
        if not cap or total <= cap:
            for rid, requests in made:
                manager._queue(rid, requests)
            made = []
        with _running(manager, persistent_manager), bar:
            for rid, requests in made:
                manager._queue(rid, requests)
            while len(results) < total:
                out = manager.get_result(timeout=1)
                if out is None:
                    if not manager.is_running():
                        break
                    continue
                if out.is_finished():
                    results[out.request_id] = out
                    bar.update(1)
        failed = [rid for rid, out in results.items() if out.error is not None]
        if failed:
            logger.error("generate_batch: %d requests failed (their outputs carry the error), the first %s: %s",
                         len(failed), failed[0], results[failed[0]].error)
        return {rid: results[rid] for rid in order if rid in results}
