"""The expert computation seam: SwiGLU experts applied to routed tokens.

Legend: T tokens, D model dim, I expert hidden dim, E experts, K experts per token, N = T*K.
Weights are stacked `[E, out, in]`: w13_E2ID holds [gate; up], w2_EDI the down projection.

Backends (all compute the same function):
- "reference": a loop over experts (the oracle; synchronises with the host to find each expert's tokens).
- "gather": per-assignment weight gather + bmm; no host sync, for decode-sized T.
- "grouped_mm": tokens sorted by expert on device, one `torch._grouped_mm` per projection (CUDA).
- "triton": fused Triton kernels (ops/triton_moe.py): sort by expert, gather, SwiGLU and routing
  weight inside two grouped GEMMs; forward-only kernels, gradients by recomputation (CUDA).
`experts_forward(..., backend=None)` picks one (`pick_backend`).
`expert_map` / `expert_reduce` are the same seam for single-projection experts (JetMoE's attention
experts: per-(token, slot) query projection, then weighted output projection), same backends.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
from collections.abc import Callable

import torch

from . import host as _host
from .host import is_host_mapped

Act = Callable[[torch.Tensor], torch.Tensor]

# Assignments up to which the sync-free gather path is used when no backend is forced.
GATHER_MAX_ROWS = 64


def _lazy_triton(name: str) -> Callable[..., torch.Tensor]:
    """A backend entry that imports triton_moe (and triton) only when first called."""

    def backend(*args, **kwargs):
        from . import triton_moe

        return getattr(triton_moe, name)(*args, **kwargs)

    backend.__name__ = name
    return backend


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


_training_paths = [0]  # depth of training_paths() contexts


@contextlib.contextmanager
def training_paths():
    """Take the training code paths (no inference kernels, the differentiable expert backends)
    even where autograd does not record. A reentrant checkpoint runs a layer's forward under
    no_grad and later recomputes it recording: both must take the same paths, for the same
    outputs (`modeling_utils.Checkpointing`)."""
    _training_paths[0] += 1
    try:
        yield
    finally:
        _training_paths[0] -= 1


def on_training_paths() -> bool:
    return _training_paths[0] > 0


def _swiglu(h_N2I: torch.Tensor, act: Act) -> torch.Tensor:
    gate, up = h_N2I.chunk(2, dim=-1)
    return act(gate) * up


# Up to this many rows, the reference loops add an expert's rows on the CPU with `index_put_`
# (accumulating): torch's CPU `index_add_` opens a parallel region even for one row, which costs
# milliseconds a call once another process holds a core (a decode step of the tiny models: 4 ms
# against 6 us on 2 cores). The rows of one expert are distinct tokens, so both add the same values.
ADD_ROWS_PUT_MAX = 64


def _add_rows(out_TD: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """out[rows] += values, for distinct `rows`."""
    if out_TD.device.type == "cpu" and rows.numel() <= ADD_ROWS_PUT_MAX:
        return out_TD.index_put_((rows,), values, accumulate=True)
    return out_TD.index_add_(0, rows, values)


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a token's K expert terms are summed in: float32 for a half-precision output, which
    the sum rounds to once (as torch's sum over K, and Transformers' JetMoE index_add of all terms,
    round once: adding term by term would round after each, which differs from three experts on).
    Each term is first rounded to the output dtype, as the terms those sums add are."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def experts_reference(x_TD, w13_E2ID, w2_EDI, ids_TK, weights_TK, act: Act, out_dtype=None) -> torch.Tensor:
    dtype = out_dtype or x_TD.dtype
    out_TD = torch.zeros_like(x_TD, dtype=_sum_dtype(dtype))
    for e in range(w13_E2ID.shape[0]):
        tok, slot = torch.where(ids_TK == e)
        if tok.numel() == 0:
            continue
        h = _swiglu(x_TD[tok] @ w13_E2ID[e].T, act) @ w2_EDI[e].T
        _add_rows(out_TD, tok, (h * weights_TK[tok, slot, None]).to(dtype).to(out_TD.dtype))
    return out_TD.to(dtype)


def experts_gather(x_TD, w13_E2ID, w2_EDI, ids_TK, weights_TK, act: Act, out_dtype=None) -> torch.Tensor:
    T, K = ids_TK.shape
    ids_N = ids_TK.reshape(-1)
    x_ND1 = x_TD.repeat_interleave(K, dim=0).unsqueeze(-1)
    h_N2I = torch.bmm(w13_E2ID[ids_N], x_ND1).squeeze(-1)
    y_ND = torch.bmm(w2_EDI[ids_N], _swiglu(h_N2I, act).unsqueeze(-1)).squeeze(-1)
    y_ND = (y_ND * weights_TK.reshape(-1, 1)).to(out_dtype or x_TD.dtype)
    return y_ND.view(T, K, -1).sum(1)


def group_offsets(ids_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """End offset of each expert's rows once rows are sorted by expert (int32, for grouped_mm).

    Counted with scatter_add: `torch.bincount` would read the largest id back to the host on CUDA.
    """
    counts_E = torch.zeros(num_experts, dtype=torch.int32, device=ids_N.device)
    counts_E.scatter_add_(0, ids_N, torch.ones_like(ids_N, dtype=torch.int32))
    return torch.cumsum(counts_E, 0, dtype=torch.int32)


def _sort_by_expert(ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order_N, offs_E): assignments sorted by expert (stable) and each expert's end offset."""
    ids_N = ids_TK.reshape(-1)
    return torch.argsort(ids_N, stable=True), group_offsets(ids_N, num_experts)


