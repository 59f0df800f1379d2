"""generate() takes what Transformers' generate takes, token for token: settings passed as None
(unset), numpy and 0-d tensor numbers, Transformers' own processor and criterion classes
replacing the built-ins, deprecated cache names, an empty cache with several rows a prompt, a
cache that holds the whole prompt; and the errors Transformers raises, clearer."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import test_generation
import torch
import transformers
from archs import ARCH_IDS, ARCHS
from parity import make_inputs

import moetorch
from moetorch import GenerationConfig

_one_thread, pair = test_generation._one_thread, test_generation.pair  # the same fixtures


def prompt(pair, seed=7):
    ids, mask = make_inputs(pair[1].config.vocab_size, 2, 6, "left", seed=seed)
    return {"input_ids": ids, "attention_mask": mask}


def both(pair, seed=0, **kwargs):
    outs = []
    for model in pair:
        torch.manual_seed(seed)
        outs.append(model.generate(**kwargs))
    return outs


def same(pair, seed=0, **kwargs):
    hf, ours = both(pair, seed, **kwargs)
    assert torch.equal(ours, hf), f"{kwargs}: Transformers {hf.tolist()}, moetorch {ours.tolist()}"
    return ours


@pytest.mark.parametrize("settings", [
    {"do_sample": True, "temperature": None}, {"do_sample": True, "top_p": None},
    {"do_sample": True, "top_k": None}, {"do_sample": True, "typical_p": None},
    {"do_sample": True, "epsilon_cutoff": None, "eta_cutoff": None}, {"repetition_penalty": None},
    {"num_beams": 2, "early_stopping": None}, {"max_length": None},
    {"remove_invalid_values": None, "renormalize_logits": None}, {"use_cache": True, "min_length": None},
])
def test_a_setting_passed_as_none_is_unset(pair, settings):
    """A script forwarding `top_p=args.top_p` with a None default gets what Transformers gives:
    the setting's default, which also turns its processor off (top_k=None: no top-k)."""
    same(pair, **prompt(pair), max_new_tokens=5, **settings)


def test_none_on_a_model_setting_falls_back_to_the_default(pair):
    """None passed to generate() turns a setting the model's generation config holds back to the
    default, as in Transformers; None in a passed config leaves the model's value."""
    hf, ours = pair
    for model in pair:
        model.generation_config.temperature = 0.3
        model.generation_config.do_sample = True
    try:
        same(pair, seed=2, **prompt(pair), max_new_tokens=5, temperature=None)
        for model, lib in ((hf, transformers), (ours, moetorch)):
            torch.manual_seed(2)
            model._out = model.generate(**prompt(pair), max_new_tokens=5,
                                        generation_config=lib.GenerationConfig(temperature=None, do_sample=True))
        assert torch.equal(ours._out, hf._out)
    finally:
        for model in pair:
            model.generation_config.temperature = 1.0
            model.generation_config.do_sample = False
            del model._out
    config = GenerationConfig(temperature=None, max_length=None, top_k=None, eos_token_id=None)
    assert (config.temperature, config.max_length, config.top_k, config.eos_token_id) == (1.0, 20, 50, None)
    assert not any(config.is_set(k) for k in ("temperature", "max_length", "top_k", "eos_token_id"))


# (the model's value, the settings the field needs to act, new tokens)
_MODEL_VALUES = {
    "top_k": (3, {"do_sample": True}), "min_p": (0.3, {"do_sample": True}), "top_p": (0.3, {"do_sample": True}),
    "top_h": (0.3, {"do_sample": True}), "temperature": (0.2, {"do_sample": True}),
    "eos_token_id": (2, {"sequence_bias": {(2,): 30.0}, "min_new_tokens": 2}),
    "max_new_tokens": (3, {}), "min_new_tokens": (4, {"sequence_bias": {(2,): 30.0}}),
    "forced_eos_token_id": (9, {}), "exponential_decay_length_penalty": ((1, 5.0), {"eos_token_id": 2}),
    "guidance_scale": (3.0, {}), "repetition_penalty": (5.0, {}),
}


