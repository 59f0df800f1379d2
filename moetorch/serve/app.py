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
import hmac
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException

from ..generation.stopping_criteria import token_texts
from .engine import Detokenizer, Engine, EngineError, Piece, PromptError, admit
from .errors import BadRequest
from .tools import forced_calls


def _finite(obj):
    """`obj` with every float that is not finite replaced: -inf and NaN by -9999.0, inf by 9999.0
    (OpenAI sends -9999.0 for a log-probability of -inf)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return 9999.0 if obj > 0 else -9999.0
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _dumps(obj, **kw) -> str:
    """JSON text, never with NaN or Infinity in it (`_finite`: only where some float is not finite)."""
    try:
        return json.dumps(obj, allow_nan=False, **kw)
    except ValueError:
        return json.dumps(_finite(obj), allow_nan=False, **kw)


class _JSON(JSONResponse):
    """The server's JSON responses (`_dumps`)."""

    def render(self, content: Any) -> bytes:
        return _dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _error(message: str, status: int, param: str | None = None, kind: str = "invalid_request_error",
           headers: dict[str, str] | None = None, code: str | None = None) -> JSONResponse:
    return _JSON({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status,
                 headers=headers)


logger = logging.getLogger("moetorch")
# a union's branches, as pydantic names them in an error's location
_BRANCHES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
             "list[str]": "an array of strings", "list[int]": "an array of token ids (integers)",
             "list[list[int]]": "an array of arrays of token ids", "list[dict[str,any]]": "an array of content parts",
             "dict[str,any]": "an object"}


def _is_branch(part) -> bool:
    return isinstance(part, str) and (part in _BRANCHES or "[" in part)


def _param(loc) -> str | None:
    """A location in the body as the API names it: `messages[0].content`, not pydantic's
    `messages.0.content.str` (its union branches left out)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_branch(part):
            out += f".{part}" if out else str(part)
    return out or None


def _validation_error(errors: list[dict], content_type: str | None) -> tuple[str, int, str | None]:
    """(message, status, param) of a request body that failed to parse or validate."""
    first = errors[0]
    loc, kind = tuple(first.get("loc", ()))[1:], first.get("type")  # (after "body")
    if kind == "json_invalid":
        why, at = (first.get("ctx") or {}).get("error", "decode error"), f" at character {loc[0]}" if loc else ""
        return f"the request body is not valid JSON: {why}{at}", 400, None
    if kind == "string_unicode" and not loc:  # (pydantic reads the keys so: a key's lone surrogate)
        return "the request body has a field name that is not valid Unicode (a lone UTF-16 surrogate)", 400, None
    if not loc:  # the body as a whole
        media = (content_type or "").split(";")[0].strip().lower()
        if kind == "missing":
            return "the request body is empty: send a JSON object (Content-Type: application/json)", 400, None
        if media != "application/json" and not media.endswith("+json"):
            return (f"the request body must be a JSON object sent with Content-Type: application/json (got "
                    f"{repr(content_type) if content_type else 'no Content-Type'})"), 415, None
        return "the request body must be a JSON object", 400, None
    cut = next((i for i, part in enumerate(loc) if _is_branch(part)), None)
    if cut is not None:  # a value that none of a union's branches takes
        param = _param(loc[:cut])
        branches = dict.fromkeys(e["loc"][cut + 1] for e in errors
                                 if tuple(e["loc"][1:cut + 1]) == loc[:cut] and len(e["loc"]) > cut + 1)
        return f"{param}: must be {' or '.join(_BRANCHES.get(b, b) for b in branches)}", 400, param
    param = _param(loc)
    if kind == "extra_forbidden":
        return f"unknown field {param!r}", 400, param
    return f"{param}: {first.get('msg')}", 400, param


# ---- requests ------------------------------------------------------------------------------------
class _Strict(BaseModel):
    # OpenAI's types: no "2" for 2, 2.0 for an int, 1 or "yes" for true; no Infinity or NaN
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """A null for an optional field is its default, as OpenAI's API reads it (`"n": null` is
        one choice, `"stream": null` no stream); a required field stays required."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items()
                if not (v is None and k in fields and not fields[k].is_required() and fields[k].default is not None)}


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # (taken: this server pads no stream events)


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, lt=2**63)
    temperature: float | None = Field(None, ge=0)  # below SAMPLING_EPS (1e-5): greedy
    top_p: float | None = Field(None, ge=0, le=1)  # 0: greedy
    top_k: int | None = Field(None, ge=-1)  # at most the vocabulary's size (_sampling)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-2**63, lt=2**63)  # an int64, as vLLM takes it
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    # as other OpenAI-compatible servers
    ignore_eos: bool = False  # run to max_tokens (benchmarks)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)  # Transformers': over the prompt and the output
    min_p: float | None = Field(None, ge=0, le=1)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0, lt=2**63)  # 0 with echo: the prompt scored, nothing generated
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
    max_completion_tokens: int | None = Field(None, ge=1, lt=2**63)
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
    verbosity: str | None = None
    prediction: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    # request metadata (OpenAI's `user` and its successors): taken and ignored
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    # as other OpenAI-compatible servers: the template's own switches
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


