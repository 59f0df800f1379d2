"""A continuous-batching step that runs out of GPU memory, for real, and the loop going on after it.

    PYTHONPATH=.:bench python bench/batch_recovery_gpu.py --out r.json [--models jetmoe,phimoe] [--layers 4]

Per model: random weights at the real width (`--layers` decoder layers, bf16), a manager with CUDA
graphs, warmed up. Two short greedy requests give the reference tokens. Then the allocator is held
to the memory reserved so far plus `--headroom-mb` (`torch.cuda.set_per_process_memory_fraction`),
and prompts of doubling length go in, each beside a short request decoding, until one step's
forward raises torch.cuda.OutOfMemoryError. Checked: the requests of that step come back failed
with the error's text, `recovered_errors` is 1, the loop still runs, the graphs were captured
again, and the two short requests (sent again after the failure) give the reference tokens. The
cap is lifted at the end. On the CPU (no GPU) the script says so and stops.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from moetorch.benchmark import SIZES, build, log


def greedy(manager, prompts: list[list[int]], new: int, timeout: float = 120.0) -> list:
    ids = [manager.add_request(p, max_new_tokens=new) for p in prompts]
    return [manager.get_result(i, timeout=timeout) for i in ids]


def run_model(name: str, layers: int, headroom_mb: int, new: int) -> dict:
    from moetorch.engine.batching import ContinuousBatchingConfig, RequestStatus

    cfg = dict(SIZES[name], num_hidden_layers=layers)
    model = build(name, "moetorch", cfg)
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = None
    max_len = 8192 if name == "phimoe" else 4096
    cb = ContinuousBatchingConfig(max_requests_per_batch=8, max_cache_len=max_len, paged=False,
                                  max_batch_tokens=max_len, prefill_chunk_tokens=0)
    manager = model.init_continuous_batching(continuous_batching_config=cb)
    manager.warmup()
    manager.start()
    g = torch.Generator().manual_seed(0)
    short = [torch.randint(1, cfg["vocab_size"], (n,), generator=g).tolist() for n in (17, 40)]
    before = greedy(manager, short, new)
    reference = [out.generated_tokens for out in before]
    device = model.device
    total = torch.cuda.get_device_properties(device).total_memory
    reserved = torch.cuda.memory_reserved(device)
    cap = (reserved + headroom_mb * 2**20) / total
    torch.cuda.set_per_process_memory_fraction(cap, device)
    log(f"{name}: reserved {reserved / 2**30:.2f} GiB, cap {cap * total / 2**30:.2f} GiB")
    result = {"model": name, "layers": layers, "reserved_gib": reserved / 2**30, "cap_gib": cap * total / 2**30,
              "reference_ok": all(o.status == RequestStatus.FINISHED for o in before)}
    failed = None
    try:
        length = 256
        while length < max_len - new:
            prompt = torch.randint(1, cfg["vocab_size"], (length,), generator=g).tolist()
            outs = greedy(manager, [prompt, short[0]], new)
            errors = [o.error for o in outs if o.status == RequestStatus.FAILED]
            log(f"{name}: prompt of {length}: {[o.status.name for o in outs]}")
            if errors:
                failed = {"prompt_tokens": length, "errors": errors}
                break
            length *= 2
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    result["failed_step"] = failed
    deadline = time.monotonic() + 30  # (the loop fails the step's requests, then rebuilds the batch and counts it)
    while failed and manager.recovered_errors == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    result["recovered_errors"] = manager.recovered_errors
    result["reserved_after_reset_gib"] = torch.cuda.memory_reserved(device) / 2**30
    result["running_after"] = manager.is_running()
    t0 = time.perf_counter()
    after = greedy(manager, short, new)
    result["after_s"] = time.perf_counter() - t0
    result["after_ok"] = [o.status == RequestStatus.FINISHED for o in after]
    result["same_tokens_after"] = [o.generated_tokens == r for o, r in zip(after, reference)]
    batch = manager._batch
    result["graphs_after"] = len(getattr(batch, "graphs", {}) or {})
    manager.stop(block=True)
    result["passed"] = bool(failed and all("out of memory" in e.lower() for e in failed["errors"])
                            and result["recovered_errors"] == 1 and result["running_after"]
                            and all(result["after_ok"]) and all(result["same_tokens_after"]))
    log(f"{name}: {'passed' if result['passed'] else 'FAILED'}: {json.dumps(result)}")
    del manager, model
    torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--models", default="jetmoe,phimoe")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--headroom-mb", type=int, default=64)
    parser.add_argument("--new", type=int, default=16)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("batch_recovery_gpu: no GPU here; this check needs one")
        return 0
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "runs": [run_model(m, args.layers, args.headroom_mb, args.new) for m in args.models.split(",")]}
    results["passed"] = all(r["passed"] for r in results["runs"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps({"passed": results["passed"]}))
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