@pytest.mark.parametrize("field", sorted(_MODEL_VALUES))
def test_none_in_a_config_is_unset_and_as_a_keyword_overrides(pair, field):
    """A field the model's generation config sets: None in a passed GenerationConfig leaves the
    model's value, None set on the model's config is the default (top_k: 50), and None as a
    generate() keyword overrides the model's value (top_k=None: no top-k; eos_token_id=None: no
    EOS), each as Transformers gives it."""
    value, needs = _MODEL_VALUES[field]
    kwargs = {"max_new_tokens": 6, "pad_token_id": 0, **needs}
    if field == "max_new_tokens":
        kwargs.pop("max_new_tokens")
    saved = [copy.deepcopy(model.generation_config) for model in pair]
    try:
        for model in pair:
            setattr(model.generation_config, field, value)
        for lib_config in (lambda lib: lib.GenerationConfig(**kwargs, **{field: None}),):
            outs = []
            for model, lib in zip(pair, (transformers, moetorch)):
                torch.manual_seed(0)
                outs.append(model.generate(**prompt(pair), generation_config=lib_config(lib)))
            assert torch.equal(outs[1], outs[0]), f"{field}=None in a config"
        same(pair, seed=0, **prompt(pair), **kwargs, **{field: None})
        for model in pair:
            setattr(model.generation_config, field, None)
        same(pair, seed=0, **prompt(pair), **kwargs)
    finally:
        for model, config in zip(pair, saved):
            model.generation_config = config


@pytest.mark.parametrize("settings", [
    {"max_new_tokens": np.int64(4)}, {"max_new_tokens": torch.tensor(4)},
    {"max_new_tokens": 4, "num_beams": np.int64(2)}, {"max_new_tokens": 4, "eos_token_id": np.int64(11)},
    {"max_new_tokens": 4, "pad_token_id": torch.tensor(5), "eos_token_id": 11},
    {"max_new_tokens": 4, "do_sample": True, "temperature": np.float64(0.5), "top_k": 7},
    {"max_new_tokens": 4, "suppress_tokens": [np.int64(3), np.int64(4)]},
])
def test_numpy_and_tensor_numbers_are_numbers(pair, settings):
    same(pair, seed=1, **prompt(pair), **settings)
    assert GenerationConfig(**settings).to_json_string()  # plain Python numbers, which json writes


@pytest.mark.parametrize("settings", [
    {"decoder_start_token_id": 3}, {"logits_to_keep": 1}, {"cache_config": {"max_cache_len": 40}},
    {"max_time": 0.0}, {"exponential_decay_length_penalty": (1.0, 2.0), "eos_token_id": 11},
    {"cache_implementation": "sliding_window"}, {"cache_implementation": "hybrid_chunked"},
    {"cache_implementation": "hybrid"},
])
def test_settings_transformers_takes(pair, settings):
    """Settings of encoder-decoder models and of Transformers' quantized cache (kept, unused), the
    per-step `logits_to_keep` (generate keeps the last position's anyway), `max_time=0` (one
    token), a float start of the decay, and Transformers' deprecated static-cache names."""
    same(pair, **prompt(pair), max_new_tokens=4, **settings)


def test_deprecated_cache_names_read_as_static_or_unset():
    assert GenerationConfig(cache_implementation="sliding_window").cache_implementation == "static"
    assert GenerationConfig(cache_implementation="hybrid").cache_implementation is None
    config = GenerationConfig()
    config.cache_implementation = "hybrid_chunked"
    assert config.cache_implementation == "static"
    with pytest.raises(ValueError, match="cache_implementation"):
        GenerationConfig(cache_implementation="offloaded")
    with pytest.raises(ValueError, match="cache_config"):
        GenerationConfig(cache_config=3)