def _combine_sorted(y_NO, order_N, weights_TK, T: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    """sum_k weights[t, k] * y[t, k], from rows in expert-sorted order, summed in `dtype`."""
    y_NO = (y_NO * weights_TK.reshape(-1)[order_N, None]).to(dtype)
    out_TO = torch.zeros(T, y_NO.shape[1], dtype=dtype, device=y_NO.device)
    return out_TO.index_add_(0, order_N // K, y_NO)


def experts_grouped_mm(x_TD, w13_E2ID, w2_EDI, ids_TK, weights_TK, act: Act, out_dtype=None) -> torch.Tensor:
    T, K = ids_TK.shape
    order_N, offs_E = _sort_by_expert(ids_TK, w13_E2ID.shape[0])
    h = torch._grouped_mm(x_TD[order_N // K], w13_E2ID.transpose(1, 2), offs=offs_E)
    y = torch._grouped_mm(_swiglu(h, act), w2_EDI.transpose(1, 2), offs=offs_E)
    return _combine_sorted(y, order_N, weights_TK, T, K, out_dtype or x_TD.dtype)


EXPERT_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": experts_reference,
    "gather": experts_gather,
    "grouped_mm": experts_grouped_mm,
    "triton": _lazy_triton("experts_triton"),
}


def _grouped_mm_serves(x_TD: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` takes these operands: bf16 (its shape function under torch.compile
    takes no other dtype, on any device), and the rows of every operand and product, and the
    weights' strides, multiples of 16 bytes (the rows of x are gathered into a fresh tensor first)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x_TD.dtype != torch.bfloat16:
        return False
    sizes = [x_TD.shape[-1]] + [n for w in weights for n in (*w.shape[-2:], *w.stride()[:-1])]
    return all(n * x_TD.element_size() % 16 == 0 for n in sizes)


def pick_backend(x_TD: torch.Tensor, ids_TK: torch.Tensor, *weights: torch.Tensor) -> str:
    """Triton on CUDA for inference; grouped_mm when autograd records on CUDA, where it takes the
    operands (the Triton kernels are forward-only and their backward would recompute; grouped_mm
    raises on rows that are not whole 16-byte units); on CUDA, gather for small T (no host sync);
    else (the CPU, which a host sync costs nothing, and large T) the reference loop, which reads
    the routed experts' weights in place where gather copies them.

    While torch.compile traces, the torch code: grouped_mm where it serves (static shapes, no host
    sync, so `fullgraph=True` holds), else gather for small T, else the reference loop (whose
    data-dependent shapes break the graph)."""
    compiling = torch.compiler.is_compiling()
    inference = not on_training_paths() and not (torch.is_grad_enabled() and x_TD.requires_grad)
    if not compiling and x_TD.is_cuda and triton_available() and inference:
        return "triton"
    if (compiling or x_TD.is_cuda) and _grouped_mm_serves(x_TD, *weights):
        return "grouped_mm"
    if (compiling or x_TD.is_cuda) and ids_TK.numel() <= GATHER_MAX_ROWS:
        return "gather"
    return "reference"


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast floating inputs to the autocast dtype when autocast is on, as autocast does for a
    matmul: the grouped and gathered products below are not autocast ops themselves."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


# The Triton kernels read expert weights held in host memory in place, over the bus, while the
# tokens are expected to route to at most this share of the experts (only the routed experts' bytes
# cross it): PhiMoE up to 6 tokens, JetMoE up to 3. Past it the weights are copied to the GPU
# first, one pass over the bus at the copy rate (in place, an expert's rows are read by each of its
# token tiles; JetMoE, 13 host layers: in place 120.6 / 138.8 / 206.8 ms for 3 / 4 / 64 tokens,
# copied 133.2 / 133.4 / 136.6: bench/host_in_place.py).
HOST_DIRECT_MAX_SHARE = 0.6


def reads_host_in_place(T: int, E: int, K: int) -> bool:
    """Whether T tokens, each routed to K distinct of E experts, are expected to route to at most
    HOST_DIRECT_MAX_SHARE of them (routing taken as uniform)."""
    return 1 - (1 - K / E) ** T <= HOST_DIRECT_MAX_SHARE


def host_weights(x_TD: torch.Tensor, ids_TK: torch.Tensor, name: str, act: Act | None, *weights: torch.Tensor):
    """`weights` as the backend `name` reads them on x's device: in place where they are there, or
    are pinned host memory that the fused Triton kernels read directly (`ops.host.is_host_mapped`;
    inference, few tokens: `reads_host_in_place`); else the copy that the decoder stack started
    ahead (`copies_ahead`), or copied to it now (asynchronously from pinned memory; autograd
    carries gradients back to them)."""
    if all(w.device == x_TD.device for w in weights):
        return weights
    ahead = _AHEAD.get()
    if ahead is not None and (copies := ahead.take(weights)) is not None:
        return copies
    direct = (
        name == "triton" and x_TD.is_cuda and reads_host_in_place(ids_TK.shape[0], weights[0].shape[0], ids_TK.shape[1])
        and all(w.device == x_TD.device or is_host_mapped(w) for w in weights)
        and not (torch.is_grad_enabled() and any(w.requires_grad for w in weights))
        and (act is None or _lazy_triton("fuses")(act))
    )
    return weights if direct else tuple(w.to(x_TD.device, non_blocking=True) for w in weights)


# ---- Host-held experts copied ahead of their layer ----------------------------------------------
_AHEAD: contextvars.ContextVar[CopiesAhead | None] = contextvars.ContextVar("moetorch_copies_ahead", default=None)
_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
# Whether a forward starts its host layers' copies ahead (`CopiesAhead`); False: each layer placed on
# the CPU copies its experts when it runs. Phi-3.5-MoE bf16 on an 80 GB H100 (3 host layers):
# batch-16 decode step 140.1 against 162.3 ms, 2048-token prefill 149.6 against 194.1 ms, the same
# peak memory (bench/host_mapped.py --ab-copy-ahead).
COPY_AHEAD = True


def _weights_key(weights) -> tuple:
    return tuple((w.data_ptr(), tuple(w.shape), w.dtype) for w in weights)


class CopiesAhead:
    """Copies to the GPU of the host-held experts of a forward's layers, each started on a side
    stream ahead of its layer (`copies_ahead`): the first when the stack starts, so that it crosses
    the bus while the GPU computes the layers before it; each next one when a layer starts after the
    copy before was taken. One copy at a time, as when each layer copied its own experts: a forward
    holds no more GPU memory than it did then."""

    def __init__(self, held: list[tuple[tuple[torch.Tensor, ...], torch.device]]) -> None:
        self.held = held  # [(a host layer's held weights, the GPU it runs on)], in the layers' order
        self.next = 0
        self.pending: tuple | None = None  # (weights' key, copies, event, device)

    def before_layer(self) -> None:
        """Start the next host layer's copy, unless one is still to be taken."""
        if self.pending is not None or self.next >= len(self.held):
            return
        weights, device = self.held[self.next]
        self.next += 1
        main = torch.cuda.current_stream(device)
        with torch.cuda.device(device):
            # allocated in the stream that reads and frees them, written by the side stream after it
            copies = tuple(torch.empty(w.shape, dtype=w.dtype, device=device) for w in weights)
            if device not in _COPY_STREAMS:
                _COPY_STREAMS[device] = torch.cuda.Stream(device)
            side = _COPY_STREAMS[device]
            side.wait_stream(main)
            with torch.cuda.stream(side):
                for c, w in zip(copies, weights):
                    c.copy_(w, non_blocking=True)
                done = torch.cuda.Event()
                done.record(side)
        self.pending = (_weights_key(weights), copies, done, device)

    def take(self, weights) -> tuple[torch.Tensor, ...] | None:
        """The copies of `weights` when they are the ones started (the reading stream waits for
        them), else None."""
        if self.pending is None or self.pending[0] != _weights_key(weights):
            return None
        _, copies, done, device = self.pending
        self.pending = None
        torch.cuda.current_stream(device).wait_event(done)
        return copies

    def close(self) -> None:
        """A copy started and not taken is waited for (a CUDA graph's capture joins the side stream)."""
        if self.pending is not None:
            torch.cuda.current_stream(self.pending[3]).wait_event(self.pending[2])
            self.pending = None

    def __enter__(self) -> CopiesAhead:
        self._token = _AHEAD.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _AHEAD.reset(self._token)
        self.close()


def copies_ahead(layers, x_BTD: torch.Tensor) -> CopiesAhead | None:
    """The decoder stack `layers`' copies of the experts of its layers placed on the CPU, to start
    ahead (`CopiesAhead`; entered, its layers' `host_weights` take them), for a forward on a GPU
    without gradients to host weights or autocast, of enough tokens that each layer would copy them
    (`reads_host_in_place`); None where there is nothing to copy ahead."""
    if not (COPY_AHEAD and _host.MAPPED_MADE) or not x_BTD.is_cuda or torch.is_autocast_enabled(x_BTD.device.type):
        return None
    T = x_BTD.shape[0] * x_BTD.shape[1]
    held = [(w, d) for w, d in held_copied(layers, T) if d is not None and d.type == "cuda"]
    return CopiesAhead(held) if held else None


def held_copied(layers, T: int) -> list[tuple[tuple[torch.Tensor, ...], torch.device]]:
    """[(weights, device)]: the host-held experts (`host_mappable`, pinned) of the layers whose
    experts a forward of T tokens copies (`reads_host_in_place`) and the device each layer runs on;
    none where a gradient would flow to them (autograd copies them, and carries it back)."""
    held = []
    for layer in layers:
        weights = tuple(layer.get_parameter(n) for n in getattr(layer, "host_mappable", ()))
        if not weights or not all(is_host_mapped(w) for w in weights):
            continue
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return []
        if not reads_host_in_place(T, weights[0].shape[0], layer.experts_per_token):
            held.append((weights, _host.module_device(layer)))
    return held


def experts_forward(
    x_TD, w13_E2ID, w2_EDI, ids_TK, weights_TK, act: Act, backend: str | None = None, combine: bool = True
) -> torch.Tensor:
    """y_T = sum_k weights[t, k] * W2[e] (act(W1[e] x_t) * W3[e] x_t), with e = ids[t, k].

    combine=False: the result may keep the K axis ([T, K, D], the terms of that sum) where the sum
    would cost a kernel of its own (the Triton backend's sorted path); a residual add (`ops.norms`)
    sums it in its own kernel. Elsewhere the result is [T, D] either way. The weights may be held
    in host memory while x is on a GPU (`host_weights`)."""
    out_dtype = x_TD.dtype  # under autocast, the float32 of the residual stream, as Transformers sums
    x_TD, w13_E2ID, w2_EDI = autocast_inputs(x_TD, w13_E2ID, w2_EDI)
    name = backend or pick_backend(x_TD, ids_TK, w13_E2ID, w2_EDI)
    if name not in EXPERT_BACKENDS:
        raise ValueError(f"unknown expert backend {name!r}; available: {sorted(EXPERT_BACKENDS)}")
    w13_E2ID, w2_EDI = host_weights(x_TD, ids_TK, name, act, w13_E2ID, w2_EDI)
    if name == "triton":  # its kernels take one dtype, the routing weights' too, and give it
        args = (x_TD, w13_E2ID, w2_EDI, ids_TK, weights_TK.to(x_TD.dtype), act)
        return EXPERT_BACKENDS[name](*args, combine=combine).to(out_dtype)
    return EXPERT_BACKENDS[name](x_TD, w13_E2ID, w2_EDI, ids_TK, weights_TK, act, out_dtype=out_dtype)


# ---- Single-projection experts: JetMoE's attention experts (MoA) ------------------------------
# An attention expert is a query projection ("map": token -> one row per (token, slot)) and an
# output projection ("reduce": rows per (token, slot) -> weighted sum per token). Attention runs
# in between, so unlike `experts_forward` the two halves are separate calls.
# Legend here: O a projection's output size, C its input size (for reduce).


def expert_map_reference(x_TD, w_EOD, ids_TK) -> torch.Tensor:
    T, K = ids_TK.shape
    out_TKO = x_TD.new_zeros(T, K, w_EOD.shape[1])
    for e in range(w_EOD.shape[0]):
        tok, slot = torch.where(ids_TK == e)
        if tok.numel() == 0:
            continue
        # .to: under autocast the matmul yields bf16 while the buffer keeps x's float32 (index_put needs one dtype)
        out_TKO[tok, slot] = (x_TD[tok] @ w_EOD[e].T).to(out_TKO.dtype)
    return out_TKO


def expert_map_gather(x_TD, w_EOD, ids_TK) -> torch.Tensor:
    T, K = ids_TK.shape
    x_ND1 = x_TD.repeat_interleave(K, dim=0).unsqueeze(-1)
    y_NO = torch.bmm(w_EOD[ids_TK.reshape(-1)], x_ND1).squeeze(-1)
    return y_NO.view(T, K, -1)


def expert_map_grouped_mm(x_TD, w_EOD, ids_TK) -> torch.Tensor:
    T, K = ids_TK.shape
    order_N, offs_E = _sort_by_expert(ids_TK, w_EOD.shape[0])
    ys_NO = torch._grouped_mm(x_TD[order_N // K], w_EOD.transpose(1, 2), offs=offs_E)
    y_NO = torch.empty_like(ys_NO).index_copy_(0, order_N, ys_NO)
    return y_NO.view(T, K, -1)


def expert_reduce_reference(h_TKC, w_EOC, ids_TK, weights_TK, out_dtype=None) -> torch.Tensor:
    T = ids_TK.shape[0]
    dtype = out_dtype or h_TKC.dtype
    out_TO = h_TKC.new_zeros(T, w_EOC.shape[1], dtype=_sum_dtype(dtype))
    for e in range(w_EOC.shape[0]):
        tok, slot = torch.where(ids_TK == e)
        if tok.numel() == 0:
            continue
        y = (h_TKC[tok, slot] @ w_EOC[e].T) * weights_TK[tok, slot, None]
        _add_rows(out_TO, tok, y.to(dtype).to(out_TO.dtype))
    return out_TO.to(dtype)


def expert_reduce_gather(h_TKC, w_EOC, ids_TK, weights_TK, out_dtype=None) -> torch.Tensor:
    T, K = ids_TK.shape
    y_NO = torch.bmm(w_EOC[ids_TK.reshape(-1)], h_TKC.reshape(T * K, -1, 1)).squeeze(-1)
    y_NO = (y_NO * weights_TK.reshape(-1, 1)).to(out_dtype or h_TKC.dtype)
    return y_NO.view(T, K, -1).sum(1)


def expert_reduce_grouped_mm(h_TKC, w_EOC, ids_TK, weights_TK, out_dtype=None) -> torch.Tensor:
    T, K = ids_TK.shape
    order_N, offs_E = _sort_by_expert(ids_TK, w_EOC.shape[0])
    y = torch._grouped_mm(h_TKC.reshape(T * K, -1)[order_N], w_EOC.transpose(1, 2), offs=offs_E)
    return _combine_sorted(y, order_N, weights_TK, T, K, out_dtype or h_TKC.dtype)


MAP_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": expert_map_reference,
    "gather": expert_map_gather,
    "grouped_mm": expert_map_grouped_mm,
    "triton": _lazy_triton("expert_map_triton"),
}
REDUCE_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": expert_reduce_reference,
    "gather": expert_reduce_gather,
    "grouped_mm": expert_reduce_grouped_mm,
    "triton": _lazy_triton("expert_reduce_triton"),
}


def expert_map(x_TD, w_EOD, ids_TK, backend: str | None = None) -> torch.Tensor:
    """y[t, k] = W[e] x_t with e = ids[t, k]: one projection per (token, slot), shape [T, K, O]."""
    x_TD, w_EOD = autocast_inputs(x_TD, w_EOD)
    name = backend or pick_backend(x_TD, ids_TK, w_EOD)
    if name not in MAP_BACKENDS:
        raise ValueError(f"unknown expert backend {name!r}; available: {sorted(MAP_BACKENDS)}")
    return MAP_BACKENDS[name](x_TD, w_EOD, ids_TK)


def expert_reduce(h_TKC, w_EOC, ids_TK, weights_TK, backend: str | None = None, combine: bool = True) -> torch.Tensor:
    """y_t = sum_k weights[t, k] * W[e] h[t, k] with e = ids[t, k]: shape [T, O] (combine=False:
    maybe [T, K, O], as in `experts_forward`)."""
    out_dtype = torch.promote_types(h_TKC.dtype, weights_TK.dtype)  # Transformers' JetMoE sums in this dtype
    h_TKC, w_EOC = autocast_inputs(h_TKC, w_EOC)
    name = backend or pick_backend(h_TKC, ids_TK, w_EOC)
    if name not in REDUCE_BACKENDS:
        raise ValueError(f"unknown expert backend {name!r}; available: {sorted(REDUCE_BACKENDS)}")
    if name == "triton":  # its kernels take one dtype, the routing weights' too, and give it
        args = (h_TKC, w_EOC, ids_TK, weights_TK.to(h_TKC.dtype))
        return REDUCE_BACKENDS[name](*args, combine=combine).to(out_dtype)
    return REDUCE_BACKENDS[name](h_TKC, w_EOC, ids_TK, weights_TK, out_dtype=out_dtype)
