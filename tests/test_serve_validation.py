"""The server's request validation and robustness (moetorch/serve): bounds on every number a
request carries, a bad setting failing its own request and never the engine, tiny temperatures as
greedy decoding, JSON without NaN or Infinity, errors in OpenAI's shape naming the user's field,
strict types, streams refused before they start, tokenizing off the event loop, --max-model-len,
and the `serve` command's flags."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import socket

import pytest
import torch
from fastapi.testclient import TestClient

import moetorch
from moetorch import cli
from moetorch.serve import Engine, create_app
from moetorch.serve.app import _dumps
from moetorch.serve.engine import PromptError, admit

NAME = "tiny-phimoe"
LEN = 64
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def served():
    model = moetorch.AutoModelForCausalLM.from_pretrained(NAME, dtype=torch.float32)
    tok = moetorch.AutoTokenizer.from_pretrained(NAME)
    engine = Engine(model, tok, NAME, max_model_len=LEN, max_batch=4)
    with TestClient(create_app(engine)) as client:
        yield client, engine


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as JavaScript's JSON.parse does."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def events(lines) -> list:
    return [strict_json(line[6:]) for line in lines if line.startswith("data: {")]


def error_of(r, status: int, param) -> str:
    """The error's message, after checking OpenAI's shape, the status and the param."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = strict_json(r.text)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert "Traceback" not in error["message"]
    return error["message"]


def ok(client, route: str = "/v1/completions") -> dict:
    body = {"prompt": "Hello", "max_tokens": 3} if route == "/v1/completions" else {"messages": USER, "max_tokens": 3}
    r = client.post(route, json=body)
    assert r.status_code == 200, r.text
    return r.json()


# ---- 1. bounds, and a bad setting fails its own request ----------------------------------------------
@pytest.mark.parametrize("fields,param,match", [
    ({"top_k": 10**20}, "top_k", "vocabulary"),
    ({"top_k": 10**6}, "top_k", "vocabulary"),
    ({"top_k": -2}, "top_k", "greater than or equal to -1"),
    ({"seed": 2**63}, "seed", "less than"),
    ({"seed": -2**63 - 1}, "seed", "greater than or equal"),
    ({"n": 10**30}, "n", "less than or equal to 128"),
    ({"max_tokens": 10**30}, "max_tokens", "less than"),
    ({"best_of": 10**30}, "best_of", "less than or equal to 128"),
    ({"logprobs": 10**30}, "logprobs", "less than or equal to 5"),
    ({"logit_bias": {"9" * 30: 1}}, "logit_bias", "is not a token id"),
    ({"logit_bias": {" 5": 1}}, "logit_bias", "is not a token id"),
    ({"logit_bias": {"٣": 1}}, "logit_bias", "is not a token id"),  # (an Arabic-Indic digit: int() takes it)
    ({"prompt": [1, 2**70]}, "prompt", "outside the vocabulary"),
    ({"repetition_penalty": 1e-30}, "repetition_penalty", "greater than or equal to 0.01"),
    ({"repetition_penalty": 1e30}, "repetition_penalty", "less than or equal to 100"),
    ({"temperature": 1e300}, "temperature", "float32"),
])
def test_numbers_past_their_bounds_are_a_400_naming_the_field(served, fields, param, match):
    client, engine = served
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "temperature": 1.0, **fields})
    assert match in error_of(r, 400, param)


def test_a_top_k_past_int64_fails_alone_and_the_engine_goes_on(served):
    """The audit's case: top_k = 10**20 once stopped the batch's loop for good."""
    client, engine = served
    for route, body in (("/v1/completions", {"prompt": "Hello"}), ("/v1/chat/completions", {"messages": USER})):
        for stream in (False, True):
            r = client.post(route, json={**body, "max_tokens": 4, "top_k": 10**20, "stream": stream})
            error_of(r, 400, "top_k")
    assert client.get("/health").status_code == 200 and engine.manager.is_running()
    ok(client)
    ok(client, "/v1/chat/completions")


