"""The `moetorch` command line.

    moetorch generate [--model DIR] [--max-new-tokens N] [--temperature T] "prompt"
    moetorch chat [--model DIR] [--system TEXT]
    moetorch info [--model DIR]
    moetorch serve [--model DIR] [--host H] [--port P] [--max-model-len N] [--api-key KEY]   (OpenAI-compatible)
    moetorch bench [--models jetmoe,phimoe] [--batches 1,16,64] [--out FILE]   (CUDA GPU)

Without --model, the embedded default model is used (see moetorch.defaults).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path

import jinja2
import torch

from .checkpoint import CheckpointError
from .defaults import DEFAULT_MODEL, EMBEDDED, RANDOM_MODEL, resolve_model
from .ops.moe import triton_available
from .utils import handling_signals


# ---- flag values (argparse types: a bad one is a usage error naming the flag, before anything loads) ----
def int_at_least(low: int, what: str = ""):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}{what}, got {value}")
        return value

    return parse


def _port(text: str) -> int:
    value = int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0 (any free port) to 65535, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _dtype(text: str) -> str:
    from .modeling_utils import _DTYPES

    if text != "auto" and text.removeprefix("torch.") not in _DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dtype: auto, bfloat16, float16 or float32")
    return text


def _number(text: str, kind=float):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def _temperature(text: str) -> float:
    value = _number(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a temperature: 0 (greedy) or a finite number > 0")
    return value


def _top_p(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability in (0, 1]")
    return value


def _top_k(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count of tokens >= 0 (0: no top-k)")
    return value


def _seed(text: str) -> int:
    value = int_at_least(-(2**63))(text)
    if value >= 2**64:
        raise argparse.ArgumentTypeError(f"must be below 2**64 (torch.manual_seed's range), got {value}")
    return value


def _utf8(text: str, what: str) -> str:
    """Text from argv or stdin, which Python decodes with surrogateescape: bytes that are not UTF-8
    become lone surrogates, which no tokenizer takes. An error names them and where they are."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start:e.end].encode("utf-8", "surrogateescape")
        raise ValueError(f"{what} is not valid UTF-8 (bytes {bad!r} at character {e.start})") from None
    return text


def _device(text: str) -> str:
    from .placement import STRATEGIES, as_device

    if text in STRATEGIES:
        return text
    try:
        device = as_device(text, "--device")
    except ValueError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: cpu, cuda, cuda:N, or a placement: "
                                         f"{', '.join(STRATEGIES)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here")
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: there is no such GPU ({torch.cuda.device_count()} here)")
    return text


def _max_memory(text: str) -> dict:
    """`--max-memory 0=70GiB,cpu=200GiB`: from_pretrained's max_memory (GPU index or cpu = size)."""
    from .checkpoint import parse_size

    out: dict = {}
    for item in text.split(","):
        key, eq, size = item.strip().partition("=")
        key = key.strip()
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"{item!r} is not DEVICE=SIZE (like 0=70GiB,cpu=200GiB)")
        if not (key.isdigit() or key == "cpu"):
            raise argparse.ArgumentTypeError(f"{key!r} is not a GPU index or cpu (like 0=70GiB,cpu=200GiB)")
        try:
            if size.strip() != "0":  # 0: nothing on that device
                parse_size(size.strip(), f"{key}'s size")
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        device = int(key) if key.isdigit() else key
        if device in out:
            raise argparse.ArgumentTypeError(f"{key!r} is given twice")
        out[device] = 0 if size.strip() == "0" else size.strip()
    return out


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def _check_address(host: str, port: int) -> None:
    """Bind (host, port) as the server will (every address `host` resolves to), then let go: an
    address in use, or a host that is not this machine's, is an error before the model loads."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SystemExit(f"moetorch serve: --host {host}: {e.strerror}") from None
    for family, kind, proto, _, address in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                raise SystemExit(f"moetorch serve: cannot listen at --host {host} --port {port}: "
                                 f"{e.strerror or e}") from None


def _resolve(model_arg: str | None) -> tuple[Path, bool]:
    try:
        path, is_random = resolve_model(model_arg)
    except FileNotFoundError as e:
        raise SystemExit(f"moetorch: --model {model_arg}: {e}") from None
    if not path.is_dir():
        raise SystemExit(f"moetorch: --model {model_arg}: no such checkpoint directory")
    return path, is_random


def _load(model_arg: str | None, device: str, dtype: str, max_memory: dict | None = None):
    path, is_random = _resolve(model_arg)
    return path, _from_pretrained(path, device, dtype, max_memory), is_random


def _from_pretrained(path: Path, device: str, dtype: str, max_memory: dict | None = None):
    from .serve.worker import load_pretrained

    try:
        return load_pretrained(str(path), device, dtype, max_memory)
    except (ValueError, torch.OutOfMemoryError) as e:  # a bad --device or --dtype, or no room: no traceback
        raise SystemExit(f"moetorch: {e}") from None
    except (FileNotFoundError, CheckpointError) as e:  # not a checkpoint, or a broken one
        raise SystemExit(f"moetorch: --model {path}: {e}") from None


def _load_for_engine(path: str, device: str, dtype: str, is_random: bool, max_memory: dict | None = None):
    """`moetorch serve --engine-process`'s loader, run in the engine process."""
    from .serve.worker import load_pretrained

    model = load_pretrained(path, device, dtype, max_memory)
    _banner(Path(path), model, is_random)
    return model


