"""A model larger than its GPU: the layers that `device_map` places on the CPU run on the GPU with
their experts' weights in pinned host memory (`moetorch.placement.run_on_gpus`), so generation
keeps the static cache and the graphed decode steps. Phi-3.5-MoE in bf16 (84 GB) on an 80 GB H100
is the case this serves.

The model is built at the real size with random weights straight into the placement that
`from_pretrained(device_map=--device-map, max_memory=...)` makes (no checkpoint: 84 GB does not fit
the machine's disk), then measured as `moetorch bench` measures one GPU: graphed decode steps at
each --batches (--prompt-token prompts), a --prefill-token forward, and peak GPU memory. Next to
each decode rate, its floor: the bytes a step must read at the measured copy rates, the host
layers' over the bus (the routed experts' where the kernels read them in place, else all of them,
copied: `ops.moe.reads_host_in_place`) and the rest from the GPU's memory; read in place, the two
in turn, copied, the larger (the copies can cross the bus while the GPU computes).

    PYTHONPATH=.:bench python bench/host_mapped.py --model phimoe --out r.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from moe_layer import save_json  # bench/ is the script's directory

from moetorch.benchmark import SIZES, _ours_decode, cuda_time, log
from moetorch.modeling_utils import materialize, meta_model, place
from moetorch.ops.host import is_host_mapped
from moetorch.ops.moe import reads_host_in_place


def copy_rate(pinned: bool) -> float:
    """Bytes/s of a 1 GiB copy into the GPU: from pinned host memory, the bytes crossing the bus;
    within the GPU, the bytes read and written (the device copy bandwidth of `moetorch bench`)."""
    n = 2**30
    src = torch.empty(n, dtype=torch.uint8, pin_memory=True) if pinned else torch.empty(n, dtype=torch.uint8,
                                                                                         device="cuda")
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    return (1 if pinned else 2) * n / cuda_time(lambda: dst.copy_(src, non_blocking=True), repeats=5, warmup=1)


def build_placed(name: str, device_map, max_memory):
    import moetorch

    config = getattr(moetorch, {"jetmoe": "JetMoeConfig", "phimoe": "PhimoeConfig"}[name])(**SIZES[name])
    cls = getattr(moetorch, {"jetmoe": "JetMoeForCausalLM", "phimoe": "PhimoeForCausalLM"}[name])
    model = meta_model(cls, config, torch.bfloat16)
    planned = place(model, None, device_map, max_memory)
    materialize(model, planned, "random weights")
    torch.manual_seed(0)
    model._init_left_out({n for n, _ in model.named_parameters()})
    return model.eval(), planned


def expected_touched(E: int, K: int, B: int) -> float:
    """Experts of one layer that B rows, each routed to K distinct of E uniformly, touch on average."""
    return E * (1 - (1 - K / E) ** B)


def copy_ahead_ab(model, args, rounds: int = 2) -> dict:
    """Milliseconds of a graphed decode step at each --batches that copies the host experts, and of
    the --prefill forward, with the copies started ahead (ops.moe.COPY_AHEAD) and without, in
    alternating rounds."""
    from moetorch.ops import moe

    cfg, out, shipped = model.config, {}, moe.COPY_AHEAD
    work = {f"decode_b{B}": (B, args.prompt) for B in map(int, args.batches.split(","))
            if not reads_host_in_place(B, cfg.num_local_experts, cfg.num_experts_per_tok)}
    work[f"prefill_{args.prefill}"] = (1, args.prefill)
    for name, (B, T) in work.items():
        ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
        times = {"ahead": [], "each_layer": []}
        for _ in range(rounds):
            for arm in times:
                moe.COPY_AHEAD = arm == "ahead"
                try:
                    if name.startswith("decode"):  # graphs captured per arm
                        s = cuda_time(_ours_decode(model, ids, args.steps), repeats=3, warmup=1) / args.steps
                    else:
                        s = cuda_time(lambda: model(ids, logits_to_keep=1), repeats=3, warmup=1)  # noqa: B023
                finally:
                    moe.COPY_AHEAD = shipped
                times[arm].append(s * 1e3)
        out[name] = {arm: {"ms": ms, "best_ms": min(ms)} for arm, ms in times.items()}
        log(f"copies ahead, {name}: {min(times['ahead']):.1f} ms against {min(times['each_layer']):.1f} ms")
    return out


@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/host_mapped.py")
    p.add_argument("--model", default="phimoe", choices=sorted(SIZES))
    p.add_argument("--device-map", default="auto")
    p.add_argument("--gpu-budget", default=None, help="max_memory for GPU 0 (default: the plan's 90%% of free)")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--ab-copy-ahead", action="store_true",
                   help="first time decode (batches that copy) and prefill with and without the copies started "
                        "ahead (ops.moe.COPY_AHEAD), interleaved")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    max_memory = None if args.gpu_budget is None else {0: args.gpu_budget, "cpu": "200GiB"}
    t0 = time.perf_counter()
    model, planned = build_placed(args.model, args.device_map, max_memory)
    cfg = model.config
    host = {n: p for n, p in model.named_parameters() if is_host_mapped(p)}
    expert_bytes = {n: p.numel() * p.element_size() for n, p in model.named_parameters() if p.dim() == 3}
    host_layers = len({n.split(".mlp.")[0] for n in host})
    E, K, L = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers
    per_expert = sum(expert_bytes.values()) / L / E  # one expert's bytes (gate/up + down)
    dense = model.get_memory_footprint(return_buffers=False) - sum(expert_bytes.values()) \
        - model.model.embed_tokens.weight.numel() * 2
    result = {
        "model": args.model, "device": torch.cuda.get_device_name(), "device_map": args.device_map,
        "gpu_budget": args.gpu_budget, "build_s": time.perf_counter() - t0,
        "weights_GB": model.get_memory_footprint() / 1e9,
        "host_mapped_GB": sum(p.numel() * p.element_size() for p in host.values()) / 1e9,
        "layers_with_host_experts": host_layers, "runs_on": [str(d) for d in model.parameter_devices()],
        "hf_device_map_cpu": sorted(k for k, v in planned.items() if v.type == "cpu"),
        "gpu_weights_GB": torch.cuda.memory_allocated() / 1e9,
    }
    bus, hbm = copy_rate(pinned=True), copy_rate(pinned=False)
    result.update(pinned_copy_GBps=bus / 1e9, device_copy_GBps=hbm / 1e9)
    log(f"{args.model}: {result['weights_GB']:.1f} GB, {result['host_mapped_GB']:.1f} GB of experts in host "
        f"memory ({host_layers} layers), built in {result['build_s']:.0f} s; bus {bus / 1e9:.1f} GB/s")
    V = cfg.vocab_size
    result["decode"] = {}
    torch.cuda.reset_peak_memory_stats()
    if args.ab_copy_ahead:
        result["copy_ahead_ab"] = copy_ahead_ab(model, args)
    for B in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(0, V, (B, args.prompt), device="cuda")
        step_s = cuda_time(_ours_decode(model, ids, args.steps), repeats=3, warmup=1) / args.steps
        touched = expected_touched(E, K, B) * per_expert
        in_place = reads_host_in_place(B, E, K)  # else every host expert crosses the bus, copied
        host_bytes = host_layers * (touched if in_place else E * per_expert)
        gpu_s = ((L - host_layers) * touched + dense) / hbm
        # read in place, the bus's bytes are the kernels' own reads, in turn with the rest; copied,
        # the copy engine can move them while the GPU computes (ops.moe.CopiesAhead)
        floor_s = host_bytes / bus + gpu_s if in_place else max(host_bytes / bus, gpu_s)
        row = {"tokens_per_s": B / step_s, "ms_per_step": step_s * 1e3, "floor_ms_per_step": floor_s * 1e3,
               "of_floor": floor_s / step_s, "host_GB_per_step": host_bytes / 1e9, "host_read_in_place": in_place}
        result["decode"][B] = row
        log(f"decode b{B}: {row['tokens_per_s']:.1f} tok/s, {row['ms_per_step']:.1f} ms a step, floor "
            f"{row['floor_ms_per_step']:.1f} ms ({row['of_floor']:.0%})")
    ids = torch.randint(0, V, (1, args.prefill), device="cuda")
    s = cuda_time(lambda: model(ids, logits_to_keep=1), repeats=3, warmup=1)
    result["prefill"] = {"tokens": args.prefill, "tokens_per_s": args.prefill / s, "s": s,
                         "host_copy_floor_s": host_layers * E * per_expert / bus}
    log(f"prefill {args.prefill}: {args.prefill / s:.0f} tok/s ({s * 1e3:.0f} ms; copying the host experts "
        f"alone takes {result['prefill']['host_copy_floor_s'] * 1e3:.0f} ms)")
    prompt = torch.randint(0, V, (1, args.prompt), device="cuda")
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None)
    torch.cuda.synchronize()
    result["generate_32_s"] = time.perf_counter() - t0  # the first call: graph capture included
    result["generate_new_tokens"] = out.shape[1] - args.prompt
    result["peak_gpu_GB"] = torch.cuda.max_memory_allocated() / 1e9
    print(json.dumps(result, indent=1, default=str))
    save_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