def test_transformers_processor_and_criterion_classes_replace_the_built_ins(pair):
    """Transformers' class of a built-in's name replaces the built-in, as Transformers' own does:
    its MaxLengthCriteria(20) outlasts max_new_tokens=5, its SuppressTokensLogitsProcessor
    replaces suppress_tokens."""
    T = transformers
    for criteria in (T.StoppingCriteriaList, list):
        out = same(pair, **prompt(pair), max_new_tokens=5,
                   stopping_criteria=criteria([T.MaxLengthCriteria(max_length=14)]))
        assert out.shape[1] == 14
    banned = [int(t) for t in same(pair, **prompt(pair), max_new_tokens=6)[:, 6:].flatten()[:2]]
    kwargs = dict(**prompt(pair), max_new_tokens=6, suppress_tokens=[1, 2])
    out = same(pair, logits_processor=T.LogitsProcessorList([T.SuppressTokensLogitsProcessor(banned)]), **kwargs)
    assert not set(out[:, 6:].flatten().tolist()) & set(banned)
    out = same(pair, logits_processor=[moetorch.SuppressTokensLogitsProcessor(banned)], **kwargs)
    assert not set(out[:, 6:].flatten().tolist()) & set(banned)


@pytest.mark.parametrize("cache", [None, "static"])
def test_a_longer_max_length_criterion_holds_in_assisted_decoding(pair, cache):
    """A custom MaxLengthCriteria past max_new_tokens replaces generate's own there too: assisted
    decoding and prompt lookup go on past max_length (a round a token, undrafted) to the same tokens
    as plain greedy search (they looped forever once max_length left no room; Transformers raises
    for an assistant, and loops for prompt lookup)."""
    T = transformers
    _, ours = pair
    ids = prompt(pair)["input_ids"][:1]
    assistant = type(ours)(copy.deepcopy(ours.config)).eval()  # other weights: drafts it gets wrong too
    kw = dict(max_new_tokens=2, **({"cache_implementation": cache} if cache else {}))
    for stop in (10, 19):
        plain = ours.generate(ids, stopping_criteria=T.StoppingCriteriaList([T.MaxLengthCriteria(stop)]), **kw)
        assert plain.shape[1] == stop
        for extra in (dict(assistant_model=assistant), dict(prompt_lookup_num_tokens=3)):
            out = ours.generate(ids, stopping_criteria=T.StoppingCriteriaList([T.MaxLengthCriteria(stop)]), **kw,
                                **extra)
            assert torch.equal(out, plain), (stop, extra)


def test_assisted_decoding_refuses_guidance_and_embeddings_by_name(pair):
    """Combinations Transformers runs to other tokens than its plain decoding (guidance) or that
    drafting cannot read (embeddings): an error that names them (docs/differences.md)."""
    _, ours = pair
    ids = prompt(pair)["input_ids"][:1]
    embeds = ours.get_input_embeddings()(ids).detach()
    for draft in (dict(prompt_lookup_num_tokens=2), dict(assistant_model=ours)):
        name = next(iter(draft))
        with pytest.raises(ValueError, match=f"{name} cannot be combined with guidance_scale != 1"):
            ours.generate(ids, max_new_tokens=3, guidance_scale=1.5, **draft)
        for inputs in (dict(input_ids=ids, inputs_embeds=embeds), dict(inputs_embeds=embeds)):
            with pytest.raises(ValueError, match="prompt lookup need input_ids alone"):
                ours.generate(**inputs, max_new_tokens=3, **draft)


