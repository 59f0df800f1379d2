"""The OpenAI-compatible server (moetorch/serve): completions and chat against Transformers'
`generate` on the embedded models, streaming, stop strings, per-choice sampling, log-probabilities,
errors in OpenAI's shape, the OpenAI client over a real socket, and cancellation when a client
leaves."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import sys
import threading
import time
from typing import Literal

import pytest
import torch
import transformers
from fastapi.testclient import TestClient
from grammar_oracle import SCHEMA, check_schema, hf_constrained
from parity import OpenAIPenalties
from tok_util import build_llama_tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

import moetorch
from moetorch.defaults import ASSETS
from moetorch.serve import Detokenizer, Engine, StopText, create_app

MODELS = ("tiny-phimoe", "tiny-jetmoe")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
             "type": "object", "additionalProperties": False, "required": ["city", "unit"],
             "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}}}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "additionalProperties": False, "required": ["a", "b"],
             "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                            "b": {"type": "integer", "minimum": 0, "maximum": 99}}}}}]
PROMPTS = ["def fibonacci(n):", "import os\nimport", "class Parser:\n    def", "# Copyright"]


@pytest.fixture(scope="module", params=MODELS)
def served(request):
    """(our app's client, Transformers' model, tokenizer, engine) for an embedded model."""
    name = request.param
    ours = moetorch.AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    tok = moetorch.AutoTokenizer.from_pretrained(name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ASSETS / name), dtype=torch.float32).eval()
    engine = Engine(ours, tok, name, max_model_len=160, max_batch=6)
    with TestClient(create_app(engine)) as client:
        yield client, hf, tok, engine


def hf_greedy(hf, ids: list[int], n: int, eos: list[int]) -> tuple[list[int], list[float]]:
    """Transformers' greedy tokens (through the first EOS) and their log-probabilities."""
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos[0],
                      output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, len(ids):].tolist()
    lps = [float(s[0].float().log_softmax(-1)[t]) for s, t in zip(out.scores, new)]
    for i, t in enumerate(new):
        if t in eos:
            return new[:i + 1], lps[:i + 1]
    return new, lps


_BYTE_OF = {ch: b for b, ch in bytes_to_unicode().items()}


def shown(tok, t: int, completions: bool = False) -> str:
    """A token as log-probabilities show it: its own bytes (its byte-level BPE symbols read back
    through GPT-2's alphabet), as text where they are UTF-8, else each byte as \\xNN (after
    "bytes:" on completions)."""
    raw = bytes(_BYTE_OF[ch] for ch in tok.convert_ids_to_tokens(t))
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return ("bytes:" if completions else "") + raw.decode(errors="backslashreplace")


def hf_tokenizer(engine):
    """Transformers' tokenizer of the engine's embedded model (the oracle)."""
    return transformers.AutoTokenizer.from_pretrained(str(ASSETS / engine.name))


def within(want: list[int], eos: list[int]) -> list[int]:
    """The tokens whose text the reply holds: an EOS at the end adds none."""
    return want[:-1] if want and want[-1] in eos else want


