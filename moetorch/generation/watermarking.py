"""Text watermarking (Kirchenbauer et al., 2023), as Transformers implements it.

`generate(..., watermarking_config=WatermarkingConfig(...))` adds `bias` to the scores of a
"green" part of the vocabulary before each token is picked; the green part is a permutation of the
vocabulary drawn from a generator seeded by the previous token(s). `WatermarkDetector` counts the
green tokens of a text and tests them against chance (a z-score). The draws follow Transformers'
exactly (the same seeds, tables and `torch.randperm` calls on the same device), so text
watermarked by either library is detected by either.
"""

from __future__ import annotations

import collections
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .logits_process import LogitsProcessor

SEEDING_SCHEMES = ("lefthash", "selfhash")


class WatermarkingConfig:
    """The settings of `WatermarkLogitsProcessor` (and `WatermarkDetector`): the share of the
    vocabulary that is green each step, the bias added to it, the hashing key, the seeding scheme
    ("lefthash": the previous token seeds the draw; "selfhash": the candidate token too) and how
    many previous tokens seed it."""

    def __init__(self, greenlist_ratio: float = 0.25, bias: float = 2.0, hashing_key: int = 15485863,
                 seeding_scheme: str = "lefthash", context_width: int = 1) -> None:
        self.greenlist_ratio = greenlist_ratio
        self.bias = bias
        self.hashing_key = hashing_key
        self.seeding_scheme = seeding_scheme
        self.context_width = context_width

    @classmethod
    def from_dict(cls, config: dict[str, Any], **kwargs: Any) -> WatermarkingConfig:
        if "ngram_len" in config or "keys" in config:
            raise ValueError("watermarking_config: SynthID text watermarking (ngram_len, keys) is not supported by "
                             "moetorch; give the settings of WatermarkingConfig")
        unknown = sorted((config.keys() | kwargs.keys()) - set(cls().to_dict()))
        if unknown:
            raise ValueError(f"watermarking_config: unknown settings {unknown}")
        return cls(**{**config, **kwargs})

    def to_dict(self) -> dict[str, Any]:
        return dict(greenlist_ratio=self.greenlist_ratio, bias=self.bias, hashing_key=self.hashing_key,
                    seeding_scheme=self.seeding_scheme, context_width=self.context_width)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WatermarkingConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"WatermarkingConfig({self.to_dict()})"

    def validate(self) -> None:
        if self.seeding_scheme not in SEEDING_SCHEMES:
            raise ValueError(f"watermarking_config.seeding_scheme must be one of {SEEDING_SCHEMES}, "
                             f"got {self.seeding_scheme!r}")
        if not (isinstance(self.greenlist_ratio, (int, float)) and 0.0 < self.greenlist_ratio < 1.0):
            raise ValueError(f"watermarking_config.greenlist_ratio must be in (0, 1), got {self.greenlist_ratio!r}")
        if not (isinstance(self.context_width, int) and self.context_width >= 1):
            raise ValueError("watermarking_config.context_width must be a positive integer, "
                             f"got {self.context_width!r}")
        if not isinstance(self.hashing_key, int):
            raise ValueError(f"watermarking_config.hashing_key must be an integer, got {self.hashing_key!r}")

    def construct_processor(self, vocab_size: int, device) -> WatermarkLogitsProcessor:
        return WatermarkLogitsProcessor(vocab_size, device, **self.to_dict())


