"""moetorch on a GPU against Transformers on the same GPU, field by field (not part of the CPU suite).

    PYTHONPATH=.:bench python bench/hf_parity_gpu.py --out parity.json

The CPU suite compares every output against Transformers on the CPU, where moetorch runs its torch
code. On a GPU moetorch runs other code: the fused Triton kernels, the Triton experts, graphed
prefill and decode steps, the sampling kernels. This runs the user-facing calls there, on small
configs with random weights (gpu_check's shapes, loaded into both libraries from one checkpoint):
1. float32, every output field of a left-padded batch (logits, hidden states, attention weights
   with eager attention, router logits, loss, aux loss), against Transformers' float32 on the GPU:
   relative error < 1e-4 (JetMoE's MoA kernel sums in another order than Transformers' loop);
2. float32 sequence classification logits, and the gradients of the loss and aux loss with
   respect to every parameter (grouped-mm / gather experts, the torch code) in eval mode;
3. float32 generate: greedy and beam search give Transformers' tokens (moetorch: static cache and
   CUDA graphs by default on a GPU, Transformers: its defaults);
4. bf16 and fp16: logits against float32 Transformers, beside Transformers' own error in that
   dtype (informative: random routers flip near-tied experts in half precision; the check is that
   moetorch's error is of Transformers' size). fp16 also runs graphed generate.
5. bf16 autocast over float32 weights (mixed-precision training), inference (the Triton experts)
   and a training forward and backward (grouped-mm experts): logits against float32 Transformers,
   beside Transformers' own error under autocast; moetorch's must be at most 1.5x Transformers'
   (or 1e-2). Transformers runs PhiMoE's experts in float32 under autocast, moetorch in bf16
   (docs/differences.md). The loss gradients' error against Transformers' is recorded.
Exits non-zero if a check of 1-3 or 5 fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
import transformers
from generation_check import randomize  # bench/ is the script's directory

import moetorch
from moetorch.gpu_check import real_rows, rel_err, report

LIMIT = 1e-4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: a dry run of the script


def configs() -> dict:
    shared = dict(vocab_size=4096, hidden_size=1024, intermediate_size=1536, num_hidden_layers=4,
                  num_local_experts=8, max_position_embeddings=4096, pad_token_id=0)
    phi = dict(shared, num_attention_heads=16, num_key_value_heads=4, attention_bias=True, lm_head_bias=True)
    jet = dict(shared, num_key_value_heads=8, kv_channels=64, num_experts_per_tok=2)
    return {"phimoe": ("Phimoe", phi), "jetmoe": ("JetMoe", jet)}


def pair(prefix: str, cfg: dict, head: str, directory: str):
    """(ours, hf): one random checkpoint saved by moetorch, loaded by both, float32 on the GPU."""
    ours = getattr(moetorch, f"{prefix}{head}")(getattr(moetorch, f"{prefix}Config")(**cfg))
    randomize(ours, 0, std=0.02)
    ours.save_pretrained(directory)
    ours = getattr(moetorch, f"{prefix}{head}").from_pretrained(directory, attn_implementation="eager")
    hf = getattr(transformers, f"{prefix}{head}").from_pretrained(directory, attn_implementation="eager")
    return ours.to(DEVICE).eval(), hf.to(DEVICE).eval()


def inputs(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = mask[2, :11] = 0
    return ids.masked_fill(mask == 0, 0).to(DEVICE), mask.to(DEVICE)


def fields(ours_out, hf_out, mask, res: dict, key: str) -> bool:
    ok = True
    valid = mask.bool()
    for name in ("logits", "hidden_states", "attentions", "router_logits", "loss", "aux_loss"):
        a, b = getattr(ours_out, name, None), getattr(hf_out, name, None)
        if a is None or b is None:
            res[f"{key}.{name}"] = "missing on " + ("moetorch" if a is None else "transformers")
            ok = False
            continue
        if isinstance(a, tuple):
            err = max(rel_err(real_rows(name, x, valid), real_rows(name, y, valid)) for x, y in zip(a, b, strict=True))
        else:
            err = rel_err(real_rows(name, a, valid).reshape(-1), real_rows(name, b, valid).reshape(-1))
        res[f"{key}.{name}"] = err
        ok &= err < LIMIT
    return ok


def check(name: str, prefix: str, cfg: dict, res: dict) -> bool:
    ok = True
    with tempfile.TemporaryDirectory() as d:
        ours, hf = pair(prefix, cfg, "ForCausalLM", d)
    ids, mask = inputs(cfg["vocab_size"])
    labels = ids.masked_fill(mask == 0, -100)
    kw = dict(attention_mask=mask, labels=labels, output_hidden_states=True, output_attentions=True,
              output_router_logits=True)
    with torch.no_grad():
        ok &= fields(ours(ids, **kw), hf(ids, **kw), mask, res, f"{name}.fp32")
    # gradients, eval mode (no sampling in PhiMoE's router), loss + aux loss
    for model in (ours, hf):
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=labels, output_router_logits=True)
        (out.loss + out.aux_loss).backward()
    ours_grads, hf_grads = ({n: p.grad for n, p in m.named_parameters() if p.grad is not None} for m in (ours, hf))
    errs = {n: rel_err(g, hf_grads[n]) for n, g in ours_grads.items() if n in hf_grads}
    unmatched = sorted(ours_grads.keys() ^ hf_grads.keys())  # a gradient on one side only
    res[f"{name}.fp32.grad_max_rel_err"] = max(errs.values())
    res[f"{name}.fp32.grad_worst"] = max(errs, key=errs.get)
    res[f"{name}.fp32.grad_params_compared"] = len(errs)
    res[f"{name}.fp32.grad_params_unmatched"] = unmatched[:5]
    ok &= max(errs.values()) < 1e-3 and not unmatched
    ours.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)
    # generate
    with torch.no_grad():
        for case, gkw in {"greedy": dict(max_new_tokens=24), "beam3": dict(max_new_tokens=16, num_beams=3)}.items():
            gkw = dict(gkw, attention_mask=mask, do_sample=False, pad_token_id=0)
            same = torch.equal(ours.generate(ids, **gkw), hf.generate(ids, **gkw))
            res[f"{name}.fp32.generate_{case}_same_tokens"] = same
            ok &= same
        # half precision: error against float32 Transformers, beside Transformers' own
        want = hf(ids, attention_mask=mask).logits[mask.bool()]
        for dtype in (torch.bfloat16, torch.float16):
            tag = f"{name}.{str(dtype).split('.')[-1]}"
            ours.to(dtype)
            hf.to(dtype)
            res[f"{tag}.logits_rel_err_moetorch"] = rel_err(ours(ids, attention_mask=mask).logits[mask.bool()], want)
            res[f"{tag}.logits_rel_err_transformers"] = rel_err(hf(ids, attention_mask=mask).logits[mask.bool()], want)
            g = ours.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
            res[f"{tag}.generate_finite_tokens"] = bool((g >= 0).all() and (g < cfg["vocab_size"]).all())
            ok &= res[f"{tag}.generate_finite_tokens"]
            ours.float()
            hf.float()
    ok &= check_autocast(name, ours, hf, ids, mask, labels, res)
    del ours, hf
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        ours, hf = pair(prefix, cfg, "ForSequenceClassification", d)
        err = rel_err(ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits)
    res[f"{name}.fp32.classification_logits"] = err
    ok &= err < LIMIT
    return ok


def check_autocast(name, ours, hf, ids, mask, labels, res) -> bool:
    ok, valid = True, mask.bool()
    with torch.no_grad():  # the weights went through bf16 above: Transformers' float32 logits of these
        want = hf(ids, attention_mask=mask).logits[valid]
    grads = {}
    for lib, model in (("moetorch", ours), ("transformers", hf)):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            err = rel_err(model(ids, attention_mask=mask).logits[valid], want)
        res[f"{name}.autocast.inference_logits_rel_err_{lib}"] = err
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        res[f"{name}.autocast.train_logits_rel_err_{lib}"] = rel_err(out.logits.detach()[valid], want)
        grads[lib] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
    for mode in ("inference", "train"):
        mine, theirs = (res[f"{name}.autocast.{mode}_logits_rel_err_{lib}"] for lib in ("moetorch", "transformers"))
        ok &= mine <= max(1.5 * theirs, 1e-2)
    res[f"{name}.autocast.grad_max_rel_err_vs_transformers"] = max(
        rel_err(g, grads["transformers"][n]) for n, g in grads["moetorch"].items())
    ok &= all(bool(torch.isfinite(g).all()) for g in grads["moetorch"].values())
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    res: dict = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
                 "transformers": transformers.__version__}
    ok = True
    for name, (prefix, cfg) in configs().items():
        ok &= check(name, prefix, cfg, res)
    res["ok"] = bool(ok)
    report(res, args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
