"""The norm and router of a one-token MoE layer as a kernel of their own, against folded into the
first expert GEMV (every program of it routing the token itself).

Batch-1 decode is a chain of dependent steps, each a few microseconds on top of its bytes
(`bench/persistent_chain.py`). A JetMoE layer has two steps that read no weights to speak of: the
residual add + RMSNorm + router before the attention experts and before the MLP. Folded into the
GEMV after them, each program of that GEMV recomputes the norm and the router's 8 logits from the
residual row (L2-resident) and picks its experts itself; program 0 stores the residual sum, the ids
and the routing weights for the kernels after it. That removes a kernel boundary and the ids'
round trip through L2, and adds a prologue to every program. This probe measures the trade on the
MLP half of a JetMoE layer at one token, L layers back to back in one CUDA graph, each with its own
weights (so every weight byte comes from HBM, as in decode):

- `separate`: norm + router (one program), then gate/up (SwiGLU in its epilogue), then down
  (routing weights in its epilogue, both experts summed);
- `folded`: gate/up with the norm and router as its prologue, then down;
- `folded_early`: the same, its programs loading the router, norm weights and residual row before
  they wait for the kernel before (PDL): none of those is written by it, only the previous output is;
- `separate_tc`, `folded_tc`: the first two with the gate/up GEMV on the matrix units, as the
  library's small-row expert kernel runs one token (a 16-row tile, one flat loop over both
  experts' K steps, 88 programs at its block sizes);
- `library`: the library's own layer as decode runs it (`layer_bench.run_layer`, jetmoe_mlp at one
  token: its norm + router kernel, the small-row expert kernel, the GEMV kernel), for scale;
- `library_experts_only`: its expert kernels alone, on a fixed normed row and routing: the bound
  that no fold of the norm + router step can pass.

The first three share this file's GEMV bodies and routing code, so they differ by the fold
alone. Both route with the same code; the check compares their last outputs.

    PYTHONPATH=.:bench python bench/fold_chain.py [--layers 16] --out r.json
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl
from moe_layer import ceilings, graph_ms, save_json  # bench/ is the script's directory

from moetorch.ops import triton_moe
from moetorch.ops.triton_moe import _pdl_release, _pdl_start, pdl_meta

E, K, D, I, EPS = 8, 2, 2048, 5632, 1e-6  # JetMoE's MLP: 8 experts, top-2


@triton.jit
def _route(h, y, g, wr, eps, D: tl.constexpr, E: tl.constexpr):
    # From the loaded rows h, y, g [D] and router wr [E, D]: the residual sum s = h + y (rounded
    # to bf16, as the models keep it), rsqrt of its mean square, and the router on the normed row:
    # top-2 of E logits, softmax over the two.
    s = (h.to(tl.float32) + y.to(tl.float32)).to(tl.bfloat16)
    sf = s.to(tl.float32)
    r = tl.rsqrt(tl.sum(sf * sf, axis=0) / D + eps)
    xn = (sf * r * g.to(tl.float32)).to(tl.bfloat16).to(tl.float32)
    e = tl.arange(0, E)
    logits = tl.sum(wr.to(tl.float32) * xn[None, :], axis=1)
    m1 = tl.max(logits, axis=0)
    i1 = tl.min(tl.where(logits == m1, e, E), axis=0)
    rest = tl.where(e == i1, float("-inf"), logits)
    m2 = tl.max(rest, axis=0)
    i2 = tl.min(tl.where(rest == m2, e, E), axis=0)
    w1 = 1.0 / (1.0 + tl.exp(m2 - m1))
    return s, r, i1, i2, w1, 1.0 - w1


@triton.jit
def _route_row(h_ptr, y_ptr, g_ptr, wr_ptr, eps, D: tl.constexpr, E: tl.constexpr):
    d = tl.arange(0, D)
    wr = tl.load(wr_ptr + tl.arange(0, E)[:, None] * D + d[None, :])
    return _route(tl.load(h_ptr + d), tl.load(y_ptr + d), tl.load(g_ptr + d), wr, eps, D, E)


@triton.jit
def _store_route(s_ptr, ids_ptr, wts_ptr, s, i1, i2, w1, w2, D: tl.constexpr):
    tl.store(s_ptr + tl.arange(0, D), s)
    tl.store(ids_ptr, i1)
    tl.store(ids_ptr + 1, i2)
    tl.store(wts_ptr, w1)
    tl.store(wts_ptr + 1, w2)


@triton.jit
def _norm_route_kernel(h_ptr, y_ptr, g_ptr, wr_ptr, s_ptr, r_ptr, ids_ptr, wts_ptr, eps,
                       D: tl.constexpr, E: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    s, r, i1, i2, w1, w2 = _route_row(h_ptr, y_ptr, g_ptr, wr_ptr, eps, D, E)
    _store_route(s_ptr, ids_ptr, wts_ptr, s, i1, i2, w1, w2, D)
    tl.store(r_ptr, r)


@triton.jit
def _gate_up_kernel(h_ptr, y_ptr, g_ptr, wr_ptr, s_ptr, r_ptr, ids_ptr, wts_ptr, w_ptr, a_ptr, eps, I,
                    D: tl.constexpr, E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    FOLD: tl.constexpr, PDL: tl.constexpr, DOT: tl.constexpr = False,
                    UPCAST: tl.constexpr = False):
    # a[k, n] = silu(W_gate[e_k, n] . x) * (W_up[e_k, n] . x) for both slots k, columns
    # [pid*BLOCK_N, +BLOCK_N); x = the normed row, built chunk by chunk from h + y, r and g (the
    # same code in both arms). FOLD: the program routes the row itself, and program 0 stores the
    # sum, ids and weights; else the norm + router kernel before it did, and it reads r and ids.
    pid = tl.program_id(0)
    if FOLD == 2:
        # weights, and the residual row (stored two kernels back), need no wait: only y does
        d = tl.arange(0, D)
        wr = tl.load(wr_ptr + tl.arange(0, E)[:, None] * D + d[None, :])
        h = tl.load(h_ptr + d)
        g = tl.load(g_ptr + d)
        _pdl_start(PDL)
        s, r, e0, e1, w0, w1 = _route(h, tl.load(y_ptr + d), g, wr, eps, D, E)
    else:
        _pdl_start(PDL)
    if FOLD == 1:
        s, r, e0, e1, w0, w1 = _route_row(h_ptr, y_ptr, g_ptr, wr_ptr, eps, D, E)
    if FOLD:
        if pid == 0:
            _store_route(s_ptr, ids_ptr, wts_ptr, s, e0, e1, w0, w1, D)
    else:
        r = tl.load(r_ptr)
        e0 = tl.load(ids_ptr)
        e1 = tl.load(ids_ptr + 1)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    if DOT:
        # as the library's small-row expert kernel runs one token: a 16-row tile whose rows 0 and
        # 1 are the token's two assignments, the matrix units, one flat loop over (slot, K step)
        m = tl.arange(0, 16)
        gate_mn = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        up_mn = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        steps = D // BLOCK_K
        for step in range(2 * steps):
            slot = step // steps
            k0 = (step - slot * steps) * BLOCK_K
            e = tl.where(slot == 0, e0, e1).to(tl.int64)
            sk = tl.load(h_ptr + k0 + kk).to(tl.float32) + tl.load(y_ptr + k0 + kk).to(tl.float32)
            sk = sk.to(tl.bfloat16).to(tl.float32)
            x = (sk * r * tl.load(g_ptr + k0 + kk).to(tl.float32)).to(tl.bfloat16)
            a = tl.where((m == slot)[:, None], x[None, :], 0.0).to(tl.bfloat16)
            cols = w_ptr + e * (2 * I * D) + n.to(tl.int64)[None, :] * D + (k0 + kk)[:, None]
            w_gate = tl.load(cols)
            w_up = tl.load(cols + I * D)
            if UPCAST:  # the CPU interpreter's bf16 dot
                a, w_gate, w_up = a.to(tl.float32), w_gate.to(tl.float32), w_up.to(tl.float32)
            gate_mn = tl.dot(a, w_gate, gate_mn)
            up_mn = tl.dot(a, w_up, up_mn)
        act = gate_mn / (1.0 + tl.exp(-gate_mn)) * up_mn
        tl.store(a_ptr + m[:, None] * I + n[None, :], act.to(tl.bfloat16), mask=(m < 2)[:, None])
        _pdl_release(PDL)
        return
    for slot in tl.static_range(2):
        e = (e0 if slot == 0 else e1).to(tl.int64)
        gate = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        rows = w_ptr + e * (2 * I * D) + n.to(tl.int64)[:, None] * D
        for k0 in range(0, D, BLOCK_K):
            sk = tl.load(h_ptr + k0 + kk).to(tl.float32) + tl.load(y_ptr + k0 + kk).to(tl.float32)
            sk = sk.to(tl.bfloat16).to(tl.float32)
            x = (sk * r * tl.load(g_ptr + k0 + kk).to(tl.float32)).to(tl.bfloat16).to(tl.float32)
            gate += tl.load(rows + k0 + kk[None, :]).to(tl.float32) * x[None, :]
            up += tl.load(rows + I * D + k0 + kk[None, :]).to(tl.float32) * x[None, :]
        gs = tl.sum(gate, axis=1)
        a = gs / (1.0 + tl.exp(-gs)) * tl.sum(up, axis=1)
        tl.store(a_ptr + slot * I + n, a.to(tl.bfloat16))
    _pdl_release(PDL)


@triton.jit
def _down_kernel(a_ptr, ids_ptr, wts_ptr, w_ptr, y_ptr, I, D: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    # y[n] = sum_k wts[k] * W_down[e_k, n] . a[k], columns [pid*BLOCK_N, +BLOCK_N)
    _pdl_start(PDL)
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    out = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for slot in tl.static_range(2):
        e = tl.load(ids_ptr + slot).to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        rows = w_ptr + e * (D * I) + n.to(tl.int64)[:, None] * I
        for k0 in range(0, I, BLOCK_K):
            a = tl.load(a_ptr + slot * I + k0 + kk).to(tl.float32)
            acc += tl.load(rows + k0 + kk[None, :]).to(tl.float32) * a[None, :]
        out += tl.load(wts_ptr + slot) * tl.sum(acc, axis=1)
    tl.store(y_ptr + n, out.to(tl.bfloat16))
    _pdl_release(PDL)


def make_layers(L: int, dev, e: int = E, d: int = D, i: int = I) -> list[dict]:
    """L layers of random weights (std 0.02; norm weights about 1)."""
    g = torch.Generator(device=dev).manual_seed(0)

    def new(*shape, std=0.02):
        return (torch.randn(*shape, device=dev, generator=g) * std).bfloat16()

    return [dict(norm=(1 + new(d, std=0.1)), router=new(e, d), w13=new(e, 2 * i, d), w2=new(e, d, i))
            for _ in range(L)]


def buffers(L: int, dev, d: int = D, i: int = I) -> dict:
    """Layer l reads the residual s[l] and the previous output y[l], and writes s[l + 1], y[l + 1]."""
    g = torch.Generator(device=dev).manual_seed(1)
    s = torch.zeros(L + 1, d, device=dev, dtype=torch.bfloat16)
    s[0] = torch.randn(d, device=dev, generator=g)
    y = torch.zeros(L + 1, d, device=dev, dtype=torch.bfloat16)
    y[0] = torch.randn(d, device=dev, generator=g)
    return dict(s=s, y=y, r=torch.zeros(L, device=dev), ids=torch.zeros(L, K, device=dev, dtype=torch.int32),
                wts=torch.zeros(L, K, device=dev), a=torch.zeros(L, K, i, device=dev, dtype=torch.bfloat16))


def chain(arm: str, layers: list, buf: dict, cfg: dict):
    """A function running all layers of `arm` once (`separate`, `folded` or `folded_early`; to be
    captured in a graph)."""
    dev = buf["y"].device
    e, d, i = layers[0]["w2"].shape
    up = dict(BLOCK_N=cfg["UP_N"], BLOCK_K=cfg["UP_K"], num_warps=cfg["warps"], num_stages=cfg["stages"],
              DOT=arm.endswith("_tc"), UPCAST=triton_moe.INTERPRET)
    down = dict(BLOCK_N=cfg["DOWN_N"], BLOCK_K=cfg["DOWN_K"], num_warps=cfg["warps"], num_stages=cfg["stages"])
    fold = {"separate": 0, "folded": 1, "folded_early": 2}[arm.removesuffix("_tc")]

    def run():
        for l, lay in enumerate(layers):
            args = (buf["s"][l], buf["y"][l], lay["norm"], lay["router"], buf["s"][l + 1], buf["r"][l:],
                    buf["ids"][l], buf["wts"][l])
            if not fold:
                _norm_route_kernel[(1,)](*args, EPS, D=d, E=e, num_warps=8, **pdl_meta(dev, 1, 1))
            _gate_up_kernel[(i // cfg["UP_N"],)](*args, lay["w13"], buf["a"][l], EPS, i, D=d, E=e, FOLD=fold,
                                                 **up, **pdl_meta(dev))
            _down_kernel[(d // cfg["DOWN_N"],)](buf["a"][l], buf["ids"][l], buf["wts"][l], lay["w2"], buf["y"][l + 1],
                                                i, D=d, **down, **pdl_meta(dev))
    return run


def reference(layers: list, buf: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain in torch (float32 sums of the same bf16 roundings): last output y and all ids."""
    s, y = buf["s"][0].float(), buf["y"][0].float()
    ids_all = []
    for lay in layers:
        s = (s + y).bfloat16().float()
        r = torch.rsqrt((s * s).mean() + EPS)
        x = (s * r * lay["norm"].float()).bfloat16().float()
        logits = lay["router"].float() @ x
        top, ids = logits.topk(K)
        w = torch.softmax(top, 0)
        ids_all.append(ids)
        out = torch.zeros_like(y)
        for k in range(K):
            h = lay["w13"][ids[k]].float() @ x
            g, u = h.chunk(2)
            a = (torch.nn.functional.silu(g) * u).bfloat16().float()
            out += w[k] * (lay["w2"][ids[k]].float() @ a)
        y = out.bfloat16().float()
    return y, torch.stack(ids_all)


