"""An OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI).

    POST /v1/completions        text completion: prompt(s) as text or token ids
    POST /v1/chat/completions   chat: messages through the tokenizer's chat template
    GET  /v1/models             the served model
    GET  /health

Both completion routes stream as server-sent events with `"stream": true`. Bad input is an HTTP 400
in OpenAI's error shape, naming the field (`param`); a setting the server does not apply
(`functions`, `tool_choice: "auto"`, ...) is refused the same way rather than ignored.
`response_format` (JSON mode and JSON-schema structured output) and a forced `tool_choice`
(`tools.py`) hold the output to its JSON through a grammar (`moetorch/generation/grammar.py`).
`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, and `response_format` on completions, are
accepted beside OpenAI's fields, as other servers accept them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .engine import Engine, EngineError, Piece, PromptError
from .errors import BadRequest
from .tools import forced_calls


def _error(message: str, status: int, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


# ---- requests ------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    # as other OpenAI-compatible servers
    ignore_eos: bool = False  # run to max_tokens (benchmarks)
    repetition_penalty: float | None = Field(None, gt=0)  # Transformers': over the prompt and the output
    min_p: float | None = Field(None, ge=0, le=1)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: the prompt scored, nothing generated
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1, le=128)  # candidates a prompt; the n best are returned
    suffix: str | None = None
    response_format: dict[str, Any] | None = None  # as chat's (other servers take it here too)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed to the chat template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None
    # as other OpenAI-compatible servers: the template's own switches
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


# OpenAI fields the server refuses unless they hold their no-op value
_NOOP = {"suffix": (None, ""), "functions": (None, []), "function_call": (None, "none"),
         "store": (None, False), "metadata": (None, {}), "service_tier": (None, "auto", "default"),
         "modalities": (None, ["text"]), "reasoning_effort": (None,)}


def _refuse_unsupported(body: _Common) -> None:
    for name, noop in _NOOP.items():
        if name in type(body).model_fields and getattr(body, name) not in noop:
            raise BadRequest(f"{name} is not supported by this server (moetorch): leave it out", name)
    if isinstance(body, ChatRequest) and body.top_logprobs is not None and not body.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")


def _stops(body: _Common) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stops):
        raise BadRequest("stop: a stop string must not be empty", "stop")
    return stops


def _eos(body: _Common, eos: list[int]) -> list[int]:
    return [] if body.ignore_eos else eos


def _logit_bias(body: _Common, vocab: int) -> dict[int, float]:
    """`logit_bias` with its keys as token ids, checked."""
    out = {}
    for key, bias in (body.logit_bias or {}).items():
        try:
            tok = int(key)
        except ValueError:
            raise BadRequest(f"logit_bias: {key!r} is not a token id", "logit_bias") from None
        if not 0 <= tok < vocab:
            raise BadRequest(f"logit_bias: token id {tok} is outside the vocabulary (0 .. {vocab - 1})", "logit_bias")
        if not -100 <= bias <= 100:
            raise BadRequest(f"logit_bias[{key!r}]: a bias must be in [-100, 100], got {bias}", "logit_bias")
        out[tok] = bias
    return out


def _sampling(body: _Common, choice: int, vocab: int, grammar=None) -> dict[str, Any]:
    """A choice's settings for the manager: greedy at temperature 0, else sampled (OpenAI's
    default temperature is 1); choice i of a seeded request draws from seed + i; penalties and
    logit bias (greedy or not); top log-probabilities where asked (chat's `top_logprobs`,
    completions' `logprobs`). Settings at their no-op values are left out."""
    top = body.logprobs if isinstance(body, CompletionRequest) else (body.top_logprobs if body.logprobs else None)
    settings: dict[str, Any] = {"top_logprobs": top} if top else {}
    if grammar is not None:
        settings["grammar"] = grammar
    for name, noop in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
        if getattr(body, name) not in (None, noop):
            settings[name] = getattr(body, name)
    if body.logit_bias:
        settings["logit_bias"] = _logit_bias(body, vocab)
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature == 0:
        return {"do_sample": False, **settings}
    seed = None if body.seed is None else (body.seed + choice) % 2**63
    top_k = body.top_k if body.top_k and body.top_k > 0 else 0
    if body.min_p:
        settings["min_p"] = body.min_p
    return {"do_sample": True, "temperature": temperature, "top_p": 1.0 if body.top_p is None else body.top_p,
            "top_k": top_k, "seed": seed, **settings}


_JSON_SCHEMA_KEYS = {"name", "description", "schema", "strict"}


def _grammar(body: _Common, engine: Engine):
    """The grammar that `response_format` holds the output to, or None (absent, or `text`):
    `json_object` any JSON object, `json_schema` what its `schema` describes (OpenAI's shape:
    `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`)."""
    fmt = body.response_format
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise BadRequest(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                         "response_format")
    extra = set(fmt) - {"type"} - ({"json_schema"} if kind == "json_schema" else set())
    if extra:
        raise BadRequest(f"response_format: unknown field(s) {sorted(extra)} for type {kind!r}", "response_format")
    if kind == "text":
        return None
    schema = None
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise BadRequest("response_format.json_schema must be an object with a name and a schema",
                             "response_format.json_schema")
        if set(spec) - _JSON_SCHEMA_KEYS:
            raise BadRequest(f"response_format.json_schema: unknown field(s) {sorted(set(spec) - _JSON_SCHEMA_KEYS)}",
                             "response_format.json_schema")
        name = spec.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise BadRequest("response_format.json_schema.name must be 1-64 letters, digits, '_' or '-', got "
                             f"{name!r}", "response_format.json_schema.name")
        if not isinstance(spec.get("strict", False), (bool, type(None))):
            raise BadRequest("response_format.json_schema.strict must be a boolean",
                             "response_format.json_schema.strict")
        schema = spec.get("schema", {})  # OpenAI: none is any JSON value
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema must be a JSON Schema object",
                             "response_format.json_schema.schema")
    param = "response_format" if schema is None else "response_format.json_schema.schema"
    return _json_grammar(engine, schema, param)