def sse(lines) -> list:
    """The JSON events of a server-sent event stream, "[DONE]" last."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_completions_greedy_equal_transformers(served):
    client, hf, tok, engine = served
    r = client.post("/v1/completions", json={"model": engine.name, "prompt": PROMPTS, "max_tokens": 24,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == engine.name
    completion = 0
    for i, (p, choice) in enumerate(zip(PROMPTS, body["choices"])):
        ids = tok.encode(p)
        want, _ = hf_greedy(hf, ids, 24, engine.eos)
        assert choice["index"] == i
        assert choice["text"] == tok.decode(want, skip_special_tokens=True)
        assert choice["finish_reason"] == ("stop" if want[-1] in engine.eos else "length")
        completion += len(want)
    assert body["usage"] == {"prompt_tokens": sum(len(tok.encode(p)) for p in PROMPTS),
                             "completion_tokens": completion, "total_tokens": body["usage"]["prompt_tokens"] + completion}
    # a request ends at the model's EOS (here, as if the 4th greedy token were it), unless ignore_eos
    want, _ = hf_greedy(hf, tok.encode(PROMPTS[0]), 24, engine.eos)
    eos, engine.eos = engine.eos, [want[3]]
    try:
        r = client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0}).json()
        assert r["usage"]["completion_tokens"] == want.index(want[3]) + 1 and r["choices"][0]["finish_reason"] == "stop"
        r = client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0,
                                                 "ignore_eos": True}).json()
        assert r["usage"]["completion_tokens"] == 24 and r["choices"][0]["finish_reason"] == "length"
    finally:
        engine.eos = eos
    # token ids as the prompt, and echo
    ids = tok.encode(PROMPTS[0])
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 24, "temperature": 0, "echo": True}).json()
    assert r["choices"][0]["text"] == tok.decode(ids, skip_special_tokens=True) + body["choices"][0]["text"]


def test_chat_turns_share_their_prefix(served):
    """A chat's second turn starts from the first turn's row (its prompt and reply), and a request
    with the same system message from the first's; both still give Transformers' greedy reply."""
    client, hf, tok, engine = served
    system = {"role": "system", "content": "You are a careful assistant who writes short, correct Python code. "
              "Explain nothing unless asked; answer with code only."}
    turns = [[system, {"role": "user", "content": "Sort a list"}]]
    before, prev = engine.manager.stats["shared_tokens"], []
    for n in range(3):
        messages = turns[-1]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        want, _ = hf_greedy(hf, ids, 12, engine.chat_eos)
        r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        reply = r.json()["choices"][0]["message"]["content"]
        assert reply == tok.decode(want, skip_special_tokens=True)
        shared = engine.manager.stats["shared_tokens"] - before
        before += shared
        if n == 0:
            turns.append([system, {"role": "user", "content": "Reverse a string"}])  # the same system message
        elif n == 1:
            assert shared >= 16  # at least the system message's first block
            turns.append([*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": "Shorter"}])
        else:
            assert shared >= len(prev)  # at least the turn before's whole prompt
        prev = ids


def test_chat_greedy_equals_transformers(served):
    client, hf, tok, engine = served
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    want, lps = hf_greedy(hf, ids, 30, engine.chat_eos)
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 30, "temperature": 0,
                                                  "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": tok.decode(want, skip_special_tokens=True)}
    assert choice["finish_reason"] == ("stop" if want[-1] in engine.chat_eos else "length")
    content = choice["logprobs"]["content"]
    kept = within(want, engine.chat_eos)
    assert [c["token"] for c in content] == [shown(tok, t) for t in kept]
    assert b"".join(bytes(c["bytes"]) for c in content) == choice["message"]["content"].encode()
    torch.testing.assert_close(torch.tensor([c["logprob"] for c in content]), torch.tensor(lps[:len(kept)]),
                               atol=1e-4, rtol=0)
    # the two likeliest tokens of each step, from Transformers' logits over prompt + reply
    with torch.no_grad():
        logits = hf(torch.tensor([ids + want])).logits[0, len(ids) - 1:-1].float().log_softmax(-1)
    values, top_ids = logits[:len(kept)].topk(2)
    assert [[t["token"] for t in c["top_logprobs"]] for c in content] == \
        [[shown(tok, i) for i in row] for row in top_ids.tolist()]
    torch.testing.assert_close(torch.tensor([[t["logprob"] for t in c["top_logprobs"]] for c in content]), values,
                               atol=1e-4, rtol=0)
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    # content parts of text are joined
    parts = [{"role": "system", "content": [{"type": "text", "text": "You write "}, {"type": "text", "text": "Python."}]},
             messages[1]]
    again = client.post("/v1/chat/completions", json={"messages": parts, "max_tokens": 30, "temperature": 0}).json()
    assert again["choices"][0]["message"] == choice["message"]


def test_streaming_gives_the_same_text(served):
    client, _, tok, engine = served
    for route, body, text_of in [
        ("/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 40}, lambda c: c["text"]),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 40},
         lambda c: c["message"]["content"]),
    ]:
        whole = client.post(route, json={**body, "temperature": 0}).json()
        with client.stream("POST", route, json={**body, "temperature": 0, "stream": True,
                                                "stream_options": {"include_usage": True}}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = sse(r.iter_lines())
        assert events[-1] == "[DONE]"
        usage, chunks = events[-2], events[:-2]
        assert usage["choices"] == [] and usage["usage"] == whole["usage"]
        assert all(c["usage"] is None for c in chunks)
        if "chat" in route:
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert all(c["object"] == "chat.completion.chunk" for c in chunks)
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        else:
            text = "".join(c["choices"][0]["text"] for c in chunks)
        assert text == text_of(whole["choices"][0])
        assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == whole["choices"][0]["finish_reason"]
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        assert len({c["id"] for c in chunks}) == 1


def test_stop_strings(served):
    """The text ends before the first stop string, found across tokens; streaming alike."""
    client, _, tok, engine = served
    full = client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0}).json()
    text = full["choices"][0]["text"]
    rng = random.Random(5)
    for _ in range(3):
        a = rng.randrange(2, len(text) - 4)
        stop = text[a:a + rng.randint(2, 4)]
        want = text[:text.index(stop)]
        for stream in (False, True):
            body = {"prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0, "stop": [stop, "\x00never"],
                    "stream": stream}
            if stream:
                with client.stream("POST", "/v1/completions", json=body) as r:
                    chunks = sse(r.iter_lines())[:-1]
                got, reason = "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]
            else:
                choice = client.post("/v1/completions", json=body).json()["choices"][0]
                got, reason = choice["text"], choice["finish_reason"]
            assert (got, reason) == (want, "stop"), (stop, stream)
    # a stop string that never comes changes nothing
    same = client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0,
                                                "stop": "\x00never"}).json()
    assert same["choices"] == full["choices"]


def test_sampling_choices_and_seeds(served):
    client, _, tok, engine = served
    body = {"prompt": PROMPTS[2], "max_tokens": 16, "temperature": 1.2, "top_p": 0.95, "n": 3, "seed": 17}
    a = client.post("/v1/completions", json=body).json()["choices"]
    b = client.post("/v1/completions", json={**body, "prompt": [PROMPTS[2], PROMPTS[3]]}).json()["choices"]
    assert [c["index"] for c in a] == [0, 1, 2] and [c["index"] for c in b] == [0, 1, 2, 3, 4, 5]
    assert [c["text"] for c in a] == [c["text"] for c in b[:3]]  # a seed repeats its draws beside other requests
    assert len({c["text"] for c in a}) > 1  # the choices draw from seed, seed + 1, ...
    other = client.post("/v1/completions", json={**body, "seed": 18}).json()["choices"]
    assert [c["text"] for c in other] != [c["text"] for c in a]
    # top_k=1 is greedy at any temperature
    greedy = client.post("/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 16, "temperature": 0}).json()
    k1 = client.post("/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 16, "temperature": 1.7,
                                              "top_k": 1}).json()
    assert k1["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_best_of_returns_the_candidates_likeliest_per_token(served):
    """best_of=k: k candidates a prompt (candidate j draws from seed + j, as choice j of n=k does),
    of which the n with the highest mean log-probability a token come back, best first; usage
    counts every candidate's tokens."""
    client, *_ = served
    body = {"prompt": [PROMPTS[1], PROMPTS[2]], "max_tokens": 10, "temperature": 1.3, "seed": 5, "logprobs": 0}
    every = client.post("/v1/completions", json={**body, "n": 4}).json()
    best = client.post("/v1/completions", json={**body, "n": 2, "best_of": 4}).json()
    assert [c["index"] for c in best["choices"]] == [0, 1, 2, 3]
    for i in range(2):  # per prompt: the candidates ranked by their own log-probabilities
        candidates = every["choices"][4 * i:4 * i + 4]

        def mean(c):
            lps = c["logprobs"]["token_logprobs"]
            return sum(lps) / len(lps)

        ranked = sorted(candidates, key=mean, reverse=True)
        assert len({round(mean(c), 3) for c in candidates}) == 4  # an order that rounding cannot change
        assert [c["text"] for c in best["choices"][2 * i:2 * i + 2]] == [c["text"] for c in ranked[:2]]
        for got, want in zip(best["choices"][2 * i:2 * i + 2], ranked[:2]):  # batches of other sizes: 1e-4
            assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
            assert got["logprobs"]["token_logprobs"] == pytest.approx(want["logprobs"]["token_logprobs"], abs=1e-4)
    assert best["usage"] == every["usage"]
    # best_of = n: the choices as n gives them; with echo, the prompt's text first
    same = client.post("/v1/completions", json={**body, "n": 2, "best_of": 2}).json()
    plain = client.post("/v1/completions", json={**body, "n": 2}).json()["choices"]
    assert [c["text"] for c in same["choices"]] == [c["text"] for c in plain]
    echoed = client.post("/v1/completions", json={**body, "prompt": PROMPTS[1], "best_of": 3, "echo": True}).json()
    assert len(echoed["choices"]) == 1 and echoed["choices"][0]["text"].startswith(PROMPTS[1])


