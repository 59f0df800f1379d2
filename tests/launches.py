"""Every Triton launch of a decode and prefill run of both tiny models, as a Hopper GPU would make
them (descriptors, gathered rows, the CUDA-core GEMV at one token), recorded under the interpreter.
conftest.py's `recorded_launches` runs it once a session (a few minutes) for the tests that read it:
tests/test_pdl.py compiles each kernel from them, tests/test_launch.py checks the launcher's keys.
"""

from __future__ import annotations

import torch
from archs import JETMOE, PHIMOE, randomize_

from moetorch import StaticCache
from moetorch.cache import PackedRows
from moetorch.ops import fused, moe, triton_fused, triton_moe, triton_sample

MODULES = (triton_fused, triton_moe, triton_sample)


def kernels(modules=MODULES) -> list[tuple]:
    """(module, name) of each Triton kernel the modules launch (named `_..._kernel`)."""
    return [(m, n) for m in modules for n in sorted(vars(m)) if n.startswith("_") and n.endswith("_kernel")]


def record_launches(monkeypatch, modules=MODULES) -> list[tuple]:
    """(module, kernel name, args, kwargs) of each launch of the modules' kernels from now on."""
    calls = []

    class Recorder:
        def __init__(self, module, name, kernel):
            self.module, self.name, self.kernel = module, name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append((self.module, self.name, args, kwargs))
                return self.kernel[grid](*args, **kwargs)

            return launch

    for module, name in kernels(modules):
        monkeypatch.setattr(module, name, Recorder(module, name, getattr(module, name)))
    return calls


def tiny_model(arch):
    torch.manual_seed(0)
    model = arch.ours["causal_lm"](arch.our_config(max_position_embeddings=128)).eval()
    randomize_(model, 3)
    return model


def launch_everything(monkeypatch) -> None:
    """Decode and prefill steps of both tiny models, on the paths a Hopper GPU takes (descriptors,
    gathered rows, the CUDA-core GEMV at one token), so that every kernel launches."""
    monkeypatch.setattr(moe, "pick_backend", lambda *args: "triton")  # as on a GPU
    monkeypatch.setattr(triton_moe, "tma_enabled", lambda device: True)  # as on Hopper: descriptors,
    monkeypatch.setattr(triton_moe, "GATHER_MIN_ROWS", 0)  # and the gate/up rows gathered first
    tuned = triton_moe.get_config  # one-token steps take the CUDA-core expert kernel
    monkeypatch.setattr(triton_moe, "get_config", lambda *a, **kw: {**tuned(*a, **kw), "GEMV": True})
    gen = torch.Generator().manual_seed(0)
    # A prompt longer than the fused router's and the small expert kernel's row limits (so the
    # routing kernel, alignment and grouped GEMM run), then decode steps over enough keys to split.
    prompt = max(fused.ROUTE_MAX_ROWS, triton_moe.SMALL_MAX_ROWS) + 4
    with torch.no_grad(), fused.forced():
        for arch in (PHIMOE, JETMOE):
            model = tiny_model(arch).to(torch.bfloat16)
            ids = torch.randint(1, 97, (2, prompt), generator=gen)
            model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, cache_implementation="static")
            model.generate(ids[:, :4], max_new_tokens=2, do_sample=False, pad_token_id=0)  # dynamic cache
            model.generate(ids[:1, :4], max_new_tokens=2, do_sample=False, cache_implementation="static")  # one row
        model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, num_beams=2, cache_implementation="static")
        # the two-launch alignment, which these sizes otherwise skip
        monkeypatch.setattr(triton_moe, "SELF_COUNT_MAX_ROWS", 0)
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, cache_implementation="static")
        kv = torch.zeros(1, 2, 3, 8, dtype=torch.bfloat16)
        StaticCache(num_layers=1, max_cache_len=4).update(kv, kv, 0)  # a static cache written directly
        # continuous batching's packed prefill: its keys and values into rows, a prefix read in place
        cache = StaticCache(num_layers=1, max_cache_len=8)
        cache._allocate(2, 2, 8, torch.device("cpu"), torch.bfloat16)
        PackedRows(cache, [1], [2], [3], [(0, 0, 2)]).update(kv, kv, 0)
        triton_moe._sum_over_k(torch.zeros(6, 8, dtype=torch.bfloat16), 3, 2)  # combined outputs, which the
        # models leave to their norms
        x, w = torch.zeros(8, 32, dtype=torch.bfloat16), torch.zeros(2, 48, 32, dtype=torch.bfloat16)
        persistent = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2, PERSISTENT=2)
        triton_moe.map_fused(x, w, torch.zeros(8, 2, dtype=torch.long), persistent, small=False)


def record_everything() -> list[tuple]:
    """`launch_everything` and two draws of the sampling kernels, recorded."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        calls = record_launches(mp)
        launch_everything(mp)
        for top_k, top_p in ((20, 0.9), (None, None)):
            triton_sample.sample(torch.randn(3, 300), 0.7, top_k, top_p)
    return calls