def _json_grammar(engine: Engine, schema: dict | None, param: str):
    try:
        return engine.json_grammar(schema)
    except (ImportError, ValueError) as e:  # llguidance missing; a schema it cannot follow
        raise BadRequest(f"{param}: {e}", param) from None


def _best_of(body: CompletionRequest) -> int:
    """Candidates a prompt (`best_of`, default `n`), checked against `n` and `stream`."""
    if body.best_of is None:
        return body.n
    if body.best_of < body.n:
        raise BadRequest(f"best_of ({body.best_of}) must be at least n ({body.n})", "best_of")
    if body.stream and body.best_of > body.n:
        raise BadRequest("best_of > n cannot stream: the best are known when every candidate has ended", "best_of")
    return body.best_of


def _best(done: list, best: int, n: int) -> list:
    """Of each prompt's `best` candidates ((job, pieces), prompt-major), the `n` with the highest
    mean log-probability a token (OpenAI's "best"), best first; all of them, in order, where
    `best` is `n`. A candidate with no token scores 0."""
    if best == n:
        return done

    def score(candidate) -> float:
        lps = [lp for piece in candidate[1] for lp in piece.logprobs]
        return sum(lps) / len(lps) if lps else 0.0

    return [c for i in range(0, len(done), best) for c in sorted(done[i:i + best], key=score, reverse=True)[:n]]


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---- the app -------------------------------------------------------------------------------------
def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (started with the app, stopped with it)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(engine.start)  # on a GPU: captures the decode graphs first
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="moetorch", lifespan=lifespan)
    app.state.engine = engine
    vocab = engine.vocab_size

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {param!r}"
        else:
            message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return _error(message, 400, param)

    @app.exception_handler(BadRequest)
    async def bad(request: Request, exc: BadRequest):
        return _error(str(exc), exc.status, exc.param, exc.kind)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError):
        return _error(f"generation failed: {exc}", 500, kind="server_error")

    @app.exception_handler(PromptError)
    async def prompt_error(request: Request, exc: PromptError):
        return _error(str(exc), 400, exc.param)

    if api_key is not None:
        app.add_middleware(_ApiKey, key=api_key)

    def card() -> dict[str, Any]:
        return {"id": engine.name, "object": "model", "created": 0, "owned_by": "moetorch",
                "max_model_len": engine.max_model_len}

    @app.get("/health")
    async def health():
        ok = engine.manager.is_running()
        return JSONResponse({"status": "ok" if ok else "stopped"}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != engine.name:
            return _error(f"the model {model_id!r} does not exist (this server serves {engine.name!r})", 404, "model",
                          "not_found_error")
        return card()

    def check_model(body: _Common) -> None:
        if body.model is not None and body.model != engine.name:
            raise BadRequest(f"the model {body.model!r} does not exist (this server serves {engine.name!r})", "model",
                             404, "not_found_error")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body)
        _refuse_unsupported(body)
        prompts = _completion_prompts(engine, body.prompt)
        limit = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default for completions
        if limit == 0 and not body.echo:
            raise BadRequest("max_tokens=0 generates nothing: it takes echo=true (to score the prompt)", "max_tokens")
        best = _best_of(body)
        grammar = _grammar(body, engine)
        jobs = [_Job(i * best + j, ids,
                     engine.check_prompt(ids, limit, f"prompt[{i}]" if len(prompts) > 1 else "prompt", param="prompt"),
                     _sampling(body, j, vocab, grammar))
                for i, ids in enumerate(prompts) for j in range(best)]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": engine.name}
        echo = {job.index: engine.tokenizer.decode(job.ids, skip_special_tokens=True) for job in jobs} \
            if body.echo else {}
        want_lp, top = body.logprobs is not None, bool(body.logprobs)
        # echo with logprobs: the prompt's tokens are scored too (one forward per prompt)
        scored = {}
        if body.echo and want_lp:
            by_prompt = [await engine.prompt_logprobs(ids, body.logprobs) for ids in prompts]
            scored = {job.index: (job.ids, *by_prompt[job.index // best]) for job in jobs}
        offsets: dict[int, int] = {}

        def choice(index: int, text: str, pieces: list[Piece], reason: str | None, first: bool) -> dict[str, Any]:
            lp = None
            if want_lp:
                lp = _completion_logprobs(engine, pieces, offsets.get(index, 0), top, scored.get(index) if first
                                          else None)
                offsets[index] = lp.pop("end")
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}

        if body.stream:
            async def chunks():
                for job in jobs:  # with echo, the prompt's text comes first
                    if body.echo:
                        piece = Piece("", prompt_tokens=len(job.ids))
                        yield {**head, "choices": [choice(job.index, echo[job.index], [], None, True)]}, piece
                if all(job.max_tokens == 0 for job in jobs):
                    for job in jobs:
                        yield {**head, "choices": [choice(job.index, "", [], "length", False)]}, None
                    return
                async for index, piece in _run_all(engine, jobs, _stops(body), _eos(body, engine.eos), True):
                    yield {**head, "choices": [choice(index, piece.text, [piece], piece.finish_reason, False)]}, piece
            return _sse(chunks(), body, sum(len(p) for p in prompts))
        if all(job.max_tokens == 0 for job in jobs):  # echo alone: the prompts scored, nothing generated
            done = [(job, [Piece("", finish_reason="length")]) for job in jobs]
        else:
            done = await _collect(engine, jobs, _stops(body), _eos(body, engine.eos), request)
        choices = [{**choice(job.index, echo.get(job.index, "") + "".join(p.text for p in pieces), pieces,
                             pieces[-1].finish_reason, True), "index": index}
                   for index, (job, pieces) in enumerate(_best(done, best, body.n))]
        # usage counts every candidate's tokens, as OpenAI bills best_of
        return {**head, "choices": choices,
                "usage": _usage(sum(len(p) for p in prompts), sum(pieces[-1].completion_tokens for _, pieces in done))}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_model(body)
        _refuse_unsupported(body)
        calls = forced_calls(body.tools, body.tool_choice, body.parallel_tool_calls)
        ids = _chat_prompt(engine, body)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        grammar = _grammar(body, engine)
        if calls is not None:
            if grammar is not None:
                raise BadRequest("response_format and a forced tool_choice both set what the output is: pass one",
                                 "response_format")
            grammar = _json_grammar(engine, calls.schema, "tools")
        jobs = [_Job(j, ids, engine.check_prompt(ids, limit, "messages"), _sampling(body, j, vocab, grammar))
                for j in range(body.n)]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": engine.name}

        def logprobs(pieces: list[Piece]) -> dict[str, Any] | None:
            if not body.logprobs:
                return None
            def entry(text: str, lp: float) -> dict[str, Any]:
                return {"token": text, "logprob": lp, "bytes": list(text.encode())}

            return {"content": [{**entry(t, lp), "top_logprobs": [entry(u, v) for u, v in top]}
                                for t, lp, top in _token_texts(engine, pieces)]}

        if body.stream:
            chunk_head = {**head, "object": "chat.completion.chunk"}

            async def chunks():
                for job in jobs:  # the role first, as OpenAI sends it
                    yield {**chunk_head, "choices": [{"index": job.index, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}]}, None
                texts = {job.index: "" for job in jobs}  # a forced call's JSON, sent as tool_calls at its end
                async for index, piece in _run_all(engine, jobs, _stops(body), _eos(body, engine.chat_eos), True):
                    reason, delta = piece.finish_reason, {"content": piece.text} if piece.text else {}
                    if calls is not None:
                        texts[index] += piece.text
                        delta, done = {}, reason is not None and calls.calls(texts[index])
                        if done:
                            delta = {"tool_calls": [{"index": i, **call} for i, call in enumerate(done)]}
                            reason = "tool_calls"
                        elif reason is not None:  # cut short of the whole JSON: its text, as content
                            delta = {"content": texts[index]}
                    if not delta and reason is None and not body.logprobs:
                        yield {"choices": [{"index": index}], "skip": True}, piece  # a call's JSON so far
                        continue
                    yield {**chunk_head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs([piece]),
                                                      "finish_reason": reason}]}, piece
            return _sse(chunks(), body, len(ids))
        done = await _collect(engine, jobs, _stops(body), _eos(body, engine.chat_eos), request)

        def message(pieces: list[Piece]) -> tuple[dict[str, Any], str | None]:
            text = "".join(p.text for p in pieces)
            made = calls.calls(text) if calls is not None else None
            if made:
                return {"role": "assistant", "content": None, "tool_calls": made}, "tool_calls"
            return {"role": "assistant", "content": text}, pieces[-1].finish_reason

        choices = [{"index": job.index, "message": msg, "logprobs": logprobs(pieces), "finish_reason": reason}
                   for job, pieces in done for msg, reason in [message(pieces)]]
        return {**head, "choices": choices,
                "usage": _usage(len(ids), sum(pieces[-1].completion_tokens for _, pieces in done))}

    return app