def test_the_engine_admits_settings_the_batch_can_hold(served):
    """Below the HTTP checks, `Engine.generate` refuses what the batch's tensors cannot hold (a
    PromptError for that request: the loop never sees it) and normalizes the rest."""
    client, engine = served
    vocab = engine.vocab_size
    for settings, param in (({"do_sample": True, "top_k": 10**20}, "top_k"), ({"seed": 2**64}, "seed"),
                            ({"do_sample": True, "temperature": 1e300}, "temperature"),
                            ({"do_sample": True, "temperature": float("inf")}, "temperature"),
                            ({"repetition_penalty": float("nan")}, "repetition_penalty"),
                            ({"logit_bias": {5: float("inf")}}, "logit_bias"), ({"top_k": True}, "top_k")):
        with pytest.raises(PromptError) as e:
            admit(settings, vocab)
        assert e.value.param == param

        async def run(settings=settings):
            async for _ in engine.generate([5, 6, 7], 3, settings, [], [], False):
                pass

        with pytest.raises(PromptError):
            asyncio.run(run())
    assert admit({"do_sample": True, "temperature": 1.0, "top_k": vocab + 5}, vocab)["top_k"] == 0  # no filter
    assert admit({"do_sample": True, "temperature": 1e-6, "top_k": 5, "seed": 3, "top_p": 0.5, "min_p": 0.1,
                  "top_logprobs": 2}, vocab) == {"do_sample": False, "top_logprobs": 2}
    assert engine.manager.is_running()
    ok(client)


# ---- 2. tiny temperatures, and no NaN or Infinity in any response --------------------------------------
def test_a_temperature_below_the_epsilon_is_greedy(served):
    client, engine = served
    body = {"prompt": "x", "max_tokens": 6, "logprobs": 1}
    greedy = client.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]
    for t in (1e-300, 1e-30, 9e-6, 5e-324):
        r = client.post("/v1/completions", json={**body, "temperature": t, "seed": 1})
        assert r.status_code == 200, r.text
        choice = strict_json(r.text)["choices"][0]
        assert choice["text"] == greedy["text"] and choice["logprobs"]["tokens"] == greedy["logprobs"]["tokens"], t
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(greedy["logprobs"]["token_logprobs"], abs=1e-4)
        with client.stream("POST", "/v1/completions", json={**body, "temperature": t, "stream": True}) as s:
            assert "".join(e["choices"][0]["text"] for e in events(s.iter_lines())) == greedy["text"]
    chat = {"messages": USER, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}
    want = client.post("/v1/chat/completions", json={**chat, "temperature": 0}).json()["choices"][0]
    r = client.post("/v1/chat/completions", json={**chat, "temperature": 1e-300})
    assert r.status_code == 200
    got = strict_json(r.text)["choices"][0]
    assert got["message"] == want["message"]
    assert [e["token"] for e in got["logprobs"]["content"]] == [e["token"] for e in want["logprobs"]["content"]]
    assert [e["logprob"] for e in got["logprobs"]["content"]] == \
        pytest.approx([e["logprob"] for e in want["logprobs"]["content"]], abs=1e-4)


def test_non_finite_floats_are_sent_as_openai_sends_them():
    assert strict_json(_dumps({"a": [float("-inf"), 0.5], "b": {"c": float("nan"), "d": float("inf")}})) == \
        {"a": [-9999.0, 0.5], "b": {"c": -9999.0, "d": 9999.0}}
    assert _dumps({"a": -0.25}) == json.dumps({"a": -0.25})


def test_a_log_probability_of_minus_infinity_is_sent_as_minus_9999(served, monkeypatch):
    """A token the settings ruled out (here: every step's log-probability made -inf) is -9999.0
    in the JSON, whole or streamed, never a bare -Infinity or a 500."""
    client, engine = served
    from moetorch.serve import engine as engine_module

    real = engine_module.StreamedOutput.extend

    def extend(self, status, tokens, logprobs, tops, error):
        real(self, status, tokens, [float("-inf")] * len(logprobs), tops, error)

    monkeypatch.setattr(engine_module.StreamedOutput, "extend", extend)
    body = {"prompt": "x", "max_tokens": 3, "temperature": 0, "logprobs": 0, "ignore_eos": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert strict_json(r.text)["choices"][0]["logprobs"]["token_logprobs"] == [-9999.0] * 3
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        lps = [lp for e in events(s.iter_lines()) for lp in e["choices"][0]["logprobs"]["token_logprobs"]]
    assert lps == [-9999.0] * 3


# ---- 3. Infinity, and unhandled errors --------------------------------------------------------------
@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p",
                                   "repetition_penalty"])
