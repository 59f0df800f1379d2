"""`Trainer`: causal-LM training of PhiMoE and JetMoE models on one device, or data-parallel over
the processes torchrun starts (`distributed.py`: each process its own GPU and share of each batch).

One optimizer step = `grad_accum` micro-batches of `batch_size` packed sequences; each micro-batch's
loss is the model's own `loss` (cross-entropy + its router aux-loss coefficient times `aux_loss`,
with `output_router_logits=True`), divided by `grad_accum`. Every micro-batch holds the same number
of label tokens, so accumulating N micro-batches gives the cross-entropy gradient of one N-times
larger batch; the router loss, a product of per-batch statistics, is per micro-batch (as in
Transformers' Trainer and Megatron). PhiMoE's sparsemixer samples its experts in train mode: the
sampling draws from torch's RNG, which checkpoints save and `resume` restores.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..tokenizer import Tokenizer
from ..utils import handling_signals
from . import checkpointing as ckpt
from .config import CONFIG_FILE, TrainingConfig, TrainingConfigError
from .data import ShuffledStream, build_data, contains
from .distributed import Group, PeerFailed
from .presets import aux_loss_coef, build_model, check_overrides, has_weights

logger = logging.getLogger("moetorch")

LOG_FILE = "train_log.jsonl"


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """The learning-rate multiplier of optimizer step `step` (0-based): linear warmup to 1 over
    `warmup_steps`, then a cosine from 1 down to `min_lr_ratio` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def expert_load_stats(counts_RE: torch.Tensor) -> dict[str, Any]:
    """Load balance from per-router expert counts: the fraction of assignments per expert, and
    max/mean of those fractions (1.0 = perfectly balanced, E = everything on one expert)."""
    frac_RE = counts_RE / counts_RE.sum(-1, keepdim=True).clamp(min=1)
    imbalance_R = frac_RE.max(-1).values * frac_RE.shape[-1]
    return {
        "load_imbalance": round(float(imbalance_R.mean()), 4),
        "load_imbalance_max": round(float(imbalance_R.max()), 4),
        "expert_load": [[round(x, 4) for x in row] for row in frac_RE.tolist()],
    }


def end_of_text(tokenizer: Tokenizer | None, config) -> int:
    """The token that ends each document in the data: the tokenizer's eos (which text data is
    built with), else the model config's `eos_token_id` (the first, if a list)."""
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    if eos is None:
        eos = config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    if not isinstance(eos, int):
        raise TrainingConfigError("document_attention needs the token that ends each document: the tokenizer has "
                                  "no eos_token and the model config no eos_token_id")
    return eos


def document_positions(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """Positions [B, T] that count from 0 at each window's start and again after each `eos`."""
    T = ids.shape[1]
    t = torch.arange(T, device=ids.device).expand_as(ids)
    starts = torch.zeros_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, :-1] == eos
    return t - torch.where(starts, t, 0).cummax(dim=1).values