ARMS = ("separate", "folded", "folded_early", "separate_tc", "folded_tc")
CONFIGS = [dict(UP_N=un, UP_K=uk, DOWN_N=dn, DOWN_K=dk, warps=4, stages=3)
           for un in (8, 16, 32, 64) for uk in (128, 256) for dn, dk in ((2, 512), (4, 512), (8, 256))]
# the matrix-unit gate/up (`_tc` arms): the library's block sizes at one token (64 columns, 128 of
# K, 4 stages: 88 programs) and neighbours; down with the CUDA-core arms' best
TC_CONFIGS = [dict(UP_N=un, UP_K=uk, DOWN_N=2, DOWN_K=512, warps=4, stages=st)
              for un in (32, 64, 128) for uk in (64, 128) for st in (3, 4)]


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the arms")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--library", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    ceil = ceilings()
    bw = ceil["copy_bytes_per_s"]
    L = args.layers
    layers = make_layers(L, "cuda")
    buf = buffers(L, "cuda")
    want_y, want_ids = reference(layers, buf)
    floor_us = (K * (3 * I * D) * 2 + E * D * 2) / bw * 1e6  # two experts' weights + the router, a layer
    print(f"copy {bw / 1e12:.2f} TB/s; floor {floor_us:.2f} us a layer", flush=True)
    res: dict = {"device": torch.cuda.get_device_name(), "copy_bytes_per_s": bw, "layers": L,
                 "floor_us_per_layer": floor_us, "arms": {}, "all": []}
    best = {}
    for arm in args.arms.split(","):
        timed = []
        for cfg in TC_CONFIGS if arm.endswith("_tc") else CONFIGS:
            fn = chain(arm, layers, buf, cfg)
            buf["y"][1:].zero_()
            fn()
            torch.cuda.synchronize()
            same_ids = torch.equal(buf["ids"].long(), want_ids)
            err = ((buf["y"][L].float() - want_y).norm() / want_y.norm()).item()
            if not (same_ids and err < 5e-2):
                print(f"  {arm} {cfg}: wrong (ids {same_ids}, rel err {err:.2e})", flush=True)
                continue
            ms = graph_ms(fn, warmup=5, rep=30)
            if ms is not None:
                timed.append((ms, cfg))
                res["all"].append({"arm": arm, "config": cfg, "us_per_layer": ms * 1e3 / L, "rel_err": err})
        timed.sort(key=lambda t: t[0])
        best[arm] = timed[0][1]
        print(f"  {arm:9s} best {timed[0][0] * 1e3 / L:6.2f} us a layer  cfg {timed[0][1]}", flush=True)
    fns = {arm: chain(arm, layers, buf, cfg) for arm, cfg in best.items()}
    if args.library:
        fns["library"] = library_chain(L)
        fns["library_experts_only"] = library_chain(L, experts_only=True)
    times = {arm: [] for arm in fns}
    for _ in range(args.rounds):
        for arm, fn in fns.items():
            times[arm].append(graph_ms(fn, warmup=5, rep=50) * 1e3 / L)
    for arm, us in times.items():
        med = sorted(us)[len(us) // 2]
        res["arms"][arm] = {"config": best.get(arm), "us_per_layer": med, "rounds_us": us,
                            "pct_floor": 100 * floor_us / med}
        print(f"{arm:9s} {med:7.2f} us a layer ({', '.join(f'{u:.2f}' for u in us)})  "
              f"{100 * floor_us / med:5.1f}% of the floor", flush=True)
    if args.out:
        save_json(args.out, res)
    return 0


def library_chain(L: int, experts_only: bool = False):
    """The library's JetMoE MLP layer at one token, L layers back to back (`layer_bench`).
    experts_only: each layer's expert kernels alone, on one normed row and one routing made
    before (no norm + router step): what no fold can beat."""
    from moetorch import layer_bench as lb
    from moetorch.ops.moe import experts_forward

    spec = lb.LAYERS["jetmoe_mlp"]
    g = torch.Generator(device="cuda").manual_seed(2)
    layers = [lb.make_layer(spec, g) for _ in range(L)]
    x = torch.randn(1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    delta = torch.randn(1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    if not experts_only:
        return lb.chain_fn(spec, layers, x, delta, "triton")
    ids = torch.tensor([[1, 5]], device="cuda")
    weights = torch.tensor([[0.6, 0.4]], device="cuda", dtype=torch.bfloat16)

    def run():
        for layer in layers:
            experts_forward(x, layer["w13"], layer["w2"], ids, weights, torch.nn.functional.silu, "triton",
                            combine=False)
    return run


if __name__ == "__main__":
    sys.exit(main())
