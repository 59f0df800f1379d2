"""Stopping criteria: each maps (input_ids [B, L], scores) -> a bool [B], True where a row is done.

Names and semantics are Transformers'. `StopStringCriteria` decodes on the host; the others stay on
the device.
"""

from __future__ import annotations

import time

import torch

Scores = tuple[torch.Tensor, ...] | None  # the processed scores so far, when generate() records them


class StoppingCriteria:
    """Base class: `__call__(input_ids, scores) -> BoolTensor [batch]` (True: this row is done)."""

    def __call__(self, input_ids: torch.LongTensor, scores: Scores, **kwargs) -> torch.BoolTensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(input_ids, scores)")


class StoppingCriteriaList(list):
    """A row is done when any criterion says so."""

    def __call__(self, input_ids: torch.LongTensor, scores: Scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for criterion in self:
            # a tensor per row, or (as Transformers takes it) one bool for every row
            done = done | torch.as_tensor(criterion(input_ids, scores, **kwargs), device=done.device)
        return done

    @property
    def max_length(self) -> int | None:
        for criterion in self:
            if isinstance(criterion, MaxLengthCriteria):
                return criterion.max_length
        return None


class MaxLengthCriteria(StoppingCriteria):
    """Done once the sequence (prompt included) has `max_length` tokens."""

    def __init__(self, max_length: int, max_position_embeddings: int | None = None):
        self.max_length = max_length
        self.max_position_embeddings = max_position_embeddings

    def __call__(self, input_ids, scores, **kwargs):
        done = input_ids.shape[-1] >= self.max_length
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class MaxTimeCriteria(StoppingCriteria):
    """Done once `max_time` seconds have passed since `initial_timestamp` (default: construction)."""

    def __init__(self, max_time: float, initial_timestamp: float | None = None):
        self.max_time = max_time
        self.initial_timestamp = time.time() if initial_timestamp is None else initial_timestamp

    def __call__(self, input_ids, scores, **kwargs):
        done = time.time() - self.initial_timestamp > self.max_time
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class EosTokenCriteria(StoppingCriteria):
    """Done when the last token is one of `eos_token_id`."""

    def __init__(self, eos_token_id: int | list[int] | torch.Tensor):
        if isinstance(eos_token_id, torch.Tensor):
            self.eos_token_id = eos_token_id.reshape(-1)
        else:
            self.eos_token_id = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))

    def __call__(self, input_ids, scores, new_token_length: int = 1, **kwargs):
        self.eos_token_id = self.eos_token_id.to(input_ids.device)
        return torch.isin(input_ids[:, -new_token_length:], self.eos_token_id).any(-1)


class StopStringCriteria(StoppingCriteria):
    """Done when a stop string ends inside the last token.

    The string may start in earlier tokens and the last token may run past its end ("sto" + "pped"
    stops on "stop"), but a stop string that ended before the last token does not count: it was
    checked at its own step. Needs `tokenizer.decode(ids)`; it decodes the last few tokens of each
    row on the host, so it costs one device read per step.
    """

    def __init__(self, tokenizer, stop_strings: str | list[str]):
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if not stop_strings or not all(isinstance(s, str) and s for s in stop_strings):
            raise ValueError(f"`stop_strings` must be non-empty strings, got {stop_strings!r}")
        if not callable(getattr(tokenizer, "decode", None)):
            raise TypeError(f"StopStringCriteria needs a tokenizer with `decode`, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        # Every token yields at least one character, so this many tokens cover any stop string.
        self.window = max(len(s) for s in self.stop_strings) + 1

    def _row_done(self, ids: list[int]) -> bool:
        text = self.tokenizer.decode(ids)
        before = self.tokenizer.decode(ids[:-1]) if len(ids) > 1 else ""
        # Where the last token's text begins (decoding is not always prefix-stable: stop at the first difference).
        start = next((i for i, (a, b) in enumerate(zip(before, text)) if a != b), min(len(before), len(text)))
        return any(s in text[max(0, start - len(s) + 1) :] for s in self.stop_strings)

    def __call__(self, input_ids, scores, **kwargs):
        rows = input_ids[:, -self.window :].tolist()
        return torch.tensor([self._row_done(r) for r in rows], dtype=torch.bool, device=input_ids.device)


__all__ = [
    "EosTokenCriteria",
    "MaxLengthCriteria",
    "MaxTimeCriteria",
    "StopStringCriteria",
    "StoppingCriteria",
    "StoppingCriteriaList",
]
