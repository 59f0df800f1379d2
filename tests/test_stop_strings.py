"""`StopStringCriteria` over a tokenizer's vocabulary against Transformers' own class, on each kind
of vocabulary it treats apart (GPT-2 byte-level, Llama byte-fallback, plain text), on fresh random
rows; and `generate` with stop strings, read a step late or every step, against Transformers'."""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers
from archs import ARCH_IDS, ARCHS
from parity import make_pair
from tok_util import CORPUS, build_llama_tokenizer, build_tokenizer
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import moetorch
from moetorch.defaults import ASSETS
from moetorch.generation.stopping_criteria import StopStringCriteria

TEXTS = CORPUS + ["  two spaces\tand a tab\n\nnew lines", "ünïcödé € 2x + 3 = 7", "def f(x):\n    return x\n"]
STOPS = ["\n", "two", "x = ", " ", "ü", "é €", "7", "experts", "s.", ":\n", "<|end|>", "anana", "\n\n"]


def build_wordpiece(directory):
    """A WordPiece vocabulary ("##" continuations): tokens matched as text, not bytes."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(TEXTS * 10, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[PAD]"]))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", "pad_token": "[PAD]"}))
    return directory


KINDS = {"byte-level": build_tokenizer, "byte-fallback": build_llama_tokenizer, "wordpiece": build_wordpiece,
         "tiny-phimoe": None}


@pytest.fixture(scope="module", params=list(KINDS))
def tokenizers(request, tmp_path_factory):
    build = KINDS[request.param]
    path = str(ASSETS / request.param) if build is None else build(tmp_path_factory.mktemp(request.param))
    return moetorch.AutoTokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)


def test_matches_transformers_criteria_on_random_rows(tokenizers):
    """Rows cut from encoded text at random ends (so that stop strings end inside, at and past
    their last tokens), random ids (some outside the vocabulary), and rows shorter than the
    window; random sets of stop strings, multi-byte characters and special tokens' text among them."""
    ours_tok, hf_tok = tokenizers
    rng = random.Random()
    seed = rng.randrange(2**31)
    rng.seed(seed)
    ids = [t for text in TEXTS * 3 for t in ours_tok(text, add_special_tokens=False)["input_ids"]]
    assert ids == [t for text in TEXTS * 3 for t in hf_tok(text, add_special_tokens=False)["input_ids"]]
    hits = 0
    for _ in range(8):
        stops = rng.sample(STOPS, rng.randint(1, 4))
        try:
            theirs = transformers.StopStringCriteria(hf_tok, stops)
        except ValueError:  # no stop string that any token can end (WordPiece has no "\n"): both refuse them
            with pytest.raises(ValueError, match="no token of the vocabulary can end"):
                StopStringCriteria(ours_tok, stops)
            continue
        ours = StopStringCriteria(ours_tok, stops)
        assert ours.on_device
        for width in (1, 2, 5, 16):
            ends = [rng.randrange(width, len(ids) + 1) for _ in range(64)]
            cut = torch.tensor([ids[e - width:e] for e in ends])
            noise = torch.randint(0, len(ours_tok) + 8, (64, width), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
            for rows in (cut, noise):
                want = theirs(rows, None)
                assert torch.equal(ours(rows, None), want), (seed, stops, width)
                hits += int(want.sum())
    assert hits > 0, seed  # the rows do match now and then (byte-level: 15 to a few hundred hits a seed)


def test_tables_on_one_device_leave_other_criteria_alone(tokenizers):
    """Criteria with the same tokenizer and stop strings share their tables; a call on another
    device copies them there and leaves the shared ones (and the other criteria) as they were."""
    ours_tok, _ = tokenizers
    a, b = StopStringCriteria(ours_tok, ["two"]), StopStringCriteria(ours_tok, ["two"])
    assert a.tables is b.tables
    ids = torch.tensor([ours_tok("and two", add_special_tokens=False)["input_ids"]])
    assert a(ids.to("meta"), None).device.type == "meta"
    assert b.tables.tail.device.type == "cpu" and bool(b(ids, None)[0]) == bool(a(ids, None)[0])


def test_errors_name_the_problem(tokenizers):
    ours_tok, _ = tokenizers
    with pytest.raises(ValueError, match="non-empty strings"):
        StopStringCriteria(ours_tok, ["a", ""])
    with pytest.raises(ValueError, match="non-empty strings"):
        StopStringCriteria(ours_tok, [])
    with pytest.raises(TypeError, match="needs a tokenizer with a vocabulary"):
        StopStringCriteria(object(), ["a"])


@pytest.fixture(scope="module", params=ARCHS, ids=ARCH_IDS)
def model_pair(request, tmp_path_factory):
    path = build_llama_tokenizer(tmp_path_factory.mktemp("tok"))
    ours_tok, hf_tok = moetorch.AutoTokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
    hf, ours = make_pair(request.param, tmp_path_factory.mktemp(f"stop-{request.param.name}"), seed=3,
                         vocab_size=len(ours_tok))
    return hf, ours, ours_tok, hf_tok


def test_generate_with_stop_strings_equals_transformers_read_late_or_not(model_pair):
    """Sampled rows (each stopping at its own step) with stop strings: Transformers' tokens, with
    the stop read a step late (`lagged_stop`, no host read) and read every step alike."""
    hf, ours, ours_tok, hf_tok = model_pair
    prompt = hf_tok(["two spaces", "The mixture"], return_tensors="pt", padding=True)
    stops = ["ex", "mo", "ü", "zzz"]  # the last never matches
    kw = dict(max_new_tokens=30, stop_strings=stops, do_sample=True, temperature=1.0, num_return_sequences=3,
              pad_token_id=hf_tok.pad_token_id)
    torch.manual_seed(7)
    want = hf.generate(**prompt, tokenizer=hf_tok, **kw)
    for late in (True, False):
        ours.lagged_stop = late
        try:
            torch.manual_seed(7)
            got = ours.generate(**prompt, tokenizer=ours_tok, **kw)
        finally:
            ours.lagged_stop = None
        assert torch.equal(got, want), late
    assert want.shape[1] < prompt["input_ids"].shape[1] + 30  # a stop string ended it


@pytest.mark.parametrize("name", ["tiny-phimoe", "tiny-jetmoe"])
def test_transformers_stop_string_criteria_take_a_moetorch_tokenizer(name):
    """Transformers' own StopStringCriteria (its generate's stop_strings, or built by hand) reads a
    moetorch tokenizer as it reads its own: the same tables, the same stopping points."""
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(ASSETS / name)
    theirs, ours = (lib.AutoTokenizer.from_pretrained(ASSETS / name) for lib in (transformers, moetorch))
    ids = theirs(["The quick brown fox", "Hello"], return_tensors="pt", padding=True)
    for stops in (["the"], [" a", "e"], ["\n", "xy"]):
        want = hf_model.generate(**ids, max_new_tokens=20, do_sample=False, stop_strings=stops, tokenizer=theirs)
        got = hf_model.generate(**ids, max_new_tokens=20, do_sample=False, stop_strings=stops, tokenizer=ours)
        assert torch.equal(got, want), stops
        criteria = [transformers.StopStringCriteria(tok, stops) for tok in (theirs, ours)]
        for a, b in zip(vars(criteria[0]).items(), vars(criteria[1]).items()):
            assert a[0] == b[0] and (torch.equal(a[1], b[1]) if torch.is_tensor(a[1]) else a[1] == b[1]), a[0]
    assert ours._convert_id_to_token(5) == theirs._convert_id_to_token(5)
    assert ours._convert_token_to_id(theirs._convert_id_to_token(7)) == 7
