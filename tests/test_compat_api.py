"""The Transformers 5.23 API around the models, checked against Transformers itself: config dtypes,
attributes set after construction, labels, JetMoE's `head_dim`, `from_config` / `_from_config` /
`AutoConfig.for_model` / `get_config_dict`, `from_pretrained(config=path)` and its unknown keywords,
save options, forwards' extra keywords, a cache passed with `use_cache=False`, and the class
attributes tools read (`_no_split_modules`, `_tied_weights_keys`, `is_compileable`)."""

from __future__ import annotations

import copy
import inspect
import json
import logging

import pytest
import torch
import transformers
from archs import ARCH_IDS, ARCHS, JETMOE, PHIMOE, randomize_
from parity import close, compare_outputs, make_inputs, make_pair

import moetorch
from moetorch import ConfigError

HEADS = ["model", "causal_lm", "seq_cls"]
AUTOS = {"model": "AutoModel", "causal_lm": "AutoModelForCausalLM", "seq_cls": "AutoModelForSequenceClassification"}


def hf_checkpoint(arch, path, seed=0, **overrides):
    model = arch.hf["causal_lm"](arch.hf_config(**overrides))
    randomize_(model, seed)
    model.save_pretrained(path)
    return path


def saved_json(config, path):
    config.save_pretrained(path)
    return json.loads((path / "config.json").read_text())


# ---- r02: config.dtype ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("value", ["bfloat16", torch.float16, "float32", None])
def test_config_dtype_is_a_torch_dtype_written_by_name(arch, value, tmp_path):
    ours, theirs = arch.our_config(dtype=value), arch.hf_config(dtype=value)
    assert ours.dtype == theirs.dtype and type(ours.dtype) is type(theirs.dtype)
    old = arch.our_config(torch_dtype=value), arch.hf_config(torch_dtype=value)
    assert old[0].dtype == old[1].dtype and old[0].torch_dtype == old[1].dtype
    assert saved_json(ours, tmp_path / "o").get("dtype") == saved_json(theirs, tmp_path / "t").get("dtype")
    assert ours.to_dict().get("dtype") == theirs.to_dict().get("dtype")
    assert arch.ours["config"].from_pretrained(tmp_path / "t").dtype == theirs.dtype


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_loaded_config_dtype_as_transformers(arch, tmp_path):
    path = hf_checkpoint(arch, tmp_path / "ck")
    for kwargs in ({}, {"dtype": torch.bfloat16}, {"dtype": "auto"}, {"torch_dtype": torch.float16}):
        ours = arch.ours["causal_lm"].from_pretrained(path, **kwargs)
        theirs = arch.hf["causal_lm"].from_pretrained(path, **kwargs)
        assert (ours.dtype, ours.config.dtype, ours.config.torch_dtype) == (
            theirs.dtype, theirs.config.dtype, theirs.config.dtype), kwargs
        ours.save_pretrained(tmp_path / "o")
        theirs.save_pretrained(tmp_path / "t")
        read = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("o", "t")]
        assert read[0]["dtype"] == read[1]["dtype"], kwargs


def test_config_json_writes_any_torch_dtype_attribute_by_name(tmp_path):
    cfg = PHIMOE.our_config()
    cfg.compute_dtype = torch.float16
    cfg.update({"dtypes": {"a": torch.bfloat16}})
    saved = saved_json(cfg, tmp_path)
    assert saved["compute_dtype"] == "float16" and saved["dtypes"] == {"a": "bfloat16"}
    with pytest.raises(ConfigError, match="`dtype`"):
        PHIMOE.our_config(dtype="bf17")


# ---- r03: from_config, _from_config, AutoConfig.for_model, get_config_dict --------------------------


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("head", HEADS)
def test_auto_from_config_takes_transformers_keywords(arch, head):
    ours_auto, hf_auto = getattr(moetorch, AUTOS[head]), getattr(transformers, AUTOS[head])
    for kwargs in ({}, {"dtype": torch.bfloat16}, {"torch_dtype": torch.float16}, {"dtype": "bfloat16"},
                   {"attn_implementation": "eager"}, {"trust_remote_code": True},
                   {"dtype": torch.bfloat16, "torch_dtype": torch.float16}):
        ours, theirs = ours_auto.from_config(arch.our_config(), **kwargs), hf_auto.from_config(arch.hf_config(), **kwargs)
        assert type(ours).__name__ == type(theirs).__name__, kwargs
        assert (ours.dtype, ours.config.dtype) == (theirs.dtype, theirs.config.dtype), kwargs
        if "attn_implementation" in kwargs:
            assert ours.config._attn_implementation == theirs.config._attn_implementation
    # the config's own dtype builds the model in it, as in Transformers
    ours, theirs = (auto.from_config(arch.our_config(dtype="bfloat16") if auto is ours_auto
                                     else arch.hf_config(dtype="bfloat16")) for auto in (ours_auto, hf_auto))
    assert (ours.dtype, ours.config.dtype) == (theirs.dtype, theirs.config.dtype)
    with pytest.raises(TypeError):
        hf_auto.from_config(arch.hf_config(), no_such_option=1)
    with pytest.raises(TypeError, match="no_such_option"):
        ours_auto.from_config(arch.our_config(), no_such_option=1)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("head", HEADS)
