"""The tokenizer's Transformers-5 behaviours against Transformers' own tokenizer loaded from the
same files: chat prefill (continue_final_message), max_length, clean-up, special-token setters
and extra special tokens, BatchEncoding, decoding, pad(), call options, add_bos/eos_token, and
stride / overflowing tokens, is_split_into_words and text_target."""

from __future__ import annotations

import json
import logging
import pickle

import numpy as np
import pytest
import torch
import transformers
from tok_util import build_llama_tokenizer, build_tokenizer
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer

from moetorch import Tokenizer

TEXTS = ["Honey routes two dragonfruits, then experts.", "Sparse: a few!", "x = 7 so 3x - 1 = 20 ✓"]
EXTRA = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def extra_path(tmp_path_factory):
    # additional special tokens in the config, as Transformers 4 (and Phi-3.5) write them
    directory = build_tokenizer(tmp_path_factory.mktemp("tok_extra"))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "additional_special_tokens": EXTRA}))
    return directory


def both(path, **kwargs):
    return transformers.AutoTokenizer.from_pretrained(path, **kwargs), Tokenizer.from_pretrained(path, **kwargs)


def raises_both(fn, *toks):
    for tok in toks:
        with pytest.raises((ValueError, TypeError)):
            fn(tok)


# ---- 1. continue_final_message ------------------------------------------------------------------
LIST_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{% if m.content is string %}{{ m.content }}{% else %}"
    "{% for b in m.content %}{% if b.type == 'text' %}{{ b.text }}{% endif %}{% endfor %}{% endif %}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TRIM_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content | trim }}<|end|>\n{% endfor %}"


@pytest.mark.parametrize("content", ["y = ", "Steps:\n", "end", "s", "<|end|>", "  both sides  ", "two\n\n", "a"])
def test_continue_final_message_matches_transformers(path, content):
    hf, ours = both(path)
    chat = [{"role": "user", "content": "Add 2 and 5."}, {"role": "assistant", "content": content}]
    for template in (None, LIST_TEMPLATE, TRIM_TEMPLATE):
        want = hf.apply_chat_template(chat, chat_template=template, continue_final_message=True, tokenize=False)
        got = ours.apply_chat_template(chat, chat_template=template, continue_final_message=True, tokenize=False)
        assert got == want, (template, content)
    want = hf.apply_chat_template(chat, continue_final_message=True, return_dict=False)
    assert ours.apply_chat_template(chat, continue_final_message=True, return_dict=False) == want
    assert chat[-1]["content"] == content  # the caller's message is left alone


def test_continue_final_message_text_blocks_and_batches(path):
    hf, ours = both(path)
    blocks = [{"type": "text", "text": "First: "}, {"type": "image"}, {"type": "text", "text": "then s"}]
    chats = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": blocks}],
             [{"role": "user", "content": "end"}, {"role": "assistant", "content": [{"type": "text", "text": "end"}]}]]
    kw = dict(chat_template=LIST_TEMPLATE, continue_final_message=True)
    assert ours.apply_chat_template(chats, tokenize=False, **kw) == hf.apply_chat_template(chats, tokenize=False, **kw)
    a = hf.apply_chat_template(chats, padding=True, return_tensors="pt", **kw)
    b = ours.apply_chat_template(chats, padding=True, return_tensors="pt", **kw)
    assert torch.equal(a["input_ids"], b["input_ids"])
    no_text = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "image"}]}]
    raises_both(lambda t: t.apply_chat_template(no_text, tokenize=False, **kw), hf, ours)
    dropped = "{% for m in messages %}{{ m.role }}{% endfor %}"  # the template leaves the content out
    raises_both(lambda t: t.apply_chat_template(chats[0], chat_template=dropped, tokenize=False,
                                                continue_final_message=True), hf, ours)


# ---- 2. max_length without truncation -------------------------------------------------------------
def test_max_length_alone_truncates_as_transformers(path):
    hf, ours = both(path)
    for n in (3, 6):
        assert ours(TEXTS[0], max_length=n)["input_ids"] == hf(TEXTS[0], max_length=n)["input_ids"]
        assert ours.encode(TEXTS[2], max_length=n) == hf.encode(TEXTS[2], max_length=n)
        assert ours(TEXTS[0], TEXTS[1], max_length=n)["input_ids"] == hf(TEXTS[0], TEXTS[1], max_length=n)["input_ids"]
        a, b = hf(TEXTS, max_length=n, return_tensors="pt"), ours(TEXTS, max_length=n, return_tensors="pt")
        assert torch.equal(a["input_ids"], b["input_ids"])
    # padding="longest" or truncation=False: max_length is ignored; padding=True also warns
    for kw in (dict(padding="longest"), dict(truncation=False), dict(padding="max_length")):
        assert ours(TEXTS, max_length=5, **kw)["input_ids"] == hf(TEXTS, max_length=5, **kw)["input_ids"], kw
    with pytest.warns(UserWarning, match="max_length"):
        want = hf(TEXTS, max_length=5, padding=True)["input_ids"]
    with pytest.warns(UserWarning, match="max_length"):
        assert ours(TEXTS, max_length=5, padding=True)["input_ids"] == want


# ---- 3. clean_up_tokenization_spaces ------------------------------------------------------------
def _wordpiece(directory):
    words = ["[UNK]", "[PAD]", "hello", "world", "it", "'", "s", ".", ",", "!", "?", "n", "t", "don"]
    tok = RustTokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(cleanup=False)
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", "pad_token": "[PAD]",
              "clean_up_tokenization_spaces": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_clean_up_tokenization_spaces_only_for_non_bpe(path, tmp_path):
    text = "print(a , b) ; x . y ! It 's , don 't ?"
    hf, ours = both(path)
    ids = hf.encode(text, add_special_tokens=False)
    for clean in (None, True, False):
        assert ours.decode(ids, clean_up_tokenization_spaces=clean) == hf.decode(ids, clean_up_tokenization_spaces=clean)
        assert ours.batch_decode([ids, ids[:4]], clean_up_tokenization_spaces=clean) == \
            hf.batch_decode([ids, ids[:4]], clean_up_tokenization_spaces=clean)
    hf, ours = both(path, clean_up_tokenization_spaces=True)
    assert ours.decode(ids) == hf.decode(ids) and ours.batch_decode([ids]) == hf.batch_decode([ids])
    # a WordPiece tokenizer is cleaned up
    hf, ours = both(_wordpiece(tmp_path / "wp"))
    ids = hf.encode("hello , world . it ' s ! don ' t ?", add_special_tokens=False)
    for clean in (None, True, False):
        assert ours.decode(ids, clean_up_tokenization_spaces=clean) == hf.decode(ids, clean_up_tokenization_spaces=clean)
    assert ours.decode(ids) != ours.decode(ids, clean_up_tokenization_spaces=False)


