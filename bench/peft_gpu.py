"""PEFT adapters on the GPU: moetorch's graphed generate against Transformers' and against the
merged weights (not part of the CPU suite).

    PYTHONPATH=.:bench python bench/peft_gpu.py --out r.json

On the GPU, kernels that read a layer's weight stand in for its call (the q/k/v GEMV, the norm +
router kernel, the kv + map kernel); a layer that PEFT wraps must run its own call instead. For
each of gpu_check's small configs in float32, one LoRA adapter on the attention projections, the
routers and (with `target_parameters`) the experts' stacked weights, made on moetorch's model:
- the same adapter loaded on Transformers' model (the PhiMoE router left out there: Transformers'
  router cannot be wrapped) gives the same prefill logits and greedy tokens;
- moetorch's model with the adapter (graphed decode on a static cache) gives the tokens of its own
  merged copy (plain layers, every fused kernel);
- batch-1 decode speed of the base model, the merged one and the adapter (informative);
- the adapter put into each library's model with Transformers' `load_adapter` gives the same
  logits and greedy tokens, and `disable_adapters` / `enable_adapters` give the base model's and
  the adapter's scores in calls in a row.
Exits non-zero if logits or tokens differ.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile

import peft
import torch
import transformers
from compile_check import decode_tok_s  # bench/ is the script's directory

from moetorch.gpu_check import configs, rel_err, report

SHARED = {"phimoe": ["q_proj", "k_proj", "v_proj", "o_proj"], "jetmoe": ["kv_proj", "layer"]}
OURS_ALSO = {"phimoe": ["router"], "jetmoe": []}
EXPERTS = {"phimoe": ["experts.gate_up_proj", "experts.down_proj"],
           "jetmoe": ["input_linear.weight", "output_linear.weight"]}


def adapter(model, name: str, modules: list[str]):
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, task_type="CAUSAL_LM",
                          target_modules=modules, target_parameters=EXPERTS[name])
    wrapped = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # small deltas: the model stays a model, the adapter still moves its tokens
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.mul_(0.05)
    return wrapped.eval()


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="peft_gpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    results, ok = {"device": torch.cuda.get_device_name(), "peft": peft.__version__}, True
    for name, (cfg, cls) in configs().items():
        torch.manual_seed(0)
        base = cls(cfg).eval()
        ids = torch.randint(1, cfg.vocab_size, (2, 32), device="cuda")
        new = dict(max_new_tokens=24, do_sample=False, eos_token_id=None, output_scores=True,
                   return_dict_in_generate=True)
        with tempfile.TemporaryDirectory() as d:
            base.save_pretrained(f"{d}/base")
            hf = getattr(transformers, cls.__name__).from_pretrained(f"{d}/base").to("cuda").eval()
            shared = adapter(copy.deepcopy(base).to("cuda"), name, SHARED[name])
            shared.save_pretrained(f"{d}/adapter")
            hf_loaded = copy.deepcopy(hf)
            hf_loaded.load_adapter(f"{d}/adapter")  # Transformers' adapter methods, on both libraries' models
            loaded = copy.deepcopy(base).to("cuda")
            loaded.load_adapter(f"{d}/adapter")
            hf_shared = peft.PeftModel.from_pretrained(hf, f"{d}/adapter").eval()
        err = results[f"{name}.shared.prefill_logits_rel_err_vs_transformers"] = rel_err(
            shared(input_ids=ids).logits, hf_shared(input_ids=ids).logits)
        want = hf_shared.generate(input_ids=ids, **new)
        got = shared.generate(input_ids=ids, **new)
        same = results[f"{name}.shared.greedy_same_tokens_as_transformers"] = torch.equal(got.sequences,
                                                                                         want.sequences)
        ok &= err < 1e-4 and same

        err = results[f"{name}.load_adapter.prefill_logits_rel_err_vs_transformers"] = rel_err(
            loaded(input_ids=ids).logits, hf_loaded(input_ids=ids).logits)
        want_loaded = hf_loaded.generate(input_ids=ids, **new)
        got = loaded.generate(input_ids=ids, **new)
        same = results[f"{name}.load_adapter.greedy_same_tokens_as_transformers"] = torch.equal(
            got.sequences, want_loaded.sequences)
        loaded.disable_adapters()
        off = loaded.generate(input_ids=ids, **new)
        loaded.enable_adapters()
        on = loaded.generate(input_ids=ids, **new)
        base_gpu = copy.deepcopy(base).to("cuda")
        plain_out = base_gpu.generate(input_ids=ids, **new)
        steps = results[f"{name}.load_adapter.off_on_rel_err"] = {
            "off_vs_base": max(rel_err(x, y) for x, y in zip(off.scores, plain_out.scores)),
            "on_vs_first": max(rel_err(x, y) for x, y in zip(on.scores, got.scores))}
        ok &= err < 1e-4 and same and all(e < 1e-4 for e in steps.values())
        del hf_loaded, loaded, base_gpu

        full = adapter(copy.deepcopy(base).to("cuda"), name, SHARED[name] + OURS_ALSO[name])
        merged = copy.deepcopy(full).merge_and_unload().eval()
        a, b = full.generate(input_ids=ids, **new), merged.generate(input_ids=ids, **new)
        same = results[f"{name}.all.greedy_same_tokens_as_merged"] = torch.equal(a.sequences, b.sequences)
        diff = results[f"{name}.all.max_score_rel_err_vs_merged"] = max(
            rel_err(x, y) for x, y in zip(a.scores, b.scores))
        plain = copy.deepcopy(full).unload().eval()
        c = plain.generate(input_ids=ids, **new)
        results[f"{name}.all.adapter_moves_tokens"] = not torch.equal(c.sequences, a.sequences)
        effect = results[f"{name}.all.first_score_rel_err_base_vs_adapter"] = rel_err(c.scores[0], a.scores[0])
        ok &= same and diff < 1e-4 and effect > 1e-3  # an adapter the kernels skipped would show

        # generate calls in a row (the path that would hold graphs between calls): switching the
        # adapter off, merging and unmerging it must each give the model's own scores
        def scores(model, ids=ids):
            seen = []
            model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=None,
                           logits_processor=[lambda _, s: seen.append(s.clone()) or s])
            return torch.stack(seen)

        plain_scores, full_scores = scores(plain), scores(full)
        steps = {}
        with full.disable_adapter():
            steps["off"] = rel_err(scores(full), plain_scores)
        steps["on"] = rel_err(scores(full), full_scores)
        full.merge_adapter()
        steps["merged"] = rel_err(scores(full), full_scores)
        full.unmerge_adapter()
        with full.disable_adapter():
            steps["unmerged_off"] = rel_err(scores(full), plain_scores)
        results[f"{name}.all.calls_in_a_row_rel_err"] = steps
        ok &= all(e < 1e-4 for e in steps.values())

        one = ids[:1]
        results[f"{name}.decode_b1_tok_s"] = {
            "base": round(decode_tok_s(plain, one, 64), 1), "merged": round(decode_tok_s(merged, one, 64), 1),
            "adapter": round(decode_tok_s(full, one, 64), 1)}
        del hf, hf_shared, shared, full, merged, plain
        torch.cuda.empty_cache()
    results["ok"] = bool(ok)
    report(results, args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