def test_generation_settings_on_the_model_config_are_an_error(pair):
    hf, ours = pair
    ours.config.temperature = 0.5
    try:
        with pytest.raises(ValueError, match=r"model config: \{'temperature': 0.5\}.*model.generation_config"):
            ours.generate(**prompt(pair), max_new_tokens=3)
        ours.generation_config.temperature = 0.5  # where the checkpoint's config.json carried it, say
        ours.generate(**prompt(pair), max_new_tokens=3)
        ours.generation_config.temperature = 1.0
        # a passed generation config is Transformers' way out too
        ours.generate(**prompt(pair), max_new_tokens=3, generation_config=GenerationConfig())
    finally:
        del ours.config.temperature
    hf.config.temperature = 0.5
    try:
        with pytest.raises(ValueError, match="model configuration to control generation"):
            hf.generate(**prompt(pair), max_new_tokens=3)
    finally:
        del hf.config.temperature


def test_generation_settings_in_config_json_as_transformers(pair, tmp_path):
    """A checkpoint whose config.json carries generation settings (older ones do): as in
    Transformers, the config does not keep them; with a generation_config.json beside it, that file
    decides and generate() runs; without one, `model.generation_config` takes them. Same tokens."""
    hf, ours = pair
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "max_length": 9, "temperature": 0.3,
                                                       "do_sample": True, "top_k": 3}))
    for with_file in (True, False):
        if not with_file:
            os.remove(tmp_path / "generation_config.json")
        models = (type(hf).from_pretrained(tmp_path), type(ours).from_pretrained(tmp_path))
        for model in models:
            assert not hasattr(model.config, "max_length") and "max_length" not in model.config.to_dict()
        if not with_file:
            got = [(m.generation_config.max_length, m.generation_config.temperature,
                    m.generation_config.do_sample, m.generation_config.top_k) for m in models]
            assert got[0] == got[1] == (9, 0.3, True, 3), got
        same(models, **prompt(pair), max_new_tokens=4, seed=3)


@pytest.mark.parametrize("settings", [{"num_beams": 2}, {"num_beams": 3, "num_return_sequences": 2},
                                      {"do_sample": True, "num_return_sequences": 2}])
def test_an_empty_cache_with_several_rows_a_prompt(pair, settings):
    hf, ours = pair
    outs = []
    for model, lib in ((hf, transformers), (ours, moetorch)):
        torch.manual_seed(4)
        cache = lib.DynamicCache()
        outs.append(model.generate(**prompt(pair), max_new_tokens=4, past_key_values=cache, **settings))
        assert cache.get_seq_length() > 0
    assert torch.equal(outs[1], outs[0])
    torch.manual_seed(4)
    assert torch.equal(ours.generate(**prompt(pair), max_new_tokens=4, **settings), outs[1])
    cache = moetorch.DynamicCache()
    ours(prompt(pair)["input_ids"][:, :3], past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="holds tokens cannot be combined with num_beams"):
        ours.generate(**prompt(pair), max_new_tokens=4, past_key_values=cache, **settings)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_a_cache_that_holds_the_whole_prompt(pair, kind):
    """A forward over the prompt, then generate with that prompt and cache: the continuation is the
    one generate gives without a cache (the cache gives the prompt's last token back and computes
    it again). Transformers feeds the prompt again after its own cached copy, which is no
    continuation of it, so the oracle here is generate without a cache."""
    _, ours = pair
    ids = prompt(pair)["input_ids"][:1]
    want = ours.generate(ids, max_new_tokens=5)
    cache = moetorch.DynamicCache() if kind == "dynamic" else moetorch.StaticCache(ours.config, max_cache_len=16)
    with torch.no_grad():
        ours(ids, past_key_values=cache, use_cache=True)
    assert torch.equal(ours.generate(ids, max_new_tokens=5, past_key_values=cache), want)
    assert cache.get_seq_length() == ids.shape[1] + 4
    with pytest.raises(ValueError, match="past_key_values holds 10 tokens but the prompt has 6"):
        ours.generate(ids, max_new_tokens=2, past_key_values=cache)