def test_penalties_and_logit_bias(served):
    """presence_penalty, frequency_penalty (OpenAI's formula), logit_bias and repetition_penalty at
    temperature 0 give Transformers' greedy text with the same processors, in completions and chat;
    min_p=1 samples the likeliest token."""
    client, hf, tok, engine = served
    ids = tok.encode(PROMPTS[1])
    plain, _ = hf_greedy(hf, ids, 20, engine.eos)

    def hf_text(prompt_ids, eos, frequency=0.0, presence=0.0, **kw):
        procs = transformers.LogitsProcessorList([OpenAIPenalties(frequency, presence, len(prompt_ids))])
        out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=20, do_sample=False, eos_token_id=eos,
                          pad_token_id=eos[0], logits_processor=procs, **kw)[0, len(prompt_ids):].tolist()
        cut = next((i + 1 for i, t in enumerate(out) if t in eos), len(out))
        return tok.decode(out[:cut], skip_special_tokens=True)

    cases = [({"frequency_penalty": 1.5, "presence_penalty": 0.7}, {"frequency": 1.5, "presence": 0.7}),
             ({"repetition_penalty": 1.6}, {"repetition_penalty": 1.6}),
             ({"logit_bias": {str(plain[0]): -100, "400": 3.5}},
              {"sequence_bias": {(plain[0],): -100.0, (400,): 3.5}})]
    texts = []
    for fields, hf_kw in cases:
        r = client.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 20, "temperature": 0, **fields})
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
        assert texts[-1] == hf_text(ids, engine.eos, **hf_kw), fields
    assert all(t != tok.decode(plain, skip_special_tokens=True) for t in texts)  # each setting bites
    messages = [{"role": "user", "content": "Write a loop"}]
    chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 20, "temperature": 0,
                                                  "frequency_penalty": 2.0, "repetition_penalty": 1.2})
    assert r.json()["choices"][0]["message"]["content"] == \
        hf_text(chat_ids, engine.chat_eos, frequency=2.0, repetition_penalty=1.2)
    r = client.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 20, "min_p": 1.0, "seed": 3})
    assert r.json()["choices"][0]["text"] == tok.decode(plain, skip_special_tokens=True)


def test_completion_logprobs(served):
    client, hf, tok, engine = served
    ids = tok.encode(PROMPTS[3])
    want, lps = hf_greedy(hf, ids, 12, engine.eos)
    choice = client.post("/v1/completions", json={"prompt": PROMPTS[3], "max_tokens": 12, "temperature": 0,
                                                  "logprobs": 0}).json()["choices"][0]
    lp = choice["logprobs"]
    kept = within(want, engine.eos)
    assert lp["tokens"] == [shown(tok, t, completions=True) for t in kept] and lp["top_logprobs"] is None
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"]), torch.tensor(lps[:len(kept)]), atol=1e-4, rtol=0)
    # each token's offset: where its text starts in Transformers' decode of the tokens (a piece of a
    # character starts where the character does)
    hf_tok = hf_tokenizer(engine)
    assert lp["text_offset"] == [len(hf_tok.decode(kept[:i]).rstrip("\ufffd")) for i in range(len(kept))]
    # logprobs=3: each step's three likeliest tokens, by their text
    top = client.post("/v1/completions", json={"prompt": PROMPTS[3], "max_tokens": 12, "temperature": 0,
                                               "logprobs": 3}).json()["choices"][0]["logprobs"]["top_logprobs"]
    with torch.no_grad():
        logits = hf(torch.tensor([ids + want])).logits[0, len(ids) - 1:-1].float().log_softmax(-1)
    values, top_ids = logits.topk(3)
    for step, row, vals in zip(top, top_ids.tolist(), values.tolist()):
        want_step = {}
        for i, v in zip(row, vals):
            want_step.setdefault(shown(tok, i, completions=True), v)
        assert step.keys() == want_step.keys()
        assert all(abs(step[k] - want_step[k]) < 1e-4 for k in step)


