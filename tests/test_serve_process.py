"""The server with its engine in a process of its own (`Engine.spawn`, `moetorch serve
--engine-process`): the same responses as the engine in the server's process (which
tests/test_serve.py checks against Transformers), greedy text against Transformers directly,
streaming, concurrency, the client-side checks, cancellation, and an engine process that dies."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time

import pytest
import torch
import transformers
from fastapi.testclient import TestClient
from grammar_oracle import SCHEMA, check_schema

import moetorch
from moetorch.defaults import ASSETS
from moetorch.serve import Engine, create_app
from moetorch.serve.engine import EngineError
from moetorch.serve.worker import load_pretrained

NAME = "tiny-phimoe"
PROMPTS = ["def fibonacci(n):", "import os\nimport", "class Parser:\n    def"]


def spawn(**kw) -> Engine:
    tok = moetorch.AutoTokenizer.from_pretrained(NAME)
    return Engine.spawn(functools.partial(load_pretrained, NAME, "cpu", "float32"), tok, NAME,
                        **{"max_model_len": 128, "max_batch": 4, **kw})


@pytest.fixture(scope="module")
def both():
    """(client of the engine process's app, client of the in-process app, the engine process's Engine)."""
    remote = spawn()
    tok = moetorch.AutoTokenizer.from_pretrained(NAME)
    local = Engine(moetorch.AutoModelForCausalLM.from_pretrained(NAME, dtype=torch.float32), tok, NAME,
                   max_model_len=128, max_batch=4)
    with TestClient(create_app(remote)) as a, TestClient(create_app(local)) as b:
        yield a, b, remote


def same(a, b, path: str = "") -> None:
    """Equal, floats within 1e-4 (tests/test_serve.py's tolerance against Transformers): the two
    engines' batches may hold their rows at other batch sizes, whose float32 products round
    differently (1.0e-5 apart in one CI run)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-4), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            if k not in ("id", "created"):
                same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": PROMPTS, "max_tokens": 24, "temperature": 0, "logprobs": 3}),
    ("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 16, "n": 3, "temperature": 0.9, "top_p": 0.9,
                         "seed": 11}),
    ("/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 0, "echo": True, "logprobs": 2}),
    ("/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 24, "temperature": 0, "echo": True, "logprobs": 1}),
    # one prompt: a batch of several rows may form at other sizes in the two engines (by when each
    # row arrives), and the penalties leave near ties that another row count's rounding flips
    ("/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 24, "temperature": 0, "stop": ["\n", "("],
                         "frequency_penalty": 1.0, "repetition_penalty": 1.3, "logit_bias": {"13": -100}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Sort a list"}], "max_tokens": 30,
                              "temperature": 0, "logprobs": True, "top_logprobs": 3}),
    # output held to a JSON Schema: the grammar's text and vocabulary go over the pipe
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "A record"}], "max_tokens": 80, "n": 2,
                              "seed": 3, "logprobs": True, "response_format": {
                                  "type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA}}}),
    ("/v1/completions", {"prompt": PROMPTS[:2], "max_tokens": 80, "temperature": 0,
                         "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Call it"}], "max_tokens": 80, "n": 2, "seed": 1,
                              "tools": [{"type": "function", "function": {"name": "record", "parameters": SCHEMA}}],
                              "tool_choice": "required", "parallel_tool_calls": False}),
])
def test_same_responses_as_in_process(both, route, body):
    remote, local, _ = both
    a, b = remote.post(route, json=body), local.post(route, json=body)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    same(a.json(), b.json())
    for c in a.json()["choices"] if "response_format" in body or "tools" in body else []:
        if "tools" in body:
            assert c["finish_reason"] == "tool_calls"
            check_schema(c["message"]["tool_calls"][0]["function"]["arguments"])
        else:
            assert c["finish_reason"] == "stop"
            check_schema(c["text"] if "text" in c else c["message"]["content"])


def test_client_hands_on_deltas_only(both):
    """The engine process's client takes result handlers as the manager does with deltas=True,
    the only kind it hands on; asking for whole results is an error that says so."""
    _, _, engine = both
    with pytest.raises(ValueError, match=r"results come as deltas \(deltas=True\)"):
        engine.manager.register_result_handler("x", print, deltas=False)


def test_greedy_text_equals_transformers(both):
    remote, _, engine = both
    tok = engine.tokenizer
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ASSETS / NAME), dtype=torch.float32).eval()
    r = remote.post("/v1/completions", json={"prompt": PROMPTS, "max_tokens": 20, "temperature": 0}).json()
    for p, choice in zip(PROMPTS, r["choices"]):
        ids = tok.encode(p)
        want = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=engine.eos,
                           pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        cut = next((i + 1 for i, t in enumerate(want) if t in engine.eos), len(want))
        assert choice["text"] == tok.decode(want[:cut], skip_special_tokens=True)