# ---- 4. special-token setters and add_special_tokens -----------------------------------------------
def test_special_token_id_setters_match_transformers(path):
    hf, ours = both(path)
    for tok in (hf, ours):
        tok.pad_token_id = tok.eos_token_id
    assert (ours.pad_token, ours.pad_token_id) == (hf.pad_token, hf.pad_token_id)
    assert ours(TEXTS, padding=True)["input_ids"] == hf(TEXTS, padding=True)["input_ids"]
    for tok in (hf, ours):
        tok.bos_token_id = 5
        tok.mask_token = "<|user|>"
        tok.sep_token_id = None
    for name in ("bos_token", "mask_token", "sep_token", "cls_token"):
        assert (getattr(ours, name), getattr(ours, name + "_id")) == (getattr(hf, name), getattr(hf, name + "_id"))
    assert ours.all_special_tokens == hf.all_special_tokens and ours.special_tokens_map == hf.special_tokens_map
    raises_both(lambda t: setattr(t, "eos_token", 3), hf, ours)


@pytest.mark.parametrize("key", ["additional_special_tokens", "extra_special_tokens"])
def test_add_special_tokens_extra_matches_transformers(path, key):
    hf, ours = both(path)
    text = "a<tool>call</tool> b"
    for replace in (True, False):
        for tok in (hf, ours):
            tok.n = tok.add_special_tokens({key: ["<tool>", AddedToken("</tool>", special=True)]})
            tok.m = tok.add_special_tokens({key: ["<tool>", "<obs>"]}, replace_extra_special_tokens=replace)
        assert (ours.n, ours.m, len(ours)) == (hf.n, hf.m, len(hf))
        assert ours.extra_special_tokens == hf.extra_special_tokens
        assert ours.all_special_ids == hf.all_special_ids
        assert ours.encode(text) == hf.encode(text)
        ids = hf.encode(text)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    raises_both(lambda t: t.add_special_tokens({"not_a_token": "<x>"}), hf, ours)
    raises_both(lambda t: t.add_special_tokens({key: "<x>"}), hf, ours)


def test_added_token_values_match_transformers(path):
    hf, ours = both(path)
    for tok in (hf, ours):
        tok.n = tok.add_special_tokens({"pad_token": AddedToken("<PADX>", special=True)})
        tok.k = tok.add_tokens([AddedToken(" fancy", lstrip=False), "plain", AddedToken("<b>", special=True)])
        tok.eos_token = AddedToken("<|end|>", special=True)
    assert (ours.n, ours.k, len(ours)) == (hf.n, hf.k, len(hf))
    for name in ("pad_token", "eos_token"):
        assert (getattr(ours, name), getattr(ours, name + "_id")) == (getattr(hf, name), getattr(hf, name + "_id"))
    text = "so fancy plain<b> end"
    assert ours.encode(text) == hf.encode(text)
    assert ours.get_added_vocab() == hf.get_added_vocab() and ours.added_tokens_encoder == hf.added_tokens_encoder


# ---- 5. extra special tokens: load, kwargs and save --------------------------------------------------
def _specials(tok):
    return (tok.all_special_tokens, tok.all_special_ids, tok.extra_special_tokens, tok.extra_special_tokens_ids,
            tok.special_tokens_map, len(tok), hasattr(tok, "additional_special_tokens"))


def test_extra_special_tokens_load_and_save_match_transformers(extra_path, tmp_path):
    hf, ours = both(extra_path)
    assert _specials(ours) == _specials(hf)
    hf.save_pretrained(tmp_path / "hf")  # Transformers 5 writes extra_special_tokens
    assert _specials(Tokenizer.from_pretrained(tmp_path / "hf")) == _specials(hf)
    ours.save_pretrained(tmp_path / "ours")
    written = [json.loads((tmp_path / d / "tokenizer_config.json").read_text()).get("extra_special_tokens")
               for d in ("hf", "ours")]
    assert written[0] == written[1] == EXTRA
    for d in ("hf", "ours"):
        assert _specials(Tokenizer.from_pretrained(tmp_path / d)) == \
            _specials(transformers.AutoTokenizer.from_pretrained(tmp_path / d)), d


def test_extra_special_tokens_kwarg_matches_transformers(extra_path, path):
    for p in (extra_path, path):
        for extra in (["<|user|>"], ["<|user|>", "<new_special>"]):
            hf, ours = both(p, extra_special_tokens=extra)
            assert _specials(ours) == _specials(hf)
            text = "a<new_special>b<|user|>"
            assert ours.encode(text) == hf.encode(text)


SPECIAL = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