class Trainer:
    """Trains a causal-LM model as `config` (a `TrainingConfig` or its dict) says.

    `model` and `tokenizer` (a `moetorch.Tokenizer` or a directory) replace the ones the config
    names. With `config.resume`, the model, optimizer, scheduler, data position and RNG states come
    from a checkpoint, and training continues exactly where that checkpoint left off.

    Under torchrun (`WORLD_SIZE` > 1) every process builds a Trainer with the same config: each
    trains on `batch_size` sequences of every micro-batch step, so a step reads `processes x
    grad_accum x batch_size` sequences; process 0 logs, reports and writes the checkpoints.
    """

    def __init__(self, config: TrainingConfig | dict[str, Any], model=None, tokenizer=None) -> None:
        cfg = config if isinstance(config, TrainingConfig) else TrainingConfig.from_dict(config)
        self.config = cfg
        self.group = Group.from_environment(cfg.device, cfg.ddp_timeout)
        self.output_dir = Path(cfg.output_dir)
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise FileExistsError(f"output_dir: {self.output_dir} is a file, not a directory")
        made = not self.output_dir.exists()
        self._building_ddp = False
        self.output_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._setup(model, tokenizer)
        except BaseException as e:
            # a run that could not start leaves no empty output directory of its own behind
            if self.group.main and made and not any(p.is_file() for p in self.output_dir.rglob("*")):
                shutil.rmtree(self.output_dir, ignore_errors=True)
            # The other processes stop too, naming this one's error; not once DDP is being built,
            # whose own messages the others are then waiting in (torchrun stops them).
            if isinstance(e, Exception) and not isinstance(e, PeerFailed) and not self._building_ddp:
                self.group.agree(e)
            raise

    def _setup(self, model, tokenizer) -> None:
        cfg, group = self.config, self.group
        if group.main:
            ckpt.clean_temporary(self.output_dir)
        self.log_path = self.output_dir / LOG_FILE
        self.device = group.device(cfg.device)
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.amp_dtype = torch.bfloat16 if use_bf16 else None
        resume_dir = self._resume_dir()
        if resume_dir is None and ckpt.list_checkpoints(self.output_dir):
            raise FileExistsError(
                f"output_dir: {self.output_dir} already holds checkpoints; pass resume=True (--resume) to "
                "continue that run, or choose another output_dir"
            )
        if (resume_dir is not None and resume_dir.resolve().parent != self.output_dir.resolve()
                and ckpt.list_checkpoints(self.output_dir)):
            # Its checkpoints would be overwritten, step for step, by those of the run resumed here.
            raise FileExistsError(
                f"output_dir: {self.output_dir} holds checkpoints of its own run; resume {resume_dir} (from "
                "elsewhere) into another output_dir, or resume this one's with resume=True (--resume)"
            )
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        self.tokenizer, self.tokenizer_dir = self._tokenizer(tokenizer, resume_dir)
        if model is not None:
            if resume_dir is not None:
                raise ValueError("model: a resumed run loads its model from the checkpoint; pass no model")
            self.model = model.to(self.device)
        elif resume_dir is not None:
            from ..auto import AutoModelForCausalLM, model_type_of
            from ..configuration import read_config_dict

            # --set on resume changes the checkpoint's config (say, an aux-loss coefficient), as it
            # would a fresh run's; a field the checkpoint's weights fix fails to load, naming it.
            check_overrides(model_type_of(read_config_dict(resume_dir), str(resume_dir)), cfg.model_overrides)
            self.model = AutoModelForCausalLM.from_pretrained(resume_dir, dtype=torch.float32, device=self.device,
                                                              **cfg.model_overrides)
        else:
            self.model = build_model(cfg.model, self.tokenizer, cfg.model_overrides, cfg.seed, self.device)
        if group.rank:  # the same initial weights everywhere; each process its own random draws
            torch.manual_seed(cfg.seed + group.rank)
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        max_positions = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(max_positions, int) and cfg.seq_len > max_positions:
            raise TrainingConfigError(
                f"seq_len {cfg.seq_len} is longer than the model's max_position_embeddings {max_positions}; "
                f"shorten it, or train a longer model (--set max_position_embeddings={cfg.seq_len})"
            )
        if cfg.warmup_steps > cfg.max_steps:
            logger.warning("warmup_steps %d > max_steps %d: the learning rate never reaches lr %g nor decays",
                           cfg.warmup_steps, cfg.max_steps, cfg.lr)
        self.model.train()
        self.aux_coef = aux_loss_coef(self.model)
        self.eos_id = end_of_text(self.tokenizer, self.model.config) if cfg.document_attention else None

        tokenizer_files = [self.tokenizer_dir / n for n in ckpt.TOKENIZER_FILES] if self.tokenizer_dir else []

        def data():
            return build_data(cfg, self.tokenizer, self.model.config.vocab_size, self.output_dir / "data",
                              tokenizer_files)

        if group.main:  # the others then read its tokenized cache
            self.data = data()
            if self.eos_id is not None and not contains(self.data.train.tokens, self.eos_id):
                logger.warning(
                    "document_attention: the document end (token %d, the %s) never occurs in the training data, "
                    "so each window attends as one document; pass the tokenizer the data was made with "
                    "(--tokenizer), or the model's eos_token_id (--set eos_token_id=N)", self.eos_id,
                    "tokenizer's eos_token" if self.tokenizer is not None and self.tokenizer.eos_token_id is not None
                    else "model config's eos_token_id")
        group.agree()
        if not group.main:
            self.data = data()
        self.order = ShuffledStream(len(self.data.train), cfg.seed)

        self.params = list(dict.fromkeys(p for p in self.model.parameters() if p.requires_grad))
        decay = [p for p in self.params if p.dim() >= 2]  # matrices and expert stacks; not biases/norms
        no_decay = [p for p in self.params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=self.device.type == "cuda",
        )
        # A closure, not an object: LambdaLR saves no state for it, so a resumed run's max_steps applies.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.config.warmup_steps, self.config.max_steps,
                                                self.config.min_lr_ratio)
        )
        self.step = 0  # optimizer steps done
        self.data_position = 0  # sequences of the shuffled stream consumed
        self.tokens_seen = 0
        self.last_eval: dict[str, Any] | None = None
        self.last_checkpoint: Path | None = None
        self._reset_interval()
        if resume_dir is not None:
            self._restore(resume_dir)  # restores the RNGs last: nothing may draw after it
        elif group.main:
            self._start_log(cfg.replace(resume=False), None)
        # Every process must go on from the same state: a process that sees another output_dir
        # (a machine without the shared file system) would resume another checkpoint, or none.
        states = group.agree(same=(resume_dir.name if resume_dir else None, self.step, self.data_position))
        if any(state != states[0] for state in states):
            seen = "; ".join(f"process {rank}: {name} (step {step}, data position {pos})" if name else
                             f"process {rank}: no checkpoint" for rank, (name, step, pos) in enumerate(states))
            raise TrainingConfigError(
                f"the processes did not resume the same checkpoint of {self.output_dir} ({seen}); every process "
                "must see the same output_dir (on several machines, a shared file system)"
            )
        self.forward_model = self.model  # what training steps call: under several processes, DDP around it
        if group.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self._building_ddp = True
            # The rotary tables, the models' only buffers, are the same everywhere: not re-sent each
            # forward. The gradients live in DDP's buckets, not in a second copy beside them.
            self.forward_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, gradient_as_bucket_view=True)
            self._building_ddp = False

    # ---- setup helpers ---------------------------------------------------------------------------
    def _resume_dir(self) -> Path | None:
        resume = self.config.resume
        if resume in (False, None, ""):
            return None
        if resume is True or resume in ("latest", "auto"):
            found = ckpt.latest_checkpoint(self.output_dir)
            if found is None:
                # a branch of another run that saved no checkpoint yet: from its branch point again
                found = ckpt.branch_point(self.output_dir)
                if found is not None:
                    logger.warning("resume: %s has no checkpoint yet; it is a branch of %s (its %s says so), which "
                                   "it resumes from again", self.output_dir, found, CONFIG_FILE)
            if found is None and resume != "auto":
                raise FileNotFoundError(f"resume: no complete checkpoint in {self.output_dir}")
            return found
        path = Path(resume)
        if not (path.is_dir() and ckpt.is_complete(path)):
            raise FileNotFoundError(f"resume: {path} is not a complete training checkpoint directory")
        return path

    def _tokenizer(self, tokenizer, resume_dir: Path | None) -> tuple[Tokenizer | None, Path | None]:
        """The tokenizer and the directory its files are copied from into checkpoints: the one
        passed in, else the resumed checkpoint's copy, else `config.tokenizer`, else the one beside
        the weights `config.model` names; None when there is none (token-array data)."""
        if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
            return tokenizer, None
        model = self.config.model

        def beside(path) -> bool:
            return path is not None and (Path(path) / "tokenizer.json").is_file()

        if tokenizer is not None:
            path = Path(tokenizer)
        elif beside(resume_dir):
            path = resume_dir
        elif self.config.tokenizer is not None:
            path = Path(self.config.tokenizer)
        elif has_weights(model) and beside(model):
            path = Path(model)
        else:
            return None, None
        try:
            return Tokenizer.from_pretrained(path), path
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"tokenizer: {e}") from e

    def _start_log(self, config: TrainingConfig, resumed_from: dict[str, Any] | None) -> None:
        """A run of this output_dir starts: its training_config.json, and a log that holds its
        `start` record (`resumed_from`: the checkpoint and step a branch starts from, else None)."""
        (self.output_dir / CONFIG_FILE).write_text(config.to_json(), encoding="utf-8")
        self.log_path.write_text("")
        self._log({"event": "start", **self._describe(), "resumed_from": resumed_from})

    def _describe(self) -> dict[str, Any]:
        m = self.model
        return {
            "step": self.step, "model_type": m.config.model_type, "model_class": type(m).__name__,
            "parameters": m.num_parameters(), "device": str(self.device), "processes": self.group.world,
            "precision": "bf16-autocast" if self.amp_dtype else "fp32", "data": self.data.info,
            "config": self.config.to_dict(),
        }

    def _restore(self, path: Path) -> None:
        cfg = self.config
        state = ckpt.load_state(path)
        if cfg.max_steps < state["step"]:
            raise TrainingConfigError(f"max_steps {cfg.max_steps} is below step {state['step']} of the checkpoint "
                                      f"{path}: nothing to train (raise max_steps to continue)")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.data_position, self.tokens_seen = state["step"], state["data_position"], state["tokens_seen"]
        # The config in force wins over the saved hyperparameters (identical unless changed on resume).
        self.scheduler.base_lrs = [cfg.lr for _ in self.optimizer.param_groups]
        factor = lr_factor(self.step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        for param_group, wd in zip(self.optimizer.param_groups, (cfg.weight_decay, 0.0)):
            param_group.update(lr=cfg.lr * factor, weight_decay=wd, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.last_checkpoint = path
        group = self.group
        if group.main:
            if path.resolve().parent == self.output_dir.resolve():
                self._truncate_log(self.step, ckpt.set_aside_later_checkpoints(self.output_dir, self.step))
            else:
                # A branch: another run's checkpoint into an output_dir with none of its own. It starts
                # this directory's config (whose `resume` names the branch point, absolute, so that a
                # resume here before the first checkpoint branches again) and log (an earlier attempt's
                # records, which saved no checkpoint, go).
                source = str(path.resolve())
                self._start_log(cfg.replace(resume=source), {"checkpoint": source, "step": self.step})
        self._log({"event": "resume", "step": self.step, "checkpoint": str(path)})
        self._write(f"resumed from {path} at step {self.step}")
        saved = state.get("rng_ranks") or [state["rng"]]
        if len(saved) == group.world:
            ckpt.restore_rng(saved[group.rank], self.device)
        else:
            if group.main:
                logger.warning("%s was saved by %d process(es) and resumes in %d: the data goes on where it stopped, "
                               "%d sequences a step now, but random draws (PhiMoE's sparsemixer, jitter) do not "
                               "replay", path, len(saved), group.world,
                               group.world * cfg.grad_accum * cfg.batch_size)
            ckpt.restore_rng(saved[min(group.rank, len(saved) - 1)], self.device)
            if group.rank >= len(saved):
                torch.manual_seed(cfg.seed + group.rank + 7919 * self.step)

    def _truncate_log(self, step: int, aside: Path | None = None) -> None:
        """Drop log records after `step`: they describe steps the resumed run redoes. `aside` (the
        abandoned checkpoints' directory of a rewind) gets them, in a log of its own."""
        if not self.log_path.exists():
            return
        kept, dropped = [], []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("step", 0) <= step and record.get("event") != "end":
                kept.append(line)
            else:
                dropped.append(line)
        if aside is not None:
            (aside / LOG_FILE).write_text("".join(line + "\n" for line in dropped), encoding="utf-8")
        tmp = self.log_path.with_name(f"{ckpt.TMP_PREFIX}{LOG_FILE}")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.log_path)

    # ---- logging ---------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not self.group.main:
            return
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")

    def _write(self, message: str) -> None:
        if self.group.main:
            tqdm.write(f"[moetorch] {message}", file=sys.stderr)

    def _reset_interval(self) -> None:
        self._acc = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, aux, grad norm
        self._acc_steps = 0
        self._load: torch.Tensor | None = None
        self._t0 = time.perf_counter()
        self._paused = 0.0  # seconds of evaluation and checkpointing inside the interval

    def _count_load(self, router_logits: tuple[torch.Tensor, ...]) -> None:
        # JetMoE lists its attention router twice per layer (Transformers' convention): count it once.
        routers = list({id(r): r for r in router_logits}.values())
        K, E = self.model.config.num_experts_per_tok, routers[0].shape[-1]
        if self._load is None:
            self._load = torch.zeros(len(routers), E, device=self.device)
        for i, logits_NE in enumerate(routers):
            ids_N = logits_NE.detach().topk(K, dim=-1).indices.reshape(-1)
            self._load[i].scatter_add_(0, ids_N, torch.ones_like(ids_N, dtype=self._load.dtype))

    def _log_train(self, bar: tqdm) -> None:
        group = self.group
        if group.world > 1:  # the processes' mean loss (each its own share of the batch) and summed loads
            group.sum_(self._acc).div_(group.world)
            group.sum_(self._load)
            if not group.main:
                self._reset_interval()
                return
        loss, aux, norm = (x / self._acc_steps for x in self._acc.tolist())  # one host sync per record
        seconds = max(time.perf_counter() - self._t0 - self._paused, 1e-9)
        cfg = self.config
        tokens = self._acc_steps * group.world * cfg.grad_accum * cfg.batch_size * cfg.seq_len
        record = {
            "event": "train", "step": self.step, "loss": loss, "ce": loss - self.aux_coef * aux, "aux_loss": aux,
            "lr": self._lr, "grad_norm": norm, "tokens": self.tokens_seen, "tokens_per_s": round(tokens / seconds, 1),
            **expert_load_stats(self._load),
        }
        self._log(record)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self._lr:.2e}", tok_s=f"{tokens / seconds:,.0f}", refresh=False)
        self._write(
            f"step {self.step}/{cfg.max_steps}  loss {loss:.4f}  ce {record['ce']:.4f}  aux {aux:.4f}  "
            f"lr {self._lr:.2e}  |g| {norm:.3f}  {record['tokens_per_s']:,.0f} tok/s  "
            f"load max/mean {record['load_imbalance']:.2f} (worst {record['load_imbalance_max']:.2f})"
        )
        self._reset_interval()

    # ---- training --------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _positions(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The forward's `position_ids` with `document_attention` (none without): positions that
        start again after each end-of-text token, so that each document attends to itself alone
        (the models read such positions as packed sequences; on a GPU, the varlen kernel)."""
        if not self.config.document_attention:
            return {}
        return {"position_ids": document_positions(ids, self.eos_id)}

    def _train_step(self) -> None:
        cfg, model, group = self.config, self.forward_model, self.group
        model.train()
        self._lr = self.scheduler.get_last_lr()[0]
        B = cfg.batch_size
        for a in range(cfg.grad_accum):
            # micro-batch a of the step: the next processes x B sequences, B of them this process's
            idx = self.order.take(self.data_position + (a * group.world + group.rank) * B, B)
            ids = self.data.train.get(idx).to(self.device, non_blocking=True)
            last = a == cfg.grad_accum - 1
            # (DDP averages the gradients over the processes in the last micro-batch's backward)
            with nullcontext() if last or group.world == 1 else model.no_sync():
                with self._autocast():
                    out = model(ids, labels=ids, output_router_logits=True, use_cache=False, **self._positions(ids))
                (out.loss / cfg.grad_accum).backward()
            self._acc[0] += out.loss.detach().double() / cfg.grad_accum
            self._acc[1] += out.aux_loss.detach().double() / cfg.grad_accum
            self._count_load(out.router_logits)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        self._acc[2] += torch.nn.utils.clip_grad_norm_(self.params, max_norm).double()
        self.optimizer.step()
        self.scheduler.step()
        # Under DDP the gradients stay the views of its buckets (freed, the next micro-batches
        # would accumulate into new tensors beside them).
        self.optimizer.zero_grad(set_to_none=group.world == 1)
        self._acc_steps += 1
        self.step += 1
        self.data_position += group.world * cfg.grad_accum * B
        self.tokens_seen += group.world * cfg.grad_accum * B * cfg.seq_len

    def train(self, until_step: int | None = None) -> dict[str, Any]:
        """Train to `config.max_steps` (or stop after step `until_step`, keeping the schedule).

        Logs every `log_every` steps, evaluates every `eval_every` steps and checkpoints every
        `save_every` steps, and always evaluates and checkpoints after the last step. Returns a
        summary: step, last held-out loss/perplexity, last checkpoint. With `save_on_interrupt`
        (the default), Ctrl-C or SIGTERM ends the step in progress, saves a checkpoint and returns
        early; the summary's `interrupted` names the signal (a second signal raises
        KeyboardInterrupt at once).
        """
        cfg = self.config
        stop = cfg.max_steps if until_step is None else min(until_step, cfg.max_steps)
        if self.step == 0:
            m = self.model
            world = self.group.world
            where = f"{world} processes ({self.device.type})" if world > 1 else str(self.device)
            self._write(
                f"training {type(m).__name__} ({m.num_parameters() / 1e6:.2f}M parameters) on {where}"
                f"{' with bf16 autocast' if self.amp_dtype else ' in fp32'}: {self.data.info['train_tokens']:,} "
                f"training tokens, {self.data.info['eval_tokens']:,} held-out; {cfg.max_steps} steps of "
                f"{world * cfg.grad_accum * cfg.batch_size * cfg.seq_len:,} tokens; log {self.log_path}"
            )
        self._reset_interval()
        self.interrupted, self._signal = None, 0
        with self._stop_signals(), tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step",
                                        file=sys.stderr, disable=not (cfg.progress and self.group.main),
                                        dynamic_ncols=True) as bar:
            while self.step < stop and not self._stop_requested():
                self._train_step()
                self._stop_requested()  # a signal during the step: no periodic evaluation after it
                bar.update(1)
                last = self.step == cfg.max_steps
                # (a stop by signal logs the steps since the last record: a resume does not redo them)
                if self.step % cfg.log_every == 0 or self.step == stop or self.interrupted is not None:
                    self._log_train(bar)
                paused = time.perf_counter()
                if last or (cfg.eval_every and self.step % cfg.eval_every == 0 and self.interrupted is None):
                    self.evaluate()
                if last or (cfg.save_every and self.step % cfg.save_every == 0):
                    self.save_checkpoint()
                self._paused += time.perf_counter() - paused
            if self.interrupted is not None and self.step < stop:  # else the run ended anyway
                if self.last_checkpoint is None or ckpt.checkpoint_step(self.last_checkpoint) != self.step:
                    self.save_checkpoint()
                self._log({"event": "interrupted", "step": self.step, "signal": self.interrupted,
                           "checkpoint": str(self.last_checkpoint)})
                self._write(f"{self.interrupted}: stopped after step {self.step}; checkpoint {self.last_checkpoint}")
        if self.step == cfg.max_steps:
            if self.last_eval is None or self.last_eval["step"] != self.step:
                self.evaluate()
            if self.last_checkpoint is None or ckpt.checkpoint_step(self.last_checkpoint) != self.step:
                self.save_checkpoint()
        summary = {"step": self.step, "tokens": self.tokens_seen,
                   "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None}
        if self.last_eval is not None:
            summary.update({k: v for k, v in self.last_eval.items() if k != "event"})
            summary["step"] = self.step
        if self.interrupted is not None and self.step < stop:
            summary["interrupted"] = self.interrupted
        elif self.step == cfg.max_steps:
            self._log({"event": "end", **summary})
        return summary

    def _stop_requested(self) -> bool:
        """Whether a signal asks to stop; under torchrun the processes agree (the largest signal
        number any of them got), so that all stop after the same step."""
        if self.interrupted is None:
            signum = self.group.max_int(self._signal)
            if signum:
                self.interrupted = signal.Signals(signum).name
        return self.interrupted is not None

    def _stop_signals(self):
        """While training: the first SIGINT or SIGTERM is noted (the loop then saves and stops after
        the step in progress, `self.interrupted` naming it); a second raises KeyboardInterrupt. The
        previous handlers come back afterwards. With `save_on_interrupt=False`, in a thread other
        than the main one, and for a signal the process ignores, the signals are left alone."""
        if not self.config.save_on_interrupt:
            return nullcontext()

        def handler(signum, frame):
            if self._signal:
                raise KeyboardInterrupt
            self._signal = signum  # read after each step (by every process, under torchrun)
            if self.group.main:  # os.write, not print: the handler may run inside a write to sys.stderr
                os.write(2, f"\n[moetorch] {signal.Signals(signum).name}: stopping after the step in progress, "
                            "then saving a checkpoint (Ctrl-C again stops at once)\n".encode())

        return handling_signals(handler, signal.SIGINT, signal.SIGTERM)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any] | None:
        """Held-out loss (mean token cross-entropy, no router loss) and perplexity (its exp).

        Runs in eval mode under a forked RNG, so it changes nothing a later training step draws.
        Under torchrun every process must call it (each evaluates its share of the batches).
        """
        held = self.data.eval
        if held is None:
            return None
        cfg, model, group = self.config, self.model, self.group
        bs = cfg.eval_batch_size or cfg.batch_size
        n = len(held) if cfg.eval_max_batches is None else min(len(held), bs * cfg.eval_max_batches)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        was_training = model.training
        model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        starts = range(0, n, bs)[group.rank::group.world]  # under torchrun each process a share of the batches
        with torch.random.fork_rng(devices=devices):
            for start in tqdm(starts, desc="eval", leave=False, file=sys.stderr,
                              disable=not (cfg.progress and group.main) or n <= bs):
                ids = held.get(np.arange(start, min(start + bs, n))).to(self.device)
                with self._autocast():
                    out = model(ids, labels=ids, output_router_logits=False, use_cache=False, **self._positions(ids))
                total += out.loss.double() * ids.shape[0] * (cfg.seq_len - 1)
        model.train(was_training)
        group.sum_(total)
        count = n * (cfg.seq_len - 1)
        loss = total.item() / count
        # label tokens: the ones the loss averages over (seq_len - 1 a window); the start record's
        # data.eval_tokens counts the held-out windows' tokens, as data.train_tokens the training ones'
        self.last_eval = {"event": "eval", "step": self.step, "eval_loss": loss,
                          "eval_ppl": math.exp(min(loss, 700.0)), "eval_label_tokens": count}
        self._log(self.last_eval)
        self._write(f"step {self.step}: held-out loss {loss:.4f}, perplexity {self.last_eval['eval_ppl']:.2f} "
                    f"({count:,} label tokens)")
        return self.last_eval

    def save_checkpoint(self) -> Path:
        """Write `checkpoint-<step>` (model, tokenizer, trainer state) atomically; see `checkpointing`.
        Under torchrun every process must call it (process 0 writes, with every process's RNG state)."""
        group = self.group
        rngs = group.gather(ckpt.capture_rng(self.device))  # each process's own draws, restored to it on resume
        state = {
            "version": 1, "step": self.step, "data_position": self.data_position, "tokens_seen": self.tokens_seen,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rngs[0],
            **({"rng_ranks": rngs} if group.world > 1 else {}),
        }
        path, error = self.output_dir / f"checkpoint-{self.step}", None
        if group.main:
            try:
                path = ckpt.save_checkpoint(
                    self.output_dir, self.step, self.model, state, self.config.replace(resume=False).to_json(),
                    self.tokenizer, self.tokenizer_dir, self.config.keep_checkpoints,
                )
            except Exception as e:
                error = e
        group.agree(error)  # the others go on once it is written
        self.last_checkpoint = path
        self._log({"event": "checkpoint", "step": self.step, "path": str(path)})
        return path