def test_streams_and_concurrent_requests(both):
    remote, local, _ = both
    body = {"messages": [{"role": "user", "content": "Write a loop"}], "max_tokens": 30, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with remote.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    whole = local.post("/v1/chat/completions", json={**body, "stream": False, "stream_options": None}).json()
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == whole["usage"]
    # several clients at once each get their own answer
    bodies = [{"prompt": p, "max_tokens": 12 + i, "temperature": 0} for i, p in enumerate(PROMPTS * 2)]
    want = [local.post("/v1/completions", json=b).json()["choices"] for b in bodies]
    got: list = [None] * len(bodies)

    def ask(i: int) -> None:
        got[i] = remote.post("/v1/completions", json=bodies[i]).json()["choices"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want


def test_settings_are_checked_in_the_server_process(both):
    _, _, engine = both
    client = engine.manager
    with pytest.raises(ValueError, match="temperature must be a positive"):
        client.add_request([5, 6], request_id="x", max_new_tokens=4, do_sample=True, temperature=-1.0)
    with pytest.raises(TypeError, match="unknown per-request settings"):
        client.add_request([5, 6], request_id="x", max_new_tokens=4, temprature=0.5)
    with pytest.raises(ValueError, match="top_logprobs"):
        client.add_request([5, 6], request_id="x", max_new_tokens=4, top_logprobs=99)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        client.add_request([5, 10**6], request_id="x", max_new_tokens=4)
    with pytest.raises(ValueError, match="logit_bias"):
        client.add_request([5], request_id="x", max_new_tokens=4, logit_bias={10**6: 1.0})


def test_a_client_that_leaves_cancels_its_request(both):
    remote, _, engine = both
    cancelled = []
    cancel = engine.manager.cancel_request
    engine.manager.cancel_request = lambda rid: (cancelled.append(rid), cancel(rid))
    try:
        with remote.stream("POST", "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 100, "stream": True,
                                                           "temperature": 0, "ignore_eos": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break
        deadline = time.monotonic() + 30
        while not cancelled:
            assert time.monotonic() < deadline, "the request was not cancelled"
            time.sleep(0.05)
    finally:
        del engine.manager.cancel_request
    r = remote.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5  # the engine goes on


def test_an_engine_process_that_dies():
    """Requests in flight fail with the reason, /health says 503, and new requests, streamed or
    not, get a 500 that names the engine process."""
    engine = spawn(max_model_len=1000)  # (room for a request that outlasts the kill)
    with TestClient(create_app(engine)) as client:
        assert client.get("/health").status_code == 200
        with client.stream("POST", "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 900, "stream": True,
                                                            "temperature": 0, "ignore_eos": True}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            assert "choices" in first
            os.kill(engine.manager._proc.pid, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        assert "engine process" in rest[-2] and rest[-1] == "data: [DONE]"
        assert client.get("/health").status_code == 503
        r = client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 5})
        assert r.status_code == 500 and "engine process is not running" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 0, "echo": True, "logprobs": 1})
        assert r.status_code == 500 and "engine process" in r.json()["error"]["message"]
        for route, body in (("/v1/completions", {"prompt": PROMPTS[0]}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            r = client.post(route, json={**body, "max_tokens": 5, "stream": True})  # a 500, not a 200 that errs
            assert r.status_code == 500 and "engine process is not running" in r.json()["error"]["message"], route
    with pytest.raises(EngineError):
        engine.manager.score([5, 6], 0)


def poisoned_loader(name: str):
    """A loader for the engine process whose model's first decode-shaped forward raises once."""
    model = load_pretrained(name, "cpu", "float32")
    real, armed = model.forward, [True]

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        if armed and out.logits.shape[1] == 1:
            armed.pop()
            raise RuntimeError("a poisoned step")
        return out

    model.forward = forward
    return model


def test_a_failed_step_in_the_engine_process():
    """A step that fails in the engine process fails its request with a 500 naming the error;
    the batch's loop there goes on, and the next request gets its text."""
    tok = moetorch.AutoTokenizer.from_pretrained(NAME)
    engine = Engine.spawn(functools.partial(poisoned_loader, NAME), tok, NAME, max_model_len=128, max_batch=4)
    body = {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with TestClient(create_app(engine)) as client:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 500 and r.json()["error"]["message"] == \
            "generation failed: a step of the batch failed: RuntimeError: a poisoned step"
        assert client.get("/health").status_code == 200
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(ASSETS / NAME), dtype=torch.float32).eval()
        ids = tok.encode(PROMPTS[0])
        want = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                           pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        assert r.json()["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)


def test_a_bad_model_fails_at_spawn():
    tok = moetorch.AutoTokenizer.from_pretrained(NAME)
    with pytest.raises(RuntimeError, match="failed to start: .*max_model_len=9999 is past"):
        Engine.spawn(functools.partial(load_pretrained, NAME, "cpu", "float32"), tok, NAME, max_model_len=9999)
    with pytest.raises(RuntimeError, match="failed to start"):
        Engine.spawn(functools.partial(load_pretrained, "/nonexistent/checkpoint", "cpu", "float32"), tok, NAME)


def test_the_serve_command_with_an_engine_process(monkeypatch):
    """`moetorch serve` (an engine process by default) loads the model in the engine process only."""
    import uvicorn

    from moetorch import cli

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("the server process loaded the model"))
    assert cli.main(["serve", "--model", "tiny-jetmoe", "--max-model-len", "96", "--max-batch", "3",
                     "--served-model-name", "jet"]) == 0
    engine = seen["app"].state.engine
    assert engine.model is None and (engine.name, engine.max_model_len, engine.manager.rows) == ("jet", 96, 3)
    with TestClient(seen["app"]) as client:
        r = client.post("/v1/completions", json={"model": "jet", "prompt": "import", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert not engine.manager.is_running()  # stopped with the app
    with pytest.raises(SystemExit, match="max_position_embeddings"):
        cli.main(["serve", "--model", "tiny-jetmoe", "--engine-process", "--max-model-len", "100000"])
    with pytest.raises(SystemExit, match="2"):  # a usage error naming --dtype: tests/test_serve_validation.py
        cli.main(["serve", "--model", "tiny-jetmoe", "--engine-process", "--dtype", "float13"])
