"""GPU checks of generate() (not part of the CPU suite: CI has no GPU).

    python bench/generation_check.py [--out results.json]

1. float32 generate on CUDA gives the CPU's tokens: greedy (left-padded batch), beam search,
   static cache, token suppression with a forced EOS and the exponential length penalty; sampling
   with the typical, epsilon, eta and top-h warpers draws tokens of the vocabulary (CUDA and CPU
   random streams differ).
2. Host synchronisation in the decode loop, under `torch.cuda.set_sync_debug_mode`, switched on by a
   logits processor after the prefill: none per step when only max_length can stop, one per step
   (the stop check) with an EOS id.
3. Assisted decoding (one row, a one-layer assistant sharing the first layer): greedy search's
   tokens, with the default draft settings and with the "heuristic" schedule, and under a no-repeat
   rule (drafts through the logits processors); and prompt lookup decoding, also under that rule
   (a JetMoE table picked per forward: the CPU's tokens for the same call).
4. Decode speed (informative): greedy tokens/s with a dynamic and a static cache, batch 1.
All of it for PhiMoE, JetMoE, and JetMoE with "dynamic" and "longrope" rotary tables (picked per
forward from its largest position, past `max_position_embeddings` in these calls).
Exits non-zero if check 1, 2 or 3 fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings

import torch

import moetorch
from moetorch import LogitsProcessor, LogitsProcessorList


def configs():
    phi = moetorch.PhimoeConfig(
        vocab_size=512, hidden_size=256, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, num_local_experts=8, max_position_embeddings=1024, pad_token_id=0,
    )
    jet = moetorch.JetMoeConfig(
        vocab_size=512, hidden_size=256, intermediate_size=384, num_hidden_layers=4, num_key_value_heads=4,
        kv_channels=32, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024, pad_token_id=0,
    )
    # rotary tables picked per forward from its largest position (the prompt and new tokens cross
    # max_position_embeddings / the original context): the graphed decode step updates them on the device
    per_forward = {
        "jetmoe_dynamic": {"rope_type": "dynamic", "factor": 2.0},
        "jetmoe_longrope": {"rope_type": "longrope", "short_factor": [1.0 + i / 16 for i in range(16)],
                            "long_factor": [2.0 + i for i in range(16)], "original_max_position_embeddings": 20},
    }
    out = {"phimoe": (phi, moetorch.PhimoeForCausalLM), "jetmoe": (jet, moetorch.JetMoeForCausalLM)}
    for name, rope in per_forward.items():
        cfg = copy.deepcopy(jet)
        cfg.max_position_embeddings = 20
        cfg.rope_parameters = {**rope, "rope_theta": 100.0}
        cfg.validate_rope()
        out[name] = (cfg, moetorch.JetMoeForCausalLM)
    return out


class SyncDebugAfterPrefill(LogitsProcessor):
    """Turns on CUDA sync debugging at its first call, i.e. once the prefill is done."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, input_ids, scores):
        torch.cuda.set_sync_debug_mode(self.mode)
        return scores


