"""moetorch on a GPU against Transformers on the same GPU, on randomly drawn tiny configurations.

    PYTHONPATH=.:bench:tests python bench/random_configs_gpu.py --seeds 0:200 --out r.json

`tests/test_random_configs.py` draws whole configurations (head counts and widths, experts and
top-k, biases, sliding window, RoPE kinds) and checks them on the CPU, where moetorch runs its
torch code. On a GPU the same calls run the Triton kernels (at shapes far from the real models':
head widths of 4 to 16, three experts a token, 2 to 6 experts), the static cache and the CUDA
graphs. Per seed, in float32: the logits of a padded batch (relative error < 1e-4 against
Transformers on the GPU), and greedy search and beam search tokens against Transformers'.
Exits non-zero if any seed fails.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from parity import make_inputs, make_pair
from test_random_configs import JETMOE, PHIMOE, draw_jetmoe, draw_phimoe

from moetorch.gpu_check import real_rows, rel_err, report

LIMIT = 1e-4


@torch.no_grad()
def check(seed: int) -> dict:
    rng = random.Random(seed)
    arch = rng.choice([PHIMOE, JETMOE])
    kw = (draw_phimoe if arch is PHIMOE else draw_jetmoe)(rng)
    direction = rng.choice(["hf_to_ours", "ours_to_hf"])
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = make_pair(arch, Path(tmp), "causal_lm", direction, seed=seed, **kw)
    hf.to("cuda")
    ours.to("cuda")
    out = {"arch": arch.name, "config": {k: v for k, v in kw.items() if k != "rope_scaling"}}
    B, T = rng.randint(1, 3), rng.randint(2, 20)
    ids, mask = make_inputs(kw["vocab_size"], B, T, "left", seed=seed)
    ids, mask = ids.cuda(), mask.cuda()
    valid = mask.bool()
    out["logits_rel_err"] = err = rel_err(real_rows("logits", ours(ids, attention_mask=mask).logits, valid),
                                          real_rows("logits", hf(ids, attention_mask=mask).logits, valid))
    ok = err < LIMIT
    n = rng.randint(1, 8)
    for case, settings in {"greedy": {}, "beam": {"num_beams": 3, "num_return_sequences": 3}}.items():
        common = dict(attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, **settings)
        want = hf.generate(ids, **common)
        got = ours.generate(ids, **common)  # the static cache and graphed steps, by default on a GPU
        out[f"{case}_same_tokens"] = same = torch.equal(want, got)
        ok &= same
    out["ok"] = bool(ok)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="random_configs_gpu")
    p.add_argument("--seeds", default="0:100", help="a range start:stop")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("random_configs_gpu: no CUDA device", file=sys.stderr)
        return 2
    start, stop = map(int, args.seeds.split(":"))
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "seeds": {}}
    for seed in range(start, stop):
        try:
            r = check(seed)
        except Exception:  # a crash is a failure of that seed, with its trace
            r = {"ok": False, "error": traceback.format_exc(limit=4)}
        results["seeds"][seed] = r
        print(f"seed {seed}: {'ok' if r['ok'] else 'FAIL'} {r.get('arch', '')} "
              f"{r.get('logits_rel_err', '')}", flush=True)
        if args.out:  # as it goes: a run cut short keeps its seeds
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    failed = [s for s, r in results["seeds"].items() if not r["ok"]]
    results["failed"] = failed
    results["ok"] = not failed
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    report({k: v for k, v in results.items() if k != "seeds"}, None)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
