"""Output held to a grammar: JSON (any object, or what a JSON Schema describes), a regular
expression, or a Lark grammar.

The matching is llguidance's (the Rust matcher behind the "guidance" structured-output backends of
vLLM and SGLang, and llama.cpp's): an optional dependency, in moetorch's `serve` extra
(`pip install llguidance`).

- `Grammar` is one constraint compiled against one tokenizer's vocabulary, checked when it is
  built: a schema or pattern it cannot follow is a ValueError that says why.
- `Grammar.matcher()` gives a `Matcher` for one sequence. It takes the sequence's tokens, and
  writes the next token's allowed set into a row of a bitmask (int32 words: bit t % 32 of word
  t // 32 allows token t).
- `apply_bitmask` sets the disallowed logits to -inf, on the logits' device.

In continuous batching, `add_request(..., grammar=g)` holds a request to `g`
(`moetorch/engine/batching.py`). In `generate`, `GrammarLogitsProcessor(g)` holds every sequence to
it, beams included. A request's end-of-sequence tokens are allowed exactly where the grammar may
end. A sequence whose grammar can go no further ends there.
"""

from __future__ import annotations

import json
import weakref
from typing import Any

import torch

from .logits_process import LogitsProcessor

WORD = 32  # tokens a bitmask word holds

_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {width: Vocabulary}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ImportError("constrained output (grammar, response_format) needs llguidance: "
                          "pip install llguidance (it is in moetorch's serve extra)") from None
    return llguidance


class Vocabulary:
    """A tokenizer's tokens as llguidance matches them, `size` wide (the model's logits width,
    which may exceed the tokenizer's: the tokens past it are never allowed). `tokenizer_json`: the
    tokenizer's tokenizers-library JSON (`tokenizer.backend_tokenizer.to_str()`); `eos`: its
    end-of-sequence ids."""

    def __init__(self, tokenizer_json: str, size: int, eos: list[int]) -> None:
        llg = _llguidance()
        self.size, self.words = size, (size + WORD - 1) // WORD
        self.eos = list(eos)
        self.tokenizer_json = tokenizer_json
        self.ll = llg.LLTokenizer(tokenizer_json, n_vocab=size, eos_token=self.eos or None)
        # llguidance marks "the grammar may end here" by allowing its end-of-sequence token
        self.end_token = self.ll.eos_token

    @classmethod
    def of(cls, tokenizer, size: int | None = None) -> Vocabulary:
        """The vocabulary of a moetorch (or Transformers fast) tokenizer, built once per tokenizer
        and width (about 0.1 s for 32k tokens)."""
        width = len(tokenizer) if size is None else int(size)
        if width < len(tokenizer):
            raise ValueError(f"vocab_size={width} is below the tokenizer's {len(tokenizer)} tokens")
        try:
            cached = _VOCABS.setdefault(tokenizer, {})
        except TypeError:  # a tokenizer that cannot be weakly referenced: built each time
            cached = {}
        if width not in cached:
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise TypeError(f"grammar: {type(tokenizer).__name__} has no backend_tokenizer (a tokenizers-library "
                                "tokenizer is needed)")
            eos = getattr(tokenizer, "eos_token_id", None)
            eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
            cached[width] = cls(backend.to_str(), width, eos)
        return cached[width]


