"""Run by tests/test_train.py under torchrun (2 CPU processes, gloo): moetorch's own Trainer,
data-parallel. Writes its runs under OUT; each process prints one line `RESULT <rank> <json>`.

  A   deterministic routing (no jitter, no router loss), 4 steps: the test compares it with one
      process at twice the batch size.
  B   sampled routing (PhiMoE's jitter), 4 steps, uninterrupted.
  C   the same, stopped after step 3 and resumed by a new Trainer: must equal B exactly.
  D   process 1 alone gets SIGTERM in step 2: both stop after step 2, with checkpoint-2.
  E   process 1 alone fails to start (its data is missing): process 0 stops too, naming it.
  F   process 1 sees no checkpoint where process 0 resumes one: both refuse, naming what each saw.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

from moetorch.train import Trainer, TrainingConfig, TrainingConfigError
from moetorch.train import checkpointing as ckpt
from moetorch.train.distributed import PeerFailed


def main(out: Path, data: str, model: str, arch: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    noisy = {"router_jitter_noise": 0.5} if arch == "phimoe" else {}
    quiet = ({"router_aux_loss_coef": 0.0, "router_jitter_noise": 0.0} if arch == "phimoe" else {"aux_loss_coef": 0.0})

    def config(name: str, overrides: dict, **kw) -> TrainingConfig:
        return TrainingConfig(**{**dict(
            model=model, data=data, output_dir=str(out / name), seq_len=16, batch_size=2, grad_accum=2, max_steps=4,
            warmup_steps=1, lr=3e-3, eval_every=2, save_every=2, log_every=1, progress=False, eval_fraction=0.2,
            model_overrides=overrides), **kw})

    result = {}
    result["A"] = Trainer(config("A", quiet)).train()
    result["B"] = Trainer(config("B", noisy)).train()
    Trainer(config("C", noisy)).train(until_step=3)
    resumed = Trainer(config("C", noisy, resume=True))
    result["C_resumed_at"] = resumed.step
    result["C"] = resumed.train()

    trainer = Trainer(config("D", noisy, save_every=0))
    real = Trainer._train_step

    def step(self):
        if rank == 1 and self.step + 1 == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        real(self)

    Trainer._train_step = step
    before = signal.getsignal(signal.SIGTERM)
    try:
        result["D"] = trainer.train()
    finally:
        Trainer._train_step = real
    result["D_handlers_restored"] = signal.getsignal(signal.SIGTERM) is before

    try:
        Trainer(config("E", noisy, data=data if rank == 0 else str(out / "missing.npy")))
        result["E"] = "started"
    except PeerFailed as e:
        result["E"] = f"PeerFailed: {e}"
    except FileNotFoundError as e:
        result["E"] = f"FileNotFoundError: {e}"
    Trainer(config("F", quiet, max_steps=2, eval_every=0)).train()
    if rank == 1:  # an output_dir of its own, without the checkpoint
        real_latest, real_list = ckpt.latest_checkpoint, ckpt.list_checkpoints
        ckpt.latest_checkpoint, ckpt.list_checkpoints = (lambda d: None), (lambda d: [])
    try:
        Trainer(config("F", quiet, resume="auto"))
        result["F"] = "started"
    except TrainingConfigError as e:
        result["F"] = f"TrainingConfigError: {e}"
    finally:
        if rank == 1:
            ckpt.latest_checkpoint, ckpt.list_checkpoints = real_latest, real_list

    # one write (print writes the newline apart, and the two processes share the pipe)
    os.write(1, f"RESULT {rank} {json.dumps(result)}\n".encode())
    # Leave the group the first Trainer made, as `moetorch train` does, then skip the interpreter's
    # teardown, where gloo's threads behind five DDP models can still abort a process now and then
    # (`terminate called without an active exception`; the CLI test covers the command's own exit).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
