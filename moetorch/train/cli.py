"""`moetorch train` and `moetorch train-tokenizer`: argument definitions and commands.

moetorch/cli.py adds them with `add_train_commands(sub)`. Every `train` flag maps onto one
`TrainingConfig` field; flags left out keep the field's default, or, with --resume, the value the
resumed run was started with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError
from ..cli import int_at_least
from . import checkpointing as ckpt
from .config import CONFIG_FILE, TrainingConfig, TrainingConfigError
from .distributed import PeerFailed

logger = logging.getLogger("moetorch")


def _model_value(text: str) -> Any:
    """A --set value: JSON when it parses (numbers, true/false, null, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# flag -> (TrainingConfig field, type, help); every default lives in TrainingConfig.
_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--model", "model", str, "preset (tiny-phimoe, tiny-jetmoe), model config .json, or checkpoint dir"),
    ("--data", "data", str, "'stdlib', a directory, a glob of .txt/.py/.md files, or a .npy/.bin token file"),
    ("--tokenizer", "tokenizer", str, "tokenizer directory (tokenizer.json); needed for text data"),
    ("--eval-data", "eval_data", str, "separate held-out data (then nothing is split off --data, and "
     "--eval-split/--eval-fraction are unused); files --data also holds are warned about"),
    ("--seq-len", "seq_len", int, "tokens per packed sequence"),
    ("--data-dtype", "data_dtype", str, "element type of a raw .bin token file (uint16, uint32, int32, int64)"),
    ("--max-files", "max_files", int, "use only the first N text files (sorted): quick runs"),
    ("--eval-split", "eval_split", str, "auto, file (whole files by path hash) or fraction (tail of the stream)"),
    ("--eval-fraction", "eval_fraction", float, "share of the data held out"),
    ("--document-attention", "document_attention", _bool,
     "true: tokens attend within their own document (positions restart after each eos token)"),
    ("--batch-size", "batch_size", int, "sequences per micro-batch"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step"),
    ("--max-steps", "max_steps", int, "optimizer steps (sets the cosine schedule's length)"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--min-lr-ratio", "min_lr_ratio", float, "final learning rate as a fraction of --lr"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (matrices only)"),
    ("--beta1", "beta1", float, "AdamW beta1"),
    ("--beta2", "beta2", float, "AdamW beta2"),
    ("--grad-clip", "grad_clip", float, "max gradient norm (0: no clipping)"),
    ("--eval-every", "eval_every", int, "evaluate every N steps (0: only at the end)"),
    ("--eval-batch-size", "eval_batch_size", int, "sequences per evaluation batch"),
    ("--eval-max-batches", "eval_max_batches", int, "cap each evaluation at N batches"),
    ("--save-every", "save_every", int, "checkpoint every N steps (0: only at the end)"),
    ("--keep-checkpoints", "keep_checkpoints", int, "checkpoints kept (the newest)"),
    ("--log-every", "log_every", int, "log every N steps"),
    ("--progress", "progress", _bool, "show a progress bar (true/false)"),
    ("--save-on-interrupt", "save_on_interrupt", _bool,
     "true (default): Ctrl-C or SIGTERM finishes the step, saves a checkpoint and stops (a second stops at once)"),
    ("--seed", "seed", int, "seed of model init, data order and sampling"),
    ("--device", "device", str, "auto, cpu, cuda or cuda:N"),
    ("--precision", "precision", str, "auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32"),
    ("--ddp-timeout", "ddp_timeout", float,
     "under torchrun: seconds a process waits for the others (default 1800; process 0 alone tokenizes the data)"),
]


def add_train_commands(sub: argparse._SubParsersAction) -> None:
    """Add `train` and `train-tokenizer` to the `moetorch` subcommands."""
    train = sub.add_parser("train", help="train a PhiMoE or JetMoE causal LM (see docs/training.md)")
    train.add_argument("--output-dir", required=True, help="where checkpoints and train_log.jsonl go")
    train.add_argument("--train-config", default=None,
                       help="JSON file of TrainingConfig fields; flags given here override it")
    for flag, dest, type_, help_ in _FLAGS:
        train.add_argument(flag, dest=dest, type=type_, default=argparse.SUPPRESS, help=help_)
    train.add_argument("--set", dest="model_set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a model config field, e.g. --set num_hidden_layers=2 (repeatable)")
    train.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true",
                       default=argparse.SUPPRESS, help="recompute activations in backward to save memory")
    train.add_argument("--resume", nargs="?", const=True, default=argparse.SUPPRESS, metavar="CHECKPOINT",
                       help="continue the run in --output-dir from its latest checkpoint, or from CHECKPOINT; "
                            "'auto': resume if there is a checkpoint, else start")
    train.set_defaults(func=cmd_train)

    tok = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on text files")
    tok.add_argument("--data", default="stdlib", help="'stdlib' (default), a directory, a glob or a text file")
    tok.add_argument("--output", required=True, help="directory for tokenizer.json and tokenizer_config.json")
    tok.add_argument("--vocab-size", type=int_at_least(264, " (256 byte symbols + 8 special tokens)"), default=4096,
                     help="vocabulary size, special tokens included (4096)")
    tok.add_argument("--min-frequency", type=int_at_least(0), default=2, help="least count of a pair to merge (2)")
    tok.add_argument("--max-files", type=int_at_least(1), default=None, help="use only the first N files (sorted)")
    tok.add_argument("--model-max-length", type=int_at_least(1), default=None,
                     help="written to tokenizer_config.json")
    tok.set_defaults(func=cmd_train_tokenizer)


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """The run's TrainingConfig: defaults < the resumed run's saved config < --train-config < flags."""
    fields = {f.name for f in dataclasses.fields(TrainingConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    base: dict[str, Any] = {}
    resume = given.get("resume", False)
    if resume:
        in_output_dir = resume is True or resume in ("latest", "auto")
        # The config the resumed checkpoint was saved with (it holds the flags an earlier resume
        # changed); the output dir's copy is the first run's.
        source = ckpt.latest_checkpoint(Path(args.output_dir)) if in_output_dir else Path(resume)
        # (no checkpoint: `auto` starts afresh from the flags, whatever an attempt that saved none left;
        # except in a branch of another run, whose config the Trainer resumes from its branch point again)
        candidates = [] if source is None else \
            [source / CONFIG_FILE] + ([Path(args.output_dir) / CONFIG_FILE] if in_output_dir else [])
        if source is None and ckpt.branch_point(Path(args.output_dir)) is not None:
            candidates = [Path(args.output_dir) / CONFIG_FILE]
        saved = next((path for path in candidates if path.is_file()), None)
        if saved is not None:
            base = TrainingConfig.from_json(saved).to_dict()
            for key in ("model", "tokenizer"):  # a resumed run continues the checkpoint's own
                if key in given and given[key] != base.get(key):
                    logger.warning("--%s %s is not used: the resumed run continues its checkpoint's model and "
                                   "tokenizer (--%s %s)", key, given.pop(key), key, base.get(key))
    if args.train_config:  # its own keys only: a field it leaves out keeps the resumed run's value
        written = TrainingConfig.read_json(args.train_config)
        from_file = TrainingConfig.from_dict(written).to_dict()  # (checked whole)
        base.update({k: from_file[k] for k in written})
    base.update(given)
    base["output_dir"] = args.output_dir
    overrides = dict(base.get("model_overrides") or {})
    for item in args.model_set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TrainingConfigError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = _model_value(value)
    base["model_overrides"] = overrides
    return TrainingConfig.from_dict(base)


def cmd_train(args: argparse.Namespace) -> int:
    from .trainer import Trainer

    if int(os.environ.get("RANK") or 0) > 0:  # under torchrun, process 0 alone warns (each would say the same)
        logger.setLevel(logging.ERROR)
    try:
        config = config_from_args(args)
        trainer = Trainer(config)
    except (TrainingConfigError, FileNotFoundError, FileExistsError, ValueError, CheckpointError, PeerFailed) as e:
        raise SystemExit(f"moetorch train: {e}") from e
    try:
        return _run(trainer)
    finally:
        trainer.group.close()


def _run(trainer) -> int:
    main = trainer.group.main  # under torchrun, process 0 speaks for the run
    resume = f"`moetorch train --output-dir {trainer.output_dir} --resume`"
    try:
        summary = trainer.train()
    except KeyboardInterrupt:
        last = trainer.last_checkpoint
        if main:
            print(f"\n[moetorch] interrupted at step {trainer.step}; "
                  + (f"the last checkpoint is {last}: continue with {resume}" if last else "no checkpoint was saved"),
                  file=sys.stderr)
        return 130
    if summary.get("interrupted"):
        if main:
            print(f"[moetorch] {summary['interrupted']}: stopped at step {summary['step']} with checkpoint "
                  f"{summary['checkpoint']}: continue with {resume}", file=sys.stderr)
        return 128 + int(getattr(signal, summary["interrupted"]))
    if main:
        print(json.dumps(summary))
        if summary.get("eval_ppl") is not None:
            print(f"[moetorch] held-out perplexity {summary['eval_ppl']:.3f} at step {summary['step']}; "
                  f"checkpoint {summary['checkpoint']}", file=sys.stderr)
    return 0


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from .tokenizer_trainer import train_tokenizer

    try:
        out = train_tokenizer(args.data, args.output, args.vocab_size, args.min_frequency, args.max_files,
                              args.model_max_length)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise SystemExit(f"moetorch train-tokenizer: {e}") from e
    print(f"[moetorch] tokenizer written to {out}", file=sys.stderr)
    return 0
