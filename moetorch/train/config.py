"""`TrainingConfig`: every knob of a training run, as a plain dataclass that round-trips through JSON.

A run writes its config to `<output_dir>/training_config.json` and into every checkpoint, so that
`moetorch train --resume --output-dir DIR` needs no other argument. (The output_dir's copy of a
branch, a run resumed from another run's checkpoint, keeps `resume`: the checkpoint it started from.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_FILE = "training_config.json"
PRECISIONS = ("auto", "bf16", "fp32")
EVAL_SPLITS = ("auto", "file", "fraction")


class TrainingConfigError(ValueError):
    """A training option has a bad value; the message names the option."""


@dataclass
class TrainingConfig:
    """Options of `moetorch.train.Trainer` (and of `moetorch train`, one flag per field).

    model: a preset name (see `moetorch.train.presets.PRESETS`), a model config (dict or .json
        file, with "model_type"), or a checkpoint directory to continue from (its weights).
    data: text (Python's standard library as "stdlib", a directory, a glob, a file, or a list of
        files; .txt/.py/.md) tokenized with `tokenizer`, or a pre-tokenized .npy/.bin array.
    eval_split: "file" holds out whole text files chosen by a hash of their path, "fraction" the
        last `eval_fraction` of the token stream; "auto" is "file" for text and "fraction" for arrays.
        `eval_data` instead gives a separate held-out source (then nothing is split off `data`).
    """

    model: str | dict[str, Any] = "tiny-phimoe"
    data: str | list[str] = "stdlib"
    output_dir: str = "runs/moetorch"
    tokenizer: str | None = None
    eval_data: str | list[str] | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # data
    seq_len: int = 256
    data_dtype: str = "uint16"  # element type of a raw .bin token file
    max_files: int | None = None  # use only the first N text files (after sorting): quick runs
    eval_split: str = "auto"
    eval_fraction: float = 0.05
    # each token attends within its own document (positions start again after each end-of-text
    # token), as packed fine-tuning does; False: across the whole window, as pretraining often does
    document_attention: bool = False
    # optimisation
    batch_size: int = 32  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping (the norm is still logged)
    # evaluation, checkpoints, logging
    eval_every: int = 200  # steps; 0: only at the end
    eval_batch_size: int | None = None  # default: batch_size
    eval_max_batches: int | None = None  # cap each evaluation (None: the whole held-out set)
    save_every: int = 500  # steps; 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    progress: bool = True  # tqdm progress bar on stderr
    # Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption) during train(): finish the step in
    # progress, save a checkpoint and stop; a second signal stops at once. False: the signals act
    # as they would without the trainer (Ctrl-C raises KeyboardInterrupt in the step).
    save_on_interrupt: bool = True
    # runtime
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available, else cpu
    precision: str = "auto"  # "auto": bf16 autocast on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    resume: bool | str = False  # True: the latest checkpoint in output_dir; or a checkpoint directory
    # Under torchrun: seconds a process waits in a collective for the others (process 0 alone
    # tokenizes the data and writes each checkpoint meanwhile; raise it for a large corpus).
    ddp_timeout: float = 1800.0

    def __post_init__(self) -> None:
        positive = ("seq_len", "batch_size", "grad_accum", "max_steps", "keep_checkpoints", "log_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TrainingConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TrainingConfigError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("eval_batch_size", "eval_max_batches", "max_files"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise TrainingConfigError(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("lr", "weight_decay", "grad_clip", "adam_eps"):
            self._check_number(name, "a finite, non-negative number", lambda v: v >= 0)
        if self.lr == 0:
            raise TrainingConfigError("lr must be positive, got 0 (nothing would be trained)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise TrainingConfigError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        self._check_number("min_lr_ratio", "in [0, 1]", lambda v: 0 <= v <= 1)
        self._check_number("eval_fraction", "in [0, 1)", lambda v: 0 <= v < 1)
        for name in ("beta1", "beta2"):
            self._check_number(name, "in [0, 1)", lambda v: 0 <= v < 1)
        self._check_paths()
        if self.precision not in PRECISIONS:
            raise TrainingConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.eval_split not in EVAL_SPLITS:
            raise TrainingConfigError(f"eval_split must be one of {EVAL_SPLITS}, got {self.eval_split!r}")
        if self.data_dtype not in ("uint16", "uint32", "int32", "int64"):
            raise TrainingConfigError(
                f"data_dtype must be one of uint16, uint32, int32, int64, got {self.data_dtype!r}"
            )
        for name in ("document_attention", "save_on_interrupt", "progress", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise TrainingConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.ddp_timeout, (int, float)) or isinstance(self.ddp_timeout, bool) \
                or not 0 < self.ddp_timeout < float("inf"):
            raise TrainingConfigError(f"ddp_timeout must be a positive number of seconds, got {self.ddp_timeout!r}")
        if not isinstance(self.model_overrides, dict):
            raise TrainingConfigError(f"model_overrides must be a dict, got {type(self.model_overrides).__name__}")

    def _check_number(self, name: str, wanted: str, ok) -> None:
        """A float field: a finite real number (not a bool, a string or None) for which ok holds; kept
        as a Python number (a numpy float is taken, and written to JSON as a float)."""
        value = getattr(self, name)
        if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)) or not math.isfinite(value) \
                or not ok(value):
            raise TrainingConfigError(f"{name} must be {wanted}, got {value!r}")
        if not isinstance(value, (int, float)):
            setattr(self, name, float(value))

    def _check_paths(self) -> None:
        """The fields that name files, directories or devices: strings or paths (model a dict too, data
        and eval_data lists of them too), so that a number or null is named here, not by os.path."""
        def text(value) -> bool:
            return isinstance(value, str)

        def plain(value):
            return os.fspath(value) if isinstance(value, os.PathLike) else value

        def texts(value) -> bool:
            return text(value) or (isinstance(value, list) and bool(value) and all(map(text, value)))

        checks = (
            ("model", lambda v: text(v) or isinstance(v, dict), "a preset name, a path or a config dict"),
            ("data", texts, "a path, a glob, 'stdlib' or a non-empty list of paths"),
            ("eval_data", lambda v: v is None or texts(v), "null, a path or a non-empty list of paths"),
            ("tokenizer", lambda v: v is None or text(v), "null or a path"),
            ("output_dir", text, "a path"),
            ("device", text, "a device name such as 'auto', 'cpu' or 'cuda:0'"),
            ("resume", lambda v: isinstance(v, bool) or text(v), "true, false or a checkpoint path"),
        )
        for name, ok, wanted in checks:
            # pathlib paths and tuples of paths are taken, kept as text and lists (the config is JSON)
            value = getattr(self, name)
            value = [plain(v) for v in value] if isinstance(value, (list, tuple)) else plain(value)
            setattr(self, name, value)
            if not ok(value):
                raise TrainingConfigError(f"{name} must be {wanted}, got {value!r}")

    # ---- dict / json ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        """Build from a dict; unknown keys raise (a typo must not silently train something else)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TrainingConfigError(f"unknown training option(s) {unknown}; known: {sorted(names)}")
        return cls(**data)

    @staticmethod
    def read_json(path: str | os.PathLike) -> dict[str, Any]:
        """The JSON object of a training config file, as written (not checked against the fields)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise TrainingConfigError(f"cannot read training config {path}: {e}") from e
        if not isinstance(data, dict):
            raise TrainingConfigError(f"{path} must hold a JSON object")
        return data

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> TrainingConfig:
        return cls.from_dict(cls.read_json(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def replace(self, **changes: Any) -> TrainingConfig:
        return dataclasses.replace(self, **changes)
