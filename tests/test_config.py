"""PhimoeConfig: defaults, both RoPE forms, config.json round trips, validation errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import transformers
from archs import ARCH_IDS, ARCHS, PHIMOE, longrope_scaling

import moetorch
from moetorch import ConfigError, JetMoeConfig, PhimoeConfig

SPEC_DEFAULTS = dict(
    vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, hidden_act="silu", max_position_embeddings=131072, initializer_range=0.02,
    rms_norm_eps=1e-5, use_cache=True, pad_token_id=None, bos_token_id=1, eos_token_id=2,
    tie_word_embeddings=False, sliding_window=None, attention_dropout=0.0, num_experts_per_tok=2,
    num_local_experts=16, output_router_logits=False, router_aux_loss_coef=0.001, router_jitter_noise=0.01,
    input_jitter_noise=0.0, attention_bias=False, lm_head_bias=False,
)


def test_spec_defaults():
    cfg = PhimoeConfig()
    for k, v in SPEC_DEFAULTS.items():
        assert getattr(cfg, k) == v, k
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 1000000.0}
    assert cfg.rope_theta == 1000000.0


def test_defaults_match_transformers():
    ours = PhimoeConfig().to_dict()
    theirs = transformers.PhimoeConfig().to_dict()
    for k in set(ours) & set(theirs) - {"id2label"}:
        assert ours[k] == theirs[k], k


def test_v4_form_becomes_rope_parameters():
    scaling = longrope_scaling(128, original=4096)
    cfg = PhimoeConfig(rope_theta=10000.0, rope_scaling=scaling, num_attention_heads=32, hidden_size=4096)
    p = cfg.rope_parameters
    assert p["rope_type"] == "longrope" and p["rope_theta"] == 10000.0
    assert p["short_factor"] == scaling["short_factor"] and p["long_mscale"] == 1.3
    assert cfg.original_max_position_embeddings == 4096
    out = cfg.to_dict()
    assert "rope_scaling" not in out and "rope_theta" not in out and out["rope_parameters"]["rope_type"] == "longrope"


def test_v5_form_equals_v4_form():
    scaling = longrope_scaling(128, original=4096)
    v4 = PhimoeConfig(rope_theta=10000.0, rope_scaling=scaling)
    v5 = PhimoeConfig(rope_parameters={**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": "longrope", "rope_theta": 10000.0})
    assert v4.rope_parameters == {**v5.rope_parameters, "type": "longrope"}  # (the v4 key kept, as Transformers keeps it)
    assert v4.rope_parameters == transformers.PhimoeConfig(rope_theta=10000.0, rope_scaling=scaling).rope_parameters


def test_rope_scaling_given_to_from_pretrained_replaces_the_stored_rope(tmp_path):
    """`from_pretrained(path, rope_scaling=...)` over a config.json in the v5 form: the given RoPE
    replaces the stored one, as in Transformers (which then loses rope_theta; the stored one is kept
    here unless rope_theta is given too)."""
    PhimoeConfig(rope_theta=5000.0).save_pretrained(tmp_path)
    scaling = longrope_scaling(128, original=4096)
    theirs = transformers.AutoConfig.from_pretrained(tmp_path, rope_scaling=scaling).rope_parameters
    ours = PhimoeConfig.from_pretrained(tmp_path, rope_scaling=scaling).rope_parameters
    assert ours == {**theirs, "rope_theta": 5000.0} and ours["rope_type"] == "longrope"
    assert PhimoeConfig.from_pretrained(tmp_path, rope_scaling=scaling, rope_theta=7.0).rope_parameters["rope_theta"] == 7.0
    assert PhimoeConfig.from_pretrained(tmp_path).rope_parameters == {"rope_type": "default", "rope_theta": 5000.0}


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_rope_parameters_given_to_from_pretrained_keep_the_stored_theta(arch, tmp_path):
    """`from_pretrained(path, rope_parameters={...})` without a rope_theta keeps the checkpoint's (as
    setting them on the loaded config does; Transformers 5.23 keeps none and fails building the
    model), and one given in the dict or beside it wins."""
    arch.our_config(rope_parameters={"rope_type": "default", "rope_theta": 100.0}).save_pretrained(tmp_path)
    cls = type(arch.our_config())
    half = arch.our_config().head_dim // 2
    new = ({"rope_type": "dynamic", "factor": 3.0} if arch is ARCHS[1] else
           {"rope_type": "longrope", "short_factor": [1.0] * half, "long_factor": [2.0] * half,
            "short_mscale": 1.0, "long_mscale": 1.1, "original_max_position_embeddings": 16})
    got = cls.from_pretrained(tmp_path, rope_parameters=new).rope_parameters
    assert got == {**new, "rope_theta": 100.0}
    set_after = cls.from_pretrained(tmp_path)
    set_after.rope_parameters = dict(new)
    set_after.validate_rope()
    assert set_after.rope_parameters == got
    assert cls.from_pretrained(tmp_path, rope_parameters={**new, "rope_theta": 7.0}).rope_parameters["rope_theta"] == 7.0
    assert cls.from_pretrained(tmp_path, rope_parameters=new, rope_theta=9.0).rope_parameters["rope_theta"] == 9.0


def test_return_unused_kwargs_as_transformers(tmp_path):
    """`from_pretrained(..., return_unused_kwargs=True)` (configs, AutoConfig): (config, the keyword
    arguments that name no attribute of it, not applied), as Transformers returns them."""
    PhimoeConfig(max_position_embeddings=64).save_pretrained(tmp_path)
    kw = dict(max_position_embeddings=77, foo=3, output_attentions=True, return_unused_kwargs=True)
    theirs, their_unused = transformers.AutoConfig.from_pretrained(tmp_path, **kw)
    for load in (PhimoeConfig.from_pretrained, moetorch.AutoConfig.from_pretrained):
        ours, unused = load(tmp_path, **kw)
        assert unused == their_unused == {"foo": 3}
        assert (ours.max_position_embeddings, ours.output_attentions) == (77, True) == \
            (theirs.max_position_embeddings, theirs.output_attentions)
        assert "foo" not in ours.to_dict() and str(ours.name_or_path) == str(tmp_path)
    config, unused = PhimoeConfig.from_dict(PhimoeConfig().to_dict(), vocab_size=10, bar=1, return_unused_kwargs=True)
    assert config.vocab_size == 10 and unused == {"bar": 1}
    # a key config.json holds beyond the known fields is an attribute too: applied, as Transformers does
    config, unused = PhimoeConfig.from_dict({**PhimoeConfig().to_dict(), "custom_key": 1}, custom_key=5,
                                            return_unused_kwargs=True)
    assert config.custom_key == 5 and unused == {}


def test_original_phi35_config_json(tmp_path):
    """The original checkpoint's config.json (architectures PhiMoEForCausalLM, v4 rope form,
    top-level original_max_position_embeddings and extra keys) loads and round-trips."""
    original = {
        "architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe", "attention_bias": True, "lm_head_bias": True,
        "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_dropout": 0.0,
        "original_max_position_embeddings": 4096, "max_position_embeddings": 131072, "rope_theta": 10000.0,
        "rope_scaling": longrope_scaling(128, original=4096), "sliding_window": 131072, "torch_dtype": "bfloat16",
        "auto_map": {"AutoConfig": "configuration_phimoe.PhiMoEConfig"}, "transformers_version": "4.43.3",
        "eos_token_id": 32000, "router_aux_loss_coef": 0.0, "input_jitter_noise": 0.01,
    }
    (tmp_path / "config.json").write_text(json.dumps(original))
    cfg = PhimoeConfig.from_pretrained(tmp_path)
    assert cfg.attention_bias and cfg.lm_head_bias and cfg.dtype == transformers.PhimoeConfig.from_pretrained(
        tmp_path).dtype  # a torch.dtype in memory, as Transformers keeps it
    assert cfg.rope_parameters["original_max_position_embeddings"] == 4096
    assert cfg.hidden_dropout == 0.0  # unknown keys survive as attributes
    cfg.save_pretrained(tmp_path / "out")
    again = PhimoeConfig.from_pretrained(tmp_path / "out")
    assert again == cfg
    hf = transformers.PhimoeConfig.from_pretrained(tmp_path / "out")
    assert hf.rope_parameters["rope_type"] == "longrope" and hf.hidden_size == 4096


def test_longrope_original_context_disagreeing_with_the_top_level_as_transformers(tmp_path):
    """A top-level original_max_position_embeddings that disagrees with rope_scaling's: the dict's
    value holds, in both places, as in Transformers 5 (config.json and keywords alike). A dict
    without one takes the top-level value (Transformers takes max_position_embeddings there:
    docs/differences.md)."""
    rope = longrope_scaling(8, original=16)
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, max_position_embeddings=64)
    (tmp_path / "config.json").write_text(json.dumps({**kw, "model_type": "phimoe", "rope_scaling": rope,
                                                      "original_max_position_embeddings": 32}))
    for make in (lambda lib: lib.PhimoeConfig.from_pretrained(tmp_path),
                 lambda lib: lib.PhimoeConfig(**kw, rope_scaling=dict(rope), original_max_position_embeddings=32)):
        ours, theirs = make(moetorch), make(transformers)
        assert (ours.original_max_position_embeddings, ours.rope_parameters["original_max_position_embeddings"]) \
            == (theirs.original_max_position_embeddings, theirs.rope_parameters["original_max_position_embeddings"]) \
            == (16, 16)
    no_dict_value = {k: v for k, v in rope.items() if k != "original_max_position_embeddings"}
    ours = PhimoeConfig(**kw, rope_scaling=no_dict_value, original_max_position_embeddings=32)
    assert ours.original_max_position_embeddings == ours.rope_parameters["original_max_position_embeddings"] == 32


def test_round_trip_and_transformers_reads_it(tmp_path):
    cfg = PhimoeConfig(vocab_size=100, hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                       sliding_window=16, num_labels=3, problem_type="single_label_classification")
    cfg.save_pretrained(tmp_path)
    assert PhimoeConfig.from_pretrained(tmp_path) == cfg
    assert PhimoeConfig.from_dict(cfg.to_dict()) == cfg
    hf = transformers.PhimoeConfig.from_pretrained(tmp_path)
    assert (hf.vocab_size, hf.num_key_value_heads, hf.sliding_window, hf.num_labels) == (100, 1, 16, 3)
    # and the reverse
    hf.save_pretrained(tmp_path / "hf")
    back = PhimoeConfig.from_pretrained(tmp_path / "hf")
    assert (back.vocab_size, back.sliding_window, back.num_labels) == (100, 16, 3)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_attention_heads": 32, "num_key_value_heads": 5}, "num_key_value_heads"),
        ({"num_experts_per_tok": 4, "num_local_experts": 3}, "num_experts_per_tok"),
        ({"num_experts_per_tok": 1}, "num_experts_per_tok"),
        ({"hidden_act": "swishy"}, "hidden_act"),
        ({"hidden_size": 100, "num_attention_heads": 32}, "num_attention_heads"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"sliding_window": -1}, "sliding_window"),
        ({"rope_scaling": {**longrope_scaling(128), "short_factor": [1.0] * 3}}, "short_factor"),
        ({"rope_scaling": {**longrope_scaling(128), "long_factor": ["a"] * 64}}, "long_factor"),
        ({"rope_scaling": {**longrope_scaling(128), "short_mscale": "big"}}, "short_mscale"),
        ({"rope_scaling": {**longrope_scaling(128), "long_mscale": None}}, "long_mscale"),
        ({"rope_scaling": {**longrope_scaling(128), "short_mscale": 0.0}}, "short_mscale"),
        ({"rope_scaling": {**longrope_scaling(128), "long_mscale": float("inf")}}, "long_mscale"),
        ({"rope_scaling": {**longrope_scaling(128), "short_factor": [1.0] * 63 + [0.0]}}, "short_factor"),
        ({"rope_scaling": {**longrope_scaling(128), "long_factor": [float("nan")] + [1.0] * 63}}, "long_factor"),
        ({"rope_scaling": {**longrope_scaling(128), "long_factor": [-1.0] * 64}}, "long_factor"),
        ({"rope_scaling": {**longrope_scaling(128), "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
        ({"rope_theta": float("inf")}, "rope_theta"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_type"),
        ({"attention_dropout": 1.5}, "attention_dropout"),
        ({"num_labels": 2, "id2label": {0: "a", 1: "b", 2: "c"}}, "num_labels"),
        ({"num_labels": 3, "label2id": {"a": 0, "b": 1}}, "num_labels"),
        ({"label2id": {"a": 0, "b": 2}}, "label2id"),
        ({"label2id": {"a": "0", "b": "1"}}, "label2id"),
        ({"problem_type": "single_label_classification", "num_labels": 1}, "problem_type"),  # Transformers too
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        PhimoeConfig(**kwargs)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("field,value", [
    ("attention_bias", "False"), ("lm_head_bias", 0), ("tie_word_embeddings", "False"), ("use_cache", "no"),
    ("output_router_logits", 1), ("hidden_act", None), ("activation_function", 3),
    ("rope_parameters", "bad"),
])
def test_bool_string_and_dict_fields_are_typed_as_transformers_types_them(arch, field, value):
    """A "False" for a bool field (which would read as true), a None for a string field: refused
    at construction and on assignment, naming the field, where Transformers' strict configs refuse
    them."""
    ours, theirs = arch.ours["config"], arch.hf["config"]
    if field not in {f.name for f in dataclasses.fields(ours)}:
        return  # (a field of the other model)
    for build in (lambda cls: cls(**{field: value}), lambda cls: setattr(cls(), field, value)):
        with pytest.raises(Exception):  # noqa: B017 -- (Transformers' StrictDataclassFieldValidationError)
            build(theirs)
        with pytest.raises(ConfigError, match=f"`{field}`: must be"):
            build(ours)


@pytest.mark.parametrize("name", ["phimoe", "jetmoe"])
def test_label2id_alone_names_the_labels(name, tmp_path):
    """A label2id given without id2label names the labels (Transformers drops it and keeps LABEL_i,
    so that its two maps disagree): id2label is its inverse, in id order, and Transformers reads the
    saved config with the same names."""
    ours, theirs = {"phimoe": (PhimoeConfig, transformers.PhimoeConfig),
                    "jetmoe": (JetMoeConfig, transformers.JetMoeConfig)}[name]
    label2id = {"positive": 2, "negative": 0, "neutral": 1}
    cfg = ours(label2id=dict(label2id))
    assert cfg.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert list(cfg.id2label) == [0, 1, 2] and cfg.label2id == label2id and cfg.num_labels == 3
    assert ours(label2id=dict(label2id), num_labels=3) == cfg
    cfg.save_pretrained(tmp_path)
    hf = theirs.from_pretrained(tmp_path)
    assert (hf.id2label, hf.label2id, hf.num_labels) == (cfg.id2label, label2id, 3)
    assert ours.from_pretrained(tmp_path) == cfg
    # both maps given: both kept as given, as in Transformers
    both = ours(id2label={0: "x", 1: "y"}, label2id={"X": 0, "Y": 1})
    oracle = theirs(id2label={0: "x", 1: "y"}, label2id={"X": 0, "Y": 1})
    assert (both.id2label, both.label2id) == (oracle.id2label, oracle.label2id)


@pytest.mark.parametrize("name", ["phimoe", "jetmoe"])
def test_constructors_take_any_keyword_as_transformers(name, tmp_path):
    """The config constructors end in **kwargs as Transformers' do: unknown keys are kept (read as
    attributes, written to config.json, read back by Transformers), `torch_dtype` sets `dtype`, a
    matching `model_type` is accepted and another is an error, and JetMoE's original names work."""
    ours, theirs = {"phimoe": (PhimoeConfig, transformers.PhimoeConfig),
                    "jetmoe": (JetMoeConfig, transformers.JetMoeConfig)}[name]
    cfg = ours(vocab_size=100, foo_bar=[1, 2], is_decoder=True, torch_dtype="bfloat16", model_type=name)
    oracle = theirs(vocab_size=100, foo_bar=[1, 2], is_decoder=True, torch_dtype="bfloat16", model_type=name)
    assert (cfg.foo_bar, cfg.is_decoder, cfg.dtype, cfg.torch_dtype) == (
        oracle.foo_bar, oracle.is_decoder, oracle.dtype, oracle.dtype)
    cfg.save_pretrained(tmp_path)
    hf = theirs.from_pretrained(tmp_path)
    assert (hf.foo_bar, hf.is_decoder, hf.vocab_size) == ([1, 2], True, 100)
    assert ours.from_pretrained(tmp_path) == cfg
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        ours(model_type="llama")
    if name == "jetmoe":
        assert JetMoeConfig(ffn_hidden_size=24, moe_num_experts=4).intermediate_size == 24
        with pytest.raises(ConfigError, match="ffn_hidden_size"):
            JetMoeConfig(ffn_hidden_size=24, intermediate_size=32)


