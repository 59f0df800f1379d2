"""The `moetorch` command line.

    moetorch generate [--model DIR] [--max-new-tokens N] "prompt"
    moetorch info [--model DIR]

Without --model, the embedded default model is used (see moetorch.defaults).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .defaults import RANDOM_MODEL, resolve_model


def _load(model_arg: str | None, device: str, dtype: str):
    from .auto import AutoModelForCausalLM

    path, is_random = resolve_model(model_arg)
    if not path.is_dir():
        raise SystemExit(f"moetorch: --model {model_arg}: no such checkpoint directory")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device)
    return path, model, is_random


def _tokenizer(path: Path):
    from tokenizers import Tokenizer

    file = path / "tokenizer.json"
    if not file.exists():
        raise SystemExit(f"moetorch: {path} has no tokenizer.json")
    return Tokenizer.from_file(str(file))


@torch.no_grad()
def greedy_tokens(model, ids_BT: torch.Tensor, max_new_tokens: int, eos_ids: set[int]):
    """Yield greedy next tokens one at a time, decoding from a preallocated static cache."""
    from .cache import StaticCache

    B, T = ids_BT.shape
    cache = StaticCache(model.config, max_cache_len=T + max_new_tokens)
    logits = model(ids_BT, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    for step in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        token = int(nxt[0, 0])
        yield token
        if token in eos_ids or step == max_new_tokens - 1:
            return
        position = torch.tensor([T + step], device=ids_BT.device)
        logits = model(nxt, past_key_values=cache, cache_position=position, logits_to_keep=1).logits


def cmd_generate(args: argparse.Namespace) -> int:
    path, model, is_random = _load(args.model, args.device, args.dtype)
    tok = _tokenizer(path)
    name = RANDOM_MODEL if is_random else str(path)
    note = " (random weights: the text is noise)" if is_random else ""
    print(f"[moetorch] model {name}{note}, {model.num_parameters() / 1e6:.2f}M parameters on {model.device}",
          file=sys.stderr)
    ids = tok.encode(args.prompt).ids
    if not ids:
        raise SystemExit("moetorch: the prompt encodes to no tokens")
    eos = model.config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    input_ids = torch.tensor([ids], device=model.device)
    print(args.prompt, end="", flush=True)
    out: list[int] = []
    shown = ""
    start = time.perf_counter()
    for token in greedy_tokens(model, input_ids, args.max_new_tokens, eos_ids):
        out.append(token)
        text = tok.decode(out, skip_special_tokens=True)
        print(text[len(shown):], end="", flush=True)
        shown = text
    elapsed = time.perf_counter() - start
    print()
    print(f"[moetorch] {len(out)} tokens in {elapsed:.2f}s ({len(out) / max(elapsed, 1e-9):.1f} tokens/s)",
          file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    path, model, is_random = _load(args.model, args.device, args.dtype)
    cfg = model.config
    print(f"checkpoint: {path}{' (random weights)' if is_random else ''}")
    print(f"model_type: {cfg.model_type}  class: {type(model).__name__}  dtype: {model.dtype}  device: {model.device}")
    print(f"parameters: {model.num_parameters():,}")
    print(f"layers: {cfg.num_hidden_layers}  hidden: {cfg.hidden_size}  experts: {cfg.num_local_experts} "
          f"(top-{cfg.num_experts_per_tok})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moetorch", description="Run PhiMoE and JetMoE models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None, help=f"checkpoint directory (default: embedded {RANDOM_MODEL})")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
        p.add_argument("--dtype", default="auto", help="auto (checkpoint dtype), bfloat16, float16 or float32")

    gen = sub.add_parser("generate", help="greedy-decode a continuation of a prompt, streamed")
    common(gen)
    gen.add_argument("prompt", help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="print a checkpoint's architecture and size")
    common(info)
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_new_tokens", 1) < 1:
        raise SystemExit("moetorch: --max-new-tokens must be at least 1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