def test_echo_scores_the_prompt(served):
    """echo with logprobs (as lm-evaluation-harness scores text): each prompt token's
    log-probability given the tokens before it and its likeliest alternatives, from Transformers'
    forward; max_tokens=0 scores without generating."""
    client, hf, tok, engine = served
    text = PROMPTS[1] + " sys"
    ids = tok.encode(text)
    with torch.no_grad():
        lsm = hf(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    want = lsm.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == tok.decode(ids, skip_special_tokens=True) and choice["finish_reason"] == "length"
    assert lp["tokens"] == [shown(tok, t, completions=True) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), want, atol=1e-4, rtol=0)
    values, top_ids = lsm.topk(2)
    for step, row, vals in zip(lp["top_logprobs"][1:], top_ids.tolist(), values.tolist()):
        assert list(step) == list(dict.fromkeys(shown(tok, i, completions=True) for i in row))
        assert abs(step[shown(tok, row[0], completions=True)] - vals[0]) < 1e-4
    assert r.json()["usage"]["completion_tokens"] == 0
    # with tokens generated after it: the prompt's entries, then the completion's; streamed alike
    body = {"prompt": text, "max_tokens": 5, "echo": True, "logprobs": 1, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    assert whole["text"].startswith(choice["text"]) and len(whole["logprobs"]["tokens"]) == len(ids) + 5
    assert whole["logprobs"]["token_logprobs"][:len(ids)] == pytest.approx(lp["token_logprobs"], abs=1e-6)
    offsets = whole["logprobs"]["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = sse(r.iter_lines())[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]] == whole["logprobs"]["tokens"]
    assert [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]] == offsets
    r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("route,body,status,param,match", [
    ("/v1/completions", {"prompt": "x", "max_token": 3}, 400, "max_token", "unknown field"),
    ("/v1/completions", {"prompt": "x", "best_of": 2, "n": 3}, 400, "best_of", "at least n (3)"),
    ("/v1/completions", {"prompt": "x", "best_of": 3, "n": 2, "stream": True}, 400, "best_of", "cannot stream"),
    ("/v1/completions", {"prompt": "x", "best_of": 0}, 400, "best_of", "greater than or equal"),
    ("/v1/completions", {"prompt": "x", "best_of": 129}, 400, "best_of", "less than or equal"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "best_of": 2}, 400, "best_of",
     "unknown field"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty", "less than or equal"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty", "greater than or equal"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty", "greater than"),
    ("/v1/completions", {"prompt": "x", "min_p": 1.5}, 400, "min_p", "less than or equal"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"five": 10}}, 400, "logit_bias", "'five' is not a token id"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias", "[-100, 100]"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1000000": 1}}, 400, "logit_bias", "outside the vocabulary"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"-1": 1}}, 400,
     "logit_bias", "outside the vocabulary"),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs", "less than or equal"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 400}, 400, "prompt", "max-model-len"),
    ("/v1/completions", {"prompt": "x " * 200}, 400, "prompt", "max-model-len"),
    ("/v1/completions", {"prompt": [[5], []]}, 400, "prompt", "prompt[1]: the prompt is empty"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "no prompt"),
    ("/v1/completions", {"prompt": [1, 10**6]}, 400, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", "greater than or equal"),
    ("/v1/completions", {"prompt": "x", "top_p": -0.1}, 400, "top_p", "greater than or equal to 0"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n", ""),
    ("/v1/completions", {"prompt": "x", "stop": ["a", ""]}, 400, "stop", "empty"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
    ("/v1/completions", {}, 400, "prompt", "required"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", ""),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", ""),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content", "only text"),
    *[("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], **fields}, 400, param, match)
      for fields, param, match in (
          ({"tools": TOOLS}, "tool_choice", "'auto' (the default with tools) is not supported"),
          ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "tool_choice='required'"),
          ({"tool_choice": "required"}, "tool_choice", "needs tools"),
          ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "got 'always'"),
          ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": ["add"]}}}, "tool_choice",
           "which is not among the tools"),
          ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
           "'nope', which is not among the tools ['add', 'get_weather']"),
          ({"tools": [{"type": "retrieval"}], "tool_choice": "required"}, "tools[0]", "must be 'function'"),
          ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools[0].function", "an object with a name"),
          ({"tools": [{"type": "function", "function": {"name": "a b"}}], "tool_choice": "required"},
           "tools[0].function.name", "'a b'"),
          ({"tools": [TOOLS[0], TOOLS[0]], "tool_choice": "required"}, "tools[1].function.name", "given twice"),
          ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}], "tool_choice": "required"},
           "tools[0].function.parameters", "a JSON Schema object"),
          ({"tools": [{"type": "function", "function": {"name": "f", "params": {}}}], "tool_choice": "required"},
           "tools[0]", "unknown field(s) ['params']"),
          ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
              "type": "object", "properties": {"a": {"type": "objekt"}}}}}],
            "tool_choice": "required"}, "tools", "Invalid type: objekt"),
          ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
            "tool_choice": "required"}, "tools[0].function.parameters", "must describe an object"),
          ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
           "both set what the output is"),
          ({"tools": TOOLS, "tool_choice": "required", "stop": ["}"]}, "stop", "which a stop string would cut"),
          ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "add"}}, "stop": "x"}, "stop",
           "leave stop out"))],
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, 400,
     "top_logprobs", "needs logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs", ""),
    *[(route, {**body, "response_format": fmt}, 400, param, match)
      for route, body in (("/v1/completions", {"prompt": "x"}),
                          ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}))
      for fmt, param, match in (
          ({"type": "xml"}, "response_format", "must be 'text', 'json_object' or 'json_schema', got 'xml'"),
          ({}, "response_format", "got None"),
          ({"type": "json_object", "schema": {}}, "response_format", "unknown field(s) ['schema'] for type 'json_object'"),
          ({"type": "json_schema"}, "response_format.json_schema", "an object with a name and a schema"),
          ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name", "got None"),
          ({"type": "json_schema", "json_schema": {"name": "a b"}}, "response_format.json_schema.name", "'a b'"),
          ({"type": "json_schema", "json_schema": {"name": "r", "schemas": {}}}, "response_format.json_schema",
           "unknown field(s) ['schemas']"),
          ({"type": "json_schema", "json_schema": {"name": "r", "strict": "yes"}},
           "response_format.json_schema.strict", "a boolean"),
          ({"type": "json_schema", "json_schema": {"name": "r", "schema": [1]}}, "response_format.json_schema.schema",
           "a JSON Schema object"),
          ({"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "objekt"}}},
           "response_format.json_schema.schema", "Invalid type: objekt"))],
])
def test_errors_name_the_field(served, route, body, status, param, match):
    client, _, _, _ = served
    r = client.post(route, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and match in error["message"] and error["type"]


def test_response_format_holds_the_output_to_json(served):
    """`response_format`: greedy completions give Transformers' greedy text under the same
    schema's mask (llguidance's own, tests/grammar_oracle.py); sampled chat choices, streamed and
    whole, are JSON that the schema describes; `json_object` is a JSON object; `text` is no
    constraint."""
    client, hf, tok, engine = served
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA, "strict": True}}
    r = client.post("/v1/completions", json={"prompt": PROMPTS[:2], "max_tokens": 80, "temperature": 0,
                                             "response_format": fmt}).json()
    for prompt, choice in zip(PROMPTS, r["choices"]):
        ids = tok.encode(prompt)
        want = hf_constrained(hf, tok, engine.json_grammar(SCHEMA), ids, 80)
        assert want[-1] in engine.eos and choice["finish_reason"] == "stop"
        assert choice["text"] == tok.decode(want, skip_special_tokens=True)
        check_schema(choice["text"])
    assert engine.json_grammar(SCHEMA) is engine.json_grammar(json.loads(json.dumps(SCHEMA)))  # compiled once
    # the same schema with its properties in another order is another grammar: the output follows its order
    turned = {**SCHEMA, "properties": dict(reversed(list(SCHEMA["properties"].items())))}
    assert engine.json_grammar(turned) is not engine.json_grammar(SCHEMA)
    text = client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 80, "temperature": 0,
                                                "response_format": {"type": "json_schema", "json_schema": {
                                                    "name": "t", "schema": turned}}}).json()["choices"][0]["text"]
    assert list(json.loads(text)) == list(turned["properties"])
    chat = {"messages": [{"role": "user", "content": "Describe a record"}], "max_tokens": 80, "n": 3,
            "temperature": 1.2, "seed": 5, "response_format": fmt}
    whole = client.post("/v1/chat/completions", json=chat).json()
    contents = [c["message"]["content"] for c in whole["choices"]]
    for c in contents:
        check_schema(c)
    assert len(set(contents)) > 1
    with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as s:
        events = sse(s.iter_lines())[:-1]
    streamed = ["".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"][0]["index"] == i)
                for i in range(3)]
    assert streamed == contents
    obj = client.post("/v1/chat/completions", json={**chat, "n": 2, "max_tokens": 60,
                                                    "response_format": {"type": "json_object"}}).json()
    for c in obj["choices"]:  # any object may run to max_tokens
        text = c["message"]["content"]
        assert isinstance(json.loads(text), dict) if c["finish_reason"] == "stop" else text.startswith("{")
    plain = {"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0}
    assert client.post("/v1/completions", json={**plain, "response_format": {"type": "text"}}).json()["choices"] == \
        client.post("/v1/completions", json=plain).json()["choices"]


def check_call(call: dict) -> None:
    """A tool call of TOOLS, its arguments checked against its schema (written out here)."""
    assert call["type"] == "function" and call["id"].startswith("call_")
    args = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "get_weather":
        assert set(args) == {"city", "unit"} and isinstance(args["city"], str) and len(args["city"]) <= 10
        assert args["unit"] in ("c", "f")
    else:
        assert call["function"]["name"] == "add" and set(args) == {"a", "b"}
        assert all(isinstance(v, int) and 0 <= v <= 99 for v in args.values())


def test_forced_tool_calls(served):
    """A named tool_choice: the output is that function's arguments, Transformers' greedy tokens
    under the same schema's mask; "required": an array of calls, each of a tool with its own
    arguments (one with parallel_tool_calls false); streamed calls equal whole ones; "none" is no call."""
    client, hf, tok, engine = served
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    body = {"messages": messages, "tools": TOOLS, "max_tokens": 100, "temperature": 0}
    named = client.post("/v1/chat/completions", json={**body, "tool_choice": {
        "type": "function", "function": {"name": "add"}}}).json()["choices"][0]
    assert named["finish_reason"] == "tool_calls" and named["message"]["content"] is None
    [call] = named["message"]["tool_calls"]
    check_call(call)
    ids = tok.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, return_dict=False)
    want = hf_constrained(hf, tok, engine.json_grammar(TOOLS[1]["function"]["parameters"]), ids, 100)
    assert want[-1] in engine.chat_eos
    assert json.loads(call["function"]["arguments"]) == json.loads(tok.decode(want, skip_special_tokens=True))
    greedy = client.post("/v1/chat/completions", json={**body, "tool_choice": "required", "max_tokens": 130}).json()
    assert greedy["choices"][0]["finish_reason"] == "tool_calls"
    for call in greedy["choices"][0]["message"]["tool_calls"]:
        check_call(call)
    # sampled, one call each (an array of calls may run on: a small model's may not close in 100 tokens)
    sampled = {**body, "tool_choice": "required", "parallel_tool_calls": False, "temperature": 1.3, "n": 4, "seed": 3}
    whole = client.post("/v1/chat/completions", json=sampled).json()["choices"]
    for choice in whole:
        assert choice["finish_reason"] == "tool_calls" and len(choice["message"]["tool_calls"]) == 1
        check_call(choice["message"]["tool_calls"][0])
    with client.stream("POST", "/v1/chat/completions", json={**sampled, "stream": True,
                                                             "stream_options": {"include_usage": True}}) as s:
        events = sse(s.iter_lines())[:-1]
    ends = {e["choices"][0]["index"]: e["choices"][0] for e in events if e["choices"] and
            e["choices"][0]["finish_reason"]}
    for i, choice in enumerate(whole):
        got = [{k: v for k, v in c.items() if k not in ("index", "id")} for c in ends[i]["delta"]["tool_calls"]]
        assert got == [{k: v for k, v in c.items() if k != "id"} for c in choice["message"]["tool_calls"]]
        assert ends[i]["finish_reason"] == "tool_calls"
    # a call's stream carries no content: its first delta's is null, as in the whole response
    assert all(not e["choices"] or e["choices"][0]["delta"].get("content") is None for e in events)
    assert sum("role" in e["choices"][0]["delta"] for e in events if e["choices"]) == len(whole)
    assert events[-1]["usage"]["completion_tokens"] == client.post(
        "/v1/chat/completions", json=sampled).json()["usage"]["completion_tokens"]
    # a tool whose parameters refer to their own $defs (as pydantic writes them), beside another
    where = {"type": "function", "function": {"name": "where", "parameters": {
        "$defs": {"Loc": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
                          "additionalProperties": False}},
        "type": "object", "properties": {"loc": {"$ref": "#/$defs/Loc"}}, "required": ["loc"],
        "additionalProperties": False}}}
    refs = client.post("/v1/chat/completions", json={**sampled, "tools": [where, TOOLS[1]]}).json()["choices"]
    for choice in refs:
        [call] = choice["message"]["tool_calls"]
        args = json.loads(call["function"]["arguments"])
        assert call["function"]["name"] == "add" or args["loc"]["city"] in ("Paris", "Rome"), call
    # tools in chat_template_kwargs too: the request's own go to the template
    r = client.post("/v1/chat/completions", json={**body, "tool_choice": "required", "chat_template_kwargs": {
        "tools": TOOLS[:1]}})
    assert r.status_code == 200, r.text
    plain = client.post("/v1/chat/completions", json={**body, "tool_choice": "none", "max_tokens": 8}).json()
    assert "tool_calls" not in plain["choices"][0]["message"] and isinstance(plain["choices"][0]["message"]["content"], str)
    cut = client.post("/v1/chat/completions", json={**body, "tool_choice": "required", "max_tokens": 3}).json()
    assert cut["choices"][0]["finish_reason"] == "length" and cut["choices"][0]["message"]["content"].startswith("[")


