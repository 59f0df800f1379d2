"""The norm + router kernel at one row in a CUDA graph of 16 launches, for PhiMoE's and JetMoE's
sizes: E programs meeting at an arrival, 4 experts a program (an arrival among E/4), and one
program taking all E logits (`triton_fused.ROUTE_PROGRAM_VALUES`); then the registers of each
compiled variant.

    PYTHONPATH=.:bench python bench/route_chain.py
"""

import torch
from moe_layer import graph_ms  # bench/ is the script's directory

from moetorch.ops import fused
from moetorch.ops import triton_fused as tf

bf = torch.bfloat16
dev = "cuda"
L = 16
for name, D, E, norm, sm in (("phimoe", 4096, 16, fused.NORM_LAYER, 0.01), ("jetmoe", 2048, 8, fused.NORM_RMS, None)):
    x = torch.randn(1, D, device=dev, dtype=bf)
    a = torch.randn(1, 2, D, device=dev, dtype=bf)
    w = torch.randn(D, device=dev, dtype=bf)
    nb = torch.randn(D, device=dev, dtype=bf) if norm == fused.NORM_LAYER else None
    routers = [torch.randn(E, D, device=dev, dtype=bf) * 0.02 for _ in range(L)]

    def run(x=x, a=a, norm=norm, w=w, nb=nb, routers=routers, sm=sm):
        for l in range(L):
            tf.add_norm_route(x, a, None, norm, w, nb, 1e-5, routers[l], 2, sm, sm is None)

    for epp in (1, 4, E, 1, 4, E):
        tf.ROUTE_PROGRAM_VALUES = epp * D
        ms = graph_ms(run)
        print(f"{name} {epp:2d} experts a program: {ms * 1e3 / L:6.2f} us per kernel", flush=True)
k = tf._add_norm_route_kernel
for _device, tup in k.device_caches.items():
    for key, kern in tup[0].items():
        print("regs", kern.n_regs, "spills", kern.n_spills, "warps", kern.metadata.num_warps, str(key)[-90:-60])
