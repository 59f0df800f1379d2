"""The OpenAI-compatible server under load: throughput and latency of `/v1/completions` over HTTP,
against the same workload through `generate_batch` in the server's own process (no HTTP).

    PYTHONPATH=.:bench python bench/serve.py --out r.json [--models jetmoe,phimoe] [--requests 256]
        [--concurrency 1,32,256]

Per model, a server process (`--serve`): random weights at the real size in bf16, and a word-level
tokenizer with one word per id of the model's vocabulary (so any generated id decodes). It first
runs the workload through `generate_batch` twice and times the second (the baseline), then serves
with uvicorn, as `moetorch serve` does.

The workload: `--requests` prompts of random token ids (lengths uniform in `--prompt`, 32:512),
each asking for `--new` (128) tokens, greedy, `ignore_eos`. Clients (asyncio + httpx, streaming
completions) keep `C` requests in flight for each `--concurrency` C until all are done (at C = 1,
`--single` requests). Measured: generated tokens over wall time, time to first token (the first
streamed text) and the time between a request's later chunks; last, the largest concurrency again
without streaming. Each round follows a short warm-up round of the same concurrency.
`--client-processes N` splits each load over N client processes. `--engine-processes 0,1` runs a
server with the engine in the server's process and one with the
engine in a process of its own (`moetorch serve --engine-process`; its baseline is the first's).
`--sampling greedy,sampled` runs every load again with each request sampled (temperature 0.8,
top-p 0.95, as chat clients send them).
`--switch-intervals 0,0.0005` runs a server per value of `sys.setswitchinterval` (the GIL's hand-over
interval: the batch's loop thread waits up to that long for the GIL held by the event loop).

Check on the same run: the embedded tiny-phimoe (float32) served on the GPU gives, for a few
prompts, the text of Transformers' greedy `generate` with the same weights, with the engine in the
server's process and in one of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time

from moetorch.benchmark import SIZES, log

# --smoke: the whole run on the CPU with small models, to check the script itself
SMOKE = {"jetmoe": dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_key_value_heads=2, kv_channels=16, num_local_experts=4, max_position_embeddings=1024),
         "phimoe": dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                        max_position_embeddings=1024)}


def sizes(args) -> dict:
    return SMOKE if args.smoke else SIZES


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def workload(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def word_tokenizer(vocab: int):
    """A tokenizer whose word `<i>` is id i, for every id of the model's vocabulary."""
    from tokenizers import Tokenizer as Rust
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    from moetorch.tokenizer import Tokenizer

    rust = Rust(WordLevel({f"<{i}>": i for i in range(vocab)}, unk_token="<0>"))
    rust.pre_tokenizer = WhitespaceSplit()
    return Tokenizer(rust, eos_token="<1>", pad_token="<0>", unk_token="<0>")


# ---- the server process ------------------------------------------------------------------------
def engine_sizes(args) -> dict:
    """The server's row length and cache mode from the arguments."""
    paged = {"on": True, "off": False, "": None}[args.paged]
    return {"max_model_len": args.max_model_len or args.prompt[1] + args.new, "paged": paged}


