"""Bound: graphed decode with the decode attention (and its combine) made free, against the code as
it stands, interleaved in one process (bench/decode_ab.py's loop). The B arm's attention returns the
queries unchanged (no kernel), so its tokens are meaningless; only its time is read: what any
fusion that hides the attention could save at most.

    PYTHONPATH=.:bench python bench/attn_bound.py --model jetmoe --batch 1 [--rounds 4] [--out r.json]
"""

from __future__ import annotations

import sys

import decode_ab

from moetorch.ops import triton_fused


def free_attention(q_BH1d, *args, **kwargs):
    return q_BH1d.transpose(1, 2)


def patch(spec: str):
    return triton_fused, "decode_attention", free_attention


if __name__ == "__main__":
    decode_ab.patch = patch
    sys.argv += ["--b", "free:attention=off"]
    sys.exit(decode_ab.main())
