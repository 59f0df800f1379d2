"""Watermarked generate on the GPU against Transformers on the same GPU (not part of the CPU suite).

    PYTHONPATH=.:bench python bench/watermark_gpu.py --out r.json

The green lists are drawn on the device that generates, so the GPU's draws differ from the CPU's:
this checks that moetorch's graphed GPU path (static cache, CUDA graphs) draws Transformers' GPU
green lists. Float32 models of gpu_check's small configs, loaded into both libraries from one
checkpoint; greedy search and sampling with both seeding schemes, then each library's detector
on the other's text. Exits non-zero if tokens or detector statistics differ.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
import transformers

import moetorch
from moetorch.gpu_check import configs, report


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="watermark_gpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    results, ok = {"device": torch.cuda.get_device_name()}, True
    for name, (cfg, cls) in configs().items():
        torch.manual_seed(0)
        ours = cls(cfg).eval()
        with tempfile.TemporaryDirectory() as d:
            ours.save_pretrained(d)
            hf = getattr(transformers, cls.__name__).from_pretrained(d).to("cuda").eval()
        ours.to("cuda")
        ids = torch.randint(1, cfg.vocab_size, (2, 24), device="cuda")
        for scheme, settings in {"lefthash": dict(bias=2.5), "selfhash": dict(bias=3.0, seeding_scheme="selfhash",
                                                                              context_width=2)}.items():
            for mode, kw in {"greedy": dict(do_sample=False), "sampling": dict(do_sample=True, top_k=50)}.items():
                common = dict(max_new_tokens=24, eos_token_id=None, **kw)
                torch.manual_seed(1)
                want = hf.generate(ids, watermarking_config=transformers.WatermarkingConfig(**settings), **common)
                torch.manual_seed(1)
                got = ours.generate(ids, watermarking_config=moetorch.WatermarkingConfig(**settings), **common)
                same = results[f"{name}.{scheme}.{mode}.same_tokens"] = torch.equal(want, got)
                ok &= same
            text = got[:, ids.shape[1]:]
            a = transformers.WatermarkDetector(hf.config, "cuda", transformers.WatermarkingConfig(**settings))(
                text, return_dict=True)
            b = moetorch.WatermarkDetector(ours.config, "cuda", moetorch.WatermarkingConfig(**settings))(
                text, return_dict=True)
            same = results[f"{name}.{scheme}.detector_same_z_scores"] = bool((a.z_score == b.z_score).all())
            results[f"{name}.{scheme}.z_score"] = b.z_score.tolist()
            ok &= same
    results["ok"] = bool(ok)
    report(results, args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