@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN"])
def test_infinity_and_nan_are_a_400_naming_the_field(served, field, value):
    client, _ = served
    for route, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": USER})):
        for stream in (False, True):
            text = json.dumps({**body, "max_tokens": 2, "stream": stream, field: float(value)})  # (Python's json: a bare
            r = client.post(route, content=text, headers={"Content-Type": "application/json"})  # Infinity, NaN)
            error_of(r, 400, field)
    r = client.post("/v1/completions", content='{"prompt": "x", "logit_bias": {"5": Infinity}}',
                    headers={"Content-Type": "application/json"})
    assert "finite" in error_of(r, 400, "logit_bias.5")


def test_an_unhandled_error_is_a_500_in_openai_shape(served, monkeypatch):
    client, engine = served
    app = create_app(engine)  # (the engine the fixture started; this app's lifespan is not run)
    monkeypatch.setattr(engine, "check_prompt", lambda *a, **k: (_ for _ in ()).throw(KeyError("secret internals")))
    bare = TestClient(app, raise_server_exceptions=False)  # (no `with`: its lifespan would stop the engine)
    for route, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": USER})):
        r = bare.post(route, json=body)
        message = error_of(r, 500, None)
        assert strict_json(r.text)["error"]["type"] == "server_error"
        assert "KeyError" in message and "secret internals" not in message


def test_an_error_inside_a_stream_is_an_error_event(served, monkeypatch):
    client, engine = served

    async def broken(*args, **kwargs):
        raise KeyError("secret internals")
        yield  # (a generator)

    monkeypatch.setattr(engine, "generate", broken)
    with client.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True}) as r:
        lines = list(r.iter_lines())
    assert r.status_code == 200 and [line for line in lines if line][-1] == "data: [DONE]"
    [event] = events(lines)
    assert event["error"]["type"] == "server_error" and "secret" not in event["error"]["message"]


# ---- 4. streams: refused before the first byte ----------------------------------------------------------
@pytest.mark.parametrize("route,fields,param", [
    ("/v1/chat/completions", {"stop": ["a", ""]}, "stop"),
    ("/v1/completions", {"stop": [""]}, "stop"),
    ("/v1/completions", {"stop": ""}, "stop"),
    ("/v1/chat/completions", {"top_k": 10**9}, "top_k"),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x " * 100}, "prompt"),
    ("/v1/chat/completions", {"max_tokens": 10**4}, "messages"),
    ("/v1/completions", {"response_format": {"type": "xml"}}, "response_format"),
    ("/v1/chat/completions", {"model": "other"}, "model"),
])
def test_a_stream_is_refused_as_the_whole_response_is(served, route, fields, param):
    client, _ = served
    body = {"prompt": "x"} if route == "/v1/completions" else {"messages": USER}
    body = {**body, "max_tokens": 2, **fields}
    whole = client.post(route, json=body)
    status = whole.status_code
    assert status in (400, 404)
    message = error_of(whole, status, param)
    with client.stream("POST", route, json={**body, "stream": True}) as r:
        r.read()
    assert error_of(r, status, param) == message


