"""Logits processors: each maps (input_ids [B, L], scores [B, V]) -> new scores [B, V].

Names and semantics are Transformers' (`FrequencyPresencePenaltyLogitsProcessor`, OpenAI's
penalties, is moetorch's own). All work on the device; only `PrefixConstrainedLogitsProcessor`
(which calls user Python per row) and the first call of the bias processors read the host.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

NEG_INF = -float("inf")


def _as_id_tensor(ids: int | Iterable[int] | torch.Tensor, device=None) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).to(device=device, dtype=torch.long)
    return torch.tensor([ids] if isinstance(ids, int) else list(ids), dtype=torch.long, device=device)


class LogitsProcessor:
    """Base class: `__call__(input_ids, scores) -> scores`."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(input_ids, scores)")


class LogitsProcessorList(list):
    """Applies its processors in order. Extra keyword arguments go to processors that take them."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.FloatTensor:
        for processor in self:
            vocab = scores.shape[-1]
            if kwargs and len(inspect.signature(processor.__call__).parameters) > 2:
                scores = processor(input_ids, scores, **kwargs)
            else:
                scores = processor(input_ids, scores)
            # (shapes only: no device read; the batch may change, as classifier-free guidance halves it)
            if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[-1] != vocab:
                got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
                raise ValueError(f"logits processor {type(processor).__name__} must return scores [batch, vocab] "
                                 f"over the {vocab} tokens it was given, got {got}")
        return scores


# ---- length and token constraints -----------------------------------------------------------


class MinLengthLogitsProcessor(LogitsProcessor):
    """Forbid EOS while the sequence (prompt included) is shorter than `min_length`."""

    def __init__(self, min_length: int, eos_token_id: int | list[int] | torch.Tensor, device: str = "cpu"):
        if not (isinstance(min_length, int) and min_length >= 0):
            raise ValueError(f"`min_length` must be a non-negative integer, got {min_length!r}")
        self.min_length = min_length
        self.eos_token_id = _as_id_tensor(eos_token_id, device)

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] >= self.min_length:
            return scores
        return _ban(scores, self.eos_token_id)


class MinNewTokensLengthLogitsProcessor(LogitsProcessor):
    """Forbid EOS until `min_new_tokens` tokens follow the first `prompt_length_to_skip`."""

    def __init__(self, prompt_length_to_skip: int, min_new_tokens: int, eos_token_id, device: str = "cpu"):
        for name, v in (("prompt_length_to_skip", prompt_length_to_skip), ("min_new_tokens", min_new_tokens)):
            if not (isinstance(v, int) and v >= 0):
                raise ValueError(f"`{name}` must be a non-negative integer, got {v!r}")
        self.prompt_length_to_skip = prompt_length_to_skip
        self.min_new_tokens = min_new_tokens
        self.eos_token_id = _as_id_tensor(eos_token_id, device)

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] - self.prompt_length_to_skip >= self.min_new_tokens:
            return scores
        return _ban(scores, self.eos_token_id)


def _in_vocab(scores: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[V] bool: which of the vocabulary's ids are among `token_ids`."""
    return torch.isin(torch.arange(scores.shape[-1], device=scores.device), token_ids.to(scores.device))