def test_named_model_specific_special_tokens_match_transformers(path, tmp_path):
    """Transformers 5's named special tokens: an `extra_special_tokens` dict and other `*_token`
    keys in tokenizer_config.json. Attributes and ids, the special-token lists, the ids they get
    when added, encoding and decoding, and saving both ways."""
    config = json.loads((path / "tokenizer_config.json").read_text())
    named = tmp_path / "named"
    named.mkdir()
    (named / "tokenizer.json").write_text((path / "tokenizer.json").read_text())
    (named / "tokenizer_config.json").write_text(json.dumps({
        **config, "extra_special_tokens": {"image_token": "<image>", "audio_token": "<|user|>"},
        "video_token": "<video>"}))
    hf, ours = both(named)

    def view(tok):
        text = "a<image>b <video> c<|user|>"
        ids = tok.encode(text)
        return (_specials(tok), tok.image_token, tok.image_token_id, tok.video_token_id, tok.audio_token_id, ids,
                tok.decode(ids), tok.decode(ids, skip_special_tokens=True))

    assert view(ours) == view(hf)
    with pytest.raises(AttributeError):
        ours.mask_token_idx  # noqa: B018
    ours.image_token = "<|assistant|>"
    hf.image_token = "<|assistant|>"
    assert (ours.image_token_id, ours.special_tokens_map) == (hf.image_token_id, hf.special_tokens_map)
    assert ours.add_special_tokens({"image_token": "<img2>"}) == hf.add_special_tokens({"image_token": "<img2>"})
    assert view(ours) == view(hf)
    hf.save_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    for d in ("hf", "ours"):
        again = transformers.AutoTokenizer.from_pretrained(tmp_path / d), Tokenizer.from_pretrained(tmp_path / d)
        assert view(again[1]) == view(again[0]), d
        # a save writes the named tokens in sorted order: the same tokens and ids, listed so
        assert sorted(again[1].special_tokens_map.items()) == sorted(hf.special_tokens_map.items()), d
        assert view(again[1])[1:] == view(hf)[1:], d
    # an id sets its token; None unsets one; `_ids` reads the id too
    for tok in (hf, ours):
        tok.image_token_id = tok.convert_tokens_to_ids("<video>")
    assert (ours.image_token, ours.image_token_id, ours.image_token_ids) == \
        (hf.image_token, hf.image_token_id, hf.image_token_ids)
    for tok in (hf, ours):
        tok.audio_token = None
    assert (ours.audio_token, ours.audio_token_id, ours.special_tokens_map) == \
        (hf.audio_token, hf.audio_token_id, hf.special_tokens_map)

    def written(name, extra):
        d = tmp_path / name
        d.mkdir()
        (d / "tokenizer.json").write_text((path / "tokenizer.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**config, **extra}))
        return both(d)

    # a key written as an AddedToken; a stale model_specific_special_tokens beside the keys; a
    # standard name inside an extra_special_tokens dict
    for name, extra in (
            ("added", {"image_token": {"__type": "AddedToken", "content": "<image>", "special": True}}),
            ("stale", {"video_token": "<video>", "model_specific_special_tokens": {"image_token": "<image>",
                                                                                   "video_token": "<video>"}}),
            ("alone", {"model_specific_special_tokens": {"image_token": "<image>"}}),
            ("standard", {"extra_special_tokens": {"pad_token": "<|user|>", "image_token": "<image>"}})):
        hf_w, ours_w = written(name, extra)
        assert (_specials(ours_w), ours_w.pad_token) == (_specials(hf_w), hf_w.pad_token), name
        assert hasattr(ours_w, "image_token") == hasattr(hf_w, "image_token"), name

    # pickled (a server's worker process), and pickled before named tokens existed
    again = pickle.loads(pickle.dumps(ours))
    assert view(again) == view(ours)
    state = {k: v for k, v in ours.__getstate__().items() if k != "_named"}
    old = Tokenizer.__new__(Tokenizer)
    old.__setstate__(state)
    assert old.special_tokens_map == {k: v for k, v in ours.special_tokens_map.items() if k.startswith(SPECIAL)}

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text((path / "tokenizer.json").read_text())
    (bad / "tokenizer_config.json").write_text(json.dumps({**config, "extra_special_tokens": {"image_token": 5}}))
    with pytest.raises(ValueError, match="special token must be a string"):
        Tokenizer.from_pretrained(bad)


# ---- 6. BatchEncoding ------------------------------------------------------------------------------
def test_batch_encoding_to_data_and_encodings_match_transformers(path, caplog):
    hf, ours = both(path)
    a, b = hf(TEXTS, padding=True, return_tensors="pt"), ours(TEXTS, padding=True, return_tensors="pt")
    assert b.to("meta") is b and b["input_ids"].device.type == "meta"  # in place, as Transformers
    a.to("meta")
    assert a["input_ids"].device == b["input_ids"].device
    a, b = hf(TEXTS[0], return_tensors="pt"), ours(TEXTS[0], return_tensors="pt")
    with caplog.at_level(logging.WARNING):
        assert b.to(torch.float16) is b
    assert b["input_ids"].dtype == a.to(torch.float16)["input_ids"].dtype == torch.int64
    assert "cast" in caplog.text
    assert b.to("cpu", non_blocking=True) is b and torch.equal(b["input_ids"], a["input_ids"])
    a, b = hf(TEXTS[1]), ours(TEXTS[1])
    assert dict(b.data) == dict(a.data)
    for side in ("left", "right"):
        a = hf(TEXTS, padding=True, padding_side=side)
        b = ours(TEXTS, padding=True, padding_side=side)
        for i in range(len(TEXTS)):
            assert type(b[i]) is type(a[i]) and b[i].ids == a[i].ids
            assert b.tokens(i) == a.tokens(i) and b.word_ids(i) == a.word_ids(i)
        assert [e.ids for e in b[1:]] == [e.ids for e in a[1:]]
    assert ours.pad([{"input_ids": [5, 6]}, {"input_ids": [5]}])[1:] == hf.pad([{"input_ids": [5, 6]}, {"input_ids": [5]}])[1:]
    pad = ours.pad([{"input_ids": [5, 6]}])
    with pytest.raises(ValueError, match="tokens"):
        pad.tokens()


# ---- 7. decoding and ids -------------------------------------------------------------------------
def test_decode_inputs_and_ids_match_transformers(path):
    hf, ours = both(path)
    rows = [hf.encode(t) for t in TEXTS[:2]]
    ids = rows[0]
    for value in (rows, torch.tensor([ids, ids]), np.array([ids]), np.int64(ids[2]), torch.tensor(ids[3]), ids,
                  torch.tensor(ids), np.array(ids), {"input_ids": ids}):
        for skip in (False, True):
            assert ours.decode(value, skip_special_tokens=skip) == hf.decode(value, skip_special_tokens=skip)
        if not isinstance(value, dict):
            assert ours.batch_decode(value) == hf.batch_decode(value)
    for token in ("notatoken", ["<s>", "zzzzqq", "<|end|>"]):
        assert ours.convert_tokens_to_ids(token) == hf.convert_tokens_to_ids(token)
    for skip in (False, True):
        assert ours.convert_ids_to_tokens(ids, skip_special_tokens=skip) == \
            hf.convert_ids_to_tokens(ids, skip_special_tokens=skip)
        assert ours.convert_ids_to_tokens(torch.tensor(ids), skip_special_tokens=skip) == \
            hf.convert_ids_to_tokens(torch.tensor(ids), skip_special_tokens=skip)
    for tok in (hf, ours):
        tok.pad_token = "<NOT-IN-VOCAB>"
    assert (ours.pad_token, ours.pad_token_id) == (hf.pad_token, hf.pad_token_id)
    assert ours.all_special_ids == hf.all_special_ids


# ---- 8. pad() of other per-token keys ---------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_other_keys_matches_transformers(path, side):
    hf, ours = both(path)
    rows = [{"input_ids": [7, 8, 9, 10], "special_tokens_mask": [1, 0, 0, 0], "token_type_ids": [0, 0, 1, 1],
             "labels": 3},
            {"input_ids": [7], "special_tokens_mask": [1], "token_type_ids": [0], "labels": 4}]
    for kw in (dict(), dict(padding="max_length", max_length=6), dict(pad_to_multiple_of=3),
               dict(return_attention_mask=False)):
        kw = dict(kw, padding_side=side)
        assert dict(ours.pad(rows, **kw)) == dict(hf.pad(rows, **kw)), kw
        for kind in ("pt", "np"):
            a, b = hf.pad(rows, return_tensors=kind, **kw), ours.pad(rows, return_tensors=kind, **kw)
            assert sorted(a) == sorted(b)
            for key in a:
                assert type(a[key]) is type(b[key]) and np.array_equal(np.asarray(a[key]), np.asarray(b[key])), key
    single = {"input_ids": [5, 6], "special_tokens_mask": [1, 0]}
    kw = dict(padding="max_length", max_length=4, padding_side=side)
    assert dict(ours.pad(single, **kw)) == dict(hf.pad(single, **kw))


# ---- 9. call options -------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_call_options_match_transformers(path, side):
    hf, ours = both(path)
    options = dict(return_length=True, return_special_tokens_mask=True, return_token_type_ids=True,
                   return_offsets_mapping=True, verbose=False)
    for kw in (dict(), dict(padding=True), dict(padding="max_length", max_length=20, truncation=True),
               dict(padding=True, pad_to_multiple_of=8)):
        kw = dict(kw, padding_side=side, **options)
        assert dict(ours(TEXTS, **kw)) == dict(hf(TEXTS, **kw)), kw
        assert dict(ours(TEXTS[0], TEXTS[1], **kw)) == dict(hf(TEXTS[0], TEXTS[1], **kw)), kw
        if kw.get("padding"):
            for kind in ("pt", "np"):
                a, b = hf(TEXTS, return_tensors=kind, **kw), ours(TEXTS, return_tensors=kind, **kw)
                assert sorted(a) == sorted(b)
                for key in a:
                    assert type(a[key]) is type(b[key]) and a[key].dtype == b[key].dtype, key
                    assert np.array_equal(np.asarray(a[key]), np.asarray(b[key])), key
    for kind in ("pt", "np"):
        a, b = hf(TEXTS[1], return_tensors=kind, **options), ours(TEXTS[1], return_tensors=kind, **options)
        assert sorted(a) == sorted(b)
        for key in a:
            assert a[key].shape == b[key].shape and np.array_equal(np.asarray(a[key]), np.asarray(b[key])), key
    chat = [{"role": "user", "content": TEXTS[0]}]
    a, b = hf.apply_chat_template(chat, return_tensors="np"), ours.apply_chat_template(chat, return_tensors="np")
    assert type(b["input_ids"]) is np.ndarray and np.array_equal(a["input_ids"], b["input_ids"])


def test_pairs_and_split_special_tokens_match_transformers(path):
    hf, ours = both(path)
    text = "<s>x<|end|> honey"
    for split in (None, False, True):
        assert ours(text, split_special_tokens=split)["input_ids"] == hf(text, split_special_tokens=split)["input_ids"]
    assert ours.encode(text) == hf.encode(text)  # the split is not kept
    assert ours.encode(TEXTS[0], TEXTS[1]) == hf.encode(TEXTS[0], TEXTS[1])
    assert ours.encode(TEXTS[0], TEXTS[1], False) == hf.encode(TEXTS[0], TEXTS[1], False)
    assert ours.tokenize(TEXTS[0], TEXTS[1]) == hf.tokenize(TEXTS[0], TEXTS[1])
    pairs = [(TEXTS[0], TEXTS[1]), (TEXTS[2], "b")]
    assert ours(pairs)["input_ids"] == hf(pairs)["input_ids"]


# ---- 10. add_bos_token / add_eos_token and smaller API pieces -------------------------------------------
@pytest.mark.parametrize("kw", [dict(add_eos_token=True), dict(add_bos_token=False), dict(add_bos_token=True),
                                dict(add_bos_token=True, add_eos_token=True)])
def test_add_bos_eos_token_match_transformers(path, tmp_path, kw):
    for p in (path, build_llama_tokenizer(tmp_path / "llama")):
        hf, ours = both(p, **kw)
        assert (ours.add_bos_token, ours.add_eos_token) == (hf.add_bos_token, hf.add_eos_token)
        assert ours.encode(TEXTS[0]) == hf.encode(TEXTS[0])
        assert ours.encode(TEXTS[0], TEXTS[1]) == hf.encode(TEXTS[0], TEXTS[1])
        for tok in (hf, ours):
            tok.add_eos_token = not tok.add_eos_token
        assert ours.encode(TEXTS[1]) == hf.encode(TEXTS[1])
        assert ours.num_special_tokens_to_add(pair=True) == hf.num_special_tokens_to_add(pair=True)
    hf, ours = both(path)
    for tok in (hf, ours):
        tok.add_bos_token = True
    assert ours.encode(TEXTS[2]) == hf.encode(TEXTS[2])


def test_smaller_api_pieces_match_transformers(path, tmp_path):
    hf, ours = both(path, model_max_length=64)
    for name in ("sep_token", "cls_token", "mask_token", "sep_token_id", "pad_token_type_id", "max_len_single_sentence",
                 "max_len_sentences_pair", "split_special_tokens", "add_bos_token", "add_eos_token"):
        assert getattr(ours, name) == getattr(hf, name), name
    for pair in (False, True):
        assert ours.num_special_tokens_to_add(pair) == hf.num_special_tokens_to_add(pair)
    assert ours.get_chat_template() == hf.get_chat_template()
    files = ours.save_pretrained(tmp_path / "saved")
    assert isinstance(files, tuple) and all((tmp_path / "saved" / f).exists() for f in files)
    raises_both(lambda t: t(TEXTS, padding=True, padding_side="middle"), hf, ours)
    with pytest.raises(ValueError, match="padding_side"):
        ours.pad([{"input_ids": [1]}, {"input_ids": [1, 2]}], padding_side="up")


# ---- 11. stride / return_overflowing_tokens, is_split_into_words, text_target ----------------------
WORDS = [t.split() for t in TEXTS]


@pytest.fixture(scope="module", params=["bpe", "llama", "llama_legacy", "llama_no_prefix"])
def any_path(request, tmp_path_factory):
    # the byte-level BPE, and Phi-3.5-MoE's / JetMoE's LlamaTokenizer pipeline with its prefix-space variants
    directory = tmp_path_factory.mktemp(request.param)
    if request.param == "bpe":
        return build_tokenizer(directory)
    extra = {"llama": {}, "llama_legacy": {"legacy": True}, "llama_no_prefix": {"add_prefix_space": False}}
    return build_llama_tokenizer(directory, **extra[request.param])


def assert_same_encoding(got, want):
    assert type(got).__name__ == "BatchEncoding" and sorted(got) == sorted(want)
    for key, value in want.items():
        assert type(got[key]) is type(value), key
        if isinstance(value, (torch.Tensor, np.ndarray)):
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            assert np.array_equal(np.asarray(got[key]), np.asarray(value)), key
        else:
            assert got[key] == value, key
    rows = [[(e.ids, e.word_ids, e.sequence_ids, e.offsets) for e in enc.encodings] for enc in (got, want)]
    assert rows[0] == rows[1]
    for i in range(len(want.encodings)):
        assert (got.word_ids(i), got.tokens(i)) == (want.word_ids(i), want.tokens(i))


def call_both(hf, ours, *args, **kwargs):
    """Compare a call of both tokenizers: the same BatchEncoding (returned), or the same exception
    type. Where `tokenizers` panics (a PanicException, a BaseException) on a stride too large, moetorch
    raises a ValueError naming stride; where Transformers makes numpy object arrays of rows of
    different lengths, moetorch a ValueError (docs/differences.md)."""
    try:
        want = hf(*args, **kwargs)
    except Exception as e:
        with pytest.raises(Exception) as info:
            ours(*args, **kwargs)
        assert type(info.value) is type(e), (kwargs, e, info.value)
        return None
    except BaseException as e:
        assert type(e).__name__ == "PanicException" and "stride" in str(e), e
        with pytest.raises(ValueError, match=r"stride \(\d+\) must be less than"):
            ours(*args, **kwargs)
        return None
    if any(isinstance(v, np.ndarray) and v.dtype.kind == "O" for v in want.values()):
        with pytest.raises(ValueError, match="padding=True"):
            ours(*args, **kwargs)
        return None
    got = ours(*args, **kwargs)
    assert_same_encoding(got, want)
    return got


OVERFLOW_INPUTS = [(TEXTS[0],), (TEXTS[1],), (TEXTS,), (TEXTS[0], TEXTS[1]), (TEXTS[:2], TEXTS[1:]),
                   ([(TEXTS[0], TEXTS[2]), (TEXTS[1], TEXTS[0])],)]


@pytest.mark.parametrize("inputs", OVERFLOW_INPUTS, ids=["one", "short", "batch", "pair", "batch_pairs", "tuples"])
def test_overflowing_tokens_match_transformers(any_path, inputs):
    hf, ours = both(any_path)
    extras = dict(return_length=True, return_offsets_mapping=True, return_special_tokens_mask=True,
                  return_token_type_ids=True)
    seen = set()
    for truncation in (None, True, "only_first", "only_second"):
        for max_length, stride in ((8, 0), (8, 2), (8, 6), (12, 3), (3, 1), (1, 0), (None, 0)):
            for padding, side in ((False, "right"), (True, "right"), (True, "left"), ("max_length", "left")):
                for kind in (None, "pt", "np"):
                    kw = dict(truncation=truncation, max_length=max_length, stride=stride, padding=padding,
                              padding_side=side, return_tensors=kind, return_overflowing_tokens=True, verbose=False)
                    got = call_both(hf, ours, *inputs, **kw)
                    if got is not None and kind is None:
                        seen.add(len(got["input_ids"]) > len(set(got["overflow_to_sample_mapping"])))
                    if kind is None:
                        call_both(hf, ours, *inputs, **kw, **extras)
                        call_both(hf, ours, *inputs, **dict(kw, return_overflowing_tokens=False))
                    if padding:
                        call_both(hf, ours, *inputs, **kw, pad_to_multiple_of=4)
    assert seen == {True, False}  # some calls overflowed, some did not


def test_overflowing_rows_match_transformers(path):
    hf, ours = both(path)
    kw = dict(max_length=8, stride=2, truncation=True, return_overflowing_tokens=True)
    # one text becomes a batch of its windows, each overlapping the last by `stride` tokens
    got = call_both(hf, ours, TEXTS[0], **kw)
    assert len(got["input_ids"]) > 1 and set(got["overflow_to_sample_mapping"]) == {0}
    assert got["input_ids"][1][1:3] == got["input_ids"][0][-2:]
    # a batch: each text's rows follow it; padded rows, tensors, lengths and offsets with them
    got = call_both(hf, ours, TEXTS, padding=True, return_tensors="pt", return_length=True,
                    return_offsets_mapping=True, **kw)
    assert got["input_ids"].shape[0] == len(got["overflow_to_sample_mapping"]) == len(got.encodings)
    # no overflow: one row for each text, still batched with a mapping
    got = call_both(hf, ours, TEXTS[1], return_overflowing_tokens=True)
    assert got["input_ids"] == [got["input_ids"][0]] and got["overflow_to_sample_mapping"] == [0]
    call_both(hf, ours, TEXTS[1], return_overflowing_tokens=True, return_tensors="np")
    # a pair truncated longest_first: the windows of both texts crossed, as tokenizers gives them
    got = call_both(hf, ours, TEXTS[0], TEXTS[1], **kw)
    assert len(got["input_ids"]) > 10
    # the truncation side and model_max_length (no max_length) are read as in Transformers
    for side in ("left", "right"):
        hf.truncation_side = ours.truncation_side = side
        call_both(hf, ours, TEXTS, **kw)
    hf, ours = both(path, model_max_length=10)
    call_both(hf, ours, TEXTS, truncation=True, stride=3, return_overflowing_tokens=True, padding="max_length")
    assert hf.encode(TEXTS[0], truncation=True, stride=3, return_overflowing_tokens=True) == \
        ours.encode(TEXTS[0], truncation=True, stride=3, return_overflowing_tokens=True)


def test_stride_errors_match_transformers(path):
    hf, ours = both(path)
    kw = dict(truncation=True, return_overflowing_tokens=True)
    # past max_length less the special tokens: tokenizers' ValueError; at the truncated length (of
    # one text, or of each text of a pair) its panic: a ValueError naming stride here
    for args, more in (((TEXTS[0],), dict(max_length=8, stride=8)), ((TEXTS[0],), dict(max_length=8, stride=7)),
                       ((TEXTS[0], TEXTS[1]), dict(max_length=8, stride=6)),
                       ((TEXTS[0],), dict(max_length=8, stride=7, return_overflowing_tokens=False))):
        call_both(hf, ours, *args, **{**kw, **more})
        with pytest.raises(ValueError, match="stride"):
            ours(*args, **{**kw, **more})
    # a stride a short text never reaches, or without truncation, is not checked (in both)
    call_both(hf, ours, TEXTS[1], max_length=40, stride=39, **kw)
    for stride in (-1, 2.5, "2", None, 10**6):
        call_both(hf, ours, TEXTS[0], stride=stride)
        call_both(hf, ours, TEXTS[0], stride=stride, padding=True, max_length=4, verbose=False)
    call_both(hf, ours, TEXTS[0], stride=np.int64(2), max_length=6, **kw)
    call_both(hf, ours, TEXTS[0], stride=True, max_length=6, **kw)
    # a stride that is not a non-negative integer: Transformers' TypeError / OverflowError, naming it
    for stride, error in ((-1, OverflowError), (2.5, TypeError), ("2", TypeError), (None, TypeError)):
        with pytest.raises(error):
            hf(TEXTS[0], stride=stride, max_length=6, **kw)
        with pytest.raises(error, match="stride"):
            ours(TEXTS[0], stride=stride, max_length=6, **kw)
    # truncating a text that is missing or too short for the strategy, and padding to a length that
    # truncation would not keep a multiple of pad_to_multiple_of
    call_both(hf, ours, TEXTS[0], max_length=8, stride=2, truncation="only_second", return_overflowing_tokens=True)
    call_both(hf, ours, TEXTS[0], TEXTS[1], max_length=12, stride=2, truncation="only_second",
              return_overflowing_tokens=True)
    call_both(hf, ours, TEXTS, max_length=6, stride=2, padding=True, pad_to_multiple_of=4, **kw)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        ours(TEXTS, max_length=6, stride=2, padding=True, pad_to_multiple_of=4, **kw)
    # ragged rows as numpy: Transformers makes object arrays, moetorch refuses (docs/differences.md)
    for kind in ("np", "pt"):
        call_both(hf, ours, TEXTS[0], max_length=8, return_tensors=kind, **kw)
        with pytest.raises(ValueError, match="padding=True"):
            ours(TEXTS[0], max_length=8, return_tensors=kind, **kw)
    assert ours.encode(TEXTS[0], max_length=8) == hf.encode(TEXTS[0], max_length=8)  # the tokenizer is left clean


WORD_INPUTS = [(WORDS[0],), (WORDS,), (WORDS[0], WORDS[1]), (WORDS[:2], WORDS[1:]), ([(WORDS[0], WORDS[2])],),
               ([tuple(WORDS[1])],), ([],), ([[]],), ([[], WORDS[0]],), (WORDS[0], []),
               ([" leading", "trailing ", "two words", "ünï", "<|end|>", ""],)]


@pytest.mark.parametrize("inputs", WORD_INPUTS, ids=["one", "batch", "pair", "batch_pairs", "tuples", "tuple_words",
                                                     "empty", "empty_batch", "empty_row", "empty_pair", "spaces"])
def test_is_split_into_words_matches_transformers(any_path, inputs):
    hf, ours = both(any_path)
    kw = dict(is_split_into_words=True)
    got = call_both(hf, ours, *inputs, **kw)
    assert any(w is not None for i in range(len(got.encodings)) for w in got.word_ids(i)) or not any(inputs[0])
    for more in (dict(return_offsets_mapping=True, return_special_tokens_mask=True, return_length=True),
                 dict(add_special_tokens=False), dict(padding=True, return_tensors="pt"),
                 dict(padding="max_length", max_length=24, padding_side="left", return_tensors="np"),
                 dict(max_length=5, stride=1, return_overflowing_tokens=True, padding=True, return_tensors="pt"),
                 dict(max_length=6, truncation="only_first"), dict(split_special_tokens=True)):
        call_both(hf, ours, *inputs, **kw, **more)
    assert ours.encode(*inputs, **kw) == hf.encode(*inputs, **kw)
    assert ours.tokenize(*inputs, **kw) == hf.tokenize(*inputs, **kw)


def test_is_split_into_words_errors_match_transformers(path):
    hf, ours = both(path)
    # a string where words are expected: Transformers' TypeError, naming is_split_into_words
    for args in (("Honey routes",), (["Honey"], "routes"), ([["a", 3]],), (["a", ["b"]],), ([["a"], "b"],),
                 ([(["a"], ["b"], ["c"])],)):
        with pytest.raises(TypeError):
            hf(*args, is_split_into_words=True)
        with pytest.raises(TypeError, match="is_split_into_words"):
            ours(*args, is_split_into_words=True)
    with pytest.raises(TypeError):
        hf.tokenize("Honey routes", is_split_into_words=True)
    with pytest.raises(TypeError, match="is_split_into_words"):
        ours.tokenize("Honey routes", is_split_into_words=True)
    # a text that is no string or list of strings: Transformers' ValueError
    for args in (([1],), ([[1]],), (3,)):
        call_both(hf, ours, *args, is_split_into_words=True)
        call_both(hf, ours, *args)
    call_both(hf, ours, [["a", "b"]], [["c"], ["d"]], is_split_into_words=True)  # batch lengths differ
    # without is_split_into_words a list is a batch of texts: a list of 3 words is no (text, pair)
    call_both(hf, ours, WORDS[1])
    call_both(hf, ours, [WORDS[0][:3]])
    with pytest.raises(TypeError, match="is_split_into_words=True"):
        ours([WORDS[0][:3]])


TARGET_INPUTS = [((TEXTS[0],), dict(text_target=TEXTS[1])), ((), dict(text_target=TEXTS[1])),
                 ((), dict(text_target=TEXTS[1:])), ((TEXTS[:2],), dict(text_target=TEXTS[1:])),
                 ((TEXTS[0], TEXTS[1]), dict(text_target=TEXTS[1], text_pair_target=TEXTS[2])),
                 ((TEXTS[:2],), dict(text_target=TEXTS, text_pair_target=TEXTS[::-1])),
                 ((TEXTS[:2],), dict(text_target=TEXTS[:1])), ((TEXTS[0],), dict(text_target=TEXTS[:2])),
                 ((TEXTS[0],), dict(text_pair_target=TEXTS[2])),
                 ((WORDS[0],), dict(text_target=WORDS[1], is_split_into_words=True)),
                 ((), dict(text_target=WORDS, is_split_into_words=True))]


@pytest.mark.parametrize("inputs,targets", TARGET_INPUTS)
def test_text_target_matches_transformers(path, inputs, targets):
    hf, ours = both(path)
    got = call_both(hf, ours, *inputs, **targets)
    assert ("labels" in got) == (bool(inputs) and "text_target" in targets)
    for more in (dict(padding=True), dict(max_length=5), dict(max_length=5, max_target_length=3),
                 dict(max_target_length=3), dict(max_target_length=3, truncation=True),
                 dict(padding="max_length", max_length=12, pad_to_multiple_of=4),
                 dict(max_length=6, stride=2, return_overflowing_tokens=True, padding=True),
                 dict(add_special_tokens=False, return_length=True, padding_side="left", padding=True),
                 dict(return_attention_mask=False, return_token_type_ids=True, return_special_tokens_mask=True)):
        for kind in (None, "pt", "np"):
            call_both(hf, ours, *inputs, **targets, **more, return_tensors=kind)
    if inputs:  # encode() gives the texts' ids, the targets ignored
        assert ours.encode(*inputs, **targets) == hf.encode(*inputs, **targets)


def test_text_target_errors_match_transformers(path):
    hf, ours = both(path)
    for args, kw in (((), dict()), ((None,), dict(text_target=None)), ((), dict(text_pair_target=TEXTS[0])),
                     ((TEXTS[0],), dict(text_target=3)), ((TEXTS[:2],), dict(text_target=TEXTS, text_pair_target=TEXTS[:1]))):
        call_both(hf, ours, *args, **kw)
    with pytest.raises(ValueError, match="text_target"):
        ours()
    with pytest.raises(ValueError, match="text_target"):
        ours.encode(None, text_target=TEXTS[0])
    with pytest.raises(ValueError):
        hf.encode(None, text_target=TEXTS[0])


def test_call_argument_order_and_inputs_match_transformers(path):
    hf, ours = both(path)
    # Transformers' positional order: text, text_pair, text_target, text_pair_target, add_special_tokens,
    # padding, truncation, max_length, stride, is_split_into_words, pad_to_multiple_of, padding_side, return_tensors
    args = (TEXTS[:2], None, TEXTS[1:], None, True, True, True, 8, 2, False, None, "left", "pt")
    call_both(hf, ours, *args)
    args = (TEXTS[0], None, True, "max_length", True, 10, 3, "left", "pt")
    assert torch.equal(ours.encode(*args, return_overflowing_tokens=True), hf.encode(*args, return_overflowing_tokens=True))
    # one text's empty text_pair is no pair; a batch may mix texts and (text, pair) tuples
    for args in ((TEXTS[0], ""), ([TEXTS[0]], [""]), ([TEXTS[0], (TEXTS[1], TEXTS[2])],), ([TEXTS[0], 3],),
                 ([TEXTS[0]], TEXTS[1]), (TEXTS[0], [TEXTS[1]])):
        call_both(hf, ours, *args)
    assert ours.tokenize(TEXTS[0], "") == hf.tokenize(TEXTS[0], "")
    text = "<s>x<|end|> honey"
    for split in (None, False, True):
        assert ours.tokenize(text, split_special_tokens=split) == hf.tokenize(text, split_special_tokens=split)
    # tokenize() ignores padding and truncation, as Transformers'
    kw = dict(max_length=3, truncation=True, padding=True, stride=1)
    assert ours.tokenize(TEXTS[0], **kw) == hf.tokenize(TEXTS[0], **kw)


@pytest.mark.parametrize("config_class", ["LlamaTokenizer", "PreTrainedTokenizerFast", None])
def test_llama_tokenizer_class_as_transformers(config_class, tmp_path):
    """`LlamaTokenizer.from_pretrained` (the class the PhiMoE docs name; `LlamaTokenizerFast` is
    the same) builds the Llama pipeline whatever tokenizer_class the config names, as Transformers
    5's does: the same ids, decoded text, padding side and padded batch as Transformers'
    `LlamaTokenizer` on the same files, and what it saves reloads to the same ids."""
    import moetorch

    directory = build_llama_tokenizer(tmp_path / "tok", tokenizer_class=config_class)
    hf = transformers.LlamaTokenizer.from_pretrained(directory)
    ours = moetorch.LlamaTokenizer.from_pretrained(directory)
    assert moetorch.LlamaTokenizerFast is moetorch.LlamaTokenizer and isinstance(ours, Tokenizer)
    assert ours.padding_side == hf.padding_side == "left"
    for text in [*TEXTS, "  two spaces\tand a tab\n\nnew lines", "<|user|>hi<|end|>", "ünïcödé ✓", ""]:
        want = hf(text).input_ids
        assert ours(text).input_ids == want, text
        assert ours.decode(want) == hf.decode(want)
        assert ours.decode(want, skip_special_tokens=True) == hf.decode(want, skip_special_tokens=True)
    a, b = hf(TEXTS, padding=True), ours(TEXTS, padding=True)
    assert a.input_ids == b.input_ids and a.attention_mask == b.attention_mask
    ours.save_pretrained(tmp_path / "saved")
    assert moetorch.AutoTokenizer.from_pretrained(tmp_path / "saved")(TEXTS).input_ids == hf(TEXTS).input_ids


# ---- empty encodings, pad() of tensors, a missing pad token ---------------------------------------
@pytest.mark.parametrize("return_tensors", ["pt", "np"])
def test_empty_encodings_are_integers_as_transformers(path, return_tensors):
    """An encoding with no tokens comes back as int64 tensors (torch and numpy alone make floats)."""
    cases = [lambda t: t("", add_special_tokens=False, return_tensors=return_tensors),
             lambda t: t([[]], is_split_into_words=True, add_special_tokens=False, return_tensors=return_tensors),
             lambda t: {"input_ids": t.encode("", add_special_tokens=False, return_tensors=return_tensors)}]
    for case in cases:
        want, got = (case(tok) for tok in both(path))
        assert sorted(got) == sorted(want)
        for key in want:
            assert got[key].dtype == want[key].dtype and tuple(got[key].shape) == tuple(want[key].shape), key


@pytest.mark.parametrize("make", [torch.tensor, np.array, list], ids=["torch", "numpy", "list"])
def test_pad_returns_the_rows_type_as_transformers(path, make):
    """pad() of rows held in tensors or arrays returns that type when return_tensors is not given
    (a collator over a dataset formatted as torch); of lists, lists."""
    rows = [{"input_ids": make([0, 5, 6]), "attention_mask": make([1, 1, 1])},
            {"input_ids": make([0, 7]), "attention_mask": make([1, 1])}]
    hf, ours = both(path)
    for batch in (rows, [dict(r) for r in rows[:1]]):
        want, got = hf.pad(batch), ours.pad(batch)
        assert sorted(got) == sorted(want)
        for key in want:
            assert type(got[key]) is type(want[key]), key
            assert np.array_equal(np.asarray(got[key]), np.asarray(want[key])), key
    if make is not np.array:  # one numpy row: Transformers refuses its numpy integers ("type ... unknown")
        want, got = hf.pad({"input_ids": make([0, 5, 6])}), ours.pad({"input_ids": make([0, 5, 6])})
        assert type(got["input_ids"]) is type(want["input_ids"])


def test_padding_without_pad_token_fails_before_encoding_as_transformers(path):
    """Padding asked of a tokenizer without a pad token is a ValueError before any encoding, so an
    impossible truncation does not fail first (Transformers' order)."""
    hf, ours = both(path, pad_token=None)
    for tok in (hf, ours):
        assert tok.pad_token is None
        for call in (lambda t: t(["a b c"], padding=True, truncation="only_second", max_length=2),
                     lambda t: t("a b c", padding="longest"), lambda t: t(["a", "b c"], padding=True)):
            with pytest.raises(ValueError, match="pad"):
                call(tok)


@pytest.mark.parametrize("build", [build_tokenizer, build_llama_tokenizer], ids=["bpe", "llama"])
def test_repr_attributes_and_clean_up_as_transformers(build, tmp_path):
    """`repr` (Transformers' form, with this class's name), `SPECIAL_TOKENS_ATTRIBUTES`,
    `vocab_files_names`' tokenizer file, `decoder` and `clean_up_tokenization` against Transformers'
    tokenizer of the same files."""
    theirs, ours = both(build(tmp_path / "tok"))
    ours.add_tokens(["<extra>"], special_tokens=True)
    theirs.add_tokens(["<extra>"], special_tokens=True)
    assert repr(ours) == repr(theirs).replace(type(theirs).__name__, "Tokenizer", 1)
    assert ours.SPECIAL_TOKENS_ATTRIBUTES == theirs.SPECIAL_TOKENS_ATTRIBUTES
    assert ours.vocab_files_names["tokenizer_file"] == theirs.vocab_files_names["tokenizer_file"]
    assert repr(ours.decoder) == repr(theirs.decoder)
    for text in ["Hi , there ! It 's  fine . Isn 't it ? We 're , they 've ; I 'm ' quoted ' .", "", " .  ."]:
        assert ours.clean_up_tokenization(text) == theirs.clean_up_tokenization(text)


def test_encode_message_with_chat_template_as_transformers(path):
    """Message by message, each message's ids as Transformers' `encode_message_with_chat_template`
    gives them (its history passed or not), and its refusal of `add_generation_prompt`."""
    theirs, ours = both(path)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two experts?"},
            {"role": "assistant", "content": "Yes, two."}, {"role": "user", "content": "Why"}]
    for i, message in enumerate(chat):
        for history in (chat[:i], None):
            assert ours.encode_message_with_chat_template(message, history) == \
                theirs.encode_message_with_chat_template(message, history)
    raises_both(lambda t: t.encode_message_with_chat_template(chat[0], add_generation_prompt=True), theirs, ours)
    with pytest.raises(TypeError, match="message must be a dict"):
        ours.encode_message_with_chat_template("hello")


@pytest.mark.parametrize("model_type", [None, "phimoe", "jetmoe", "llama"])
@pytest.mark.parametrize("build", [build_tokenizer, build_llama_tokenizer], ids=["bpe", "llama"])
def test_the_named_class_beside_a_model_config_as_transformers(model_type, build, tmp_path):
    """A tokenizer_config.json naming LlamaTokenizer gets Llama's pipeline, except beside a
    config.json of a model type whose checkpoints name a class that does not fit their
    tokenizer.json (phimoe: Phi-3.5-MoE's names LlamaTokenizer), where tokenizer.json's own pipeline
    runs, as Transformers' AutoTokenizer decides; a `config=` keyword's model type decides over the
    file's."""
    import moetorch

    directory = build(tmp_path / "tok")
    if model_type is not None:
        (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
    texts = [*TEXTS, "Hello <|end|> world  a", "<|user|>hi<|end|>"]
    for kwargs in ({}, {"config": transformers.JetMoeConfig()}, {"config": transformers.PhimoeConfig()}):
        hf = transformers.AutoTokenizer.from_pretrained(directory, **kwargs)
        ours = moetorch.AutoTokenizer.from_pretrained(directory, **kwargs)
        assert [ours(t).input_ids for t in texts] == [hf(t).input_ids for t in texts], (model_type, kwargs)
        assert ours.padding_side == hf.padding_side
        chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "two experts"}]
        assert ours.apply_chat_template(chat, return_dict=False) == hf.apply_chat_template(chat, return_dict=False)
        if kwargs:  # the config's dict (which Transformers' AutoTokenizer refuses) decides as the config does
            as_dict = moetorch.AutoTokenizer.from_pretrained(directory, config=kwargs["config"].to_dict())
            assert [as_dict(t).input_ids for t in texts] == [hf(t).input_ids for t in texts], (model_type, kwargs)