def test_bad_token_ids_are_named(pair):
    _, ours = pair
    V = ours.config.vocab_size
    for name, value in (("forced_eos_token_id", V + 3), ("forced_bos_token_id", V), ("suppress_tokens", [1, V]),
                        ("begin_suppress_tokens", [V + 1])):
        with pytest.raises(ValueError, match=f"`{name}` holds .* outside the vocabulary of {V} tokens"):
            ours.generate(**prompt(pair), max_new_tokens=3, **{name: value})
    for bias in ({11: -5.0}, [[11, -5.0]]):
        with pytest.raises(ValueError, match=r"sequence_bias`: each sequence is a tuple or list of token ids, e.g. \(11,\)"):
            ours.generate(**prompt(pair), max_new_tokens=3, sequence_bias=bias)
    same(pair, **prompt(pair), max_new_tokens=4, sequence_bias={(11,): -5.0, (3, 4): 2.0})


def test_a_sequence_bias_config_prints_saves_and_reads_back(pair, tmp_path):
    """`sequence_bias={tuple: bias}` in a GenerationConfig: repr and JSON work (a tuple key is no
    JSON key), the saved file holds [[token ids], bias] pairs that Transformers and moetorch both
    read and generate with as with the dict; a file Transformers wrote (its keys "(3, 4)") reads
    back here with those tuples."""
    bias = {(11,): -5.0, (3, 4): 2.0}
    config = GenerationConfig(sequence_bias=bias, max_new_tokens=4)
    assert "sequence_bias" in repr(config)
    config.save_pretrained(tmp_path / "ours")
    theirs = transformers.GenerationConfig.from_pretrained(tmp_path / "ours")
    assert sorted((tuple(seq), b) for seq, b in theirs.sequence_bias) == sorted(bias.items())
    hf, ours = pair
    p = prompt(pair)
    want = both(pair, **p, max_new_tokens=4, sequence_bias=bias)[0]
    assert torch.equal(hf.generate(**p, generation_config=theirs), want)
    assert torch.equal(ours.generate(**p, generation_config=GenerationConfig.from_pretrained(tmp_path / "ours")), want)
    transformers.GenerationConfig(sequence_bias=bias, max_new_tokens=4).save_pretrained(tmp_path / "theirs")
    read = GenerationConfig.from_pretrained(tmp_path / "theirs")
    assert torch.equal(ours.generate(**p, generation_config=read), want)
    read.save_pretrained(tmp_path / "theirs-again")  # its "(3, 4)" keys saved again: as token ids
    again = transformers.GenerationConfig.from_pretrained(tmp_path / "theirs-again")
    assert torch.equal(hf.generate(**p, generation_config=again), want)
    assert torch.equal(ours.generate(**p, generation_config=GenerationConfig.from_pretrained(tmp_path / "theirs-again")),
                       want)


@pytest.mark.parametrize("settings", [{}, {"do_sample": True}, {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2},
                                      {"max_length": 8, "min_length": 6}])
