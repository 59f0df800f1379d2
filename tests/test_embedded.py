"""The embedded default models: they load, match their recorded held-out perplexity, and greedy
generation is deterministic and decodes to on-topic text."""

from __future__ import annotations

import json

import pytest
import torch

from moetorch import AutoModelForCausalLM, Tokenizer
from moetorch.defaults import ASSETS, EMBEDDED, HELDOUT_SAMPLE, heldout_perplexity, resolve_model


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_model_matches_its_recorded_perplexity(name):
    path, is_random = resolve_model(name)
    assert path == ASSETS / name and not is_random
    recipe = json.loads((path / "recipe.json").read_text())
    assert (path / "model.safetensors").stat().st_size <= 16_000_000
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    tok = Tokenizer.from_pretrained(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the recorded number was measured single-threaded too
    try:
        ppl = heldout_perplexity(model, tok, HELDOUT_SAMPLE.read_text(encoding="utf-8"))
    finally:
        torch.set_num_threads(threads)  # (the tests after it keep theirs)
    assert ppl == pytest.approx(recipe["heldout_sample_ppl"], rel=1e-4)
    assert ppl < 40  # a trained model: a uniform guess over 4096 tokens would be 4096


@pytest.mark.parametrize("name", EMBEDDED)
def test_greedy_generation_is_deterministic_and_on_topic(name):
    path, _ = resolve_model(name)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = Tokenizer.from_pretrained(path)
    enc = tok("def read_config(path):\n    ", return_tensors="pt")
    a = model.generate(**enc, max_new_tokens=40, do_sample=False)
    b = model.generate(**enc, max_new_tokens=40, do_sample=False)
    assert torch.equal(a, b)
    text = tok.decode(a[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 20
    # Python-flavoured: at least a couple of the stdlib's commonest words and symbols
    hits = sum(w in text for w in ("self", "return", "(", ")", "=", ".", "if", "path", "None", ":"))
    assert hits >= 3, text


def test_default_is_the_trained_phimoe():
    path, is_random = resolve_model(None)
    assert path.name == "tiny-phimoe" and not is_random


@pytest.mark.parametrize("name", EMBEDDED)
def test_from_pretrained_takes_an_embedded_models_name(name, tmp_path, monkeypatch):
    """`from_pretrained("tiny-phimoe")` loads the shipped model (as Transformers loads a hub name);
    a local directory of that name comes first; an unknown name says what it accepts."""
    from moetorch import AutoConfig, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(name)
    ref = AutoModelForCausalLM.from_pretrained(ASSETS / name)
    assert model.name_or_path == name
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert AutoConfig.from_pretrained(name).to_json_string() == ref.config.to_json_string()
    assert AutoTokenizer.from_pretrained(name)("def f():")["input_ids"] == Tokenizer.from_pretrained(
        ASSETS / name)("def f():")["input_ids"]
    assert GenerationConfig.from_pretrained(name).eos_token_id == ref.generation_config.eos_token_id
    monkeypatch.chdir(tmp_path)
    ref.config.num_hidden_layers = 1
    local = type(ref)(ref.config)
    local.save_pretrained(tmp_path / name)
    assert AutoModelForCausalLM.from_pretrained(name).config.num_hidden_layers == 1
    with pytest.raises(FileNotFoundError, match="'tiny-nothing' is not a local directory.*Embedded models: tiny-phimoe"):
        AutoModelForCausalLM.from_pretrained("tiny-nothing")
