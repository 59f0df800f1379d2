"""The cache API of Transformers 5 on a GPU, against Transformers on the same GPU (not part of the
CPU suite, which checks the same calls on the torch code).

    PYTHONPATH=.:bench python bench/cache_api_gpu.py --out cache-api.json

On a GPU a static cache's forwards go through the fused kernels (`project_rotated`: q/k/v, rotary
and the cache write in one kernel; `update_rotated`), which allocate the storage themselves. This
runs, for both models in float32 (hf_parity_gpu's configs, one checkpoint loaded by both):
1. `StaticCache(config, max_cache_len, max_batch_size=, device=, dtype=)` (Transformers 4's
   keywords, which Transformers 5 ignores) where the storage made up front does not fit the first
   keys (bf16 storage for a float32 model; one row for a batch of two): prefill, then decode steps;
2. `early_initialization` before the prefill, the storage kept by the forwards;
3. `reorder_cache` to a batch of another size, then a step;
each step's logits against Transformers' (relative error < 1e-4). Exits non-zero if one fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
import transformers
from hf_parity_gpu import DEVICE, configs, pair

import moetorch
from moetorch.gpu_check import rel_err, report

LIMIT = 1e-4


def steps(ours, hf, make, ids, reorder=None) -> list[float]:
    """Relative errors of each step's logits: a 5-token prefill, then one token a step, into the
    caches `make(lib)` builds (`reorder`: an index applied to both caches after the prefill)."""
    mine, theirs = make(moetorch), make(transformers)
    errors = []
    with torch.no_grad():
        chunks = [ids[:, :5], *ids[:, 5:].split(1, dim=1)]
        for i, chunk in enumerate(chunks):
            if i == 1 and reorder is not None:
                mine.reorder_cache(reorder)
                theirs.reorder_cache(reorder)
            if reorder is not None and i >= 1:
                chunk = chunk[reorder]
            errors.append(rel_err(ours(chunk, past_key_values=mine).logits, hf(chunk, past_key_values=theirs).logits))
    return errors


def check_model(prefix: str, cfg: dict, directory: str) -> dict[str, float]:
    """Each case's largest relative error over its steps, for one model."""
    ours, hf = pair(prefix, cfg, "ForCausalLM", directory)
    ids = torch.randint(1, cfg["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    c = ours.config
    width = c.kv_channels if prefix == "JetMoe" else c.hidden_size // c.num_attention_heads

    def static(lib, **kw):
        return lib.StaticCache(config=(ours if lib is moetorch else hf).config, max_cache_len=16, **kw)

    def early(lib):
        cache = static(lib)
        cache.early_initialization(2, c.num_key_value_heads, width, torch.float32, DEVICE)
        return cache

    cases = {
        "transformers_4_keywords_bf16_storage": lambda lib: static(lib, max_batch_size=2, device=DEVICE,
                                                                   dtype=torch.bfloat16),
        "transformers_4_keywords_one_row": lambda lib: static(lib, max_batch_size=1, device=DEVICE,
                                                              dtype=torch.float32),
        "early_initialization": early,
    }
    out = {case: max(steps(ours, hf, make, ids)) for case, make in cases.items()}
    for index in ([1], [0, 1, 1]):
        out[f"reorder_to_{len(index)}_rows"] = max(steps(ours, hf, static, ids, torch.tensor(index, device=DEVICE)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "limit": LIMIT}
    for name, (prefix, cfg) in configs().items():
        with tempfile.TemporaryDirectory() as directory:
            results.update({f"{name}.{case}": err for case, err in check_model(prefix, cfg, directory).items()})
    results["ok"] = all(v < LIMIT for k, v in results.items() if "." in k)
    report(results, args.out)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
