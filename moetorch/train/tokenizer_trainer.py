"""`train_tokenizer`: a byte-level BPE tokenizer trained on text files, in Transformers' format.

The result holds tokenizer.json and tokenizer_config.json and loads with
`moetorch.Tokenizer.from_pretrained` and `transformers.AutoTokenizer.from_pretrained`.

Special tokens (ids 0-7, in this order): <s>, </s>, <unk>, <pad>, <|system|>, <|user|>,
<|assistant|>, <|end|>. The post-processor puts <s> before every encoded text.

eos is "</s>": plain-text language-model training ends every document with it, so a model trained
on raw text learns to emit </s> where a text ends. The chat template (`PHI35_CHAT_TEMPLATE`, as
Phi-3.5) ends each turn with <|end|> and a whole conversation with eos; a chat fine-tune should stop
generation on <|end|> as well (Phi-3.5 lists both as eos ids in its generation config).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ..tokenizer import PHI35_CHAT_TEMPLATE
from .data import read_text, text_corpus

logger = logging.getLogger("moetorch")

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def build_bpe_tokenizer(texts, vocab_size: int, min_frequency: int = 2, show_progress: bool = True, length=None):
    """A `tokenizers.Tokenizer`: byte-level BPE over the 256 byte symbols plus merges from `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be at least {len(alphabet) + len(SPECIAL_TOKENS)} "
            f"(256 byte symbols + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # (tokenizers draws its bars on stdout, which gets a blank line for each when it is not a terminal)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet, show_progress=show_progress and sys.stdout.isatty(),
    )
    tok.train_from_iterator(texts, trainer, length=length)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def tokenizer_config(model_max_length: int | None = None) -> dict:
    """tokenizer_config.json for a `train_tokenizer` directory."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "additional_special_tokens": SPECIAL_TOKENS[4:],
        "chat_template": PHI35_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "padding_side": "right",
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return config


def train_tokenizer(
    data: str | list[str],
    output_dir: str | Path,
    vocab_size: int = 4096,
    min_frequency: int = 2,
    max_files: int | None = None,
    model_max_length: int | None = None,
    show_progress: bool = True,
) -> Path:
    """Train a byte-level BPE tokenizer on text `data` ("stdlib", a directory, a glob, files) and
    write tokenizer.json and tokenizer_config.json to `output_dir`. Deterministic for fixed input."""
    if max_files is not None and max_files < 1:
        raise ValueError(f"max_files must be a positive integer, got {max_files}")
    if not isinstance(min_frequency, int) or min_frequency < 0:
        raise ValueError(f"min_frequency must be a non-negative integer, got {min_frequency!r}")
    if model_max_length is not None and (not isinstance(model_max_length, int) or model_max_length < 1):
        raise ValueError(f"model_max_length must be a positive integer, got {model_max_length!r}")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output: {out} is a file, not a directory")
    corpus = text_corpus(data, "data", max_files)

    chars = 0

    def texts():
        nonlocal chars
        for f in tqdm(corpus.files, desc="Reading", unit="file", disable=not show_progress):
            text = read_text(f)
            chars += len(text)
            yield text

    tok = build_bpe_tokenizer(texts(), vocab_size, min_frequency, show_progress, length=len(corpus.files))
    if not chars:  # a tokenizer of the 256 byte symbols alone: nothing was learnt
        raise ValueError(f"data: {data!r} holds no text ({len(corpus.files)} file(s), all empty)")
    if tok.get_vocab_size() < vocab_size:
        logger.warning("the tokenizer has %d tokens, fewer than vocab_size %d: the corpus has no more pairs seen "
                       "at least min_frequency (%d) times", tok.get_vocab_size(), vocab_size, min_frequency)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(model_max_length), indent=2) + "\n")
    return out
