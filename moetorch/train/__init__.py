"""Training: `Trainer` and `TrainingConfig`, the corpus helpers, and the BPE tokenizer trainer.

See docs/training.md. The command line is `moetorch train` and `moetorch train-tokenizer`.
"""

from .config import TrainingConfig, TrainingConfigError
from .data import split_by_file, stdlib_files, text_corpus
from .presets import PRESETS, build_model
from .tokenizer_trainer import SPECIAL_TOKENS, train_tokenizer
from .trainer import Trainer, lr_factor

__all__ = [
    "PRESETS",
    "SPECIAL_TOKENS",
    "Trainer",
    "TrainingConfig",
    "TrainingConfigError",
    "build_model",
    "lr_factor",
    "split_by_file",
    "stdlib_files",
    "text_corpus",
    "train_tokenizer",
]