class Grammar:
    """A constraint compiled against a vocabulary (`spec`: llguidance's grammar text). Build it
    with `Grammar.json`, `Grammar.regex` or `Grammar.lark`; `vocab_size` is the model's logits
    width where it exceeds the tokenizer's (Phi-3.5-MoE: 32064 against 32011 tokens)."""

    def __init__(self, vocab: Vocabulary, spec: str, what: str = "grammar") -> None:
        # compiled once: each sequence's matcher is a copy of this one (microseconds, where
        # compiling takes milliseconds)
        self._start = _llguidance().LLMatcher(vocab.ll, spec, log_level=0)
        if self._start.is_error():
            raise ValueError(f"{what}: {self._start.get_error()}")
        self.vocab, self.spec, self.what = vocab, spec, what

    @classmethod
    def json(cls, tokenizer, schema: dict | str | None = None, *, vocab_size: int | None = None,
             whitespace_flexible: bool = False) -> Grammar:
        """JSON text: any JSON object when `schema` is None (OpenAI's `json_object`), else what the
        JSON Schema `schema` (a dict or its text) describes. It is laid out as Python's
        `json.dumps` lays it out (`", "` and `": "`, no other whitespace), so that a model cannot
        run on in whitespace; `whitespace_flexible=True` allows any whitespace between its tokens."""
        llg = _llguidance()
        if schema is None:
            schema = {"type": "object"}
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"schema: not JSON ({e})") from None
        if not isinstance(schema, dict):
            raise ValueError(f"schema: a JSON Schema is a JSON object, got {type(schema).__name__}")
        layout = {"whitespace_flexible": True} if whitespace_flexible else \
            {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        spec = llg.LLMatcher.grammar_from_json_schema(schema, overrides=layout)
        return cls(Vocabulary.of(tokenizer, vocab_size), spec, "schema")

    @classmethod
    def regex(cls, tokenizer, pattern: str, *, vocab_size: int | None = None) -> Grammar:
        """Text that the regular expression `pattern` matches in full."""
        if not isinstance(pattern, str):
            raise ValueError(f"regex: a pattern is a string, got {type(pattern).__name__}")
        return cls(Vocabulary.of(tokenizer, vocab_size), _llguidance().LLMatcher.grammar_from_regex(pattern), "regex")

    @classmethod
    def lark(cls, tokenizer, text: str, *, vocab_size: int | None = None) -> Grammar:
        """Text that the Lark grammar `text` (llguidance's dialect; start rule `start`) derives."""
        if not isinstance(text, str):
            raise ValueError(f"lark: a grammar is a string, got {type(text).__name__}")
        return cls(Vocabulary.of(tokenizer, vocab_size), _llguidance().LLMatcher.grammar_from_lark(text), "lark")

    def matcher(self) -> Matcher:
        """A matcher at the grammar's start, for one sequence."""
        return Matcher(self, self._start.deep_copy())

    def __repr__(self) -> str:
        return f"Grammar({self.what}, vocab_size={self.vocab.size})"


class Matcher:
    """One sequence's place in a grammar."""

    __slots__ = ("grammar", "ll")

    def __init__(self, grammar: Grammar, ll: Any) -> None:
        self.grammar, self.ll = grammar, ll

    def consume(self, token: int) -> None:
        """Take the sequence's next token (one the last mask allowed)."""
        self.ll.consume_token(int(token))

    @property
    def error(self) -> str | None:
        """Why the sequence left the grammar (a token the mask did not allow), else None."""
        return self.ll.get_error() or None if self.ll.is_error() else None

    @property
    def done(self) -> bool:
        """Whether the grammar can take no further token: the sequence ends here."""
        return self.ll.is_stopped()

    def copy(self) -> Matcher:
        return Matcher(self.grammar, self.ll.deep_copy())


_EXECUTOR = None


def fill_rows(matchers: list[Matcher], eos: list, bitmask: torch.Tensor) -> None:
    """Row i of `bitmask` ([>= len(matchers), W] int32 on the CPU, contiguous, W the matchers'
    vocabulary's words) := matcher i's allowed next tokens, several rows computed in parallel
    threads. Each row's `eos[i]` tokens are allowed where its grammar may end, and only there; a
    grammar that can take no further token allows them alone."""
    if not matchers:
        return
    words = matchers[0].grammar.vocab.words
    if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not bitmask.is_contiguous() \
            or bitmask.shape[1] != words or bitmask.shape[0] < len(matchers):
        raise ValueError(f"fill_rows: the bitmask must be int32 CPU contiguous [>= {len(matchers)}, {words}], got "
                         f"{bitmask.dtype} {bitmask.device} {tuple(bitmask.shape)}")
    if len(matchers) == 1:
        matchers[0].ll.unsafe_compute_mask_ptr(bitmask.data_ptr(), words * 4)
    else:
        global _EXECUTOR
        if _EXECUTOR is None:
            _EXECUTOR = _llguidance().LLExecutor()
        _EXECUTOR.unsafe_compute_mask_ptr([(m.ll, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                          words * 4, bitmask.shape[0])
    for i, (m, ends) in enumerate(zip(matchers, eos)):
        row, vocab = bitmask[i], m.grammar.vocab
        end = vocab.end_token
        may_end = bool((int(row[end // WORD]) >> (end % WORD)) & 1)
        _set_bit(row, end, False)
        for t in ends:
            if 0 <= t < vocab.size:  # a negative EOS id (one that never comes) has no bit
                _set_bit(row, t, may_end)


def _set_bit(row: torch.Tensor, token: int, on: bool) -> None:
    w, b = divmod(int(token), WORD)
    word = int(row[w]) & 0xFFFFFFFF
    word = word | (1 << b) if on else word & ~(1 << b)
    row[w] = word - (1 << 32) if word >= 1 << 31 else word


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """`logits` [B, V] with the tokens that `bitmask` ([R, W] int32, on the logits' device) does
    not allow set to -inf, in place. `rows` [R]: the logits' rows that the bitmask's rows mask (None:
    all, R = B). Tokens past the bitmask's width are disallowed."""
    V = logits.shape[-1]
    shifts = torch.arange(WORD, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).reshape(bitmask.shape[0], -1)
    if allowed.shape[1] < V:
        allowed = torch.nn.functional.pad(allowed, (0, V - allowed.shape[1]))
    blocked = allowed[:, :V] == 0
    if rows is None:
        return logits.masked_fill_(blocked, float("-inf"))
    logits[rows] = logits[rows].masked_fill(blocked, float("-inf"))
    return logits


class GrammarLogitsProcessor(LogitsProcessor):
    """Holds every sequence of a `generate` call to `grammar`: disallowed tokens get -inf. Each
    call reads the tokens generated since the first call (that call's length is the prompt's),
    so beams and sampled rows each follow their own place in the grammar. `eos_token_id`: the
    tokens allowed where the grammar may end (default: the grammar's tokenizer's). A row that has
    ended (an end token, its grammar done, or a token the grammar does not take, as the padding of
    a row that another rule stopped) is left alone. The mask is computed on the host each step."""

    def __init__(self, grammar: Grammar, eos_token_id: int | list[int] | None = None) -> None:
        if not isinstance(grammar, Grammar):
            raise TypeError(f"GrammarLogitsProcessor: grammar must be a moetorch Grammar, got {type(grammar).__name__}")
        self.grammar = grammar
        eos = grammar.vocab.eos if eos_token_id is None else eos_token_id
        # a negative id (an EOS that never comes, as generate takes one) is no token to allow
        self.eos = frozenset(t for t in ([eos] if isinstance(eos, int) else [int(t) for t in eos]) if t >= 0)
        self._prompt: int | None = None
        self._states: dict[tuple, Matcher | None] = {}  # generated tokens -> their matcher (None: ended)

    def _state(self, generated: tuple) -> Matcher | None:
        """The matcher after `generated`, or None where the row has ended: at an end token, after
        its grammar was done, or at a token the grammar does not take (a row that another rule
        stopped, then padded)."""
        if generated in self._states:
            return self._states[generated]
        if not generated:
            return self.grammar.matcher()
        parent = self._state(generated[:-1])
        last = generated[-1]
        if parent is None or last in self.eos or parent.done:
            return None
        m = parent.copy()
        m.consume(last)
        return None if m.error is not None else m

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._prompt is None:
            self._prompt = input_ids.shape[1]
        vocab = self.grammar.vocab
        if scores.shape[-1] > vocab.size:
            raise ValueError(f"GrammarLogitsProcessor: the scores are {scores.shape[-1]} wide, the grammar's "
                             f"vocabulary {vocab.size}: build it with vocab_size={scores.shape[-1]}")
        states: dict[tuple, Matcher | None] = {}
        live: dict[tuple, int] = {}  # a matcher's key -> its row of the bitmask (rows in one place share one)
        rows, masks = [], []
        for i, seq in enumerate(input_ids[:, self._prompt:].tolist()):
            key = tuple(seq)
            if key not in states:
                states[key] = self._state(key)
            if states[key] is not None and (self.eos or not states[key].done):  # else: nothing to allow
                rows.append(i)
                masks.append(live.setdefault(key, len(live)))
        self._states = states
        if rows:
            bitmask = torch.empty(len(live), vocab.words, dtype=torch.int32)
            fill_rows([states[key] for key in live], [self.eos] * len(live), bitmask)
            bitmask = bitmask[torch.tensor(masks)].to(scores.device)
            scores = apply_bitmask(scores.clone(), bitmask, torch.tensor(rows, device=scores.device))
        return scores