def randomize(model, seed: int, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            shift = 1.0 if p.dim() == 1 and "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * std + shift)


@torch.no_grad()
def check(name, config, cls, results) -> bool:
    ok = True
    torch.manual_seed(0)
    cpu = cls(config).eval()
    randomize(cpu, 0)
    gpu = cls(config).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.to("cuda")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, config.vocab_size, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :5] = 0
    ids = ids.masked_fill(mask == 0, 0)
    cases = {
        "greedy": dict(max_new_tokens=24),
        "beam4": dict(max_new_tokens=16, num_beams=4, num_return_sequences=2),
        "static": dict(max_new_tokens=24, cache_implementation="static"),
        # token suppression, a forced EOS and the length penalty, through the graphed decode steps
        "processors": dict(max_new_tokens=16, suppress_tokens=list(range(10, 64)),
                           begin_suppress_tokens=list(range(64, 128)), forced_eos_token_id=3,
                           exponential_decay_length_penalty=(4, 1.5), eos_token_id=[7, 9]),
    }
    for case, kwargs in cases.items():
        a = cpu.generate(ids, attention_mask=mask, **kwargs)
        b = gpu.generate(ids.cuda(), attention_mask=mask.cuda(), **kwargs).cpu()
        same = torch.equal(a, b)
        results[f"{name}.{case}.cuda_equals_cpu"] = same
        ok &= same

    for eos, want_per_step in ((None, 0), (config.vocab_size - 1, 1)):
        counts = {}
        for n in (8, 8, 16):  # the first run pays one-time costs (lazy initialisation), not counted
            procs = LogitsProcessorList([SyncDebugAfterPrefill("warn")])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    gpu.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=n, eos_token_id=eos,
                                 logits_processor=procs)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts[n] = sum("synchroniz" in str(w.message) for w in caught)
        per_step = (counts[16] - counts[8]) / 8
        results[f"{name}.host_syncs_per_step.eos={eos}"] = per_step
        ok &= per_step == want_per_step

    # the other sampling warpers, which run in torch before the sampling kernels draw: CUDA's random
    # stream differs from the CPU's, so only whether each drew within the vocabulary is checked
    for name_w, kwargs in {"typical": dict(typical_p=0.8), "epsilon": dict(epsilon_cutoff=0.002),
                           "eta": dict(eta_cutoff=0.002), "top_h": dict(top_h=0.6, temperature=0.7)}.items():
        out = gpu.generate(ids.cuda(), attention_mask=mask.cuda(), do_sample=True, max_new_tokens=12,
                           eos_token_id=None, **kwargs)
        drew = bool(out.shape == (3, 24) and (out[:, 12:] >= 0).all() and (out[:, 12:] < config.vocab_size).all())
        results[f"{name}.sampling_{name_w}.drew"] = drew
        ok &= drew

    # assisted decoding (one row, eager steps on dynamic caches): greedy search's tokens, with the
    # default draft settings (a confidence threshold of 0.4) and with the heuristic schedule
    small_config = copy.deepcopy(config)
    small_config.num_hidden_layers = 1
    small = cls(small_config).eval()
    small.load_state_dict(cpu.state_dict(), strict=False)  # the first layer, embeddings and head
    small_cpu = copy.deepcopy(small)
    small = small.to("cuda")
    row = ids[:1, 5:].cuda()
    # A rotary table picked per forward reads the verify forwards' positions (drafts included), so
    # drafted tokens differ from greedy search's there, as in Transformers: such a model's drafted
    # calls are checked against the same calls on the CPU (the prompt, shorter than
    # max_position_embeddings, starts both tables over).
    per_forward = gpu.model.rotary_emb.per_forward is not None
    what = "equals_cpu" if per_forward else "equals_greedy"
    want = gpu.generate(row, max_new_tokens=24, eos_token_id=None).cpu()
    for case, kwargs in {"default": {}, "heuristic": dict(num_assistant_tokens=2,
                                                          num_assistant_tokens_schedule="heuristic")}.items():
        got = gpu.generate(row, assistant_model=small, max_new_tokens=24, eos_token_id=None, **kwargs).cpu()
        if per_forward:
            want = cpu.generate(row.cpu(), assistant_model=small_cpu, max_new_tokens=24, eos_token_id=None, **kwargs)
        same = torch.equal(got, want)
        results[f"{name}.assisted_{case}.{what}"] = same
        ok &= same
    results[f"{name}.assisted_heuristic.draft_length_reached"] = small.generation_config.num_assistant_tokens
    got = gpu.generate(row, prompt_lookup_num_tokens=3, max_new_tokens=24, eos_token_id=None).cpu()
    if per_forward:
        want = cpu.generate(row.cpu(), prompt_lookup_num_tokens=3, max_new_tokens=24, eos_token_id=None)
    results[f"{name}.prompt_lookup.{what}"] = same = torch.equal(got, want)
    ok &= same
    # under a logits processor (a no-repeat rule): drafts run through it (assistant) or are
    # dropped where it forbids them (prompt lookup); greedy search's tokens under the same rule
    rule = dict(no_repeat_ngram_size=2, max_new_tokens=24, eos_token_id=None)
    want = gpu.generate(row, **rule).cpu()
    drafters = {"assisted": dict(assistant_model=small), "prompt_lookup": dict(prompt_lookup_num_tokens=3)}
    for case, kwargs in drafters.items():
        got = gpu.generate(row, **kwargs, **rule).cpu()
        if per_forward:
            cpu_kwargs = dict(assistant_model=small_cpu) if case == "assisted" else kwargs
            want = cpu.generate(row.cpu(), **cpu_kwargs, **rule)
        results[f"{name}.{case}_no_repeat.{what}"] = same = torch.equal(got, want)
        ok &= same

    prompt = ids[:1, 5:].cuda()
    for cache in ("dynamic", "static"):
        gpu.generate(prompt, max_new_tokens=8, eos_token_id=None, cache_implementation=cache)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        gpu.generate(prompt, max_new_tokens=256, eos_token_id=None, cache_implementation=cache)
        torch.cuda.synchronize()
        results[f"{name}.greedy_tokens_per_s.{cache}"] = round(256 / (time.perf_counter() - t), 1)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name()}
    ok = all([check(name, cfg, cls, results) for name, (cfg, cls) in configs().items()])
    results["ok"] = ok
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
