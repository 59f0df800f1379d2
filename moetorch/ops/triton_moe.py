"""Fused Triton kernels for the expert seam (`ops.moe`): the "triton" backend.

Legend: T tokens, D model dim, I expert hidden dim, E experts, K experts per token, N = T*K
assignments (row n = t*K + k), O a projection's output size, C its input size (reduce),
P rows of the padded sorted layout, B row blocks of BLOCK_M rows in it.

The machinery, shared by the SwiGLU experts and JetMoE's attention experts:
1. `moe_align` sorts the N assignments by expert on the GPU with no host sync: each expert's
   assignments get a run of rows padded to a multiple of BLOCK_M, so every block of BLOCK_M rows
   belongs to one expert. It writes `sorted_P` (assignment of each row, N for a padding row) and
   `block_expert_B` (expert of each block, E past the end). Two launches (per-chunk counts, then
   placement; up to SELF_COUNT_MAX_ROWS assignments the placement counts for itself), no atomics:
   a stable, deterministic layout. The GEMM grid is sized from the host-known bound
   B = cdiv(N, BLOCK_M) + min(N, E); blocks past the end exit at once.
2. `moe_gemm` is one grouped GEMM over all experts: program (block, column tile) gathers its A rows
   by `sorted_P` inside the kernel and multiplies them by its expert's weight `[E, out, in]`.
   Epilogues: SwiGLU (gate and up tiles computed together, `act(gate) * up`), the routing weight.
   On Hopper the weight tiles, and A when it is in padded sorted order, load through tensor
   descriptors (the copy engine, TMA); from GATHER_MIN_ROWS assignments the gate/up GEMM first
   copies its token rows into that order (`gather_rows`) so that A does too. A config's PERSISTENT
   runs it as a persistent grid (a few programs per SM walking the tiles in use).
3. SwiGLU experts = align + gate/up GEMM (writes h in the padded sorted layout [P, I]) + down GEMM
   (reads h rows in order, multiplies the routing weight, writes one row per assignment [N, D]) +
   a sum over K. The sum is a separate cheap reduction rather than atomics: deterministic.
4. Decode sizes (N <= SMALL_MAX_ROWS) skip the alignment and the sum: `_moe_small_kernel` keeps all
   N rows in one tile, each program (a column tile) walks the experts present, and the down/reduce
   GEMM folds the K rows of each token in registers. Two launches per SwiGLU layer, one per map or
   reduce: at decode, launches and their gaps rather than bytes are what the alignment would cost.
   Few column tiles leave SMs idle, so a config's SPLIT_K > 1 splits each tile's (expert, K step)
   loop over SPLIT_K programs: each writes a float32 partial to a workspace and bumps the tile's
   counter; the last to arrive sums the partials in split order (deterministic), runs the epilogue
   and resets the counter to zero, so no memset is needed between launches (or CUDA-graph replays).
   Where a config also says SPLIT_E and no output row sums over experts (map, gate/up; down and
   reduce when the caller takes the K terms uncombined), each program takes whole experts instead
   and stores their rows itself: no partials, no last arriver.
5. One token (N = K), where the config entry says GEMV: `_moe_gemv_kernel` on the CUDA cores. A
   program takes a few output columns of one assignment (of all K for down/reduce) and whole dot
   products, so a thousand-odd programs fill the GPU with no split-K partials (bench/decode_chain.py
   chose it for the down, map and reduce GEMMs on the H200; gate/up stays on the tiled kernel).

Kernels are forward-only; gradients (when asked for) recompute through the grouped_mm or reference
backend inside a `torch.autograd.Function` (training picks grouped_mm directly: `ops.moe.pick_backend`).
Block sizes come from a JSON file per GPU name in `ops/configs/` (bench/tune_moe.py writes it); a GPU
with no file of its own takes the file of a GPU of its architecture, and `$MOETORCH_MOE_CONFIG`
names a file to use instead (`config_file`); else `default_config`. Triton is imported when this
module is, and this module only when the backend is first used, so moetorch imports without triton.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import weakref
from pathlib import Path

import torch
import triton
import triton.language as tl

from .activations import ACTIVATIONS
from .launch import cdiv, launcher, next_power_of_2

CONFIG_DIR = Path(__file__).parent / "configs"
# A config JSON to read in place of the GPU's own (one that bench/tune_moe.py wrote elsewhere).
CONFIG_ENV = "MOETORCH_MOE_CONFIG"
# The GPU behind each shipped file: (compute capability, SM count). Block sizes depend on the SM
# design and count, not on the memory, so a GPU with no file of its own (an H100 or GH200 where
# only the H200's ships) takes the file of its architecture with the nearest SM count.
SHIPPED_GPUS = {"NVIDIA_H200": ((9, 0), 132)}
# The 2-byte float formats: tiles of either take the same shared memory and registers, so where a
# file has entries for one only, the other reads them.
_SAME_WIDTH = {torch.float16: torch.bfloat16, torch.bfloat16: torch.float16}

logger = logging.getLogger("moetorch")

# Activation callables the kernel fuses, by the name its epilogue switches on.
_ACT_CODES = {
    ACTIVATIONS["silu"]: "silu",
    ACTIVATIONS["gelu"]: "gelu",
    ACTIVATIONS["gelu_new"]: "gelu_tanh",
    ACTIVATIONS["gelu_pytorch_tanh"]: "gelu_tanh",
    ACTIVATIONS["relu"]: "relu",
    ACTIVATIONS["tanh"]: "tanh",
    ACTIVATIONS["sigmoid"]: "sigmoid",
}


# Switches read from the environment once, at import (an environment read costs about 1-3 us of
# host time, and a prefill launches a few hundred kernels); assign these to switch at run time.
# INTERPRET: Triton's interpreter runs the kernels (TRITON_INTERPRET=1; Triton reads it when the
# kernels are defined). PDL: programmatic dependent launch (MOETORCH_PDL=0 turns it off). TMA: the
# grouped GEMMs' tensor descriptors (MOETORCH_TMA=0 turns them off).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
PDL = os.environ.get("MOETORCH_PDL", "1") != "0"
TMA = os.environ.get("MOETORCH_TMA", "1") != "0"


def _interpreting() -> bool:
    return INTERPRET


# ---- programmatic dependent launch --------------------------------------------------------------
# On Hopper a kernel launched with PDL may start while the kernel before it on the stream is still
# running: its programs get scheduled, then wait at `gdc_wait` until that kernel has completed and
# its writes are visible. That hides a launch's latency and the previous kernel's tail, which at
# decode (a dozen small kernels a layer) are a large share of the step.
#
# The rule every kernel here keeps: its first statement is `_pdl_start(PDL)`, which waits for the
# previous kernel. No kernel touches memory before it, and none lets the next kernel launch before
# it, so a kernel's reads and writes follow the previous kernel's completion, and by induction every
# earlier one's. tests/test_pdl.py checks the rule in the PTX of each kernel.
#
# When the next kernel may launch: the GEMM kernels (`_pdl_release`) once their main loop is done;
# the small kernels at their start (PDL=2) when they have at most one program per 8 SMs, else at
# their end (PDL=1). Early programs of the next kernel take SM slots while they wait: next to a
# few programs that costs nothing, but next to programs spread over many SMs they land unevenly,
# and an expert GEMM with about one program per SM then runs some SMs twice (measured on the H200:
# batch-16 PhiMoE decode lost 6% with every small kernel releasing at its start, and one JetMoE MoE
# layer at 8 tokens, whose norm + router kernel has 64 programs, 15%).


@triton.jit
def _pdl_start(PDL: tl.constexpr):
    # PDL: 0 a plain launch; 1 wait for the previous kernel; 2 wait, then let the next launch
    if PDL >= 1:
        tl.extra.cuda.gdc_wait()
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _pdl_release(PDL: tl.constexpr):
    # the next kernel may launch (a GEMM's main loop is done); after `_pdl_start`
    if PDL >= 1:
        tl.extra.cuda.gdc_launch_dependents()


@functools.cache
def _pdl_capable(device_index: int) -> bool:
    # Hopper or newer, and a Triton whose launcher takes `launch_pdl`.
    if torch.cuda.get_device_capability(device_index)[0] < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@functools.cache
def sm_count(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: a CUDA device that supports it, not under the
    interpreter, and `PDL` on (MOETORCH_PDL not set to 0)."""
    if device.type != "cuda" or INTERPRET or not PDL:
        return False
    return _pdl_capable(device.index if device.index is not None else torch.cuda.current_device())


# A small kernel releases the next one at its start when it has at most one program per this many
# SMs, or, serving one token (batch-1 decode), at most one program per SM this many: there the
# expert kernels are GEMVs of about a thousand programs, which early programs of the next kernel
# do not unbalance (graphed batch-1 decode on the H200, `bench/decode_ab.py`: PhiMoE +0.9%,
# JetMoE +1.4% against the 8-SM rule alone).
PDL_EARLY_SMS_PER_PROGRAM = 8
PDL_EARLY_ONE_TOKEN = 1


def pdl_meta(device: torch.device, programs: int = 0, tokens: int = 0) -> dict:
    """Keyword arguments for a kernel launch: the kernel's PDL constexpr and the launcher's flag.
    `programs`: a small kernel's grid size, `tokens` the rows it serves (see
    PDL_EARLY_SMS_PER_PROGRAM for when it releases the next kernel at its start); 0 for the GEMM
    kernels, which release after their main loop."""
    if not pdl_enabled(device):
        return _PDL_OFF
    sms = sm_count(device.index)
    early = 0 < programs <= sms // PDL_EARLY_SMS_PER_PROGRAM
    early = early or (PDL_EARLY_ONE_TOKEN and tokens == 1 and 0 < programs <= sms)
    return _PDL_EARLY if early else _PDL_AFTER