def test_wrong_model_type_and_bad_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="llama"):
        PhimoeConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        PhimoeConfig.from_pretrained(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        PhimoeConfig.from_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="local directory"):
        PhimoeConfig.from_pretrained("microsoft/Phi-3.5-MoE-instruct")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_config_helpers_as_transformers(arch, tmp_path):
    kwargs = {"rope_scaling": longrope_scaling(8, original=16)} if arch is PHIMOE else {}
    ours, hf = arch.our_config(**kwargs), arch.hf_config(**kwargs)
    assert hf.rope_scaling is hf.rope_parameters and ours.rope_scaling is ours.rope_parameters  # one dict, two names
    assert ours.rope_scaling == hf.rope_scaling  # (the v4 key "type" kept beside rope_type)
    assert ours.is_encoder_decoder is hf.is_encoder_decoder is False
    assert ours.keys_to_ignore_at_inference == hf.keys_to_ignore_at_inference  # Trainer.predict reads it
    assert "keys_to_ignore_at_inference" not in ours.to_dict()
    ours.to_json_file(tmp_path / "c.json")
    back = type(hf).from_json_file(tmp_path / "c.json")
    assert back.rope_parameters == ours.rope_parameters and back.hidden_size == hf.hidden_size
    for cfg in (ours, hf):
        cfg.update_from_string("hidden_size=48,rms_norm_eps=0.25,output_router_logits=true")
    assert (ours.hidden_size, ours.rms_norm_eps, ours.output_router_logits) == (
        hf.hidden_size, hf.rms_norm_eps, hf.output_router_logits) == (48, 0.25, True)
    assert ours.to_diff_dict().keys() == hf.to_diff_dict().keys() - {"transformers_version"}
    with pytest.raises(ValueError, match="no_such_field"):
        ours.update_from_string("no_such_field=1")
    with pytest.raises(ValueError, match="output_router_logits"):
        ours.update_from_string("output_router_logits=maybe")
    with pytest.raises(ValueError, match="`rope_parameters` holds a dict"):
        ours.update_from_string("rope_parameters=1")
    with pytest.raises(ValueError, match="'hidden_size'"):
        ours.update_from_string("hidden_size")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_config_json_as_transformers_writes_it(arch, tmp_path):
    """`to_json_string(use_diff=True)` (what save_pretrained writes: the shared fields left out at
    their defaults), `use_diff=False` (every field, `to_dict`), the saved config.json, and a reload
    by each library: the same keys and values as Transformers' config of the same arguments, on
    random sets of the shared fields (transformers_version aside)."""
    import random

    rng = random.Random()
    choices = dict(num_labels=[1, 2, 3], output_hidden_states=[True, False], return_dict=[True, False],
                   tie_word_embeddings=[True, False], dtype=["bfloat16", "float32"], pad_token_id=[None, 0, 5],
                   bos_token_id=[None, 1], eos_token_id=[None, 2, [2, 3]], use_cache=[True, False],
                   output_router_logits=[True, False], problem_type=[None, "regression"],
                   output_attentions=[True, False], chunk_size_feed_forward=[0, 4], is_decoder=[True, False],
                   architectures=[None, ["X"]], num_hidden_layers=[1, 3], my_key=[1, "x"])

    def text(cfg, use_diff=True):
        out = json.loads(cfg.to_json_string(use_diff=use_diff))
        out.pop("transformers_version", None)
        return out

    for i in range(12):
        given = {k: rng.choice(v) for k, v in choices.items() if rng.random() < 0.3}
        ours, theirs = arch.our_config(**given), arch.hf_config(**given)
        for use_diff in (True, False):
            assert text(ours, use_diff) == text(theirs, use_diff), (given, use_diff)
        assert ours.chunk_size_feed_forward == theirs.chunk_size_feed_forward
        ours.save_pretrained(tmp_path / str(i))
        assert json.loads((tmp_path / str(i) / "config.json").read_text()) == text(theirs)
        assert text(type(theirs).from_pretrained(tmp_path / str(i))) == text(theirs)
        assert text(type(ours).from_pretrained(tmp_path / str(i))) == text(ours)


