"""The sampling kernel (ops/triton_sample.py) under Triton's CPU interpreter, against Transformers'
warpers, softmax and torch.multinomial drawing from the same generator."""

from __future__ import annotations

import pytest
import torch
import transformers

from moetorch.ops import triton_sample

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    # Rows of a few hundred logits then span several chunks of the first kernel (and the
    # interpreter sorts no more than it must).
    monkeypatch.setattr(triton_sample, "CHUNK", 128)


def transformers_draw(logits, temperature, top_k, top_p, seed, min_p=None):
    """Transformers' sampling step: warpers on the float32 logits, softmax, multinomial."""
    warpers = transformers.LogitsProcessorList()
    if temperature is not None:
        warpers.append(transformers.TemperatureLogitsWarper(temperature))
    if top_k is not None:
        warpers.append(transformers.TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(transformers.TopPLogitsWarper(top_p))
    if min_p is not None:
        warpers.append(transformers.MinPLogitsWarper(min_p))
    scores = warpers(None, logits.float())
    torch.manual_seed(seed)
    return torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)


def stable_draw(logits, temperature, top_k, top_p, seed, min_p=None):
    """The same step with top-p's ascending sort stable (equal values in index order, as CUDA's sort
    of a row leaves them). Torch's CPU sort orders ties arbitrarily, so tied logits need this one."""
    scores = logits.float()
    if temperature is not None:
        scores = scores * triton_sample.reciprocal(temperature)
    if top_k is not None:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]))[0][..., -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p is not None:
        ordered, order = torch.sort(scores, stable=True)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    if min_p is not None:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), -float("inf"))
    torch.manual_seed(seed)
    return torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)


def kernel_draw(logits, temperature, top_k, top_p, seed, min_p=None):
    torch.manual_seed(seed)
    return triton_sample.sample(logits, temperature, top_k, top_p, min_p)


# (temperature, top_k, top_p, min_p); temperatures whose reciprocal is exact, as CPU torch divides.
SETTINGS = [
    (None, 1, None, None), (0.5, 5, 0.9, None), (2.0, 50, 0.5, None), (None, 40, 0.99, None),
    (0.25, 256, None, None), (None, None, None, None), (2.0, 3, 0.3, None), (None, 200, 0.9, None),
    (None, 50, 0.9, 0.05), (0.5, 100, None, 0.1), (2.0, None, None, 0.02),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=[str(s) for s in SETTINGS])
def test_kernel_draws_what_transformers_draws(setting):
    temperature, top_k, top_p, min_p = setting
    for trial in range(3):
        V = 300 + 131 * trial  # not a power of two
        g = torch.Generator().manual_seed(trial)
        logits = torch.randn(4, V, generator=g) * 4  # float32: ties are unlikely
        want = transformers_draw(logits, temperature, top_k, top_p, seed=trial, min_p=min_p)
        after_want = torch.rand(3)
        got = kernel_draw(logits, temperature, top_k, top_p, seed=trial, min_p=min_p)
        after_got = torch.rand(3)
        assert torch.equal(want, got), f"{setting} trial {trial}: {want.tolist()} != {got.tolist()}"
        assert torch.equal(after_want, after_got), "the kernel's draw left the generator elsewhere"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_at_the_thresholds(dtype):
    # Integer logits: many tokens tie at the k-th value, at the top-p boundary, and at a chunk's
    # own k-th value (more ties than the chunk passes on).
    for trial in range(12):
        V = 64 + 13 * trial
        g = torch.Generator().manual_seed(100 + trial)
        logits = torch.randint(-3, 4, (6, V), generator=g).to(dtype)
        setting = ([None, 0.5][trial % 2], [1, 3, 10, 40][trial % 4], [None, 0.9, 0.5, 0.3][trial % 4 - 1])
        min_p = [None, 0.3, None][trial % 3]  # integer logits: the min-p cut falls between values
        want = stable_draw(logits, *setting, seed=trial, min_p=min_p)
        got = kernel_draw(logits, *setting, seed=trial, min_p=min_p)
        assert torch.equal(want, got), f"{setting} {min_p} trial {trial}: {want.tolist()} != {got.tolist()}"


def test_kernel_edge_cases():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 100, generator=g)
    # top_k beyond the vocabulary keeps everything; -inf logits are never drawn.
    logits[0, :60] = -float("inf")
    for setting in [(None, 500, 0.9), (None, 100, None), (0.5, None, None)]:
        want = stable_draw(logits, *setting, seed=1)
        got = kernel_draw(logits, *setting, seed=1)
        assert torch.equal(want, got), setting
        assert int(got[0]) >= 60
    # top_k=1 is greedy, whatever the draws.
    assert torch.equal(kernel_draw(logits, 0.5, 1, 0.5, seed=2), logits.argmax(-1))
    # A strided row (one position of [R, L, V] logits) reads its own row.
    seq = torch.randn(3, 4, 100, generator=g)
    assert torch.equal(kernel_draw(seq[:, -1], None, 7, 0.8, seed=3), stable_draw(seq[:, -1], None, 7, 0.8, seed=3))


def test_kernel_rejects_settings_it_does_not_serve():
    logits = torch.randn(2, 50)
    with pytest.raises(ValueError, match="top_p needs a top_k"):
        triton_sample.sample(logits, None, None, 0.9)
    with pytest.raises(ValueError, match="top_k=2000"):
        triton_sample.sample(torch.randn(1, 4000), None, 2000, None)


_COMPILE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moetorch.ops import triton_sample as ts

types = dict(logits_ptr="*bf16", q_ptr="*fp32", out_ptr="*i64", work_ptr="*i64", V="i32", stride_row="i64",
             inv_t="fp32", k="i32", drop_mass="fp32", min_p="fp32", n_chunks="i32", pool_size="i32", n_rows="i32")
builds = [(ts._chunk_top_kernel, dict(CH=2048, KC=kc, TEMPERATURE=True), 4) for kc in (1, 64, 256)] + [
    (ts._draw_kernel, dict(POOL=16 * kc, KC=kc, BLOCK=4096, ALL=every, TEMPERATURE=True, TOP_P=top_p, MIN_P=min_p,
                           LIBDEVICE=True), 8)
    for every, top_p, min_p, kc in ((False, False, False, 64), (False, True, False, 64), (True, False, False, 64),
                                    (False, True, False, 1), (False, True, False, 256), (False, True, True, 64),
                                    (True, False, True, 64))]
for kernel, const, warps in builds:
    names = kernel.arg_names
    sig = {n: "constexpr" if n in const else types[n] for n in names}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, enable_fp_fusion=False))
    assert ".local" not in compiled.asm["ptx"], f"{kernel.__name__} {const}: registers spill"
print("compiled", len(builds))
"""


def test_kernels_compile_for_hopper():
    # The interpreter accepts code the compiler rejects; build the GPU variants for sm_90 (no GPU
    # needed) at the sizes the H200 runs: 2048-value chunks of 32064 logits, top_k 1 to 256.
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "compiled 10" in out.stdout, out.stderr[-3000:]
