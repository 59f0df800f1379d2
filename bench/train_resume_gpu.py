"""The Trainer on a GPU inside a process group the script made (NCCL, one process): a run of 8
steps with PhiMoE's sampled routing against the same run stopped after step 4 and resumed. The
checkpoint keeps the training GPU's RNG state (`cuda_device`), so the resumed losses replay.

    PYTHONPATH=. python bench/train_resume_gpu.py OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moetorch.train import Trainer, TrainingConfig
from moetorch.train import checkpointing as ckpt

MODEL = {"model_type": "phimoe", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
         "num_experts_per_tok": 2, "max_position_embeddings": 256, "router_jitter_noise": 0.5}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "ids.npy", np.random.default_rng(0).integers(0, 64, 6000))
    (out / "model.json").write_text(json.dumps(MODEL))

    def config(name: str, **kw) -> TrainingConfig:
        return TrainingConfig(model=str(out / "model.json"), data=str(out / "ids.npy"), output_dir=str(out / name),
                              seq_len=32, batch_size=8, max_steps=8, warmup_steps=1, lr=3e-3, eval_every=0,
                              save_every=4, log_every=1, progress=False, eval_fraction=0.1, device="cuda", **kw)

    def losses(name: str) -> list[float]:
        records = map(json.loads, (out / name / "train_log.jsonl").read_text().splitlines())
        return [r["loss"] for r in records if r["event"] == "train"]

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    whole = Trainer(config("a"))
    print("group", whole.group, "device", whole.device)
    whole.train()
    Trainer(config("b")).train(until_step=4)
    state = torch.load(out / "b" / "checkpoint-4" / ckpt.STATE_FILE, weights_only=True)
    print("rng keys", sorted(state["rng"]))
    Trainer(config("b", resume=True)).train()
    a, b = losses("a"), losses("b")
    print("uninterrupted", a)
    print("resumed      ", b)
    print("max rel diff", max(abs(x - y) / abs(x) for x, y in zip(a, b)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