def serve(args) -> int:
    import torch
    import uvicorn

    from moetorch.benchmark import build
    from moetorch.serve import Engine, create_app

    name = args.serve
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    cfg = sizes(args)[name]
    log(f"{name}: building" + (" in the engine process" if args.engine_process else ""))
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    tok = word_tokenizer(cfg["vocab_size"])
    if args.engine_process:  # the model in a process of its own; no baseline here (no model in this process)
        import functools

        engine = Engine.spawn(functools.partial(build, name, "moetorch", cfg, device=device, dtype=dtype), tok, name,
                              **engine_sizes(args))
        with open(args.baseline_out, "w") as f:
            json.dump({}, f)
        uvicorn.run(create_app(engine), host="127.0.0.1", port=args.port, log_level="warning")
        return 0
    model = build(name, "moetorch", cfg, device=device, dtype=dtype)
    prompts = workload(args.requests, *args.prompt, cfg["vocab_size"])
    engine = Engine(model, tok, name, **engine_sizes(args))
    # the baseline: the same requests through generate_batch, as many rows as the server has
    import moetorch

    gen = moetorch.GenerationConfig(max_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=0)
    cb = {"max_requests_per_batch": engine.manager.rows, "max_cache_len": engine.max_model_len,
          "paged": engine.manager.paged}
    base = {}
    for run in range(2 if args.baseline else 0):
        sync()
        t0 = time.perf_counter()
        out = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb)
        sync()
        seconds = time.perf_counter() - t0
        tokens = sum(len(r.generated_tokens) for r in out.values())
        base = {"requests": len(prompts), "seconds": seconds, "generated_tokens": tokens,
                "tokens_per_s": tokens / seconds, "rows": engine.manager.rows}
        log(f"{name}: generate_batch run {run}: {tokens} tokens in {seconds:.2f} s: {tokens / seconds:.0f} tok/s")
        del out
    if not args.smoke:  # the baseline's cache back to the GPU, whole, before the server allocates its own
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    with open(args.baseline_out, "w") as f:
        json.dump(base, f)
    uvicorn.run(create_app(engine), host="127.0.0.1", port=args.port, log_level="warning")
    return 0


# ---- the clients ---------------------------------------------------------------------------------
# a sampled request's settings (`--sampling sampled`), as a chat client sends them
SAMPLED = {"temperature": 0.8, "top_p": 0.95}


