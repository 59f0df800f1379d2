"""The server's HTTP side alone: how many streamed tokens a second the HTTP process of `moetorch
serve` can send, with an engine process that stands in for the model.

The stand-in speaks the engine process's pipe protocol (`serve/worker.py`): it takes requests and,
every `--step-ms`, sends one new token (with its log-probability) for every running request in one
message, as a decode step does, until each has its `--new` tokens. So the HTTP process runs
exactly as it serves a model: the pipe's reader thread, each request's detokenizer and stop-string
check, the response chunks, JSON and the sockets. Clients (`--client-processes`, as in
bench/serve.py) stream `--requests` completions at `--concurrency`. Measured: tokens a second,
and the HTTP process's CPU time per streamed token (the bound: at one CPU second per second the
HTTP process is saturated), streamed and not.

    PYTHONPATH=.:bench python bench/serve_http.py [--concurrency 256] [--step-ms 5] --out r.json
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import threading
import time

from serve import load_split, wait_ready, word_tokenizer  # bench/ is the script's directory

VOCAB = 32000


def stand_in_engine(conn, loader, setup: dict) -> None:
    """An engine process without a model (the pipe protocol of `worker._worker_main`): every
    `step_s` each running request gets one random token, all in one "results" message."""
    step_s = setup.pop("step_s")
    info = {"max_model_len": setup["max_model_len"], "eos": [], "vocab_size": VOCAB, "rows": 256,
            "batch_tokens": 16384, "device": "cpu"}
    conn.send(("ready", info))
    running: dict[str, list] = {}  # id -> [tokens left]
    lock = threading.Lock()
    rng = random.Random(0)

    def steps() -> None:
        while True:
            time.sleep(step_s)
            deltas = []
            with lock:
                for rid, left in list(running.items()):
                    left[0] -= 1
                    status = 3 if left[0] == 0 else 2  # RequestStatus.FINISHED / DECODING
                    deltas.append((rid, status, [rng.randrange(2, VOCAB)], [-1.5], [], None))
                    if status == 3:
                        del running[rid]
            if deltas:
                try:
                    conn.send(("results", deltas))
                except (OSError, EOFError):
                    return

    threading.Thread(target=steps, daemon=True).start()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "add":
            with lock:
                running[message[1]] = [message[3]]
        elif message[0] == "cancel":
            with lock:
                running.pop(message[1], None)
        elif message[0] == "stop":
            return


def serve(port: int, step_ms: float, max_model_len: int, cpu_file: str, http: str, loop: str) -> None:
    """The server process: the app over an engine whose process is the stand-in."""
    import signal

    import uvicorn

    from moetorch.serve import Engine, create_app, worker

    worker._worker_main = stand_in_engine  # the engine process's target (a module function: picklable)
    engine = Engine.spawn(None, word_tokenizer(VOCAB), "stand-in", max_model_len=max_model_len)

    def report(*_):  # the CPU seconds this process has used, for the parent
        with open(cpu_file, "w") as f:
            f.write(str(time.process_time()))

    signal.signal(signal.SIGUSR1, report)
    uvicorn.run(create_app(engine), host="127.0.0.1", port=port, log_level="warning", http=http, loop=loop)


class _Proc:
    """A multiprocessing.Process as `wait_ready` polls a Popen."""

    def __init__(self, proc) -> None:
        self.proc, self.returncode = proc, None

    def poll(self):
        self.returncode = self.proc.exitcode
        return self.returncode


def cpu_seconds(pid: int, cpu_file: str) -> float:
    import signal

    if os.path.exists(cpu_file):
        os.remove(cpu_file)
    os.kill(pid, signal.SIGUSR1)
    for _ in range(100):
        if os.path.exists(cpu_file) and open(cpu_file).read():
            return float(open(cpu_file).read())
        time.sleep(0.02)
    raise RuntimeError("the server did not report its CPU time")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--concurrency", default="256")
    p.add_argument("--step-ms", type=float, default=5.0)
    p.add_argument("--client-processes", type=int, default=4)
    p.add_argument("--port", type=int, default=8111)
    p.add_argument("--servers", default="h11/asyncio,auto/auto", help="HTTP implementations / event loops "
                   "(uvicorn's `http` and `loop`), a server each; auto: httptools and uvloop where installed")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from moe_layer import save_json

    from moetorch.serve import worker

    # the stand-in's step interval travels in the setup dict that Engine.spawn passes on
    original = worker.ManagerClient.__init__

    def init(self, loader, setup, *a, **kw):
        original(self, loader, {**setup, "step_s": args.step_ms / 1e3}, *a, **kw)

    worker.ManagerClient.__init__ = init
    cpu_file = f"/tmp/serve-http-cpu-{os.getpid()}"
    ctx = multiprocessing.get_context("fork")  # the patches above hold in the server process
    pool = multiprocessing.get_context("spawn").Pool(args.client_processes) if args.client_processes > 1 else None
    rng = random.Random(1)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randint(32, 512))] for _ in range(args.requests)]
    rows = []
    for kind in args.servers.split(","):
        http, loop = kind.split("/")
        server = ctx.Process(target=serve, args=(args.port, args.step_ms, 1024, cpu_file, http, loop))
        server.start()
        url = f"http://127.0.0.1:{args.port}"
        try:
            wait_ready(url, _Proc(server), 120)
            for c in [int(x) for x in args.concurrency.split(",")]:
                for stream in (True, False):
                    load_split(pool, url, prompts[:c], 8, c, stream)  # warm
                    cpu0 = cpu_seconds(server.pid, cpu_file)
                    row = load_split(pool, url, prompts, args.new, c, stream)
                    cpu = cpu_seconds(server.pid, cpu_file) - cpu0
                    row.update(server=kind, http_cpu_s=cpu, http_cpu_share=cpu / row["seconds"],
                               http_cpu_us_per_token=1e6 * cpu / row["generated_tokens"],
                               stand_in_tokens_per_s=c / (args.step_ms / 1e3))
                    rows.append(row)
                    print(f"{kind}: concurrency {c} {'streamed' if stream else 'whole'}: {row['tokens_per_s']:.0f} "
                          f"tok/s (the stand-in offers {row['stand_in_tokens_per_s']:.0f}); HTTP process CPU "
                          f"{row['http_cpu_share']:.2f} s/s, {row['http_cpu_us_per_token']:.0f} us a token", flush=True)
        finally:
            server.terminate()
            server.join(10)
    if pool is not None:
        pool.close()
    save_json(args.out, {"args": vars(args), "cpus": os.cpu_count(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
