"""Stopping criteria: each maps (input_ids [B, L], scores) -> a bool [B], True where a row is done.

Names and semantics are Transformers'. All stay on the device, but for `StopStringCriteria` over a
tokenizer that has no vocabulary (only `decode`).
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections import OrderedDict

import torch

logger = logging.getLogger("moetorch")
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


class ConfidenceCriteria(StoppingCriteria):
    """Done when the last token's probability under the last scores is below
    `assistant_confidence_threshold`: an assistant's drafting stops at a draft it doubts (batch of
    one; Transformers adds it to an assistant's own `generate`, and moetorch does where a generation
    config says `is_assistant`). Reads the probability on the host."""

    def __init__(self, assistant_confidence_threshold: float):
        self.assistant_confidence_threshold = assistant_confidence_threshold

    def __call__(self, input_ids, scores, **kwargs):
        if not scores:
            raise ValueError("ConfidenceCriteria reads the last step's scores: generate must be called with "
                             "return_dict_in_generate=True and output_scores=True")
        p = float(scores[-1].softmax(-1)[0, input_ids[0, -1]])
        done = p < self.assistant_confidence_threshold
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
    checked at its own step. These are Transformers' rules, with its decisions:

    - **What a token's text is.** Each token's text comes from its vocabulary
      (`convert_tokens_to_string` after a fixed prefix, which strips a tokenizer's word-start marks).
      For byte-level vocabularies (GPT-2's "Ġ" alphabet) and byte-fallback ones (Llama's
      `<0xNN>` tokens), tokens and stop strings are matched as UTF-8 bytes, so a character split
      across tokens still matches.
    - **How far back it looks.** The last `max(len(stop string))` tokens, the longest stop string's
      length in characters (bytes in those two modes).

    The tables (per token: how many characters of each stop string it can close from the end, at
    which positions it can sit inside one, and its length) are built once per tokenizer and stop
    strings. The match is then a few tensor operations on the device: no host read, so
    `generate`'s lagged stop still applies.

    A tokenizer without a vocabulary (only `decode`) gets the older rule instead: the last few
    tokens of each row are decoded on the host and searched, which costs a device read per step.
    """

    def __init__(self, tokenizer, stop_strings: str | list[str]):
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if not stop_strings or not all(isinstance(s, str) and s for s in stop_strings):
            raise ValueError(f"`stop_strings` must be non-empty strings, got {stop_strings!r}")
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.tables = None
        if all(callable(getattr(tokenizer, name, None)) for name in ("get_vocab", "convert_tokens_to_string")):
            self.tables = _StopTables.of(tokenizer, self.stop_strings)
        elif not callable(getattr(tokenizer, "decode", None)):
            raise TypeError(f"StopStringCriteria needs a tokenizer with a vocabulary (get_vocab, "
                            f"convert_tokens_to_string) or `decode`, got {type(tokenizer).__name__}")
        # Every token yields at least one character, so this many tokens cover any stop string.
        self.window = max(len(s) for s in self.stop_strings) + 1

    @property
    def on_device(self) -> bool:
        """Whether a call stays on the device (no host read)."""
        return self.tables is not None

    def _row_done(self, ids: list[int]) -> bool:
        text = self.tokenizer.decode(ids)
        before = self.tokenizer.decode(ids[:-1]) if len(ids) > 1 else ""
        # Where the last token's text begins (decoding is not always prefix-stable: stop at the first difference).
        start = next((i for i, (a, b) in enumerate(zip(before, text)) if a != b), min(len(before), len(text)))
        return any(s in text[max(0, start - len(s) + 1) :] for s in self.stop_strings)

    def __call__(self, input_ids, scores, **kwargs):
        if self.tables is not None:
            return self.tables.match(input_ids)
        rows = input_ids[:, -self.window :].tolist()
        return torch.tensor([self._row_done(r) for r in rows], dtype=torch.bool, device=input_ids.device)


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte -> the byte. Printable
    bytes stand for themselves; the rest take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


