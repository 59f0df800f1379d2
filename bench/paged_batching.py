"""A paged batch cache against the static one (`ContinuousBatchingConfig.paged`), H200.

The workload is bench/batching.py's (random weights at the real size, bf16; prompts of 32-512
random tokens, 128 greedy tokens each, no EOS), with rows of `--slots` slots (4096, the server's
default `--max-model-len`). Static, the rows are what the free memory holds at that many slots
a row; paged, every request gets a row (at most 256) and memory follows the slots each uses. The
arms alternate over `--rounds`, each a warm run and a timed one in its own manager. A tiny float32
model checks the paged arm's tokens against per-request `generate` on the GPU (DevicePages, one
page a row's 256 slots). `--arms static,paged` (the default), or two of those and `spanK`: paged,
with rows of K times `--slots` slots (`batching.PAGED_ROW_SPAN`).

    PYTHONPATH=.:bench python bench/paged_batching.py --out bench/results/h200-<date>-paged-batching.json
"""

from __future__ import annotations

import time

import torch

import moetorch.engine.batching as cb

SPAN = cb.PAGED_ROW_SPAN


def run(model, prompts, new: int, cfg: dict, span: int | None = SPAN) -> dict:
    import moetorch

    cb.PAGED_ROW_SPAN = span

    gen = moetorch.GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cfg, persistent_manager=True)
    manager = model._cached_continuous_batching_manager
    manager.stats.update(decode_rows=[], prefill_tokens=[], shifts=0, decode_s=0.0, prefill_s=0.0,
                         waited_for_pages=0)
    free_before = torch.cuda.mem_get_info()[0]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cfg,
                               persistent_manager=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    st = manager.stats
    tokens = sum(len(r.generated_tokens) for r in out.values())
    batch = manager._batch
    row = {"tokens_per_s": tokens / seconds, "seconds": seconds, "rows": manager.rows, "slots": manager.slots,
           "row_slots": manager._batch.S,
           "failed": sum(r.error is not None for r in out.values()), "decode_steps": len(st["decode_rows"]),
           "mean_rows": sum(st["decode_rows"]) / max(len(st["decode_rows"]), 1), "decode_s": st["decode_s"],
           "prefill_s": st["prefill_s"], "prefill_forwards": len(st["prefill_tokens"]), "shifts": st["shifts"],
           "waited_for_pages": st["waited_for_pages"], "free_gib_at_start": free_before / 2**30,
           "outputs": [r.generated_tokens for r in out.values()]}
    if batch.pages is not None:
        p = batch.pages
        row.update(page_mib=p.page / 2**20, pages=p.count, page_capacity=p.capacity, pages_in_use_at_end=p.in_use)
    else:
        row["cache_gib"] = sum(t.numel() * t.element_size() for t in batch.cache._all) / 2**30
    model.destroy_cached_continuous_batching_manager()
    cb.PAGED_ROW_SPAN = SPAN
    return row


def main() -> int:
    from batching import ab_parser, alternating, row_span, tiny_check  # bench/batching.py
    from moe_layer import save_json

    p = ab_parser()
    p.add_argument("--slots", type=int, default=4096)
    p.add_argument("--arms", default="static,paged", help="two of: static, paged (rows of the default "
                   "batching.PAGED_ROW_SPAN), spanK (paged, rows of K x --slots slots)")
    p.add_argument("--no-tiny", action="store_true")
    args = p.parse_args()
    result = {"device": torch.cuda.get_device_name(), "args": vars(args)}
    if not args.no_tiny:
        cb.PAGED = True
        result["tiny_check_paged"] = tiny_check()
        cb.PAGED = None

    def arm_run(model, prompts, arm):
        return run(model, prompts, args.new, {"max_cache_len": args.slots, "paged": arm != "static"},
                   row_span(arm, SPAN))

    alternating(args, tuple(args.arms.split(",")), arm_run,
                done=lambda models: save_json(args.out, {**result, "models": models}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