def _ban(scores: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(_in_vocab(scores, token_ids), NEG_INF)


class RepetitionPenaltyLogitsProcessor(LogitsProcessor):
    """CTRL's penalty on tokens already in the sequence: negative scores times `penalty`, positive
    ones divided by it. `prompt_ignore_length` (an int, or one per row) skips that many leading
    tokens, e.g. left padding."""

    def __init__(self, penalty: float, prompt_ignore_length: int | torch.Tensor | None = None):
        if not (isinstance(penalty, (int, float)) and penalty > 0):
            raise ValueError(f"`penalty` must be a positive number, got {penalty!r}")
        if isinstance(prompt_ignore_length, torch.Tensor) and prompt_ignore_length.dim() != 1:
            raise ValueError("`prompt_ignore_length` must be an int or a 1D tensor (one per row)")
        self.penalty = float(penalty)
        self.prompt_ignore_length = prompt_ignore_length

    def __call__(self, input_ids, scores):
        V = scores.shape[-1]
        skip = self.prompt_ignore_length
        if isinstance(skip, int):
            input_ids = input_ids[:, skip:]
        elif isinstance(skip, torch.Tensor):
            if skip.shape[0] != input_ids.shape[0]:
                raise ValueError(f"`prompt_ignore_length` has {skip.shape[0]} rows, input_ids {input_ids.shape[0]}")
            pos_L = torch.arange(input_ids.shape[1], device=input_ids.device)
            # ignored positions point at an extra column that is dropped below
            input_ids = input_ids.masked_fill(pos_L[None] < skip.to(input_ids.device)[:, None], V)
        padded = F.pad(scores, (0, 1))
        ids = input_ids.clamp(max=V)
        seen = padded.gather(1, ids)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return padded.scatter(1, ids, seen)[:, :V]


class FrequencyPresencePenaltyLogitsProcessor(LogitsProcessor):
    """OpenAI's frequency and presence penalties (moetorch; Transformers has none): a token's
    score minus `frequency_penalty` times its count among the generated tokens, minus
    `presence_penalty` if it occurs there. The generated tokens are those past `prompt_length`."""

    def __init__(self, frequency_penalty: float = 0.0, presence_penalty: float = 0.0, prompt_length: int = 0):
        for name, value in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}")
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < 0:
            raise ValueError(f"`prompt_length` must be a non-negative int, got {prompt_length!r}")
        self.frequency, self.presence = float(frequency_penalty), float(presence_penalty)
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_length:]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


class NoRepeatNGramLogitsProcessor(LogitsProcessor):
    """Forbid any token that would repeat an n-gram already in the sequence (prompt included)."""

    def __init__(self, ngram_size: int):
        if not (isinstance(ngram_size, int) and ngram_size > 0):
            raise ValueError(f"`ngram_size` must be a positive integer, got {ngram_size!r}")
        self.ngram_size = ngram_size

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] < self.ngram_size:
            return scores
        return _ban_completions(input_ids, input_ids.unfold(1, self.ngram_size, 1), scores)