def _matching_mode(tokenizer) -> str | None:
    """"byte_level" (a ByteLevel decoder), "byte_fallback" (a ByteFallback decoder step), or None:
    what a token's text is matched as (bytes in the first two)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return None
    if type(decoder).__name__ == "ByteLevel":
        return "byte_level"
    state = getattr(decoder, "__getstate__", lambda: None)()
    try:
        config = json.loads(state) if isinstance(state, (str, bytes)) else None
    except json.JSONDecodeError:
        config = None

    def has(node, kind: str) -> bool:
        if isinstance(node, dict):
            return node.get("type") == kind or any(has(v, kind) for v in node.values())
        return isinstance(node, list) and any(has(v, kind) for v in node)

    if has(config, "ByteFallback"):
        return "byte_fallback"
    return "byte_level" if has(config, "ByteLevel") else None


_CLEAN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (vocab key, mode, texts)
_TABLES: OrderedDict = OrderedDict()  # (vocab key, mode, stop strings) -> _StopTables; the 8 latest


def _token_texts(tokenizer, mode: str | None) -> dict[int, str | bytes]:
    """Each vocabulary id -> the text its token yields inside a word (bytes in the byte modes)."""
    vocab = tokenizer.get_vocab()
    key = tuple(sorted(vocab.items(), key=lambda kv: kv[1]))
    try:
        cached = _CLEAN.get(tokenizer)
    except TypeError:  # not weakly referenceable
        cached = None
    if cached is not None and cached[0] == key and cached[1] == mode:
        return cached[2]
    prefix = "abcdef"  # a word's start, so that a token's own word-start mark is not stripped
    base_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    base = [tokenizer.convert_ids_to_tokens(i) for i in base_ids]
    alphabet = _byte_alphabet() if mode == "byte_level" else None
    texts: dict[int, str | bytes] = {}
    for token, idx in vocab.items():
        text: str | bytes | None = None
        if alphabet is not None and all(ch in alphabet for ch in token):
            text = bytes(alphabet[ch] for ch in token)
        elif mode == "byte_fallback" and len(token) == 6 and token.startswith("<0x") and token.endswith(">") \
                and all(ch in "0123456789abcdefABCDEF" for ch in token[3:5]):
            text = bytes([int(token[3:5], 16)])
        if text is None:
            joined = tokenizer.convert_tokens_to_string([*base, token])
            text = joined[joined.index(prefix) + len(prefix):]
            if mode is not None:
                text = text.encode("utf-8")
        texts[idx] = text
    try:
        _CLEAN[tokenizer] = (key, mode, texts)
    except TypeError:
        pass
    return texts


def token_texts(tokenizer) -> dict[int, str | bytes]:
    """Each vocabulary id -> its token's own text inside a word: bytes where the tokenizer decodes
    bytes (byte-level BPE, SentencePiece's byte fallback), so that a piece of a character is its
    byte rather than U+FFFD; a word-start token keeps its space."""
    return _token_texts(tokenizer, _matching_mode(tokenizer))


class _StopTables:
    """Per token of a vocabulary, for stop strings s of lengths m_s (padded to M):
    `tail[t, s, k]`: t can be the last token of a match, closing the last k characters of s
    (its first characters equal them; it may run past the end);
    `inner[t, s, i]`: t can come before i already matched characters (its end equals the characters
    of s just before them; it may run off the start of s); `length[t]`: its length. Row V is for
    ids outside the vocabulary: no match."""

    def __init__(self, texts: dict[int, str | bytes], stops: tuple):
        V = max(texts) + 2
        S, M = len(stops), max(len(s) for s in stops)
        tail = torch.zeros(V, S, M + 1, dtype=torch.bool)
        inner = torch.zeros(V, S, M + 1, dtype=torch.bool)
        length = torch.zeros(V, dtype=torch.long)
        for idx, text in texts.items():
            n = len(text)
            length[idx] = n
            for j, stop in enumerate(stops):
                m = len(stop)
                for k in range(1, n + 1):  # the token's first k characters close the string
                    if text[:k].endswith(stop[max(0, m - k):]):
                        tail[idx, j, min(k, m)] = True
                for i in range(1, m):  # i characters matched after it
                    if text.endswith(stop[max(0, m - i - n):m - i]):
                        inner[idx, j, i] = True
        missing = [s for j, s in enumerate(stops) if not tail[:, j].any()]
        if len(missing) == S:  # (as Transformers: one that can never match, beside others that can, is kept)
            raise ValueError(f"stop_strings: no token of the vocabulary can end {missing!r} (characters the "
                             "vocabulary does not have?)")
        if missing:
            logger.warning("stop_strings: no token of the vocabulary can end %r: it never matches", missing)
        self.tail, self.inner, self.length = tail, inner, length
        self.lengths = torch.tensor([len(s) for s in stops])
        self.window = M
        self._copies: dict[torch.device, tuple] = {}  # the tables on each device they were used on

    @classmethod
    def of(cls, tokenizer, stop_strings: tuple[str, ...]) -> _StopTables:
        mode = _matching_mode(tokenizer)
        texts = _token_texts(tokenizer, mode)
        stops = tuple(s.encode("utf-8") for s in stop_strings) if mode is not None else stop_strings
        key = (id(texts), mode, stops)
        if key in _TABLES and _TABLES[key][0] is texts:
            _TABLES.move_to_end(key)
        else:
            _TABLES[key] = (texts, cls(texts, stops))
            if len(_TABLES) > 8:
                _TABLES.popitem(last=False)
        return _TABLES[key][1]

    def _on(self, device: torch.device) -> tuple:
        """(tail, inner, length, lengths) on `device`, copied there once (the CPU tables stay)."""
        if device not in self._copies:
            self._copies[device] = tuple(t.to(device) for t in (self.tail, self.inner, self.length, self.lengths))
        return self._copies[device]

    def match(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Whether a stop string ends inside each row's last token [B]. Each possible count k of
        characters the last token closes starts a path; going back a token at a time, a path goes
        on while the token fits before the count matched so far, and the string is matched once
        the count reaches its length."""
        tail_t, inner_t, length_t, m = self._on(input_ids.device)  # m: the stop strings' lengths [S]
        V = length_t.shape[0]
        ids = input_ids[:, -self.window:].flip(1)
        ids = torch.where((ids >= 0) & (ids < V - 1), ids, V - 1)
        K = tail_t.shape[-1]
        k = torch.arange(K, device=ids.device)
        tail = tail_t[ids[:, 0]]  # [B, S, K]
        done = (tail & (k == m[:, None])).any(dim=(1, 2))
        if ids.shape[1] == 1:
            return done
        rest = ids[:, 1:]  # the tokens before the last, nearest first [B, W-1]
        lens = length_t[rest]
        before = k + (lens.cumsum(1) - lens)[:, :, None]  # characters matched after each token, per path [B, W-1, K]
        fits = inner_t[rest].gather(3, before.clamp(max=K - 1)[:, :, None, :].expand(-1, -1, m.shape[0], -1))
        alive = (tail & (k < m[:, None]))[:, None] & (fits.to(torch.uint8).cummin(dim=1).values > 0)
        reached = (before + lens[:, :, None])[:, :, None, :] >= m[None, None, :, None]
        return done | (alive & reached).any(dim=(1, 2, 3))


__all__ = [
    "ConfidenceCriteria",
    "EosTokenCriteria",
    "MaxLengthCriteria",
    "MaxTimeCriteria",
    "StopStringCriteria",
    "StoppingCriteria",
    "StoppingCriteriaList",
]