def _tokenizer(path: Path):
    from .tokenizer import Tokenizer

    if not (path / "tokenizer.json").exists():
        raise SystemExit(f"moetorch: {path} has no tokenizer.json")
    try:
        return Tokenizer.from_pretrained(path)
    except (ValueError, OSError) as e:  # a broken tokenizer.json or tokenizer_config.json (each names its file)
        raise SystemExit(f"moetorch: {e}") from None


def _sampling_kwargs(args: argparse.Namespace, tok) -> dict:
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if tok.pad_token_id is not None:
        kwargs["pad_token_id"] = tok.pad_token_id
    return kwargs


def _grammar(args: argparse.Namespace, tok, model):
    """The Grammar that --json, --json-schema or --regex asks for, or None."""
    asked = [(flag, value) for flag, value in (("--json", args.json or None), ("--json-schema", args.json_schema),
                                                 ("--regex", args.regex)) if value is not None]
    if not asked:
        return None
    if len(asked) > 1:
        raise SystemExit(f"moetorch: {' and '.join(f for f, _ in asked)} both set what the output is: pass one")
    from .generation.grammar import Grammar

    flag, value = asked[0]
    width = model.config.vocab_size
    try:
        if flag == "--regex":
            return Grammar.regex(tok, value, vocab_size=width)
        if flag == "--json-schema":
            text = Path(value[1:]).read_text() if value.startswith("@") else value
            return Grammar.json(tok, text, vocab_size=width)
        return Grammar.json(tok, vocab_size=width)
    except (ImportError, ValueError, OSError) as e:
        raise SystemExit(f"moetorch: {flag}: {e}") from None


def _hold_to(kwargs: dict, grammar, eos: list[int] | None) -> dict:
    """`generate`'s keyword arguments with the output held to `grammar` (None: as they are)."""
    if grammar is None:
        return kwargs
    from .generation.grammar import GrammarLogitsProcessor

    return {**kwargs, "logits_processor": [GrammarLogitsProcessor(grammar, eos)]}


def _banner(path: Path, model, is_random: bool) -> None:
    name = RANDOM_MODEL if is_random else (path.name if path.name in EMBEDDED else str(path))
    note = " (random weights: the text is noise)" if is_random else ""
    where = ", ".join(map(str, model.parameter_devices()))
    print(f"[moetorch] model {name}{note}, {model.num_parameters() / 1e6:.2f}M parameters on {where}{_held(model)}",
          file=sys.stderr)


def _placement(device_map: dict) -> str:
    """`hf_device_map` as runs of modules a device, numbered modules as ranges: "model.embed_tokens,
    model.layers.0-28 on 0; model.layers.29-31, model.norm, lm_head on cpu"."""
    runs: list[tuple[object, list[tuple[str, int | None, int | None]]]] = []  # device, [(name, first, last)]
    for name, device in device_map.items():
        if not runs or runs[-1][0] != device:
            runs.append((device, []))
        names = runs[-1][1]
        head, _, index = name.rpartition(".")
        if not index.isdigit():
            names.append((name, None, None))
        elif names and names[-1][0] == head and names[-1][2] == int(index) - 1:
            names[-1] = (head, names[-1][1], int(index))
        else:
            names.append((head, int(index), int(index)))

    def show(name: str, first: int | None, last: int | None) -> str:
        return name if first is None else f"{name}.{first}" + (f"-{last}" if last != first else "")

    return "; ".join(f"{', '.join(show(*n) for n in names)} on {device}" for device, names in runs)


