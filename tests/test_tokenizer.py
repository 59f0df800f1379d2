"""The tokenizer against Transformers' fast tokenizer on the same files."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from tok_util import build_llama_tokenizer, build_tokenizer

from moetorch import AutoTokenizer, Tokenizer

TEXTS = ["The experts route bananas.", "Dragonfruits!", "x = 2, so 2x + 3 = 7 ✓ — ünïcode"]
CHAT = [
    {"role": "system", "content": "You are a helpful AI assistant."},
    {"role": "user", "content": "Can you provide ways to eat bananas?"},
    {"role": "assistant", "content": "Sure! A smoothie with milk and honey."},
    {"role": "user", "content": "What about solving 2x + 3 = 7?"},
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = build_tokenizer(tmp_path_factory.mktemp("tok"))
    return transformers.AutoTokenizer.from_pretrained(path), Tokenizer.from_pretrained(path), path


def test_encode_decode_match_transformers(pair):
    hf, ours, _ = pair
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == hf.encode(text, add_special_tokens=special)
        ids = hf.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert ours.decode(torch.tensor(ids)) == hf.decode(ids)
    assert ours.batch_decode([hf.encode(t) for t in TEXTS]) == hf.batch_decode([hf.encode(t) for t in TEXTS])


class _Recording:
    """The `tokenizers` object, with every write to it recorded (settings set, truncation turned on or off)."""

    def __init__(self, real):
        object.__setattr__(self, "real", real)
        object.__setattr__(self, "writes", [])

    def __getattr__(self, name):
        value = getattr(self.real, name)
        if name in ("enable_truncation", "no_truncation", "enable_padding", "no_padding"):
            def call(*args, **kwargs):
                self.writes.append(name)
                return value(*args, **kwargs)
            return call
        return value

    def __setattr__(self, name, value):
        self.writes.append(name)
        setattr(self.real, name, value)


def test_a_plain_call_writes_nothing_to_the_shared_tokenizer(pair):
    """Threads share the `tokenizers` object, and a write to it waits, holding the interpreter lock,
    for an encode running in another thread: a server tokenizing a huge prompt in one worker thread
    stalled every thread once a second prompt was tokenized. A call with the tokenizer's own
    settings writes nothing; one that needs others (truncation, split_special_tokens) puts them back."""
    hf, ours, _ = pair
    recording = ours._tok = _Recording(ours._tok)
    try:
        assert ours.encode(TEXTS[2]) == hf.encode(TEXTS[2]) and ours(TEXTS)["input_ids"] == hf(TEXTS)["input_ids"]
        assert ours.apply_chat_template(CHAT)["input_ids"] == hf.apply_chat_template(CHAT)["input_ids"]
        assert recording.writes == []
        assert ours(TEXTS, truncation=True, max_length=4)["input_ids"] == hf(TEXTS, truncation=True, max_length=4)["input_ids"]
        assert recording.writes == ["enable_truncation", "no_truncation"] and recording.real.truncation is None
        recording.writes.clear()
        text = TEXTS[0] + hf.eos_token
        split = ours(text, split_special_tokens=True)["input_ids"]
        assert split == hf(text, split_special_tokens=True)["input_ids"] != hf(text)["input_ids"]
        assert recording.writes == ["encode_special_tokens"] * 2 and recording.real.encode_special_tokens is False
        assert ours(text)["input_ids"] == hf(text)["input_ids"]
    finally:
        ours._tok = recording.real


def test_special_tokens_match_transformers(pair):
    hf, ours, _ = pair
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(hf, name)
        assert getattr(ours, name + "_id") == getattr(hf, name + "_id")
    assert ours.all_special_ids == hf.all_special_ids
    assert len(ours) == len(hf)
    assert ours.convert_tokens_to_ids("<|end|>") == hf.convert_tokens_to_ids("<|end|>")
    assert ours.convert_ids_to_tokens([0, 5]) == hf.convert_ids_to_tokens([0, 5])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_and_tensors_match_transformers(pair, side):
    hf, ours, _ = pair
    hf.padding_side = ours.padding_side = side
    a = hf(TEXTS, padding=True, return_tensors="pt")
    b = ours(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    a = hf(TEXTS, padding="max_length", max_length=40)
    b = ours(TEXTS, padding="max_length", max_length=40)
    assert a["input_ids"] == b["input_ids"] and a["attention_mask"] == b["attention_mask"]
    a = hf(TEXTS, truncation=True, max_length=5)
    assert ours(TEXTS, truncation=True, max_length=5)["input_ids"] == a["input_ids"]
    assert b.input_ids is b["input_ids"]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(pair, add_generation_prompt):
    hf, ours, _ = pair
    text = ours.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text == hf.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, tokenize=False)
    if add_generation_prompt:
        assert text.startswith("<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n")
        assert text.endswith("<|end|>\n<|assistant|>\n")
    a = hf.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, return_tensors="pt")
    b = ours.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    ids = ours.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert ids == b["input_ids"][0].tolist()
    batch_a = hf.apply_chat_template([CHAT, CHAT[:2]], tokenize=False)
    assert ours.apply_chat_template([CHAT, CHAT[:2]], tokenize=False) == batch_a


def test_continue_final_message(pair):
    hf, ours, _ = pair
    chat = [*CHAT, {"role": "assistant", "content": "Subtract three"}]
    a = hf.apply_chat_template(chat, continue_final_message=True, tokenize=False)
    assert ours.apply_chat_template(chat, continue_final_message=True, tokenize=False) == a
    assert a.endswith("Subtract three")


def test_save_round_trips_both_ways(pair, tmp_path):
    hf, ours, _ = pair
    ours.save_pretrained(tmp_path / "ours")
    hf2 = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert hf2.encode(TEXTS[0]) == hf.encode(TEXTS[0]) and hf2.chat_template == ours.chat_template
    assert hf2.pad_token == "<pad>" and hf2.eos_token == "<|end|>"
    hf.save_pretrained(tmp_path / "hf")  # Transformers 5 writes the template to chat_template.jinja
    again = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert again.apply_chat_template(CHAT, tokenize=False) == hf.apply_chat_template(CHAT, tokenize=False)
    assert again.encode(TEXTS[2]) == hf.encode(TEXTS[2])


def test_errors_are_clear(pair, tmp_path, caplog):
    _, ours, path = pair
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="local directory"):
        Tokenizer.from_pretrained("microsoft/Phi-3.5-MoE-instruct")
    with pytest.raises(ValueError, match="padding=True"):
        ours(TEXTS, return_tensors="pt")
    with pytest.raises(ValueError, match="return_tensors"):
        ours(TEXTS[0], return_tensors="tf")
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])
    no_pad = Tokenizer.from_pretrained(path, pad_token=None)
    with pytest.raises(ValueError, match="pad_token"):
        no_pad(TEXTS, padding=True)
    no_pad.pad_token = no_pad.eos_token
    assert no_pad(TEXTS, padding=True)["attention_mask"][1][-1] == 0
    with pytest.raises(ValueError, match="chat_template"):
        Tokenizer.from_pretrained(path, chat_template=None).apply_chat_template(CHAT)
    with pytest.raises(ValueError, match="jinja"):
        ours.apply_chat_template(CHAT, chat_template="{% for %}")
    with caplog.at_level(logging.WARNING, logger="moetorch"):  # (Transformers ignores it, silently)
        assert ours("hi", return_offsets="yes") == ours("hi")
    assert "ignores the arguments ['return_offsets']" in caplog.text
    assert Tokenizer.from_pretrained(path, trust_remote_code=True).eos_token == "<|end|>"


def test_tokens_added_vocab_and_pad_match_transformers(tmp_path):
    """tokenize, convert_tokens_to_string, add_tokens (plain and special), the added vocabulary,
    all_special_tokens, pad (what data collators call) and pad_to_multiple_of, against Transformers
    on the same file (a fresh pair: adding tokens changes them)."""
    path = build_tokenizer(tmp_path)
    hf, ours = transformers.AutoTokenizer.from_pretrained(path), Tokenizer.from_pretrained(path)
    assert ours.is_fast and ours.model_input_names == hf.model_input_names
    for text in TEXTS:
        for special in (False, True):
            assert ours.tokenize(text, add_special_tokens=special) == hf.tokenize(text, add_special_tokens=special)
        assert ours.convert_tokens_to_string(hf.tokenize(text)) == hf.convert_tokens_to_string(hf.tokenize(text))
    assert ours.add_tokens(["<new>", "bananas", "<new>"]) == hf.add_tokens(["<new>", "bananas", "<new>"])
    assert ours.add_tokens("<sp>", special_tokens=True) == hf.add_tokens("<sp>", special_tokens=True) == 1
    text = "route <new> bananas<sp>now"
    assert len(ours) == len(hf) and ours.get_added_vocab() == hf.get_added_vocab()
    assert ours.tokenize(text) == hf.tokenize(text) and ours.encode(text) == hf.encode(text)
    for skip in (False, True):
        assert ours.decode(hf.encode(text), skip_special_tokens=skip) == hf.decode(hf.encode(text), skip_special_tokens=skip)
    assert ours.all_special_tokens == hf.all_special_tokens
    assert ours.added_tokens_decoder.keys() == hf.added_tokens_decoder.keys()

    rows = [{"input_ids": hf.encode(t), "labels": 1} for t in TEXTS]
    for side in ("left", "right"):
        for kw in ({}, {"pad_to_multiple_of": 8}, {"padding": "max_length", "max_length": 40}):
            a = hf.pad(rows, padding_side=side, return_tensors="pt", **kw)
            b = ours.pad(rows, padding_side=side, return_tensors="pt", **kw)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (side, kw)
        a = hf(TEXTS, padding=True, pad_to_multiple_of=16, padding_side=side)
        b = ours(TEXTS, padding=True, pad_to_multiple_of=16, padding_side=side)
        assert a["input_ids"] == b["input_ids"] and a["attention_mask"] == b["attention_mask"]
    assert ours.pad({"input_ids": [5, 6]}, padding="max_length", max_length=4)["input_ids"] == \
        hf.pad({"input_ids": [5, 6]}, padding="max_length", max_length=4)["input_ids"]
    single = {"input_ids": torch.tensor(hf.encode(TEXTS[0]))}
    a = hf.pad(single, padding="max_length", max_length=30, return_tensors="pt")
    b = ours.pad(single, padding="max_length", max_length=30, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    with pytest.raises(ValueError, match="input_ids"):
        ours.pad([{"labels": 1}])
    with pytest.raises(TypeError, match="pad_to"):
        ours.pad(rows, pad_to=8)
    with pytest.raises(TypeError, match="a non-empty list of dicts"):
        ours.pad([[1, 2], [3]])
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        ours(TEXTS, padding=True, pad_to_multiple_of=-1)  # (0 is no multiple, as Transformers reads it)


TOOLS_TEMPLATE = (
    "{% if tools %}<|tools|>{{ tools | tojson }}<|end|>\n{% endif %}"
    "{% if documents %}{% for d in documents %}<|doc|>{{ d.title }}: {{ d.text }}<|end|>\n{% endfor %}{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}{{ note | default('') }}"
)


def test_chat_template_tools_documents_and_options_match_transformers(pair):
    hf, ours, _ = pair
    tools = [{"type": "function", "function": {"name": "peel", "description": "Peel a fruit",
                                               "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}}]
    docs = [{"title": "Bananas", "text": "Yellow, curved."}]
    for kw in ({"tools": tools}, {"documents": docs}, {"tools": tools, "documents": docs, "note": "x"}):
        a = hf.apply_chat_template(CHAT, chat_template=TOOLS_TEMPLATE, add_generation_prompt=True, tokenize=False, **kw)
        assert ours.apply_chat_template(CHAT, chat_template=TOOLS_TEMPLATE, add_generation_prompt=True,
                                        tokenize=False, **kw) == a
    a = hf.apply_chat_template([CHAT, CHAT[:2]], tokenizer_kwargs={"padding_side": "left"}, padding=True)
    b = ours.apply_chat_template([CHAT, CHAT[:2]], tokenizer_kwargs={"padding_side": "left"}, padding=True)
    assert a["input_ids"] == b["input_ids"] and b["input_ids"][1][0] == ours.pad_token_id
    for kw in (dict(return_assistant_tokens_mask=True, tokenize=False), dict(tools=[len])):  # refused by both
        with pytest.raises(ValueError, match="return_assistant_tokens_mask|Tools"):
            hf.apply_chat_template(CHAT, **kw)
        with pytest.raises(ValueError, match="return_assistant_tokens_mask|tools"):
            ours.apply_chat_template(CHAT, **kw)


@pytest.mark.parametrize("side", ["right", "left"])
def test_transformers_data_collators_take_it(pair, side):
    """Transformers' data collators pad through the tokenizer's `pad`: with moetorch's tokenizer
    they give the batches they give with Transformers' (what a Trainer script passes as
    `data_collator`)."""
    hf, ours, _ = pair
    before = hf.padding_side, ours.padding_side
    ours.padding_side = hf.padding_side = side
    texts = ["def f(x):\n    return x", "import os", "class A:\n    pass\n\n\nx = 1"]
    for make in (lambda t: transformers.DataCollatorForLanguageModeling(t, mlm=False),
                 lambda t: transformers.DataCollatorWithPadding(t, pad_to_multiple_of=8)):
        got = make(ours)([dict(ours(t)) for t in texts])
        want = make(hf)([dict(hf(t)) for t in texts])
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
    hf.padding_side, ours.padding_side = before


LLAMA_TEXTS = ["Hello world", " Hello", "  two spaces", "x  y", "\n", "\n\nnew", " ", "", "tab\there", "ünïcödé €",
               "<|user|>\nSolve 2x + 3 = 7<|end|>\n<|assistant|>\n", "a<|end|>b", "<|user|>Hi", "<s>text</s>",
               "experts per token; dense models"]


@pytest.mark.parametrize("fields", [
    {}, {"legacy": False}, {"legacy": True}, {"add_prefix_space": False}, {"legacy": True, "add_prefix_space": False},
    {"tokenizer_class": "LlamaTokenizerFast", "padding_side": "right"}, {"tokenizer_class": None},
], ids=["defaults", "legacy-false", "legacy-true", "no-prefix", "legacy-no-prefix", "fast-right", "no-class"])
def test_llama_style_tokenizers_match_transformers(fields, tmp_path):
    """Phi-3.5-MoE and JetMoE ship a SentencePiece-style tokenizer.json whose tokenizer_config.json
    names LlamaTokenizer: Transformers 5 then builds Llama's pipeline (no "▁" after special tokens
    unless legacy=True, none at all with add_prefix_space=False, left padding), not the file's. The
    same ids, tokens, decoded text, padding and chat prompts as Transformers, and saves that each
    library reads back the same."""
    path = build_llama_tokenizer(tmp_path / "tok", **fields)
    hf, ours = transformers.AutoTokenizer.from_pretrained(path), Tokenizer.from_pretrained(path)
    for text in LLAMA_TEXTS:
        want = hf(text)["input_ids"]
        assert ours(text)["input_ids"] == want, text
        assert ours.convert_ids_to_tokens(want) == hf.convert_ids_to_tokens(want), text
        for skip in (False, True):
            assert ours.decode(want, skip_special_tokens=skip) == hf.decode(want, skip_special_tokens=skip), text
    assert ours.padding_side == hf.padding_side
    batch = dict(padding=True, return_tensors="pt")
    for key, value in hf(LLAMA_TEXTS[:4], **batch).items():
        assert torch.equal(ours(LLAMA_TEXTS[:4], **batch)[key], value), key
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What about 2x + 3 = 7?"}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) == \
        hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ours.save_pretrained(tmp_path / "ours")
    hf.save_pretrained(tmp_path / "hf")
    for saved in ("ours", "hf"):
        a = transformers.AutoTokenizer.from_pretrained(tmp_path / saved)
        b = Tokenizer.from_pretrained(tmp_path / saved)
        for text in LLAMA_TEXTS:
            assert a(text)["input_ids"] == b(text)["input_ids"], (saved, text)
            if saved == "ours":  # (Transformers' own save leaves `legacy` out, so its reload may tokenize otherwise)
                assert b(text)["input_ids"] == hf(text)["input_ids"], (saved, text)


@pytest.mark.parametrize("kind", ["byte-level", "llama"])
def test_text_pairs_and_truncation_strategies_match_transformers(kind, tmp_path):
    """Pairs (what a sequence classifier reads for entailment or similarity) join as the
    post-processor's pair template joins them; truncation keeps the special tokens and takes the
    strategy's tokens off, on the truncation side, as Transformers' fast tokenizer does."""
    path = (build_llama_tokenizer if kind == "llama" else build_tokenizer)(tmp_path / "tok")
    hf, ours = transformers.AutoTokenizer.from_pretrained(path), Tokenizer.from_pretrained(path)
    firsts = ["The mixture of experts routes each token.", "Solve 2x + 3 = 7", "Sparse"]
    seconds = ["Bananas and dragonfruits make a fine smoothie.", "x = 2", "models activate a few experts per token"]
    for side in ("right", "left"):
        hf.truncation_side = ours.truncation_side = side
        for kw in (dict(), dict(truncation=True, max_length=9), dict(truncation="only_first", max_length=14),
                   dict(truncation="only_first", max_length=40), dict(truncation="only_second", max_length=12),
                   dict(truncation="only_second", max_length=30), dict(truncation="longest_first", max_length=7),
                   dict(padding=True, truncation=True, max_length=10, return_tensors="pt")):
            try:
                want = hf(firsts, seconds, **kw)
            except Exception as e:  # a strategy that cannot reach max_length: an error in both
                assert "too short" in str(e)
                with pytest.raises(Exception, match="too short"):
                    ours(firsts, seconds, **kw)
                continue
            got = ours(firsts, seconds, **kw)
            for key in ("input_ids", "attention_mask"):
                assert (torch.equal(got[key], want[key]) if "return_tensors" in kw else got[key] == want[key]), (side, kw)
            lists = {k: v for k, v in kw.items() if k != "return_tensors"}
            assert ours(firsts[0], seconds[0], **lists)["input_ids"] == hf(firsts[0], seconds[0], **lists)["input_ids"]
            if lists.get("truncation") in (None, True, "longest_first"):  # one text alone
                assert ours(firsts, **lists)["input_ids"] == hf(firsts, **lists)["input_ids"]
    if kind == "llama":  # Llama's pipeline needs the BPE model it rebuilds
        data = json.loads((path / "tokenizer.json").read_text())
        data["model"] = {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1}, "unk_token": "<unk>"}
        (path / "tokenizer.json").write_text(json.dumps(data))
        with pytest.raises(ValueError, match="tokenizer_class LlamaTokenizer needs a BPE model, got 'WordLevel'"):
            Tokenizer.from_pretrained(path)
    with pytest.raises(ValueError, match="text_pair must match text"):
        ours(firsts, seconds[:2])
    with pytest.raises(ValueError, match="truncation must be"):
        ours(firsts, truncation="shortest")
