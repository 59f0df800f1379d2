"""Checkpoint I/O: both PhiMoE naming schemes, sharding, dtype placement, and the promised errors."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import transformers
from archs import ARCH_IDS, ARCHS, JETMOE, PHIMOE, randomize_
from parity import close, make_inputs
from safetensors.torch import load_file, save_file

from moetorch import CheckpointError, ConfigError, PhimoeForCausalLM, PhimoeForSequenceClassification, PhimoeModel
from moetorch.checkpoint import parse_size


def hf_phimoe(seed=0, **overrides):
    model = transformers.PhimoeForCausalLM(PHIMOE.hf_config(**overrides))
    randomize_(model, seed)
    return model.eval()


def our_model(arch, seed=0, **overrides):
    model = arch.ours["causal_lm"](arch.our_config(**overrides))
    randomize_(model, seed)
    return model.eval()


def test_reads_transformers5_fused_names(tmp_path):
    hf = hf_phimoe(seed=1, attention_bias=True)
    hf.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours = PhimoeForCausalLM.from_pretrained(tmp_path)
    ids, _ = make_inputs(97, 2, 6, None)
    with torch.no_grad():
        close(hf(ids).logits, ours(ids).logits, "logits from fused-name checkpoint")
    # ... and round-trips through our save (original names) into both libraries.
    ours.save_pretrained(tmp_path / "again")
    with torch.no_grad():
        close(hf(ids).logits, PhimoeForCausalLM.from_pretrained(tmp_path / "again")(ids).logits, "moetorch reload")
        close(hf(ids).logits, transformers.PhimoeForCausalLM.from_pretrained(tmp_path / "again")(ids).logits, "hf reload")


def test_writes_original_names_like_transformers(tmp_path):
    ours = our_model(PHIMOE)
    ours.save_pretrained(tmp_path / "ours")
    hf_phimoe().save_pretrained(tmp_path / "hf")
    ours_keys = set(load_file(str(tmp_path / "ours" / "model.safetensors")))
    hf_keys = set(load_file(str(tmp_path / "hf" / "model.safetensors")))
    assert ours_keys == hf_keys
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in ours_keys
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == ["PhimoeForCausalLM"] and config["model_type"] == "phimoe"


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_sharded_round_trip_both_libraries(arch, tmp_path):
    ours = our_model(arch, seed=2)
    ours.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    again = arch.ours["causal_lm"].from_pretrained(tmp_path)
    for (n1, t1), (n2, t2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    hf = arch.hf["causal_lm"].from_pretrained(tmp_path)
    ids, _ = make_inputs(arch.base["vocab_size"], 2, 5, None)
    with torch.no_grad():
        close(hf(ids).logits, again(ids).logits, "Transformers on our shards")
    # Shards as Transformers fills them: in the model's order, a fused tensor's pieces together
    # (JetMoE's tensors are the file's: Transformers' save of the same weights gives the same shards;
    # a model of its own tensors: Transformers groups tensors of one storage, as a loaded file's are).
    fresh = arch.hf["causal_lm"](hf.config)
    fresh.load_state_dict(hf.state_dict())
    fresh.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    theirs = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    if arch is JETMOE:
        assert index["weight_map"] == theirs
    assert index["weight_map"].keys() == theirs.keys()
    if arch is PHIMOE:  # each layer's experts (one fused tensor here) in one shard
        for layer in range(ours.config.num_hidden_layers):
            for w in ("w1", "w2", "w3"):
                prefix = f"model.layers.{layer}.block_sparse_moe.experts."
                assert len({f for k, f in index["weight_map"].items() if k.startswith(prefix) and w in k}) == 1
    # Saving again unsharded removes the stale shards.
    again.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / shards[0]).exists()
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_dtype_and_device_placement(tmp_path):
    our_model(PHIMOE).save_pretrained(tmp_path)
    m = PhimoeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert m.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.model.rotary_emb.inv_freq_short.dtype == torch.float32  # rope tables stay fp32
    assert PhimoeForCausalLM.from_pretrained(tmp_path, torch_dtype="float16").dtype == torch.float16
    m.save_pretrained(tmp_path / "bf16")
    assert PhimoeForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16
    assert not m.training
    with pytest.raises(ValueError, match="dtype"):
        PhimoeForCausalLM.from_pretrained(tmp_path, dtype="int7")


def test_weights_that_do_not_fit_the_gpu_fail_before_allocating(tmp_path, monkeypatch):
    # weights larger than the GPU's free memory: a clear error up front, not a CUDA OOM partway through
    our_model(PHIMOE).save_pretrained(tmp_path)
    need = sum(p.numel() * 2 for p in PhimoeForCausalLM.from_pretrained(tmp_path, dtype="bfloat16").parameters())
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (need // 2, 3 * need))
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda self, **kw: pytest.fail("allocated on the GPU"))
    with pytest.raises(torch.OutOfMemoryError) as err:
        PhimoeForCausalLM.from_pretrained(tmp_path, dtype="bfloat16", device="cuda:1")
    mib = lambda n: f"{n / 2**20:.1f} MiB"
    assert str(err.value).startswith(f"{tmp_path}: PhimoeForCausalLM needs {mib(need)} for its weights in bfloat16, "
                                     f"but cuda:1 has {mib(need // 2)} free of {mib(3 * need)}.")
    assert "one device" in str(err.value) and asked == [torch.device("cuda:1")]
    # room enough: no error (the check alone; this machine may have no GPU to load onto)
    from moetorch.modeling_utils import check_fits

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need + 2**20, 3 * need))
    with torch.device("meta"):
        meta = PhimoeForCausalLM(PHIMOE.our_config()).to(torch.bfloat16)
    check_fits(meta, torch.device("cuda"), str(tmp_path))
    check_fits(meta, torch.device("cpu"), str(tmp_path))  # the CPU is not checked


def test_head_and_base_models_from_a_causal_lm_checkpoint(tmp_path, caplog):
    lm = our_model(PHIMOE, seed=3)
    lm.save_pretrained(tmp_path)
    base = PhimoeModel.from_pretrained(tmp_path)
    ids, _ = make_inputs(97, 1, 5, None)
    with torch.no_grad():
        close(base(ids).last_hidden_state, lm.model(ids).last_hidden_state, "base model from LM checkpoint")
    with caplog.at_level(logging.WARNING, logger="moetorch"):
        cls = PhimoeForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert "score.weight" in caplog.text and cls.score.weight.abs().sum() > 0
    base.save_pretrained(tmp_path / "base")
    PhimoeModel.from_pretrained(tmp_path / "base")


def _corrupt(tmp_path, edit):
    our_model(PHIMOE).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor_is_an_error(tmp_path):
    """The error names the parameter, and the file tensor that is missing in the checkpoint's naming
    (one tensor an expert), not the others of that parameter."""
    _corrupt(tmp_path, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(CheckpointError, match="gate_up_proj") as error:
        PhimoeForCausalLM.from_pretrained(tmp_path)
    assert "'model.layers.1.block_sparse_moe.experts.2.w3.weight'" in str(error.value)
    assert "experts.2.w1" not in str(error.value) and "experts.1.w3" not in str(error.value)


def test_unexpected_tensor_is_an_error(tmp_path):
    _corrupt(tmp_path, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="mystery"):
        PhimoeForCausalLM.from_pretrained(tmp_path)


def test_shape_mismatch_is_an_error(tmp_path):
    _corrupt(tmp_path, lambda t: t.update({"model.norm.weight": torch.zeros(31)}))
    with pytest.raises(CheckpointError, match=r"model.norm.weight.*\(31,\).*\(32,\)"):
        PhimoeForCausalLM.from_pretrained(tmp_path)


def test_config_that_does_not_fit_the_weights(tmp_path):
    our_model(PHIMOE).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        PhimoeForCausalLM.from_pretrained(tmp_path)


def test_corrupt_and_missing_files(tmp_path):
    our_model(PHIMOE).save_pretrained(tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = tmp_path / sorted(set(index["weight_map"].values()))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=shard.name):
        PhimoeForCausalLM.from_pretrained(tmp_path)
    shard.unlink()
    with pytest.raises(CheckpointError, match="do not exist"):
        PhimoeForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(CheckpointError, match="index"):
        PhimoeForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        PhimoeForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")  # (.bin weights load: test_pytorch_bin_checkpoints_...)
    with pytest.raises(CheckpointError, match="cannot read .*pytorch_model.bin: EOFError"):
        PhimoeForCausalLM.from_pretrained(tmp_path)


def test_checkpoint_of_another_model_type(tmp_path):
    our_model(PHIMOE).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "mixtral"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="mixtral"):
        PhimoeForCausalLM.from_pretrained(tmp_path)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    for bad in ("-1GB", "lots", 0):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


def test_loading_info_and_left_out_heads_as_transformers(tmp_path):
    """`output_loading_info=True` gives Transformers' info, and what a checkpoint leaves out (a
    head it lacks, a classifier of another label count under `ignore_mismatched_sizes`) is newly
    initialised as Transformers initialises it, never left as uninitialised memory."""
    lm = our_model(PHIMOE, seed=3, lm_head_bias=True)
    lm.save_pretrained(tmp_path / "lm")
    ours = PhimoeForSequenceClassification.from_pretrained(tmp_path / "lm", output_loading_info=True)
    hf = transformers.PhimoeForSequenceClassification.from_pretrained(tmp_path / "lm", output_loading_info=True)
    assert ours[1] == {**hf[1], "unexpected_keys": {"lm_head.weight", "lm_head.bias"}}
    assert hf[1]["missing_keys"] == {"score.weight"} and hf[1]["unexpected_keys"] <= {"lm_head.weight", "lm_head.bias"}
    std = PHIMOE.our_config().initializer_range
    assert abs(ours[0].score.weight.std().item() - std) < std / 2

    # a causal LM from a base model's checkpoint: a fresh head (normal weights, zero bias)
    lm.model.save_pretrained(tmp_path / "base")
    ours, info = PhimoeForCausalLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert info["missing_keys"] == {"lm_head.weight", "lm_head.bias"}
    assert abs(ours.lm_head.weight.std().item() - std) < std / 2 and torch.equal(
        ours.lm_head.bias, torch.zeros_like(ours.lm_head.bias))
    close(ours.model.layers[0].self_attn.q_proj.weight, lm.model.layers[0].self_attn.q_proj.weight, "loaded")

    # a classifier of 2 labels loaded with 5
    cls = PhimoeForSequenceClassification(PHIMOE.our_config(num_labels=2))
    randomize_(cls, 4)
    cls.save_pretrained(tmp_path / "cls")
    with pytest.raises(CheckpointError, match="score.weight"):
        PhimoeForSequenceClassification.from_pretrained(tmp_path / "cls", num_labels=5)
    ours, info = PhimoeForSequenceClassification.from_pretrained(
        tmp_path / "cls", num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True)
    _, hf_info = transformers.PhimoeForSequenceClassification.from_pretrained(
        tmp_path / "cls", num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True)
    assert info == hf_info and ours.score.weight.shape == (5, 32)
    assert abs(ours.score.weight.std().item() - std) < std / 2
    close(ours.model.norm.weight, cls.model.norm.weight, "the other tensors load")


def test_variant_files_both_libraries(tmp_path):
    ours = our_model(PHIMOE, seed=1)
    ours.save_pretrained(tmp_path / "o", variant="v1", max_shard_size="20KB")
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert "model.safetensors.index.v1.json" in names and any(n.startswith("model.v1-00001-of-") for n in names)
    hf = transformers.PhimoeForCausalLM.from_pretrained(tmp_path / "o", variant="v1")
    hf.save_pretrained(tmp_path / "h", variant="v2")
    assert (tmp_path / "h" / "model.v2.safetensors").is_file()
    back = PhimoeForCausalLM.from_pretrained(tmp_path / "h", variant="v2")
    ids, _ = make_inputs(97, 1, 5, None)
    with torch.no_grad():
        close(back(ids).logits, ours(ids).logits, "logits through both libraries' variant files")
    with pytest.raises(CheckpointError, match="variant='v3'.*model.v3.safetensors"):
        PhimoeForCausalLM.from_pretrained(tmp_path / "h", variant="v3")
    # a save over an earlier one of the same variant leaves no stale shards; other variants stay
    ours.save_pretrained(tmp_path / "o", variant="v1")
    ours.save_pretrained(tmp_path / "o")
    assert sorted(p.name for p in (tmp_path / "o").iterdir() if "safetensors" in p.name) == [
        "model.safetensors", "model.v1.safetensors"]


def test_save_options_as_transformers(tmp_path, caplog):
    ours = our_model(PHIMOE, seed=1)
    ours.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert list((tmp_path / "rank1").iterdir()) == []  # the directory alone, as Transformers makes it
    other = our_model(PHIMOE, seed=2)
    ours.save_pretrained(tmp_path / "sd", state_dict=other.state_dict())
    hf = transformers.PhimoeForCausalLM.from_pretrained(tmp_path / "sd")
    ids, _ = make_inputs(97, 1, 5, None)
    with torch.no_grad():
        close(hf(ids).logits, other(ids).logits, "the state_dict given is what is written")
    ours.save_pretrained(tmp_path / "ok", token=None, safe_serialization=True, save_original_format=True)
    # Transformers 5 dropped .bin saving and ignores safe_serialization=False: so does moetorch, saying so
    with caplog.at_level(logging.WARNING, logger="moetorch"):
        ours.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert "safe_serialization=False is ignored" in caplog.text
    assert (tmp_path / "bin" / "model.safetensors").is_file()
    hf.save_pretrained(tmp_path / "hf_bin", safe_serialization=False)
    assert sorted(p.name for p in (tmp_path / "bin").glob("*.safetensors")) == \
        sorted(p.name for p in (tmp_path / "hf_bin").glob("*.safetensors"))
    with pytest.raises(TypeError, match="max_shard"):
        ours.save_pretrained(tmp_path / "x", max_shard="1GB")
    # save_original_format=False: the model's own names (PhiMoE's experts fused), as Transformers writes them
    ours.save_pretrained(tmp_path / "fused", save_original_format=False)
    hf.save_pretrained(tmp_path / "hf_fused", save_original_format=False)
    names = [sorted(load_file(d / "model.safetensors")) for d in (tmp_path / "fused", tmp_path / "hf_fused")]
    assert names[0] == names[1] and any(n.endswith("mlp.experts.gate_up_proj") for n in names[0])
    with torch.no_grad():
        close(transformers.PhimoeForCausalLM.from_pretrained(tmp_path / "fused")(ids).logits, ours(ids).logits,
              "Transformers reads the fused names moetorch writes")
    # a generation config read from Transformers' file is saved again without Transformers' version record
    resaved = PhimoeForCausalLM.from_pretrained(tmp_path / "hf_bin")
    written = json.loads((tmp_path / "hf_bin" / "generation_config.json").read_text())["transformers_version"]
    assert resaved.generation_config.transformers_version == written  # (kept: it decides use_model_defaults)
    resaved.save_pretrained(tmp_path / "resaved")
    assert "transformers_version" not in json.loads((tmp_path / "resaved" / "generation_config.json").read_text())


def test_loading_options_never_land_in_the_config(tmp_path):
    our_model(PHIMOE).save_pretrained(tmp_path)
    model = PhimoeForCausalLM.from_pretrained(
        tmp_path, weights_only=True, disable_mmap=False, use_kernels=False, variant=None, quantization_config=None,
        key_mapping=None, adapter_kwargs={}, from_tf=False, router_aux_loss_coef=0.5)
    assert model.config.extra == {} and model.config.router_aux_loss_coef == 0.5
    model.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert not {"weights_only", "variant", "quantization_config", "key_mapping"} & saved.keys()
    from moetorch import GenerationConfig

    mine = GenerationConfig(max_new_tokens=7, do_sample=True)
    assert PhimoeForCausalLM.from_pretrained(tmp_path, generation_config=mine).generation_config is mine
    with pytest.raises(TypeError, match="generation_config must be a moetorch GenerationConfig"):
        PhimoeForCausalLM.from_pretrained(tmp_path, generation_config={"max_new_tokens": 7})
    for key, value in (("quantization_config", {"load_in_8bit": True}),
                       ("tp_plan", "auto"), ("gguf_file", "m.gguf"), ("from_tf", True)):
        with pytest.raises(ValueError, match=f"`{key}`"):
            PhimoeForCausalLM.from_pretrained(tmp_path, **{key: value})


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_key_mapping_renames_the_stored_names_as_transformers(arch, tmp_path):
    """`from_pretrained(key_mapping={pattern: replacement})`: a checkpoint whose names another
    codebase wrote (here `model.` as `transformer.`, and PhiMoE's experts under another module name)
    loads as Transformers loads it, the first matching pattern renaming each name."""
    import safetensors.torch

    hf = arch.hf["causal_lm"](arch.hf_config())
    randomize_(hf, 4)
    hf.save_pretrained(tmp_path / "hf")
    weights = safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors")
    renamed = {k.replace("model.", "transformer.", 1).replace("block_sparse_moe", "moe_block"): v
               for k, v in weights.items()}
    safetensors.torch.save_file(renamed, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    mapping = {r"^transformer\.(.*)\.moe_block\.(.*)$": r"model.\1.block_sparse_moe.\2", r"^transformer\.": "model."}
    ours = arch.ours["causal_lm"].from_pretrained(tmp_path / "hf", key_mapping=mapping)
    ids = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf.eval()(ids).logits, rtol=1e-5, atol=1e-5)
        if arch is JETMOE:  # (Transformers 5.23 maps PhiMoE's per-expert names before key_mapping renames
            # them, so it leaves those experts newly initialised: only JetMoE reads the same there)
            theirs = arch.hf["causal_lm"].from_pretrained(tmp_path / "hf", key_mapping=mapping)
            torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="lacks .* the model needs"):  # (without the mapping)
        arch.ours["causal_lm"].from_pretrained(tmp_path / "hf")
    for bad, match in (({"(": "x"}, "no regular expression"), ({"a": 3}, "strings to strings"),
                       ([("a", "b")], "must be a dict")):
        with pytest.raises(ValueError, match=match):
            arch.ours["causal_lm"].from_pretrained(tmp_path / "hf", key_mapping=bad)


def test_loading_details_as_transformers(tmp_path, caplog):
    """What Transformers does and users meet: a config object passed in is copied (a model's dtype
    never reaches the caller's object or another model); dtype "auto" without a dtype in
    config.json takes the weights' own; a config read with loading options writes none of them;
    old rotary buffers in a checkpoint are dropped; a tied checkpoint that also stores the head
    loads without a word; weights files of a variant only are not taken without `variant`; a
    weights file given as the config is named."""
    from moetorch import AutoConfig, JetMoeForCausalLM

    hf = hf_phimoe().to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    cfg = AutoConfig.from_pretrained(tmp_path / "bf16")
    first = PhimoeForCausalLM.from_pretrained(tmp_path / "bf16", config=cfg, dtype=torch.float32)
    second = PhimoeForCausalLM.from_pretrained(tmp_path / "bf16", config=cfg)
    assert first.config is not cfg and second.config is not first.config and cfg.dtype == torch.bfloat16
    assert (first.dtype, second.dtype) == (torch.float32, torch.bfloat16)

    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (tmp_path / "bf16" / "config.json").write_text(json.dumps(config))
    want = transformers.PhimoeForCausalLM.from_pretrained(tmp_path / "bf16").dtype
    assert want == torch.bfloat16
    assert PhimoeForCausalLM.from_pretrained(tmp_path / "bf16").dtype == want
    assert PhimoeForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == want

    AutoConfig.from_pretrained(tmp_path / "bf16", trust_remote_code=True, _from_auto=True).save_pretrained(tmp_path / "c")
    assert not {"trust_remote_code", "_from_auto"} & json.loads((tmp_path / "c" / "config.json").read_text()).keys()

    ours = our_model(PHIMOE)
    ours.save_pretrained(tmp_path / "rope")
    tensors = load_file(tmp_path / "rope" / "model.safetensors")
    for i in range(PHIMOE.our_config().num_hidden_layers):
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, tmp_path / "rope" / "model.safetensors", metadata={"format": "pt"})
    for lib in (transformers.PhimoeForCausalLM, PhimoeForCausalLM):
        _, info = lib.from_pretrained(tmp_path / "rope", output_loading_info=True)
        assert not info["unexpected_keys"], lib

    jet = our_model(JETMOE)
    assert jet.config.tie_word_embeddings
    jet.save_pretrained(tmp_path / "tied")
    tensors = load_file(tmp_path / "tied" / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "tied" / "model.safetensors", metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moetorch"):
        _, info = JetMoeForCausalLM.from_pretrained(tmp_path / "tied", output_loading_info=True)
    _, hf_info = transformers.JetMoeForCausalLM.from_pretrained(tmp_path / "tied", output_loading_info=True)
    assert info["unexpected_keys"] == hf_info["unexpected_keys"] == set() and "unused" not in caplog.text

    ours.save_pretrained(tmp_path / "variant_only", variant="fp16")
    with pytest.raises(CheckpointError, match="pass variant=VARIANT"):
        PhimoeForCausalLM.from_pretrained(tmp_path / "variant_only")
    with pytest.raises(OSError):
        transformers.PhimoeForCausalLM.from_pretrained(tmp_path / "variant_only")
    with pytest.raises(ConfigError, match="not a config.json .not text.; pass the checkpoint's directory"):
        PhimoeForCausalLM.from_pretrained(tmp_path / "rope" / "model.safetensors")
    # a broken generation_config.json, or a directory where config.json belongs: errors naming the file
    shutil.copytree(tmp_path / "rope", tmp_path / "broken_gen")
    (tmp_path / "broken_gen" / "generation_config.json").write_text("{")
    with pytest.raises(ConfigError, match="broken_gen/generation_config.json is not valid JSON"):
        PhimoeForCausalLM.from_pretrained(tmp_path / "broken_gen")
    with pytest.raises(OSError):
        transformers.GenerationConfig.from_pretrained(tmp_path / "broken_gen")
    (tmp_path / "dir_config").mkdir()
    (tmp_path / "dir_config" / "config.json").mkdir()
    with pytest.raises(ConfigError, match="dir_config/config.json is a directory, where a config.json file belongs"):
        PhimoeForCausalLM.from_pretrained(tmp_path / "dir_config")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_model_attributes_transformers_has(arch, tmp_path):
    from parity import make_pair

    hf, ours = make_pair(arch, tmp_path, seed=0)
    assert ours.model.padding_idx == hf.model.padding_idx
    coef = "router_aux_loss_coef" if arch is PHIMOE else "aux_loss_coef"
    assert getattr(ours, coef) == getattr(hf, coef)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_tied_checkpoint_with_a_head_of_another_shape_is_a_size_mismatch(arch, tmp_path):
    """A tied model's checkpoint whose stored `lm_head.weight` has another shape than the head: a
    size mismatch naming the tensor, as Transformers reports it (also with `output_loading_info`),
    not a silent load. With `ignore_mismatched_sizes` it is reported in `mismatched_keys`, and the
    head stays tied to the loaded embeddings (Transformers 5.23 fails there, on meta tensors)."""
    model = our_model(arch, seed=2, tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = torch.zeros(3, arch.base["hidden_size"])
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours, theirs = arch.ours["causal_lm"], arch.hf["causal_lm"]
    for kwargs in ({}, {"output_loading_info": True}):
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            theirs.from_pretrained(tmp_path, **kwargs)
        with pytest.raises(CheckpointError, match=r"'lm_head.weight' .* has shape \(3, 32\), but the model expects "
                                                  r"\(97, 32\)"):
            ours.from_pretrained(tmp_path, **kwargs)
    loaded, info = ours.from_pretrained(tmp_path, ignore_mismatched_sizes=True, output_loading_info=True)
    assert info["mismatched_keys"] == {("lm_head.weight", torch.Size([3, 32]), torch.Size([97, 32]))}
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    ids, _ = make_inputs(97, 1, 5, None)
    with torch.no_grad():
        close(loaded(ids).logits, model(ids).logits, "the tied model's logits")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_tied_config_over_a_stored_head_loads_as_transformers(arch, tmp_path, caplog):
    """A config that ties the head to the embeddings over a checkpoint that stores both, as
    Transformers 5.23 loads it: with other values the head is not tied and keeps its own (a warning
    names the file and the embedding; the model then saves and reloads untied, in either library);
    with the embeddings absent, the one tied parameter takes the head's values."""
    src = our_model(arch, seed=3, tie_word_embeddings=False)
    src.save_pretrained(tmp_path / "untied")
    ours, theirs = arch.ours["causal_lm"], arch.hf["causal_lm"]
    ids, _ = make_inputs(97, 2, 6, None)
    want = theirs.from_pretrained(tmp_path / "untied", tie_word_embeddings=True)
    with caplog.at_level(logging.WARNING, logger="moetorch"):
        got = ours.from_pretrained(tmp_path / "untied", tie_word_embeddings=True)
    assert "ties lm_head.weight to model.embed_tokens.weight (tie_word_embeddings), but the checkpoint stores " \
           "both with different values" in caplog.text
    assert got.lm_head.weight is not got.model.embed_tokens.weight and not got.config.tie_word_embeddings
    assert torch.equal(got.lm_head.weight, src.lm_head.weight)
    with torch.no_grad():
        close(got(ids).logits, want(ids).logits, "untied head's logits")
        got.save_pretrained(tmp_path / "resaved")
        for cls in (ours, theirs):
            close(cls.from_pretrained(tmp_path / "resaved")(ids).logits, want(ids).logits, f"{cls.__module__} reload")
    # the same values stored under both names: tied, no warning
    tensors = load_file(tmp_path / "untied" / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "untied" / "model.safetensors", metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moetorch"):
        got = ours.from_pretrained(tmp_path / "untied", tie_word_embeddings=True)
    assert got.lm_head.weight is got.model.embed_tokens.weight and "ties lm_head" not in caplog.text
    # the embeddings absent: the tied parameter is the stored head
    head = torch.randn_like(tensors["lm_head.weight"])
    tensors["lm_head.weight"] = head
    del tensors["model.embed_tokens.weight"]
    save_file(tensors, tmp_path / "untied" / "model.safetensors", metadata={"format": "pt"})
    want = theirs.from_pretrained(tmp_path / "untied", tie_word_embeddings=True)
    got = ours.from_pretrained(tmp_path / "untied", tie_word_embeddings=True)
    assert got.lm_head.weight is got.model.embed_tokens.weight and torch.equal(got.model.embed_tokens.weight, head)
    with torch.no_grad():
        close(got(ids).logits, want(ids).logits, "head-only tied logits")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_load_keywords_reach_the_generation_config_as_transformers(arch, tmp_path):
    """A model class's from_pretrained keywords that are generation fields (eos_token_id,
    use_cache, ...) update generation_config.json's settings, an Auto class's do not, and a
    checkpoint without that file makes them from config.json as stored: generate stops where
    Transformers' does."""
    import os
    import shutil

    import moetorch

    hf = arch.hf["causal_lm"](arch.hf_config(eos_token_id=2, bos_token_id=1))
    randomize_(hf, 3)
    hf.save_pretrained(tmp_path / "with")
    shutil.copytree(tmp_path / "with", tmp_path / "without")
    os.remove(tmp_path / "without" / "generation_config.json")
    ids = torch.tensor([[5, 6, 7]])
    plain = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, 3:].tolist()
    for folder in ("with", "without"):
        for kw in ({"eos_token_id": plain[3], "pad_token_id": 9}, {"use_cache": False}, {"bos_token_id": 7}):
            for name in (arch.hf["causal_lm"].__name__, "AutoModelForCausalLM"):
                theirs = getattr(transformers, name).from_pretrained(tmp_path / folder, **kw)
                ours = getattr(moetorch, name).from_pretrained(tmp_path / folder, **kw)
                for key in kw:
                    assert getattr(ours.generation_config, key) == getattr(theirs.generation_config, key), \
                        (folder, name, key)
                    assert getattr(ours.config, key) == getattr(theirs.config, key)
                assert ours.generate(ids, max_new_tokens=8, do_sample=False).tolist() == \
                    theirs.generate(ids, max_new_tokens=8, do_sample=False).tolist(), (folder, name, kw)


@pytest.mark.parametrize("overrides", [{"num_local_experts": 2}, {"num_local_experts": 8},
                                       {"intermediate_size": 40}, {"hidden_size": 48}])
def test_experts_of_another_size_are_one_mismatch_as_transformers(overrides, tmp_path, caplog):
    """PhiMoE's experts, stored one tensor per expert and projection, loaded into a model of
    another expert count or size: with `ignore_mismatched_sizes` each fused parameter is one
    mismatched key with the shape Transformers gives the stored whole (and is newly initialised),
    else an error that names it; never an error from inside the copy."""
    our_model(PHIMOE, seed=2).save_pretrained(tmp_path / "lm")
    if "hidden_size" in overrides:  # (the heads must still divide it)
        overrides = {**overrides, "num_attention_heads": 4, "num_key_value_heads": 2}
    ours, info = PhimoeForCausalLM.from_pretrained(tmp_path / "lm", ignore_mismatched_sizes=True,
                                                   output_loading_info=True, **overrides)
    _, hf_info = transformers.PhimoeForCausalLM.from_pretrained(tmp_path / "lm", ignore_mismatched_sizes=True,
                                                                output_loading_info=True, **overrides)
    assert info == hf_info and any("experts" in name for name, _, _ in info["mismatched_keys"])
    assert ours.model.layers[0].mlp.experts.gate_up_proj.isfinite().all()
    with pytest.raises(CheckpointError, match=r"(gate_up_proj|down_proj|weight).* has shape"):
        PhimoeForCausalLM.from_pretrained(tmp_path / "lm", **overrides)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_pytorch_bin_checkpoints_load_as_transformers(arch, tmp_path):
    """PyTorch .bin weights (pytorch_model.bin, or shards and their index, as Transformers'
    `safe_serialization=False` writes them) load as Transformers loads them, dtype "auto"
    included; beside safetensors, safetensors win unless `use_safetensors=False`, and
    `use_safetensors=True` refuses .bin weights alone. The files are read with
    `weights_only=True`: a pickle of anything but tensors is refused."""
    import shutil

    import moetorch

    hf = arch.hf["causal_lm"](arch.hf_config())
    randomize_(hf, 5)
    hf = hf.to(torch.bfloat16)
    for folder, size in (("single", "1GB"), ("sharded", "20KB")):  # safetensors turned into .bin files
        hf.save_pretrained(tmp_path / folder, max_shard_size=size)
        index = tmp_path / folder / "model.safetensors.index.json"
        weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
        for f in sorted((tmp_path / folder).glob("*.safetensors")):
            name = f.name.replace("model", "pytorch_model").replace(".safetensors", ".bin")
            tensors = load_file(f)
            if "model.embed_tokens.weight" in tensors and hf.config.tie_word_embeddings:
                tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # as older .bin files
                if weight_map is not None:
                    weight_map["lm_head.weight"] = f.name
            torch.save(tensors, f.with_name(name))
            f.unlink()
        if weight_map:
            index.unlink()
            (tmp_path / folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
                k: v.replace("model", "pytorch_model").replace(".safetensors", ".bin") for k, v in weight_map.items()}}))
    assert (tmp_path / "single" / "pytorch_model.bin").exists()
    assert len(list((tmp_path / "sharded").glob("pytorch_model-*.bin"))) > 1
    from moetorch.train.presets import has_weights

    assert has_weights(tmp_path / "single") and has_weights(tmp_path / "sharded")  # (training goes on from them)
    ids, _ = make_inputs(arch.base["vocab_size"], 1, 5, None)
    ours_cls, hf_cls = getattr(moetorch, arch.hf["causal_lm"].__name__), arch.hf["causal_lm"]
    for folder in ("single", "sharded"):
        ours, theirs = ours_cls.from_pretrained(tmp_path / folder), hf_cls.from_pretrained(tmp_path / folder)
        assert ours.dtype == theirs.dtype == torch.bfloat16
        with torch.no_grad():
            assert torch.equal(ours(ids).logits, theirs(ids).logits), folder
    # beside safetensors of other weights
    both = tmp_path / "both"
    shutil.copytree(tmp_path / "single", both)
    other = arch.hf["causal_lm"](arch.hf_config())
    randomize_(other, 6)
    other.save_pretrained(tmp_path / "safe")
    for f in (tmp_path / "safe").glob("*.safetensors"):
        shutil.copy(f, both / f.name)
    for kw in ({}, {"use_safetensors": False}, {"use_safetensors": True}):
        with torch.no_grad():
            assert torch.equal(ours_cls.from_pretrained(both, dtype=torch.float32, **kw)(ids).logits,
                               hf_cls.from_pretrained(both, dtype=torch.float32, **kw)(ids).logits), kw
    with pytest.raises(CheckpointError, match="use_safetensors=True, but .* holds PyTorch .bin weights only"):
        ours_cls.from_pretrained(tmp_path / "single", use_safetensors=True)
    with pytest.raises(CheckpointError, match="use_safetensors=False: no pytorch_model.bin"):
        ours_cls.from_pretrained(tmp_path / "safe", use_safetensors=False)
    torch.save({"weights": [1, 2]}, tmp_path / "single" / "pytorch_model.bin")
    with pytest.raises((CheckpointError, TypeError), match="pytorch_model.bin"):
        ours_cls.from_pretrained(tmp_path / "single")


def test_dtype_by_module_takes_the_main_entry_as_transformers(tmp_path, caplog):
    """A dtype dict (Transformers' by sub-config form, deprecated there): the whole model takes the
    main entry's (""), else the default dtype, with a warning."""
    our_model(PHIMOE, seed=1).save_pretrained(tmp_path)
    for dtype in ({"": torch.float16}, {"": "bfloat16"}, {"model": torch.float16}, {"lm_head": "float16",
                                                                                   "": torch.bfloat16}):
        with caplog.at_level(logging.WARNING, logger="moetorch"):
            ours = PhimoeForCausalLM.from_pretrained(tmp_path, dtype=dtype)
        theirs = transformers.PhimoeForCausalLM.from_pretrained(tmp_path, dtype=dtype)
        assert ours.dtype == theirs.dtype and ours.lm_head.weight.dtype == theirs.lm_head.weight.dtype, dtype
        assert "dtype given by module" in caplog.text