def test_continuing_with_only_the_tokens_the_cache_lacks(pair, settings):
    """Transformers' other way to continue from a cache: the ids the cache does not hold yet, with
    the mask of the whole sequence. The same tokens as Transformers (its max_length and the
    processors count the passed ids only), and the same new tokens as passing the whole sequence."""
    hf, ours = pair
    p = prompt(pair)
    outs = []
    for model in (hf, ours):
        first = model.generate(**p, max_new_tokens=3, return_dict_in_generate=True)
        turn = torch.tensor([[5, 6], [8, 9]])
        held = first.past_key_values.get_seq_length()
        seq = torch.cat([first.sequences, turn], 1)
        mask = torch.cat([p["attention_mask"], torch.ones(2, seq.shape[1] - 6, dtype=torch.long)], 1)
        torch.manual_seed(5)
        kw = settings if "max_length" in settings else {"max_new_tokens": 4, **settings}
        outs.append(model.generate(seq[:, held:], attention_mask=mask, past_key_values=first.past_key_values, **kw))
        if model is ours and not settings:
            again = ours.generate(**p, max_new_tokens=3, return_dict_in_generate=True)
            whole = ours.generate(seq, attention_mask=mask, past_key_values=again.past_key_values, max_new_tokens=4)
            assert torch.equal(whole[:, seq.shape[1]:], outs[-1][:, seq.shape[1] - held:])
    assert torch.equal(outs[1], outs[0]), f"Transformers {outs[0].tolist()}, moetorch {outs[1].tolist()}"
    assert outs[1].shape[0] == 2


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_generation_config_json_as_transformers_writes_it(arch, tmp_path):
    """generation_config.json of a model saved by each library, from a model config with random
    generation fields (the first save and a reload's save), and a GenerationConfig of random
    explicit settings: the same keys and values as Transformers' (`_from_model_config`, the
    explicitly set fields even at their defaults; transformers_version aside)."""
    import random

    rng = random.Random()

    def read(path):
        out = json.loads((path / "generation_config.json").read_text())
        out.pop("transformers_version", None)
        return out

    for i in range(3):
        flags = {k: rng.choice(v) for k, v in dict(output_hidden_states=[True, False], use_cache=[True, False],
                                                     pad_token_id=[None, 0], eos_token_id=[2, [2, 3]]).items()
                 if rng.random() < 0.5}
        got = {}
        for lib, key in ((arch.ours, "ours"), (arch.hf, "theirs")):
            model = lib["causal_lm"](arch.our_config(**flags) if key == "ours" else arch.hf_config(**flags))
            model.save_pretrained(tmp_path / f"{key}{i}")
            lib["causal_lm"].from_pretrained(tmp_path / f"{key}{i}").save_pretrained(tmp_path / f"{key}{i}again")
            got[key] = read(tmp_path / f"{key}{i}"), read(tmp_path / f"{key}{i}again")
        assert got["ours"] == got["theirs"], flags
    for _ in range(10):
        given = {k: rng.choice(v) for k, v in dict(do_sample=[True, False], temperature=[1.0, 0.7], top_k=[50, 5],
                                                     max_new_tokens=[20, 7], num_beams=[1, 2], use_cache=[True],
                                                     output_scores=[False, True], repetition_penalty=[1.0, 1.2],
                                                     my_key=["x"]).items() if rng.random() < 0.4}
        ours = json.loads(GenerationConfig(**given).to_json_string())
        theirs = json.loads(transformers.GenerationConfig(**given).to_json_string())
        theirs.pop("transformers_version")
        assert ours == theirs, given