# ---- 5. tokenizing off the event loop ----------------------------------------------------------------------
def test_prompts_are_tokenized_off_the_event_loop(served, monkeypatch):
    client, engine = served
    on_loop = []

    def watch(fn):
        def wrapped(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                on_loop.append(True)
            except RuntimeError:
                on_loop.append(False)
            return fn(*args, **kwargs)
        return wrapped

    tok = engine.tokenizer
    monkeypatch.setattr(tok, "encode", watch(tok.encode))
    monkeypatch.setattr(tok, "apply_chat_template", watch(tok.apply_chat_template))
    ok(client)
    ok(client, "/v1/chat/completions")
    assert on_loop and not any(on_loop)


# ---- 6. --max-model-len: prompt + completion <= N ------------------------------------------------------
def test_max_model_len_bounds_prompt_and_completion(served):
    client, engine = served
    body = {"temperature": 0, "ignore_eos": True}
    for prompt, max_tokens, status in ((LEN, 1, 400), (LEN - 4, 4, 200), (LEN - 4, 5, 400), (LEN - 1, 1, 200)):
        r = client.post("/v1/completions", json={**body, "prompt": [5] * prompt, "max_tokens": max_tokens})
        if status == 200:
            assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == LEN, r.text
        else:  # OpenAI's wording and code, which clients read as a context overflow
            message = error_of(r, 400, "prompt")
            assert "--max-model-len" in message and f"maximum context length is {LEN} tokens" in message
            assert r.json()["error"]["code"] == "context_length_exceeded"
    r = client.post("/v1/completions", json={"prompt": [5] * (LEN + 1), "max_tokens": 0, "echo": True})
    error_of(r, 400, "prompt")
    r = client.post("/v1/completions", json={"prompt": [5] * LEN, "max_tokens": 0, "echo": True})
    assert r.status_code == 200, r.text  # the prompt alone, scored
    # without max_tokens, a chat completion may fill the rest: prompt + completion stays within N
    ids = engine.tokenizer.apply_chat_template(USER, add_generation_prompt=True, return_dict=False)
    r = client.post("/v1/chat/completions", json={"messages": USER, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == LEN == len(ids) + \
        r.json()["usage"]["completion_tokens"]


def test_a_chat_past_the_context_names_it_as_openai_does(served):
    client, _ = served
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi " * LEN}]})
    message = error_of(r, 400, "messages")
    assert message.startswith(f"messages: This model's maximum context length is {LEN} tokens. However, your "
                              "messages resulted in ")
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": LEN})
    assert "However, you requested" in error_of(r, 400, "messages") and "in the completion" in r.text


# ---- 7b. OpenAI's optional fields: null is the default, metadata is taken ---------------------------------
@pytest.mark.parametrize("route,fields", [
    ("/v1/chat/completions", {"n": None, "stream": None, "logprobs": None, "top_logprobs": None}),
    ("/v1/completions", {"n": None, "stream": None, "echo": None, "logprobs": None, "best_of": None}),
    ("/v1/chat/completions", {"max_tokens": None, "max_completion_tokens": None, "temperature": None,
                              "top_p": None, "seed": None, "stop": None, "ignore_eos": None}),
])
def test_null_is_the_default_as_openai_reads_it(served, route, fields):
    """The official client sends None as null: a field given as null answers as if left out."""
    client, _ = served
    body = ({"prompt": "Hello"} if route == "/v1/completions" else {"messages": USER}) | {"temperature": 0,
                                                                                          "max_tokens": 4}
    want = client.post(route, json=body).json()
    got = client.post(route, json={**body, **fields, **{k: body[k] for k in body if k in fields and
                                                         k in ("temperature", "max_tokens")}})
    assert got.status_code == 200, got.text
    strip = ("id", "created")
    assert {k: v for k, v in got.json().items() if k not in strip} == {k: v for k, v in want.items() if k not in strip}
    with client.stream("POST", route, json={**body, "stream": True, "stream_options": {"include_usage": None}}) as r:
        assert r.status_code == 200 and not any('"usage":{' in line for line in r.iter_lines())
    # a required field stays required
    required = "prompt" if route == "/v1/completions" else "messages"
    error_of(client.post(route, json={**body, required: None}), 400, required)


def test_openai_metadata_fields_are_taken_and_unsupported_ones_refused(served):
    client, _ = served
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi", "name": None}],
                                                  "max_tokens": 2})
    assert r.status_code == 200, r.text  # (a null name is no name)
    taken = {"safety_identifier": "u-1", "prompt_cache_key": "k", "prompt_cache_retention": "24h", "user": "me",
             "verbosity": "medium", "prediction": None, "audio": None, "web_search_options": None,
             "stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}}
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, **taken})
    assert r.status_code == 200, r.text
    for field, value in (("verbosity", "low"), ("prediction", {"type": "content", "content": "x"}),
                         ("audio", {"voice": "alloy", "format": "wav"}), ("web_search_options", {})):
        r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, field: value})
        assert "not supported" in error_of(r, 400, field)


def test_top_p_zero_is_greedy(served):
    client, _ = served
    for route, body in (("/v1/completions", {"prompt": "Hello"}), ("/v1/chat/completions", {"messages": USER})):
        greedy = client.post(route, json={**body, "max_tokens": 6, "temperature": 0, "ignore_eos": True}).json()
        for extra in ({"seed": 1}, {"seed": 2, "n": 2}):
            r = client.post(route, json={**body, "max_tokens": 6, "top_p": 0, "temperature": 1.5, "ignore_eos": True,
                                         **extra})
            assert r.status_code == 200, r.text
            key = "text" if route == "/v1/completions" else "message"
            assert all(c[key] == greedy["choices"][0][key] for c in r.json()["choices"])


