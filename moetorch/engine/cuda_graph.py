"""One decode step as a CUDA graph (and a prompt, `GraphedPrefill`, a verify chunk, `GraphedChunk`,
and continuous batching's packed prompts, `GraphedPackedPrefill`).

A decode step (one new token per sequence, a `StaticCache`) launches hundreds of small kernels;
at batch 1 their launch overhead, not the GPU, sets the speed. `GraphedDecodeStep` captures the
whole step once into a `torch.cuda.CUDAGraph` over static input buffers and replays it, so a step
costs one launch. It works because nothing on the decode path reads the device from the host and
every shape is fixed: the static cache, the full-length attention mask, `logits_to_keep=1`.

Host-side state that a replay cannot update (the cache's token count, LongRoPE's factor set) is
kept here: the count is advanced after each replay, and a step whose LongRoPE regime differs from
the captured one runs eagerly (that step rebuilds the cache) before a graph for the new regime is
captured. On CPU, or with `enabled=False`, the same object runs the model eagerly with the same
buffers: the fallback the tests exercise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import threading
import weakref
from typing import NamedTuple

import torch

from ..cache import MixedRows, PackedRows, StaticCache, _kv_shape, pack_plan
from ..ops.attention import Packed, build_mask, token_runs, varlen_kernel_serves
from ..ops.host import to_device

logger = logging.getLogger("moetorch")


_gc_lock = threading.Lock()
_gc_holds = 0  # captures running now (a batch's loop thread may capture while another thread does)
_gc_was_on = False


@contextlib.contextmanager
def gc_held():
    """Python's cyclic garbage collector held off, in every thread, while inside.

    A collection may destroy an unreachable CUDA graph (of an earlier batch, or a `generate` call
    whose objects sit in a reference cycle), and destroying a graph while another is being captured
    invalidates that capture (`cudaErrorStreamCaptureInvalidated`). torch.cuda.graph collected
    before each capture up to torch 2.8; later versions do not. Nested and concurrent holds
    count: the collector is back on (if it was on) when the last one leaves."""
    global _gc_holds, _gc_was_on
    with _gc_lock:
        if _gc_holds == 0:
            _gc_was_on = gc.isenabled()
            gc.disable()
        _gc_holds += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_holds -= 1
            if _gc_holds == 0 and _gc_was_on:
                gc.enable()


def capture(fn, warmups: int = 2, rewind: tuple[StaticCache, int] | None = None, pool=None,
            mode: str = "global"):
    """(graph, output) of `fn()` captured in a CUDA graph, after `warmups` runs on a side stream
    (lazy allocations, Triton compiles and autotuning happen there, not in the graph).
    `rewind=(cache, seen)`: each run and the capture start from the cache's host count `seen` (a
    forward advances it; the runs write the same slots with the same values, so the repeats are
    harmless). `pool`: a graph memory pool to share. `mode`: CUDA's capture mode ("thread_local":
    other threads may call CUDA meanwhile). The garbage collector is held off during the capture
    (`gc_held`)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            if rewind is not None:
                rewind[0]._seen = rewind[1]
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    if rewind is not None:
        rewind[0]._seen = rewind[1]
    with gc_held(), torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
        out = fn()
    return graph, out


def _pool_of(runner):
    """The graph memory pool a runner's graphs share (its length buckets never run at once), made
    on its first capture."""
    if runner.pool is None:
        runner.pool = torch.cuda.graph_pool_handle()
    return runner.pool


def compiled_own_forward(model) -> bool:
    """Whether `model.forward` is a torch.compile of the model's own forward, as Transformers'
    static-cache recipe makes it (`model.forward = torch.compile(model.forward, ...)`)."""
    fwd = model.__dict__.get("forward")
    orig = getattr(fwd, "_torchdynamo_orig_callable", None)
    return orig is not None and getattr(orig, "__func__", orig) is type(model).forward


@contextlib.contextmanager
def own_forward(model):
    """Calls of `model(...)` inside run the model's own forward where `model.forward` is a
    torch.compile of it (`compiled_own_forward`); any other forward is left as it is.

    `generate` runs its CUDA-graphed steps this way. Under torch.compile the model takes its torch
    code (inductor fuses that itself), while the graphs replay moetorch's fused kernels, which are
    faster; and a compiled forward of mode "reduce-overhead" makes CUDA graphs of its own, which
    cannot be captured inside another graph. Direct calls of the model still run the compiled
    forward."""
    if not compiled_own_forward(model):
        yield
        return
    compiled = model.__dict__.pop("forward")
    try:
        yield
    finally:
        model.__dict__["forward"] = compiled