async def one(client, url: str, prompt: list[int], new: int, stream: bool = True, sampled: bool = False) -> dict:
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    body = {"prompt": prompt, "max_tokens": new, "ignore_eos": True, "stream": stream,
            **(SAMPLED if sampled else {"temperature": 0})}
    if not stream:
        r = await client.post(f"{url}/v1/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
        return {"ttft": None, "gaps": [], "tokens": r.json()["usage"]["completion_tokens"],
                "seconds": time.perf_counter() - t0}
    body["stream_options"] = {"include_usage": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": stamps[0] - t0 if stamps else None, "gaps": gaps, "tokens": tokens,
            "seconds": time.perf_counter() - t0}


async def load(url: str, prompts: list[list[int]], new: int, concurrency: int, stream: bool = True,
               sampled: bool = False) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    results = []
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        todo = list(prompts)

        async def worker():
            while todo:
                results.append(await one(client, url, todo.pop(0), new, stream, sampled))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    gaps = sorted(g for r in results for g in r["gaps"])

    def q(xs, p):
        return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None

    return {"concurrency": concurrency, "stream": stream, "sampled": sampled, "requests": len(prompts), "seconds": wall,
            "generated_tokens": tokens,
            "tokens_per_s": tokens / wall, "ttft_s": {"p50": q(ttft, 0.5), "p90": q(ttft, 0.9), "max": q(ttft, 1.0)},
            "inter_chunk_s": {"p50": q(gaps, 0.5), "p90": q(gaps, 0.9),
                              "mean": statistics.fmean(gaps) if gaps else None},
            "single_stream_tokens_per_s": statistics.fmean(r["tokens"] / r["seconds"] for r in results)}


def _load_part(job: tuple) -> dict:
    return asyncio.run(load(*job))


def load_split(pool, url: str, prompts: list[list[int]], new: int, concurrency: int, stream: bool,
               sampled: bool = False) -> dict:
    """`load` from the pool's client processes at once, each with its share of the prompts and of
    the concurrency: tokens over the longest part's wall time (no pool: `load` here)."""
    n = pool._processes if pool is not None and concurrency >= pool._processes else 1
    if n == 1:
        return asyncio.run(load(url, prompts, new, concurrency, stream, sampled))
    rows = pool.map(_load_part, [(url, prompts[i::n], new, concurrency // n, stream, sampled) for i in range(n)])
    wall = max(r["seconds"] for r in rows)
    tokens = sum(r["generated_tokens"] for r in rows)
    return {"concurrency": concurrency, "stream": stream, "sampled": sampled, "requests": len(prompts), "seconds": wall,
            "generated_tokens": tokens, "tokens_per_s": tokens / wall, "client_processes": n,
            "parts": [{k: r[k] for k in ("seconds", "generated_tokens", "tokens_per_s", "ttft_s", "inter_chunk_s")}
                      for r in rows],
            "ttft_s": {"p50": _median_of(r["ttft_s"]["p50"] for r in rows)} if stream else None,
            "inter_chunk_s": {"p50": _median_of(r["inter_chunk_s"]["p50"] for r in rows)} if stream else None}


def _median_of(values) -> float | None:
    """The median of the parts' values that exist (a part whose every request came in one chunk has no gaps)."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def wait_ready(url: str, proc, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("the server did not come up")


def bench_model(name: str, args, switch_interval: float | None, baseline: bool, engine_process: bool = False) -> dict:
    port = {"jetmoe": 8101, "phimoe": 8102}[name]
    url = f"http://127.0.0.1:{port}"
    base_file = f"/tmp/serve-baseline-{name}.json"
    cmd = [sys.executable, __file__, "--serve", name, "--port", str(port), "--baseline-out", base_file,
           "--requests", str(args.requests), "--prompt", f"{args.prompt[0]}:{args.prompt[1]}", "--new", str(args.new),
           *(["--smoke"] if args.smoke else []), *(["--baseline"] if baseline else []),
           *(["--switch-interval", str(switch_interval)] if switch_interval else []),
           *(["--engine-process"] if engine_process else []),
           "--max-model-len", str(args.max_model_len), "--paged", args.paged]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_ready(url, proc, 900)
        out = {"switch_interval_s": switch_interval or 0.005, "engine_process": engine_process, "server": []}
        if baseline:
            with open(base_file) as f:
                out["generate_batch"] = json.load(f)
        prompts = workload(args.requests, *args.prompt, sizes(args)[name]["vocab_size"])
        runs = [(c, True, arm == "sampled") for arm in args.sampling for c in args.concurrency] + \
            [(max(args.concurrency), False, arm == "sampled") for arm in args.sampling]
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(args.client_processes) if args.client_processes > 1 else None
        for c, stream, sampled in runs:
            ps = prompts[:args.single] if c == 1 else prompts
            load_split(pool, url, ps[-min(len(ps), c):], 16, c, stream, sampled)  # the same shapes, warm
            row = load_split(pool, url, ps, args.new, c, stream, sampled)
            out["server"].append(row)
            gap = row["inter_chunk_s"]["p50"] if stream else None
            lat = (f", TTFT p50 {row['ttft_s']['p50'] * 1e3:.0f} ms, chunk gap p50 "
                   + (f"{gap * 1e3:.1f} ms" if gap is not None else "none (one chunk a request)")) \
                if stream else " (not streamed)"
            log(f"{name} ({'engine process, ' if engine_process else ''}switch interval "
                f"{out['switch_interval_s']}{', sampled' if sampled else ''}): concurrency {c}: "
                f"{row['generated_tokens']} "
                f"tokens in {row['seconds']:.2f} s: {row['tokens_per_s']:.0f} tok/s{lat}")
        if pool is not None:
            pool.close()
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def tiny_check() -> dict:
    """The embedded tiny-phimoe, float32, served on the GPU: each prompt's greedy text against
    Transformers' greedy generate with the same weights."""
    import torch
    import transformers
    from fastapi.testclient import TestClient

    import moetorch
    from moetorch.defaults import ASSETS
    from moetorch.serve import Engine, create_app

    model = moetorch.AutoModelForCausalLM.from_pretrained("tiny-phimoe", dtype=torch.float32, device_map="cuda")
    tok = moetorch.AutoTokenizer.from_pretrained("tiny-phimoe")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(ASSETS / "tiny-phimoe"), dtype=torch.float32).cuda()
    prompts = ["def fibonacci(n):", "import os\nimport", "class Parser:\n    def", "# Copyright", "for i in range("]
    import functools

    from moetorch.serve.worker import load_pretrained

    out = {"prompts": len(prompts)}
    for key, engine in (("equal_texts", Engine(model, tok, "tiny", max_model_len=128, max_batch=4)),
                        ("equal_texts_engine_process", Engine.spawn(functools.partial(
                            load_pretrained, "tiny-phimoe", "cuda", "float32"), tok, "tiny", max_model_len=128,
                            max_batch=4))):
        same = 0
        with TestClient(create_app(engine)) as client:
            r = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 40, "temperature": 0}).json()
            for p, choice in zip(prompts, r["choices"]):
                ids = tok.encode(p)
                # (the pad id is the tokenizer's: Transformers reads a prompt's pad ids as padding)
                want = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=40, do_sample=False,
                                   eos_token_id=engine.eos, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
                ended = [i for i, t in enumerate(want) if t in engine.eos]
                want = want[:ended[0] + 1] if ended else want
                text = tok.decode(want, skip_special_tokens=True)
                same += choice["text"] == text
                if choice["text"] != text:
                    log(f"tiny check differs for {p!r}: served {choice['text']!r}, Transformers {text!r}")
        out[key] = same
    log(f"tiny check: {out}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="jetmoe,phimoe")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt", default="32:512", help="prompt lengths, LO:HI")
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--concurrency", default="1,32,256")
    p.add_argument("--single", type=int, default=8, help="requests at concurrency 1")
    p.add_argument("--no-check", action="store_true", help="skip the tiny model's check")
    p.add_argument("--client-processes", type=int, default=1, help="client processes sharing each load (its "
                   "prompts and concurrency), so that the clients' own Python is not the bound")
    p.add_argument("--switch-intervals", default="0.0005", help="the server's sys.setswitchinterval, a run each "
                   "(0: Python's default, 5 ms; moetorch serve sets 0.0005)")
    p.add_argument("--engine-processes", default="0", help="0, 1 or 0,1: a server with the engine in its process "
                   "(0) and/or in a process of its own (1, moetorch serve --engine-process), each switch interval")
    p.add_argument("--engine-process", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--switch-interval", type=float, default=0, help=argparse.SUPPRESS)
    p.add_argument("--sampling", default="greedy", help="greedy, sampled or greedy,sampled: the requests' settings "
                   f"(sampled: {SAMPLED}), each over every load")
    p.add_argument("--max-model-len", type=int, default=0, help="the server's --max-model-len (0: the longest prompt "
                   "+ --new)")
    p.add_argument("--paged", default="", help="the server's cache: on, off, or '' (its default: paged where whole "
                   "rows would not fit)")
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="small models on the CPU: checks the script, measures nothing")
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=8100, help=argparse.SUPPRESS)
    p.add_argument("--baseline-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.prompt = tuple(int(x) for x in args.prompt.split(":"))
    if args.serve:
        return serve(args)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.sampling = args.sampling.split(",")
    if not set(args.sampling) <= {"greedy", "sampled"}:
        p.error(f"--sampling: greedy and/or sampled, not {args.sampling}")
    args.switch_intervals = [float(x) or None for x in args.switch_intervals.split(",")]
    import torch

    result = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
              "args": vars(args), "tiny_check": None if args.smoke or args.no_check else tiny_check(), "models": {}}
    for name in args.models.split(","):
        runs = []
        modes = [bool(int(x)) for x in args.engine_processes.split(",")]
        for proc in modes:
            for interval in args.switch_intervals:
                runs.append(bench_model(name, args, interval, baseline=not runs, engine_process=proc))
        base = runs[0].get("generate_batch", {}).get("tokens_per_s")  # (none when the first has an engine process)
        for r in runs:
            full = [x["tokens_per_s"] for x in r["server"] if x["requests"] == args.requests]
            r["best_over_generate_batch"] = max(full) / base if full and base else None
        result["models"][name] = {"generate_batch": runs[0].get("generate_batch"), "runs": runs}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "args"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
