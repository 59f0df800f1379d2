"""generate() on a model sharded with FSDP2 over several GPUs (NCCL), against the same model
unsharded on each GPU (not part of the CPU suite, whose test runs two gloo processes).

    python bench/synced_fsdp.py [--procs 2] [--backend nccl] [--out results.json]

With fewer GPUs than processes, processes share GPUs (rank % GPUs) and the group must be gloo
(NCCL takes one process a GPU): the same sharding, sync and kernels, through host collectives.

Each process builds the same random PhiMoE and JetMoE (small, float32), generates from its own
prompt (different lengths, budgets and an EOS id that stops one row early) with the model whole,
then shards every decoder layer and the model with `fully_shard` and generates again with
`synced_gpus` left unset (so on, as the model is sharded). Checks, per process: the same tokens
(greedy and beam search), and every process ran the same number of forwards. Times are reported,
not checked. Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moetorch

sys.path.insert(0, os.path.dirname(__file__))
from generation_check import configs, randomize  # noqa: E402


def _timed(model, ids, **kw):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = model.generate(ids, **kw)
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def _one_model(config, cls, rank: int, device, mesh) -> dict:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = cls(config)
    randomize(model, seed=0)
    model = model.to(device).eval()
    forwards = [0]

    def count(module, args):
        forwards[0] += 1

    model.register_forward_pre_hook(count)
    g = torch.Generator().manual_seed(100 + rank)
    L = 12 + 5 * rank
    ids = torch.randint(1, config.vocab_size, (2, L), generator=g).to(device)
    kw = dict(max_new_tokens=16 + 8 * rank, pad_token_id=0)
    probe = model.generate(ids, **kw)
    kw["eos_token_id"] = int(probe[0, L + 3])  # row 0 stops after 4 tokens
    ref, t_ref = _timed(model, ids, **kw)
    ref_beams = model.generate(ids, num_beams=2, **kw)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    forwards[0] = 0
    got, t_got = _timed(model, ids, **kw)
    got_forwards = forwards[0]
    got_beams = model.generate(ids, num_beams=2, **kw)
    return {
        "prompt": L, "max_new_tokens": kw["max_new_tokens"], "new_tokens": got.shape[1] - L,
        "greedy_equal": torch.equal(got, ref), "beams_equal": torch.equal(got_beams, ref_beams),
        "forwards": got_forwards, "whole_s": t_ref, "sharded_s": t_got,
    }


@torch.no_grad()
def _worker(rank: int, world: int, port: int, backend: str, out_path: str | None) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    mesh = init_device_mesh("cuda", (world,))
    report = {"rank": rank}
    for name, (config, cls) in configs().items():
        report[name] = _one_model(config, cls, rank, device, mesh)
        print(f"rank {rank} {name}: {report[name]}", flush=True)
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        ok = True
        for name in configs():
            ok &= all(r[name]["greedy_equal"] and r[name]["beams_equal"] for r in reports)
            ok &= len({r[name]["forwards"] for r in reports}) == 1
        result = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "processes": world,
                  "backend": backend, "torch": torch.__version__,
                  "moetorch": moetorch.__version__, "ok": ok, "ranks": reports}
        print(json.dumps(result, indent=1))
        if out_path:
            with open(out_path, "w") as f:
                json.dump(result, f, indent=1)
        if not ok:
            print("FAILED", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, default=max(2, torch.cuda.device_count()))
    parser.add_argument("--backend", default="nccl", choices=("nccl", "gloo"))
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.procs < 2:
        sys.exit("needs at least 2 processes")
    if args.backend == "nccl" and torch.cuda.device_count() < args.procs:
        sys.exit(f"NCCL needs a GPU a process: {torch.cuda.device_count()} GPUs for {args.procs} processes "
                 "(use --backend gloo)")
    mp.start_processes(_worker, args=(args.procs, 29400 + os.getpid() % 500, args.backend, args.out),
                       nprocs=args.procs, start_method="spawn")
    if args.out:
        with open(args.out) as f:
            sys.exit(0 if json.load(f)["ok"] else 1)


if __name__ == "__main__":
    main()