def test_seeded_random_init_gives_transformers_weights(arch, head):
    """A model built under a seed (the class, or an Auto class's from_config) draws Transformers'
    weights bit for bit: the same draws in the same order (PhiMoE's router twice, as there), in
    each variant of the config."""
    for variant in [{}, *arch.variants.values()]:
        seed = int(torch.randint(0, 2**31, (1,)))
        built = []
        for lib, config in ((moetorch, arch.our_config(**variant)), (transformers, arch.hf_config(**variant))):
            torch.manual_seed(seed)
            one = (arch.ours if lib is moetorch else arch.hf)[head](config)
            torch.manual_seed(seed)
            two = getattr(lib, AUTOS[head]).from_config(config)
            built.append((one.state_dict(), two.state_dict()))
        (ours, ours_auto), (theirs, theirs_auto) = built
        assert ours.keys() == theirs.keys(), variant
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), (variant, name)
            assert torch.equal(ours_auto[name], theirs_auto[name]), (variant, name)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("head", HEADS)
def test_private_from_config(arch, head):
    ours = arch.ours[head]._from_config(arch.our_config(), dtype=torch.float16)
    theirs = arch.hf[head]._from_config(arch.hf_config(), dtype=torch.float16)
    assert (ours.dtype, ours.config.dtype) == (theirs.dtype, theirs.config.dtype)
    ours, theirs = arch.ours[head]._from_config(arch.our_config()), arch.hf[head]._from_config(arch.hf_config())
    assert (ours.dtype, ours.config.dtype) == (theirs.dtype, theirs.config.dtype)
    assert torch.get_default_dtype() == torch.float32
    other = JETMOE if arch is PHIMOE else PHIMOE
    with pytest.raises(TypeError, match="config"):
        arch.ours[head]._from_config(other.our_config())


def test_auto_config_for_model_and_get_config_dict(tmp_path):
    for name, arch in (("phimoe", PHIMOE), ("jetmoe", JETMOE)):
        ours = moetorch.AutoConfig.for_model(name, **arch.base)
        theirs = transformers.AutoConfig.for_model(name, **arch.base)
        assert type(ours).__name__ == type(theirs).__name__
        common = ours.to_dict().keys() & theirs.to_dict().keys()
        assert {k: ours.to_dict()[k] for k in common} == {k: theirs.to_dict()[k] for k in common}
    with pytest.raises(ValueError):
        transformers.AutoConfig.for_model("no-such-model")
    with pytest.raises(ValueError, match="no-such-model"):
        moetorch.AutoConfig.for_model("no-such-model")
    path = hf_checkpoint(PHIMOE, tmp_path)
    ours = moetorch.PhimoeConfig.get_config_dict(path, foo=1, cache_dir=None, revision=None)
    theirs = transformers.PhimoeConfig.get_config_dict(path, foo=1, cache_dir=None, revision=None)
    assert ours == theirs


# ---- r04: attributes set later, labels -------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_attributes_set_after_construction_are_saved(arch, tmp_path):
    configs = arch.our_config(), arch.hf_config()
    for cfg in configs:
        cfg.my_flag = 3
        cfg.update({"other_key": "x", "vocab_size": 101})
    (ours, theirs) = configs
    assert (ours.my_flag, ours.other_key, ours.vocab_size) == (theirs.my_flag, theirs.other_key, theirs.vocab_size)
    for key in ("my_flag", "other_key", "vocab_size"):
        assert ours.to_dict()[key] == theirs.to_dict()[key]
        assert json.loads(ours.to_json_string())[key] == json.loads(theirs.to_json_string())[key]
        assert saved_json(ours, tmp_path / "o")[key] == saved_json(theirs, tmp_path / "t")[key]
    back = arch.hf["config"].from_pretrained(tmp_path / "o")
    assert (back.my_flag, back.other_key) == (3, "x")
    del ours.my_flag
    assert "my_flag" not in ours.to_dict() and not hasattr(ours, "my_flag")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_num_labels_and_id2label_set_later_as_transformers(arch, tmp_path):
    ours, theirs = arch.our_config(), arch.hf_config()
    assert ours.to_dict()["id2label"] == theirs.to_dict()["id2label"]  # int keys
    for change in ({"num_labels": 4}, {"num_labels": 4}, {"id2label": {0: "neg", 1: "pos", 2: "mid"}},
                   {"num_labels": 3}, {"num_labels": 5}):
        for cfg in (ours, theirs):
            cfg.update(change)
        assert (ours.num_labels, ours.id2label, ours.label2id) == (theirs.num_labels, theirs.id2label,
                                                                   theirs.label2id), change
        assert ours.to_dict()["id2label"] == theirs.to_dict()["id2label"], change
        assert saved_json(ours, tmp_path / "o")["id2label"] == saved_json(theirs, tmp_path / "t")["id2label"]  # str keys
    model, oracle = arch.ours["seq_cls"](ours), arch.hf["seq_cls"](theirs)
    assert model.score.out_features == oracle.score.out_features
    with pytest.raises(ConfigError, match="num_labels"):
        ours.num_labels = 0


# ---- r05: JetMoE head_dim / num_attention_heads ----------------------------------------------------


def test_jetmoe_head_dim_is_kv_channels_read_and_set(tmp_path):
    ours, theirs = JETMOE.our_config(), JETMOE.hf_config()
    for cfg in (ours, theirs):
        cfg.head_dim = 16
    assert (ours.kv_channels, ours.head_dim) == (theirs.kv_channels, theirs.head_dim)
    assert saved_json(ours, tmp_path / "o")["kv_channels"] == saved_json(theirs, tmp_path / "t")["kv_channels"]
    shapes = [{n: p.shape for n, p in m.named_parameters()}
              for m in (JETMOE.ours["causal_lm"](ours), JETMOE.hf["causal_lm"](theirs))]
    assert shapes[0] == shapes[1]
    # num_attention_heads is derived (docs/differences.md): its own value is taken, another is an error
    ours.num_attention_heads = theirs.num_attention_heads
    assert ours.num_attention_heads == theirs.num_attention_heads
    with pytest.raises(AttributeError, match="num_attention_heads"):
        ours.num_attention_heads = ours.num_attention_heads + 1