@pytest.mark.parametrize("messages,param,match", [
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text", "needs its text"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": 5}]}],
     "messages[0].content[1].text", "a string"),
    ([{"role": "user", "content": "hi", "name": 7}], "messages[0].name", "must be a string"),
    ([*USER, {"role": "assistant", "content": "x"}, {"role": "tool", "content": "4"}], "messages[2].tool_call_id",
     "the id (a string) of the call it answers"),
    ([*USER, {"role": "tool", "content": "4", "tool_call_id": 3}], "messages[1].tool_call_id", "a string"),
    ([*USER, {"role": "assistant", "content": None, "tool_calls": 5}, *USER], "messages[1].tool_calls", "an array"),
    ([*USER, {"role": "assistant", "tool_calls": {"a": 1}}, *USER], "messages[1].tool_calls", "an array"),
    ([*USER, {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": "add"}]}, *USER],
     "messages[1].tool_calls[0].function", "an object with name and arguments"),
    ([*USER, {"role": "assistant", "tool_calls": [5]}], "messages[1].tool_calls[0]", "must be an object"),
    ([*USER, {"role": "assistant", "tool_calls": [{"function": {"name": 3, "arguments": "{}"}}]}],
     "messages[1].tool_calls[0].function.name", "a string"),
    ([*USER, {"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": 4}}]}],
     "messages[1].tool_calls[0].function.arguments", "a string"),
    ([*USER, {"role": "assistant", "tool_calls": [{"id": 1, "function": {"name": "add", "arguments": "{}"}}]}],
     "messages[1].tool_calls[0].id", "a string"),
    ([*USER, {"role": "assistant", "tool_calls": [{"type": "custom", "function": {"name": "a", "arguments": ""}}]}],
     "messages[1].tool_calls[0].type", "only function calls"),
])
def test_messages_are_typed_as_openai_types_them(served, messages, param, match):
    client, _ = served
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2, "stream": stream})
        assert match in error_of(r, 400, param)


def test_well_formed_tool_calls_are_taken(served):
    client, _ = served
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "2"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert r.status_code == 200, r.text
    call["function"]["arguments"] = {"a": 1}  # (the arguments as an object, as some clients send them)
    assert client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("route,raw,param", [
    ("/v1/completions", '{"prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "a\\udfff"]}', "prompt[1]"),
    ("/v1/completions", '{"prompt": "x", "stop": ["\\udc00"]}', "stop[0]"),
    ("/v1/completions", '{"prompt": "x", "logit_bias": {"\\ud800": 1}}', "logit_bias"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800"}]}', "messages[0].content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages[0].content[0].text"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi", "name": "\\ud800"}]}',
     "messages[0].name"),
    ("/v1/completions", '{"prompt": "x", "\\ud800": 1}', None),
])
def test_a_lone_surrogate_is_a_400_naming_its_field(served, route, raw, param):
    """JSON's `\\ud800` escape parses to a lone UTF-16 surrogate, which is no Unicode text: refused,
    streamed or not, and the server serves the next request."""
    client, _ = served
    for stream in ("false", "true"):
        body = raw[:-1] + f', "max_tokens": 1, "stream": {stream}}}'
        r = client.post(route, content=body, headers={"Content-Type": "application/json"})
        message = error_of(r, 400, param)
        assert "not valid Unicode" in message and "surrogate" in message
    assert ok(client, route)


@pytest.mark.parametrize("kwargs,param,match", [
    ({"tokenize": False}, "chat_template_kwargs.tokenize", "renders and tokenizes the messages itself"),
    ({"return_tensors": "pt"}, "chat_template_kwargs.return_tensors", "renders and tokenizes"),
    ({"return_dict": True}, "chat_template_kwargs.return_dict", "renders and tokenizes"),
    ({"add_generation_prompt": False}, "chat_template_kwargs.add_generation_prompt", "as a field of the request"),
    ({"chat_template": "{{ raise_exception('no') }}"}, "chat_template_kwargs.chat_template", "of its own"),
])
def test_chat_template_kwargs_are_the_templates_variables_alone(served, kwargs, param, match):
    client, _ = served
    for stream in (False, True):
        r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "stream": stream,
                                                      "chat_template_kwargs": kwargs})
        assert match in error_of(r, 400, param)
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2,
                                                  "chat_template_kwargs": {"documents": [], "anything": 1}})
    assert r.status_code == 200, r.text


