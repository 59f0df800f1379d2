"""The batch cache's two layouts, A/B: `batching.SLOT_MAJOR` off ([layers, rows, kv heads, slots,
head_dim]) and on (one range [rows, slots, 2, layers, kv heads, head_dim], the layout a cache
backed page by page needs). The same model and workload as bench/batching.py (random weights at
the real size, bf16; prompts of 32-512 random tokens, 128 greedy tokens each, no EOS), the arms
alternating over `--rounds`, each a warm run and a timed one in its own manager. The two arms
compute the same sums in the same order, so their tokens are compared for equality; a tiny
float32 model checks the on arm against per-request `generate`.

    PYTHONPATH=.:bench python bench/slot_major_ab.py --out bench/results/h200-<date>-slot-major-ab.json
"""

from __future__ import annotations

import torch

import moetorch.engine.batching as cb


def main() -> int:
    from batching import ab_parser, alternating, timed_run, tiny_check  # bench/batching.py
    from moe_layer import save_json

    p = ab_parser()
    args = p.parse_args()
    cb.SLOT_MAJOR = True
    result = {"device": torch.cuda.get_device_name(), "args": vars(args), "tiny_check_slot_major": tiny_check()}

    def run(model, prompts, arm):
        cb.SLOT_MAJOR = arm == "on"
        return timed_run(model, "moetorch", prompts, args.new)

    result["models"] = alternating(args, ("off", "on"), run)
    cb.SLOT_MAJOR = False
    save_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