def _held(model) -> str:
    """The banner's note on expert weights a GPU reads from host memory (placed on the CPU by
    --device/--max-memory), or ""."""
    from .ops.host import held_bytes

    layers = held_bytes(model)
    if not layers:
        return ""
    return f" (the experts of {len(layers)} layers, {sum(layers) / 2**30:.2f} GiB, in host memory: read over the bus)"


class _Stopped(Exception):
    """Raised out of `generate` by the CLI's streamer after a Ctrl-C."""


@torch.no_grad()
def _stream(model, tok, input_ids: torch.Tensor, kwargs: dict) -> tuple[str, int, float, bool]:
    """Generate after `input_ids`, printing text as it arrives; returns (text shown, tokens,
    seconds, whether Ctrl-C stopped it). A stopped reply ends at the tokens already shown."""
    from .generation import TextStreamer

    stop, shown, tokens = [False], [], [0]

    def ctrl_c(signum, frame):  # the first ends the reply at its next tokens, a second at once
        if stop[0]:
            raise KeyboardInterrupt
        stop[0] = True

    class Streamer(TextStreamer):
        def put(self, value):
            if not self.next_tokens_are_prompt:
                if stop[0]:
                    self.end()  # show the text held back for a word's end
                    raise _Stopped
                tokens[0] += value.numel()
            super().put(value)

        def on_finalized_text(self, text, stream_end=False):
            shown.append(text)
            super().on_finalized_text(text, stream_end)

    streamer = Streamer(tok, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    try:
        with handling_signals(ctrl_c, signal.SIGINT):
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **kwargs)
    except _Stopped:
        return "".join(shown), tokens[0], time.perf_counter() - start, True
    elapsed = time.perf_counter() - start
    new = out[0, input_ids.shape[1]:]
    return tok.decode(new, skip_special_tokens=True), int(new.numel()), elapsed, False