def test_a_template_that_raises_is_a_400_naming_messages(served, monkeypatch):
    """A chat template's own check (`raise_exception`, as templates that want alternating roles
    call it) or a runtime error in it is the request's error, as its syntax errors are."""
    client, engine = served
    alternating = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
                   "{% endif %}{{ m['content'] }}{% endfor %}{{ messages[0].missing.attribute }}")
    monkeypatch.setattr(engine.tokenizer, "chat_template", alternating)
    for stream in (False, True):
        body = {"messages": [*USER, *USER], "max_tokens": 2, "stream": stream}
        assert "roles must alternate" in error_of(client.post("/v1/chat/completions", json=body), 400, "messages")
        body["messages"] = USER  # (past the check: the template reads an undefined attribute)
        assert "chat template failed" in error_of(client.post("/v1/chat/completions", json=body), 400, "messages")


def test_responses_carry_a_system_fingerprint(served):
    client, _ = served
    for route, body in (("/v1/completions", {"prompt": "Hello"}), ("/v1/chat/completions", {"messages": USER})):
        r = client.post(route, json={**body, "max_tokens": 2})
        assert "system_fingerprint" in r.json() and r.json()["system_fingerprint"] is None
        with client.stream("POST", route, json={**body, "max_tokens": 2, "stream": True}) as s:
            assert all("system_fingerprint" in e for e in events(s.iter_lines()))


# ---- 8. error shapes ----------------------------------------------------------------------------------------
def test_errors_take_openai_shape_everywhere(served):
    client, _ = served
    J = {"Content-Type": "application/json"}
    message = error_of(client.post("/v1/completions", content='{"prompt": "x" "max_tokens": 2}', headers=J), 400, None)
    assert "not valid JSON" in message and "character 15" in message
    for headers in ({"Content-Type": "application/x-www-form-urlencoded"}, {"Content-Type": "text/plain"}, {}):
        r = client.post("/v1/completions", content='{"prompt": "x", "max_tokens": 2}', headers=headers)
        assert "Content-Type: application/json" in error_of(r, 415, None)
    assert "empty" in error_of(client.post("/v1/completions", content="", headers=J), 400, None)
    assert "JSON object" in error_of(client.post("/v1/completions", content="[1, 2]", headers=J), 400, None)
    assert "no route" in error_of(client.post("/v1/embeddings", json={"input": "x"}), 404, None)
    message = error_of(client.get("/nothing/here"), 404, None)
    assert message == ("no route GET /nothing/here: this server has GET /health, GET /v1/models, GET /v1/models/{model}, "
                       "POST /v1/completions and POST /v1/chat/completions")
    r = client.get("/v1/completions")
    assert "not allowed" in error_of(r, 405, None) and r.headers["allow"] == "POST"
    assert "a string or an array of strings" in error_of(client.post("/v1/completions", json={"prompt": "x", "stop": 5}),
                                                         400, "stop")
    error_of(client.post("/v1/completions", json={"prompt": "x", "stop": ["a", 5]}), 400, "stop")
    assert "token ids" in error_of(client.post("/v1/completions", json={"prompt": [1, "a"]}), 400, "prompt")
    error_of(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": 5}]}), 400,
             "messages[0].content")
    error_of(client.post("/v1/chat/completions", json={"messages": [USER[0], {"role": "robot", "content": "x"}]}),
             400, "messages[1].role")
    error_of(client.post("/v1/completions", json={"prompt": "x", "stream_options": {"include_usage": 1},
                                                   "stream": True}), 400, "stream_options.include_usage")
    assert "unknown field" in error_of(client.post("/v1/completions", json={"prompt": "x", "max_token": 3}), 400,
                                       "max_token")