def test_models_health_and_api_key(served):
    client, _, _, engine = served
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == engine.name and models["data"][0]["max_model_len"] == 160
    assert client.get(f"/v1/models/{engine.name}").json()["id"] == engine.name
    assert models["data"][0]["created"] > 1.7e9  # (when the server started)
    missing = client.get("/v1/models/other")
    assert missing.status_code == 404 and missing.json()["error"] | {"message": ""} == {
        "message": "", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    app = create_app(engine, api_key="sk-test")  # the same engine, started by the fixture's app
    locked = TestClient(app)
    assert locked.get("/v1/models").status_code == 401
    assert locked.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"}).json()["error"]["type"] == \
        "authentication_error"
    assert locked.get("/v1/models", headers={"Authorization": "Bearer sk-test"}).status_code == 200
    assert locked.get("/health").status_code == 200


def test_concurrent_requests_each_get_their_own(served):
    client, hf, tok, engine = served
    results = {}

    def ask(i, p):
        results[i] = client.post("/v1/completions", json={"prompt": p, "max_tokens": 20, "temperature": 0}).json()

    prompts = PROMPTS * 3
    threads = [threading.Thread(target=ask, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, p in enumerate(prompts):
        want, _ = hf_greedy(hf, tok.encode(p), 20, engine.eos)
        assert results[i]["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)


def test_detokenizer_and_stop_text(tmp_path):
    """Text pieces add up to the whole decode, an incomplete character held back, a prompt's
    tail giving the first piece its context; stop strings end the text before them, found across
    pieces."""
    tok = moetorch.AutoTokenizer.from_pretrained("tiny-phimoe")
    rng = random.Random(3)
    for text in ["déjà vu — naïve café ✓ 🙂 end", "def f(x):\n    return x  # ümlaut"]:
        ids = tok.encode(text, add_special_tokens=False)
        for _ in range(3):
            d, out, i = Detokenizer(tok), "", 0
            while i < len(ids):
                k = rng.randint(1, 3)
                piece = d.add(ids[i:i + k])
                assert "\ufffd" not in piece
                out += piece
                i += k
            assert out + d.flush() == tok.decode(ids, skip_special_tokens=True)
    # after a prompt, its tail is the first piece's context: SentencePiece's word-start space stays
    # (its decoder strips the leading space of a decode, so the piece decoded alone lost it)
    llama = moetorch.Tokenizer.from_pretrained(build_llama_tokenizer(tmp_path / "llama"))
    jet = moetorch.AutoTokenizer.from_pretrained("tiny-jetmoe")
    # and a prompt (token ids) cut inside a character: the character its completion completes is the
    # completion's first (the prompt's decode ends in U+FFFD there)
    cut = 0
    for tokenizer, text in [(llama, "Hello world, how are you?"), (llama, "x = 2, so 2x + 3 = 7: two words here"),
                            (tok, "naïve ’quotes’ ✓ — 🙂 end"), (jet, "naïve ’quotes’ ✓ — 🙂 end, déjà")]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for k in range(1, len(ids)):
            d, out, i = Detokenizer(tokenizer, ids[:k][-4:]), "", k
            while i < len(ids):
                n = rng.randint(1, 3)
                out += d.add(ids[i:i + n])
                i += n
            whole, prompt = (tokenizer.decode(x, skip_special_tokens=True) for x in (ids, ids[:k]))
            if prompt.endswith("\ufffd"):
                cut += 1
                prompt = prompt[:-1]
            assert prompt + out + d.flush() == whole, (text, k)
    assert cut >= 5
    s = StopText(["END", "xyz"])  # holds back the last 2 characters: they may start a stop string
    assert s.add("abcE") == ("ab", False)
    assert s.add("N") == ("c", False)
    assert s.add("D tail") == ("", True)
    s = StopText(["END"])
    assert s.add("ab") == ("", False) and s.flush() == "ab"
    s = StopText([])
    assert s.add("abc") == ("abc", False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live():
    """A real server (uvicorn on a socket) for the OpenAI client."""
    import uvicorn

    model = moetorch.AutoModelForCausalLM.from_pretrained("tiny-phimoe", dtype=torch.float32)
    tok = moetorch.AutoTokenizer.from_pretrained("tiny-phimoe")
    engine = Engine(model, tok, "tiny-phimoe", max_model_len=512, max_batch=4)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, api_key="sk-x"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine, tok
    server.should_exit = True
    thread.join(30)


def test_the_openai_client(live):
    openai = pytest.importorskip("openai")  # a test dependency (pyproject's test extra)
    url, engine, tok = live
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-x")
    assert [m.id for m in client.models.list()] == ["tiny-phimoe"]
    c = client.completions.create(model="tiny-phimoe", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert c.choices[0].finish_reason in ("stop", "length") and c.usage.completion_tokens >= 1
    chat = client.chat.completions.create(model="tiny-phimoe", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model="tiny-phimoe", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        parts += [c.delta.content or "" for c in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(parts) == chat.choices[0].message.content
    assert usage.completion_tokens == chat.usage.completion_tokens
    # structured output as the client asks for it: a pydantic model's strict JSON schema, parsed back
    from pydantic import BaseModel, Field

    class Record(BaseModel):
        name: str = Field(max_length=12)
        ok: bool
        size: Literal["small", "large"]

    parsed = client.chat.completions.parse(model="tiny-phimoe", messages=[{"role": "user", "content": "a record"}],
                                           response_format=Record, max_tokens=60, temperature=0.8, seed=2)
    record = parsed.choices[0].message.parsed
    assert isinstance(record, Record) and parsed.choices[0].finish_reason == "stop"
    assert Record.model_validate_json(parsed.choices[0].message.content) == record
    # a forced tool call, and a pydantic model as a strict tool whose arguments the client parses
    called = client.chat.completions.create(model="tiny-phimoe", messages=[{"role": "user", "content": "2 + 3"}],
                                            tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
                                            max_tokens=60, temperature=0)
    assert called.choices[0].finish_reason == "tool_calls"
    check_call(called.choices[0].message.tool_calls[0].model_dump())
    parsed = client.chat.completions.parse(model="tiny-phimoe", messages=[{"role": "user", "content": "a record"}],
                                           tools=[openai.pydantic_function_tool(Record)], tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=60, temperature=0.8, seed=2)
    [call] = parsed.choices[0].message.tool_calls
    assert call.function.name == "Record" and isinstance(call.function.parsed_arguments, Record)
    two = client.completions.create(model="tiny-phimoe", prompt="x", best_of=3, n=2, max_tokens=6, seed=1)
    assert [c.index for c in two.choices] == [0, 1]
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model="tiny-phimoe", prompt="x", best_of=1, n=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong").models.list()


def test_a_client_that_leaves_cancels_its_request(live):
    """Closing a stream mid-way frees the request's row: the manager holds no request after it."""
    import httpx

    url, engine, tok = live
    cancelled = []
    cancel = engine.manager.cancel_request
    engine.manager.cancel_request = lambda rid: (cancelled.append(rid), cancel(rid))
    body = {"prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0.8, "stream": True}
    with httpx.Client(headers={"Authorization": "Bearer sk-x"}) as http:
        with http.stream("POST", f"{url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert any(line.startswith("data: ") for line in got)
    deadline = time.monotonic() + 20
    while engine.manager._known or not cancelled:
        assert time.monotonic() < deadline, f"still held: {engine.manager._known}"
        time.sleep(0.05)
    del engine.manager.cancel_request
    assert len(cancelled) == 1
    # the server still serves
    with httpx.Client(headers={"Authorization": "Bearer sk-x"}) as http:
        r = http.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200


def test_a_client_that_leaves_a_plain_request_cancels_it_at_once(live):
    """A request answered whole (not streamed) whose client gives up: the request is cancelled as
    the connection closes (the server awaits the disconnect), not at a poll's next turn, and its row
    is free for the next."""
    import httpx

    url, engine, tok = live
    manager = engine.manager
    cancelled = []
    cancel, decode = manager.cancel_request, manager._decode

    def slow_decode(*args):  # 20 ms a step: the request outlives the client's patience
        time.sleep(0.02)
        return decode(*args)

    manager.cancel_request = lambda rid: (cancelled.append(time.monotonic()), cancel(rid))
    manager._decode = slow_decode
    try:
        body = {"prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0, "ignore_eos": True}
        with httpx.Client(headers={"Authorization": "Bearer sk-x"}) as http:
            with pytest.raises(httpx.ReadTimeout):
                http.post(f"{url}/v1/completions", json=body, timeout=0.3)
        left = time.monotonic()
        deadline = left + 20
        while manager._known or not cancelled:
            assert time.monotonic() < deadline, f"still held: {manager._known}"
            time.sleep(0.01)
    finally:
        del manager.cancel_request, manager._decode
    assert len(cancelled) == 1 and cancelled[0] - left < 0.5, cancelled[0] - left
    with httpx.Client(headers={"Authorization": "Bearer sk-x"}) as http:
        r = http.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200


def test_the_disconnect_watch_reads_only_a_disconnect_as_one():
    """What a whole answer's handler waits on beside the generation: the ASGI disconnect returns it;
    other messages do not, and a receive that fails leaves the request running (no disconnect)."""
    from types import SimpleNamespace

    from moetorch.serve.app import _disconnect

    def request(messages):
        async def receive():
            item = messages.pop(0)
            if isinstance(item, Exception):
                raise item
            return item
        return SimpleNamespace(receive=receive)

    async def check():
        await asyncio.wait_for(_disconnect(request([{"type": "http.request", "body": b""},
                                                     {"type": "http.disconnect"}])), 5)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(_disconnect(request([RuntimeError("receive after the body")])), 0.2)

    asyncio.run(check())


def test_the_serve_command(monkeypatch):
    """`moetorch serve --no-engine-process` builds the engine and app for uvicorn, with its flags
    (the default, an engine process: tests/test_serve_process.py)."""
    import uvicorn

    from moetorch import cli

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setattr(sys, "setswitchinterval", lambda s: seen.update(switch_interval=s))
    assert cli.main(["serve", "--model", "tiny-jetmoe", "--port", "8123", "--max-model-len", "96", "--max-batch", "3",
                     "--served-model-name", "jet", "--no-engine-process"]) == 0
    assert seen["port"] == 8123 and seen["host"] == "127.0.0.1" and seen["switch_interval"] == 0.0005
    engine = seen["app"].state.engine
    assert (engine.name, engine.max_model_len, engine.manager.rows) == ("jet", 96, 3)
    assert engine.manager.continuous_batching_config.allow_block_sharing
    with TestClient(seen["app"]) as client:
        r = client.post("/v1/completions", json={"model": "jet", "prompt": "import", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    with pytest.raises(SystemExit, match="max_position_embeddings"):
        cli.main(["serve", "--model", "tiny-jetmoe", "--max-model-len", "100000", "--no-engine-process"])
    with pytest.raises(SystemExit, match="2"):  # a usage error naming the flag: tests/test_serve_validation.py
        cli.main(["serve", "--model", "tiny-jetmoe", "--prefill-chunk-tokens", "-1", "--no-engine-process"])
    assert engine.manager.chunk_tokens == 2048  # the default
    assert cli.main(["serve", "--model", "tiny-jetmoe", "--no-engine-process", "--no-prefix-sharing",
                     "--prefill-chunk-tokens", "512"]) == 0
    engine = seen["app"].state.engine
    assert not engine.manager.continuous_batching_config.allow_block_sharing
    assert engine.manager.chunk_tokens == 512
    with TestClient(seen["app"]) as client:
        text = "import os, sys, json, time, math, random, itertools, functools"
        for _ in range(2):
            r = client.post("/v1/completions", json={"model": "tiny-jetmoe", "prompt": text, "max_tokens": 2})
            assert r.status_code == 200
    assert engine.manager.stats["shared_tokens"] == 0


def test_prefill_warm_up_shapes(monkeypatch):
    """On a GPU the engine prefills every power-of-two token count up to a prefill group's before it
    serves (here called directly on the CPU): prompts of at most max_model_len - 1 tokens."""
    model = moetorch.AutoModelForCausalLM.from_pretrained("tiny-jetmoe", dtype=torch.float32)
    tok = moetorch.AutoTokenizer.from_pretrained("tiny-jetmoe")
    engine = Engine(model, tok, "jet", max_model_len=65, max_batch=8, max_batch_tokens=256)
    calls = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda ids, **kw: calls.append(tuple(ids.shape)) or original(ids, **kw))
    assert engine.warm_prefills() == calls == [(1, 16), (1, 32), (1, 64), (2, 64), (4, 64)]


def test_engine_without_an_event_loop_thread_is_not_needed():
    """Engine.generate runs on any event loop (here asyncio.run), not only the app's."""
    model = moetorch.AutoModelForCausalLM.from_pretrained("tiny-jetmoe", dtype=torch.float32)
    tok = moetorch.AutoTokenizer.from_pretrained("tiny-jetmoe")
    engine = Engine(model, tok, "jet", max_model_len=64, max_batch=2)
    engine.start()
    try:
        async def run():
            return [p async for p in engine.generate(tok.encode("import os"), 5, {"do_sample": False}, [], engine.eos,
                                                     True)]
        pieces = asyncio.run(run())
    finally:
        engine.stop()
    ids = [t for p in pieces for t in p.token_ids]
    want = model.generate(torch.tensor([tok.encode("import os")]), max_new_tokens=5, do_sample=False,
                          pad_token_id=0)[0, len(tok.encode("import os")):].tolist()
    assert ids == want[:len(ids)] and pieces[-1].finish_reason in ("stop", "length")
    assert "".join(p.text for p in pieces) == tok.decode(ids, skip_special_tokens=True)


def test_a_failed_step_fails_its_request_and_the_server_goes_on():
    """In the server's process: a forward that raises once fails the request in its step (a 500
    that names the error; streamed, an error event), and the batch's loop goes on from a clean
    batch: /health stays 200 and the next request gets the text it got before the failure."""
    model = moetorch.AutoModelForCausalLM.from_pretrained("tiny-jetmoe", dtype=torch.float32)
    tok = moetorch.AutoTokenizer.from_pretrained("tiny-jetmoe")
    engine = Engine(model, tok, "jet", max_model_len=64, max_batch=2)
    real, armed = model.forward, []

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        if armed and out.logits.shape[1] == 1:  # (once the forward wrote its keys and values)
            armed.pop()
            raise RuntimeError("a poisoned step")
        return out

    model.forward = forward
    body = {"prompt": "import os", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with TestClient(create_app(engine)) as client:
        before = client.post("/v1/completions", json=body)
        assert before.status_code == 200, before.text
        armed.append(True)
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error["type"] == "server_error" and \
            error["message"] == "generation failed: a step of the batch failed: RuntimeError: a poisoned step"
        assert client.get("/health").status_code == 200
        armed.append(True)
        events = sse(client.post("/v1/completions", json={**body, "stream": True}).iter_lines())
        assert events[-1] == "[DONE]" and \
            events[-2]["error"]["message"] == "generation failed: a step of the batch failed: RuntimeError: a poisoned step"
        after = client.post("/v1/completions", json=body)
        assert after.status_code == 200, after.text
        assert after.json()["choices"] == before.json()["choices"]
        assert engine.manager.recovered_errors == 2 and engine.manager.is_running()


def test_a_batch_loop_that_dies_answers_every_later_request():
    """In the server's process (--no-engine-process): a forward that raises on every step fails
    each request with a 500 naming the error; the loop survives the first failures
    (`batching.MAX_STEP_FAILURES` in a row stop it), then stops, and every later request, streamed
    or not, gets a 500 that names the error (it used to wait forever on the stopped loop); /health
    says 503. Only the exception's type and message reach the client."""
    from moetorch.engine import batching

    model = moetorch.AutoModelForCausalLM.from_pretrained("tiny-jetmoe", dtype=torch.float32)
    tok = moetorch.AutoTokenizer.from_pretrained("tiny-jetmoe")
    engine = Engine(model, tok, "jet", max_model_len=64, max_batch=2)
    real = model.forward

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        if out.logits.shape[1] == 1:  # the first decode step
            raise RuntimeError("a poisoned step")
        return out

    model.forward = forward
    with TestClient(create_app(engine)) as client:
        def ask(route, body, answer):
            answer.append(client.post(route, json=body))

        for _ in range(batching.MAX_STEP_FAILURES):
            assert client.get("/health").status_code == 200  # (the failures before: survived)
            r = client.post("/v1/completions", json={"prompt": "import os", "max_tokens": 5})
            assert r.status_code == 500 and "a poisoned step" in r.json()["error"]["message"]
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 503:  # (the loop's thread ends right after)
            assert time.monotonic() < deadline, "/health still says 200"
            time.sleep(0.05)
        for route, body in (("/v1/completions", {"prompt": "import os"}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            for stream in (False, True):
                answer = []  # (in a thread: a request that waits forever fails the test, not the suite)
                asker = threading.Thread(target=ask, args=(route, {**body, "max_tokens": 5, "stream": stream}, answer),
                                         daemon=True)
                asker.start()
                asker.join(60)
                assert answer, f"{route} (stream={stream}) got no answer in 60 s"
                r = answer[0]
                message = r.json()["error"]["message"]
                assert r.status_code == 500 and "the batch's loop is not running (RuntimeError: a poisoned step)" \
                    in message and "Traceback" not in message, (route, stream)


def test_engine_with_a_paged_cache():
    """`paged=True` (the CLI's --paged-cache) reaches the manager, and the engine serves the same
    tokens with it as with the static cache (the CPU's default)."""
    model = moetorch.AutoModelForCausalLM.from_pretrained("tiny-jetmoe", dtype=torch.float32)
    tok = moetorch.AutoTokenizer.from_pretrained("tiny-jetmoe")
    out = {}
    for paged in (True, None):
        engine = Engine(model, tok, "jet", max_model_len=64, max_batch=3, paged=paged)
        engine.start()
        try:
            async def run(engine=engine):
                return [p async for p in engine.generate(tok.encode("def f(x):"), 6, {"do_sample": False}, [],
                                                         engine.eos, True)]
            pieces = asyncio.run(run())
            assert engine.manager.paged is bool(paged) and (engine.manager._batch.pages is not None) is bool(paged)
        finally:
            engine.stop()
        out[paged] = [t for p in pieces for t in p.token_ids]
    assert out[True] == out[None] and len(out[True]) == 6