# ---- r06 / r13: from_pretrained's config and keywords ----------------------------------------------


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_from_pretrained_reads_config_from_a_path(arch, tmp_path):
    path = hf_checkpoint(arch, tmp_path / "ck")
    other = arch.hf_config(output_router_logits=True, initializer_range=0.5)
    other.save_pretrained(tmp_path / "cfg")
    for config in (tmp_path / "cfg", str(tmp_path / "cfg"), str(tmp_path / "cfg" / "config.json")):
        # Transformers' Auto classes read the checkpoint's config.json whatever config= names (its model
        # classes read config=): moetorch's read config= in both (docs/differences.md)
        for ours_cls in (arch.ours["causal_lm"], moetorch.AutoModelForCausalLM):
            ours = ours_cls.from_pretrained(path, config=config, attention_dropout=0.25)
            theirs = arch.hf["causal_lm"].from_pretrained(path, config=config, attention_dropout=0.25)
            assert type(ours).__name__ == type(theirs).__name__
            for key in ("output_router_logits", "initializer_range", "attention_dropout"):
                assert getattr(ours.config, key) == getattr(theirs.config, key), key
    ids, _ = make_inputs(arch.base["vocab_size"], 1, 5, None)
    with torch.no_grad():
        close(ours(ids).logits, theirs.eval()(ids).logits, "weights from the checkpoint, config from config=")
    other_arch = JETMOE if arch is PHIMOE else PHIMOE
    for wrong in (other_arch.our_config(), {"vocab_size": 97}):
        with pytest.raises(TypeError, match="config"):
            arch.ours["causal_lm"].from_pretrained(path, config=wrong)
    other_arch.hf_config().save_pretrained(tmp_path / "wrong")
    with pytest.raises(ConfigError, match="model_type"):
        arch.ours["causal_lm"].from_pretrained(path, config=tmp_path / "wrong")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_from_pretrained_unknown_keywords_are_errors_as_in_transformers(arch, tmp_path):
    extra = arch.hf_config(my_flag=1)
    path = hf_checkpoint(arch, tmp_path / "ck", my_flag=1)
    assert extra.my_flag == 1
    for ours_cls, hf_cls in ((arch.ours["causal_lm"], arch.hf["causal_lm"]),
                             (moetorch.AutoModelForCausalLM, transformers.AutoModelForCausalLM)):
        for bad in ({"torch_dtyp": torch.bfloat16}, {"no_such_option": 1}):
            with pytest.raises(TypeError):
                hf_cls.from_pretrained(path, **bad)
            with pytest.raises(TypeError, match=next(iter(bad))):
                ours_cls.from_pretrained(path, **bad)
        # config attributes (fields, and keys of the config.json) are set
        kwargs = {"my_flag": 5, "router_jitter_noise" if arch is PHIMOE else "aux_loss_coef": 0.5}
        ours, theirs = ours_cls.from_pretrained(path, **kwargs), hf_cls.from_pretrained(path, **kwargs)
        for key in kwargs:
            assert getattr(ours.config, key) == getattr(theirs.config, key), key
        ours.save_pretrained(tmp_path / "again")
    with pytest.raises(TypeError):
        arch.hf["causal_lm"].from_pretrained(path, config=arch.hf_config(), no_such_option=1)
    with pytest.raises(TypeError, match="no_such_option"):
        arch.ours["causal_lm"].from_pretrained(path, config=arch.our_config(), no_such_option=1)


# ---- r07: save options -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_save_options_as_transformers(arch, tmp_path):
    listed = []
    for cfg, d in ((arch.our_config(), tmp_path / "o"), (arch.hf_config(), tmp_path / "t")):
        cfg.save_pretrained(d, push_to_hub=False)
        listed.append(sorted(p.name for p in d.iterdir()))
    assert listed[0] == listed[1]
    with pytest.raises(TypeError, match="no_such_option"):
        arch.our_config().save_pretrained(tmp_path / "x", no_such_option=1)
    default = [inspect.signature(c.save_pretrained).parameters["max_shard_size"].default
               for c in (arch.ours["causal_lm"], arch.hf["causal_lm"])]
    assert default[0] == default[1]
    hf, ours = make_pair(arch, tmp_path, "causal_lm", "hf_to_ours", seed=3)
    ours.save_pretrained(tmp_path / "so", max_shard_size="20KB")
    hf.save_pretrained(tmp_path / "st", max_shard_size="20KB")
    index = [json.loads((tmp_path / d / "model.safetensors.index.json").read_text())["metadata"] for d in ("so", "st")]
    assert index[0].keys() == index[1].keys() and index[0]["total_parameters"] == index[1]["total_parameters"]


# ---- r09: forwards' extra keywords -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("head", HEADS)
def test_forward_ignores_unknown_keywords_with_one_warning(arch, head, tmp_path, caplog):
    hf, ours = make_pair(arch, tmp_path, head, "hf_to_ours", seed=4)
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 6, "left")
    extra = {"token_type_ids": torch.zeros_like(ids), "head_mask": None, "foo": 1}
    moetorch.utils.WARNED_ONCE.clear()
    with torch.no_grad(), caplog.at_level("WARNING", logger="moetorch"):
        theirs = hf(ids, attention_mask=mask, **extra)
        got = ours(ids, attention_mask=mask, **extra)
        ours(ids, attention_mask=mask, **extra)
    first = "last_hidden_state" if head == "model" else "logits"
    real = mask.bool() if head == "model" else slice(None)
    close(got[first][real], theirs[first][real], first)
    told = [r.getMessage() for r in caplog.records if "ignores the keyword arguments" in r.getMessage()]
    assert len(told) == 1 and all(k in told[0] for k in extra)
    # Transformers' Trainer: loss keywords for the causal LM, none for the classifier (docs/differences.md)
    accepts = getattr(ours, "accepts_loss_kwargs", None)
    if accepts is None:
        accepts = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(ours.forward).parameters.values())
    assert accepts is (head != "seq_cls")