# pdl_meta's answers, shared: callers only unpack them into a launch's keywords
_PDL_OFF = {"PDL": 0}
_PDL_AFTER = {"PDL": 1, "launch_pdl": True}
_PDL_EARLY = {"PDL": 2, "launch_pdl": True}


# How intermediate values are rounded: to the tensors' dtype, as torch rounds each op's output.
_ROUND_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def round_code(dtype: torch.dtype) -> int:
    if dtype not in _ROUND_CODES:
        raise TypeError(f"fused kernels support float32, bfloat16 and float16, got {dtype}")
    return _ROUND_CODES[dtype]


@triton.jit
def _round(x, ROUND: tl.constexpr):
    # Round float32 values to the storage dtype and back. bf16 by bit arithmetic (round to nearest
    # even) rather than a cast: Triton's CPU interpreter truncates bf16 casts.
    if ROUND == 1:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    elif ROUND == 2:
        y = x.to(tl.float16).to(tl.float32)
    else:
        y = x
    return y


# ---- kernels -----------------------------------------------------------------------------------


@launcher
@triton.jit(do_not_specialize=["num_rows"])
def _count_kernel(ids_ptr, counts_ptr, num_rows, E_PAD: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    # Per-chunk expert histogram, counts_CE[chunk, e]: the scan over chunks happens in _place_kernel.
    pid = tl.program_id(0)
    n = pid * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + n, mask=n < num_rows, other=E_PAD).to(tl.int32)
    e_E = tl.arange(0, E_PAD)
    tl.store(counts_ptr + pid * E_PAD + e_E, tl.sum((ids[:, None] == e_E[None, :]).to(tl.int32), axis=0))