def _rotary(model):
    """The model's rotary embedding (`model.model.rotary_emb`, or a base model's own), else None."""
    return getattr(getattr(model, "model", model), "rotary_emb", None)


def _longrope(model):
    """The model's rotary embedding where it switches LongRoPE factors with the length, else None."""
    rotary = _rotary(model)
    return rotary if rotary is not None and rotary.longrope else None


def _rope_per_forward(model) -> bool:
    """Whether the model's rotary table follows each forward's largest position (JetMoE's "dynamic"
    and "longrope", `RotaryEmbedding.per_forward`): a chunk padded to a bucket would move it, so
    the padded graphs (`GraphedPrefill`, `GraphedChunk`) leave such a model's forwards unpadded."""
    return getattr(_rotary(model), "per_forward", None) is not None


class _CacheMask:
    """A full-length attention mask buffer [B, S] for steps on a StaticCache of S slots."""

    def __init__(self, model, cache: StaticCache, batch: int, enabled: bool | None, what: str) -> None:
        if not cache.is_static:
            raise TypeError(f"{what} needs a StaticCache (shapes must not change between steps)")
        self.model, self.cache, self.B = model, cache, batch
        self.enabled = (model.device.type == "cuda") if enabled is None else enabled
        self.mask_BS = torch.ones(batch, cache.max_cache_len, dtype=torch.long, device=model.device)
        self._mask_src: object = "ones"  # what mask_BS holds: "ones", or (weakref to a mask, its version)
        self.rotary = _longrope(model)
        self.per_forward = _rope_per_forward(model)

    def _set_mask(self, mask_BP: torch.Tensor | None) -> None:
        # The buffer holds mask_BP's columns, then ones. Rewritten only when the caller's mask is
        # another tensor (or was written to) since the last step: a decode loop passes the same
        # prompt mask every step, and each write is a kernel launch per token.
        if mask_BP is None:
            if self._mask_src != "ones":
                self.mask_BS.fill_(1)
                self._mask_src = "ones"
            return
        src = self._mask_src
        if isinstance(src, tuple) and src[0]() is mask_BP and src[1] == mask_BP._version:
            return
        self.mask_BS.fill_(1)
        self.mask_BS[:, : mask_BP.shape[1]].copy_(mask_BP)
        self._mask_src = (weakref.ref(mask_BP), mask_BP._version)


