"""The engine in a process of its own (`Engine.spawn`; `moetorch serve --engine-process`).

In one process, the batch's loop thread and the HTTP event loop take turns at one interpreter
lock: every streamed token costs the event loop tens of microseconds of Python, and the batch's
next step waits for them. Here the model and its continuous-batching manager run in a child
process; the HTTP process keeps the tokenizer, the text and the sockets. They talk over a pipe:

    HTTP process -> engine:  ("add", id, prompt ids, max new tokens, streaming, eos ids, settings)
                             ("cancel", id), ("score", n, prompt ids, top n), ("stop",)
                             ("vocab", key, tokenizer JSON, width, eos ids): once for a grammar's
                             vocabulary, before the first "add" whose settings name it by key
    engine -> HTTP process:  ("ready", info) or ("error", message) once at start;
                             ("results", [(id, status, new tokens, their log-probabilities, their
                             top log-probabilities, error), ...]) once for all results a sender
                             turn finds (one decode step's, under load); ("scored", n, result, error)

`ManagerClient` is the HTTP process's side: the part of the manager's API that `Engine` uses
(`register_result_handler`, `add_request`, `cancel_request`, `is_running`, `stop`, and `score`
for `echo`), whose results are the deltas as they come. A request's settings are checked
on this side first, so that bad input is an error of the call, as in one process. If the engine
process dies, every request in flight fails with that reason and `is_running()` turns False.
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import threading
import traceback
from typing import Any

from ..engine.batching import RequestStatus, _prompt_list, grammar_of, top_logprobs_of
from ..engine.row_sampling import Sampling
from ..generation.grammar import Grammar, Vocabulary
from .engine import EngineError, StreamedOutput, build_manager, cached_grammar, score_prompt, warm_prefills

logger = logging.getLogger("moetorch")

READY_TIMEOUT_S = 3600.0  # loading a large checkpoint and warming its kernels


def load_pretrained(path: str, device: str, dtype: str, max_memory: dict | None = None):
    """A loader for `Engine.spawn`: `AutoModelForCausalLM.from_pretrained(path, dtype=, device_map=)`
    (and `max_memory=` where given)."""
    from ..auto import AutoModelForCausalLM

    placement = {} if max_memory is None else {"max_memory": max_memory}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device, **placement)


class ManagerClient:
    """The HTTP process's handle on a manager in an engine process (see the module)."""

    def __init__(self, loader, setup: dict, start_method: str = "spawn", timeout: float = READY_TIMEOUT_S) -> None:
        import multiprocessing as mp

        ctx = mp.get_context(start_method)
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker_main, args=(child, loader, setup), name="moetorch-engine", daemon=True)
        self._proc.start()
        child.close()
        if not self._conn.poll(timeout):
            self._proc.kill()
            raise RuntimeError(f"the engine process did not become ready in {timeout:g} s")
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            code = self._proc.exitcode
            raise RuntimeError(f"the engine process exited with code {code} before it was ready") from None
        if kind == "error":
            self._proc.join(30)
            raise RuntimeError(f"the engine process failed to start: {payload}")
        self.info: dict = payload
        self.rows, self.batch_tokens = payload["rows"], payload["batch_tokens"]
        self._greedy = Sampling(False)
        self._vocabs: dict[int, tuple] = {}  # id of a grammar's Vocabulary -> (it, its key there), sent once
        self._handlers: dict[str, tuple] = {}  # request id -> (callback, event loop)
        self._scores: dict[int, list] = {}  # score call -> [event, result, error]
        self._counter = itertools.count()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._running, self.fatal_error = True, None
        self._reader = threading.Thread(target=self._read, name="moetorch-engine-reader", daemon=True)
        self._reader.start()

    # ---- the manager's API ------------------------------------------------------------------------
    def is_running(self) -> bool:
        return self._running and self._proc.is_alive()

    def register_result_handler(self, request_id: str, callback, deltas: bool = True) -> None:
        """As the manager's with `deltas=True`, the only kind this side hands on: each result holds
        the tokens (log-probabilities, ...) since the one before."""
        import asyncio

        if not deltas:
            raise ValueError("ManagerClient.register_result_handler: results come as deltas (deltas=True)")
        loop = asyncio.get_running_loop()
        with self._lock:
            self._handlers[request_id] = (callback, loop)

    def unregister_result_handler(self, request_id: str) -> None:
        with self._lock:
            self._handlers.pop(request_id, None)

    def add_request(self, input_ids: list[int], request_id: str, max_new_tokens: int, streaming: bool = False,
                    eos_token_id=None, **settings: Any) -> str:
        """Checked here (the same checks as the manager's), then queued in the engine process."""
        if not self.is_running():
            raise EngineError(f"the engine process is not running{self._why()}")
        top_logprobs_of(settings.get("top_logprobs"), request_id)
        Sampling.of({k: v for k, v in settings.items() if k not in ("top_logprobs", "grammar")}, self._greedy,
                    request_id, self.info["vocab_size"])
        prompt = _prompt_list(input_ids, self.info["vocab_size"], request_id)
        grammar = grammar_of(settings.get("grammar"), self.info["vocab_size"], request_id)
        if grammar is not None:  # its text goes over the pipe; its vocabulary once
            settings = {**settings, "grammar": (self._vocab_key(grammar.vocab), grammar.spec, grammar.what)}
        self._send(("add", request_id, prompt, max_new_tokens, streaming, list(eos_token_id or []), settings))
        return request_id

    def _vocab_key(self, vocab) -> int:
        with self._lock:
            if id(vocab) not in self._vocabs:
                self._vocabs[id(vocab)] = (vocab, len(self._vocabs))
                self._send(("vocab", len(self._vocabs) - 1, vocab.tokenizer_json, vocab.size, vocab.eos))
            return self._vocabs[id(vocab)][1]

    def cancel_request(self, request_id: str) -> None:
        if self.is_running():
            self._send(("cancel", request_id))

    def score(self, ids: list[int], top_n: int) -> tuple[list, list]:
        """`engine.score_prompt` in the engine process (blocking: call it in a thread)."""
        if not self.is_running():
            raise EngineError(f"the engine process is not running{self._why()}")
        n = next(self._counter)
        slot = [threading.Event(), None, None]
        with self._lock:
            self._scores[n] = slot
        self._send(("score", n, list(ids), top_n))
        slot[0].wait()
        if slot[2] is not None:
            raise EngineError(f"the engine process could not score the prompt: {slot[2]}")
        return slot[1]

    def stop(self, block: bool = True, hard_stop: bool = True, timeout: float | None = 60.0) -> None:
        """Stop the engine process (its requests fail), and wait for it to exit."""
        if self._proc.is_alive():
            try:
                self._send(("stop",))
            except (OSError, EOFError):
                pass
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        self._running = False

    # ---- internals --------------------------------------------------------------------------------
    def _why(self) -> str:
        return f": {self.fatal_error}" if self.fatal_error else ""

    def _send(self, message) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _read(self) -> None:
        """The reader thread: results to their event loops (one call per loop per message), score
        replies to their callers; at the engine process's end, every request fails."""
        reason = "the engine process exited"
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "results":
                    self._route(message[1])
                elif message[0] == "scored":
                    with self._lock:
                        slot = self._scores.pop(message[1], None)
                    if slot is not None:
                        slot[1], slot[2] = message[2], message[3]
                        slot[0].set()
                elif message[0] == "fatal":
                    reason = f"the engine process failed: {message[1]}"
                    break
        except (EOFError, OSError):
            pass
        self._proc.join(5)
        if self._proc.exitcode not in (None, 0):
            reason += f" (exit code {self._proc.exitcode})"
        self.fatal_error, self._running = reason, False
        with self._lock:
            pending = [(rid, RequestStatus.FAILED, [], [], [], reason) for rid in self._handlers]
            scores, self._scores = list(self._scores.values()), {}
        self._route(pending)
        for slot in scores:
            slot[2] = reason
            slot[0].set()

    def _route(self, deltas: list) -> None:
        by_loop: dict = {}
        with self._lock:
            for delta in deltas:
                entry = self._handlers.get(delta[0])
                if entry is None:
                    continue  # (its caller went away)
                if delta[1] >= RequestStatus.FINISHED:
                    del self._handlers[delta[0]]
                by_loop.setdefault(entry[1], []).append((entry, delta))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_apply, items)
            except RuntimeError:  # the loop was closed: nobody is waiting there
                pass


