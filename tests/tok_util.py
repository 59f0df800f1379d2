"""A small BPE tokenizer trained in the tests (the `tokenizers` library), with Phi-3.5's special
tokens and chat template, written as tokenizer.json + tokenizer_config.json."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from moetorch.tokenizer import PHI35_CHAT_TEMPLATE

SPECIALS = ["<s>", "</s>", "<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CORPUS = [
    "The mixture of experts routes each token to two experts.",
    "Bananas and dragonfruits make a fine smoothie, with milk and honey.",
    "Solve 2x + 3 = 7: subtract three, then divide by two, so x = 2.",
    "Sparse models activate a few experts per token; dense models use all weights.",
]


def build_tokenizer(directory: Path, vocab_size: int = 300) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": "<s>", "eos_token": "<|end|>", "unk_token": "<unk>", "pad_token": "<pad>",
        "chat_template": PHI35_CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def build_llama_tokenizer(directory: Path, vocab_size: int = 400, **config_fields) -> Path:
    """A SentencePiece-style BPE (byte fallback, "▁" for spaces) written as Phi-3.5-MoE's and JetMoE's
    tokenizer.json are: a Prepend("▁") + Replace(" ", "▁") normalizer, no pre-tokenizer; the
    tokenizer_config.json names LlamaTokenizer, whose pipeline Transformers 5 builds itself."""
    from tokenizers import AddedToken, normalizers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=["<unk>", "<s>", "</s>", *bytes_])
    tok.train_from_iterator(CORPUS * 10 + ["  two spaces\tand a tab\n\nnew lines", "ünïcödé"], trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "<|endoftext|>",
              "unk_token": "<unk>", "pad_token": "<|endoftext|>", "chat_template": PHI35_CHAT_TEMPLATE,
              "clean_up_tokenization_spaces": False, **config_fields}
    (directory / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return directory
