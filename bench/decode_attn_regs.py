"""The decode attention's compiled kernel at JetMoE's layout (16 kv heads, 2 query heads each, head
dim 128, rotary on the queries): registers, spills and shared memory a program takes, for a batch
and a register cap; also the launch to profile under Nsight Compute.

    PYTHONPATH=. python bench/decode_attn_regs.py [BATCH] [MAXNREG]
    ncu -k regex:_decode_attn_kernel -s 2 -c 1 --section LaunchStats --section Occupancy \\
        python bench/decode_attn_regs.py 64

MAXNREG (0 by default: none) sets `triton_fused.DECODE_WAVE_MAXNREG`, which caps the registers
where a batch's programs would fill the SMs 7 or 8 deep (JetMoE at batch 64 on 132 SMs).
"""

from __future__ import annotations

import sys

import torch

from moetorch.ops import triton_fused


def main() -> int:
    B = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    triton_fused.DECODE_WAVE_MAXNREG = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    G, R, d, S, visible = 16, 2, 128, 168, 150  # the decode bench's cache after a 128-token prompt
    dt = torch.bfloat16
    q = torch.randn(B, G * R, 1, d, device="cuda", dtype=dt)
    k = torch.randn(B, G, S, d, device="cuda", dtype=dt)
    v = torch.randn(B, G, S, d, device="cuda", dtype=dt)
    mask = torch.zeros(B, 1, 1, S, dtype=torch.bool, device="cuda")
    mask[..., :visible] = True
    cos_sin = torch.rand(1, 1, d, device="cuda", dtype=dt)
    for _ in range(3):
        triton_fused.decode_attention(q, k, v, mask, d**-0.5, True, rope_q=(cos_sin, cos_sin))
    torch.cuda.synchronize()
    for caches in triton_fused._decode_attn_kernel.jit.device_caches.values():
        for compiled in caches[0].values():
            md = compiled.metadata
            print(f"registers {compiled.n_regs}, spills {compiled.n_spills}, shared {md.shared} B, "
                  f"{md.num_warps} warps, {md.num_stages} stages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