def test_config_names_tools_read():
    """`num_experts` (TRL's MoE loss reads it) is `num_local_experts`, never saved; `name_or_path`
    and `_name_or_path` are where the config was loaded from, as Transformers keeps them (TRL makes
    its reference model from it): in `to_dict()` as there, never in the saved file."""
    import moetorch

    for cls in (moetorch.PhimoeConfig, moetorch.JetMoeConfig):
        cfg = cls()
        assert cfg.num_experts == cfg.num_local_experts and "num_experts" not in cfg.to_dict()
        cfg.num_experts = 4
        assert cfg.num_local_experts == 4
        assert cfg.name_or_path == cfg._name_or_path == ""
    for load in (moetorch.AutoConfig.from_pretrained, lambda p: moetorch.AutoModelForCausalLM.from_pretrained(p).config):
        cfg = load("tiny-phimoe")
        assert cfg.name_or_path == cfg._name_or_path == "tiny-phimoe"
        assert cfg.to_dict()["_name_or_path"] == "tiny-phimoe"
        assert "_name_or_path" not in json.loads(cfg.to_json_string()) and "_name_or_path" not in cfg.to_diff_dict()
    model = moetorch.JetMoeForCausalLM.from_pretrained("tiny-jetmoe")
    assert model.name_or_path == model.config._name_or_path == "tiny-jetmoe"
    assert type(model)(model.config).name_or_path == "tiny-jetmoe"  # a model made from a config takes its name


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_rope_theta_given_to_from_pretrained_is_applied(arch, tmp_path):
    """`from_pretrained(path, rope_theta=x)` over a config.json in the v5 form gives the RoPE that
    theta (the stored rope_parameters kept otherwise), as a v4 config did and as setting it in the
    loaded config's rope_parameters does; Transformers 5.23's configs ignore it and its models
    refuse it (docs/differences.md)."""
    arch.our_config(rope_parameters={"rope_type": "default", "rope_theta": 100.0}).save_pretrained(tmp_path)
    cls = type(arch.our_config())
    got = cls.from_pretrained(tmp_path, rope_theta=250.0)
    assert got.rope_parameters == {"rope_type": "default", "rope_theta": 250.0} and got.rope_theta == 250.0
    assert cls.from_pretrained(tmp_path).rope_theta == 100.0
    want = arch.hf_config(rope_parameters={"rope_type": "default", "rope_theta": 250.0})
    assert got.rope_parameters == want.rope_parameters


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_partial_rotary_factor_as_transformers(arch, tmp_path, caplog):
    """`partial_rotary_factor`, as a keyword or in rope_parameters: filed in rope_parameters as
    Transformers files it, and under the default RoPE read by neither library's model (every
    dimension of a head rotates; a warning says so), so that Transformers' files load; under a
    scaled RoPE, where Transformers' models fail, an error naming it."""
    for given in (dict(partial_rotary_factor=0.5),
                  dict(rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5})):
        theirs = arch.hf_config(**given)
        with caplog.at_level("WARNING", logger="moetorch"):
            ours = arch.our_config(**given)
        assert "partial_rotary_factor" in caplog.text
        assert ours.rope_parameters == theirs.rope_parameters
        assert "partial_rotary_factor" not in ours.to_dict()  # (only inside rope_parameters)
        theirs.save_pretrained(tmp_path)
        assert type(ours).from_pretrained(tmp_path).rope_parameters == ours.rope_parameters
    with pytest.raises(ConfigError, match="rope_parameters.partial_rotary_factor"):
        arch.our_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "partial_rotary_factor": 0.5}
                        if arch is ARCHS[1] else {"rope_type": "longrope", **longrope_scaling(4),
                                                  "partial_rotary_factor": 0.5})