def _ban_completions(input_ids: torch.Tensor, grams_BWN: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """`scores` with every token banned that, after the last n-1 tokens of `input_ids`, completes
    one of the row's n-grams `grams_BWN`."""
    n, L, V = grams_BWN.shape[-1], input_ids.shape[-1], scores.shape[-1]
    prefix_B1N = input_ids[:, L + 1 - n :][:, None]  # the last n-1 tokens (none for n = 1)
    hit_BW = (grams_BWN[..., :-1] == prefix_B1N).all(-1)
    banned = torch.where(hit_BW, grams_BWN[..., -1].clamp(max=V), V)  # V: an extra, dropped column
    mask = torch.zeros(scores.shape[0], V + 1, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, banned, True)
    return scores.masked_fill(mask[:, :V], NEG_INF)


class EncoderRepetitionPenaltyLogitsProcessor(LogitsProcessor):
    """The repetition penalty's inverse on the prompt's tokens (Transformers' "hallucination
    penalty"; for these decoder-only models the prompt takes the encoder input's place): scores of
    tokens in `encoder_input_ids` [rows or fewer, P] are multiplied by `penalty` where positive and
    divided by it where negative, so `penalty > 1` favours them. Rows past the prompt's repeat it
    (beams, `num_return_sequences`)."""

    def __init__(self, penalty: float, encoder_input_ids: torch.Tensor):
        if not (isinstance(penalty, (int, float)) and not isinstance(penalty, bool) and penalty > 0):
            raise ValueError(f"`penalty` must be a positive number, got {penalty!r}")
        self.penalty = 1 / float(penalty)
        self.encoder_input_ids = encoder_input_ids

    def __call__(self, input_ids, scores):
        ids = self.encoder_input_ids.to(scores.device)
        if scores.shape[0] > ids.shape[0]:
            ids = ids.repeat_interleave(scores.shape[0] // ids.shape[0], dim=0)
        seen = scores.gather(1, ids)
        return scores.scatter(1, ids, torch.where(seen < 0, seen * self.penalty, seen / self.penalty))


class EncoderNoRepeatNGramLogitsProcessor(LogitsProcessor):
    """Forbid any token that would complete an n-gram of the prompt (`encoder_input_ids` [rows or
    fewer, P], as Transformers' processor of that name reads it): the sequence's last n-1 tokens
    followed by the token may not be an n-gram of the row's prompt."""

    def __init__(self, encoder_ngram_size: int, encoder_input_ids: torch.Tensor):
        if not (isinstance(encoder_ngram_size, int) and encoder_ngram_size > 0):
            raise ValueError(f"`encoder_ngram_size` must be a positive integer, got {encoder_ngram_size!r}")
        self.ngram_size = encoder_ngram_size
        self.encoder_input_ids = encoder_input_ids if encoder_input_ids.dim() == 2 else encoder_input_ids[None]

    def __call__(self, input_ids, scores):
        n, prompt = self.ngram_size, self.encoder_input_ids.to(scores.device)
        if prompt.shape[1] < n or input_ids.shape[-1] < n - 1:
            return scores
        prompt = prompt.repeat_interleave(scores.shape[0] // prompt.shape[0], dim=0)
        return _ban_completions(input_ids, prompt.unfold(1, n, 1), scores)


def sequence_bias_key(seq):
    """A `sequence_bias` key as given, or the tuple that a string key such as "(3, 4)" spells (the
    keys Transformers writes to JSON)."""
    if isinstance(seq, str):
        with contextlib.suppress(ValueError, SyntaxError):
            value = ast.literal_eval(seq)
            if isinstance(value, tuple):
                return value
    return seq


class SequenceBiasLogitsProcessor(LogitsProcessor):
    """Add a bias to the token that would complete a given sequence.

    `sequence_bias`: `[[token ids], bias]` pairs (or a `{tuple: bias}` dict; keys written as
    Transformers writes them to JSON, `"(3, 4)"`, are read back as tuples). A one-token sequence
    biases that token always; a longer one biases its last token when the sequence ends with the
    rest of it.
    """

    def __init__(self, sequence_bias):
        if isinstance(sequence_bias, dict):
            items = [(sequence_bias_key(seq), bias) for seq, bias in sequence_bias.items()]
        elif isinstance(sequence_bias, list):
            items = [(seq, bias) for seq, bias in sequence_bias]
        else:
            raise ValueError(f"`sequence_bias` must be a list of [token ids, bias] pairs, got {sequence_bias!r}")
        for seq, bias in items:
            if not isinstance(seq, (tuple, list)):
                raise ValueError(f"`sequence_bias`: each sequence is a tuple or list of token ids, e.g. ({seq!r},), "
                                 f"got {seq!r}")
            if not (seq and all(isinstance(t, int) and t >= 0 for t in seq) and isinstance(bias, (int, float))):
                raise ValueError(f"`sequence_bias`: {list(seq)!r} -> {bias!r} is not (non-empty token ids, number)")
        self.sequence_bias = {tuple(seq): float(bias) for seq, bias in items}
        self._prepared = False

    def _prepare(self, scores: torch.Tensor) -> None:
        V, device = scores.shape[-1], scores.device
        too_big = [t for seq in self.sequence_bias for t in seq if t >= V]
        if too_big:
            raise ValueError(f"the vocabulary has {V} tokens, but these biased tokens are out of range: {too_big}")
        self._single_V = torch.zeros(V, device=device)
        groups: dict[int, list] = {}
        for seq, bias in self.sequence_bias.items():
            if len(seq) == 1:
                self._single_V[seq[0]] = bias
            else:
                groups.setdefault(len(seq) - 1, []).append((seq, bias))
        # one (prefixes [N, P], last tokens [N], biases [N]) triple per prefix length P
        self._multi = [
            (
                torch.tensor([s[:-1] for s, _ in group], device=device),
                torch.tensor([s[-1] for s, _ in group], device=device),
                torch.tensor([b for _, b in group], device=device),
            )
            for group in groups.values()
        ]
        self._prepared = True

    def __call__(self, input_ids, scores):
        if not self._prepared:
            self._prepare(scores)
        bias = torch.zeros_like(scores) + self._single_V
        for prefixes_NP, last_N, bias_N in self._multi:
            P = prefixes_NP.shape[1]
            if P > input_ids.shape[1]:
                continue
            hit_BN = (input_ids[:, None, -P:] == prefixes_NP).all(-1)
            bias.index_add_(1, last_N, torch.where(hit_BN, bias_N, 0.0).to(bias.dtype))
        return scores + bias


class NoBadWordsLogitsProcessor(SequenceBiasLogitsProcessor):
    """Forbid the given token sequences (a single EOS token is never banned, as in Transformers)."""

    def __init__(self, bad_words_ids: list[list[int]], eos_token_id: int | list[int] | torch.Tensor | None = None):
        if not (isinstance(bad_words_ids, list) and bad_words_ids and all(isinstance(w, list) for w in bad_words_ids)):
            raise ValueError(f"`bad_words_ids` must be a non-empty list of lists of token ids, got {bad_words_ids!r}")
        eos = set(_as_id_tensor(eos_token_id).tolist()) if eos_token_id is not None else set()
        kept = [w for w in bad_words_ids if not (len(w) == 1 and w[0] in eos)]
        super().__init__({tuple(w): NEG_INF for w in kept} if kept else {})
        self.bad_words_ids = bad_words_ids


class PrefixConstrainedLogitsProcessor(LogitsProcessor):
    """Allow only `prefix_allowed_tokens_fn(batch_id, row_ids)` at each step (calls Python per row).

    `num_beams`: the rows of one prompt (batch_id = row // num_beams). Where every allowed token of
    a prompt's beams is already -inf, the beams fall back to the bare constraint. `beams`: the rows
    that fall back together, where they are fewer (1: sampled rows of `num_return_sequences`,
    each its own); default `num_beams`."""

    def __init__(self, prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]], num_beams: int,
                 beams: int | None = None):
        self._fn = prefix_allowed_tokens_fn
        self._num_beams = num_beams
        self._beams = num_beams if beams is None else beams
        if num_beams % self._beams:
            raise ValueError(f"PrefixConstrainedLogitsProcessor: beams ({beams}) must divide num_beams ({num_beams})")

    def __call__(self, input_ids, scores):
        mask = torch.full_like(scores, NEG_INF)
        for row in range(input_ids.shape[0]):
            allowed = self._fn(row // self._num_beams, input_ids[row])
            if len(allowed) == 0:
                raise ValueError(f"prefix_allowed_tokens_fn returned no allowed token for batch id "
                                 f"{row // self._num_beams}: the constraint cannot be satisfied")
            mask[row, allowed] = 0
        out = scores + mask
        # When every beam's allowed tokens are already -inf, fall back to the bare constraint.
        stuck = out.amax(-1).isneginf().view(-1, self._beams).all(-1, keepdim=True)
        return torch.where(stuck.repeat_interleave(self._beams, 0), mask, out)


def _only(scores: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Scores that allow only `token_ids` (0 for them, -inf elsewhere)."""
    return torch.where(_in_vocab(scores, token_ids), 0.0, NEG_INF).to(scores.dtype).expand_as(scores).clone()


def _token_list(name: str, ids) -> torch.Tensor:
    t = _as_id_tensor(ids)
    if t.numel() == 0 or (t < 0).any():
        raise ValueError(f"`{name}` must be non-negative token ids, got {ids!r}")
    return t


class ForcedBOSTokenLogitsProcessor(LogitsProcessor):
    """Force `bos_token_id` as the first generated token of a sequence that starts from one token."""

    def __init__(self, bos_token_id: int):
        self.bos_token_id = _token_list("bos_token_id", bos_token_id)

    def __call__(self, input_ids, scores):
        return _only(scores, self.bos_token_id) if input_ids.shape[-1] == 1 else scores


class ForcedEOSTokenLogitsProcessor(LogitsProcessor):
    """Force one of the EOS ids as the last token, when the sequence reaches `max_length` - 1."""

    def __init__(self, max_length: int, eos_token_id: int | list[int] | torch.Tensor, device: str = "cpu"):
        self.max_length = max_length
        self.eos_token_id = _token_list("eos_token_id", eos_token_id).to(device)

    def __call__(self, input_ids, scores):
        return _only(scores, self.eos_token_id) if input_ids.shape[-1] == self.max_length - 1 else scores


class InfNanRemoveLogitsProcessor(LogitsProcessor):
    """`remove_invalid_values=True`: NaN becomes 0, +-inf the dtype's largest / smallest finite value."""

    def __call__(self, input_ids, scores):
        finfo = torch.finfo(scores.dtype)
        return torch.nan_to_num(scores, nan=0.0, posinf=finfo.max, neginf=finfo.min)


class ExponentialDecayLengthPenalty(LogitsProcessor):
    """`exponential_decay_length_penalty=(start, factor)`: from `start` generated tokens on, raise
    the EOS scores by |score| * (factor ** n - 1) at the n-th token past it, so that a sequence
    grows likelier to end. Infinite EOS scores stay as they are."""

    def __init__(self, exponential_decay_length_penalty: tuple[int, float], eos_token_id, input_ids_seq_length: int):
        start, factor = exponential_decay_length_penalty
        self.regulation_start = start + input_ids_seq_length
        self.regulation_factor = factor
        self.eos_token_id = _token_list("eos_token_id", eos_token_id)

    def __call__(self, input_ids, scores):
        n = input_ids.shape[-1] - self.regulation_start
        if n <= 0:
            return scores
        eos = self.eos_token_id.to(scores.device)
        eos_scores = scores[:, eos]
        raise_by = eos_scores.abs() * (self.regulation_factor**n - 1)
        out = scores.clone()
        out[:, eos] = eos_scores + torch.where(torch.isfinite(eos_scores), raise_by, 0.0)
        return out


class SuppressTokensLogitsProcessor(LogitsProcessor):
    """`suppress_tokens`: these ids are never generated."""

    def __init__(self, suppress_tokens, device: str = "cpu"):
        self.suppress_tokens = _as_id_tensor(list(suppress_tokens), device)

    def __call__(self, input_ids, scores):
        return _ban(scores, self.suppress_tokens)


class SuppressTokensAtBeginLogitsProcessor(LogitsProcessor):
    """`begin_suppress_tokens`: these ids are not generated at the first step (when the sequence
    is `begin_index` long)."""

    def __init__(self, begin_suppress_tokens, begin_index: int, device: str = "cpu"):
        self.begin_suppress_tokens = _as_id_tensor(list(begin_suppress_tokens), device)
        self.begin_index = begin_index

    def set_begin_index(self, begin_index: int) -> None:
        self.begin_index = begin_index

    def __call__(self, input_ids, scores):
        return _ban(scores, self.begin_suppress_tokens) if input_ids.shape[-1] == self.begin_index else scores


# ---- sampling warpers -----------------------------------------------------------------------


def _check_keep(min_tokens_to_keep) -> None:
    if not (isinstance(min_tokens_to_keep, int) and min_tokens_to_keep >= 1):
        raise ValueError(f"`min_tokens_to_keep` must be a positive integer, got {min_tokens_to_keep!r}")


def _below_kth(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Which scores lie below the k-th highest of their row: the k best (and ties) are never filtered."""
    return scores < torch.topk(scores, min(k, scores.shape[-1]), dim=-1).values[..., -1:]


class TemperatureLogitsWarper(LogitsProcessor):
    """Divide the scores by `temperature` (> 0)."""

    def __init__(self, temperature: float):
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"`temperature` must be a positive number, got {temperature!r}"
                             + (" (for greedy decoding set do_sample=False)" if temperature == 0 else ""))
        self.temperature = float(temperature)

    def __call__(self, input_ids, scores):
        return scores / self.temperature


class TopKLogitsWarper(LogitsProcessor):
    """Keep the `top_k` highest scores (ties with the k-th included)."""

    def __init__(self, top_k: int, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1):
        if not (isinstance(top_k, int) and top_k > 0):
            raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}")
        self.top_k = max(top_k, min_tokens_to_keep)
        self.filter_value = filter_value

    def __call__(self, input_ids, scores):
        return scores.masked_fill(_below_kth(scores, self.top_k), self.filter_value)


class TopPLogitsWarper(LogitsProcessor):
    """Nucleus sampling: keep the smallest set of top tokens whose probability reaches `top_p`."""

    def __init__(self, top_p: float, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1):
        top_p = float(top_p)
        if not 0 <= top_p <= 1:  # (0 keeps the min_tokens_to_keep most likely, as Transformers' does)
            raise ValueError(f"`top_p` must be in [0, 1], got {top_p!r}")
        _check_keep(min_tokens_to_keep)
        self.top_p, self.filter_value, self.min_tokens_to_keep = top_p, filter_value, min_tokens_to_keep

    def __call__(self, input_ids, scores):
        # Ascending sort: drop the low tail whose cumulative mass stays within 1 - top_p.
        sorted_scores, order = torch.sort(scores, descending=False)
        drop_sorted = sorted_scores.softmax(-1).cumsum(-1) <= 1 - self.top_p
        drop_sorted[..., -self.min_tokens_to_keep :] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        return scores.masked_fill(drop, self.filter_value)


class MinPLogitsWarper(LogitsProcessor):
    """Keep tokens whose probability is at least `min_p` times the top token's."""

    def __init__(self, min_p: float, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1):
        if not 0 <= min_p <= 1:
            raise ValueError(f"`min_p` must be in [0, 1], got {min_p!r}")
        _check_keep(min_tokens_to_keep)
        self.min_p, self.filter_value, self.min_tokens_to_keep = min_p, filter_value, min_tokens_to_keep

    def __call__(self, input_ids, scores):
        probs = scores.softmax(-1)
        drop = probs < self.min_p * probs.amax(-1, keepdim=True)
        keep = torch.topk(probs, min(self.min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
        drop.scatter_(-1, keep, False)
        return scores.masked_fill(drop, self.filter_value)


def _open_unit(name: str, value, min_tokens_to_keep) -> float:
    """`value` as a float in (0, 1), and `min_tokens_to_keep` a positive integer, else ValueError."""
    value = float(value)
    if not 0 < value < 1:
        raise ValueError(f"`{name}` must be in (0, 1), got {value!r}")
    _check_keep(min_tokens_to_keep)
    return value


class TopHLogitsWarper(LogitsProcessor):
    """Top-H sampling: among the 100 best tokens (their probabilities renormalised), keep the
    most probable ones while the sum of their entropy terms -p log p stays within `top_h` times
    the entropy of those 100; the best token always stays."""

    top_n = 100

    def __init__(self, top_h: float, filter_value: float = NEG_INF):
        if not (isinstance(top_h, (int, float)) and 0 < top_h <= 1):
            raise ValueError(f"`top_h` must be in (0, 1], got {top_h!r}")
        self.top_h, self.filter_value = float(top_h), filter_value

    def __call__(self, input_ids, scores):
        best, idx = torch.topk(scores, min(self.top_n, scores.shape[-1]), dim=-1)
        dist = torch.distributions.Categorical(logits=best)
        terms = -dist.probs * dist.probs.log()
        keep_sorted = terms.cumsum(dim=-1) <= dist.entropy()[:, None] * self.top_h
        keep_sorted[:, 0] = True
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter(1, idx, keep_sorted)
        return scores.masked_fill(~keep, self.filter_value)


class TypicalLogitsWarper(LogitsProcessor):
    """Locally typical sampling: keep the tokens whose information -log p lies closest to the
    distribution's entropy, in that order, until their mass reaches `mass`."""

    def __init__(self, mass: float = 0.9, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1):
        self.mass = _open_unit("typical_p", mass, min_tokens_to_keep)
        self.filter_value, self.min_tokens_to_keep = filter_value, min_tokens_to_keep

    def __call__(self, input_ids, scores):
        logp = scores.log_softmax(dim=-1)
        entropy = -(logp * logp.exp()).nansum(dim=-1, keepdim=True)
        distance, order = torch.sort((-logp - entropy).abs(), dim=-1)
        mass = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (mass < self.mass).sum(dim=1, keepdim=True).clamp(max=scores.shape[-1] - 1)
        drop_sorted = distance > distance.gather(1, last)
        drop_sorted[..., : self.min_tokens_to_keep] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        return scores.masked_fill(drop, self.filter_value)


class EpsilonLogitsWarper(LogitsProcessor):
    """Epsilon sampling: drop tokens of probability below `epsilon` (the `min_tokens_to_keep` best stay)."""

    def __init__(self, epsilon: float, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1):
        self.epsilon = _open_unit("epsilon_cutoff", epsilon, min_tokens_to_keep)
        self.filter_value, self.min_tokens_to_keep = filter_value, min_tokens_to_keep

    def __call__(self, input_ids, scores):
        drop = (scores.softmax(dim=-1) < self.epsilon) & _below_kth(scores, self.min_tokens_to_keep)
        return scores.masked_fill(drop, self.filter_value)


class EtaLogitsWarper(LogitsProcessor):
    """Eta sampling: drop tokens of probability below min(eta, sqrt(eta) * exp(-entropy)), with
    `epsilon` = eta (the `min_tokens_to_keep` best stay)."""

    def __init__(self, epsilon: float, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1,
                 device: str = "cpu"):
        self.epsilon = torch.tensor(_open_unit("eta_cutoff", epsilon, min_tokens_to_keep), device=device)
        self.filter_value, self.min_tokens_to_keep = filter_value, min_tokens_to_keep

    def __call__(self, input_ids, scores):
        probs = scores.softmax(dim=-1)
        entropy = torch.distributions.Categorical(logits=scores).entropy()
        eps = self.epsilon.to(scores.device)
        eta = torch.minimum(eps, eps.sqrt() * torch.exp(-entropy))[..., None]
        drop = (probs < eta) & _below_kth(scores, self.min_tokens_to_keep)
        return scores.masked_fill(drop, self.filter_value)


class LogitNormalization(LogitsProcessor):
    """Turn scores into log-probabilities (`renormalize_logits=True`), after every other processor."""

    def __call__(self, input_ids, scores):
        return scores.log_softmax(-1)


# ---- classifier-free guidance ---------------------------------------------------------------


class ClassifierFreeGuidanceLogitsProcessor(LogitsProcessor):
    """Classifier-free guidance over a doubled batch: the scores' first half are the conditional
    rows (the prompts, which `input_ids` hold), the second half the unconditional ones; returns
    `u + guidance_scale * (c - u)` for the first half. For a model whose forward runs both halves
    (Transformers' MusicGen-style use); `generate(guidance_scale=...)` on these models runs the
    unconditional rows itself (`UnbatchedClassifierFreeGuidanceLogitsProcessor`)."""

    def __init__(self, guidance_scale: float):
        if not (isinstance(guidance_scale, (int, float)) and guidance_scale > 1):
            raise ValueError(f"ClassifierFreeGuidanceLogitsProcessor: guidance_scale must be greater than 1, "
                             f"got {guidance_scale!r}")
        self.guidance_scale = guidance_scale

    def __call__(self, input_ids, scores):
        if scores.shape[0] != 2 * input_ids.shape[0]:
            raise ValueError(f"ClassifierFreeGuidanceLogitsProcessor: the scores' batch must be twice the ids' (the "
                             f"conditional rows, then the unconditional ones), got {scores.shape[0]} scores rows for "
                             f"{input_ids.shape[0]} sequences")
        cond, uncond = scores.split(input_ids.shape[0], dim=0)
        return uncond + (cond - uncond) * self.guidance_scale


class UnbatchedClassifierFreeGuidanceLogitsProcessor(LogitsProcessor):
    """Classifier-free guidance with a second forward of `model` on the negative prompt.

    Returns `u + guidance_scale * (c - u)` on log-probabilities, where c is the conditional
    distribution (the scores) and u the unconditional one: the model run on `unconditional_ids`
    (default: the prompt's last token) and then on each generated token, with its own cache.
    The processor keeps state, so use one instance per `generate` call.
    """

    def __init__(
        self,
        guidance_scale: float,
        model,
        unconditional_ids: torch.LongTensor | None = None,
        unconditional_attention_mask: torch.LongTensor | None = None,
        use_cache: bool = True,
    ):
        self.guidance_scale = guidance_scale
        self.model = model
        self.ids = unconditional_ids
        self.mask = unconditional_attention_mask
        self.use_cache = use_cache
        self.cache = None
        self.first = True

    def _unconditional_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.first:
            self.first = False
            if self.ids is None:
                self.ids = input_ids[:, -1:]
            if self.mask is None:
                self.mask = torch.ones_like(self.ids, dtype=torch.long)
            ids = self.ids
        else:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
            ids = input_ids[:, -1:] if self.use_cache else torch.cat([self.ids, input_ids[:, -1:]], dim=1)
            self.ids = ids
        out = self.model(ids, attention_mask=self.mask, past_key_values=self.cache, use_cache=self.use_cache,
                         return_dict=True)
        self.cache = out.past_key_values
        return out.logits[:, -1]

    def __call__(self, input_ids, scores):
        scores = scores.log_softmax(-1)
        if self.guidance_scale == 1:
            return scores
        uncond = self._unconditional_logits(input_ids).float().log_softmax(-1)
        return self.guidance_scale * (scores - uncond) + uncond


__all__ = [
    "ClassifierFreeGuidanceLogitsProcessor",
    "LogitNormalization",
    "LogitsProcessor",
    "LogitsProcessorList",
    "MinLengthLogitsProcessor",
    "MinNewTokensLengthLogitsProcessor",
    "MinPLogitsWarper",
    "NoBadWordsLogitsProcessor",
    "NoRepeatNGramLogitsProcessor",
    "PrefixConstrainedLogitsProcessor",
    "RepetitionPenaltyLogitsProcessor",
    "SequenceBiasLogitsProcessor",
    "TemperatureLogitsWarper",
    "TopKLogitsWarper",
    "TopPLogitsWarper",
    "UnbatchedClassifierFreeGuidanceLogitsProcessor",
]