def cmd_generate(args: argparse.Namespace) -> int:
    path, model, is_random = _load(args.model, args.device, args.dtype, args.max_memory)
    tok = _tokenizer(path)
    _banner(path, model, is_random)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    try:
        ids = tok(_utf8(args.prompt, "the prompt"))["input_ids"]
    except ValueError as e:
        raise SystemExit(f"moetorch: {e}") from None
    if not ids:
        raise SystemExit("moetorch: the prompt encodes to no tokens")
    from .generation.utils import eos_ids

    eos = eos_ids(model.generation_config.eos_token_id) or None
    kwargs = _hold_to(_sampling_kwargs(args, tok), _grammar(args, tok, model), eos)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and len(ids) > limit:
        raise SystemExit(f"moetorch: the prompt has {len(ids)} tokens, more than the model's {limit}-token "
                         "context (max_position_embeddings)")
    print(args.prompt, end="", flush=True)
    _, n, elapsed, stopped = _stream(model, tok, torch.tensor([ids], device=model.device), kwargs)
    if stopped:
        print(f"\n[moetorch] stopped (Ctrl-C) after {n} tokens in {elapsed:.2f}s", file=sys.stderr)
        return 130
    print(f"[moetorch] {n} tokens in {elapsed:.2f}s ({n / max(elapsed, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0


def _fit(tok, system: list[dict], history: list[dict], model, max_new_tokens: int):
    """The chat's prompt, the oldest turns dropped (with a notice) until it leaves the reply room in
    the model's context (`max_position_embeddings`; at least the prompt fits); None (said) when the
    last message alone does not fit."""
    limit = getattr(model.config, "max_position_embeddings", None)
    room = None if limit is None else limit - min(max_new_tokens, limit // 2)
    dropped = 0
    kept = list(history)  # (history loses its oldest turns only once a prompt is made)
    while True:
        try:
            enc = tok.apply_chat_template(system + kept, add_generation_prompt=True, return_tensors="pt")
        except (jinja2.TemplateError, ValueError, TypeError) as e:  # the template's raise_exception, say
            print(f"[moetorch] the chat template refused this conversation ({e}); the message was not sent",
                  file=sys.stderr)
            return None
        n = enc["input_ids"].shape[1]
        if room is None or n <= room or len(kept) == 1:
            break
        del kept[:2]  # the oldest exchange (a user turn and its reply)
        dropped += 2
    if limit is not None and n > limit:
        print(f"[moetorch] that message makes a {n}-token prompt, more than the model's {limit}-token context; "
              "it was not sent", file=sys.stderr)
        return None
    if dropped:
        print(f"[moetorch] the conversation outgrew the model's {limit}-token context: the {dropped} oldest "
              "turns were dropped", file=sys.stderr)
    history[:] = kept
    return enc


def cmd_chat(args: argparse.Namespace) -> int:
    path, model, is_random = _load(args.model, args.device, args.dtype, args.max_memory)
    tok = _tokenizer(path)
    if tok.chat_template is None:
        raise SystemExit(f"moetorch: {path} has no chat template (tokenizer_config.json 'chat_template')")
    from .chat_template import compile_template

    try:  # a template that does not compile is named now, not at the first message
        compile_template(tok.get_chat_template())
    except ValueError as e:
        raise SystemExit(f"moetorch: {path}: {e}") from None
    _banner(path, model, is_random)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print("[moetorch] chat: type a message; /reset clears the history, /exit or Ctrl-D quits; Ctrl-C stops a "
              "reply", file=sys.stderr)
    try:
        system = [{"role": "system", "content": _utf8(args.system, "--system")}] if args.system else []
    except ValueError as e:
        raise SystemExit(f"moetorch: {e}") from None
    history: list[dict] = []
    kwargs = _sampling_kwargs(args, tok)
    from .generation.utils import chat_eos_ids, eos_ids

    # a turn ends at <|end|> as well as at the model's eos
    kwargs["eos_token_id"] = chat_eos_ids(eos_ids(model.generation_config.eos_token_id), tok) or None
    grammar = _grammar(args, tok, model)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        try:
            _utf8(line, "that message")
        except ValueError as e:
            print(f"[moetorch] {e}; it was not sent", file=sys.stderr)
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history.clear()
            print("[moetorch] history cleared", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        enc = _fit(tok, system, history, model, args.max_new_tokens)
        if enc is None:
            history.pop()
            continue
        print("assistant> ", end="", flush=True)
        # (a grammar's processor follows one call: a new one each turn)
        reply, _, _, stopped = _stream(model, tok, enc["input_ids"].to(model.device),
                                       _hold_to(kwargs, grammar, kwargs["eos_token_id"]))
        if stopped:  # the history keeps the part of the reply that was shown (none: the turn is dropped)
            print("\n[moetorch] reply stopped (Ctrl-C); Ctrl-C at the prompt quits", file=sys.stderr)
            if not reply:
                history.pop()
                continue
        history.append({"role": "assistant", "content": reply})
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .serve import Engine, create_app
        from .serve.app import create_app as _  # noqa: F401 -- fastapi present
    except ImportError as e:
        raise SystemExit(f"moetorch serve needs fastapi and uvicorn ({e}): pip install 'moetorch[serve]'") from None
    sizes = dict(max_model_len=args.max_model_len, max_batch=args.max_batch, max_batch_tokens=args.max_batch_tokens,
                 prefix_sharing=args.prefix_sharing, prefill_chunk_tokens=args.prefill_chunk_tokens,
                 paged=args.paged_cache)
    _check_address(args.host, args.port)
    path, is_random = _resolve(args.model)
    tok = _tokenizer(path)
    name = args.served_model_name or args.model or (RANDOM_MODEL if is_random else path.name)
    try:  # a bad --dtype (in an engine process), a --max-model-len past the model's, no room for a row
        if args.engine_process:
            import functools

            print("[moetorch] starting the engine process", file=sys.stderr)
            loader = functools.partial(_load_for_engine, str(path), args.device, args.dtype, is_random,
                                       args.max_memory)
            engine = Engine.spawn(loader, tok, name, **sizes)
        else:
            model = _from_pretrained(path, args.device, args.dtype, args.max_memory)
            _banner(path, model, is_random)
            engine = Engine(model, tok, name, **sizes)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"moetorch serve: {e}") from None
    if args.switch_interval > 0:
        sys.setswitchinterval(args.switch_interval)
    app = create_app(engine, api_key=args.api_key)
    # --port 0: the socket is bound here, so that the banner names the port the system chose (uvicorn
    # says it only at --log-level info)
    sock = _any_port(args.host) if args.port == 0 else None
    port = sock.getsockname()[1] if sock else args.port
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"[moetorch] serving {name!r} at http://{host}:{port}/v1 ({engine.manager.rows} rows of "
          f"{engine.max_model_len} tokens)", file=sys.stderr, flush=True)
    if sock is None:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
        return 0
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=0, log_level=args.log_level))
    with sock, contextlib.suppress(KeyboardInterrupt):  # (uvicorn re-raises the Ctrl-C it shut down on,
        # which uvicorn.run swallows)
        server.run(sockets=[sock])
    return 0 if server.started else 3  # (uvicorn.run's status for a server that failed to start)