def test_non_finite_floats_in_config_json_as_transformers(tmp_path):
    """A non-finite float in a config: Transformers writes {"__float__": "Infinity"} and reads it back;
    moetorch reads that form, and writes it (valid JSON, which Transformers reads back)."""
    theirs = transformers.PhimoeConfig(custom_limit=float("inf"), custom_list=[1.0, float("-inf")])
    theirs.save_pretrained(tmp_path / "theirs")
    ours = PhimoeConfig.from_pretrained(tmp_path / "theirs")
    assert ours.custom_limit == float("inf") and ours.custom_list == [1.0, float("-inf")]
    ours.custom_nan = float("nan")
    ours.save_pretrained(tmp_path / "ours")

    def no_constants(name):
        raise AssertionError(f"config.json holds {name}, which is no JSON")

    text = (tmp_path / "ours" / "config.json").read_text()
    assert json.loads(text, parse_constant=no_constants)["custom_limit"] == {"__float__": "Infinity"}
    back = transformers.PhimoeConfig.from_pretrained(tmp_path / "ours")
    assert back.custom_limit == float("inf") and back.custom_list == [1.0, float("-inf")]
    assert back.custom_nan != back.custom_nan  # nan


def test_runtime_keywords_are_not_saved(tmp_path):
    """`name_or_path`, `experts_implementation` and the alias `num_experts` as constructor keywords:
    the first two are runtime state, as in Transformers (config.json keeps neither), the alias sets
    the field it names (a conflict is an error); `use_return_dict`, read-only, is an error naming
    return_dict; `chunk_size_feed_forward` reads 0, as every Transformers config."""
    cfg = PhimoeConfig(name_or_path="some/model", experts_implementation="eager", num_experts=4)
    theirs = transformers.PhimoeConfig(name_or_path="some/model", experts_implementation="eager")
    assert cfg.name_or_path == theirs.name_or_path == "some/model"
    assert cfg.num_local_experts == cfg.num_experts == 4
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not {"name_or_path", "experts_implementation", "num_experts"} & set(saved)
    assert saved["num_local_experts"] == 4
    assert PhimoeConfig.from_pretrained(tmp_path, num_experts=2).num_local_experts == 2
    with pytest.raises(ConfigError, match="num_experts"):
        PhimoeConfig(num_experts=4, num_local_experts=8)
    with pytest.raises(ConfigError, match="return_dict"):
        PhimoeConfig(use_return_dict=False)
    assert cfg.chunk_size_feed_forward == theirs.chunk_size_feed_forward == 0