# OpenAI fields the server refuses unless they hold their no-op value
_NOOP = {"suffix": (None, ""), "functions": (None, []), "function_call": (None, "none"),
         "store": (None, False), "metadata": (None, {}), "service_tier": (None, "auto", "default"),
         "modalities": (None, ["text"]), "reasoning_effort": (None,), "verbosity": (None, "medium"),
         "prediction": (None,), "audio": (None,), "web_search_options": (None,)}


def _refuse_unsupported(body: _Common) -> None:
    for name, noop in _NOOP.items():
        if name in type(body).model_fields and getattr(body, name) not in noop:
            raise BadRequest(f"{name} is not supported by this server (moetorch): leave it out", name)
    if isinstance(body, ChatRequest) and body.top_logprobs is not None and not body.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    if body.stream_options is not None and not body.stream:
        raise BadRequest("stream_options is only allowed with stream: true", "stream_options")
    _stops(body)  # (checked before a stream starts)
    for name in type(body).model_fields:
        _check_text(getattr(body, name), name)
    for i, m in enumerate(body.messages if isinstance(body, ChatRequest) else []):
        _check_message(i, m)
    if isinstance(body, ChatRequest):
        _check_template_kwargs(body.chat_template_kwargs)


def _check_text(value: Any, where: str) -> None:
    """Every string in a request value (keys too) must be Unicode text: JSON's `\\ud800` escapes
    parse to a lone UTF-16 surrogate, which no tokenizer or template can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRequest(f"{where}: the text holds a lone UTF-16 surrogate ({value[e.start]!r} at character "
                             f"{e.start}), which is not valid Unicode", where) from None
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            _check_text(getattr(value, name), f"{where}.{name}")
        for name, v in (value.model_extra or {}).items():
            _check_text(name, where)
            _check_text(v, f"{where}.{name}")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, where)
            _check_text(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_text(v, f"{where}[{i}]")


# apply_chat_template's own arguments, which set what it returns or are the request's fields
_TEMPLATE_ARGUMENTS = {"conversation", "add_generation_prompt", "continue_final_message", "tokenize", "padding",
                       "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
                       "tokenizer_kwargs", "sanitize_control_tokens"}


def _check_template_kwargs(kwargs: dict[str, Any] | None) -> None:
    """`chat_template_kwargs` go to the template as its variables (`tools` and `documents` too); the
    arguments that change what the rendering returns are the server's, and a request may not bring
    a template of its own (a template is code: the server runs its tokenizer's)."""
    for key in kwargs or {}:
        where = f"chat_template_kwargs.{key}"
        if key in ("add_generation_prompt", "continue_final_message"):
            raise BadRequest(f"{where}: pass {key} as a field of the request", where)
        if key in _TEMPLATE_ARGUMENTS:
            raise BadRequest(f"{where}: the server renders and tokenizes the messages itself; chat_template_kwargs "
                             "are the template's variables", where)
        if key == "chat_template":
            raise BadRequest(f"{where}: a request cannot bring a chat template of its own; the server renders "
                             "its tokenizer's", where)


def _check_message(i: int, m: ChatMessage) -> None:
    """A message's content, text parts, `name` and a tool result's `tool_call_id`, as OpenAI
    types them (the other fields a message carries go to the chat template as they are)."""
    where = f"messages[{i}]"
    if m.content is None and m.role != "assistant":
        raise BadRequest(f"{where}.content: a {m.role} message needs content", f"{where}.content")
    for j, part in enumerate(m.content if isinstance(m.content, list) else []):
        if part.get("type") == "text" and not isinstance(part.get("text"), str):
            raise BadRequest(f"{where}.content[{j}].text: a text part needs its text, a string",
                             f"{where}.content[{j}].text")
    extra = m.model_extra or {}
    if extra.get("name") is not None and not isinstance(extra["name"], str):
        raise BadRequest(f"{where}.name: must be a string", f"{where}.name")
    _check_tool_calls(extra.get("tool_calls"), f"{where}.tool_calls")
    if m.role == "tool" and not isinstance(extra.get("tool_call_id"), str):
        raise BadRequest(f"{where}.tool_call_id: a tool message needs the id (a string) of the call it answers",
                         f"{where}.tool_call_id")


def _check_tool_calls(calls: Any, where: str) -> None:
    """An assistant message's `tool_calls`, as OpenAI types them: an array of
    `{"id", "type": "function", "function": {"name", "arguments"}}` (the arguments a JSON string,
    or the object itself, as some clients send them)."""
    if calls is None:
        return
    if not isinstance(calls, list):
        raise BadRequest(f"{where}: must be an array of tool calls", where)
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise BadRequest(f"{at}: a tool call must be an object with its function", at)
        if call.get("type", "function") not in ("function", None):
            raise BadRequest(f"{at}.type: only function calls are supported, got {call['type']!r}", f"{at}.type")
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise BadRequest(f"{at}.id: must be a string", f"{at}.id")
        function = call.get("function")
        if not isinstance(function, dict):
            raise BadRequest(f"{at}.function: a tool call needs its function, an object with name and arguments",
                             f"{at}.function")
        if not isinstance(function.get("name"), str):
            raise BadRequest(f"{at}.function.name: must be a string", f"{at}.function.name")
        if not isinstance(function.get("arguments"), (str, dict)):
            raise BadRequest(f"{at}.function.arguments: must be the arguments' JSON, a string",
                             f"{at}.function.arguments")


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
        if not re.fullmatch(r"-?[0-9]{1,20}", key):
            raise BadRequest(f"logit_bias: {key!r} is not a token id", "logit_bias")
        tok = int(key)
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
    if body.top_k is not None and body.top_k > vocab:
        raise BadRequest(f"top_k: at most the vocabulary's size ({vocab}), or 0 or -1 for no top-k; got {body.top_k}",
                         "top_k")
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature == 0 or body.top_p == 0:  # (top_p 0 keeps the likeliest token alone)
        return admit({"do_sample": False, **settings}, vocab)
    seed = None if body.seed is None else (body.seed + choice) % 2**63
    top_k = body.top_k if body.top_k and body.top_k > 0 else 0
    if body.min_p:
        settings["min_p"] = body.min_p
    # (admit: a temperature below SAMPLING_EPS decodes greedily)
    return admit({"do_sample": True, "temperature": temperature, "top_p": 1.0 if body.top_p is None else body.top_p,
                  "top_k": top_k, "seed": seed, **settings}, vocab)


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

def _routes(app: FastAPI) -> str:
    """The server's routes, as "POST /v1/completions, ..., GET /health" (`{model_id:path}` as `{model}`)."""
    names = [f"{method} {route.path.replace('{model_id:path}', '{model}')}" for route in app.routes
             if isinstance(route, APIRoute) for method in sorted(route.methods)]
    return ", ".join(names[:-1]) + " and " + names[-1]


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (started with the app, stopped with it)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(engine.start)  # on a GPU: captures the decode graphs first
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="moetorch", lifespan=lifespan, default_response_class=_JSON)
    app.state.engine = engine
    vocab = engine.vocab_size

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, status, param = _validation_error(exc.errors(), request.headers.get("content-type"))
        return _error(message, status, param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            message = f"no route {where}: this server has {_routes(request.app)}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path} (allowed: " \
                      f"{(exc.headers or {}).get('Allow', '?')})"
        else:
            message = str(exc.detail)
        return _error(message, exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # (the server's log has the traceback)
        return _error(f"the server failed on this request ({type(exc).__name__}); its log has the details", 500,
                      kind="server_error")

    @app.exception_handler(BadRequest)
    async def bad(request: Request, exc: BadRequest):
        return _error(str(exc), exc.status, exc.param, exc.kind, code=exc.code)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError):
        return _error(f"generation failed: {exc}", 500, kind="server_error")

    @app.exception_handler(PromptError)
    async def prompt_error(request: Request, exc: PromptError):
        return _error(str(exc), 400, exc.param, code=exc.code)

    if api_key is not None:
        app.add_middleware(_ApiKey, key=api_key)

    created = int(time.time())  # (the model card's: when this server started)

    def card() -> dict[str, Any]:
        return {"id": engine.name, "object": "model", "created": created, "owned_by": "moetorch",
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
                          code="model_not_found")
        return card()

    def check_model(body: _Common) -> None:
        if body.model is not None and body.model != engine.name:
            raise BadRequest(f"the model {body.model!r} does not exist (this server serves {engine.name!r})", "model",
                             404, code="model_not_found")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body)
        _refuse_unsupported(body)
        prompts = await asyncio.to_thread(_completion_prompts, engine, body.prompt)  # (off the event loop)
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
                "model": engine.name, "system_fingerprint": None}
        echo = {job.index: engine.tokenizer.decode(job.ids, skip_special_tokens=True) for job in jobs} \
            if body.echo else {}
        want_lp, top = body.logprobs is not None, bool(body.logprobs)
        # echo with logprobs: the prompt's tokens are scored too (one forward per prompt)
        scored = {}
        if body.echo and want_lp:
            by_prompt = [await engine.prompt_logprobs(ids, body.logprobs) for ids in prompts]
            scored = {job.index: (job.ids, *by_prompt[job.index // best]) for job in jobs}
        if want_lp:  # the vocabulary's token bytes, read once, off the event loop
            await asyncio.to_thread(_token_bytes, engine)
        tracks = {job.index: _Tokens(engine, job.ids, len(echo.get(job.index, ""))) for job in jobs} if want_lp else {}

        def choice(index: int, text: str, pieces: list[Piece], reason: str | None, first: bool) -> dict[str, Any]:
            lp = None
            if want_lp:
                lp = _completion_logprobs(tracks[index], pieces, top, scored.get(index) if first else None)
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
            engine.ensure_running()  # a stream to a stopped engine: a 500, not a 200 that errs
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
        if calls is not None and _stops(body):
            raise BadRequest("stop with a forced tool_choice: the output is the call's JSON, which a stop string "
                             "would cut; leave stop out", "stop")
        ids = await asyncio.to_thread(_chat_prompt, engine, body)  # (off the event loop)
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
                "model": engine.name, "system_fingerprint": None}

        if body.logprobs:  # the vocabulary's token bytes, read once, off the event loop
            await asyncio.to_thread(_token_bytes, engine)
        tracks = {job.index: _Tokens(engine, ids) for job in jobs} if body.logprobs else {}

        def logprobs(index: int, pieces: list[Piece]) -> dict[str, Any] | None:
            if not body.logprobs:
                return None
            track = tracks[index]

            def entry(token: int, lp: float) -> dict[str, Any]:
                text, raw = track.shown(token)
                return {"token": text, "logprob": lp, "bytes": list(raw)}

            return {"content": [{**entry(t, lp), "top_logprobs": [entry(u, v) for u, v in top]}
                                for t, lp, top, _ in track.of(pieces)]}

        if body.stream:
            chunk_head = {**head, "object": "chat.completion.chunk"}

            async def chunks():
                first = {"role": "assistant", "content": "" if calls is None else None}  # (a call: no content)
                for job in jobs:  # the role first, as OpenAI sends it
                    yield {**chunk_head, "choices": [{"index": job.index, "delta": first,
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
                    yield {**chunk_head, "choices": [{"index": index, "delta": delta,
                                                      "logprobs": logprobs(index, [piece]),
                                                      "finish_reason": reason}]}, piece
            engine.ensure_running()  # a stream to a stopped engine: a 500, not a 200 that errs
            return _sse(chunks(), body, len(ids))
        done = await _collect(engine, jobs, _stops(body), _eos(body, engine.chat_eos), request)

        def message(pieces: list[Piece]) -> tuple[dict[str, Any], str | None]:
            text = "".join(p.text for p in pieces)
            made = calls.calls(text) if calls is not None else None
            if made:
                return {"role": "assistant", "content": None, "tool_calls": made}, "tool_calls"
            return {"role": "assistant", "content": text}, pieces[-1].finish_reason

        choices = [{"index": job.index, "message": msg, "logprobs": logprobs(job.index, pieces),
                    "finish_reason": reason} for job, pieces in done for msg, reason in [message(pieces)]]
        return {**head, "choices": choices,
                "usage": _usage(len(ids), sum(pieces[-1].completion_tokens for _, pieces in done))}

    return app


class _ApiKey:
    """ASGI middleware: /v1 routes need `Authorization: Bearer <key>` (the scheme in any case, as
    RFC 7235 has it). (Plain ASGI: Starlette's BaseHTTPMiddleware would pass every streamed chunk
    through a memory stream of its own.)"""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            scheme, _, given = (dict(scope.get("headers") or []).get(b"authorization") or b"").strip().partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
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


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (the ASGI server's `http.disconnect`; the body was read).
    A server whose receive fails once the body is read shows no disconnect: this never returns, and
    the request runs to its end."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 -- not a disconnect: the answer is still wanted
        await asyncio.Event().wait()


async def _collect(engine: Engine, jobs: list[_Job], stops: list[str], eos: list[int],
                   request: Request) -> list[tuple[_Job, list[Piece]]]:
    """Every job's pieces, in job order; the jobs are cancelled if the client disconnects."""
    pieces: dict[int, list[Piece]] = {job.index: [] for job in jobs}

    async def gather() -> None:
        async for index, piece in _run_all(engine, jobs, stops, eos, False):
            pieces[index].append(piece)

    task = asyncio.create_task(gather())
    left = asyncio.create_task(_disconnect(request))
    try:
        await asyncio.wait([task, left], return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
    if not task.done():  # the client left: its rows are freed at once
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
                yield f"data: {_dumps(chunk)}\n\n"
            if usage and last is not None:
                total = _usage(prompt_tokens, sum(completion.values()))
                yield f"data: {_dumps({**last, 'choices': [], 'usage': total})}\n\n"
        except EngineError as e:
            error = {"error": {"message": f"generation failed: {e}", "type": "server_error", "param": None,
                               "code": None}}
            yield f"data: {json.dumps(error)}\n\n"
        except (BadRequest, PromptError) as e:  # (checked before the stream starts: not expected here)
            error = {"error": {"message": str(e), "type": "invalid_request_error", "param": e.param, "code": None}}
            yield f"data: {json.dumps(error)}\n\n"
        except Exception as e:  # noqa: BLE001 -- the stream ends with an error event, not a broken connection
            logger.exception("serve: a stream failed")
            error = {"error": {"message": f"the server failed on this request ({type(e).__name__}); its log has "
                               "the details", "type": "server_error", "param": None, "code": None}}
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
    template = tok.chat_template if isinstance(tok.chat_template, str) else json.dumps(tok.chat_template)
    for i, m in enumerate(body.messages):
        message = m.model_dump(exclude_none=True)
        content = m.content
        if isinstance(content, list):  # content parts: text only
            kinds = sorted({part.get("type") for part in content} - {"text"}, key=str)
            if kinds:
                raise BadRequest(f"messages[{i}].content: only text parts are supported, got {kinds}",
                                 f"messages[{i}].content")
            content = "".join(part["text"] for part in content)
        message["content"] = content or ""
        messages.append(_as_the_template_reads(message, template))
    template_kwargs = dict(body.chat_template_kwargs or {})
    if body.tools:  # the request's tools, for templates that render them
        template_kwargs["tools"] = body.tools
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt and not
                                       body.continue_final_message, continue_final_message=body.continue_final_message,
                                       return_dict=False, **template_kwargs)
    except (ValueError, TypeError, jinja2.TemplateError) as e:  # (raise_exception in a template: TemplateError)
        raise BadRequest(f"messages: the chat template failed: {e}", "messages") from e


def _as_the_template_reads(message: dict[str, Any], template: str) -> dict[str, Any]:
    """A message in a form the chat template renders, where it has no place for its role (as
    Phi-3.5-MoE's, which renders system, user and assistant turns alone), so that nothing is
    dropped without a word: `developer` (OpenAI's newer name for the system prompt) as `system`;
    a `tool` result as a `user` turn of its content; an assistant's `tool_calls` as its content,
    the calls' JSON (`[{"name", "arguments"}]`, the form a forced "required" call takes)."""
    def renders(word: str) -> bool:
        return f"'{word}'" in template or f'"{word}"' in template

    role = message["role"]
    if role == "developer" and not renders("developer"):
        return {**message, "role": "system"}
    if role == "tool" and not renders("tool"):
        return {k: v for k, v in message.items() if k not in ("tool_call_id", "name")} | {"role": "user"}
    calls = message.get("tool_calls")
    if role == "assistant" and calls and "tool_calls" not in template:
        def arguments(call: dict) -> Any:
            raw = (call.get("function") or {}).get("arguments")
            try:
                return json.loads(raw) if isinstance(raw, str) else raw
            except ValueError:
                return raw

        said = json.dumps([{"name": (c.get("function") or {}).get("name"), "arguments": arguments(c)}
                           for c in calls if isinstance(c, dict)], ensure_ascii=False)
        text = message.get("content") or ""
        return {k: v for k, v in message.items() if k != "tool_calls"} | {"content": f"{text}{said}"}
    return message


class _Tokens:
    """One choice's tokens as log-probabilities show them. A token's text and `bytes` are its own
    (a word-start token with its space; a piece of a character its byte, shown as `\\xNN`), not
    its decode alone (which turns such a piece into U+FFFD). Where its text starts in the choice's
    text is counted as a decode of the tokens so far gives it: a piece of a character adds nothing
    until its last. Tokens that start past the end of the text returned (the EOS, tokens after a
    stop string) are left out. `start`: characters before the generated text (an echoed prompt)."""

    def __init__(self, engine: Engine, prompt: list[int], start: int = 0) -> None:
        self.engine, self.prompt = engine, prompt
        self.detok = Detokenizer(engine.tokenizer, prompt[-4:])
        self.at = self.end = start  # where the next token's text starts; where the text so far ends

    def shown(self, token: int) -> tuple[str, bytes]:
        raw = _token_bytes(self.engine).get(token)
        if raw is None:  # not in the vocabulary's table (an added token): its decode
            raw = self.engine.tokenizer.decode([token]).encode()
        return raw.decode("utf-8", errors="backslashreplace"), raw

    def of(self, pieces: list[Piece]) -> list[tuple[int, float, list[tuple[int, float]], int]]:
        """(token, log-probability, likeliest [(token, log-probability)], start) of the tokens of
        `pieces` (the next of the choice) that lie within its text."""
        rows = []
        for piece in pieces:
            tops = piece.top_logprobs or [[]] * len(piece.token_ids)
            for token, lp, top in zip(piece.token_ids, piece.logprobs, tops):
                rows.append((token, lp, top, self.at))
                self.at += len(self.detok.add([token]))
            self.end += len(piece.text)
        if pieces and pieces[-1].finish_reason is not None:
            rows = [row for row in rows if row[3] < self.end]
        return rows

    def prompt_widths(self) -> list[int]:
        """The characters each prompt token adds to the prompt's decode (its echo)."""
        detok = Detokenizer(self.engine.tokenizer)
        widths = [len(detok.add([t])) for t in self.prompt]
        if widths:
            widths[-1] += len(detok.flush())
        return widths


def _token_bytes(engine: Engine) -> dict[int, bytes]:
    """Each vocabulary id's bytes inside a word, read once per engine (the stop strings' table)."""
    table = getattr(engine, "_token_bytes", None)
    if table is None:
        texts = token_texts(engine.tokenizer)
        table = {i: t if isinstance(t, bytes) else t.encode() for i, t in texts.items()}
        engine._token_bytes = table
    return table


def _completion_logprobs(track: _Tokens, pieces: list[Piece], top: bool,
                         prompt: tuple | None = None) -> dict[str, Any]:
    """Completions' `logprobs` of the tokens of `pieces` (the choice's next; after the prompt's,
    scored: (ids, log-probabilities, top log-probabilities), the first token's None), with
    `text_offset` in the choice's text (`_Tokens`)."""
    tokens, logprobs, tops, offsets = [], [], [], []

    def label(token: int) -> str:  # a piece of a character as "bytes:\\xNN", as OpenAI shows one
        text, raw = track.shown(token)
        return text if raw.decode("utf-8", errors="ignore") == text else "bytes:" + text

    def add(token: int, lp: float | None, likeliest, offset: int) -> None:
        tokens.append(label(token))
        logprobs.append(lp)
        step: dict[str, float] | None = None
        if likeliest is not None:
            step = {}
            for u, v in likeliest:  # tokens of one text: the likeliest's
                step.setdefault(label(u), v)
        tops.append(step)
        offsets.append(offset)

    if prompt is not None:
        offset = 0
        for (t, lp, likeliest), width in zip(zip(*prompt), track.prompt_widths()):
            add(t, lp, likeliest, offset)
            offset += width
    for t, lp, likeliest, start in track.of(pieces):
        add(t, lp, likeliest, start)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops if top else None,
            "text_offset": offsets}