class WatermarkLogitsProcessor(LogitsProcessor):
    """Adds `bias` to the scores of each row's green tokens: the first `greenlist_ratio` of a
    permutation of the vocabulary drawn from a generator on `device` seeded by the row's last
    `context_width` tokens. With "selfhash" the green list depends on the candidate too: of the 40
    best-scored candidates, those in their own green list get the bias. Reads the device each step
    (the seeds are host integers), as Transformers' does."""

    TABLE_SIZE = 1_000_003

    def __init__(self, vocab_size: int, device, greenlist_ratio: float = 0.25, bias: float = 2.0,
                 hashing_key: int = 15485863, seeding_scheme: str = "lefthash", context_width: int = 1) -> None:
        WatermarkingConfig(greenlist_ratio, bias, hashing_key, seeding_scheme, context_width).validate()
        self.vocab_size = vocab_size
        self.greenlist_size = int(vocab_size * greenlist_ratio)
        self.bias = bias
        self.seeding_scheme = seeding_scheme
        self.hash_key = hashing_key
        self.context_width = context_width
        self.rng = torch.Generator(device=device)
        self.rng.manual_seed(hashing_key)
        self.fixed_table = torch.randperm(self.TABLE_SIZE, generator=self.rng, device=device)

    def _seed(self, seq: torch.Tensor) -> None:
        seq = seq[-self.context_width:]
        if self.seeding_scheme == "selfhash":
            a = self.fixed_table[seq % self.TABLE_SIZE] + 1
            b = self.fixed_table[seq[-1] % self.TABLE_SIZE] + 1
            seed = (self.hash_key * a * b).min().item()
        else:
            seed = self.hash_key * seq[-1].item()
        self.rng.manual_seed(seed % (2**64 - 1))

    def greenlist(self, seq: torch.Tensor) -> torch.Tensor:
        """The green token ids after the tokens `seq` (1D)."""
        self._seed(seq)
        return torch.randperm(self.vocab_size, device=seq.device, generator=self.rng)[: self.greenlist_size]

    def _self_hashed(self, seq: torch.Tensor, scores_V: torch.Tensor) -> torch.Tensor:
        best = scores_V.sort(dim=-1, descending=True)[1]
        kept = [best[i] for i in range(40) if best[i] in self.greenlist(torch.cat([seq, best[i, None]]))]
        return torch.tensor(kept, device=seq.device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[-1] < self.context_width:
            return scores  # too few tokens to seed from: this step is not watermarked
        out = scores.clone()
        for r, seq in enumerate(input_ids):
            green = self._self_hashed(seq, scores[r]) if self.seeding_scheme == "selfhash" else self.greenlist(seq)
            out[r, green] = out[r, green] + self.bias
        return out


@dataclass
class WatermarkDetectorOutput:
    """Per row: tokens scored, green tokens among them, their fraction, z-score, p-value, whether
    the z-score passes the threshold, and 1 - p-value."""

    num_tokens_scored: np.ndarray | None = None
    num_green_tokens: np.ndarray | None = None
    green_fraction: np.ndarray | None = None
    z_score: np.ndarray | None = None
    p_value: np.ndarray | None = None
    prediction: np.ndarray | None = None
    confidence: np.ndarray | None = None


class WatermarkDetector:
    """Whether texts carry the watermark of `watermarking_config`: each token after the first
    `context_width` is green or not in the list its predecessors seed; the count of green tokens is
    compared with the `greenlist_ratio` that unwatermarked text would give (a one-sided z-test).
    `model_config` gives the vocabulary size and the BOS id (a leading BOS is not scored);
    `device` must be the one the text was generated on (the draws differ between devices).
    `ignore_repeated_ngrams=True` scores each distinct n-gram once."""

    def __init__(self, model_config, device, watermarking_config: WatermarkingConfig | dict,
                 ignore_repeated_ngrams: bool = False, max_cache_size: int = 128) -> None:
        if not isinstance(watermarking_config, dict):
            watermarking_config = watermarking_config.to_dict()
        self.bos_token_id = model_config.bos_token_id
        self.greenlist_ratio = watermarking_config["greenlist_ratio"]
        self.ignore_repeated_ngrams = ignore_repeated_ngrams
        self.processor = WatermarkLogitsProcessor(model_config.vocab_size, device, **watermarking_config)
        self._scored = functools.lru_cache(maxsize=max_cache_size)(self._is_green)

    def _is_green(self, prefix: tuple[int, ...], target: int, device: torch.device) -> bool:
        return target in self.processor.greenlist(torch.tensor(prefix, device=device))

    def _count(self, input_ids: torch.LongTensor) -> tuple[np.ndarray, np.ndarray]:
        B, L = input_ids.shape
        selfhash = int(self.processor.seeding_scheme == "selfhash")
        n = self.processor.context_width + 1 - selfhash
        windows = input_ids[:, torch.arange(n)[None] + torch.arange(L - n + 1)[:, None]]
        scored, green = np.zeros(B), np.zeros(B)
        for r in range(B):
            counts = collections.Counter(tuple(w) for w in windows[r].tolist())
            hit = {w: self._scored(w if selfhash else w[:-1], w[-1], input_ids.device) for w in counts}
            if self.ignore_repeated_ngrams:
                scored[r], green[r] = len(counts), sum(hit.values())
            else:
                scored[r], green[r] = sum(counts.values()), sum(c * hit[w] for w, c in counts.items())
        return scored, green

    def __call__(self, input_ids: torch.LongTensor, z_threshold: float = 3.0,
                 return_dict: bool = False) -> WatermarkDetectorOutput | np.ndarray:
        """`input_ids` [B, L]: the generated text (better without its prompt). Returns the
        per-row predictions (z-score above `z_threshold`), or every statistic with `return_dict`."""
        has_bos = input_ids[:, 0] == self.bos_token_id
        if bool(has_bos.any()) != bool(has_bos.all()):
            raise ValueError("WatermarkDetector: some rows start with the BOS token and some do not; tokenize the "
                             "texts alike")
        if bool(has_bos[0]):
            input_ids = input_ids[:, 1:]
        if input_ids.shape[-1] - self.processor.context_width < 1:
            raise ValueError(f"WatermarkDetector: needs at least one token after the first "
                             f"{self.processor.context_width} (context_width), got {input_ids.shape[-1]} tokens")
        scored, green = self._count(input_ids)
        ratio = self.greenlist_ratio
        z = (green - ratio * scored) / np.sqrt(scored * ratio * (1 - ratio))
        prediction = z > z_threshold
        if not return_dict:
            return prediction
        p_value = 0.5 * torch.special.erfc(torch.as_tensor(z / math.sqrt(2))).numpy()  # float64, as Transformers
        return WatermarkDetectorOutput(num_tokens_scored=scored, num_green_tokens=green, green_fraction=green / scored,
                                       z_score=z, p_value=p_value, prediction=prediction, confidence=1 - p_value)
