"""Output held to a grammar on the GPU: a check of the continuous-batching path (graphed decode,
pinned masks copied without a sync) and what the masks cost a step on the host side.

    PYTHONPATH=.:bench python bench/grammar_check.py --out r.json [--device cuda] [--rows 64]

Check (the embedded tiny PhiMoE and JetMoE with their tokenizers, float32): greedy requests under a
JSON Schema, a regular expression and any-JSON-object, beside plain requests in one batch, each
against the same model's `generate` with `GrammarLogitsProcessor` (which tests/test_grammar.py
checks against Transformers on the CPU; the any-object requests, which run to their length, are
replayed through the grammar instead); a sampled request with its seed gives JSON that the schema
describes, the same tokens again in another batch.

Cost (tiny models, so the step is host-bound and the masks' share shows): `--rows` requests of 48
new tokens, all plain or all under the schema; decode ms per step (the manager's stats), medians of
three rounds.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys

import torch

import moetorch
from moetorch.benchmark import log
from moetorch.generation.grammar import Grammar, GrammarLogitsProcessor

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "ok", "n"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 999}}}
PROMPTS = ["def f(x):", "import os\n", "class A:\n    ", "# config\n", "x = ", "for i in range(3):\n"]


def valid(text: str) -> bool:
    try:
        v = json.loads(text)
    except ValueError:
        return False
    return (isinstance(v, dict) and set(v) == {"name", "ok", "n"} and isinstance(v["name"], str)
            and len(v["name"]) <= 12 and isinstance(v["ok"], bool) and isinstance(v["n"], int) and 0 <= v["n"] <= 999)


def run(model, gen, requests: dict, rows: int) -> tuple[dict, dict]:
    with model.continuous_batching_context_manager(generation_config=gen,
                                                   continuous_batching_config={"max_requests_per_batch": rows}) as m:
        for rid, (ids, kw) in requests.items():
            m.add_request(ids, request_id=rid, **kw)
        out = {}
        while len(out) < len(requests):
            r = m.get_result(timeout=300)
            out[r.request_id] = r
    return out, m.stats


def check(name: str, device: str) -> dict:
    tok = moetorch.AutoTokenizer.from_pretrained(name)
    model = moetorch.AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).to(device)
    V = model.config.vocab_size
    gs = {"schema": Grammar.json(tok, SCHEMA, vocab_size=V), "object": Grammar.json(tok, vocab_size=V),
          "regex": Grammar.regex(tok, r"(yes|no), [0-9]{1,3}!", vocab_size=V)}
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    gen = moetorch.GenerationConfig(max_new_tokens=60, do_sample=False, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id)
    requests = {f"{k}-{i}": (ids[i], {"grammar": g}) for k, g in gs.items() for i in range(2)}
    requests.update({f"plain-{i}": (p, {}) for i, p in enumerate(ids[:3])})
    requests["sampled"] = (ids[4], {"grammar": gs["schema"], "do_sample": True, "temperature": 1.3, "seed": 7})
    out, _ = run(model, gen, requests, 16)
    again, _ = run(model, gen, {"sampled": requests["sampled"], "plain-0": requests["plain-0"]}, 4)
    result = {"equal_generate": 0, "constrained": 0, "errors": [r.error for r in out.values() if r.error]}
    for rid, (prompt, kw) in requests.items():
        if rid == "sampled" or rid.startswith("object"):  # any object runs to the length: a near-tie in 60
            continue  # float32 steps may go either way between the batch's and generate's shapes
        procs = [GrammarLogitsProcessor(kw["grammar"])] if "grammar" in kw else []
        want = model.generate(torch.tensor([prompt], device=device), max_new_tokens=60, do_sample=False,
                              logits_processor=procs, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
        got = out[rid].generated_tokens
        if want and want[-1] == tok.eos_token_id and got == want[:-1]:
            want = got  # the grammar was done: the manager ends without the EOS that generate draws
        result["constrained"] += "grammar" in kw
        result["equal_generate"] += got == want[:len(got)] and len(got) == len(want)
    texts = {rid: tok.decode(r.generated_tokens, skip_special_tokens=True) for rid, r in out.items()}
    result["schema_valid"] = sum(valid(texts[k]) for k in ("schema-0", "schema-1", "sampled"))
    result["regex_match"] = sum(bool(re.fullmatch(r"(yes|no), [0-9]{1,3}!", texts[f"regex-{i}"])) for i in range(2))
    result["sampled_repeats"] = out["sampled"].generated_tokens == again["sampled"].generated_tokens
    result["texts"] = {k: texts[k] for k in ("schema-0", "regex-0", "sampled")}
    replay = gs["object"].matcher()
    for t in out["object-0"].generated_tokens:
        replay.consume(t)
    result["object_follows_grammar"] = replay.error is None and texts["object-0"].startswith("{")
    result["ok"] = (not result["errors"] and result["equal_generate"] == len(requests) - 3
                    and result["object_follows_grammar"]
                    and result["schema_valid"] == 3 and result["regex_match"] == 2 and result["sampled_repeats"])
    return result


def cost(name: str, device: str, rows: int) -> dict:
    tok = moetorch.AutoTokenizer.from_pretrained(name)
    model = moetorch.AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).to(device)
    g = Grammar.json(tok, SCHEMA, vocab_size=model.config.vocab_size)
    gen = moetorch.GenerationConfig(max_new_tokens=48, do_sample=False, eos_token_id=None,
                                    pad_token_id=tok.pad_token_id)
    prompts = [tok(PROMPTS[i % len(PROMPTS)] + str(i))["input_ids"] for i in range(rows)]
    arms: dict[str, list[float]] = {"plain": [], "schema": []}
    for _ in range(3):
        for arm in arms:
            kw = {"grammar": g, "eos_token_id": []} if arm == "schema" else {}
            _, stats = run(model, gen, {f"r{i}": (p, kw) for i, p in enumerate(prompts)}, rows)
            steps = len(stats["decode_rows"])
            arms[arm].append(1e3 * stats["decode_s"] / max(steps, 1))
    return {arm: {"decode_ms_per_step": statistics.median(v), "rounds": v} for arm, v in arms.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, default=64)
    a = p.parse_args(argv)
    report = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "torch": torch.__version__,
              "args": vars(a), "check": {}, "cost": {}}
    for name in ("tiny-phimoe", "tiny-jetmoe"):
        report["check"][name] = check(name, a.device)
        log(f"{name} check: {report['check'][name]}")
        report["cost"][name] = cost(name, a.device, a.rows)
        log(f"{name} cost: {report['cost'][name]}")
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    if not all(c["ok"] for c in report["check"].values()):
        sys.exit("grammar check failed")


if __name__ == "__main__":
    main()
