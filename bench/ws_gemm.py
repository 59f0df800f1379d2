"""Does Triton's Hopper warp specialisation (a producer warp group issuing the copies, two consumer
warp groups on the matrix units) speed up a GEMM at the MoE layers' prefill shapes?

    PYTHONPATH=. python bench/ws_gemm.py            # on a GPU: TFLOP/s against cuBLAS
    PYTHONPATH=. python bench/ws_gemm.py --ptx      # anywhere: what the sm_90 compile emits

A plain persistent GEMM (C = A B^T, bf16, float32 accumulation), its tensor descriptors made inside
the kernel (`tl.make_tensor_descriptor`), its tile loop a `tl.range(..., warp_specialize=WS,
flatten=False)`: the form Triton's Hopper pass splits into producer and consumer partitions (with
num_warps=4: 384 threads and `setmaxnreg`; with 8 warps it emits no split). Each variant is timed
with `triton.testing.do_bench` and checked against torch's matmul. The expert kernels
(`ops/triton_moe.py`) would need the same form (in-kernel descriptors for A and W) to get the split.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys

import torch
import triton
import triton.language as tl

SHAPES = (  # (M, N, K): gate/up and down of PhiMoE, the MoA map, JetMoE's gate/up, at 4096-16384 tokens
    (8192, 12800, 4096), (8192, 4096, 6400), (8192, 2048, 2048), (32768, 2048, 2048), (8192, 11264, 2048),
)
# (warp specialised, warps, stages, BLOCK_N); BLOCK_M 128, BLOCK_K 64
VARIANTS = ((False, 8, 3, 256), (False, 8, 4, 128), (True, 4, 3, 256), (True, 4, 4, 128), (True, 4, 3, 128))


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 PROGRAMS: tl.constexpr, WS: tl.constexpr):
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    tiles_n = tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BM) * tiles_n, PROGRAMS, flatten=False, warp_specialize=WS):
        row, col = (tile // tiles_n) * BM, (tile % tiles_n) * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(tl.cdiv(K, BK)):
            acc = tl.dot(a_desc.load([row, k * BK]), b_desc.load([col, k * BK]).T, acc)
        c_desc.store([row, col], acc.to(c_ptr.dtype.element_ty))


def ptx_report() -> None:
    """Compile each variant for sm_90 (no GPU needed) and count what shows the split."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = _gemm_kernel.arg_names
    for ws, warps, stages, bn in VARIANTS:
        const = dict(BM=128, BN=bn, BK=64, PROGRAMS=132, WS=ws)
        sig = {n: "constexpr" if n in const else "*bf16" if n.endswith("_ptr") else "i32" for n in names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in const}
        src = ASTSource(fn=_gemm_kernel, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()},
                        attrs=attrs)
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
        ptx = c.asm["ptx"]
        print(f"ws={int(ws)} warps={warps} stages={stages} BLOCK_N={bn}: threads {c.metadata.num_warps * 32}, "
              f"setmaxnreg {len(re.findall('setmaxnreg', ptx))}, mbarrier ops {len(re.findall('mbarrier', ptx))}, "
              f"shared {c.metadata.shared} B", flush=True)


def launch(a, b, c, ws: bool, warps: int, stages: int, bn: int, programs: int) -> None:
    M, K = a.shape
    _gemm_kernel[(programs,)](a, b, c, M, b.shape[0], K, BM=128, BN=bn, BK=64, PROGRAMS=programs, WS=ws,
                              num_warps=warps, num_stages=stages)


def time_shape(M: int, N: int, K: int, sms: int) -> str:
    """One line: cuBLAS's and each variant's TFLOP/s at C[M, N] = A[M, K] B[N, K]^T."""
    from triton.testing import do_bench

    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    want = (a @ b.T).float()
    flops = 2 * M * N * K
    line = [f"M={M} N={N} K={K}: cuBLAS {flops / do_bench(functools.partial(torch.matmul, a, b.T), rep=200) / 1e9:.0f}"]
    for ws, warps, stages, bn in VARIANTS:
        programs = min(sms, triton.cdiv(M, 128) * triton.cdiv(N, bn))
        run = functools.partial(launch, a, b, c, ws, warps, stages, bn, programs)
        run()
        err = ((c.float() - want).norm() / want.norm()).item()
        tflops = flops / do_bench(run, rep=200) / 1e9
        line.append(f"ws{int(ws)}/w{warps}/s{stages}/n{bn} {tflops:.0f} (rel err {err:.0e})")
    return "  ".join(line)


def bench() -> None:
    triton.set_allocator(lambda size, align, stream: torch.empty(size, device="cuda", dtype=torch.int8))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"triton {triton.__version__}, {torch.cuda.get_device_name()}; TFLOP/s", flush=True)
    for M, N, K in SHAPES:
        print(time_shape(M, N, K, sms), flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ptx", action="store_true", help="compile for sm_90 and report the split instead of timing")
    args = p.parse_args()
    ptx_report() if args.ptx else bench()
    return 0


if __name__ == "__main__":
    sys.exit(main())