def test_generation_mode_validate_strict_and_refused_saves_as_transformers(tmp_path, caplog):
    """`get_generation_mode` names the decoding as Transformers' does; `validate(strict=True)` lists
    the same minor issues in its ValueError (flags of another mode, cache settings without a cache,
    output flags without return_dict_in_generate, a negative pad id), and without `strict` they
    are a warning; `save_pretrained` refuses a config with such issues made or changed since it
    was read, and saves one read as it is; beam search's `beam_indices` are int32 there too."""
    import logging
    import random

    rng = random.Random()
    options = {"do_sample": [True, False], "num_beams": [1, 2, 4], "temperature": [0.3, 1.0], "top_k": [5, 50],
               "top_p": [0.9, 1.0], "min_p": [0.1], "typical_p": [0.5], "early_stopping": [True, "never"],
               "length_penalty": [0.5, 1.0], "use_cache": [False, True], "cache_implementation": ["static"],
               "output_scores": [True], "return_dict_in_generate": [True, False], "pad_token_id": [-1, 3],
               "prompt_lookup_num_tokens": [3], "epsilon_cutoff": [0.01], "eta_cutoff": [0.01]}
    for _ in range(150):
        kwargs = {k: rng.choice(v) for k, v in rng.sample(sorted(options.items()), rng.randint(0, 6))}
        theirs, ours = transformers.GenerationConfig(**kwargs), GenerationConfig(**kwargs)
        assert ours.get_generation_mode().value == theirs.get_generation_mode().value, kwargs
        assistant = object()
        assert ours.get_generation_mode(assistant).value == theirs.get_generation_mode(assistant).value, kwargs
        errors = []
        for config in (theirs, ours):
            try:
                config.validate(strict=True)
                errors.append(None)
            except ValueError as e:
                errors.append(str(e))
        assert errors[1] == errors[0], kwargs
    with caplog.at_level(logging.WARNING, logger="moetorch"):
        GenerationConfig(temperature=0.25, early_stopping=True)
    assert "The following generation flags are not valid and may be ignored: ['temperature', 'early_stopping']" \
        in caplog.text
    # save_pretrained: refused when made (or changed) with an issue; a file read as it is saves again
    for lib in (transformers, moetorch):
        with pytest.raises(ValueError, match="(?s)GenerationConfig is invalid.*Fix these issues to save the configuration"):
            lib.GenerationConfig(temperature=0.25).save_pretrained(tmp_path / "made")
    (tmp_path / "read").mkdir()
    (tmp_path / "read" / "generation_config.json").write_text(json.dumps({"temperature": 0.25, "top_k": 7}))
    for lib in (transformers, moetorch):
        read = lib.GenerationConfig.from_pretrained(tmp_path / "read")
        read.save_pretrained(tmp_path / f"again-{lib.__name__}")
        read.top_p = 0.5
        with pytest.raises(ValueError, match="`top_p`: `do_sample` is not set to `True`"):
            read.save_pretrained(tmp_path / f"changed-{lib.__name__}")
    assert moetorch.GenerationMode("beam_sample") is moetorch.GenerationMode.BEAM_SAMPLE


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_beam_indices_dtype_as_transformers(arch, tmp_path):
    from parity import make_pair

    hf, ours = make_pair(arch, tmp_path, seed=0)
    ids, _ = make_inputs(arch.base["vocab_size"], 1, 5, None)
    outs = [m.generate(ids, num_beams=2, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                       output_scores=True) for m in (hf, ours)]
    assert outs[1].beam_indices.dtype == outs[0].beam_indices.dtype == torch.int32
    assert torch.equal(outs[1].beam_indices, outs[0].beam_indices)
    for out, model in zip(outs, (hf, ours)):
        scores = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
        assert scores.shape == (1, out.beam_indices.shape[1])


@pytest.mark.parametrize("settings", [{}, {"do_sample": True, "top_k": 5, "temperature": 0.8},
                                      {"num_beams": 2, "num_return_sequences": 2}, {"repetition_penalty": 1.3}])
def test_transformers_generate_takes_a_moetorch_generation_config(pair, settings):
    """A moetorch GenerationConfig handed to a Transformers model's generate (a script half
    migrated): the tokens of Transformers' own config of the same settings, the fields Transformers
    reads that moetorch does not run reading as their unset None."""
    hf = pair[0]
    theirs = transformers.GenerationConfig(max_new_tokens=5, pad_token_id=0, **settings)
    ours = GenerationConfig(max_new_tokens=5, pad_token_id=0, **settings)
    outs = []
    for config in (theirs, ours):
        torch.manual_seed(3)
        outs.append(hf.generate(**prompt(pair), generation_config=config))
    assert torch.equal(outs[1], outs[0])
    assert ours.num_beam_groups is None and ours.token_healing is None
    with pytest.raises(AttributeError, match="no attribute 'not_a_field'"):
        ours.not_a_field  # noqa: B018


def test_to_json_file_writes_the_json_string(tmp_path):
    config = GenerationConfig(max_new_tokens=7, top_k=3)
    config.to_json_file(tmp_path / "g.json")
    assert (tmp_path / "g.json").read_text() == config.to_json_string()
    config.to_json_file(tmp_path / "full.json", use_diff=False)
    assert json.loads((tmp_path / "full.json").read_text())["max_new_tokens"] == 7