def test_jetmoe_names_twice_in_config_json_as_transformers(tmp_path, caplog):
    """A config.json that holds a field under JetMoE's original name and Transformers' name with
    different values (Transformers writes the original names it is given beside its own, and reads
    its own): Transformers' name wins, with a warning; as keywords the conflict stays an error.
    Transformers' alias head_dim beside kv_channels as keywords: head_dim wins, as there."""
    transformers.JetMoeConfig(moe_top_k=1, ffn_hidden_size=48, kv_channels=8).save_pretrained(tmp_path)
    theirs = transformers.JetMoeConfig.from_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="moetorch"):
        ours = JetMoeConfig.from_pretrained(tmp_path)
    assert "moe_top_k" in caplog.text
    assert (ours.num_experts_per_tok, ours.intermediate_size, ours.kv_channels) == \
        (theirs.num_experts_per_tok, theirs.intermediate_size, theirs.kv_channels) == (2, 5632, 8)
    with pytest.raises(ConfigError, match="moe_top_k"):
        JetMoeConfig(moe_top_k=1, num_experts_per_tok=2)
    for kwargs in (dict(kv_channels=8, head_dim=16), dict(head_dim=16, kv_channels=8)):
        assert JetMoeConfig(**kwargs).kv_channels == transformers.JetMoeConfig(**kwargs).kv_channels