# ---- r11: a cache passed with use_cache=False ------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("head", HEADS)
def test_cache_passed_with_use_cache_false_is_returned_and_filled(arch, head, tmp_path):
    hf, ours = make_pair(arch, tmp_path, head, "hf_to_ours", seed=5)
    ids, _ = make_inputs(arch.base["vocab_size"], 2, 6, None)
    got = []
    with torch.no_grad():
        for model, cache in ((hf, transformers.DynamicCache()), (ours, moetorch.DynamicCache())):
            out = model(ids, past_key_values=cache, use_cache=False)
            plain = model(ids, use_cache=False)
            got.append((out.past_key_values is cache, cache.get_seq_length(), plain.past_key_values is None))
            if out.past_key_values is not None:
                k = out.past_key_values.layers[0].keys
                got[-1] += (tuple(k.shape),)
    assert got[0] == got[1]


# ---- class attributes tools read ----------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("head", HEADS)
def test_class_attributes_tools_read(arch, head):
    ours, theirs = arch.ours[head], arch.hf[head]
    assert ours._no_split_modules == theirs._no_split_modules
    assert getattr(ours, "_tied_weights_keys", None) == theirs._tied_weights_keys
    config = PHIMOE.hf_config()
    assert moetorch.DynamicCache().is_compileable == transformers.DynamicCache().is_compileable
    assert (moetorch.StaticCache(PHIMOE.our_config(), max_cache_len=8).is_compileable
            == transformers.StaticCache(config=config, max_cache_len=8).is_compileable)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_activation_is_transformers_own(dtype):
    """Each `hidden_act` name computes what Transformers' ACT2FN computes for it, bit for bit; its
    two with learned parameters are the only names left out, and a config that names one is an
    error that lists the names there are."""
    from transformers.activations import ACT2CLS, ACT2FN

    from moetorch.ops.activations import ACTIVATIONS

    assert set(ACT2CLS) - set(ACTIVATIONS) == {"prelu", "xielu"}
    x = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 6).to(dtype)
    for name, fn in ACTIVATIONS.items():
        assert torch.equal(fn(x), ACT2FN[name](x)), name
    with pytest.raises(ValueError, match="hidden_act.*'prelu'.*allowed"):
        moetorch.PhimoeConfig(hidden_act="prelu")


@pytest.mark.parametrize("arch,act", [(PHIMOE, "relu2"), (JETMOE, "quick_gelu"), (PHIMOE, "gelu_fast")],
                         ids=["phimoe-relu2", "jetmoe-quick_gelu", "phimoe-gelu_fast"])
def test_a_model_of_an_unfused_activation_matches_transformers(arch, act, tmp_path):
    key = "hidden_act" if arch.name == "phimoe" else "activation_function"
    hf, ours = make_pair(arch, tmp_path, **{key: act})
    ids, mask = make_inputs(ours.config.vocab_size, 2, 9, "left", seed=3)
    with torch.no_grad():
        compare_outputs(hf(ids, attention_mask=mask), ours(ids, attention_mask=mask), mask, fields=("logits",))