# ---- 9. strict types ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("route,fields,param", [
    ("/v1/chat/completions", {"stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"stream": 1}, "stream"),
    ("/v1/chat/completions", {"max_tokens": "2"}, "max_tokens"),
    ("/v1/chat/completions", {"max_tokens": 2.0}, "max_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": 2.5}, "max_completion_tokens"),
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
    ("/v1/completions", {"n": "1"}, "n"),
    ("/v1/completions", {"echo": "true"}, "echo"),
    ("/v1/completions", {"temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"prompt": [1, True]}, "prompt"),
    ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": None}, USER[0]]}, "messages[0].content"),
])
def test_types_are_strict_as_openai_has_them(served, route, fields, param):
    client, _ = served
    body = {"prompt": "x"} if route == "/v1/completions" else {"messages": USER}
    error_of(client.post(route, json={**body, "max_tokens": 2, **fields}), 400, param)


def test_what_strict_types_still_take(served):
    client, _ = served
    for fields in ({"temperature": 1, "top_p": 1, "seed": -1}, {"seed": 2**63 - 1, "temperature": 0.5},
                   {"logit_bias": {"5": 1}}, {"stream": False, "logprobs": 0}):
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, **fields})
        assert r.status_code == 200, r.text
    r = client.post("/v1/chat/completions", json={"messages": [*USER, {"role": "assistant"}, *USER], "max_tokens": 2})
    assert r.status_code == 200, r.text  # (an assistant message may go without content)


def test_the_bearer_scheme_in_any_case(served):
    _, engine = served
    locked = TestClient(create_app(engine, api_key="sk-test"))  # (no lifespan: the fixture's app runs the engine)
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert locked.get("/v1/models", headers={"Authorization": f"{scheme} sk-test"}).status_code == 200
    for header in ("Bearer sk-wrong", "Basic sk-test", "sk-test", "Bearer"):
        r = locked.get("/v1/models", headers={"Authorization": header})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


# ---- 7. the command's flags --------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,flag,match", [
    (["--port", "70000"], "--port", "65535"),
    (["--port", "-1"], "--port", "at least 0"),
    (["--port", "http"], "--port", "not an integer"),
    (["--log-level", "loud"], "--log-level", "invalid choice"),
    (["--max-model-len", "0"], "--max-model-len", "at least 2"),
    (["--max-model-len", "-5"], "--max-model-len", "at least 2"),
    (["--max-batch-tokens", "0"], "--max-batch-tokens", "at least 1"),
    (["--max-batch", "0"], "--max-batch", "at least 1"),
    (["--prefill-chunk-tokens", "-1"], "--prefill-chunk-tokens", "at least 0"),
    (["--switch-interval", "-1"], "--switch-interval", ">= 0"),
    (["--switch-interval", "nan"], "--switch-interval", ">= 0"),
    (["--dtype", "float13"], "--dtype", "not a dtype"),
    (["--device", "gpu"], "--device", "not a device"),
    (["--device", "meta"], "--device", "not a device"),
])
def test_bad_flags_are_usage_errors_before_the_model_loads(monkeypatch, capsys, args, flag, match):
    monkeypatch.setattr(cli, "_resolve", lambda *a: pytest.fail("the model was looked up"))
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and match in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_cuda_device_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["info", "--device", "cuda:0"])
    assert "argument --device: 'cuda:0': CUDA is not available" in capsys.readouterr().err