def _apply(items: list) -> None:
    """On an event loop: each request's delta, as an output, to its callback."""
    for (callback, _), (rid, status, tokens, logprobs, tops, error) in items:
        out = StreamedOutput(rid)
        out.extend(status, tokens, logprobs, tops, error)
        try:
            callback(out)
        except Exception:  # noqa: BLE001 -- one failing handler does not stop the rest
            logger.exception("serve: a result handler failed")


# ---- the engine process ----------------------------------------------------------------------------
class _Sink:
    """Stands for an event loop in the engine process's manager: a step's results for the HTTP
    process come in one `call_soon_threadsafe`, and go to the sender thread."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()

    def call_soon_threadsafe(self, fn, items) -> None:
        self.queue.put([out for _, out in items])


def _sender(conn, lock: threading.Lock, sink: _Sink) -> None:
    """Send results (deltas: each request's tokens since its result before, as the manager hands
    them to handlers registered with `deltas=True`), all that are waiting in one message."""
    while True:
        outs = sink.queue.get()
        if outs is None:
            return
        while not sink.queue.empty():
            more = sink.queue.get()
            if more is None:
                sink.queue.put(None)
                break
            outs += more
        deltas = [(out.request_id, int(out.status), out.generated_tokens, out.logprobs, out.top_logprobs, out.error)
                  for out in outs]
        try:
            with lock:
                conn.send(("results", deltas))
        except (OSError, EOFError):
            return


def _worker_main(conn, loader, setup: dict) -> None:
    """The engine process: build the model and its manager, then serve the pipe until "stop" or
    until the HTTP process goes away."""
    import signal


    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the HTTP process decides when to stop (Ctrl-C reaches both)
    try:  # tqdm's default lock (the loading bars') is a multiprocessing semaphore, which this process would
        import tqdm  # leave registered at its exit: the resource tracker then warns of a leak

        tqdm.tqdm.set_lock(threading.RLock())
    except ImportError:
        pass
    try:
        model = loader()
        manager, info = build_manager(model, **setup)
        if model.device.type == "cuda":
            warm_prefills(model, manager, info["max_model_len"])
        manager.start()
    except BaseException as e:  # noqa: BLE001 -- reported to the HTTP process, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    lock, sink = threading.Lock(), _Sink()
    sender = threading.Thread(target=_sender, args=(conn, lock, sink), name="moetorch-engine-sender", daemon=True)
    sender.start()
    with lock:
        conn.send(("ready", info))

    vocabs: dict = {}
    grammars: dict = {}  # (vocabulary key, grammar text) -> Grammar, the latest used last

    def fail(rid: str, error: str) -> None:
        sink.queue.put([_Failed(rid, error)])

    def score(n: int, ids: list[int], top_n: int) -> None:
        try:
            result, error = score_prompt(model, manager, ids, top_n), None
        except Exception as e:  # noqa: BLE001 -- sent back to the caller
            result, error = None, f"{type(e).__name__}: {e}"
        try:
            with lock:
                conn.send(("scored", n, result, error))
        except (OSError, EOFError):
            pass

    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break  # the HTTP process is gone
            kind = message[0]
            if kind == "add":
                _, rid, ids, max_new, streaming, eos, settings = message
                manager.register_result_handler(rid, None, loop=sink, deltas=True)
                try:
                    if "grammar" in settings:  # compiled once per text (the latest GRAMMAR_CACHE kept)
                        key, spec, what = settings["grammar"]
                        if isinstance(vocabs[key], Exception):  # its vocabulary failed to build
                            raise vocabs[key]
                        settings["grammar"] = cached_grammar(grammars, (key, spec),
                                                             functools.partial(Grammar, vocabs[key], spec, what))
                    manager.add_request(ids, request_id=rid, max_new_tokens=max_new, streaming=streaming,
                                        eos_token_id=eos, **settings)
                except Exception as e:  # noqa: BLE001 -- the request fails; the engine goes on
                    manager.unregister_result_handler(rid)
                    fail(rid, f"{type(e).__name__}: {e}")
            elif kind == "vocab":  # a grammar's vocabulary, before the first request that uses it
                _, key, tokenizer_json, size, eos = message
                try:
                    vocabs[key] = Vocabulary(tokenizer_json, size, eos)
                except Exception as e:  # noqa: BLE001 -- the requests that use it fail with it; the engine goes on
                    vocabs[key] = e
            elif kind == "cancel":
                manager.cancel_request(message[1])
            elif kind == "score":
                threading.Thread(target=score, args=message[1:], daemon=True).start()
            elif kind == "stop":
                break
            if manager.fatal_error is not None:
                raise RuntimeError(f"the batch's loop failed: {manager.fatal_error!r}")
    except BaseException as e:  # noqa: BLE001 -- reported, then the process ends
        # the traceback to the server's log; clients see the exception's type and message
        logger.error("serve: the engine process failed\n%s", traceback.format_exc())
        try:
            with lock:
                conn.send(("fatal", f"{type(e).__name__}: {e}"))
        except (OSError, EOFError):
            pass
    finally:
        if manager.is_running():
            manager.stop(block=True, hard_stop=True)
        sink.queue.put(None)
        sender.join(10)


class _Failed:
    """A failed request's result, as the manager would give it (for a request it refused)."""

    def __init__(self, request_id: str, error: str) -> None:
        self.request_id, self.status, self.error = request_id, RequestStatus.FAILED, error
        self.generated_tokens, self.logprobs, self.top_logprobs = [], [], []