class _ApiKey:
    """ASGI middleware: /v1 routes need `Authorization: Bearer <key>`. (Plain ASGI: Starlette's
    BaseHTTPMiddleware would pass every streamed chunk through a memory stream of its own.)"""

    def __init__(self, app, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope.get("headers") or []).get(b"authorization")
            if given != self.expected:
                response = _error("invalid or missing API key (Authorization: Bearer ...)", 401,
                                  kind="authentication_error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- running requests ------------------------------------------------------------------------------
class _Job:
    """One choice: its index, prompt ids, token limit and settings."""

    def __init__(self, index: int, ids: list[int], max_tokens: int, sampling: dict[str, Any]) -> None:
        self.index, self.ids, self.max_tokens, self.sampling = index, ids, max_tokens, sampling


async def _run_all(engine: Engine, jobs: list[_Job], stops: list[str], eos: list[int],
                   stream: bool) -> AsyncIterator[tuple[int, Piece]]:
    """(choice index, piece) of every job, as they come; the jobs cancelled if the caller leaves."""
    def pieces_of(job: _Job):
        # closed when left early, so that the request is cancelled at once
        return contextlib.aclosing(engine.generate(job.ids, job.max_tokens, job.sampling, stops, eos, stream))

    if len(jobs) == 1:  # one choice: its pieces as they come, with no task in between
        async with pieces_of(jobs[0]) as pieces:
            async for piece in pieces:
                yield jobs[0].index, piece
        return
    queue: asyncio.Queue = asyncio.Queue()
    _END = object()

    async def run(job: _Job) -> None:
        try:
            async with pieces_of(job) as pieces:
                async for piece in pieces:
                    await queue.put((job.index, piece))
            await queue.put((job.index, _END))
        except BaseException as e:  # noqa: BLE001 -- handed to the reader
            await queue.put((job.index, e))
            raise

    tasks = [asyncio.create_task(run(job)) for job in jobs]
    left = len(jobs)
    try:
        while left:
            index, item = await queue.get()
            if item is _END:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _collect(engine: Engine, jobs: list[_Job], stops: list[str], eos: list[int],
                   request: Request) -> list[tuple[_Job, list[Piece]]]:
    """Every job's pieces, in job order; the jobs are cancelled if the client disconnects."""
    pieces: dict[int, list[Piece]] = {job.index: [] for job in jobs}

    async def gather() -> None:
        async for index, piece in _run_all(engine, jobs, stops, eos, False):
            pieces[index].append(piece)

    task = asyncio.create_task(gather())
    while not task.done():
        await asyncio.wait([task], timeout=1.0)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise BadRequest("the client disconnected", status=499)
    try:
        task.result()
    except EngineError as e:
        raise BadRequest(f"generation failed: {e}", status=500, kind="server_error") from e
    return [(job, pieces[job.index]) for job in jobs]


def _sse(chunks: AsyncIterator[tuple[dict, Piece | None]], body: _Common, prompt_tokens: int) -> StreamingResponse:
    """Server-sent events of `chunks` ((chunk, its piece); a chunk with `"skip": True`: the piece
    counts, nothing is sent), then the usage chunk (`stream_options.include_usage`) and [DONE]. An error after the
    first event goes as an event."""
    usage = body.stream_options is not None and body.stream_options.include_usage

    async def events():
        completion: dict[int, int] = {}
        last = None
        try:
            async for chunk, piece in chunks:
                if piece is not None:
                    completion[chunk["choices"][0]["index"]] = piece.completion_tokens
                if chunk.get("skip"):  # a piece counted, nothing sent
                    continue
                if usage:
                    chunk = {**chunk, "usage": None}
                last = chunk
                yield f"data: {json.dumps(chunk)}\n\n"
            if usage and last is not None:
                total = _usage(prompt_tokens, sum(completion.values()))
                yield f"data: {json.dumps({**last, 'choices': [], 'usage': total})}\n\n"
        except EngineError as e:
            error = {"error": {"message": f"generation failed: {e}", "type": "server_error", "param": None,
                               "code": None}}
            yield f"data: {json.dumps(error)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


# ---- prompts and outputs ---------------------------------------------------------------------------
def _completion_prompts(engine: Engine, prompt) -> list[list[int]]:
    vocab = engine.vocab_size
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    if not prompt:
        raise BadRequest("prompt: no prompt given", "prompt")
    out = []
    for i, p in enumerate(prompt):
        ids = engine.tokenizer.encode(p) if isinstance(p, str) else list(p)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"prompt[{i}]: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "prompt")
        if not ids:
            raise BadRequest(f"prompt[{i}]: the prompt is empty", "prompt")
        out.append(ids)
    return out


def _chat_prompt(engine: Engine, body: ChatRequest) -> list[int]:
    tok = engine.tokenizer
    if getattr(tok, "chat_template", None) is None:
        raise BadRequest("this model's tokenizer has no chat template: use /v1/completions", "messages")
    messages = []
    for i, m in enumerate(body.messages):
        message = m.model_dump(exclude_none=True)
        content = m.content
        if isinstance(content, list):  # content parts: text only
            kinds = sorted({part.get("type") for part in content} - {"text"}, key=str)
            if kinds:
                raise BadRequest(f"messages[{i}].content: only text parts are supported, got {kinds}",
                                 f"messages.{i}.content")
            content = "".join(str(part.get("text", "")) for part in content)
        message["content"] = content or ""
        messages.append(message)
    template_kwargs = dict(body.chat_template_kwargs or {})
    if body.tools:  # the request's tools, for templates that render them
        template_kwargs["tools"] = body.tools
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt and not
                                       body.continue_final_message, continue_final_message=body.continue_final_message,
                                       return_dict=False, **template_kwargs)
    except (ValueError, TypeError) as e:
        raise BadRequest(f"messages: the chat template failed: {e}", "messages") from e


