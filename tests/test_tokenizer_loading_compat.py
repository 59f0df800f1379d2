"""Tokenizer loading against Transformers 5 on the same files: split_special_tokens, tokenizer.json's
truncation / padding sections, special tokens that are not (yet) added special tokens, Llama's
default special tokens, add_bos_token / add_eos_token and the post-processor; and the API pieces
scripts call: vocab, get_special_tokens_mask, init_kwargs, save_vocabulary, train_new_from_iterator,
BatchEncoding's char / word / token mappings and convert_to_tensors."""

from __future__ import annotations

import copy
import json
import logging
import shutil

import numpy as np
import pytest
import torch
import transformers
from tok_util import CORPUS, build_llama_tokenizer, build_tokenizer
from tokenizers import AddedToken, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer

from moetorch import BatchEncoding, Tokenizer
from moetorch.tokenizer import CharSpan, TokenSpan

TEXT = "hello world, the experts route <|end|> tokens"


@pytest.fixture(scope="module", params=["bpe", "llama"])
def path(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return build_tokenizer(directory) if request.param == "bpe" else build_llama_tokenizer(directory)


def both(path, **kwargs):
    return transformers.AutoTokenizer.from_pretrained(path, **kwargs), Tokenizer.from_pretrained(path, **kwargs)


def outcome(fn, tok):
    # a call's result, or its exception's type
    try:
        return fn(tok)
    except Exception as e:
        return type(e)


def same(fn, hf, ours):
    assert outcome(fn, ours) == outcome(fn, hf)


def variant(src, dst, config=None, drop=(), tokenizer_json=None):
    """A copy of the tokenizer at `src` with config keys set or dropped and tokenizer.json keys set."""
    shutil.copytree(src, dst)
    conf = json.loads((dst / "tokenizer_config.json").read_text())
    conf = {k: v for k, v in {**conf, **(config or {})}.items() if k not in drop}
    (dst / "tokenizer_config.json").write_text(json.dumps(conf))
    data = json.loads((dst / "tokenizer.json").read_text())
    (dst / "tokenizer.json").write_text(json.dumps({**data, **(tokenizer_json or {})}))
    return dst


def reloads_alike(hf, ours, tmp_path, fn):
    """`fn` of each library's save, loaded by both libraries, is the same throughout."""
    results = []
    for name, tok in (("hf", hf), ("ours", ours)):
        tok.save_pretrained(tmp_path / name)
        results += [fn(t) for t in both(tmp_path / name)]
    assert all(r == results[0] for r in results), results


# ---- 0. the config's added_tokens_decoder ------------------------------------------------------
def _flags(t):
    return sorted((i, str(v), v.special, v.lstrip, v.rstrip, v.single_word, v.normalized)
                  for i, v in t.added_tokens_decoder.items())


@pytest.mark.parametrize("seed", range(12))
def test_config_added_tokens_decoder_flags_match_transformers(path, tmp_path, seed):
    # Transformers 5 adds the config's tokens again: their flags replace tokenizer.json's (Phi-3's
    # chat tokens strip the whitespace after them there), a named special token stays special, and
    # a token the config lists that tokenizer.json lacks is added
    rng = np.random.default_rng(seed)
    data = json.loads((path / "tokenizer.json").read_text())
    llama = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class") == "LlamaTokenizer"
    listed = {}
    for token in data["added_tokens"]:
        # (a LlamaTokenizer config lists every added token in half the seeds, as real ones do; Transformers
        # rebuilds that tokenizer's added tokens from the list, so a partial one renumbers them)
        if (llama and seed < 6) or rng.random() < 0.7:
            flags = {k: bool(rng.random() < 0.4) for k in ("lstrip", "rstrip", "single_word", "normalized")}
            listed[str(token["id"])] = {"content": token["content"], **flags, "special": bool(rng.random() < 0.6)}
    if seed % 3 == 0:  # one the tokenizer lacks
        listed[str(len(data["added_tokens"]) + 1000)] = {"content": "<|new|>", "lstrip": False, "rstrip": True,
                                                           "single_word": False, "normalized": False, "special": True}
    directory = variant(path, tmp_path / "tok", config={"added_tokens_decoder": listed})
    hf, ours = both(directory)
    texts = [TEXT, " <|end|>  \n x<|end|>\t<s> y", "a<|system|> <|user|>b <|new|>  c", "<s><s> </s>  <|end|>\n\n"]
    for t in texts:
        assert ours(t)["input_ids"] == hf(t)["input_ids"], t
        ids = hf(t)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert _flags(ours) == _flags(hf) and len(ours) == len(hf)
    kept = {k: (str(v), v.special, v.rstrip, v.lstrip) for k, v in ours.init_kwargs["added_tokens_decoder"].items()}
    assert kept == {k: (str(v), v.special, v.rstrip, v.lstrip) for k, v in hf.init_kwargs["added_tokens_decoder"].items()}
    reloads_alike(hf, ours, tmp_path, lambda t: (_flags(t), [t(x)["input_ids"] for x in texts]))


@pytest.mark.parametrize("how", ["auto_keyword", "llama_class"])
def test_the_class_not_a_keyword_picks_the_llama_pipeline(path, tmp_path, how):
    # AutoTokenizer keeps a tokenizer_class keyword without acting on it; the LlamaTokenizer class
    # rebuilds any tokenizer.json with its own pipeline
    if how == "auto_keyword":
        hf = transformers.AutoTokenizer.from_pretrained(path, tokenizer_class="LlamaTokenizer")
        ours = Tokenizer.from_pretrained(path, tokenizer_class="LlamaTokenizer")
    else:
        hf = transformers.LlamaTokenizer.from_pretrained(path)
        from moetorch import LlamaTokenizer

        ours = LlamaTokenizer.from_pretrained(path)
    for text in (TEXT, "  two  spaces <|end|>x", "ünïcode\n\ttabs"):
        assert ours(text)["input_ids"] == hf(text)["input_ids"], text
        assert ours.decode(hf(text)["input_ids"]) == hf.decode(hf(text)["input_ids"])
    assert ours.padding_side == hf.padding_side


def test_config_added_tokens_decoder_of_another_type_is_an_error(path, tmp_path):
    directory = variant(path, tmp_path / "tok", config={"added_tokens_decoder": ["<s>"]})
    with pytest.raises(ValueError, match="added_tokens_decoder must be a dict"):
        Tokenizer.from_pretrained(directory)


# ---- 1. split_special_tokens ---------------------------------------------------------------------
def test_split_special_tokens_at_load_matches_transformers(path, tmp_path):
    def state(t):
        return (t.split_special_tokens, t(TEXT)["input_ids"], t.tokenize("<|end|>"),
                t(TEXT, split_special_tokens=False)["input_ids"])

    hf, ours = both(path, split_special_tokens=True)
    assert state(ours) == state(hf) and ours.split_special_tokens is True
    reloads_alike(hf, ours, tmp_path / "kw", state)
    config = variant(path, tmp_path / "config", config={"split_special_tokens": True})
    hf, ours = both(config)
    assert state(ours) == state(hf)
    for tok in (hf, ours):
        tok.split_special_tokens = False
    assert state(ours) == state(hf)
    assert ours.init_kwargs["split_special_tokens"] is hf.init_kwargs["split_special_tokens"] is True


# ---- 2. tokenizer.json's truncation and padding sections ----------------------------------------
TRUNCATION = {"direction": "Left", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
PADDING = {"strategy": "BatchLongest", "direction": "Left", "pad_to_multiple_of": None, "pad_id": 1, "pad_type_id": 0,
           "pad_token": "</s>"}


def _sides(t):
    return (t.truncation_side, t.padding_side, t.pad_token, t.pad_token_id,
            t([TEXT, "a"], padding=True, truncation=True, max_length=5)["input_ids"])


@pytest.mark.parametrize("sections", [{"truncation": TRUNCATION}, {"padding": PADDING},
                                      {"truncation": TRUNCATION, "padding": PADDING}])
@pytest.mark.parametrize("config_says", [True, False])
def test_truncation_and_padding_sections_match_transformers(path, tmp_path, sections, config_says):
    # defaults for truncation_side, padding_side and pad_token where the config does not set them
    drop = () if config_says else ("padding_side", "pad_token", "truncation_side")
    directory = variant(path, tmp_path / "tok", drop=drop, tokenizer_json=sections)
    hf, ours = both(directory)
    assert outcome(_sides, ours) == outcome(_sides, hf)
    hf, ours = both(directory, padding_side="right")  # a keyword still wins
    assert outcome(_sides, ours) == outcome(_sides, hf)
    for key in ("truncation_side", "padding_side", "max_length", "stride", "pad_to_multiple_of"):
        assert ours.init_kwargs.get(key, "-") == hf.init_kwargs.get(key, "-"), key
    if "padding" in sections or config_says:
        reloads_alike(hf, ours, tmp_path, _sides)


def test_transformers_save_after_a_truncating_call_reloads_alike(path, tmp_path):
    # Transformers' save writes the backend's truncation of its last call into tokenizer.json
    hf = transformers.AutoTokenizer.from_pretrained(path)
    hf.truncation_side = "left"
    hf(TEXT, truncation=True, max_length=4)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["truncation"]["direction"] == "Left"
    hf, ours = both(tmp_path)
    assert ours.truncation_side == "left" and outcome(_sides, ours) == outcome(_sides, hf)


# ---- 3. and 4. special tokens that are not added special tokens in tokenizer.json ----------------
def _specials(t):
    ids = t(TEXT + " <s>x <|system|>")["input_ids"]
    return (len(t), ids, t.decode(ids, skip_special_tokens=True),
            sorted((i, str(v), v.special, v.normalized) for i, v in t.added_tokens_decoder.items())[-8:])


def test_named_special_token_marked_not_special_matches_transformers(path, tmp_path):
    # Transformers makes a named special token special again at load (the extra ones stay as they are)
    data = json.loads((path / "tokenizer.json").read_text())
    for token in data["added_tokens"]:
        if token["content"] in ("<s>", "<|end|>", "<|system|>"):
            token.update(special=False, normalized=True)
    directory = variant(path, tmp_path / "tok", config={"extra_special_tokens": ["<|system|>", "<|end|>"]},
                        tokenizer_json={"added_tokens": data["added_tokens"]})
    hf, ours = both(directory)
    assert _specials(ours) == _specials(hf)
    # moetorch's own save after add_tokens(["<s>"]) (special=False in memory, as in Transformers)
    ours = Tokenizer.from_pretrained(path)
    ours.add_tokens(["<s>"])
    assert not ours.added_tokens_decoder[ours.bos_token_id].special
    ours.save_pretrained(tmp_path / "saved")
    hf, ours = both(tmp_path / "saved")
    assert _specials(ours) == _specials(hf) and ours.added_tokens_decoder[ours.bos_token_id].special


@pytest.mark.parametrize("config, kwargs", [
    ({"pad_token": "p", "sep_token": "<sep>"}, {}), ({"extra_special_tokens": ["x", "<new>", "<|end|>"]}, {}),
    ({"sep_token": {"content": "e", "lstrip": True, "normalized": False, "__type": "AddedToken"}}, {}),
    ({}, dict(pad_token="e", extra_special_tokens=["<new>", "x"])), ({}, dict(pad_token=AddedToken("e", lstrip=True))),
])
def test_special_token_from_the_vocabulary_matches_transformers(path, tmp_path, config, kwargs):
    # a special token that is an ordinary vocabulary entry becomes an added special token (text splits
    # around it; skip_special_tokens drops it; an AddedToken's lstrip holds), one missing from the
    # vocabulary a new one
    directory = variant(path, tmp_path / "tok", config=config)
    hf = transformers.AutoTokenizer.from_pretrained(directory, **copy.deepcopy(kwargs))  # it changes AddedTokens
    ours = Tokenizer.from_pretrained(directory, **copy.deepcopy(kwargs))
    assert _specials(ours) == _specials(hf)
    assert ours.decode(hf("apple pie x")["input_ids"], skip_special_tokens=True) == \
        hf.decode(hf("apple pie x")["input_ids"], skip_special_tokens=True)
    assert ours.get_added_vocab() == hf.get_added_vocab() and ours.all_special_ids == hf.all_special_ids


def test_pad_token_id_set_to_an_ordinary_token_reloads_alike(path, tmp_path):
    ours = Tokenizer.from_pretrained(path)
    ours.pad_token_id = ours.convert_tokens_to_ids("p")
    ours.save_pretrained(tmp_path)
    hf, ours = both(tmp_path)
    assert _specials(ours) == _specials(hf) and ours.pad_token == hf.pad_token == "p"


# ---- 5. LlamaTokenizer's default special tokens --------------------------------------------------
@pytest.mark.parametrize("tokenizer_class", ["LlamaTokenizer", "LlamaTokenizerFast"])
@pytest.mark.parametrize("add_bos_token", [None, True])
def test_llama_default_special_tokens_match_transformers(tmp_path, tokenizer_class, add_bos_token):
    directory = build_llama_tokenizer(tmp_path / "tok", tokenizer_class=tokenizer_class, bos_token=None,
                                      eos_token=None, unk_token=None, pad_token=None, add_bos_token=add_bos_token)
    hf, ours = both(directory)

    def state(t):
        return (t.bos_token, t.eos_token, t.unk_token, t.bos_token_id, t.eos_token_id, t.unk_token_id,
                t("Hello world")["input_ids"], t.decode(t("Hello world")["input_ids"], skip_special_tokens=True))

    assert state(ours) == state(hf) and ours.eos_token_id == 2
    nulls = variant(directory, tmp_path / "nulls", config={"bos_token": None, "eos_token": None})
    hf, ours = both(nulls)  # tokens the config sets to null stay unset
    assert state(ours) == state(hf) and ours.bos_token is None


# ---- 7. add_bos_token / add_eos_token and tokenizer.json's post-processor ------------------------
def _post(t):
    pair = t(TEXT, "and a pair", return_token_type_ids=True)
    return t(TEXT)["input_ids"], pair["input_ids"], pair["token_type_ids"], t.num_special_tokens_to_add(True)


def test_config_flags_that_match_the_post_processor_keep_it(path, tmp_path):
    # the files' post-processor adds <s> (type id 0 for both texts of a pair): add_bos_token=true in the
    # config says the same, so the post-processor is kept as Transformers keeps it
    hf, ours = both(variant(path, tmp_path / "tok", config={"add_bos_token": True}))
    assert _post(ours) == _post(hf) and set(_post(ours)[2]) == {0}
    assert ours.add_bos_token  # moetorch reads the config's flag (docs/differences.md); Transformers does not


@pytest.mark.parametrize("kw", [dict(add_eos_token=True), dict(add_bos_token=False), dict(add_bos_token=True)])
def test_keyword_flags_replace_the_config_flags_as_in_transformers(path, tmp_path, kw):
    hf, ours = both(variant(path, tmp_path / "tok", config={"add_bos_token": True}), **kw)
    assert _post(ours) == _post(hf)
    assert (ours.add_bos_token, ours.add_eos_token) == (hf.add_bos_token, hf.add_eos_token)


@pytest.mark.parametrize("config", [{}, {"add_bos_token": False}])
def test_no_post_processor_matches_transformers(path, tmp_path, config):
    # without one, Transformers builds one: the second text of a pair gets type id 1
    hf, ours = both(variant(path, tmp_path / "tok", config=config, tokenizer_json={"post_processor": None}))
    assert _post(ours) == _post(hf)


# ---- 6. API pieces --------------------------------------------------------------------------------
def test_vocab_special_tokens_mask_and_init_kwargs_match_transformers(path):
    hf, ours = both(path)
    assert ours.vocab == hf.vocab == ours.get_vocab()
    ids = hf(TEXT, "a pair")["input_ids"]
    for fn in (lambda t: t.get_special_tokens_mask(ids, already_has_special_tokens=True),
               lambda t: t.get_special_tokens_mask(torch.tensor(ids), already_has_special_tokens=True),
               lambda t: t.get_special_tokens_mask(ids, [5], already_has_special_tokens=True),
               lambda t: t.get_special_tokens_mask(ids)):
        same(fn, hf, ours)
    for kwargs in ({}, dict(model_max_length=9, add_eos_token=True, padding_side="left")):
        hf, ours = both(path, **kwargs)
        for key in ("name_or_path", "chat_template", "bos_token", "pad_token", "padding_side", "model_max_length",
                    "extra_special_tokens", "clean_up_tokenization_spaces", "add_bos_token", "add_eos_token",
                    "tokenizer_class"):
            assert str(ours.init_kwargs.get(key, "-")) == str(hf.init_kwargs.get(key, "-")), key
        assert {k: str(v) for k, v in ours.init_kwargs["added_tokens_decoder"].items()} == \
            {k: str(v) for k, v in hf.init_kwargs["added_tokens_decoder"].items()}


def test_save_vocabulary(path, tmp_path, caplog):
    hf, ours = both(path)
    with caplog.at_level(logging.ERROR):  # not a directory: logged, None, as in Transformers
        assert ours.save_vocabulary(tmp_path / "missing") is hf.save_vocabulary(str(tmp_path / "missing")) is None
    assert "should be a directory" in caplog.text
    # Transformers 5.23 fails here on a tokenizer read from tokenizer.json alone (no vocab_file); moetorch
    # writes the model's files, which hold its vocabulary and merges
    files = ours.save_vocabulary(tmp_path, "pre")
    assert [f.rsplit("/", 1)[1] for f in files] == ["pre-vocab.json", "pre-merges.txt"]
    vocab = json.loads((tmp_path / "pre-vocab.json").read_text())
    assert len(vocab) == hf.vocab_size and all(hf.vocab[k] == v for k, v in vocab.items())
    assert (tmp_path / "pre-merges.txt").read_text().startswith("#version")


@pytest.mark.parametrize("kwargs", [{}, dict(new_special_tokens=["<new1>", "<new2>"]), dict(min_frequency=2),
                                    dict(special_tokens_map={"<s>": "<bos>", "<|end|>": "<|eot|>"})])
@pytest.mark.parametrize("load", [{}, dict(add_eos_token=True)])
def test_train_new_from_iterator_matches_transformers(path, kwargs, load):
    hf, ours = both(path, **load)
    batches = [CORPUS[:2], CORPUS[2:], ["new words like zebra and quokka"]] * 2
    size = 120 if path.name.startswith("bpe") else 380
    a, b = (t.train_new_from_iterator(iter(batches), size, **kwargs) for t in (hf, ours))
    assert type(b) is type(ours)
    text = "Zebras route experts <|end|> quokka <s>x <new1> <|eot|>"
    for fn in (lambda t: (len(t), t.get_vocab(), t.special_tokens_map, t.extra_special_tokens, t.all_special_ids),
               lambda t: (t(text)["input_ids"], t(text, "pair")["input_ids"], t.add_bos_token, t.add_eos_token),
               lambda t: t.decode(t(text)["input_ids"], skip_special_tokens=True),
               lambda t: sorted((i, str(v), v.special) for i, v in t.added_tokens_decoder.items())):
        assert fn(b) == fn(a)


@pytest.mark.parametrize("kind", ["WordPiece", "WordLevel", "Unigram"])
def test_train_new_from_iterator_other_models_match_transformers(tmp_path, kind):
    words = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "hello", "world", "the", "experts", "route", "tokens", "a", "b"]
    model = {"WordPiece": lambda: models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"),
             "WordLevel": lambda: models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"),
             "Unigram": lambda: models.Unigram([(w, -1.0) for w in words], unk_id=0)}[kind]()
    tok = RustTokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens(["[UNK]", "[PAD]", "[CLS]", "[SEP]"])
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    tmp_path.mkdir(exist_ok=True)
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", "pad_token": "[PAD]",
              "cls_token": "[CLS]", "sep_token": "[SEP]"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf, ours = both(tmp_path)
    a, b = (t.train_new_from_iterator([CORPUS] * 3, 60, special_tokens_map={"[SEP]": "[END]"}) for t in (hf, ours))
    # `tokenizers` numbers these models' vocabularies differently from run to run: compare the tokens
    text = "The experts route two tokens [SEP] [END] zebra"
    for fn in (lambda t: (len(t), set(t.get_vocab()), t.special_tokens_map, t.all_special_ids, t.all_special_tokens),
               lambda t: t.convert_ids_to_tokens(t(text, "pair")["input_ids"])):
        assert fn(b) == fn(a)


# ---- 6. BatchEncoding ----------------------------------------------------------------------------
CALLS = ["token_to_chars(1)", "token_to_chars(0)", "token_to_chars(0, 2)", "token_to_chars(-1, 1)",
         "token_to_word(2)", "token_to_word(0, 0)", "token_to_word(0, 99)", "token_to_sequence(1)",
         "token_to_sequence(0, 3)", "word_to_tokens(0)", "word_to_tokens(0, 1)", "word_to_tokens(0, 0, 1)",
         "word_to_tokens(9)", "word_to_chars(0)", "word_to_chars(0, 1)", "word_to_chars(0, 0, 1)", "word_to_chars(50)",
         "char_to_token(3)", "char_to_token(0, 6)", "char_to_token(0, 2, 1)", "char_to_token(500)",
         "char_to_token(-1, 1)", "char_to_word(3)", "char_to_word(0, 7)", "char_to_word(0, 1, 1)", "n_sequences",
         "is_fast"]


def _call(expression):
    return lambda e: eval("e." + expression)


@pytest.mark.parametrize("args, kwargs", [
    ((["hello world", "a b c"], ["pair x", "y z"]), {}), (("hello world",), {}),
    ((["Sparse models", "x"],), dict(padding=True, return_tensors="pt")),
    (([["hello", "world"], ["a"]],), dict(is_split_into_words=True)),
])
def test_batch_encoding_mappings_match_transformers(path, args, kwargs):
    hf, ours = both(path)
    a, b = hf(*args, **kwargs), ours(*args, **kwargs)
    for call in CALLS:
        want, got = outcome(_call(call), a), outcome(_call(call), b)
        assert got == want and type(got).__name__ == type(want).__name__, call
    assert isinstance(b.token_to_chars(1), CharSpan) and isinstance(b.word_to_tokens(0), TokenSpan)
    # negative token indices count from the row's end (Transformers 5.23 fails on them)
    assert b.token_to_word(-1) == b.token_to_word(len(b.tokens()) - 1)
    assert b.token_to_chars(0, -1) == a.token_to_chars(0, len(a.tokens()) - 1)


def test_batch_encoding_without_encodings_matches_transformers(path):
    hf, ours = both(path)
    plain = (transformers.BatchEncoding({"input_ids": [[1, 2]]}), BatchEncoding({"input_ids": [[1, 2]]}))
    padded = (hf.pad([{"input_ids": [1, 2]}, {"input_ids": [3]}]), ours.pad([{"input_ids": [1, 2]}, {"input_ids": [3]}]))
    for want, got in (plain, padded):
        assert (got.is_fast, got.n_sequences) == (want.is_fast, want.n_sequences) == (False, None)
        for call in ("char_to_token(0)", "token_to_word(0)", "word_to_tokens(0)", "token_to_chars(0)",
                     "word_to_chars(0)", "char_to_word(0)", "token_to_sequence(0)"):
            assert outcome(_call(call), got) is outcome(_call(call), want) is ValueError
    # one tokenizers.Encoding given by hand
    want = transformers.BatchEncoding({"input_ids": [1]}, hf("hello world", "x")[0])
    got = BatchEncoding({"input_ids": [1]}, ours("hello world", "x")[0])
    assert (got.n_sequences, got.char_to_token(3), got.is_fast) == (want.n_sequences, want.char_to_token(3), True)


def _arrays(e):
    return {k: (type(v).__name__, str(v.dtype), tuple(v.shape), v.tolist()) for k, v in e.items()}


@pytest.mark.parametrize("tensor_type", ["pt", "np"])
def test_batch_encoding_convert_to_tensors_matches_transformers(tensor_type):
    data = {"input_ids": [[1, 2], [3, 4]], "scores": [[0.5, 1.0], [2.0, 3.0]], "empty": [[], []]}
    for classes in ((transformers.BatchEncoding, BatchEncoding),):
        want, got = (cls(data, tensor_type=tensor_type) for cls in classes)
        assert _arrays(got) == _arrays(want)
        want, got = (cls({"input_ids": [1, 2], "x": []}).convert_to_tensors(tensor_type, prepend_batch_axis=True)
                     for cls in classes)
        assert _arrays(got) == _arrays(want)
        arrays = {"input_ids": [np.array([1, 2]), np.array([3, 4])]}  # a list of numpy rows
        want, got = (cls(arrays).convert_to_tensors(tensor_type) for cls in classes)
        assert _arrays(got) == _arrays(want)
        for cls in classes:
            e = cls({"input_ids": [[1, 2]]})
            assert e.convert_to_tensors(None) is e and e["input_ids"] == [[1, 2]]
            assert e.convert_to_tensors(tensor_type) is e
            with pytest.raises(ValueError):
                cls({"input_ids": [[1, 2]]}).convert_to_tensors("tf")
    for cls in classes:
        with pytest.raises(ValueError):
            cls({"input_ids": [[1, 2], [3]]}).convert_to_tensors("pt")
    # rows of different lengths as numpy: Transformers makes an object array, moetorch a ValueError
    # that says to pad, as for return_tensors="np" (docs/differences.md)
    with pytest.raises(ValueError, match="padding=True"):
        BatchEncoding({"input_ids": [[1, 2], [3]]}, tensor_type="np")
    assert torch.is_tensor(BatchEncoding({"input_ids": [[1]]}, tensor_type="pt")["input_ids"])
