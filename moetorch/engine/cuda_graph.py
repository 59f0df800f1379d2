"""One decode step as a CUDA graph.

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

import weakref

import torch

from ..cache import StaticCache


class GraphedDecodeStep:
    """Runs `model(ids_B1, attention_mask, position_ids, cache_position)` for one token per row,
    replaying a captured CUDA graph when possible. Returns the last-position logits [B, V]."""

    def __init__(self, model, cache: StaticCache, batch: int, enabled: bool | None = None) -> None:
        if not cache.is_static:
            raise TypeError("GraphedDecodeStep needs a StaticCache (shapes must not change between steps)")
        self.model, self.cache, self.B = model, cache, batch
        device = model.device
        self.enabled = (device.type == "cuda") if enabled is None else enabled
        S = cache.max_cache_len
        self.ids_B1 = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos_B1 = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cpos_1 = torch.zeros(1, dtype=torch.long, device=device)
        self.mask_BS = torch.ones(batch, S, dtype=torch.long, device=device)
        self._mask_src: object = "ones"  # what mask_BS holds: "ones", or (weakref to a mask, its version)
        self.graphs: dict[bool, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
        self.rotary = rotary if rotary is not None and rotary.longrope else None

    def _run(self) -> torch.Tensor:
        out = self.model(
            self.ids_B1, attention_mask=self.mask_BS, position_ids=self.pos_B1, past_key_values=self.cache,
            use_cache=True, cache_position=self.cpos_1, logits_to_keep=1, return_dict=True,
        )
        return out.logits[:, -1]

    def _regime(self, past: int) -> bool:
        return self.rotary is not None and self.rotary.use_long(past + 1)

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
        if long not in self.graphs:
            self._capture(long, past)
        graph, logits = self.graphs[long]
        graph.replay()
        self.cache._seen = past + 1  # what the captured forward did to the host count
        return logits

    def _capture(self, long: bool, past: int) -> None:
        # Warm up on a side stream (lazy allocations, autotuning), then capture the same step;
        # each run writes the same cache slot with the same values, so the repeats are harmless.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.cache._seen = past
                self._run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        self.cache._seen = past
        with torch.cuda.graph(graph):
            logits = self._run()
        self.graphs[long] = (graph, logits)
