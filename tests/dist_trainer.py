"""Run by tests/test_train.py under torchrun (2 CPU processes, gloo): Transformers' Trainer on both
libraries' embedded models with the same weights, data and seeds, data-parallel (DDP) or sharded
(FSDP2). Rank 0 prints one line: LOSSES {"<arch>/<library>": [losses]}."""

import json
import os
import sys
import tempfile

import torch
import transformers

import moetorch
from moetorch.defaults import ASSETS


def main(strategy: str) -> None:
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": (t := torch.randint(5, 4000, (16,), generator=g).tolist()), "labels": t} for _ in range(16)]
    out = {}
    for arch, layer in (("tiny-phimoe", "PhimoeDecoderLayer"), ("tiny-jetmoe", "JetMoeBlock,JetMoeDecoderLayer")):
        for lib in (transformers, moetorch):
            model = lib.AutoModelForCausalLM.from_pretrained(str(ASSETS / arch), dtype=torch.float32)
            extra = {} if strategy == "ddp" else dict(fsdp="full_shard", fsdp_config={
                "fsdp_version": 2, "transformer_layer_cls_to_wrap": layer.split(",")})
            args = transformers.TrainingArguments(
                output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, max_steps=2, report_to=[], use_cpu=True,
                save_strategy="no", logging_steps=1, seed=0, learning_rate=1e-3, ddp_backend="gloo", **extra)
            trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
            trainer.train()
            out[f"{arch}/{lib.__name__}"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if int(os.environ.get("RANK", "0")) == 0:
        print("LOSSES " + json.dumps(out))
    if torch.distributed.is_initialized():  # gloo's threads joined before exit, not torn down by it
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    # Leave without freeing the trainers' FSDP2 modules: on loaded CPUs that teardown hangs now and then
    # in C++, after the process group is gone (about 1 run in 20 on two busy cores), as in
    # tests/test_generate_custom.py.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
