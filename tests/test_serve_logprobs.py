"""The server's log-probabilities show each token as it is: a piece of a character is its own
byte, not U+FFFD (chat `bytes` join to the content, completions `text_offset` count characters);
tokens past the end of the returned text (the EOS, tokens after a stop string) are left out."""

from __future__ import annotations

import json

import test_serve
from test_serve import hf_tokenizer, shown, sse

WORD = "😀世界"  # 4 + 3 + 3 bytes: pieces of characters in a byte-level vocabulary
FORCED = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "string", "enum": [WORD]}}}
TEXT = json.dumps(WORD, ensure_ascii=False)


served = test_serve.served  # the module's fixture: an app over each embedded model


def test_chat_bytes_rebuild_characters_split_over_tokens(served):
    client, _, tok, engine = served
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 20, "temperature": 0, "logprobs": True,
            "top_logprobs": 1, "response_format": FORCED}
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["message"]["content"] == TEXT
    content = choice["logprobs"]["content"]
    ids = hf_tokenizer(engine).encode(TEXT, add_special_tokens=False)
    assert [c["token"] for c in content] == [shown(tok, t) for t in ids]
    assert any(c["token"].startswith("\\x") for c in content)  # the pieces show as their bytes
    assert b"".join(bytes(c["bytes"]) for c in content) == TEXT.encode()
    for c in content:
        assert c["top_logprobs"][0]["token"] == c["token"]  # greedy: the chosen token is the likeliest
    # streamed: the same entries, chunk by chunk
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        events = sse(r.iter_lines())
    streamed = [c for e in events[:-1] if e["choices"] and e["choices"][0]["logprobs"]
                for c in e["choices"][0]["logprobs"]["content"]]
    assert streamed == content


def test_completion_offsets_count_characters(served):
    client, _, tok, engine = served
    choice = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 20, "temperature": 0, "logprobs": 1,
                                                  "response_format": FORCED}).json()["choices"][0]
    assert choice["text"] == TEXT
    lp = choice["logprobs"]
    hf_tok = hf_tokenizer(engine)
    ids = hf_tok.encode(TEXT, add_special_tokens=False)
    assert lp["tokens"] == [shown(tok, t, completions=True) for t in ids]
    assert any(t.startswith("bytes:\\x") for t in lp["tokens"])
    # a token's offset: where its text starts; a piece of a character starts where the character does
    assert lp["text_offset"] == [len(hf_tok.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]
    assert max(lp["text_offset"]) < len(choice["text"])
    # echoed: the prompt's entries first, the completion's offsets after the prompt's text
    echoed = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 20, "temperature": 0, "logprobs": 1,
                                                  "echo": True, "response_format": FORCED}).json()["choices"][0]
    n = len(tok.encode("x"))  # the prompt as the server encodes it
    assert echoed["text"] == "x" + TEXT
    assert echoed["logprobs"]["text_offset"][n:] == [1 + o for o in lp["text_offset"]]


def test_logprobs_end_with_the_returned_text(served):
    """At a stop string the text ends before it, and so do the tokens (but one that runs into
    it); at EOS the EOS is left out, as its text is not in the reply."""
    client, _, tok, engine = served
    for route, body, text_of, tokens_of in (
        ("/v1/completions", {"prompt": "# Copyright"}, lambda c: c["text"],
         lambda c: c["logprobs"]["tokens"]),
        ("/v1/chat/completions", {"messages": [{"role": "system", "content": "You write Python."},
                                               {"role": "user", "content": "Sort a list"}]},
         lambda c: c["message"]["content"], lambda c: [t["token"] for t in c["logprobs"]["content"]]),
    ):
        lp = {"logprobs": 0} if "prompt" in body else {"logprobs": True}
        reply = client.post(route, json={**body, **lp, "max_tokens": 24, "temperature": 0}).json()["choices"][0]
        full = text_of(reply)
        assert len(full) > 6, (route, full)
        cut = client.post(route, json={**body, **lp, "max_tokens": 24, "temperature": 0,
                                       "stop": [full[len(full) // 2:len(full) // 2 + 3]]}).json()["choices"][0]
        for choice in (reply, cut):
            # the tokens cover the text, and the last one starts within it (a token that runs
            # into the stop string is kept)
            text, tokens = text_of(choice), tokens_of(choice)
            assert "".join(tokens).startswith(text) and len("".join(tokens[:-1])) < len(text), (route, tokens, text)
        assert len(tokens_of(cut)) < len(tokens_of(reply))
    ended = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 150, "temperature": 0, "logprobs": True}
                        ).json()["choices"][0]
    if ended["finish_reason"] == "stop":  # ended by EOS: no entry for it
        assert "".join(t["token"] for t in ended["logprobs"]["content"]) == ended["message"]["content"]


def test_streamed_logprobs_end_with_the_returned_text(served):
    """A token whose text is held back while it may start a stop string goes out with the text
    after it, so a stream whose stop string begins at a token's start sends no entry for that token:
    the streamed entries are the whole reply's."""
    client, _, tok, engine = served
    for route, body, text_of, tokens_of, streamed_of in (
        ("/v1/completions", {"prompt": "# Copyright", "logprobs": 0}, lambda c: c["text"],
         lambda c: c["logprobs"]["tokens"], lambda c: (c.get("logprobs") or {}).get("tokens") or []),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Sort a list"}], "logprobs": True},
         lambda c: c["message"]["content"], lambda c: [t["token"] for t in c["logprobs"]["content"]],
         lambda c: [t["token"] for t in (c.get("logprobs") or {}).get("content") or []]),
    ):
        body = {**body, "max_tokens": 24, "temperature": 0}
        reply = client.post(route, json=body).json()["choices"][0]
        full, tokens = text_of(reply), tokens_of(reply)
        # a stop string of two tokens' text, found first where the first of them starts
        starts = [len("".join(tokens[:j])) for j in range(len(tokens))]
        j = next(j for j in range(1, len(tokens) - 1) if tokens[j].isascii() and tokens[j + 1][:1].isascii()
                 and tokens[j + 1][:1].strip() and full.find(tokens[j] + tokens[j + 1][:1]) == starts[j])
        stop = tokens[j] + tokens[j + 1][:1]
        whole = client.post(route, json={**body, "stop": [stop]}).json()["choices"][0]
        assert text_of(whole) == full[:starts[j]] and tokens_of(whole) == tokens[:j], (route, stop)
        with client.stream("POST", route, json={**body, "stop": [stop], "stream": True}) as r:
            events = sse(r.iter_lines())
        streamed = [t for e in events[:-1] if e["choices"] for t in streamed_of(e["choices"][0])]
        assert streamed == tokens[:j], (route, stop, streamed)