@launcher
@triton.jit(do_not_specialize=["num_rows", "num_chunks", "num_blocks"])
def _place_kernel(
    ids_ptr, counts_ptr, sorted_ptr, block_expert_ptr, num_rows, num_chunks, num_blocks,
    E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, TABLE: tl.constexpr,
    SELF_COUNT: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_start(PDL)
    # Program `pid` places the assignments of chunk `pid` (stable: chunk order, then order within
    # the chunk), writes the sentinel into the padding rows among positions [pid*CHUNK, +CHUNK),
    # and the expert of blocks [pid*CHUNK, +CHUNK). Every program rescans the small count table
    # rather than waiting on another: no atomics, no inter-program order, a deterministic layout.
    # SELF_COUNT (few assignments): each program counts all the ids itself, chunk by chunk, and no
    # _count_kernel runs before.
    pid = tl.program_id(0)
    e_E = tl.arange(0, E_PAD)
    total_E = tl.zeros((E_PAD,), dtype=tl.int32)  # assignments of each expert, in all chunks
    before_E = tl.zeros((E_PAD,), dtype=tl.int32)  # and in the chunks before this program's
    if SELF_COUNT:
        for c0 in range(0, num_rows, CHUNK):
            n_c = c0 + tl.arange(0, CHUNK)
            ids_c = tl.load(ids_ptr + n_c, mask=n_c < num_rows, other=E_PAD).to(tl.int32)
            hits_E = tl.sum((ids_c[:, None] == e_E[None, :]).to(tl.int32), axis=0)
            total_E += hits_E
            before_E += tl.where(c0 < pid * CHUNK, hits_E, 0)
    else:
        for c0 in range(0, num_chunks, TABLE):
            c = c0 + tl.arange(0, TABLE)
            counts_CE = tl.load(counts_ptr + c[:, None] * E_PAD + e_E[None, :], mask=(c < num_chunks)[:, None],
                                other=0)
            total_E += tl.sum(counts_CE, axis=0)
            before_E += tl.sum(tl.where((c < pid)[:, None], counts_CE, 0), axis=0)
    padded_E = (total_E + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends_E = tl.cumsum(padded_E, axis=0)
    starts_E = ends_E - padded_E

    n = pid * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + n, mask=n < num_rows, other=E_PAD).to(tl.int32)
    hit = (ids[:, None] == e_E[None, :]).to(tl.int32)
    rank = tl.cumsum(hit, axis=0)
    pos = tl.sum(tl.where(hit == 1, (starts_E + before_E)[None, :] + rank - 1, 0), axis=1)
    tl.store(sorted_ptr + pos, n, mask=n < num_rows)

    # Padding rows get the sentinel `num_rows`; rows an assignment fills are skipped, so no two
    # programs write one address.
    p = pid * CHUNK + tl.arange(0, CHUNK)
    owner = tl.sum(((ends_E[None, :] <= p[:, None]) & (e_E[None, :] < E)).to(tl.int32), axis=1)
    mine = e_E[None, :] == owner[:, None]
    first = tl.sum(tl.where(mine, starts_E[None, :], 0), axis=1)
    count = tl.sum(tl.where(mine, total_E[None, :], 0), axis=1)
    tl.store(sorted_ptr + p, num_rows, mask=(p < num_blocks * BLOCK_M) & (p - first >= count))

    b = pid * CHUNK + tl.arange(0, CHUNK)
    owner = tl.sum(((ends_E[None, :] <= b[:, None] * BLOCK_M) & (e_E[None, :] < E)).to(tl.int32), axis=1)
    tl.store(block_expert_ptr + b, owner, mask=b < num_blocks)


@triton.jit
def _activate(x, ACT: tl.constexpr):
    if ACT == "silu":
        y = x * tl.sigmoid(x)
    elif ACT == "gelu":
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = 0.5 * x * (2.0 * tl.sigmoid(2.0 * inner))  # 1 + tanh(u) = 2 sigmoid(2u)
    elif ACT == "relu":
        y = tl.maximum(x, 0.0)
    elif ACT == "tanh":
        y = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    else:
        y = tl.sigmoid(x)
    return y


# Row and block counts change with T and only bound loops and masks: not specialised on, so one
# compiled kernel serves every T (and every E) of a shape.
@launcher
@triton.jit(do_not_specialize=["num_rows", "num_experts", "num_blocks"])
def _moe_gemm_kernel(
    a_ptr, w_ptr, a_desc, w_desc, out_ptr, sorted_ptr, block_expert_ptr, route_w_ptr, part_ptr, count_ptr,
    num_rows, num_experts, num_blocks, n_out, k_dim, up_offset,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
    A_DIV: tl.constexpr, A_TMA: tl.constexpr, W_TMA: tl.constexpr, OUT_PADDED: tl.constexpr,
    GATED: tl.constexpr, ACT: tl.constexpr, WEIGHTED: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr, TAIL_SPLIT: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_start(PDL)
    # W_TMA: weight tiles come through the tensor-copy engine (w_desc over [E, out, in], tiles
    # [1, BLOCK_N, BLOCK_K]; rows past the end read as zeros); A_TMA likewise for A in padded
    # sorted order (A_DIV == 0; a_desc over [P, in]). Otherwise pointer loads (a_desc/w_desc unused).
    # PERSISTENT: a grid of a few programs per SM, each walking tiles pid, pid + grid, ... over the
    # blocks in use (counted from block_expert). Ungated, the tile and K loops are flattened into
    # one pipelined loop, so the next tile's first loads fly during this tile's epilogue. Gated
    # (two accumulators), the flattened loop ran 25-35% slower on the H200 (docs/performance.md);
    # there the tile loop stays a loop of its own. Else one program per tile of the host-side
    # bound, and programs past the used blocks exit at once.
    # TAIL_SPLIT (persistent, ungated; 0: off): when the tiles' last round would fill at most half
    # the programs, those tiles are instead split along K over up to TAIL_SPLIT programs each; each
    # writes its float32 partial to part_ptr, and the last to arrive at the tile's counter (which it
    # resets) sums the partials in split order and stores the tile.
    num_pid_n = tl.cdiv(n_out, BLOCK_N)
    if PERSISTENT:
        used = 0
        for b0 in range(0, num_blocks, 1024):
            b = b0 + tl.arange(0, 1024)
            used += tl.sum((tl.load(block_expert_ptr + b, mask=b < num_blocks, other=num_experts) < num_experts)
                           .to(tl.int32))
        tiles = used * num_pid_n
        programs = tl.num_programs(0)
        k_steps = tl.cdiv(k_dim, BLOCK_K)
        main = tiles
        splits = tiles * 0 + 1
        if TAIL_SPLIT:
            left = tiles % programs
            splits = tl.minimum(tl.minimum(programs // tl.maximum(left, 1), k_steps), TAIL_SPLIT)
            if left > 0 and splits > 1:
                main = tiles - left
        for tile in tl.range(tl.program_id(0), main, programs, flatten=not GATED):
            _moe_gemm_tile(
                tile, used, a_ptr, w_ptr, a_desc, w_desc, out_ptr, sorted_ptr, block_expert_ptr, route_w_ptr,
                num_rows, n_out, k_dim, up_offset,
                stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
                A_DIV, A_TMA, W_TMA, OUT_PADDED, GATED, ACT, WEIGHTED, EVEN_K, UPCAST, PRECISION,
                BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, 0, 0, k_steps,
            )
        if TAIL_SPLIT:
            unit = tl.program_id(0)
            if unit < (tiles - main) * splits:
                tail = unit // splits
                part = unit % splits
                per = tl.cdiv(k_steps, splits)
                acc = _moe_gemm_tile(
                    main + tail, used, a_ptr, w_ptr, a_desc, w_desc, out_ptr, sorted_ptr, block_expert_ptr,
                    route_w_ptr, num_rows, n_out, k_dim, up_offset,
                    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
                    A_DIV, A_TMA, W_TMA, OUT_PADDED, GATED, ACT, WEIGHTED, EVEN_K, UPCAST, PRECISION,
                    BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, 0, part * per, tl.minimum(part * per + per, k_steps),
                    STORE=False,
                )
                tile_elems = BLOCK_M * BLOCK_N
                offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
                tl.store(part_ptr + unit.to(tl.int64) * tile_elems + offs, acc)
                # as `_small_split_k_sum`: every thread's stores issued before the (single-thread,
                # gpu-scope) release of the count; the last arriver acquires the others' partials
                # and reads them through L2 (".cg"), in split order
                tl.debug_barrier()
                if tl.atomic_add(count_ptr + tail, 1, sem="acq_rel", scope="gpu") == splits - 1:
                    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    for j in range(0, splits):
                        total += tl.load(part_ptr + (tail * splits + j).to(tl.int64) * tile_elems + offs,
                                         cache_modifier=".cg")
                    pid_m, pid_n = _tile_coords(main + tail, used, num_pid_n, GROUP_M)
                    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
                    rows = tl.load(sorted_ptr + offs_p)
                    _moe_gemm_epilogue(total, offs_p, rows, pid_n * BLOCK_N, out_ptr, route_w_ptr, num_rows, n_out,
                                       stride_om, stride_on, OUT_PADDED, WEIGHTED, BLOCK_N)
                    tl.atomic_xchg(count_ptr + tail, 0)  # zero again for the next launch or replay
        _pdl_release(PDL)
    else:
        # past the last padded block: the grid is a host-side upper bound
        pid_m, _ = _tile_coords(tl.program_id(0), num_blocks, num_pid_n, GROUP_M)
        if tl.load(block_expert_ptr + pid_m) < num_experts:
            _moe_gemm_tile(
                tl.program_id(0), num_blocks, a_ptr, w_ptr, a_desc, w_desc, out_ptr, sorted_ptr,
                block_expert_ptr, route_w_ptr, num_rows, n_out, k_dim, up_offset,
                stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
                A_DIV, A_TMA, W_TMA, OUT_PADDED, GATED, ACT, WEIGHTED, EVEN_K, UPCAST, PRECISION,
                BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, PDL, 0, tl.cdiv(k_dim, BLOCK_K),
            )


@triton.jit
def _tile_coords(tile, num_blocks, num_pid_n, GROUP_M: tl.constexpr):
    # (row block, column tile) of a tile. Tile order: GROUP_M row blocks sweep all column tiles
    # together, so their A rows stay in L2 while the expert's weight columns stream past (blocks of
    # one expert are contiguous).
    per_group = GROUP_M * num_pid_n
    first_m = (tile // per_group) * GROUP_M
    group_m = tl.minimum(num_blocks - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_m, (tile % per_group) // group_m


@triton.jit
def _moe_gemm_tile(
    tile, num_blocks, a_ptr, w_ptr, a_desc, w_desc, out_ptr, sorted_ptr, block_expert_ptr, route_w_ptr,
    num_rows, n_out, k_dim, up_offset,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
    A_DIV: tl.constexpr, A_TMA: tl.constexpr, W_TMA: tl.constexpr, OUT_PADDED: tl.constexpr,
    GATED: tl.constexpr, ACT: tl.constexpr, WEIGHTED: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PDL: tl.constexpr, k_lo, k_hi, STORE: tl.constexpr = True,
):
    # One output tile [BLOCK_M rows of block pid_m, BLOCK_N columns]: `tile` in the grouped order of
    # `_tile_coords`, over K steps [k_lo, k_hi) (all of them but in a persistent kernel's split
    # tail). PDL: release the next kernel after the main loop (the persistent kernel releases after
    # its last tile instead). STORE=False: return the float32 accumulator instead of storing.
    pid_m, pid_n = _tile_coords(tile, num_blocks, tl.cdiv(n_out, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_ptr + offs_p)
    valid = rows < num_rows
    n0 = pid_n * BLOCK_N
    offs_k = tl.arange(0, BLOCK_K)
    if not A_TMA:
        # A's row: the token (n // K), the assignment (n), or the padded position itself (A_DIV == 0).
        # Padding rows read row 0 (any real row): their results are never stored.
        if A_DIV == 0:
            a_rows = offs_p.to(tl.int64)
        else:
            a_rows = (tl.where(valid, rows, 0) // A_DIV).to(tl.int64)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + (k_lo * BLOCK_K + offs_k[None, :]) * stride_ak
    if not W_TMA:
        # Columns past n_out wrap onto real ones so the inner loop needs no column mask.
        offs_n = (n0 + tl.arange(0, BLOCK_N)) % n_out
        w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn
                  + (k_lo * BLOCK_K + offs_k[:, None]) * stride_wk)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_step in range(k_lo, k_hi):
        k0 = k_step * BLOCK_K
        k_ok = offs_k < k_dim - k0
        if A_TMA:
            a = a_desc.load([pid_m * BLOCK_M, k0])
        elif EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        if W_TMA:
            # A gate tile that runs past n_out reads up rows: those columns are never stored.
            w = w_desc.load([expert, n0, k0]).reshape(BLOCK_N, BLOCK_K).T
        elif EVEN_K:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:
            # Triton's CPU interpreter multiplies bf16 dot operands as raw integers.
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if GATED:
            if W_TMA:
                w_up = w_desc.load([expert, n0 + up_offset, k0]).reshape(BLOCK_N, BLOCK_K).T
            elif EVEN_K:
                w_up = tl.load(w_ptrs + up_offset * stride_wn)
            else:
                w_up = tl.load(w_ptrs + up_offset * stride_wn, mask=k_ok[:, None], other=0.0)
            if UPCAST:
                w_up = w_up.to(tl.float32)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
        if not A_TMA:
            a_ptrs += BLOCK_K * stride_ak
        if not W_TMA:
            w_ptrs += BLOCK_K * stride_wk
    _pdl_release(PDL)

    if GATED:
        acc = _activate(acc, ACT) * acc_up
    if STORE:
        _moe_gemm_epilogue(acc, offs_p, rows, n0, out_ptr, route_w_ptr, num_rows, n_out, stride_om, stride_on,
                           OUT_PADDED, WEIGHTED, BLOCK_N)
    return acc


@triton.jit
def _moe_gemm_epilogue(
    acc, offs_p, rows, n0, out_ptr, route_w_ptr, num_rows, n_out, stride_om, stride_on,
    OUT_PADDED: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # A tile's float32 result at padded positions offs_p (assignment rows `rows`; padding: >=
    # num_rows) and columns n0...: the routing weight (WEIGHTED), then the real rows stored at their
    # padded position (OUT_PADDED) or at row n.
    valid = rows < num_rows
    if WEIGHTED:
        acc = acc * tl.load(route_w_ptr + rows, mask=valid, other=0.0).to(tl.float32)[:, None]
    if OUT_PADDED:
        o_rows = offs_p.to(tl.int64)
    else:
        o_rows = tl.where(valid, rows, 0).to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    o_ptrs = out_ptr + o_rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (cols < n_out)[None, :])


@launcher
@triton.jit(do_not_specialize=["num_rows", "num_pos"])
def _gather_rows_kernel(
    x_ptr, out_ptr, sorted_ptr, num_rows, num_pos, n_cols, stride_xm, stride_om,
    A_DIV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_start(PDL)
    # out[p] = x[sorted[p] // A_DIV] for the rows of the padded sorted layout; padding rows get
    # zeros (a GEMM multiplies them, and stores none of their results).
    p = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = p < num_pos
    rows = tl.load(sorted_ptr + p, mask=in_rows, other=num_rows)
    valid = rows < num_rows
    src = (tl.where(valid, rows, 0) // A_DIV).to(tl.int64)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        in_cols = (cols < n_cols)[None, :]
        v = tl.load(x_ptr + src[:, None] * stride_xm + cols[None, :], mask=valid[:, None] & in_cols, other=0.0)
        tl.store(out_ptr + p.to(tl.int64)[:, None] * stride_om + cols[None, :], v, mask=in_rows[:, None] & in_cols)


@triton.jit
def _small_epilogue(
    acc, acc_up, out_ptr, route_w_ptr, num_rows, n_out, pid_n, stride_om, stride_on, rows_ok,
    TOPK: tl.constexpr, SUM_K: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, WEIGHTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # `_moe_small_kernel`'s epilogue on the full float32 sums of one column tile (acc_up: the up
    # projection's when GATED, else unused): activation, routing weight, the fold over K, the store.
    # rows_ok: the rows [BLOCK_M] this program stores (without SUM_K).
    n = tl.arange(0, BLOCK_M)
    in_range = rows_ok
    if GATED:
        acc = _activate(acc, ACT) * acc_up
    if WEIGHTED:
        acc = acc * tl.load(route_w_ptr + n, mask=in_range, other=0.0).to(tl.float32)[:, None]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SUM_K:
        # row n = t*TOPK + k: padding rows are zero, so whole groups of TOPK rows sum cleanly
        y = tl.sum(tl.reshape(acc, (BLOCK_M // TOPK, TOPK, BLOCK_N)), axis=1)
        t = tl.arange(0, BLOCK_M // TOPK)
        o_ptrs = out_ptr + t.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=(t < num_rows // TOPK)[:, None] & (cols < n_out)[None, :])
    else:
        o_ptrs = out_ptr + n.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=in_range[:, None] & (cols < n_out)[None, :])


@launcher
@triton.jit(do_not_specialize=["num_rows"])
def _moe_small_kernel(
    a_ptr, w_ptr, out_ptr, ids_ptr, route_w_ptr, ws_ptr, counter_ptr,
    num_rows, n_out, k_dim, up_offset,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
    E_PAD: tl.constexpr, TOPK: tl.constexpr, A_DIV: tl.constexpr, SUM_K: tl.constexpr, GATED: tl.constexpr,
    ACT: tl.constexpr, WEIGHTED: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, SPLIT_E: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_start(PDL)
    # Decode sizes (all N assignments fit in one BLOCK_M tile): no alignment pass. A program owns a
    # column tile and walks the experts present, one flat loop over (expert, K step) so software
    # pipelining runs across expert boundaries; each step adds W[e] a for the rows routed to e
    # (other rows load zeros). SUM_K folds the K rows of a token in registers: no follow-up sum.
    # SPLIT_K > 1: program (pid_n, s) takes slice s of that flat loop and the last of the tile's
    # SPLIT_K programs to arrive sums the partials (see below). ws_ptr/counter_ptr unused when 1.
    # SPLIT_E (with SPLIT_K > 1, not SUM_K): slice s is whole experts instead (ranks
    # s*P // SPLIT_K up to (s+1)*P // SPLIT_K of the P present; with fewer than SPLIT_K present some
    # slices are empty), so each output row, which one expert computes, is complete in one program:
    # it stores its experts' rows itself, with no partials and no last arriver.
    tl.static_assert(not (SPLIT_E and SUM_K), "a split by expert stores whole rows: no fold over K")
    pid_n = tl.program_id(0)
    n = tl.arange(0, BLOCK_M)
    in_range = n < num_rows
    ids = tl.load(ids_ptr + n, mask=in_range, other=E_PAD).to(tl.int32)
    e_E = tl.arange(0, E_PAD)
    present_E = (tl.sum((ids[:, None] == e_E[None, :]).to(tl.int32), axis=0) > 0).to(tl.int32)
    rank_E = tl.cumsum(present_E, axis=0) - 1
    k_steps = tl.cdiv(k_dim, BLOCK_K)
    n_present = tl.sum(present_E, axis=0)
    total = n_present * k_steps
    rows_ok = in_range
    if SPLIT_K == 1:
        lo = 0
        hi = total
    elif SPLIT_E:
        r_lo = tl.program_id(1) * n_present // SPLIT_K
        r_hi = (tl.program_id(1) + 1) * n_present // SPLIT_K
        lo = r_lo * k_steps
        hi = r_hi * k_steps
        row_rank = tl.sum(tl.where(ids[:, None] == e_E[None, :], rank_E[None, :], 0), axis=1)
        rows_ok = in_range & (row_rank >= r_lo) & (row_rank < r_hi)
    else:
        # total depends on the routing: sliced here, on the device. A slice may be empty (lo >= hi:
        # fewer steps than SPLIT_K); its program still stores zeros as its partial and counts in.
        per = tl.cdiv(total, SPLIT_K)
        lo = tl.program_id(1) * per
        hi = tl.minimum(lo + per, total)
    a_rows = (tl.where(in_range, n, 0) // A_DIV).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % n_out
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = acc  # the up projection's sums when GATED; otherwise unused
    for step in range(lo, hi):
        j = step // k_steps
        k0 = (step - j * k_steps) * BLOCK_K
        expert = tl.sum(tl.where((present_E == 1) & (rank_E == j), e_E, 0), axis=0)
        mine = ids == expert
        k_ok = offs_k < k_dim - k0
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + (k0 + offs_k)[None, :] * stride_ak
        w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn
                  + (k0 + offs_k)[:, None] * stride_wk)
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mine[:, None], other=0.0)
            w = tl.load(w_ptrs)
        else:
            a = tl.load(a_ptrs, mask=mine[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:  # see _moe_gemm_kernel
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if GATED:
            if EVEN_K:
                w_up = tl.load(w_ptrs + up_offset * stride_wn)
            else:
                w_up = tl.load(w_ptrs + up_offset * stride_wn, mask=k_ok[:, None], other=0.0)
            if UPCAST:
                w_up = w_up.to(tl.float32)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
    _pdl_release(PDL)

    if SPLIT_K == 1 or SPLIT_E:  # each row complete in this program
        _small_epilogue(acc, acc_up, out_ptr, route_w_ptr, num_rows, n_out, pid_n, stride_om, stride_on, rows_ok,
                        TOPK, SUM_K, GATED, ACT, WEIGHTED, BLOCK_M, BLOCK_N)
    else:
        _small_split_k_sum(acc, acc_up, out_ptr, route_w_ptr, ws_ptr, counter_ptr, num_rows, n_out, pid_n,
                           stride_om, stride_on, TOPK, SUM_K, GATED, ACT, WEIGHTED, BLOCK_M, BLOCK_N, SPLIT_K)


@triton.jit
def _small_split_k_sum(
    acc, acc_up, out_ptr, route_w_ptr, ws_ptr, counter_ptr, num_rows, n_out, pid_n, stride_om, stride_on,
    TOPK: tl.constexpr, SUM_K: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, WEIGHTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # `_moe_small_kernel`'s flat split: partials, before the (nonlinear) activation, in
    # ws[s, pid_n, GATED + 1, num_rows, BLOCK_N] float32 (only the num_rows real rows are written and
    # read); the tile's last program to arrive sums them and runs the epilogue.
    n = tl.arange(0, BLOCK_M)
    in_range = n < num_rows
    halves: tl.constexpr = 2 if GATED else 1
    num_tiles = tl.num_programs(0)
    offs = n[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    rows_ok = in_range[:, None]
    part = num_rows * BLOCK_N
    mine_ptr = ws_ptr + (tl.program_id(1) * num_tiles + pid_n).to(tl.int64) * (halves * part)
    tl.store(mine_ptr + offs, acc, mask=rows_ok)
    if GATED:
        tl.store(mine_ptr + part + offs, acc_up, mask=rows_ok)
    # Every thread's stores are issued before the (single-thread, gpu-scope) release of the
    # counter increment; the tile's last arriver acquires all the others' partials through it.
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLIT_K - 1:
        # Sum in split order whichever program came last: deterministic. ".cg" reads through
        # L2 (the other SMs' writes), not this SM's non-coherent L1.
        tot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        tot_up = tot
        for s in tl.static_range(SPLIT_K):
            s_ptr = ws_ptr + (s * num_tiles + pid_n).to(tl.int64) * (halves * part)
            tot += tl.load(s_ptr + offs, mask=rows_ok, other=0.0, cache_modifier=".cg")
            if GATED:
                tot_up += tl.load(s_ptr + part + offs, mask=rows_ok, other=0.0, cache_modifier=".cg")
        _small_epilogue(tot, tot_up, out_ptr, route_w_ptr, num_rows, n_out, pid_n, stride_om, stride_on,
                        in_range, TOPK, SUM_K, GATED, ACT, WEIGHTED, BLOCK_M, BLOCK_N)
        # Back to zero for the next launch (or CUDA-graph replay): no memset per call.
        tl.atomic_xchg(counter_ptr + pid_n, 0)


@launcher
@triton.jit
def _moe_gemv_kernel(
    a_ptr, w_ptr, out_ptr, ids_ptr, route_w_ptr, n_out, k_dim, up_offset,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om,
    TOPK: tl.constexpr, A_DIV: tl.constexpr, SUM_K: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
    WEIGHTED: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    _pdl_start(PDL)
    # One token (its TOPK assignments) on the CUDA cores: a program owns BLOCK_N output columns of
    # one assignment (or, with SUM_K, of all TOPK, summed in registers) and takes each dot product
    # over the whole reduction length itself, so no split-K partials or last arriver are needed to
    # give every SM work. Weight tiles [BLOCK_N, BLOCK_K] run along the reduction axis (contiguous
    # in the checkpoint layout). A_DIV: assignment k reads row k // A_DIV of a.
    tiles = tl.cdiv(n_out, BLOCK_N)
    pid = tl.program_id(0)
    tile = pid % tiles
    n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_out
    rows = tl.minimum(n, n_out - 1).to(tl.int64)  # in range: loads need no column mask
    kk = tl.arange(0, BLOCK_K)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOPK if SUM_K else 1):
        k = j if SUM_K else pid // tiles
        expert = tl.load(ids_ptr + k).to(tl.int64)
        a_row = a_ptr + (k // A_DIV).to(tl.int64) * stride_am
        w_rows = w_ptr + expert * stride_we + rows[:, None] * stride_wn
        part = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        part_up = part  # the up projection's products when GATED; otherwise unused
        for k0 in range(0, k_dim, BLOCK_K):
            a_ptrs = a_row + (k0 + kk) * stride_ak
            w_ptrs = w_rows + (k0 + kk)[None, :] * stride_wk
            if EVEN_K:
                a = tl.load(a_ptrs).to(tl.float32)
                w = tl.load(w_ptrs)
            else:
                k_ok = kk < k_dim - k0
                a = tl.load(a_ptrs, mask=k_ok, other=0.0).to(tl.float32)
                w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            part += w.to(tl.float32) * a[None, :]
            if GATED:
                if EVEN_K:
                    w_up = tl.load(w_ptrs + up_offset * stride_wn)
                else:
                    w_up = tl.load(w_ptrs + up_offset * stride_wn, mask=k_ok[None, :], other=0.0)
                part_up += w_up.to(tl.float32) * a[None, :]
        acc = tl.sum(part, axis=1)
        if GATED:
            acc = _activate(acc, ACT) * tl.sum(part_up, axis=1)
        if WEIGHTED:
            acc = acc * tl.load(route_w_ptr + k).to(tl.float32)
        if SUM_K:
            total += acc
        else:
            tl.store(out_ptr + k.to(tl.int64) * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)
    if SUM_K:
        tl.store(out_ptr + n, total.to(out_ptr.dtype.element_ty), mask=n_ok)


# ---- configs -----------------------------------------------------------------------------------

CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
# Optional keys: only `moe_gemm_small` reads SPLIT_K (1 when absent), SPLIT_E (split by expert,
# see `splits_by_expert`) and GEMV (at one token, the CUDA-core kernel `_moe_gemv_kernel` when true;
# at more tokens such an entry's column slices are too narrow for the matrix units, and the default
# block sizes serve); the sorted path ignores them.
# Only the sorted path reads PERSISTENT: programs per SM of a persistent grid (0 or absent: one
# program per tile; on a CPU, under the interpreter, that many programs in all).
OPTIONAL_CONFIG_KEYS = ("SPLIT_K", "SPLIT_E", "GEMV", "PERSISTENT")
BOOL_CONFIG_KEYS = ("SPLIT_E", "GEMV")


def config_key(op: str, E: int, n_out: int, k_dim: int, dtype: torch.dtype) -> str:
    """The JSON key of one GEMM shape: op in {gate_up, down, map, reduce}, its output columns
    (per half for gate_up) and its reduction length."""
    return f"{op},E={E},N={n_out},K={k_dim},{str(dtype).removeprefix('torch.')}"


def default_config(num_rows: int, dtype: torch.dtype, gated: bool = False) -> dict:
    """Block sizes when no tuned entry matches: a decode regime (few rows per expert: small BLOCK_M,
    many weight columns in flight) and a prefill regime (large tiles for the matrix units)."""
    if num_rows <= 32:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    elif num_rows <= 256:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    elif num_rows <= 2048:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3 if gated else 4)
    if torch.empty((), dtype=dtype).element_size() == 4:
        # fp32 tiles take twice the shared memory per stage.
        cfg.update(BLOCK_K=32, num_stages=2)
    return cfg


# Decode sizes with no tuned entry on a CUDA GPU take `decode_config` (block sizes shaped by the
# GEMM and the SM count) instead of `default_config`'s fixed ones. 0 turns it off (A/B runs).
SHAPED_DEFAULTS = 1


def decode_config(op: str, n_out: int, k_dim: int, T: int, num_rows: int, sms: int) -> dict:
    """Block sizes for the alignment-free kernel (num_rows <= SMALL_MAX_ROWS) of a 2-byte float
    GEMM with no tuned entry, following what the tuners picked on the H200 (ops/configs):
    - at one token, the ungated GEMMs on the CUDA-core kernel (GEMV), BLOCK_N (2 to 8) columns a
      program so that about 8 programs an SM cover the outputs (down and reduce sum their K rows
      in one program, map keeps one per assignment);
    - else 64-column tiles; where those number at most half the SMs, each tile's loop is split over
      up to 8 programs (SPLIT_K), up to two programs an SM.
    On the H200's own shapes this reproduces the tuned GEMV widths and splits (tests/test_triton_moe.py)."""
    if T == 1 and op != "gate_up":
        outputs = n_out * (1 if op in ("down", "reduce") else num_rows)
        block_n = min(8, max(2, next_power_of_2(max(1, round(outputs / (8 * sms))))))
        return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=min(1024, next_power_of_2(k_dim)), GROUP_M=1,
                    num_warps=4, num_stages=2, GEMV=True)
    cfg = dict(BLOCK_M=16 if num_rows <= 16 else 32, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    tiles, split = cdiv(n_out, cfg["BLOCK_N"]), 1
    if 2 * tiles <= sms:
        while split < 8 and tiles * split <= sms:
            split *= 2
    cfg["SPLIT_K"] = split
    return cfg


def _device_file(device: torch.device) -> Path | None:
    if device.type != "cuda":
        return None
    return config_file(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def config_file(device_index: int | None = None) -> Path | None:
    """The block-size file the expert kernels read on a CUDA device: the file `$MOETORCH_MOE_CONFIG`
    names; else this GPU's own (`ops/configs/<name>.json`, spaces as underscores); else the shipped
    file of a GPU of the same compute capability with the nearest SM count (logged); else None,
    and every GEMM takes `decode_config` or `default_config` (logged as a warning). Decided once
    per device and process."""
    override = os.environ.get(CONFIG_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"${CONFIG_ENV}={override}: no such file (the expert kernels' block sizes)")
        return path
    if device_index is None:
        device_index = torch.cuda.current_device()
    name = torch.cuda.get_device_name(device_index)
    own = CONFIG_DIR / (name.replace(" ", "_") + ".json")
    if own.is_file():
        return own
    props = torch.cuda.get_device_properties(device_index)
    arch, sms = (props.major, props.minor), props.multi_processor_count
    kin = [(abs(n - sms), stem) for stem, (cap, n) in SHIPPED_GPUS.items()
           if cap == arch and (CONFIG_DIR / f"{stem}.json").is_file()]
    if kin:
        path = CONFIG_DIR / f"{min(kin)[1]}.json"
        logger.info("moetorch: no expert-kernel block sizes tuned on %s; using %s (sm_%d%d, %d SMs here). "
                    "bench/tune_moe.py tunes this GPU's own.", name, path.name, *arch, sms)
        return path
    logger.warning("moetorch: no expert-kernel block sizes for %s (sm_%d%d) or its architecture: the expert "
                   "kernels use untuned ones (decode_config, default_config). bench/tune_moe.py writes a file for "
                   "this GPU; $%s names one to use.", name, *arch, CONFIG_ENV)
    return None


@functools.cache
def _load_configs(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        tables = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not a JSON config file ({e})") from e
    check_configs(tables, str(p))
    return tables


def check_configs(tables, where: str) -> None:
    """Raise a ValueError naming the file, entry, token bucket and key of the first bad value in a
    config table ({config_key: {bucket: config}}): block sizes and warps are powers of two, stages,
    GROUP_M and SPLIT_K positive integers, PERSISTENT a count of programs per SM (0: off), GEMV and
    SPLIT_E bools, and no key outside CONFIG_KEYS and OPTIONAL_CONFIG_KEYS."""
    if not isinstance(tables, dict):
        raise ValueError(f"{where}: expected an object of config entries, got {type(tables).__name__}")
    for key, table in tables.items():
        if not isinstance(table, dict):
            raise ValueError(f"{where}: {key}: expected an object of token buckets")
        for bucket, cfg in table.items():
            at = f"{where}: {key}, bucket {bucket!r}"
            if not bucket.isdigit() or int(bucket) < 1:
                raise ValueError(f"{at}: a token bucket must be a positive integer")
            if not isinstance(cfg, dict):
                raise ValueError(f"{at}: expected an object of block sizes")
            missing = [k for k in CONFIG_KEYS if k not in cfg]
            unknown = [k for k in cfg if k not in CONFIG_KEYS + OPTIONAL_CONFIG_KEYS]
            if missing or unknown:
                raise ValueError(f"{at}: missing keys {missing}, unknown keys {unknown}")
            for k, value in cfg.items():
                if k in BOOL_CONFIG_KEYS:
                    ok = isinstance(value, bool)
                else:
                    least = 0 if k == "PERSISTENT" else 1
                    ok = isinstance(value, int) and not isinstance(value, bool) and value >= least
                    ok = ok and (not k.startswith(("BLOCK_", "num_warps")) or value & (value - 1) == 0)
                if not ok:
                    rule = ("true or false" if k in BOOL_CONFIG_KEYS else "an integer >= 0" if k == "PERSISTENT"
                            else "a power of two" if k.startswith(("BLOCK_", "num_warps")) else "a positive integer")
                    raise ValueError(f"{at}: {k} must be {rule}, got {value!r}")


def get_config(op: str, E: int, n_out: int, k_dim: int, dtype: torch.dtype, T: int, num_rows: int,
               device: torch.device) -> dict:
    """Tuned block sizes for one GEMM at T tokens (num_rows = T*K assignments): the entry of the
    nearest T bucket (in log scale) in this GPU's JSON file (`config_file`), for this dtype or the
    other 2-byte float format; else, for a 2-byte float at decode sizes on a CUDA GPU,
    `decode_config`; else `default_config`. A new dict."""
    path = _device_file(device)
    cuda = device is not None and device.type == "cuda" and not INTERPRET
    sms = sm_count(device.index) if cuda and SHAPED_DEFAULTS else 0
    return dict(_lookup(str(path) if path else "", op, E, n_out, k_dim, dtype, T, num_rows, sms))


# get_config's answers, remembered: an eager prefill asks four times a layer, and the lookup took
# 38 us of host time a call on an H200 machine's host (2.3 us remembered; bench/host_profile.py),
# where the GPU waits on the host at 2048 tokens.
@functools.lru_cache(maxsize=4096)
def _lookup(path: str, op: str, E: int, n_out: int, k_dim: int, dtype: torch.dtype, T: int, num_rows: int,
            sms: int = 0) -> dict:
    tables = _load_configs(path) if path else {}
    table = tables.get(config_key(op, E, n_out, k_dim, dtype))
    if not table and dtype in _SAME_WIDTH:
        table = tables.get(config_key(op, E, n_out, k_dim, _SAME_WIDTH[dtype]))
    if table:
        return table[min(table, key=lambda b: abs(math.log2(int(b)) - math.log2(max(T, 1))))]
    if sms and dtype in _SAME_WIDTH and use_small_kernel(num_rows, num_rows // max(T, 1)):
        return decode_config(op, n_out, k_dim, T, num_rows, sms)
    return default_config(num_rows, dtype, gated=op == "gate_up")


# ---- launchers ---------------------------------------------------------------------------------


def num_blocks_bound(num_rows: int, num_experts: int, block_m: int) -> int:
    """Host-side upper bound on padded blocks: each non-empty expert wastes less than one block."""
    return cdiv(num_rows, block_m) + min(num_rows, num_experts)


# Assignments up to which the placement kernel counts the ids itself (each program reads all of
# them: a few KB) instead of a count kernel launching first: one launch fewer per alignment, which
# an eager prefill waits on the host for (~40 us a launch on an H200 machine's host,
# bench/host_profile.py). At 8192 assignments the two launches ran the layer faster on the GPU
# (one PhiMoE MoE layer at 4096 tokens 2.32 against 2.43 ms, h200-2026-11-30-self-count.txt).
SELF_COUNT_MAX_ROWS = 4096


def moe_align(
    ids_N: torch.Tensor, num_experts: int, block_m: int, chunk: int = 256, self_count_max: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort assignments by expert into blocks of `block_m` rows, on the device, without host sync.

    Returns `sorted_P` (int32 [B*block_m]: the assignment in each row, `N` in padding rows; stable
    within an expert) and `block_expert_B` (int32 [B]: each block's expert, `num_experts` for blocks
    past the end), with B = `num_blocks_bound(N, E, block_m)`. Two launches: per-chunk expert counts,
    then placement (each program scans the count table itself); one, placement counting the ids
    itself, when N is at most `self_count_max` (default SELF_COUNT_MAX_ROWS) or one chunk.
    """
    N = ids_N.numel()
    B = num_blocks_bound(N, num_experts, block_m)
    E_PAD = next_power_of_2(num_experts)
    ids_N = ids_N.contiguous()
    sorted_P = torch.empty(B * block_m, dtype=torch.int32, device=ids_N.device)
    block_expert_B = torch.empty(B, dtype=torch.int32, device=ids_N.device)
    num_chunks = cdiv(N, chunk)
    self_count = num_chunks <= 1 or N <= (SELF_COUNT_MAX_ROWS if self_count_max is None else self_count_max)
    if not self_count:
        counts_CE = torch.empty(num_chunks, E_PAD, dtype=torch.int32, device=ids_N.device)
        _count_kernel[(num_chunks,)](ids_N, counts_CE, N, E_PAD=E_PAD, CHUNK=chunk, num_warps=4,
                                       **pdl_meta(ids_N.device, num_chunks))
    else:
        counts_CE = block_expert_B  # unused
    # positions (B * block_m >= N) outnumber assignments and blocks: they size the grid
    _place_kernel[(cdiv(B * block_m, chunk),)](
        ids_N, counts_CE, sorted_P, block_expert_B, N, num_chunks, B,
        E=num_experts, E_PAD=E_PAD, BLOCK_M=block_m, CHUNK=chunk, TABLE=64, SELF_COUNT=self_count,
        num_warps=8,  # 8: no spills
        **pdl_meta(ids_N.device, cdiv(B * block_m, chunk)),
    )
    return sorted_P, block_expert_B


# ---- tensor-copy engine (TMA) ---------------------------------------------------------------------
# On Hopper the sorted-path GEMM loads its weight tiles, and A when it is in padded sorted order,
# through tensor descriptors: the copy engine moves whole tiles into shared memory while the warps
# multiply, where pointer loads spend their issue slots on addresses. Measured on the H200
# (bench/prefill_ab.py, bench/results/h200-2026-11-29-prefill-ab.json): 8192-token prefill, PhiMoE
# 35.5k -> 37.8k tok/s, JetMoE 75.9k -> 80.9k. Building descriptors costs host time per launch,
# which shows only where a prefill waits on the host anyway (JetMoE at 2048 tokens).

# Assignments from which the gate/up GEMM gathers its token rows into padded sorted order first
# (one copy of N rows) so A comes through the copy engine too; below it the in-kernel gather wins.
GATHER_MIN_ROWS = 2048


@functools.cache
def _tma_capable(device_index: int) -> bool:
    if torch.cuda.get_device_capability(device_index)[0] < 9:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


def tma_enabled(device: torch.device) -> bool:
    """Whether the sorted-path GEMM on `device` loads tiles through tensor descriptors: a Hopper or
    newer CUDA device, not under the interpreter, `TMA` on (MOETORCH_TMA not set to 0)."""
    if device.type != "cuda" or INTERPRET or not TMA:
        return False
    return _tma_capable(device.index if device.index is not None else torch.cuda.current_device())


def _tma_descriptor(t: torch.Tensor, block: list[int]):
    """A tensor descriptor of `t` with tiles `block`, or None where the copy engine cannot take it:
    a strided last dimension, strides or base not 16-byte aligned, a tile side over 256 elements or
    a tile row under 16 bytes."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    size = t.element_size()
    if (t.dtype not in (torch.bfloat16, torch.float16, torch.float32) or t.stride(-1) != 1
            or t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1])
            or max(block) > 256 or block[-1] * size < 16):
        return None
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


def moe_gemm(
    a: torch.Tensor, w_EOC: torch.Tensor, out: torch.Tensor, sorted_P: torch.Tensor,
    block_expert_B: torch.Tensor, num_rows: int, cfg: dict, *, a_div: int, out_padded: bool = False,
    n_out: int | None = None, act: str | None = None, route_w_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """One grouped GEMM over all experts: out[row] = W[e] a[row'] for each sorted row of expert e.

    a_div: A's row is the assignment n // a_div (K: token rows, 1: assignment rows), or the padded
    position when 0. out_padded: write at the padded position (else at row n). act: fuse SwiGLU
    (W's first `n_out` rows are the gate, the next `n_out` the up projection). route_w_N: multiply
    row n by it. Where `tma_enabled`, W (and A when a_div == 0) load through tensor descriptors.
    """
    E, O, C = w_EOC.shape
    n_out = n_out or O
    B = block_expert_B.numel()
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles, per_sm = B * cdiv(n_out, BN), cfg.get("PERSISTENT", 0)
    grid = (min(tiles, per_sm * (sm_count(a.device.index) if a.is_cuda else 1)) if per_sm else tiles,)
    tail = TAIL_SPLIT if per_sm and act is None and grid[0] > 1 else 0
    if tail:
        parts = torch.empty(grid[0] * BM * BN, dtype=torch.float32, device=a.device)
        counts = arrival_counters(a.device, grid[0])
    else:
        parts = counts = a
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    w_desc = a_desc = None
    if tma_enabled(a.device):
        w_desc = _tma_descriptor(w_EOC, [1, BN, BK])
        a_desc = _tma_descriptor(a, [BM, BK]) if a_div == 0 else None
    _moe_gemm_kernel[grid](
        a, w_EOC, a if a_desc is None else a_desc, w_EOC if w_desc is None else w_desc, out, sorted_P,
        block_expert_B, route_w_N if route_w_N is not None else a, parts, counts,
        num_rows, E, B, n_out, C, n_out if act else 0,
        a.stride(0), a.stride(1), w_EOC.stride(0), w_EOC.stride(1), w_EOC.stride(2), out.stride(0), out.stride(1),
        A_DIV=a_div, A_TMA=a_desc is not None, W_TMA=w_desc is not None, OUT_PADDED=out_padded,
        GATED=act is not None, ACT=act or "none", WEIGHTED=route_w_N is not None, EVEN_K=C % BK == 0,
        UPCAST=_interpreting(), PRECISION=precision, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        GROUP_M=cfg["GROUP_M"], PERSISTENT=bool(per_sm), TAIL_SPLIT=tail, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **pdl_meta(a.device),
    )
    return out


# Most programs a tile of a persistent, ungated grouped GEMM's last round is split over along K (0:
# no split). A last round that fills at most half the grid otherwise leaves the other programs
# idle for a whole tile: at 4096 tokens the attention experts' 128 x 256 tiles number about
# 68 x 8 = 544 over 132 programs, a fifth round of 16 tiles.
TAIL_SPLIT = 4


def gather_rows(x: torch.Tensor, sorted_P: torch.Tensor, num_rows: int, a_div: int) -> torch.Tensor:
    """x's rows in padded sorted order: out[p] = x[sorted_P[p] // a_div], zeros in padding rows."""
    x = x if x.stride(1) == 1 else x.contiguous()
    P, C = sorted_P.numel(), x.shape[1]
    out = torch.empty(P, C, dtype=x.dtype, device=x.device)
    block_r = 16
    grid = (cdiv(P, block_r),)
    _gather_rows_kernel[grid](
        x, out, sorted_P, num_rows, P, C, x.stride(0), out.stride(0), A_DIV=a_div, BLOCK_R=block_r,
        BLOCK_C=min(1024, next_power_of_2(C)), num_warps=4, **pdl_meta(x.device, grid[0]),
    )
    return out


# Assignments up to which the alignment-free small-T kernel runs (all of them in one row tile).
SMALL_MAX_ROWS = 32


def use_small_kernel(num_rows: int, K: int) -> bool:
    """Decode sizes take `_moe_small_kernel`: N rows in one tile, K a power of two (folded in registers)."""
    return 0 < num_rows <= SMALL_MAX_ROWS and K & (K - 1) == 0


# Arrival counters by (device, stream), and the buffers they outgrew (see arrival_counters).
_ARRIVAL_COUNTERS: dict[tuple[str, int], torch.Tensor] = {}
_RETIRED_COUNTERS: list[torch.Tensor] = []


def arrival_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Arrival counters (int32, at least `tiles`) for kernels whose programs meet at a last arriver
    (split-K and the persistent GEMM's split last round here, the norm + router kernel in
    ops.triton_fused), launched on the current stream of
    `device`: zeros between launches (each last arriver resets its own), so allocated and zeroed
    once per (device, stream), and again only to grow. Kernels on one stream run one after another,
    so they share the buffer. A grown-out buffer stays referenced: a CUDA graph captured with it
    keeps using it."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    counters = _ARRIVAL_COUNTERS.get(key)
    if counters is None or counters.numel() < tiles:
        if counters is not None:
            _RETIRED_COUNTERS.append(counters)
        counters = torch.zeros(max(256, next_power_of_2(tiles)), dtype=torch.int32, device=device)
        _ARRIVAL_COUNTERS[key] = counters
    return counters


# The alignment-free kernel's split where a config says SPLIT_E and no output row sums over experts
# (no `sum_k`): whole experts a program, each storing its own rows, instead of the flat (expert,
# K step) loop cut evenly and summed by a last arriver. 0 turns it off everywhere (A/B runs).
SPLIT_BY_EXPERT = 1


def splits_by_expert(cfg: dict) -> bool:
    """Whether `moe_gemm_small` with this config splits by expert once nothing sums over K: the
    down and reduce GEMMs then leave their K terms to the caller (combine=False), as the sorted path
    does, rather than fold them through split-K partials."""
    return (bool(SPLIT_BY_EXPERT) and bool(cfg.get("SPLIT_E")) and cfg.get("SPLIT_K", 1) > 1
            and not cfg.get("GEMV"))


def moe_gemm_small(
    a: torch.Tensor, w_EOC: torch.Tensor, out: torch.Tensor, ids_N: torch.Tensor, K: int, cfg: dict, *,
    a_div: int, sum_k: bool = False, n_out: int | None = None, act: str | None = None,
    route_w_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """`moe_gemm` for N <= SMALL_MAX_ROWS without the alignment: A's row is n // a_div; out gets one
    row per assignment, or with `sum_k` one row per token (the sum over its K assignments).
    cfg["SPLIT_K"] (default 1) splits each column tile's (expert, K step) loop over that many programs
    (without `sum_k` and where `splits_by_expert`: whole experts a program); cfg["GEMV"] runs one token
    (N = K) through `moe_gemv` instead."""
    E, O, C = w_EOC.shape
    n_out = n_out or O
    N = ids_N.numel()
    if cfg.get("GEMV"):
        if N == K:
            return moe_gemv(a, w_EOC, out, ids_N, K, cfg, a_div=a_div, sum_k=sum_k, n_out=n_out, act=act,
                            route_w_N=route_w_N)
        cfg = default_config(N, a.dtype, gated=act is not None)
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    split_k = cfg.get("SPLIT_K", 1)
    if split_k < 1:
        raise ValueError(f"SPLIT_K must be a positive integer, got {split_k}")
    tiles = cdiv(n_out, cfg["BLOCK_N"])
    split_e = not sum_k and splits_by_expert(cfg)
    if split_k > 1 and not split_e:
        # float32 partials ws[s, tile, gate/up, row, column]; never zeroed: every program writes its own
        ws = torch.empty(split_k * tiles * (2 if act else 1) * N * cfg["BLOCK_N"], dtype=torch.float32,
                         device=a.device)
        counters = arrival_counters(a.device, tiles)
    else:
        ws = counters = out  # unused
    _moe_small_kernel[(tiles, split_k)](
        a, w_EOC, out, ids_N, route_w_N if route_w_N is not None else a, ws, counters,
        N, n_out, C, n_out if act else 0,
        a.stride(0), a.stride(1), w_EOC.stride(0), w_EOC.stride(1), w_EOC.stride(2), out.stride(0), out.stride(1),
        E_PAD=next_power_of_2(E), TOPK=K, A_DIV=a_div, SUM_K=sum_k, GATED=act is not None, ACT=act or "none",
        WEIGHTED=route_w_N is not None, EVEN_K=C % cfg["BLOCK_K"] == 0, UPCAST=_interpreting(),
        PRECISION=precision, BLOCK_M=max(16, next_power_of_2(N)), BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], SPLIT_K=split_k, SPLIT_E=split_e, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **pdl_meta(a.device),
    )
    return out


def moe_gemm_small_weighted(h_NC, w_EOC, ids_N, K: int, cfg: dict, route_w_N, combine: bool = True) -> torch.Tensor:
    """The down or reduce GEMM at decode sizes: sum_k route_w[n] W[ids[n]] h[n] per token, [T, O]
    (the K terms folded in registers), or with combine=False where the config splits by expert
    (`splits_by_expert`) the K weighted terms themselves, [T, K, O], for the caller to sum."""
    N, O = ids_N.numel(), w_EOC.shape[1]
    if not combine and splits_by_expert(cfg):
        y_NO = torch.empty(N, O, dtype=h_NC.dtype, device=h_NC.device)
        return moe_gemm_small(h_NC, w_EOC, y_NO, ids_N, K, cfg, a_div=1, route_w_N=route_w_N).view(N // K, K, O)
    y_TO = torch.empty(N // K, O, dtype=h_NC.dtype, device=h_NC.device)
    return moe_gemm_small(h_NC, w_EOC, y_TO, ids_N, K, cfg, a_div=1, sum_k=True, route_w_N=route_w_N)


def moe_gemv(
    a: torch.Tensor, w_EOC: torch.Tensor, out: torch.Tensor, ids_N: torch.Tensor, K: int, cfg: dict, *,
    a_div: int, sum_k: bool = False, n_out: int | None = None, act: str | None = None,
    route_w_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """`moe_gemm_small` for one token (N = K assignments) on the CUDA cores (`_moe_gemv_kernel`):
    a program per BLOCK_N output columns of an assignment (all K with `sum_k`)."""
    O, C = w_EOC.shape[1:]
    n_out = n_out or O
    N = ids_N.numel()
    if N != K:
        raise ValueError(f"moe_gemv serves one token: {N} assignments for {K} experts per token")
    tiles = cdiv(n_out, cfg["BLOCK_N"])
    _moe_gemv_kernel[(tiles * (1 if sum_k else N),)](
        a, w_EOC, out, ids_N, route_w_N if route_w_N is not None else a, n_out, C, n_out if act else 0,
        a.stride(0), a.stride(1), w_EOC.stride(0), w_EOC.stride(1), w_EOC.stride(2), out.stride(0),
        TOPK=K, A_DIV=a_div, SUM_K=sum_k, GATED=act is not None, ACT=act or "none",
        WEIGHTED=route_w_N is not None, EVEN_K=C % cfg["BLOCK_K"] == 0, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_meta(a.device),
    )
    return out


@launcher
@triton.jit
def _sum_k_kernel(y_ptr, out_ptr, n_cols, K: tl.constexpr, BLOCK: tl.constexpr, ROUND: tl.constexpr,
                  PDL: tl.constexpr):
    _pdl_start(PDL)
    # Program (t, column block): out[t] = sum_k y[t*K + k] over those columns, in float32, rounded
    # once (torch's sum over a bf16 axis), k in order.
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(K):
        acc += tl.load(y_ptr + (t * K + k) * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * n_cols + cols, _round(acc, ROUND).to(out_ptr.dtype.element_ty), mask=ok)


def _sum_over_k(y_NO: torch.Tensor, T: int, K: int) -> torch.Tensor:
    """[T*K, O] (contiguous, k fastest) summed over k: [T, O]. One pass at the copy rate, where
    torch's sum over a middle axis of 2 runs at a third of it."""
    if K == 1:
        return y_NO.view(T, -1)
    O = y_NO.shape[1]
    out = torch.empty(T, O, dtype=y_NO.dtype, device=y_NO.device)
    block = min(2048, next_power_of_2(O))
    if T:
        grid = (T, cdiv(O, block))
        _sum_k_kernel[grid](y_NO, out, O, K=K, BLOCK=block, ROUND=round_code(y_NO.dtype),
                            num_warps=4 if block >= 1024 else 1, **pdl_meta(y_NO.device, grid[0] * grid[1], T))
    return out


def experts_fused(
    x_TD, w13_E2ID, w2_EDI, ids_TK, weights_TK, act: str, configs=None, small=None, combine: bool = True
) -> torch.Tensor:
    """SwiGLU experts through the fused kernels (forward only). `configs`: (gate_up, down) block
    sizes, else tuned or default ones; the down GEMM uses gate_up's BLOCK_M (one alignment).
    `small`: force (True) or forbid (False) the alignment-free kernel; by default N decides.
    combine=False: the sorted path returns [T, K, D], each expert's weighted output, and leaves the
    sum over K to the caller's residual add (`ops.norms`); so does the small kernel where its down
    GEMM splits by expert (`splits_by_expert`), and otherwise it sums in registers."""
    T, K = ids_TK.shape
    E, I2, D = w13_E2ID.shape
    I, N = I2 // 2, T * K
    if N == 0:
        return x_TD.new_zeros(T, D)
    if configs is None:
        configs = (get_config("gate_up", E, I, D, x_TD.dtype, T, N, x_TD.device),
                   get_config("down", E, D, I, x_TD.dtype, T, N, x_TD.device))
    up_cfg, down_cfg = configs
    ids_N, route_w_N = ids_TK.reshape(-1).contiguous(), weights_TK.reshape(-1).contiguous()
    if use_small_kernel(N, K) if small is None else small:
        h_NI = torch.empty(N, I, dtype=x_TD.dtype, device=x_TD.device)
        moe_gemm_small(x_TD, w13_E2ID, h_NI, ids_N, K, up_cfg, a_div=K, n_out=I, act=act)
        return moe_gemm_small_weighted(h_NI, w2_EDI, ids_N, K, down_cfg, route_w_N, combine)
    down_cfg = {**down_cfg, "BLOCK_M": up_cfg["BLOCK_M"]}
    sorted_P, block_expert_B = moe_align(ids_N, E, up_cfg["BLOCK_M"])
    a, a_div = x_TD, K
    if N >= GATHER_MIN_ROWS and tma_enabled(x_TD.device):  # A through the copy engine too
        a, a_div = gather_rows(x_TD, sorted_P, N, K), 0
    h_PI = torch.empty(sorted_P.numel(), I, dtype=x_TD.dtype, device=x_TD.device)
    moe_gemm(a, w13_E2ID, h_PI, sorted_P, block_expert_B, N, up_cfg, a_div=a_div, out_padded=True, n_out=I, act=act)
    y_ND = torch.empty(N, D, dtype=x_TD.dtype, device=x_TD.device)
    moe_gemm(h_PI, w2_EDI, y_ND, sorted_P, block_expert_B, N, down_cfg, a_div=0, route_w_N=route_w_N)
    return _sum_over_k(y_ND, T, K) if combine else y_ND.view(T, K, D)


# JetMoE's attention experts route each token once and run map, then reduce, on the same ids: the
# reduce reuses the map's alignment (and so its BLOCK_M). One entry, held by a weak reference to
# the ids tensor: it matches only that live tensor, unchanged since (its version counter, shared
# with its views, moves on any in-place write).
_LAST_ALIGNMENT: tuple | None = None


def _remember_alignment(ids_TK: torch.Tensor, num_experts: int, block_m: int, alignment: tuple) -> None:
    global _LAST_ALIGNMENT
    _LAST_ALIGNMENT = (weakref.ref(ids_TK), ids_TK._version, num_experts, block_m, alignment)


def _shared_alignment(ids_TK: torch.Tensor, num_experts: int) -> tuple[int, tuple] | None:
    """(BLOCK_M, (sorted_P, block_expert_B)) of the last alignment of this very ids tensor, if any."""
    if _LAST_ALIGNMENT is None:
        return None
    ref, version, E, block_m, alignment = _LAST_ALIGNMENT
    if ref() is not ids_TK or version != ids_TK._version or E != num_experts:
        return None
    return block_m, alignment


def map_fused(x_TD, w_EOD, ids_TK, config=None, small=None) -> torch.Tensor:
    """y[t, k] = W[ids[t, k]] x_t through the fused kernel (forward only): [T, K, O]."""
    T, K = ids_TK.shape
    E, O, D = w_EOD.shape
    y_NO = torch.empty(T * K, O, dtype=x_TD.dtype, device=x_TD.device)
    if T * K == 0:
        return y_NO.view(T, K, O)
    cfg = config or get_config("map", E, O, D, x_TD.dtype, T, T * K, x_TD.device)
    ids_N = ids_TK.reshape(-1).contiguous()
    if use_small_kernel(T * K, K) if small is None else small:
        return moe_gemm_small(x_TD, w_EOD, y_NO, ids_N, K, cfg, a_div=K).view(T, K, O)
    sorted_P, block_expert_B = alignment = moe_align(ids_N, E, cfg["BLOCK_M"])
    _remember_alignment(ids_TK, E, cfg["BLOCK_M"], alignment)
    moe_gemm(x_TD, w_EOD, y_NO, sorted_P, block_expert_B, T * K, cfg, a_div=K)
    return y_NO.view(T, K, O)


def reduce_fused(h_TKC, w_EOC, ids_TK, weights_TK, config=None, small=None, combine: bool = True) -> torch.Tensor:
    """y_t = sum_k weights[t, k] W[ids[t, k]] h[t, k] through the fused kernel (forward only): [T, O].
    combine=False: as in `experts_fused`, the sorted path (and the small kernel where it splits by
    expert) returns [T, K, O] unsummed."""
    T, K = ids_TK.shape
    E, O, C = w_EOC.shape
    if T * K == 0:
        return h_TKC.new_zeros(T, O)
    cfg = config or get_config("reduce", E, O, C, h_TKC.dtype, T, T * K, h_TKC.device)
    ids_N, route_w_N = ids_TK.reshape(-1).contiguous(), weights_TK.reshape(-1).contiguous()
    h_NC = h_TKC.reshape(T * K, C)
    if use_small_kernel(T * K, K) if small is None else small:
        return moe_gemm_small_weighted(h_NC, w_EOC, ids_N, K, cfg, route_w_N, combine)
    shared = _shared_alignment(ids_TK, E)
    if shared is not None:  # the map's, on these ids
        block_m, (sorted_P, block_expert_B) = shared
        cfg = {**cfg, "BLOCK_M": block_m}
    else:
        sorted_P, block_expert_B = moe_align(ids_N, E, cfg["BLOCK_M"])
    y_NO = torch.empty(T * K, O, dtype=h_TKC.dtype, device=h_TKC.device)
    moe_gemm(h_NC, w_EOC, y_NO, sorted_P, block_expert_B, T * K, cfg, a_div=1, route_w_N=route_w_N)
    return _sum_over_k(y_NO, T, K) if combine else y_NO.view(T, K, O)


# ---- autograd: forward through the kernels, backward through a differentiable backend ----------


def _differentiable(name: str, x: torch.Tensor):
    from . import moe

    use_grouped = x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16
    return getattr(moe, f"{name}_{'grouped_mm' if use_grouped else 'reference'}")


def _recompute_grads(fn, inputs, needs, grad_out):
    """Gradients of fn(*inputs) wrt the inputs flagged in `needs`, by recomputation."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) for t, need in zip(inputs, needs)]
        out = fn(*leaves)
        got = iter(torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad_out))
    return [next(got) if need else None for need in needs]


class _Experts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w13_E2ID, w2_EDI, weights_TK, ids_TK, act_fn, act_name):
        ctx.save_for_backward(x_TD, w13_E2ID, w2_EDI, weights_TK, ids_TK)
        ctx.act_fn = act_fn
        return experts_fused(x_TD, w13_E2ID, w2_EDI, ids_TK, weights_TK, act_name)

    @staticmethod
    def backward(ctx, grad_TD):
        x, w13, w2, weights, ids = ctx.saved_tensors
        fn = _differentiable("experts", x)
        grads = _recompute_grads(lambda x, w13, w2, wt: fn(x, w13, w2, ids, wt, ctx.act_fn),
                                 [x, w13, w2, weights], ctx.needs_input_grad[:4], grad_TD)
        return (*grads, None, None, None)


class _Map(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_EOD, ids_TK):
        ctx.save_for_backward(x_TD, w_EOD, ids_TK)
        return map_fused(x_TD, w_EOD, ids_TK)

    @staticmethod
    def backward(ctx, grad_TKO):
        x, w, ids = ctx.saved_tensors
        fn = _differentiable("expert_map", x)
        grads = _recompute_grads(lambda x, w: fn(x, w, ids), [x, w], ctx.needs_input_grad[:2], grad_TKO)
        return (*grads, None)


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TKC, w_EOC, weights_TK, ids_TK):
        ctx.save_for_backward(h_TKC, w_EOC, weights_TK, ids_TK)
        return reduce_fused(h_TKC, w_EOC, ids_TK, weights_TK)

    @staticmethod
    def backward(ctx, grad_TO):
        h, w, weights, ids = ctx.saved_tensors
        fn = _differentiable("expert_reduce", h)
        grads = _recompute_grads(lambda h, w, wt: fn(h, w, ids, wt), [h, w, weights], ctx.needs_input_grad[:3],
                                 grad_TO)
        return (*grads, None)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def fuses(act) -> bool:
    """Whether the expert kernels' epilogue computes `act` (else `experts_triton` runs unfused)."""
    return act in _ACT_CODES


def experts_triton(x_TD, w13_E2ID, w2_EDI, ids_TK, weights_TK, act, combine: bool = True) -> torch.Tensor:
    """The "triton" backend of `ops.moe.experts_forward` (same signature and result)."""
    name = _ACT_CODES.get(act)
    if name is None:
        # An activation the epilogue does not fuse: use the unfused differentiable backend.
        return _differentiable("experts", x_TD)(x_TD, w13_E2ID, w2_EDI, ids_TK, weights_TK, act)
    if _needs_grad(x_TD, w13_E2ID, w2_EDI, weights_TK):
        return _Experts.apply(x_TD, w13_E2ID, w2_EDI, weights_TK, ids_TK, act, name)
    return experts_fused(x_TD, w13_E2ID, w2_EDI, ids_TK, weights_TK, name, combine=combine)


def expert_map_triton(x_TD, w_EOD, ids_TK) -> torch.Tensor:
    """The "triton" backend of `ops.moe.expert_map`."""
    if _needs_grad(x_TD, w_EOD):
        return _Map.apply(x_TD, w_EOD, ids_TK)
    return map_fused(x_TD, w_EOD, ids_TK)


def expert_reduce_triton(h_TKC, w_EOC, ids_TK, weights_TK, combine: bool = True) -> torch.Tensor:
    """The "triton" backend of `ops.moe.expert_reduce`."""
    if _needs_grad(h_TKC, w_EOC, weights_TK):
        return _Reduce.apply(h_TKC, w_EOC, weights_TK, ids_TK)
    return reduce_fused(h_TKC, w_EOC, ids_TK, weights_TK, combine=combine)


__all__ = [
    "arrival_counters", "config_file", "config_key", "decode_config", "default_config", "experts_fused",
    "experts_triton", "expert_map_triton", "expert_reduce_triton", "gather_rows", "get_config", "map_fused",
    "moe_align", "moe_gemm", "moe_gemm_small", "num_blocks_bound", "reduce_fused", "tma_enabled", "use_small_kernel",
]
