"""Helpers for tests of output held to a grammar: a JSON Schema and a check of it written apart from
llguidance, and Transformers' greedy `generate` under llguidance's own per-token mask."""

from __future__ import annotations

import json

import llguidance
import torch
import transformers

from moetorch.generation.grammar import Grammar

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "ok", "n", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 999},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}}


def check_schema(text: str) -> None:
    """`text` is one JSON object that SCHEMA describes, laid out as json.dumps lays it out."""
    value = json.loads(text)
    assert set(value) == {"name", "ok", "n", "tags"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert isinstance(value["ok"], bool) and isinstance(value["n"], int) and 0 <= value["n"] <= 999
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 3 and set(value["tags"]) <= {"a", "b", "c"}
    assert list(value) == ["name", "ok", "n", "tags"]
    assert text in (json.dumps(value), json.dumps(value, ensure_ascii=False))  # json.dumps's separators


class OracleMask(transformers.LogitsProcessor):
    """Transformers' side: each row's llguidance matcher (built from the grammar's text, fed the
    row's tokens) gives its allowed tokens as one byte a token (`compute_logit_bias`); the rest
    get -inf. The grammar's end-of-sequence token (the tokenizer's EOS) is allowed where it may end."""

    def __init__(self, spec: str, tok, vocab: int, rows: int, prompt: int) -> None:
        ll = llguidance.LLTokenizer(tok.backend_tokenizer.to_str(), n_vocab=vocab, eos_token=tok.eos_token_id)
        self.matchers = [llguidance.LLMatcher(ll, spec) for _ in range(rows)]
        self.prompt, self.vocab = prompt, vocab

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for i, m in enumerate(self.matchers):
            new = input_ids[i, self.prompt:].tolist()
            if new:
                assert m.consume_token(new[-1]), m.get_error()
            allowed = torch.frombuffer(bytearray(m.compute_logit_bias()), dtype=torch.uint8)[:self.vocab] > 0
            scores[i, :allowed.shape[0]][~allowed] = float("-inf")
            scores[i, allowed.shape[0]:] = float("-inf")
        return scores


def hf_constrained(theirs, tok, grammar: Grammar, prompt: list[int], n: int) -> list[int]:
    vocab = theirs.config.vocab_size
    mask = OracleMask(grammar.spec, tok, vocab, 1, len(prompt))
    out = theirs.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, logits_processor=[mask],
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return out[0, len(prompt):].tolist()


def agrees_with_oracle(theirs, tok, grammar: Grammar, prompt: list[int], tokens: list[int], n: int,
                       margin: float = 0.5) -> None:
    """Greedy `tokens` under `grammar`, checked step by step against Transformers' logits over the
    same prefix (one forward, teacher forced) under the oracle's mask: every token is one the mask
    allows, and its logit is within `margin` of the best allowed one. (Exactly greedy but for near
    ties: a token's logits move between a batched step, a cached step and a full forward, and a
    router's near-tied choice can move them by a few tenths.) Where the tokens stop before `n`
    without EOS, the grammar allows EOS alone there."""
    eos = tok.eos_token_id
    mask = OracleMask(grammar.spec, tok, theirs.config.vocab_size, 1, len(prompt))
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = theirs(ids).logits[0, len(prompt) - 1:]
    for t in range(len(tokens) + 1):
        scores = mask(ids[:, :len(prompt) + t], logits[t:t + 1].clone())[0]
        if t == len(tokens):
            if len(tokens) < n and (not tokens or tokens[-1] != eos):
                assert torch.isfinite(scores).nonzero().flatten().tolist() == [eos], (t, tokens)
            break
        best = scores.max().item()
        assert torch.isfinite(scores[tokens[t]]), f"step {t}: token {tokens[t]} is not allowed ({tokens})"
        assert scores[tokens[t]].item() >= best - margin, (
            f"step {t}: token {tokens[t]} at {scores[tokens[t]].item():.4f}, the best allowed at {best:.4f} "
            f"({int(scores.argmax())}); {tokens}")


def same_as_oracle(ours_tokens: list[int], hf_tokens: list[int], eos: int, n: int) -> None:
    """Where the grammar can take no further token the manager ends without a token, and
    Transformers draws its only allowed one, EOS; else the tokens are the same."""
    if len(ours_tokens) < len(hf_tokens):
        assert hf_tokens == ours_tokens + [eos], (ours_tokens, hf_tokens)
    else:
        assert ours_tokens == hf_tokens, (ours_tokens, hf_tokens)