# ---- call keywords: tokenizer_kwargs, and keywords the tokenizer does not have ----------------------------
@pytest.mark.parametrize("call", [
    dict(tokenizer_kwargs={"add_special_tokens": False}),
    dict(add_special_tokens=True, tokenizer_kwargs={"add_special_tokens": False}),  # (the dict's value wins)
    dict(tokenizer_kwargs={"padding": True, "return_tensors": "pt"}),
    dict(padding="max_length", max_length=12, tokenizer_kwargs={"truncation": True, "max_length": 5}),
    dict(tokenizer_kwargs={"return_offsets_mapping": True}, return_length=True),
    dict(foo=1, tokenizer_kwargs={"bar": 2}),
])
def test_call_keywords_as_transformers_merges_them(path, call):
    theirs, ours = both(path)
    expected, got = theirs(TEXTS, **call), ours(TEXTS, **call)
    assert set(got.keys()) == set(expected.keys())
    for key in expected:
        a, b = expected[key], got[key]
        assert (a.tolist() if torch.is_tensor(a) else a) == (b.tolist() if torch.is_tensor(b) else b), key
    assert ours.encode(TEXTS[0], tokenizer_kwargs={"add_special_tokens": False}) == \
        theirs.encode(TEXTS[0], tokenizer_kwargs={"add_special_tokens": False})


def test_pad_to_multiple_of_zero_is_none_and_an_empty_batch_pads_to_nothing(path):
    theirs, ours = both(path)
    assert ours(TEXTS, padding=True, pad_to_multiple_of=0) == dict(theirs(TEXTS, padding=True, pad_to_multiple_of=0))
    assert ours([], padding=True) == ours([]) == {"input_ids": [], "attention_mask": []}  # (Transformers: IndexError)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive integer"):
        ours(TEXTS, padding=True, pad_to_multiple_of=-8)


def test_a_negative_id_in_decode_is_the_overflow_error_transformers_raises(path):
    for tok in both(path):  # (and moetorch's is a ValueError that says what to do with -100 labels)
        with pytest.raises(OverflowError):
            tok.decode([5, -1])
    with pytest.raises(ValueError, match="labels hold -100"):
        both(path)[1].decode([5, -100])