# ---- Transformers' own model tests, run against moetorch: the differences they found -------------


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("head", HEADS)
def test_can_generate_is_a_class_method(arch, head):
    assert arch.ours[head].can_generate() == arch.hf[head].can_generate() == (head == "causal_lm")
    assert arch.ours[head](arch.our_config()).can_generate() == (head == "causal_lm")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_config_iterates_over_its_keys(arch):
    ours, theirs = arch.our_config(foo_extra=3), arch.hf_config(foo_extra=3)
    keys = list(ours)
    assert "hidden_size" in ours and "foo_extra" in ours and "no_such_key" not in ours
    assert not any(k.startswith("_") for k in keys) and len(keys) == len(set(keys))
    public = {k for k in theirs if not k.startswith("_")}
    assert public - {"transformers_version", "chunk_size_feed_forward", "is_encoder_decoder"} <= set(keys)
    for key in keys:  # every key names an attribute
        getattr(ours, key)
    # Transformers' attribute_map, whose names read and set the attributes they map to
    assert type(ours).attribute_map == type(theirs).attribute_map
    for alias, name in type(ours).attribute_map.items():
        assert getattr(ours, alias) == getattr(ours, name) == getattr(theirs, alias)
        setattr(ours, alias, 6)
        assert getattr(ours, name) == 6


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_post_init_again_keeps_every_weight(arch, tmp_path):
    """Transformers initialises each module once: post_init on a loaded model (or after a resize)
    changes nothing; a fresh model's post_init does not draw its weights again."""
    path = hf_checkpoint(arch, tmp_path / "ck")
    ids = torch.randint(1, arch.base["vocab_size"], (2, 7))
    for model in (arch.ours["causal_lm"].from_pretrained(path), arch.ours["causal_lm"](arch.our_config()).eval()):
        with torch.no_grad():
            before = model(ids).logits
            model.post_init()
            assert torch.equal(model(ids).logits, before)
    untied = hf_checkpoint(arch, tmp_path / "untied", tie_word_embeddings=False)
    model, theirs = arch.ours["causal_lm"].from_pretrained(untied), arch.hf["causal_lm"].from_pretrained(untied)
    for m in (model, theirs):
        m.resize_token_embeddings(arch.base["vocab_size"] + 5, mean_resizing=False)
        m.post_init()
    V = arch.base["vocab_size"]
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert torch.equal(model.state_dict()[name][:V], theirs.state_dict()[name][:V]), name
    resized = {k: v.clone() for k, v in model.state_dict().items()}
    model.post_init()
    assert all(torch.equal(v, resized[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_meta_init_then_init_weights_as_a_load(arch, tmp_path):
    """Built under `torch.device("meta")` (nothing initialised), `to_empty`, `init_weights()`, then
    the checkpoint's state_dict: the rotary tables are computed, so the logits equal a normal load
    and Transformers'."""
    overrides = {"rope_scaling": arch_longrope(arch)} if arch.name == "phimoe" else {}
    path = hf_checkpoint(arch, tmp_path / "ck", **overrides)
    loaded = arch.ours["causal_lm"].from_pretrained(path)
    with torch.device("meta"):
        model = arch.ours["causal_lm"](loaded.config.copy())
    model.to_empty(device="cpu")
    for b in model.buffers():
        b.fill_(float("nan"))  # (what `to_empty` leaves is arbitrary)
    model.init_weights()
    model.load_state_dict(loaded.state_dict())
    model.eval()
    ids = torch.randint(1, arch.base["vocab_size"], (2, 7))
    theirs = arch.hf["causal_lm"].from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
        close(model(ids).logits, theirs(ids).logits, "logits")


def arch_longrope(arch):
    from archs import longrope_scaling

    return longrope_scaling(arch.base["hidden_size"] // arch.base["num_attention_heads"], original=16)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_gradient_checkpointing_in_the_config_turns_it_on(arch, tmp_path):
    """`gradient_checkpointing: true` (an older config.json key) turns checkpointing on at
    construction and through from_pretrained, and is dropped from the config, as in Transformers
    (whose JetMoE has no checkpointing: moetorch's has)."""
    model = arch.ours["causal_lm"](arch.our_config(gradient_checkpointing=True))
    assert model.is_gradient_checkpointing and not hasattr(model.config, "gradient_checkpointing")
    path = hf_checkpoint(arch, tmp_path / "ck")
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**data, "gradient_checkpointing": True}))
    loaded = arch.ours["causal_lm"].from_pretrained(path)
    assert loaded.is_gradient_checkpointing
    loaded.save_pretrained(tmp_path / "saved")
    assert "gradient_checkpointing" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    if arch.name == "phimoe":
        assert arch.hf["causal_lm"].from_pretrained(path).is_gradient_checkpointing
    assert not arch.ours["causal_lm"].from_pretrained(tmp_path / "saved").is_gradient_checkpointing


def test_jetmoe_rope_changed_after_the_config_to_a_kind_not_supported_is_refused():
    """A config whose rope_parameters were set afterwards to a kind moetorch does not run makes no
    model (it would silently run the default RoPE); one set to a kind it runs ("linear", and
    "dynamic" past max_position_embeddings) gives Transformers' hidden states."""
    config = JETMOE.our_config()
    config.rope_parameters = {"rope_type": "ntk", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(ConfigError, match=r"rope_parameters.rope_type.*'ntk' is not supported"):
        moetorch.JetMoeModel(config)
    config.rope_parameters = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    config.kv_channels = 2
    with pytest.raises(ConfigError, match="`kv_channels`"):
        moetorch.JetMoeModel(config)
    config = JETMOE.our_config(max_position_embeddings=16)
    for params in ({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
                   {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 100.0}):
        config.rope_parameters = dict(params)
        theirs = JETMOE.hf_config(max_position_embeddings=16)
        theirs.rope_parameters = dict(params)
        model, hf_model = moetorch.JetMoeModel(config), transformers.JetMoeModel(theirs)
        hf_model.load_state_dict(model.state_dict())
        ids = torch.randint(1, JETMOE.base["vocab_size"], (1, 40))
        with torch.no_grad():
            close(model(ids).last_hidden_state, hf_model.eval()(ids).last_hidden_state, f"hidden, {params}")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("head", HEADS)
def test_from_pretrained_state_dict(arch, head, tmp_path):
    """`from_pretrained(None, config=, state_dict=)` and `from_pretrained(dir, state_dict=)`: the
    weights from the mapping (a Transformers model's state_dict), as Transformers loads them."""
    path = hf_checkpoint(arch, tmp_path / "ck")
    source = arch.hf[head].from_pretrained(path)
    randomize_(source, 7)
    sd = source.state_dict()
    config = arch.ours["config"].from_pretrained(path)
    ids = torch.randint(1, arch.base["vocab_size"], (2, 6))
    with torch.no_grad():
        want = source.eval()(ids)
    for model in (arch.ours[head].from_pretrained(None, config=config, state_dict=sd),
                  arch.ours[head].from_pretrained(path, state_dict=sd),
                  arch.ours[head].from_pretrained(None, config=str(path), state_dict=sd)):
        with torch.no_grad():
            got = model(ids)
        key = "last_hidden_state" if head == "model" else "logits"
        close(got[key], want[key], key)
        assert model.dtype == torch.float32
    with pytest.raises(ValueError, match=r"from_pretrained\(None, \.\.\.\) needs both `config` and `state_dict`"):
        arch.ours[head].from_pretrained(None, config=config)
    with pytest.raises(ValueError, match="needs both"):
        arch.ours[head].from_pretrained(None, state_dict=sd)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        arch.ours[head].from_pretrained(path, state_dict=[1, 2])
    with pytest.raises(TypeError, match="state_dict must map tensor names to tensors"):
        arch.ours[head].from_pretrained(path, state_dict={"x": 1})
    # a tensor the model needs is missing: named, as from files (not the embeddings, which a tied
    # model takes from a stored head, as Transformers does)
    missing = next(k for k in sd if "layers.0." in k and k.endswith("norm.weight"))
    partial = {k: v for k, v in sd.items() if k != missing}
    with pytest.raises(moetorch.CheckpointError, match=f"checkpoint state_dict lacks 1 tensor.*{missing}"):
        arch.ours[head].from_pretrained(path, state_dict=partial)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_set_experts_implementation_is_taken(arch):
    """Transformers' switch of the experts' kernels: taken with its names (a str, or a dict by
    sub-config), changing no logit; an unknown name is a ValueError, as there."""
    model, theirs = arch.ours["causal_lm"](arch.our_config()).eval(), arch.hf["causal_lm"](arch.hf_config())
    ids = torch.randint(1, arch.base["vocab_size"], (2, 5))
    with torch.no_grad():
        before = model(ids).logits
        for impl in ("eager", "grouped_mm", "batched_mm", {"": "grouped_mm"}):
            model.set_experts_implementation(impl)
            assert torch.equal(model(ids).logits, before)
    with pytest.raises(ValueError, match="'foo' is not an experts implementation"):
        model.set_experts_implementation("foo")
    if arch.name == "phimoe":  # (Transformers' JetMoE has no such switch: a ValueError for any name)
        theirs.set_experts_implementation("grouped_mm")
        with pytest.raises((ValueError, KeyError)):
            theirs.set_experts_implementation("foo")


# ---- embeddings: resized in place, tied heads' biases, models without a head ------------------------


class TaggedEmbedding(torch.nn.Embedding):
    """A user's embedding subclass (set with set_input_embeddings), which a resize keeps."""


def _resize_summary(model, new_num_tokens, **kwargs):
    """What a resize leaves, as comparable between the libraries: module and parameter identity,
    frozen flags, the input hook, shapes, padding_idx, tying and the kept rows."""
    embeddings, weight = model.get_input_embeddings(), model.get_input_embeddings().weight
    V = weight.shape[0]
    before = weight.detach().clone()
    returned = model.resize_token_embeddings(new_num_tokens, **kwargs)
    now, head = model.get_input_embeddings(), model.get_output_embeddings()
    n = min(V, now.weight.shape[0])
    return {
        "returned the embeddings": returned is now,
        "same module": now is embeddings,
        "same parameter": now.weight is weight,
        "class": type(now).__name__,
        "requires_grad": (now.weight.requires_grad, head.weight.requires_grad if head is not None else None),
        "shape": tuple(now.weight.shape),
        "num_embeddings": now.num_embeddings,
        "padding_idx": now.padding_idx,
        "vocab_size": model.config.vocab_size,
        "head": None if head is None else (tuple(head.weight.shape), head.out_features, head.weight is now.weight,
                                           None if head.bias is None else tuple(head.bias.shape)),
        "kept rows": torch.equal(now.weight[:n], before[:n]),
        "hook output requires_grad": model.get_input_embeddings()(torch.tensor([[0]])).requires_grad if n else None,
    }


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings_in_place_as_transformers(arch, tied, tmp_path):
    """As Transformers resizes: the embeddings keep their module and parameter (the tensor is
    replaced), so frozen flags, the `enable_input_require_grads` hook and an embedding subclass
    survive; a resize to the same size changes nothing; to 0 gives 0 rows (padding_idx dropped);
    a tied head stays tied, also after the config's flag was turned off; the new rows of a head's
    bias (tied: zeros, as `tie_weights` pads it)."""
    path = hf_checkpoint(arch, tmp_path / "ck", tie_word_embeddings=tied,
                         **({"lm_head_bias": True} if arch is PHIMOE else {}))
    V = arch.base["vocab_size"]
    subclass = TaggedEmbedding(V, arch.base["hidden_size"])
    steps = {
        "frozen, grown": lambda m: (m.requires_grad_(False), _resize_summary(m, V + 8))[1],
        "hooked, padded": lambda m: (m.enable_input_require_grads(), m.requires_grad_(False),
                                     _resize_summary(m, V + 3, pad_to_multiple_of=8))[2],
        "same size": lambda m: _resize_summary(m, V),
        "shrunk": lambda m: _resize_summary(m, V - 7, mean_resizing=False),
        "to zero": lambda m: _resize_summary(m, 0),
        "subclass": lambda m: (m.set_input_embeddings(copy.deepcopy(subclass)), _resize_summary(m, V + 2))[1],
        "flag off after tying": lambda m: (setattr(m.config, "tie_word_embeddings", False),
                                           _resize_summary(m, V + 4))[1],
    }
    for step, run in steps.items():
        ours, theirs = (lib.from_pretrained(path) for lib in (arch.ours["causal_lm"], arch.hf["causal_lm"]))
        got, want = run(ours), run(theirs)
        if not tied:  # (Transformers builds a new untied head, moetorch resizes it in place: flags alike)
            assert got.pop("head") == want.pop("head"), step
        elif step == "flag off after tying":  # (Transformers leaves the bias at the old size: that model fails)
            got["head"], want["head"] = got["head"][:3], want["head"][:3]
        assert got == want, step
        for name, tensor in theirs.state_dict().items():
            if "embed_tokens" in name or "lm_head" in name:
                assert torch.equal(ours.state_dict()[name][:V], tensor[:V]), (step, name)
        bias = ours.get_output_embeddings().bias
        if bias is not None and bias.shape[0] > V:  # new rows: zeros where tied (tie_weights' padding), else the mean
            close(bias[V:], torch.zeros(bias.shape[0] - V) if tied else bias[:V].mean().expand(bias.shape[0] - V),
                  f"{step}: new rows of the head's bias")
    model = arch.ours["causal_lm"].from_pretrained(path).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.resize_token_embeddings(V + 8, mean_resizing=False)
    assert any(p is model.get_input_embeddings().weight for p in optimizer.param_groups[0]["params"])
    ids = torch.randint(1, V + 8, (2, 6))
    model(ids, labels=ids).loss.backward()
    optimizer.step()  # the optimizer built before the resize trains the resized parameters
    for bad in (-1, 8.0, True):
        with pytest.raises(ValueError, match="new_num_tokens must be a non-negative integer"):
            model.resize_token_embeddings(bad)
    for bad in (0, -3, 8.0, True):
        with pytest.raises(ValueError, match=f"pad_to_multiple_of must be a positive integer, got {bad!r}"):
            model.resize_token_embeddings(V + 3, pad_to_multiple_of=bad)
    assert model.get_input_embeddings().weight.shape[0] == V + 8  # (none of them changed it)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("tied", [True, False])
def test_seeded_resize_gives_transformers_numbers(arch, tied, tmp_path):
    """A resize under a seed gives Transformers' tensors bit for bit, grown (rows drawn from
    normal(0, initializer_range), or about the old rows' mean) or shrunk, with or without a head
    bias, and leaves the generator where Transformers' leaves it (the same draws in the same order)."""
    V = arch.base["vocab_size"]
    biases = [{"lm_head_bias": True}, {}] if arch is PHIMOE else [{}]
    for bias in biases:
        path = hf_checkpoint(arch, tmp_path / f"ck{len(bias)}", tie_word_embeddings=tied, **bias)
        for n, kwargs in ((V + 9, {"mean_resizing": False}), (V + 9, {}), (V - 5, {}), (V + 3, {"pad_to_multiple_of": 16})):
            seed = int(torch.randint(0, 2**31, (1,)))
            done = []
            for cls in (arch.ours["causal_lm"], arch.hf["causal_lm"]):
                model = cls.from_pretrained(path)
                torch.manual_seed(seed)
                model.resize_token_embeddings(n, **kwargs)
                done.append((model.state_dict(), torch.rand(4), model.config.vocab_size))
            (ours, after, vocab), (theirs, want_after, want_vocab) = done
            case = (bias, n, kwargs)
            assert vocab == want_vocab and torch.equal(after, want_after), case
            assert ours.keys() == theirs.keys(), case
            for name in ours:
                assert torch.equal(ours[name], theirs[name]), (case, name)


@pytest.mark.parametrize("size", [102, 90])
def test_tie_weights_fits_the_head_bias_as_transformers(size, tmp_path):
    """A tied PhiMoE head with a bias, given embeddings of another size: `tie_weights()` pads the
    bias with zeros (or cuts it) to the new rows, as Transformers' does, so the model runs and gives
    Transformers' logits. Transformers 5.23's signatures are taken: `tie_weights(missing_keys=,
    recompute_mapping=)` and `set_output_embeddings(new_embeddings=)`."""
    hf, ours = make_pair(PHIMOE, tmp_path, tie_word_embeddings=True, lm_head_bias=True)
    new = torch.nn.Embedding(size, PHIMOE.base["hidden_size"])
    for model in (hf, ours):
        model.set_input_embeddings(copy.deepcopy(new))
        missing = {"lm_head.weight", "model.norm.weight"}
        model.tie_weights(missing_keys=missing, recompute_mapping=False)
        assert missing == {"model.norm.weight"}
        model.tie_weights(recompute_mapping=True)
        head = model.get_output_embeddings()
        assert head.weight is model.get_input_embeddings().weight and head.bias.shape == (size,)
    close(ours.lm_head.bias, hf.lm_head.bias, "bias fitted to the new rows")
    assert ours.lm_head.out_features == size
    ids = torch.randint(1, 90, (2, 5))
    with torch.no_grad():
        close(ours(ids).logits, hf(ids).logits, "logits")
    for model in (hf, ours):
        model.set_output_embeddings(new_embeddings=torch.nn.Linear(PHIMOE.base["hidden_size"], size, bias=True))


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("head", ["model", "seq_cls"])
def test_set_output_embeddings_without_a_head_raises(arch, head):
    """A model without an output head (a base model, a classifier): `set_output_embeddings` raises
    an AttributeError, as in Transformers, and adds no `lm_head`."""
    for lib in (arch.ours, arch.hf):
        model = lib[head](arch.our_config() if lib is arch.ours else arch.hf_config())
        with pytest.raises(AttributeError, match="lm_head"):
            model.set_output_embeddings(torch.nn.Linear(arch.base["hidden_size"], arch.base["vocab_size"]))
        assert model.get_output_embeddings() is None and not any("lm_head" in k for k in model.state_dict())


# ---- from_pretrained: experts_implementation, dtype names, attn_implementation forms ------------------


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_from_pretrained_checks_experts_implementation(arch, tmp_path):
    """`from_pretrained(experts_implementation=)` and `_from_config(experts_implementation=)`: an
    unknown name is a ValueError that names the argument, the value and the names taken, as
    `set_experts_implementation`'s (Transformers raises too); Transformers' names load."""
    path = hf_checkpoint(arch, tmp_path / "ck")
    with pytest.raises(ValueError, match=r"from_pretrained: experts_implementation: 'foo' is not an experts "
                                         r"implementation; Transformers' are \[.*'grouped_mm'"):
        arch.ours["causal_lm"].from_pretrained(path, experts_implementation="foo")
    with pytest.raises(ValueError):
        arch.hf["causal_lm"].from_pretrained(path, experts_implementation="foo")
    with pytest.raises(ValueError, match="_from_config: experts_implementation: 'foo'"):
        arch.ours["causal_lm"]._from_config(arch.our_config(), experts_implementation="foo")
    for impl in ("eager", "grouped_mm", {"": "batched_mm"}):
        arch.ours["causal_lm"].from_pretrained(path, experts_implementation=impl)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_from_pretrained_dtype_names_and_attn_implementation_forms(arch, tmp_path, caplog):
    """Loading keywords Transformers takes: any name of a torch dtype models are built in
    ("float64", "double"), loading in it with Transformers' logits; `attn_implementation` as a dict
    by sub-config (its "" entry); "flex_attention", which runs moetorch's sdpa with one warning.
    Other names stay errors that name the argument; `max_memory` without `device_map` too."""
    path = hf_checkpoint(arch, tmp_path / "ck")
    ids = torch.randint(1, arch.base["vocab_size"], (2, 6))
    for kwargs in ({"dtype": "float64"}, {"torch_dtype": "double"}, {"dtype": "half"}):
        ours, theirs = (lib.from_pretrained(path, **kwargs) for lib in (arch.ours["causal_lm"], arch.hf["causal_lm"]))
        assert (ours.dtype, ours.config.dtype) == (theirs.dtype, theirs.config.dtype), kwargs
    ours = arch.ours["causal_lm"].from_pretrained(path, dtype="float64")
    theirs = arch.hf["causal_lm"].from_pretrained(path, dtype="float64")
    if arch is PHIMOE:
        theirs.set_experts_implementation("eager")  # (its grouped experts take no float64)
    with torch.no_grad():
        close(ours(ids).logits, theirs(ids).logits, "float64 logits", atol=1e-10, rtol=1e-10)
    for bad in ("float8", "int8"):
        with pytest.raises(ValueError, match=f"dtype must be .*got '{bad}'"):
            arch.ours["causal_lm"].from_pretrained(path, dtype=bad)

    for impl, want in (({"": "eager"}, "eager"), ({"": "eager", "text_config": "sdpa"}, "eager"), ({}, "sdpa")):
        ours = arch.ours["causal_lm"].from_pretrained(path, attn_implementation=impl)
        theirs = arch.hf["causal_lm"].from_pretrained(path, attn_implementation=impl)
        assert ours.config._attn_implementation == theirs.config._attn_implementation == want, impl
        assert all(m.attn_implementation == want for m in ours.modules() if hasattr(m, "attn_implementation"))
    moetorch.utils.WARNED_ONCE.discard("flex_attention")
    sdpa = arch.ours["causal_lm"].from_pretrained(path, attn_implementation="sdpa")
    with caplog.at_level(logging.WARNING, logger="moetorch"):
        flex = arch.ours["causal_lm"].from_pretrained(path, attn_implementation="flex_attention")
        arch.ours["causal_lm"].from_pretrained(path, attn_implementation={"": "flex_attention"})
        flex.set_attn_implementation("flex_attention")
    assert caplog.text.count("flex_attention") == 1 and "sdpa" in caplog.text
    arch.hf["causal_lm"].from_pretrained(path, attn_implementation="flex_attention")  # taken there too
    assert flex.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(flex(ids).logits, sdpa(ids).logits)
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        arch.ours["causal_lm"].from_pretrained(path, attn_implementation={"": "bogus"})
    with pytest.raises(ValueError, match="max_memory"):
        arch.ours["causal_lm"].from_pretrained(path, max_memory={"cpu": "1GB"})


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_a_transformers_config_object_builds_and_loads_moetorch_models(arch, tmp_path):
    """A script that still imports its config class from Transformers: `transformers.PhimoeConfig`
    (or JetMoE's) handed to a moetorch model class, `from_pretrained(config=)`, an Auto class or
    `from_config` stands for moetorch's config of its values, as Transformers takes its own."""
    path = hf_checkpoint(arch, tmp_path / "ck")
    hf_config = transformers.AutoConfig.from_pretrained(path)
    hf_config.rms_norm_eps = 0.25  # (a setting that moves the logits)
    name = arch.hf["causal_lm"].__name__
    ids = torch.randint(1, arch.base["vocab_size"], (2, 6))
    with torch.no_grad():
        want = getattr(transformers, name).from_pretrained(path, config=hf_config)(ids).logits
        for model in (getattr(moetorch, name).from_pretrained(path, config=hf_config),
                      moetorch.AutoModelForCausalLM.from_pretrained(path, config=hf_config)):
            assert isinstance(model.config, arch.ours["config"]) and model.config.rms_norm_eps == 0.25
            close(model(ids).logits, want, "logits")
        for model in (getattr(moetorch, name)(hf_config), moetorch.AutoModelForCausalLM.from_config(hf_config)):
            assert isinstance(model.config, arch.ours["config"]) and model.config.rms_norm_eps == 0.25
            assert model.model.config is model.config  # (the modules it builds read the converted config)
    assert hf_config.rms_norm_eps == 0.25 and type(hf_config).__module__.startswith("transformers.")
    with pytest.raises(TypeError, match=r"needs a moetorch\.\w+Config, got"):
        (JETMOE if arch is PHIMOE else PHIMOE).ours["causal_lm"](hf_config)