class GraphedDecodeStep(_CacheMask):
    """Runs `model(ids_B1, attention_mask, position_ids, cache_position)` for one token per row,
    replaying a captured CUDA graph when possible. Returns the last-position logits [B, V]."""

    def __init__(self, model, cache: StaticCache, batch: int, enabled: bool | None = None) -> None:
        super().__init__(model, cache, batch, enabled, "GraphedDecodeStep")
        device = model.device
        self.ids_B1 = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos_B1 = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cpos_1 = torch.zeros(1, dtype=torch.long, device=device)
        # by (LongRoPE's long factors, keys read through the cache's slot_rows)
        self.graphs: dict[tuple[bool, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _run(self) -> torch.Tensor:
        out = self.model(
            self.ids_B1, attention_mask=self.mask_BS, position_ids=self.pos_B1, past_key_values=self.cache,
            use_cache=True, cache_position=self.cpos_1, logits_to_keep=1, return_dict=True,
        )
        return out.logits[:, -1]

    def _regime(self, past: int) -> bool:
        return self.rotary is not None and self.rotary.use_long(past + 1 - self.cache.rope_pad)

    @torch.no_grad()
    def __call__(self, ids_B1, attention_mask_BS, position_ids_B1, cache_position_1) -> torch.Tensor:
        """One step. `attention_mask_BS`: the mask of the first columns (the rest are ones), or None
        for all ones. `position_ids_B1` and `cache_position_1`: tensors, or an int for every row."""
        past = self.cache.get_seq_length()
        self.ids_B1.copy_(ids_B1)
        for buf, value in ((self.pos_B1, position_ids_B1), (self.cpos_1, cache_position_1)):
            if isinstance(value, int):
                buf.fill_(value)
            else:
                buf.copy_(value.expand_as(buf))
        self._set_mask(attention_mask_BS)
        long = self._regime(past)
        if not self.enabled or self.cache.rope_long != long:
            return self._run()  # CPU fallback, or a LongRoPE switch (rebuilds the cache eagerly)
        key = (long, self.cache.slot_rows is not None)
        if key not in self.graphs:
            self._capture(key, past)
        graph, logits = self.graphs[key]
        graph.replay()
        self.cache._seen = past + 1  # what the captured forward did to the host count
        return logits

    def _capture(self, key: tuple[bool, bool], past: int) -> None:
        self.graphs[key] = capture(self._run, rewind=(self.cache, past))


# Prompt lengths a graphed prefill pads to: powers of two up to 256, then multiples of 256. A
# prompt past the last runs eagerly (there the GPU, not the launches, sets the time).
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048)
# Uses of a bucket before it is captured: a capture costs about three eager prefills, so a length
# seen once runs eagerly.
PREFILL_CAPTURE_AFTER = 2
# A left-padded batch's prompt runs packed in one row (`GraphedPrefill`): no padding computed, no
# mask. False: padded, with a 2D mask.
PACK_PADDED_PROMPTS = True


class GraphedPrefill:
    """The prompt's forward into an empty `StaticCache`, replayed from a CUDA graph per length
    bucket (`PREFILL_BUCKETS`). Short prompts wait on the host's kernel launches, not on the GPU
    (`bench/prefill_graph.py`: a 128-token JetMoE prompt 38 ms eagerly, 7 ms replayed).

    The prompt is padded on the right to its bucket. Under the causal mask no prompt token sees the
    padding; the padding's keys land in cache slots past the prompt, which later tokens overwrite
    and decode's mask hides, and the cache's count is set back to the prompt's length. The logits
    are those of the last prompt token (`logits_to_keep` as an index). A bucket is captured on its
    `PREFILL_CAPTURE_AFTER`-th use and runs eagerly, padded alike, before: one prompt gives the
    same logits on every call. `capture=False` (a cache used once) never captures. Past the last
    bucket, with LongRoPE's long factors, past the cache's length, or with a rotary table that
    follows each forward's positions (`_rope_per_forward`), the call returns None and the
    caller runs the prompt unpadded. On CPU (or `enabled=False`) the padded buffers always run
    eagerly: the fallback the tests exercise. Returns the last prompt token's logits [B, V].

    A batch whose prompts are left-padded (`PACK_PADDED_PROMPTS`) runs them packed in one row
    instead, each into its row's slots after its padding (`cache.PackedRows`): the padding is not
    computed and the attention needs no mask. Its shape replays a graph where one serves
    (`GraphedPackedPrefill`), else it runs eagerly, at any length."""

    def __init__(self, model, cache: StaticCache, batch: int, enabled: bool | None = None,
                 capture: bool = True) -> None:
        if not cache.is_static:
            raise TypeError("GraphedPrefill needs a StaticCache")
        self.model, self.cache, self.B = model, cache, batch
        self.enabled = (model.device.type == "cuda") if enabled is None else enabled
        self.capture = capture and self.enabled
        self.uses: dict[tuple, int] = {}
        self.graphs: dict[tuple, tuple] = {}  # key -> (graph or None, buffers, logits)
        self.pool = None  # one memory pool for every bucket's graph: they never run at once
        self.rotary = _longrope(model)
        self.per_forward = _rope_per_forward(model)
        self.window = getattr(model.config, "sliding_window", None)
        self.packed: GraphedPackedPrefill | None = None  # left-padded batches' graphs

    def bucket(self, T: int) -> int | None:
        """The padded length of a T-token prompt (None: it runs eagerly)."""
        Tb = next((b for b in PREFILL_BUCKETS if b >= T), None)
        if Tb is None or Tb > self.cache.max_cache_len:
            return None
        # (the padded positions run on past the prompt's: with positions past the slots, a negative
        # `rope_pad`, they may reach LongRoPE's long factors where the prompt's do not)
        if self.rotary is not None and self.rotary.use_long(Tb - min(self.cache.rope_pad, 0)):
            return None
        return Tb

    def _buffers(self, Tb: int, masked: bool, positioned: bool) -> dict:
        device = self.model.device
        B = self.B
        return {
            "ids": torch.zeros(B, Tb, dtype=torch.long, device=device),
            "mask": torch.ones(B, Tb, dtype=torch.long, device=device) if masked else None,
            "pos": torch.arange(Tb, device=device).expand(B, Tb).contiguous() if positioned else None,
            "cpos": torch.arange(Tb, device=device),
            "keep": torch.full((1,), Tb - 1, dtype=torch.long, device=device),
        }

    def _run(self, buf: dict) -> torch.Tensor:
        self.cache._seen = 0
        out = self.model(
            buf["ids"], attention_mask=buf["mask"], position_ids=buf["pos"], past_key_values=self.cache,
            use_cache=True, cache_position=buf["cpos"], logits_to_keep=buf["keep"], return_dict=True,
        )
        return out.logits[:, -1]

    @torch.no_grad()
    def __call__(self, ids_BT, attention_mask_BT, position_ids_BT) -> torch.Tensor | None:
        T = ids_BT.shape[1]
        if (self.cache.get_seq_length() != 0 or ids_BT.shape[0] != self.B or self.cache.slot_rows is not None
                or self.per_forward):
            return None
        from ..generation.utils import _foreign_modules  # (it imports this module)

        # (not with another library's modules in the model: PEFT's per-row adapters see one packed row)
        if attention_mask_BT is not None and PACK_PADDED_PROMPTS and not _foreign_modules(self.model):
            logits = self._packed(ids_BT, attention_mask_BT, position_ids_BT)
            if logits is not None:
                self.cache._seen = T  # the padded length, as the padded forward leaves it
                return logits
        Tb = self.bucket(T)
        if Tb is None:
            return None
        key = (Tb, attention_mask_BT is not None, position_ids_BT is not None)
        entry = self.graphs.get(key)
        if entry is None or (entry[0] is None and self.capture):
            self.uses[key] = self.uses.get(key, 0) + 1
            if self.capture and self.uses[key] >= PREFILL_CAPTURE_AFTER:
                entry = self._capture(entry[1] if entry else self._buffers(*key))
            elif entry is None:
                entry = (None, self._buffers(*key), None)
            self.graphs[key] = entry
        graph, buf, logits = entry
        buf["ids"][:, :T].copy_(ids_BT)
        buf["ids"][:, T:].zero_()
        if buf["mask"] is not None:
            buf["mask"][:, :T].copy_(attention_mask_BT)
            buf["mask"][:, T:].fill_(1)
        if buf["pos"] is not None:
            buf["pos"][:, :T].copy_(position_ids_BT)
            buf["pos"][:, T:].copy_(position_ids_BT[:, -1:] + buf["cpos"][1 : Tb - T + 1])
        buf["keep"].fill_(T - 1)
        if graph is None:  # not captured (yet, or on CPU): the padded forward, eagerly
            logits = self._run(buf)
        else:
            graph.replay()
        self.cache._seen = T  # the prompt's tokens; the padding's slots are free again
        return logits

    @torch.no_grad()
    def _packed(self, ids_BT, mask_BT, positions_BT) -> torch.Tensor | None:
        """Left-padded prompts packed in one row: their last tokens' logits [B, V]. None where the
        mask is not left padding (or pads nothing), a prompt's positions are not 0, 1, ..., or
        LongRoPE may switch factors within the cache (its replay record holds the padded layout)."""
        if self.rotary is not None and self.cache.max_cache_len > self.rotary.original_max:
            return None
        B, T = ids_BT.shape
        if not self.cache.keys:  # allocated by its first write, in the keys' dtype: the model's, without autocast
            if torch.is_autocast_enabled(ids_BT.device.type):
                return None
            self.cache._allocate(B, *_kv_shape(self.model.config), self.model.device, self.model.dtype)
        # the mask (the rows' lengths), ids and positions to the host in one copy, once a prompt
        parts = [mask_BT, ids_BT] + ([positions_BT.expand(B, T)] if positions_BT is not None else [])
        host = torch.stack([t.to(ids_BT.device, torch.long) for t in parts]).cpu()
        mask, ids = host[0].bool(), host[1]
        runs = token_runs(mask)
        if runs is None:
            return None
        starts, lengths = runs
        shortest = int(lengths.min())
        if shortest == T or shortest < 1 or not torch.equal(starts + lengths, torch.full_like(lengths, T)):
            return None  # not left padding, or no padding
        if positions_BT is not None:
            own = torch.arange(T)[None] - starts[:, None]
            if not torch.equal(host[2][mask], own.expand(B, T)[mask]):
                return None
        prompts = [ids[b, T - n:].tolist() for b, n in enumerate(lengths.tolist())]
        rows, starts, shared = list(range(B)), [T - len(p) for p in prompts], [(0, 0, 0)] * B
        if self.capture:
            if self.packed is None:
                self.packed = GraphedPackedPrefill(self.model, self.cache, self.window)
            if self.packed.enabled:
                logits = self.packed(prompts, rows, starts, shared)
                if logits is not None:
                    return logits
        return packed_forward(self.model, self.cache, prompts, rows, starts, shared, self.window)

    def _capture(self, buf: dict) -> tuple:
        # The runs write the empty cache's first slots, which the replay that follows writes again.
        graph, logits = capture(lambda: self._run(buf), pool=_pool_of(self))
        self.cache._seen = 0
        return graph, buf, logits


# Token counts a graphed chunk pads to: assisted decoding's verify forward (the last token and the
# drafts). A chunk past the last runs eagerly.
CHUNK_BUCKETS = (2, 4, 8, 16, 32, 64)


def chunk_bucket(T: int) -> int | None:
    """The padded length of a T-token chunk (None: past the last bucket)."""
    return next((b for b in CHUNK_BUCKETS if b >= T), None)


class GraphedChunk(_CacheMask):
    """A forward of a few new tokens per row into a `StaticCache` that holds earlier ones, with the
    logits of every new token: assisted decoding's verify forward (the last token and the drafts,
    prompt lookup's or an assistant's). It replays a CUDA graph per length bucket (`CHUNK_BUCKETS`),
    captured on first use; the graphs share one memory pool.

    The tokens are padded on the right to their bucket. Under the causal mask no token sees the
    padding; the padding's keys land in the slots after the tokens', which later tokens overwrite
    before anything reads them, and the cache's count is set to the real tokens'. Where a chunk
    does not fit (past the last bucket or the cache's end, positions other than the cache's, or a
    LongRoPE factor set that the padding would change or that the cache does not hold yet, a
    rotary table that follows each forward's positions), the
    call returns None and the caller runs the tokens unpadded. On CPU (or `enabled=False`) the
    padded buffers run eagerly: the fallback the tests exercise. Returns logits [B, T, V]."""

    def __init__(self, model, cache: StaticCache, batch: int, enabled: bool | None = None) -> None:
        super().__init__(model, cache, batch, enabled, "GraphedChunk")
        self.graphs: dict[tuple, tuple] = {}  # (bucket, long, slot_rows) -> (graph or None, buffers, logits)
        self.pool = None

    def _buffers(self, Tb: int) -> dict:
        device = self.model.device
        return {
            "ids": torch.zeros(self.B, Tb, dtype=torch.long, device=device),
            "pos": torch.zeros(self.B, Tb, dtype=torch.long, device=device),
            "cpos": torch.zeros(Tb, dtype=torch.long, device=device),
            "steps": torch.arange(Tb, device=device),
        }

    def _run(self, buf: dict) -> torch.Tensor:
        out = self.model(
            buf["ids"], attention_mask=self.mask_BS, position_ids=buf["pos"], past_key_values=self.cache,
            use_cache=True, cache_position=buf["cpos"], logits_to_keep=0, return_dict=True,
        )
        return out.logits

    @torch.no_grad()
    def __call__(self, ids_BT, attention_mask_BP, position_ids_BT, start: int) -> torch.Tensor | None:
        """The chunk `ids_BT` at cache slots `start`, ... (`start` must be the cache's count).
        `attention_mask_BP`: the mask of the first columns (the rest are ones), or None; a chunk
        with `position_ids_BT` (padded prompts) runs eagerly (None comes back)."""
        past, (B, T) = self.cache.get_seq_length(), ids_BT.shape
        Tb = chunk_bucket(T)
        if (Tb is None or position_ids_BT is not None or start != past or B != self.B
                or past + Tb > self.cache.max_cache_len or self.per_forward):
            return None
        long = self.rotary is not None and self.rotary.use_long(past + Tb)
        if self.rotary is not None and (self.rotary.use_long(past + T) != long or self.cache.rope_long != long):
            return None
        key = (Tb, long, self.cache.slot_rows is not None)
        entry = self.graphs.get(key)
        buf = entry[1] if entry is not None else self._buffers(Tb)
        buf["ids"][:, :T].copy_(ids_BT)
        buf["ids"][:, T:].zero_()
        torch.add(buf["steps"], past, out=buf["cpos"])
        buf["pos"].copy_(buf["cpos"].expand(B, Tb))
        self._set_mask(attention_mask_BP)
        if not self.enabled:
            self.graphs[key] = (None, buf, None)
            logits = self._run(buf)
        else:
            if entry is None or entry[0] is None:
                entry = self.graphs[key] = self._capture(buf, past)
            entry[0].replay()
            logits = entry[2]
        self.cache._seen = past + T  # the chunk's tokens; the padding's slots are free again
        return logits[:, :T]

    def _capture(self, buf: dict, past: int) -> tuple:
        graph, logits = capture(lambda: self._run(buf), rewind=(self.cache, past), pool=_pool_of(self))
        return graph, buf, logits


# Keys a graphed packed prefill pads to (its tokens pad to `PREFILL_BUCKETS`): prompts' shared
# prefixes add keys that the forward does not compute.
KEY_BUCKETS = PREFILL_BUCKETS + (3072, 4096, 6144, 8192, 12288, 16384)
# The most prompts of a graphed packed prefill, the padding's sequence included (a power of two).
GRAPHED_PROMPTS = 32
# The most FLOPs of a graphed packed prefill (2 per active weight per padded token). Past it the
# GPU, not the host's launches, sets an eager forward's time, and the graph's padding and its
# varlen attention (where a lone prompt takes sdpa's faster causal kernel) cost more than the
# launches it saves. On the H200: PhiMoE's lone 2000-token prompt took 69 ms replayed (2048
# tokens, 27 TFLOP) against 61 ms eagerly; 16 prompts of 1198 tokens 51 against 59 ms (1280
# tokens, 17 TFLOP); JetMoE's 2000-token prompt 27 against 37 ms (9 TFLOP).
GRAPHED_FLOPS = 24e12


def active_weights(model) -> float:
    """Weights a token multiplies in a forward: an expert tensor ([E, ...]) counts top-k of its E
    experts; the embedding (a lookup) and the LM head (a prefill keeps a few rows) not at all."""
    k = getattr(model.config, "num_experts_per_tok", 1)
    return float(sum(p.numel() * (k / p.shape[0] if p.dim() == 3 else 1) for n, p in model.named_parameters()
                     if "embed_tokens" not in n and "lm_head" not in n))


def packed_inputs(prompts: list[list[int]], shared: list[tuple[int, int, int]]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host tensors of a packed forward over the prompts' tokens past their shared prefixes
    (`shared[i][2]` tokens): the ids and positions in one row, and each prompt's last token in it."""
    ids = torch.tensor([t for prompt, (*_, p) in zip(prompts, shared) for t in prompt[p:]], dtype=torch.long)
    positions = torch.cat([torch.arange(p, len(prompt)) for prompt, (*_, p) in zip(prompts, shared)])
    last = torch.tensor([len(prompt) - p for prompt, (*_, p) in zip(prompts, shared)]).cumsum(0) - 1
    return ids, positions, last


def packed_forward(model, cache: StaticCache, prompts: list[list[int]], rows: list[int], starts: list[int],
                   shared: list[tuple[int, int, int]], window: int | None,
                   long: list[bool] | None = None) -> torch.Tensor:
    """The prompts' forward packed in one row with no padding, eagerly (`cache.PackedRows(cache,
    rows, starts, ..., shared)`): the last tokens' logits [len(prompts), V]. `long`: per prompt,
    LongRoPE's factor set (None: the longest prompt's length picks one for all)."""
    device = model.device
    ids, positions, last = packed_inputs(prompts, shared)
    rest = [len(p) - s for p, (*_, s) in zip(prompts, shared)]
    packed = PackedRows(cache, rows, starts, rest, shared, window=window)
    if long is not None:
        flags = torch.repeat_interleave(torch.tensor(long, dtype=torch.bool), torch.tensor(rest))
        packed.rope_long_BT = to_device(flags, device)[None]
    return model(to_device(ids, device)[None], position_ids=to_device(positions, device)[None],
                 past_key_values=packed, use_cache=True, logits_to_keep=to_device(last, device),
                 return_dict=True).logits[0]


def _bucket(n: int, buckets) -> int | None:
    return next((b for b in buckets if b >= n), None)


class DecodeRows(NamedTuple):
    """A decode step's inputs on the device, for a chunk's forward to carry (`GraphedPackedPrefill.mixed`,
    `cache.MixedRows`): the rows' next ids [R, 1], positions [R, 1], masks [R, S] (1 = attend),
    LongRoPE flags [R, 1] (None: no LongRoPE), the column [1] their keys go to, and the rows
    stepped (the first `rows`)."""

    ids: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    long: torch.Tensor | None
    cpos: torch.Tensor
    rows: int


def mixed_forward(model, chunk: PackedRows, ids_T: torch.Tensor, positions_T: torch.Tensor, step: DecodeRows,
                  window: int | None, long: bool = False) -> torch.Tensor:
    """The forward of a chunk (`chunk`, its tokens' `ids_T` and `positions_T` on the device) with
    the decode step of `step`'s rows riding along (`cache.MixedRows`): the rows' next-token logits
    [rows, V]. `long`: the chunk's LongRoPE factor set."""
    b, n, S = step.rows, ids_T.shape[0], step.mask.shape[1]
    mask = build_mask(step.mask[:b], step.cpos, S, window, b, queries_at_end=False)[0]
    cache = MixedRows(chunk, b, step.cpos, mask, tokens=n)
    if step.long is not None:
        cache.rope_long_BT = torch.cat([step.long.new_full((n,), long), step.long[:b, 0]])[None]
    out = model(torch.cat([ids_T, step.ids[:b, 0]])[None], position_ids=torch.cat([positions_T, step.pos[:b, 0]])[None],
                past_key_values=cache, use_cache=True, logits_to_keep=torch.arange(n, n + b, device=ids_T.device),
                return_dict=True)
    return out.logits[0]


@dataclasses.dataclass(eq=False)
class _PackedEntry:
    """One shape of `GraphedPackedPrefill`: its buffers, its cache view, and its graph once captured
    (`mixed`: per decode rows b, the same forward carrying their step, sharing the buffers)."""

    key: tuple  # (tokens, keys, prompts)
    plan: torch.Tensor  # int64: the key index [5, keys], then ids and positions [tokens], last tokens [prompts]
    cu: torch.Tensor  # int32 [2, prompts + 1]: the query and key offsets
    rows: PackedRows
    uses: int = 0
    graph: object = None
    logits: torch.Tensor | None = None
    mixed: dict = dataclasses.field(default_factory=dict)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, positions, last tokens): views of the plan buffer."""
        tokens, keys, prompts = self.key
        return self.plan[5 * keys:].split([tokens, tokens, prompts])


class GraphedPackedPrefill:
    """Continuous batching's prefill of prompts packed in one row (`cache.PackedRows`), replayed
    from a CUDA graph per shape: the computed tokens padded to a `PREFILL_BUCKETS` length, the keys
    (shared prefixes included) to a `KEY_BUCKETS` count, the prompts to a power of two up to
    `GRAPHED_PROMPTS`, within `GRAPHED_FLOPS`. A short group's forward waits on the host's
    launches, not on the GPU (a JetMoE prompt of 128 tokens 40 ms eagerly, 8 ms replayed).

    The padding is one more sequence, whose keys go nowhere, then empty sequences; the varlen
    kernel reads the offsets from a buffer, with the bucket's sizes as its bounds. A shape is
    captured on its `PREFILL_CAPTURE_AFTER`-th use, and runs eagerly, padded alike, before. A
    forward whose prompt moves its prefix within its own row runs eagerly (a capture runs the
    forward more than once, and a second run would read moved keys). Larger groups, a prompt with
    LongRoPE's long factors or a GPU without the varlen kernel: the call returns None and the caller runs
    the forward unpadded. With `enabled=False` (or on the CPU) the padded forward runs eagerly:
    the fallback the tests exercise. `mixed` runs a chunk's forward that carries a decode step
    (`mixed_forward`), with a graph of its own per shape and number of decode rows."""

    def __init__(self, model, cache: StaticCache, window: int | None, enabled: bool | None = None) -> None:
        self.model, self.cache, self.window = model, cache, window
        self.head_dim = _kv_shape(model.config)[1]
        serves = varlen_kernel_serves(model.device, model.dtype, self.head_dim)
        self.enabled = serves if enabled is None else (enabled and serves)
        self.rotary = _longrope(model)
        self.flops_per_token = 2 * active_weights(model)
        self.entries: dict[tuple, _PackedEntry] = {}
        self.pool = None

    def key(self, lengths: list[int], rest: list[int], long: list[bool] | None = None) -> tuple | None:
        """The shape of a forward of prompts of `lengths` tokens, the last `rest` of each computed
        (None: it runs unpadded, as where a prompt takes LongRoPE's long factors, `long`)."""
        tokens = _bucket(sum(rest), PREFILL_BUCKETS)
        if tokens is None or tokens * self.flops_per_token > GRAPHED_FLOPS:
            return None
        keys = _bucket(tokens + sum(lengths) - sum(rest), KEY_BUCKETS)
        prompts = 1 << len(rest).bit_length()  # a power of two with room for the padding's sequence
        if keys is None or prompts > GRAPHED_PROMPTS:
            return None
        if self.rotary is not None and (self.rotary.use_long(max(lengths)) or any(long or ())):
            return None
        return tokens, keys, prompts

    def _entry(self, key: tuple, rope_len: int) -> _PackedEntry:
        tokens, keys, prompts = key
        device = self.model.device
        plan = torch.zeros(5 * keys + 2 * tokens + prompts, dtype=torch.long, device=device)
        cu = torch.zeros(2, prompts + 1, dtype=torch.int32, device=device)
        packed = Packed.static(cu[0], cu[1], tokens, keys, rope_len, self.window)
        return _PackedEntry(key, plan, cu, PackedRows.static(self.cache, plan[:5 * keys].view(5, keys), packed, tokens))

    def _run(self, entry: _PackedEntry, rows: PackedRows) -> torch.Tensor:
        ids, positions, last = entry.inputs()
        out = self.model(ids[None], position_ids=positions[None], past_key_values=rows, use_cache=True,
                         logits_to_keep=last, return_dict=True)
        return out.logits[0]

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], rows: list[int], starts: list[int],
                 shared: list[tuple[int, int, int]], long: list[bool] | None = None) -> torch.Tensor | None:
        """The last tokens' logits [len(prompts), V] of the prompts' forward (`PackedRows(cache,
        rows, starts, ..., shared)`), or None where this shape runs unpadded (`key`)."""
        filled = self._fill(prompts, rows, starts, shared, long)
        if filled is None:
            return None
        entry, view, moves = filled
        return self._serve(entry, lambda rows_view: self._run(entry, rows_view), view, moves)[:len(prompts)]

    @torch.no_grad()
    def mixed(self, prompt: list[int], row: int, start: int, shared: tuple[int, int, int], long: bool,
              step: DecodeRows) -> torch.Tensor | None:
        """A prompt chunk's forward as `__call__` runs it, carrying the decode step of `step`'s rows
        (`mixed_forward`; one graph per shape and row count): the rows' next-token logits [rows, V],
        or None where the chunk runs unpadded."""
        filled = self._fill([prompt], [row], [start], [shared], [long])
        if filled is None:
            return None
        entry, view, moves = filled
        holder = entry.mixed.get(step.rows)
        if holder is None:
            holder = entry.mixed[step.rows] = dataclasses.replace(entry, uses=0, graph=None, logits=None, mixed={})
        ids, positions, _ = entry.inputs()
        return self._serve(holder, lambda rows_view: mixed_forward(self.model, rows_view, ids, positions, step,
                                                                   self.window), view, moves)

    def _fill(self, prompts, rows, starts, shared, long) -> tuple[_PackedEntry, PackedRows, bool] | None:
        """The entry of the prompts' shape with its buffers filled for them, the cache view an
        eager run reads, and whether a prefix moves within its own row (then nothing is replayed);
        None where this shape runs unpadded (`key`)."""
        if self.enabled and not varlen_kernel_serves(self.model.device, self.model.dtype, self.head_dim):
            self.enabled = False  # sdpa's flash kernel was turned off since: no more captures
        lengths = [len(p) for p in prompts]
        rest = [n - p for n, (*_, p) in zip(lengths, shared)]
        key = self.key(lengths, rest, long)
        if key is None:
            return None
        tokens, keys, seqs = key
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = self._entry(key, max(lengths))
        index, lens_q, lens_k = pack_plan(rows, starts, rest, shared, self.cache.max_cache_len, pad=(tokens, keys))
        ids, positions, last = packed_inputs(prompts, shared)
        extra = tokens - ids.shape[0]  # the padding's sequence: id 0 at positions 0, 1, ...
        pad_last = torch.zeros(seqs - last.shape[0], dtype=torch.long)
        plan = torch.cat([index.flatten(), ids, torch.zeros(extra, dtype=torch.long), positions, torch.arange(extra),
                          last, pad_last])
        cu = Packed.offsets(lens_q, lens_k, seqs)
        if entry.plan.is_cuda:
            plan, cu = plan.pin_memory(), cu.pin_memory()
        entry.plan.copy_(plan, non_blocking=True)
        entry.cu.copy_(cu, non_blocking=True)
        # eagerly, over the same buffers: where a graph could run, as it runs (the same kernels);
        # elsewhere with the padded forward's lengths on the host, for the per-sequence attention
        view = entry.rows
        if not self.enabled:
            packed = dataclasses.replace(view.packed, lens_q=tuple(lens_q), lens_k=tuple(lens_k),
                                         max_q=max(lens_q), max_k=max(lens_k), rope_len=max(lengths))
            view = PackedRows.static(self.cache, entry.plan[:5 * keys].view(5, keys), packed, tokens)
        # a prefix that moves within its own row (a prefix kept in place, as a prompt's later
        # chunks read theirs, reads the same keys at every run)
        moves = any(p and row == r and first != s for (row, first, p), r, s in zip(shared, rows, starts))
        return entry, view, moves

    def _serve(self, holder: _PackedEntry, run, view: PackedRows, moves: bool) -> torch.Tensor:
        """`run(cache view)`'s output: replayed from `holder`'s graph, which is captured on its
        `PREFILL_CAPTURE_AFTER`-th use, or run eagerly over `view`."""
        holder.uses += 1
        if holder.graph is None and self.enabled and holder.uses >= PREFILL_CAPTURE_AFTER and not moves:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            try:
                holder.graph, holder.logits = capture(lambda: run(holder.rows), pool=self.pool, mode="thread_local")
            except RuntimeError as e:  # out of memory too: the prefills go on eagerly, the batch does not fail
                logger.warning("continuous batching: capturing a prefill of shape %s failed (%s); prefills run "
                               "eagerly from now on", holder.key, e)
                self.enabled = False
        if holder.graph is not None and not moves:
            holder.graph.replay()
            return holder.logits
        return run(view)