def _any_port(host: str) -> socket.socket:
    """A socket bound to a free port of `host`, as uvicorn binds one (IPv6 for an address with a
    colon, else IPv4)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, 0))
    except OSError as e:
        sock.close()
        raise SystemExit(f"moetorch serve: cannot listen at --host {host}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def cmd_info(args: argparse.Namespace) -> int:
    path, model, is_random = _load(args.model, args.device, args.dtype, args.max_memory)
    cfg = model.config
    print(f"checkpoint: {path}{' (random weights)' if is_random else ''}")
    print(f"model_type: {cfg.model_type}  class: {type(model).__name__}  dtype: {model.dtype}  device: {model.device}")
    print(f"parameters: {model.num_parameters():,}")
    print(f"layers: {cfg.num_hidden_layers}  hidden: {cfg.hidden_size}  experts: {cfg.num_local_experts} "
          f"(top-{cfg.num_experts_per_tok})")
    if len(set(getattr(model, "hf_device_map", {}).values())) > 1:
        print(f"placement: {_placement(model.hf_device_map)}{_held(model)}")
    if model.device.type == "cuda":
        if triton_available():
            from .ops.triton_moe import config_file

            configs = config_file(model.device.index)
            print(f"expert kernels: triton, block sizes from {configs or 'untuned defaults (no file for this GPU)'}")
        else:
            print("expert kernels: torch code (triton is not installed: no fused kernels)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moetorch", description="Run PhiMoE and JetMoE models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None, help=f"checkpoint directory, Hub name or embedded model name: "
                       f"{', '.join([*EMBEDDED, RANDOM_MODEL])} (default: {DEFAULT_MODEL})")
        p.add_argument("--device", default="auto", type=_device, help="cpu, cuda, cuda:N, or how to place the layers: "
                       "auto (default: one GPU when the model fits, else spread over the GPUs and the CPU), balanced, "
                       "balanced_low_0 or sequential")
        p.add_argument("--dtype", default="auto", type=_dtype,
                       help="auto (checkpoint dtype), bfloat16, float16 or float32")
        p.add_argument("--max-memory", default=None, type=_max_memory, metavar="DEVICE=SIZE,...",
                       help="what each device may hold under a --device placement, like 0=70GiB,cpu=200GiB: "
                            "layers past a GPU's share go to the CPU, and run on the GPU with their experts read "
                            "from host memory (default: 90%% of each GPU's free memory)")

    def sampling(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
        p.add_argument("--max-new-tokens", type=int_at_least(1), default=max_new_tokens,
                       help=f"the most tokens a reply gets ({max_new_tokens})")
        p.add_argument("--temperature", type=_temperature, default=0.0, help="0 (default): greedy; > 0: sample")
        p.add_argument("--top-p", type=_top_p, default=1.0, help="sampling: nucleus probability in (0, 1] (1.0)")
        p.add_argument("--top-k", type=_top_k, default=50, help="sampling: the k likeliest tokens (50; 0: all)")
        p.add_argument("--seed", type=_seed, default=None,
                       help="seed the sampling (torch.manual_seed), for a reproducible reply")
        p.add_argument("--json", action="store_true", help="hold the output to a JSON object (needs llguidance)")
        p.add_argument("--json-schema", default=None, metavar="SCHEMA",
                       help="hold the output to JSON that this JSON Schema describes (its text, or @file)")
        p.add_argument("--regex", default=None, help="hold the output to text this regular expression matches")

    gen = sub.add_parser("generate", help="continue a prompt, streaming the text")
    common(gen)
    gen.add_argument("prompt", help="the text to continue")
    sampling(gen, 64)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with the model's chat template; keeps history")
    common(chat)
    chat.add_argument("--system", default=None, help="a system message")
    sampling(chat, 256)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    common(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0: any free port)")
    serve.add_argument("--served-model-name", default=None, help="the name clients pass as 'model' (default: the "
                       "--model argument)")
    serve.add_argument("--max-model-len", type=int_at_least(2, " (a prompt token and a completion token)"),
                       default=None, help="the most tokens of prompt + completion a "
                       "request may have: each of the batch's rows holds that many (default: 4096, within the "
                       "model's max_position_embeddings)")
    serve.add_argument("--max-batch", type=int_at_least(1), default=None, help="requests decoding at once (default: "
                       "256 on a GPU, as many as its free memory holds with --no-paged-cache; 64 on the CPU)")
    serve.add_argument("--max-batch-tokens", type=int_at_least(1), default=None,
                       help="prompt tokens of one prefill (16384)")
    serve.add_argument("--prefill-chunk-tokens", type=int_at_least(0), default=None, help="while requests decode, the "
                       "most prompt tokens one prefill computes; a longer prompt runs in chunks, a decode step between "
                       "them (2048; 0: whole prompts)")
    serve.add_argument("--prefix-sharing", action=argparse.BooleanOptionalAction, default=True,
                       help="a prompt that starts with tokens a batch row holds (another request's prompt, a finished "
                       "request's prompt and reply) copies their keys and values instead of computing them (default; "
                       "--no-prefix-sharing: every prompt computed whole)")
    serve.add_argument("--paged-cache", action=argparse.BooleanOptionalAction, default=None,
                       help="memory for the slots each running request uses, not whole rows of --max-model-len "
                       "slots, so that rows are bound by requests and pages rather than memory (default: on a GPU "
                       "where the free memory would hold fewer than --max-batch whole rows; --no-paged-cache: "
                       "rows of whole slots)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    serve.add_argument("--switch-interval", type=_seconds, default=0.0005, help="seconds between the Python threads' "
                       "turns at the interpreter lock (sys.setswitchinterval; Python's default is 0.005): the batch's "
                       "loop waits at most this long for the HTTP thread")
    serve.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                       help="run the model and its batch in a process of their own, apart from the HTTP server's, so "
                       "that they share no interpreter lock (default; --no-engine-process: one process)")
    serve.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS, help="uvicorn's log level")
    serve.set_defaults(func=cmd_serve)

    info = sub.add_parser("info", help="print a checkpoint's architecture and size")
    common(info)
    info.set_defaults(func=cmd_info)

    from .train.cli import add_train_commands  # train, train-tokenizer: defined in moetorch/train/cli.py

    add_train_commands(sub)
    # Listed for --help only: main() hands `bench` to moetorch/benchmark.py, which parses its arguments.
    sub.add_parser("bench", add_help=False,
                   help="moetorch against Transformers on a CUDA GPU: decode, prefill, MoE layers, floors "
                        "(moetorch bench --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["bench"]:  # its own argument parser: see moetorch/benchmark.py
            from .benchmark import main as bench_main

            return bench_main(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "max_memory", None) is not None:
            from .placement import STRATEGIES

            if args.device not in STRATEGIES:
                parser.error(f"--max-memory applies to a placement (--device {' / '.join(STRATEGIES)}), not to "
                             f"--device {args.device}")
        return args.func(args)
    except KeyboardInterrupt:  # loading a model, a chat's prompt, a second Ctrl-C: no traceback
        print("\n[moetorch] interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a pipe's writer does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (so that the interpreter's final flush fails no more)
        return 141


if __name__ == "__main__":
    sys.exit(main())