def test_a_port_in_use_is_an_error_before_the_model_loads(monkeypatch):
    monkeypatch.setattr(cli, "_resolve", lambda *a: pytest.fail("the model was looked up"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot listen at --host 127.0.0.1 --port {port}: .*in use"):
            cli.main(["serve", "--port", str(port)])
    with pytest.raises(SystemExit, match="--host no-such-host.invalid"):
        cli.main(["serve", "--host", "no-such-host.invalid"])


def test_log_level_and_port_reach_uvicorn(monkeypatch, capsys):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    monkeypatch.setattr(cli, "_check_address", lambda host, port: None)  # (the port is not bound here)
    assert cli.main(["serve", "--model", "tiny-jetmoe", "--port", "8123", "--log-level", "WARNING",
                     "--max-model-len", "32", "--max-batch", "1", "--no-engine-process"]) == 0
    assert seen["port"] == 8123 and seen["log_level"] == "warning"
    assert "at http://127.0.0.1:8123/v1 " in capsys.readouterr().err


class _Server:
    """uvicorn.Server as `moetorch serve --port 0` drives it: run on the sockets given."""

    seen: dict = {}

    def __init__(self, config):
        self.config, self.started = config, False

    def run(self, sockets=None):
        (sock,) = sockets
        _Server.seen.update(port=sock.getsockname()[1], family=sock.family, open=sock.fileno() != -1,
                            level=self.config["log_level"])
        self.started = _Server.seen.get("starts", True)


def test_port_zero_is_bound_first_so_that_the_banner_names_it(monkeypatch, capsys):
    """--port 0 at --log-level warning: uvicorn names the chosen port only at info, so the server
    binds the socket itself (IPv4 unless the host has a colon, as uvicorn binds), names its port,
    and hands uvicorn the listening socket; a server that fails to start exits 3, as uvicorn.run."""
    import uvicorn

    monkeypatch.setattr(uvicorn, "Config", lambda app, **kw: kw)
    monkeypatch.setattr(uvicorn, "Server", _Server)
    argv = ["serve", "--model", "tiny-jetmoe", "--port", "0", "--log-level", "WARNING", "--max-model-len", "32",
            "--max-batch", "1", "--no-engine-process"]
    _Server.seen = {}
    assert cli.main(argv) == 0
    seen = _Server.seen
    assert seen["open"] and seen["port"] > 0 and seen["level"] == "warning" and seen["family"] == socket.AF_INET
    assert f"at http://127.0.0.1:{seen['port']}/v1 " in capsys.readouterr().err
    _Server.seen = {"starts": False}
    assert cli.main(argv) == 3


def test_port_zero_that_cannot_be_bound_is_named_and_closes_its_socket(monkeypatch):
    """The free port of --port 0 is bound after the address check: a bind that fails then (the
    address gone, no ports left) is a one-line error naming --host, and the socket is closed."""
    made = []

    class Refusing(socket.socket):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

        def bind(self, address):
            raise OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))

    monkeypatch.setattr(socket, "socket", Refusing)
    with pytest.raises(SystemExit, match=f"cannot listen at --host 127.0.0.1: {os.strerror(errno.EADDRNOTAVAIL)}"):
        cli._any_port("127.0.0.1")
    assert len(made) == 1 and made[0].family == socket.AF_INET and made[0].fileno() == -1


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_a_stop_string_ends_the_count_at_its_token_however_far_the_host_lags(served, monkeypatch, route):
    """Results may reach the request several tokens at once (the host read late): a stop string
    still ends the completion, its usage and its log-probabilities at the token that completes it,
    as when every token is read as it comes."""
    client, engine = served
    from moetorch.serve import engine as engine_module

    body = {"max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 0 if "chat" not in route else True}
    body |= {"prompt": "def fibonacci(n):"} if "chat" not in route else {"messages": USER}
    lp = client.post(route, json=body).json()["choices"][0]["logprobs"]
    pieces = lp["tokens"] if "chat" not in route else [e["token"] for e in lp["content"]]
    k = next(i for i in range(1, len(pieces)) if pieces[i].strip() and pieces[i] not in "".join(pieces[:i]))
    real = engine_module.StreamedOutput.extend
    results = []
    for burst in (1, 5):
        held: dict = {}

        def extend(self, status, tokens, logprobs, tops, error, burst=burst, held=held):
            buf = held.setdefault(self.request_id, ([], [], []))
            buf[0].extend(tokens), buf[1].extend(logprobs), buf[2].extend(tops)
            if len(buf[0]) >= burst or engine_module.RequestStatus(status) >= engine_module.RequestStatus.FINISHED:
                real(self, status, list(buf[0]), list(buf[1]), list(buf[2]), error)
                held[self.request_id] = ([], [], [])
            else:  # (held back: the request sees no new token yet)
                real(self, engine_module.RequestStatus.DECODING, [], [], [], None)

        monkeypatch.setattr(engine_module.StreamedOutput, "extend", extend)
        r = client.post(route, json={**body, "stop": [pieces[k]]})
        assert r.status_code == 200, r.text
        results.append(r.json())
    for r in results:
        assert r["usage"]["completion_tokens"] == k + 1 and r["choices"][0]["finish_reason"] == "stop"
    # the same text and tokens; log-probabilities within float32 rounding (the second request may
    # reuse the first's cached prompt)
    texts = [json.dumps(r["choices"], sort_keys=True) for r in results]
    assert re.sub(r"-?\d+\.\d+(e-?\d+)?", "N", texts[0]) == re.sub(r"-?\d+\.\d+(e-?\d+)?", "N", texts[1])
    numbers = [[float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", t)] for t in texts]
    assert numbers[0] == pytest.approx(numbers[1], abs=1e-4)
