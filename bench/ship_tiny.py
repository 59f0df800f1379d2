"""Ship the tiny models trained by bench/train_tiny.sh: write moetorch/assets/heldout_sample.txt
(held-out standard-library files, never trained on) and each model's recipe.json with its
held-out perplexities.

    python bench/ship_tiny.py --phimoe-log LOG --jetmoe-log LOG
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from moetorch import AutoModelForCausalLM, Tokenizer
from moetorch.defaults import ASSETS, EMBEDDED, HELDOUT_SAMPLE, heldout_perplexity
from moetorch.train.config import TrainingConfig
from moetorch.train.data import read_text, split_by_file, stdlib_files, stdlib_root

RECIPE = ("bench/train_tiny.sh  # tokenizer: moetorch train-tokenizer --data stdlib --vocab-size 4096; then per model: "
          "moetorch train --model {name} --tokenizer OUT/tokenizer --data stdlib --seed 0 --lr 3e-3 --min-lr-ratio 0.1 "
          "--weight-decay 0.1 --grad-clip 1.0 --seq-len 256 --batch-size 64 --max-steps 2000 --warmup-steps 100")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--phimoe-log", required=True)
    p.add_argument("--jetmoe-log", required=True)
    p.add_argument("--chars", type=int, default=60000)
    args = p.parse_args()
    files = stdlib_files()
    names = [f.relative_to(stdlib_root()).as_posix() for f in files]
    _, held = split_by_file(names, TrainingConfig().eval_fraction)
    text = "".join(read_text(files[i]) for i in held)[: args.chars]
    HELDOUT_SAMPLE.write_text(text, encoding="utf-8")
    logs = {"tiny-phimoe": args.phimoe_log, "tiny-jetmoe": args.jetmoe_log}
    for name in EMBEDDED:
        events = [json.loads(line) for line in open(logs[name])]
        end = next(e for e in reversed(events) if e.get("event") == "end")
        model = AutoModelForCausalLM.from_pretrained(ASSETS / name, dtype="float32")
        tok = Tokenizer.from_pretrained(ASSETS / name)
        ppl = heldout_perplexity(model, tok, text)
        recipe = {
            "model": name,
            "parameters": model.num_parameters(),
            "trained_on": "Python standard library sources (.py), held-out files chosen by SHA-1 of their path",
            "training_device": "NVIDIA H200, bf16 autocast, Python 3.12 stdlib",
            "command": RECIPE.format(name=name),
            "steps": end["step"],
            "tokens": end["tokens"],
            "training_heldout_ppl": end["eval_ppl"],
            "heldout_sample": HELDOUT_SAMPLE.name,
            "heldout_sample_ppl": ppl,
            "heldout_sample_recorded_with":
                f"float32 CPU, torch {torch.__version__}, Python {platform.python_version()}",
        }
        (ASSETS / name / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
        print(name, f"held-out sample ppl {ppl:.3f}, training held-out ppl {end['eval_ppl']:.3f}")


if __name__ == "__main__":
    main()
