"""moetorch's text-classification pipeline against Transformers' (the oracle): classifiers built from
the embedded tiny models, each call form and option, the results' shapes, labels and scores."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers

import moetorch

ASSETS = Path(moetorch.__file__).parent / "assets"
TEXTS = ["The experts route tokens", "Bananas are yellow", "A", "Mixture of experts, at last!"]


def classifier_dir(tmp: Path, name: str, **config) -> Path:
    """A classifier checkpoint (Transformers' class, seeded head) with the embedded model's tokenizer."""
    out = tmp / f"{name}-{'-'.join(f'{k}' for k in config) or 'plain'}"
    if out.exists():
        return out
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(ASSETS / name), **config)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.5)
    model.save_pretrained(out)
    for f in (ASSETS / name).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def same(got, want, path="result"):
    """Equal structure and labels; scores within the logits' parity tolerance of each other."""
    assert type(got) is type(want), (path, got, want)
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for k in want:
            same(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), (path, got, want)
        for i, (g, w) in enumerate(zip(got, want)):
            same(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert abs(got - want) <= 1e-5 + 1e-5 * abs(want), (path, got, want)  # (parity.py's tolerances)
    else:
        assert got == want, path


@pytest.fixture(scope="module", params=["tiny-phimoe", "tiny-jetmoe"])
def name(request):
    return request.param


@pytest.mark.parametrize("config", [
    {"num_labels": 3, "id2label": {0: "neg", 1: "neutral", 2: "pos"}, "label2id": {"neg": 0, "neutral": 1, "pos": 2}},
    {"num_labels": 1},  # one label: a sigmoid
    {"num_labels": 4, "problem_type": "multi_label_classification"},
    {"num_labels": 2, "problem_type": "regression"},
])
def test_classification_pipeline_matches_transformers(name, config, tmp_path_factory):
    path = classifier_dir(tmp_path_factory.mktemp("cls"), name, **config)
    theirs = transformers.pipeline("text-classification", model=str(path))
    ours = moetorch.pipeline("text-classification", model=str(path))
    assert isinstance(ours, moetorch.TextClassificationPipeline) and ours.task == "text-classification"
    calls = [
        (TEXTS[0], {}), (TEXTS, {}), (TEXTS[1], {"top_k": None}), (TEXTS[:2], {"top_k": 2}), (TEXTS[3], {"top_k": 1}),
        ({"text": TEXTS[0], "text_pair": TEXTS[1]}, {}), ([{"text": TEXTS[2], "text_pair": TEXTS[3]}], {"top_k": None}),
        (TEXTS[0], {"function_to_apply": "none"}), (TEXTS[1], {"function_to_apply": "SIGMOID", "top_k": None}),
        (TEXTS[2], {"function_to_apply": "softmax"}), (TEXTS[3], {"truncation": True, "max_length": 3}),
        (tuple(TEXTS[:2]), {}),  # (one input to the tokenizer, as there: the first text's result)
    ]
    for inputs, kwargs in calls:
        torch.manual_seed(1)
        want, want_rng = theirs(inputs, **kwargs), torch.rand(2)
        torch.manual_seed(1)
        got, got_rng = ours(inputs, **kwargs), torch.rand(2)
        same(got, want, f"{inputs!r} {kwargs}")
        assert torch.equal(got_rng, want_rng), (inputs, kwargs)  # list inputs: the DataLoader's one draw
    # a generator gives the results one at a time
    got = ours(t for t in TEXTS[:2])
    assert not isinstance(got, list) and list(got) == ours(TEXTS[:2])


def test_classification_pipeline_options_and_models(name, tmp_path):
    path = classifier_dir(tmp_path, name, num_labels=3)
    # the pipeline's own top_k and function_to_apply hold for every call; "sentiment-analysis" is the same task
    theirs = transformers.pipeline("sentiment-analysis", model=str(path), top_k=2, function_to_apply="sigmoid")
    ours = moetorch.pipeline("sentiment-analysis", model=str(path), top_k=2, function_to_apply="sigmoid")
    for inputs in (TEXTS[0], TEXTS[:3]):
        same(ours(inputs), theirs(inputs))
    # a loaded model and tokenizer
    model = moetorch.AutoModelForSequenceClassification.from_pretrained(path)
    tok = moetorch.AutoTokenizer.from_pretrained(path)
    same(moetorch.pipeline("text-classification", model=model, tokenizer=tok)(TEXTS),
         transformers.pipeline("text-classification", model=str(path))(TEXTS))


def test_classification_pipeline_bad_input(tmp_path):
    path = classifier_dir(tmp_path, "tiny-phimoe", num_labels=2)
    ours = moetorch.pipeline("text-classification", model=str(path))
    with pytest.raises(ValueError, match="function_to_apply must be one of .'sigmoid', 'softmax', 'none'., got 'tanh'"):
        ours(TEXTS[0], function_to_apply="tanh")
    with pytest.raises(ValueError, match="top_k must be a positive integer or None"):
        ours(TEXTS[0], top_k=0)
    with pytest.raises(ValueError, match="text pairs"):  # a pair is a dict, as in Transformers
        ours([[TEXTS[0], TEXTS[1]]])
    with pytest.raises(TypeError, match="inputs must be a text"):
        ours(3)
    # as Transformers: no second positional argument, a positive integer batch size, the device as given
    theirs = transformers.pipeline("text-classification", model=str(path), device="cpu:0")
    ours = moetorch.pipeline("text-classification", model=str(path), device="cpu:0")
    assert ours.device == theirs.device == torch.device("cpu", 0)
    for p in (theirs, ours):
        with pytest.raises(TypeError, match="positional"):
            p(TEXTS[0], 2)
        for bad in (True, 0):
            with pytest.raises(ValueError, match=f"batch_size={bad}"):
                p(TEXTS[:2], batch_size=bad)
            p(TEXTS[0], batch_size=bad)  # one input: no batches
    with pytest.raises(ValueError, match=r"pipeline\('text-classification'\) needs a sequence classifier"):
        moetorch.pipeline("text-classification", model=moetorch.AutoModelForCausalLM.from_pretrained("tiny-phimoe"))
    classifier = moetorch.AutoModelForSequenceClassification.from_pretrained(path)
    with pytest.raises(ValueError, match=r"pipeline\('text-generation'\) needs a causal LM"):
        moetorch.pipeline("text-generation", model=classifier, tokenizer=str(path))


def test_classification_pipeline_older_forms_as_transformers(tmp_path):
    """A pair as [[text, pair]] (Transformers' older form), a tokenizer given as (name, keywords),
    and the dtype the pipeline reports."""
    path = classifier_dir(tmp_path, "tiny-jetmoe", num_labels=3)
    theirs = transformers.pipeline("text-classification", model=str(path), tokenizer=(str(path), {"truncation_side":
                                                                                                "left"}))
    ours = moetorch.pipeline("text-classification", model=str(path), tokenizer=(str(path), {"truncation_side": "left"}))
    assert ours.tokenizer.truncation_side == theirs.tokenizer.truncation_side == "left"
    pair = [[[TEXTS[0], TEXTS[1]]]]
    same(ours(pair), theirs(pair))
    same(ours(pair), [theirs({"text": TEXTS[0], "text_pair": TEXTS[1]})])  # (the same pair, as there)
    assert ours.dtype == theirs.dtype == torch.float32
    with pytest.raises(ValueError, match=r"a tokenizer given as a tuple is \(name, keywords\)"):
        moetorch.pipeline("text-classification", model=str(path), tokenizer=(str(path),))
