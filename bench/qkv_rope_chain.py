"""PhiMoE's q/k/v GEMV at one row in a CUDA graph of 16 launches (each on its own weights): plain,
with the rotary + cache-write epilogue (`linear_small(..., rope=...)`), and plain followed by the
rotary + cache-write kernel; then the registers of each compiled variant.

    PYTHONPATH=.:bench python bench/qkv_rope_chain.py
"""

import torch
from moe_layer import graph_ms  # bench/ is the script's directory

from moetorch.ops import triton_fused as tf

bf = torch.bfloat16
D, d, H, G, S, L = 4096, 128, 32, 8, 256, 16
dev = "cuda"
x = torch.randn(1, D, device=dev, dtype=bf)
Ws = [[torch.randn(n * d, D, device=dev, dtype=bf) * 0.02 for n in (H, G, G)] for _ in range(L)]
ang = torch.randn(1, 1, d // 2, device=dev) * 30
cos, sin = torch.cat((ang, ang), -1).cos().to(bf), torch.cat((ang, ang), -1).sin().to(bf)
kc = [torch.zeros(1, G, S, d, device=dev, dtype=bf) for _ in range(L)]
vc = [torch.zeros(1, G, S, d, device=dev, dtype=bf) for _ in range(L)]
slots = torch.tensor([100], device=dev)

def plain():
    for l in range(L):
        tf.linear_small(x, Ws[l], [None] * 3)

def fused():
    for l in range(L):
        tf.linear_small(x, Ws[l], [None] * 3, rope=(cos, sin, 1, kc[l], vc[l], slots))

def two():
    for l in range(L):
        out = tf.linear_small(x, Ws[l], [None] * 3)
        q, k, v = out.view(1, 1, -1).split([H * d, G * d, G * d], -1)
        q = q.view(1, 1, H, d).transpose(1, 2)
        k = k.view(1, 1, G, d).transpose(1, 2)
        v = v.view(1, 1, G, d).transpose(1, 2)
        tf.rope_qk_cache(q, k, v, cos, sin, kc[l], vc[l], slots)

floor = L * (H + 2 * G) * d * D * 2 / 4.27e12 * 1e6
for name, fn in (("plain", plain), ("fused", fused), ("two", two), ("plain", plain), ("fused", fused), ("two", two)):
    ms = graph_ms(fn)
    print(f"{name:6s} {ms * 1e3 / L:7.2f} us per link (floor {floor / L:.2f})", flush=True)
k = tf._linear_small_kernel
try:
    for _device, tup in k.device_caches.items():
        for key, kern in tup[0].items():
            md = kern.metadata
            print("regs", kern.n_regs, "spills", kern.n_spills, "warps", md.num_warps, str(key)[-160:])
except Exception as e:
    print("no cache info", e)