def test_assignment_and_validate_check_the_fields():
    """As Transformers' strict configs: a built config's integer or float field refuses a value of
    another type when assigned, naming the field (None where the field takes it); `validate()` checks
    every field again (values assigned since), as the config checked them when made."""
    theirs = transformers.PhimoeConfig()
    for name, value in (("hidden_size", "32"), ("vocab_size", None), ("rms_norm_eps", "x")):
        cfg = PhimoeConfig()
        with pytest.raises(ConfigError, match=f"`{name}`"):
            setattr(cfg, name, value)
        with pytest.raises(Exception, match=name):
            setattr(theirs, name, value)
        assert getattr(cfg, name) == getattr(PhimoeConfig(), name)  # (unchanged)
    cfg = PhimoeConfig()
    cfg.num_key_value_heads, cfg.rms_norm_eps, cfg.sliding_window = None, 1, 64  # None, an int for a float
    cfg.validate()
    cfg.num_hidden_layers = 0
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        cfg.validate()


def test_single_label_classification_needs_two_labels_as_transformers():
    """`problem_type="single_label_classification"` with one label (a cross-entropy over one class, 0
    for every input): an error in both libraries, naming problem_type."""
    for lib in (moetorch, transformers):
        for cls in (lib.PhimoeConfig, lib.JetMoeConfig):
            with pytest.raises(ValueError, match="problem_type"):
                cls(problem_type="single_label_classification", num_labels=1)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_rope_scaling_is_rope_parameters_under_its_older_name(arch, tmp_path):
    """As in Transformers 5, `config.rope_scaling` set after the config is made sets `rope_parameters`
    (its kind and theta filled in), and reads back whatever `rope_parameters` holds: the saved
    config.json and a model built from the config follow it."""
    import torch
    from parity import close

    # (with its theta, as Transformers asks: without one it leaves None there, and moetorch the config's)
    if arch.name == "jetmoe":
        scaled, length = {"rope_type": "linear", "factor": 4.0}, 40
    else:  # (LongRoPE within its original context: past it Transformers 5 differs, docs/differences.md)
        scaled = {"rope_type": "longrope", **longrope_scaling(arch.base["hidden_size"] // arch.base["num_attention_heads"])}
        length = 8
    scaled["rope_theta"] = 5000.0
    configs = []
    for config in (arch.our_config(), arch.hf_config()):
        config.rope_scaling = dict(scaled)
        configs.append(config)
    ours, theirs = configs
    assert ours.rope_parameters == theirs.rope_parameters and ours.rope_scaling is ours.rope_parameters
    assert ours.to_dict()["rope_parameters"] == theirs.to_dict()["rope_parameters"]
    ours.save_pretrained(tmp_path)
    reloaded = type(theirs).from_pretrained(tmp_path)
    assert reloaded.rope_parameters == theirs.rope_parameters
    torch.manual_seed(0)
    hf = arch.hf["causal_lm"](theirs).eval()
    hf.save_pretrained(tmp_path / "m")
    mine = arch.ours["causal_lm"].from_pretrained(tmp_path / "m", config=ours).eval()
    ids = torch.randint(1, arch.base["vocab_size"], (1, length))
    with torch.no_grad():
        close(mine(ids).logits, hf(ids).logits, "logits under the scaling set as rope_scaling")
    for config in configs:
        config.rope_parameters = {"rope_type": "default", "rope_theta": 500.0}
        assert config.rope_scaling == {"rope_type": "default", "rope_theta": 500.0}


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_print_of_a_config_as_transformers_prints_it(arch):
    kwargs = dict(vocab_size=100, num_hidden_layers=3, tie_word_embeddings=arch is PHIMOE)
    theirs = [line for line in repr(arch.hf["config"](**kwargs)).splitlines() if '"transformers_version"' not in line]
    assert repr(arch.ours["config"](**kwargs)).splitlines() == theirs  # (moetorch writes no Transformers version)
    assert str(arch.ours["config"]()).startswith(f"{arch.ours['config'].__name__} {{\n")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_the_base_config_class_reads_a_checkpoint_as_its_model_types_class(arch, tmp_path):
    """`PretrainedConfig.from_pretrained` / `.from_dict` (the base class, which holds no model's
    fields): the config of the model_type the file names, with its values (Transformers gives a
    generic config holding them)."""
    arch.hf["config"](vocab_size=100).save_pretrained(tmp_path)
    for config in (moetorch.PretrainedConfig.from_pretrained(tmp_path),
                   moetorch.PreTrainedConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))):
        assert type(config) is arch.ours["config"] and config.vocab_size == 100
    with pytest.raises(ConfigError, match="a config with no model_type .* is not supported"):
        moetorch.PretrainedConfig.from_dict({"vocab_size": 3})
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported"):
        moetorch.PretrainedConfig.from_dict({"model_type": "llama"})
