"""Output held to a grammar (moetorch/generation/grammar.py): the continuous-batching manager and
`generate` with `GrammarLogitsProcessor`, against Transformers' greedy `generate` with the same
masks applied by a processor written here on llguidance's own per-token mask; the outputs checked
as JSON, against regular expressions, and for every kind of bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from archs import longrope_scaling
from grammar_oracle import SCHEMA, agrees_with_oracle, check_schema, hf_constrained, same_as_oracle

import moetorch
from moetorch.defaults import ASSETS
from moetorch.generation.grammar import WORD, Grammar, GrammarLogitsProcessor, apply_bitmask, fill_rows

MODELS = ["tiny-phimoe", "tiny-jetmoe"]


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    name = request.param
    ours = moetorch.AutoModelForCausalLM.from_pretrained(name)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(ASSETS / name), dtype=torch.float32)
    tok = moetorch.AutoTokenizer.from_pretrained(name)
    return ours, theirs, tok


def grammars(tok, vocab: int) -> dict[str, Grammar]:
    return {"schema": Grammar.json(tok, SCHEMA, vocab_size=vocab), "object": Grammar.json(tok, vocab_size=vocab),
            "regex": Grammar.regex(tok, r"(yes|no), [0-9]{1,3}!", vocab_size=vocab),
            "lark": Grammar.lark(tok, 'start: "x = " NUM more ";"\nmore: | "+" NUM | "+" NUM "+" NUM\nNUM: /[1-9][0-9]?/',
                                 vocab_size=vocab)}


def test_batch_under_grammars_gives_transformers_tokens_under_the_same_masks(loaded):
    """Greedy requests under four grammars beside plain ones, in one batch: each gives
    Transformers' greedy tokens with the same grammar's mask (each token allowed by the oracle's
    mask and its greedy choice but for near ties, `agrees_with_oracle`); the plain ones their
    plain greedy tokens. `generate` with GrammarLogitsProcessor gives tokens that agree too."""
    ours, theirs, tok = loaded
    vocab = ours.config.vocab_size
    gs = grammars(tok, vocab)
    texts = ["def f(x):", "import os\n", "class A:\n    ", "# config\n"]
    prompts = [tok(t)["input_ids"] for t in texts]
    requests = {f"{kind}-{i}": (p, {"grammar": g}) for kind, g in gs.items() for i, p in enumerate(prompts[:2])}
    requests.update({f"plain-{i}": (p, {}) for i, p in enumerate(prompts)})
    n = 60
    gen = moetorch.GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id)
    out = {k: r.generated_tokens for k, r in
           moetorch_run(ours, gen, {"max_requests_per_batch": 6}, requests).items()}
    for rid, (prompt, kw) in requests.items():
        if "grammar" in kw:
            agrees_with_oracle(theirs, tok, kw["grammar"], prompt, out[rid], n)
            own = ours.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                logits_processor=[GrammarLogitsProcessor(kw["grammar"])], eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
            agrees_with_oracle(theirs, tok, kw["grammar"], prompt, own, n)
        else:
            want = theirs.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt):]
            assert out[rid] == want.tolist()
    # the texts, checked apart from llguidance
    for i in range(2):
        check_schema(tok.decode(out[f"schema-{i}"], skip_special_tokens=True))
        text = tok.decode(out[f"object-{i}"], skip_special_tokens=True)  # any object: it may run to the length
        assert isinstance(json.loads(text), dict) if len(out[f"object-{i}"]) < n else text.startswith("{")
        assert re.fullmatch(r"(yes|no), [0-9]{1,3}!", tok.decode(out[f"regex-{i}"], skip_special_tokens=True))
        assert re.fullmatch(r"x = [1-9][0-9]?(\+[1-9][0-9]?){0,2};", tok.decode(out[f"lark-{i}"], skip_special_tokens=True))


def moetorch_run(model, gen, cb, requests, results: int | None = None):
    with model.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb) as m:
        for rid, (prompt, kw) in requests.items():
            m.add_request(prompt, request_id=rid, **kw)
        out = {}
        while len(out) < (results or len(requests)):
            r = m.get_result(timeout=120)
            out[r.request_id] = r
    assert all(r.error is None for r in out.values()), {k: r.error for k, r in out.items()}
    return out


def test_sampled_requests_and_children_keep_to_the_schema(loaded):
    """Sampled requests (their own temperatures, top-p, seeds; num_return_sequences children;
    penalties) give JSON that the schema describes; seeds repeat; log-probabilities are those of
    the masked distribution (no -inf among the drawn tokens')."""
    ours, _, tok = loaded
    g = Grammar.json(tok, SCHEMA, vocab_size=ours.config.vocab_size)
    prompts = [tok(t)["input_ids"] for t in ("x = ", "def g():\n", "return ", "for i in range(3):\n")]
    gen = moetorch.GenerationConfig(max_new_tokens=80, do_sample=True, num_return_sequences=2,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    requests = {f"r{i}": (p, {"grammar": g, "temperature": 1.0 + 0.3 * i, "top_p": 0.95, "seed": i,
                              "frequency_penalty": 0.5 * (i % 2)}) for i, p in enumerate(prompts)}
    cb = {"max_requests_per_batch": 8, "return_logprobs": True}
    runs = [moetorch_run(ours, gen, cb, requests, results=8) for _ in range(2)]
    assert len(runs[0]) == 8
    for rid, r in runs[0].items():
        check_schema(tok.decode(r.generated_tokens, skip_special_tokens=True))
        assert all(lp > float("-inf") for lp in r.logprobs) and len(r.logprobs) == len(r.generated_tokens)
        assert r.generated_tokens == runs[1][rid].generated_tokens
    assert len({tuple(r.generated_tokens) for r in runs[0].values()}) > 1


def test_a_grammar_that_is_done_ends_the_request_without_eos(loaded):
    """With no end-of-sequence token (ignore_eos), a request ends where its grammar can take no
    further token; one that may end but go on runs to its length."""
    ours, theirs, tok = loaded
    vocab = ours.config.vocab_size
    done = Grammar.regex(tok, r"(yes|no)!", vocab_size=vocab)
    open_ended = Grammar.regex(tok, r"a+", vocab_size=vocab)
    prompt = tok("x = ")["input_ids"]
    gen = moetorch.GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id)
    out = moetorch_run(ours, gen, {}, {"done": (prompt, {"grammar": done}), "open": (prompt, {"grammar": open_ended})})
    with ours.continuous_batching_context_manager(generation_config=gen) as m:
        m.add_request(prompt, request_id="d", grammar=done, eos_token_id=[])
        m.add_request(prompt, request_id="o", grammar=open_ended, eos_token_id=[])
        got = {r.request_id: r for r in (m.get_result(timeout=60), m.get_result(timeout=60))}
    assert re.fullmatch(r"(yes|no)!", tok.decode(got["d"].generated_tokens))
    assert tok.eos_token_id not in got["d"].generated_tokens
    assert len(got["o"].generated_tokens) == 12 and re.fullmatch("a+", tok.decode(got["o"].generated_tokens))
    # with EOS allowed, the open grammar's request is Transformers' under the same mask
    same_as_oracle(out["open"].generated_tokens, hf_constrained(theirs, tok, open_ended, prompt, 12),
                   tok.eos_token_id, 12)


def test_generate_with_the_processor_keeps_beams_and_padded_rows_to_the_grammar(loaded):
    """GrammarLogitsProcessor in generate: left-padded rows, sampling with several sequences, and
    beam search (beams reorder between steps) all give text the grammar derives."""
    ours, _, tok = loaded
    pattern = r"(yes|no), [0-9]{1,3}!"
    g = Grammar.regex(tok, pattern, vocab_size=ours.config.vocab_size)
    tok.padding_side = "left"
    batch = tok(["x = ", "def long_function_name(a, b):\n"], return_tensors="pt", padding=True)
    for kw in ({"do_sample": False}, {"do_sample": True, "num_return_sequences": 3, "temperature": 2.0},
               {"num_beams": 3, "num_return_sequences": 2, "do_sample": False}):
        torch.manual_seed(0)
        out = ours.generate(**batch, max_new_tokens=12, logits_processor=[GrammarLogitsProcessor(g)],
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            assert re.fullmatch(pattern, tok.decode(row, skip_special_tokens=True)), (kw, tok.decode(row))
    # a row stopped by a stop string is padded with a token the grammar does not take: left alone
    free = Grammar.regex(tok, r"[a-z ]{1,40}", vocab_size=ours.config.vocab_size)
    kw = dict(max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    plain = ours.generate(**batch, logits_processor=[GrammarLogitsProcessor(free)], **kw)
    P = batch["input_ids"].shape[1]
    stop = tok.decode(plain[0, P:P + 2])[-1]
    out = ours.generate(**batch, logits_processor=[GrammarLogitsProcessor(free)], stop_strings=[stop], tokenizer=tok,
                        **kw)
    assert tok.pad_token_id in out[0, P:].tolist() and out.shape[1] > P + 2  # row 0 stopped, padded; row 1 went on


@pytest.mark.parametrize("past", [True, False], ids=["prompt-past-the-switch", "passes-it-decoding"])
def test_longrope_request_past_the_switch_follows_its_grammar(past):
    """A PhiMoE request past original_max_position_embeddings (its prompt, or its sequence while
    it decodes, when its row is computed again with the long factors) runs in the batch; its
    grammar goes with it, and its tokens are generate's with the same grammar."""
    tok = moetorch.AutoTokenizer.from_pretrained("tiny-phimoe")
    prompt = tok("def function_with_a_long_name(first, second):\n    return")["input_ids"]
    limit = 12 if past else len(prompt) + 4
    config = moetorch.AutoConfig.from_pretrained("tiny-phimoe").to_dict()
    for key in ("rope_parameters", "model_type", "transformers_version"):
        config.pop(key, None)
    config.update(rope_scaling=longrope_scaling(40, original=limit), max_position_embeddings=128)
    config = moetorch.PhimoeConfig(**config)
    ours = moetorch.AutoModelForCausalLM.from_pretrained("tiny-phimoe", config=config)
    g = Grammar.json(tok, SCHEMA, vocab_size=ours.config.vocab_size)
    assert len(prompt) > 12
    gen = moetorch.GenerationConfig(max_new_tokens=60, do_sample=False, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id)
    with ours.continuous_batching_context_manager(generation_config=gen) as m:
        m.add_request(prompt, request_id="j", grammar=g)
        r = m.get_result("j", timeout=60)
    assert m.stats["recomputed"] == (not past) and r.error is None and len(r.generated_tokens) > 4
    check_schema(tok.decode(r.generated_tokens, skip_special_tokens=True))
    want = ours.generate(torch.tensor([prompt]), logits_processor=[GrammarLogitsProcessor(g)], **gen.to_dict())
    want = want[0, len(prompt):].tolist()  # (generate then draws the end token; the batch ends where the grammar is done)
    assert r.generated_tokens == want[:len(r.generated_tokens)] and want[len(r.generated_tokens):] in ([], [tok.eos_token_id])
    # without an end token (ignore_eos), beside a request in the batch: it ends where its grammar is done
    with ours.continuous_batching_context_manager(generation_config=gen) as m:
        m.add_request(prompt, request_id="j", grammar=Grammar.regex(tok, r"(yes|no)!"), eos_token_id=[])
        m.add_request(tok("x = ")["input_ids"], request_id="other", max_new_tokens=20)
        got = {r.request_id: r for r in (m.get_result(timeout=60), m.get_result(timeout=60))}
    assert got["j"].error is None and got["other"].error is None and m.fatal_error is None
    assert re.fullmatch(r"(yes|no)!", tok.decode(got["j"].generated_tokens)) and len(got["other"].generated_tokens) == 20
    own = ours.generate(torch.tensor([prompt]), max_new_tokens=60, do_sample=False,
                        logits_processor=[GrammarLogitsProcessor(g)], eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    same_as_oracle(r.generated_tokens, own, tok.eos_token_id, 60)


def test_apply_bitmask_and_fill_rows():
    """apply_bitmask against a per-token reading of random words (all rows, some rows, a mask
    narrower than the logits); fill_rows over several rows equals row by row, and allows the
    end tokens given exactly where the grammar may end."""
    g = torch.Generator().manual_seed(0)
    V = 100
    words = torch.randint(-2**31, 2**31 - 1, (3, 4), generator=g, dtype=torch.int64).to(torch.int32)
    logits = torch.randn(5, V, generator=g)
    allowed = torch.tensor([[(int(words[r, t // WORD]) >> (t % WORD)) & 1 for t in range(V)] for r in range(3)]).bool()
    want = logits.clone()
    for j, row in enumerate([0, 2, 4]):
        want[row][~allowed[j]] = float("-inf")
    assert torch.equal(apply_bitmask(logits.clone(), words, torch.tensor([0, 2, 4])), want)
    narrow = apply_bitmask(torch.zeros(3, 130), words)
    assert torch.isinf(narrow[:, 128:]).all() and torch.equal(narrow[:, :100] == 0, allowed)

    tok = moetorch.AutoTokenizer.from_pretrained("tiny-phimoe")
    gr = Grammar.regex(tok, r"(x|y)z?")
    ms = [gr.matcher() for _ in range(3)]

    def allowed_ids(m, eos=()):
        bm = torch.empty(1, gr.vocab.words, dtype=torch.int32)
        fill_rows([m], [eos], bm)
        return (apply_bitmask(torch.zeros(1, gr.vocab.size), bm)[0] == 0).nonzero().flatten().tolist()

    ms[1].consume(next(t for t in allowed_ids(ms[1]) if tok.decode([t]) == "x"))
    ms[2].consume(next(t for t in allowed_ids(ms[2]) if tok.decode([t]) == "y"))
    ms[2].consume(next(t for t in allowed_ids(ms[2]) if tok.decode([t]) == "z"))
    assert not ms[1].done and ms[2].done
    eos = [[7], [7, 9], [9]]
    together = torch.empty(3, gr.vocab.words, dtype=torch.int32)
    fill_rows(ms, eos, together)
    for i, m in enumerate(ms):
        alone = torch.empty(1, gr.vocab.words, dtype=torch.int32)
        fill_rows([m], [eos[i]], alone)
        assert torch.equal(alone[0], together[i])
    ok = apply_bitmask(torch.zeros(3, gr.vocab.size), together) == 0
    texts = [{tok.decode([t]) for t in row.nonzero().flatten().tolist() if t not in (7, 9)} for row in ok]
    assert not ok[0, [7, 9]].any() and texts[0] >= {"x", "y"}  # at the start the grammar may not end
    assert ok[1, [7, 9]].all() and "z" in texts[1]  # after "x" it may end or take "z"
    assert ok[2].nonzero().flatten().tolist() == [9]  # after "yz" nothing but the end
    assert gr.vocab.end_token not in (7, 9) and not ok[:, gr.vocab.end_token].any()


def test_bad_grammars_and_grammar_arguments_are_errors_that_name_them(loaded):
    ours, _, tok = loaded
    with pytest.raises(ValueError, match="schema: Invalid type"):
        Grammar.json(tok, {"type": "objekt"})
    with pytest.raises(ValueError, match="schema: not JSON"):
        Grammar.json(tok, "{type: object")
    with pytest.raises(ValueError, match="schema: a JSON Schema is a JSON object, got list"):
        Grammar.json(tok, [1])
    with pytest.raises(ValueError, match="(?s)regex: .*unclosed group"):
        Grammar.regex(tok, "(a")
    with pytest.raises(ValueError, match="regex: a pattern is a string"):
        Grammar.regex(tok, 5)
    with pytest.raises(ValueError, match="lark: "):
        Grammar.lark(tok, "start: undefined_rule")
    with pytest.raises(ValueError, match="vocab_size=10 is below the tokenizer's"):
        Grammar.json(tok, vocab_size=10)
    with pytest.raises(TypeError, match="grammar must be a moetorch Grammar"):
        GrammarLogitsProcessor({"type": "object"})
    m = ours.init_continuous_batching()
    with pytest.raises(ValueError, match=r"add_request\('q'\): grammar must be a moetorch Grammar"):
        m.add_request([5, 6], request_id="q", grammar=r"\d+")
    wide = Grammar.json(tok, vocab_size=ours.config.vocab_size + 64)
    with pytest.raises(ValueError, match=r"the grammar's vocabulary \(\d+ tokens\) is wider than the model's"):
        m.add_request([5, 6], request_id="q", grammar=wide)
    narrow = Grammar.regex(tok, "a", vocab_size=len(tok))
    scores = torch.zeros(1, len(tok) + 64)
    with pytest.raises(ValueError, match="build it with vocab_size"):
        GrammarLogitsProcessor(narrow)(torch.tensor([[5]]), scores)


def test_a_negative_eos_id_is_no_token_to_allow():
    """A negative EOS id (one that never comes, which generate takes as Transformers does, and which
    `moetorch generate --grammar` passes on from the model's generation config) sets no bit: it is
    not read as a word counted from the end of the mask (the last token of a vocabulary that fills
    its words)."""
    tok = moetorch.AutoTokenizer.from_pretrained("tiny-phimoe")
    gr = Grammar.regex(tok, r"(x|y)z?", vocab_size=32 * 1003)  # whole words: bit -1 is a real token
    m = gr.matcher()
    bm = torch.empty(1, gr.vocab.words, dtype=torch.int32)
    fill_rows([m], [[]], bm)
    m.consume(next(t for t in (apply_bitmask(torch.zeros(1, gr.vocab.size), bm)[0] == 0).nonzero().flatten().tolist()
                   if tok.decode([t]) == "y"))  # the grammar may end here
    for eos in ([], [7]):
        with_negative, without = (torch.empty(1, gr.vocab.words, dtype=torch.int32) for _ in range(2))
        fill_rows([m], [[*eos, -1]], with_negative)
        fill_rows([m], [eos], without)
        assert torch.equal(with_negative, without), eos
        assert not (apply_bitmask(torch.zeros(1, gr.vocab.size), with_negative)[0, -1] == 0)
    assert GrammarLogitsProcessor(gr, [-1, 7]).eos == {7} and GrammarLogitsProcessor(gr, -1).eos == frozenset()