def _token_texts(engine: Engine, pieces: list[Piece]) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """(text, log-probability, [(text, log-probability)] of the likeliest) of each generated token."""
    decode = engine.tokenizer.decode
    ids = [t for p in pieces for t in p.token_ids]
    lps = [lp for p in pieces for lp in p.logprobs]
    tops = [top for p in pieces for top in p.top_logprobs] or [[]] * len(ids)
    return [(decode([t]), lp, [(decode([u]), v) for u, v in top]) for t, lp, top in zip(ids, lps, tops)]


def _completion_logprobs(engine: Engine, pieces: list[Piece], offset: int, top: bool,
                         prompt: tuple | None = None) -> dict[str, Any]:
    """Completions' `logprobs` of the tokens of `pieces` (after the prompt's, scored: (ids,
    log-probabilities, top log-probabilities), the first token's None), text offsets from
    `offset`; "end" holds the offset after them."""
    decode = engine.tokenizer.decode
    entries = []  # (token text, its length in the choice's text, log-probability, likeliest or None)
    if prompt is not None:
        for t, lp, likeliest in zip(*prompt):
            entries.append((decode([t]), len(decode([t], skip_special_tokens=True)), lp,
                            None if likeliest is None else [(decode([u]), v) for u, v in likeliest]))
    entries += [(text, len(text), lp, likeliest) for text, lp, likeliest in _token_texts(engine, pieces)]
    tokens, logprobs, tops, offsets = [], [], [], []
    for text, width, lp, likeliest in entries:
        tokens.append(text)
        logprobs.append(lp)
        step: dict[str, float] | None = None
        if likeliest is not None:
            step = {}
            for text_u, v in likeliest:  # tokens of one text: the likeliest's
                step.setdefault(text_u, v)
        tops.append(step)
        offsets.append(offset)
        offset += width
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops if top else None,
            "text_offset": offsets, "end": offset}
