"""Transformers' adapter methods (`load_adapter`, `add_adapter`, `set_adapter`, ...) on moetorch's
models, against the same calls on Transformers' models with the same base weights: the same logits,
active adapters, trainable parameters, saved files and generated tokens."""

from __future__ import annotations

import copy
import json
import os
import sys

import peft
import pytest
import torch
import transformers
from archs import JETMOE, PHIMOE
from parity import close, make_inputs, make_pair
from safetensors.torch import load_file

import moetorch

ARCHS = {"phimoe": PHIMOE, "jetmoe": JETMOE}
TARGETS = {"phimoe": (["q_proj", "v_proj"], ["k_proj", "o_proj"]), "jetmoe": (["kv_proj"], ["layer", "kv_proj"])}
EXPERTS = {"phimoe": ["experts.gate_up_proj"], "jetmoe": ["input_linear.weight"]}


def make_adapter(hf, directory, arch_name: str, seed: int, which: int = 0, method: str = "lora", r: int = 4,
                 alpha: int = 8):
    """An adapter with random weights made by PEFT on a copy of Transformers' model, saved to `directory`."""
    torch.manual_seed(seed)
    if method == "ia3":
        cfg = peft.IA3Config(target_modules=TARGETS[arch_name][which], feedforward_modules=[], task_type="CAUSAL_LM")
    elif method == "lora_experts":
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=[],
                              target_parameters=EXPERTS[arch_name], task_type="CAUSAL_LM")
    else:
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=TARGETS[arch_name][which],
                              task_type="CAUSAL_LM")
    made = peft.get_peft_model(copy.deepcopy(hf), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "ia3_l" in name:  # IA3 starts at ones, which changes nothing
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    made.save_pretrained(directory)
    return directory


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def same_state(hf, ours, arch, what, same_trainable=True):
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 7, "left", seed=5)
    close(logits(ours, ids, mask), logits(hf, ids, mask), f"{what}: logits")
    assert ours.training == hf.training, what
    assert trainable(ours) == trainable(hf) or not same_trainable, what
    assert ours._hf_peft_config_loaded == hf._hf_peft_config_loaded, what
    if hf._hf_peft_config_loaded:
        assert ours.active_adapters() == hf.active_adapters(), what
        assert list(ours.peft_config) == list(hf.peft_config), what


@pytest.mark.parametrize("method", ["lora", "ia3", "lora_experts"])
@pytest.mark.parametrize("arch_name", ["phimoe", "jetmoe"])
def test_load_adapter_matches_transformers(arch_name, method, tmp_path):
    arch = ARCHS[arch_name]
    hf, ours = make_pair(arch, tmp_path, seed=3)
    path = make_adapter(hf, tmp_path / "adapter", arch_name, seed=4, method=method)
    hf.load_adapter(str(path))
    info = ours.load_adapter(path)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    same_state(hf, ours, arch, "loaded")
    assert not ours.training and trainable(ours) == []  # frozen for inference, as in Transformers

    prompt, pmask = make_inputs(arch.base["vocab_size"], 2, 6, "left", seed=6)
    kw = dict(attention_mask=pmask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = hf.generate(input_ids=prompt, **kw)
    for cache in (None, "static"):
        assert torch.equal(ours.generate(input_ids=prompt, cache_implementation=cache, **kw), want), cache


@pytest.mark.parametrize("arch_name", ["phimoe", "jetmoe"])
def test_trainable_adapter_trains_as_in_transformers(arch_name, tmp_path):
    arch = ARCHS[arch_name]
    hf, ours = make_pair(arch, tmp_path, seed=3)
    path = make_adapter(hf, tmp_path / "adapter", arch_name, seed=4)
    hf.load_adapter(str(path), is_trainable=True)
    ours.load_adapter(path, is_trainable=True)
    assert trainable(ours) == trainable(hf) and trainable(ours)
    ids, mask = make_inputs(arch.base["vocab_size"], 3, 9, "left", seed=5)
    grads = []
    for model in (hf, ours):
        model.train()
        torch.manual_seed(7)  # PhiMoE's training router draws
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        grads.append((out.loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (want_loss, want), (loss, got) = grads
    close(loss, want_loss, "loss")
    for name in want:
        close(got[name], want[name], f"grad {name}", atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch_name", ["phimoe", "jetmoe"])
def test_from_pretrained_on_an_adapter_directory_loads_its_base_and_the_adapter(arch_name, tmp_path):
    arch = ARCHS[arch_name]
    hf, _ = make_pair(arch, tmp_path, seed=3)
    path = make_adapter(hf, tmp_path / "adapter", arch_name, seed=4)
    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "hf")
    cfg_file.write_text(json.dumps(cfg))
    want = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", adapter_name="x")
    for got in (moetorch.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", adapter_name="x"),
                arch.ours["causal_lm"].from_pretrained(path, attn_implementation="eager", adapter_name="x")):
        assert type(got) is arch.ours["causal_lm"]
        assert got.name_or_path == want.name_or_path == str(tmp_path / "hf")
        same_state(want, got, arch, "from_pretrained")
        assert got.active_adapters() == ["x"]
    _, info = arch.ours["causal_lm"].from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []

    # a whole checkpoint with an adapter beside it: the checkpoint's weights, then the adapter
    full = tmp_path / "full"
    want.save_pretrained(full)  # Transformers saves only the adapter of a model with adapters ...
    assert not (full / "config.json").exists()
    hf.save_pretrained(full)  # ... so the base checkpoint is written beside it
    want = transformers.AutoModelForCausalLM.from_pretrained(full, attn_implementation="eager")
    got = moetorch.AutoModelForCausalLM.from_pretrained(full, attn_implementation="eager")
    same_state(want, got, arch, "checkpoint with adapter")


def test_an_adapter_directory_that_names_no_base_model_is_an_error_that_says_so(tmp_path):
    hf, _ = make_pair(PHIMOE, tmp_path, seed=3)
    path = make_adapter(hf, tmp_path / "adapter", "phimoe", seed=4)
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    for load in (moetorch.PhimoeForCausalLM.from_pretrained, moetorch.AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match="base_model_name_or_path"):
            load(path)


@pytest.mark.parametrize("arch_name", ["phimoe", "jetmoe"])
def test_adapter_calls_in_a_row_match_transformers(arch_name, tmp_path):
    """Two adapters loaded, switched, combined, switched off and on, read back and deleted: after
    each call, both libraries' models give the same logits and report the same adapters."""
    arch = ARCHS[arch_name]
    hf, ours = make_pair(arch, tmp_path, seed=3)
    a = make_adapter(hf, tmp_path / "a", arch_name, seed=4, which=0)
    b = make_adapter(hf, tmp_path / "b", arch_name, seed=5, which=1)
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 7, "left", seed=5)
    base = logits(ours, ids, mask)
    steps = [
        ("load a", lambda m: m.load_adapter(str(a), adapter_name="a")),
        ("load b", lambda m: m.load_adapter(str(b), adapter_name="b")),
        ("set a", lambda m: m.set_adapter("a")),
        ("set both", lambda m: m.set_adapter(["a", "b"])),
        ("disable", lambda m: m.disable_adapters()),
        ("enable", lambda m: m.enable_adapters()),
        ("set b", lambda m: m.set_adapter("b")),
        ("delete a", lambda m: m.delete_adapter("a")),
    ]
    for what, call in steps:
        call(hf)
        call(ours)
        same_state(hf, ours, arch, what)
        if what == "disable":
            close(logits(ours, ids, mask), base, "disabled adapters give the base model")
    want, got = hf.get_adapter_state_dict(), ours.get_adapter_state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    hf.delete_adapter("b")
    ours.delete_adapter("b")
    assert not ours._hf_peft_config_loaded and not hasattr(ours, "peft_config")
    close(logits(ours, ids, mask), base, "all adapters deleted")
    same_state(hf, ours, arch, "delete b")


@pytest.mark.parametrize("arch_name", ["phimoe", "jetmoe"])
def test_add_adapter_and_save_pretrained_round_trip_through_transformers(arch_name, tmp_path):
    """add_adapter starts the same adapter as Transformers' (the same draws, in the same module
    order); save_pretrained writes Transformers' adapter files, and each library loads the other's."""
    arch = ARCHS[arch_name]
    hf, ours = make_pair(arch, tmp_path, seed=3)
    for model in (hf, ours):
        torch.manual_seed(11)
        model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                          target_modules=TARGETS[arch_name][0]), adapter_name="mine")
    same_state(hf, ours, arch, "added")
    assert ours.training is False and trainable(ours)  # added for training: its weights require grad
    with torch.no_grad():  # a trained adapter: not the initial draws
        for model in (hf, ours):
            g = torch.Generator().manual_seed(12)
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
    hf.save_pretrained(tmp_path / "s_hf")
    ours.save_pretrained(tmp_path / "s_ours")
    assert sorted(os.listdir(tmp_path / "s_ours")) == sorted(os.listdir(tmp_path / "s_hf"))
    got, want = load_file(tmp_path / "s_ours/adapter_model.safetensors"), load_file(tmp_path / "s_hf/adapter_model.safetensors")
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    config = json.loads((tmp_path / "s_ours/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "hf")  # the model it was added to

    hf2, ours2 = make_pair(arch, tmp_path / "again", seed=3)
    hf2.load_adapter(str(tmp_path / "s_ours"))
    ours2.load_adapter(tmp_path / "s_hf")
    same_state(hf2, ours2, arch, "reloaded")
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 7, "left", seed=5)
    ours.eval()
    close(logits(ours2, ids, mask), logits(ours, ids, mask), "reloaded adapter")


@pytest.mark.parametrize("arch_name", ["phimoe", "jetmoe"])
def test_hotswap_replaces_an_adapter_as_a_fresh_load_would(arch_name, tmp_path):
    arch = ARCHS[arch_name]
    hf, ours = make_pair(arch, tmp_path, seed=3)
    first = make_adapter(hf, tmp_path / "first", arch_name, seed=4, r=4, alpha=8)
    same_rank = make_adapter(hf, tmp_path / "same", arch_name, seed=5, r=4, alpha=16)
    higher = make_adapter(hf, tmp_path / "higher", arch_name, seed=6, r=8, alpha=4)
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 7, "left", seed=5)

    def fresh(path):
        _, model = make_pair(arch, tmp_path / f"fresh-{path.name}", seed=3)
        model.load_adapter(path)
        return logits(model, ids, mask)

    ours.load_adapter(first)
    before = [p.data_ptr() for p in ours.parameters()]
    ours.load_adapter(same_rank, hotswap=True)
    assert [p.data_ptr() for p in ours.parameters()] == before  # in place
    want = fresh(same_rank)
    close(logits(ours, ids, mask), want, "hotswapped, same rank")
    # Transformers' hotswap copies the weights and keeps the first adapter's scaling (alpha / r), so
    # its logits are not the new adapter's (docs/differences.md)
    hf.load_adapter(str(first))
    hf.load_adapter(str(same_rank), adapter_name="default", hotswap=True)
    assert not torch.allclose(logits(hf, ids, mask), want, atol=1e-3)

    _, ours = make_pair(arch, tmp_path / "padded", seed=3)
    ours.enable_peft_hotswap(target_rank=8)
    ours.load_adapter(first)
    close(logits(ours, ids, mask), fresh(first), "first adapter, padded to rank 8")
    ours.load_adapter(higher, adapter_name="default")  # hotswap is the default once enabled
    assert list(ours.peft_config) == ["default"]
    close(logits(ours, ids, mask), fresh(higher), "hotswapped, higher rank")
    with pytest.raises(RuntimeError, match="before loading the first adapter"):
        ours.enable_peft_hotswap(target_rank=8)

    # What is saved after a swap, padded or not, reloads as the model runs: the config of the
    # adapter swapped in, at the padded rank with its alpha grown alike (alpha / r kept)
    ours.save_pretrained(tmp_path / "saved-higher")
    close(fresh(tmp_path / "saved-higher"), logits(ours, ids, mask), "the swapped, padded adapter saved and reloaded")
    _, padded = make_pair(arch, tmp_path / "padded-only", seed=3)
    padded.enable_peft_hotswap(target_rank=8)
    padded.load_adapter(first)
    padded.save_pretrained(tmp_path / "saved-first")
    saved = json.loads((tmp_path / "saved-first" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"]) == (8, 16)
    close(fresh(tmp_path / "saved-first"), fresh(first), "the padded first adapter saved and reloaded")
    _, swapped = make_pair(arch, tmp_path / "swapped", seed=3)
    swapped.load_adapter(first)
    swapped.load_adapter(same_rank, hotswap=True)
    swapped.save_pretrained(tmp_path / "saved-same")
    close(fresh(tmp_path / "saved-same"), want, "the swapped adapter saved and reloaded")


def test_sequence_classifier_adapter_with_modules_to_save_loads_as_in_transformers(tmp_path):
    hf, ours = make_pair(PHIMOE, tmp_path, head="seq_cls", seed=3)
    torch.manual_seed(4)
    made = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj"], task_type="SEQ_CLS"))
    with torch.no_grad():
        made.base_model.model.score.modules_to_save["default"].weight.normal_()
    made.save_pretrained(tmp_path / "adapter")
    hf.load_adapter(str(tmp_path / "adapter"))
    ours.load_adapter(tmp_path / "adapter")
    same_state(hf, ours, PHIMOE, "classifier", same_trainable=False)
    # Loaded for inference, the whole adapter is frozen, the saved classifier copy included. Transformers
    # freezes the adapter layers and leaves that copy trainable (docs/differences.md).
    assert trainable(ours) == [] and trainable(hf) == ["score.modules_to_save.default.weight"]
    ids, mask = make_inputs(PHIMOE.base["vocab_size"], 2, 7, "left", seed=5)
    close(logits(ours, ids, mask), logits(made.eval(), ids, mask), "PEFT's own model")
    # enable_adapters brings the saved classifier copy back too (Transformers' leaves it off:
    # docs/differences.md)
    ours.disable_adapters()
    ours.enable_adapters()
    close(logits(ours, ids, mask), logits(made.eval(), ids, mask), "disabled, then enabled again")


def test_bad_adapter_calls_are_errors_that_name_the_problem(tmp_path, monkeypatch):
    hf, ours = make_pair(PHIMOE, tmp_path, seed=3)
    for call in (lambda: ours.set_adapter("a"), ours.disable_adapters, ours.enable_adapters, ours.active_adapters,
                 ours.get_adapter_state_dict, lambda: ours.delete_adapter("a")):
        with pytest.raises(ValueError, match="no adapter loaded"):
            call()
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        ours.load_adapter("someone/some-adapter")
    with pytest.raises(ValueError, match="no adapter_config.json"):
        ours.load_adapter(tmp_path / "hf")
    with pytest.raises(ValueError, match="peft_config together with adapter_state_dict"):
        ours.load_adapter(peft_config=peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="unknown keyword arguments"):
        ours.load_adapter(tmp_path / "hf", revsion="main")
    with pytest.raises(ValueError, match="no adapter named 'default' is loaded"):
        ours.load_adapter(make_adapter(hf, tmp_path / "a", "phimoe", seed=4), hotswap=True)
    with pytest.raises(ValueError, match="prompt-learning"):
        ours.add_adapter(peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    with pytest.raises(TypeError, match="PEFT config"):
        ours.add_adapter({"r": 4})
    assert not ours._hf_peft_config_loaded  # nothing was put into the model

    ours.load_adapter(tmp_path / "a")
    with pytest.raises(ValueError, match="already loaded"):
        ours.load_adapter(tmp_path / "a")
    with pytest.raises(ValueError, match="no adapter named 'b'"):
        ours.set_adapter(["default", "b"])
    with pytest.raises(ValueError, match="no adapter named 'b'"):
        ours.delete_adapter("b")
    with pytest.raises(ValueError, match="get_adapter_state_dict: no adapter named 'b'"):
        ours.get_adapter_state_dict("b")
    with pytest.raises(ValueError, match="check_compiled must be"):
        ours.enable_peft_hotswap(check_compiled="loud")
    ours.load_adapter(tmp_path / "a", adapter_name="two")
    ours.set_adapter(["default", "two"])
    with pytest.raises(ValueError, match="save one at a time"):
        ours.save_pretrained(tmp_path / "both")

    # weights that fit no adapter layer are reported, not dropped silently
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["phimoe"][0])
    state = dict(load_file(tmp_path / "a/adapter_model.safetensors"))
    state["base_model.model.model.layers.0.self_attn.nowhere.lora_A.weight"] = torch.zeros(4, 4)
    info = ours.load_adapter(peft_config=config, adapter_state_dict=state, adapter_name="three")
    assert info["unexpected_keys"] == ["model.layers.0.self_attn.nowhere.lora_A.weight"]  # as in the file
    info = ours.load_adapter(peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
                             adapter_state_dict=state, adapter_name="four")
    assert len(info["unexpected_keys"]) == 5  # v_proj's weights too: this config adapts q_proj alone
    info = ours.load_adapter(peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "k_proj"]),
                             adapter_state_dict=state, adapter_name="six")
    assert sorted(info["missing_keys"]) == [f"model.layers.{i}.self_attn.k_proj.lora_{ab}.six.weight"
                                            for i in range(PHIMOE.base["num_hidden_layers"]) for ab in "AB"]

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match="pip install peft"):
        ours.load_adapter(tmp_path / "a", adapter_name="seven")


def test_adapter_edge_cases_left_no_trace(tmp_path):
    """An adapter whose target modules match nothing leaves no name behind (set_adapter would run
    the base model, a retry would be "already loaded"); after PEFT's prompt-learning generate
    raised, the base model still generates; PEFT's per-row adapters (`adapter_names`) generate
    left-padded prompts with a static cache as Transformers + PEFT do."""
    hf, ours = make_pair(JETMOE, tmp_path, seed=3)
    first = make_adapter(hf, tmp_path / "a", "jetmoe", seed=4)
    ours.load_adapter(first, adapter_name="a")
    with pytest.raises(ValueError):
        ours.add_adapter(peft.LoraConfig(r=4, target_modules=["nonexistent"]), adapter_name="bad")
    assert list(ours.peft_config) == ["a"]
    with pytest.raises(ValueError):
        ours.set_adapter("bad")
    ours.add_adapter(peft.LoraConfig(r=4, target_modules=["kv_proj"]), adapter_name="bad")  # the name is free
    assert list(ours.peft_config) == ["a", "bad"]

    _, base = make_pair(JETMOE, tmp_path / "prompt", seed=3)
    wrapped = peft.get_peft_model(base, peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    ids, _ = make_inputs(JETMOE.base["vocab_size"], 1, 4, None, seed=5)
    with pytest.raises(NotImplementedError, match="virtual tokens"):
        wrapped.generate(input_ids=ids, max_new_tokens=2)
    assert wrapped.get_base_model().generate(input_ids=ids, max_new_tokens=2, do_sample=False).shape == (1, 6)

    hf, ours = make_pair(JETMOE, tmp_path / "rows", seed=3)
    second = make_adapter(hf, tmp_path / "b", "jetmoe", seed=5)
    wrapped = []
    for model in (hf, ours):
        w = peft.PeftModel.from_pretrained(model, str(first))
        w.load_adapter(str(second), adapter_name="b")
        wrapped.append(w)
    ids, mask = make_inputs(JETMOE.base["vocab_size"], 3, 6, "left", seed=6)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
              adapter_names=["default", "b", "__base__"], cache_implementation="static")
    assert torch.equal(wrapped[1].generate(input_ids=ids, **kw), wrapped[0].generate(input_ids=ids, **kw))


def _lora(hf, directory, seed: int, **config):
    """A LoRA adapter of `config` with random weights, made by PEFT on a copy of Transformers' model."""
    torch.manual_seed(seed)
    made = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM",
                                                                  **config))
    made.save_pretrained(directory)
    return directory


def test_hotswap_of_embedding_lora_and_rank_patterns_and_what_cannot_be_padded(tmp_path):
    """A LoRA on the embeddings (its file also holds the embeddings' weights, and PEFT keeps its
    weights as parameters) and a rank_pattern after enable_peft_hotswap both failed to swap; an
    adapter on the experts' stacked weights (target_parameters), which PEFT cannot pad, was half
    padded and its config misdescribed its weights: now an error before anything changes."""
    hf, ours = make_pair(JETMOE, tmp_path, seed=3)
    ids, mask = make_inputs(JETMOE.base["vocab_size"], 2, 7, "left", seed=5)

    def fresh(path):
        _, model = make_pair(JETMOE, tmp_path / f"fresh-{path.name}", seed=3)
        model.load_adapter(path)
        return logits(model, ids, mask)

    embed = dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "kv_proj"])
    first, second = _lora(hf, tmp_path / "e1", 1, **embed), _lora(hf, tmp_path / "e2", 2, **embed)
    lower = _lora(hf, tmp_path / "e3", 3, **{**embed, "r": 2, "lora_alpha": 6})
    head = dict(r=4, lora_alpha=8, target_modules=["lm_head", "kv_proj"])  # JetMoE ties the head to the embeddings
    h1, h2 = _lora(hf, tmp_path / "h1", 4, **head), _lora(hf, tmp_path / "h2", 5, **head)
    ours.load_adapter(first)
    ours.load_adapter(second, hotswap=True)
    close(logits(ours, ids, mask), fresh(second), "embedding LoRA hotswapped")
    hf.load_adapter(str(first))
    hf.load_adapter(str(second), adapter_name="default", hotswap=True)
    close(logits(ours, ids, mask), logits(hf, ids, mask), "Transformers' hotswap of the same rank")
    _, tied = make_pair(JETMOE, tmp_path / "tied", seed=3)
    tied.load_adapter(h1)
    tied.load_adapter(h2, hotswap=True)
    close(logits(tied, ids, mask), fresh(h2), "LoRA on the tied head hotswapped")
    _, padded = make_pair(JETMOE, tmp_path / "padded", seed=3)
    padded.enable_peft_hotswap(target_rank=8)
    padded.load_adapter(first)
    before = [p.data_ptr() for p in padded.parameters()]
    padded.load_adapter(lower, adapter_name="default")  # (hotswap: the default once enabled)
    assert [p.data_ptr() for p in padded.parameters()] == before  # in place
    close(logits(padded, ids, mask), fresh(lower), "embedding LoRA of a lower rank, hotswapped into the padded one")

    hf, ours = make_pair(PHIMOE, tmp_path / "phi", seed=3)
    ids, mask = make_inputs(PHIMOE.base["vocab_size"], 2, 7, "left", seed=5)
    pattern = dict(r=2, lora_alpha=8, rank_pattern={"q_proj": 3}, target_modules=["q_proj", "v_proj"])
    a, b = _lora(hf, tmp_path / "p1", 1, **pattern), _lora(hf, tmp_path / "p2", 2, **pattern)
    ours.enable_peft_hotswap(target_rank=8)
    ours.load_adapter(a)
    ours.load_adapter(b, adapter_name="default")  # failed: the padded config's alpha_pattern was compared with the file's
    _, plain = make_pair(PHIMOE, tmp_path / "plain", seed=3)
    plain.load_adapter(b)
    close(logits(ours, ids, mask), logits(plain, ids, mask), "rank_pattern adapter hotswapped into the padded one")
    # an adapter of the padded rank itself, with a rank_pattern: its saved config describes the padded weights
    full = dict(r=8, lora_alpha=8, rank_pattern={"q_proj": 3}, target_modules=["q_proj", "v_proj"])
    c = _lora(hf, tmp_path / "p3", 3, **full)
    ours.load_adapter(c, adapter_name="default")
    ours.save_pretrained(tmp_path / "p3-saved")
    _, reloaded = make_pair(PHIMOE, tmp_path / "reloaded", seed=3)
    reloaded.load_adapter(tmp_path / "p3-saved")
    _, plain = make_pair(PHIMOE, tmp_path / "plain3", seed=3)
    plain.load_adapter(c)
    close(logits(reloaded, ids, mask), logits(plain, ids, mask), "the swapped rank_pattern adapter saved and reloaded")

    _, experts = make_pair(PHIMOE, tmp_path / "experts", seed=3)
    base = logits(experts, ids, mask)
    experts.enable_peft_hotswap(target_rank=8)
    stacked = _lora(hf, tmp_path / "x1", 1, r=2, lora_alpha=4, target_modules=[],
                    target_parameters=["experts.gate_up_proj"])
    with pytest.raises(ValueError, match=r"PEFT cannot pad the experts' stacked weights that target_parameters "
                                         r"\['experts.gate_up_proj'\] names"):
        experts.load_adapter(stacked)
    assert not experts._hf_peft_config_loaded and torch.equal(logits(experts, ids, mask), base)


def test_a_failed_load_leaves_the_model_as_it_was_and_set_adapter_skips_saved_copies_it_lacks(tmp_path):
    """An adapter whose weights do not fit (made on a wider model) was left injected and active with
    random weights, and blocked a retry; set_adapter raised (after switching) where only another
    adapter has a saved module copy (modules_to_save), where PEFT's own set_adapter switches."""
    hf, ours = make_pair(PHIMOE, tmp_path, seed=3)
    ids, mask = make_inputs(PHIMOE.base["vocab_size"], 2, 7, "left", seed=5)
    wide, _ = make_pair(PHIMOE, tmp_path / "wide", seed=3, hidden_size=48)
    bad = _lora(wide, tmp_path / "bad", 1, r=2, lora_alpha=4, target_modules=["q_proj"])
    good = _lora(hf, tmp_path / "good", 2, r=2, lora_alpha=4, target_modules=["q_proj"])
    base = logits(ours, ids, mask)
    modules = [(n, type(m)) for n, m in ours.named_modules()]
    with pytest.raises(RuntimeError, match="size mismatch"):
        ours.load_adapter(bad)
    assert not ours._hf_peft_config_loaded and torch.equal(logits(ours, ids, mask), base)
    assert [(n, type(m)) for n, m in ours.named_modules()] == modules  # no LoRA wrapper left behind
    ours.save_pretrained(tmp_path / "saved-base")  # a plain checkpoint, which loads
    reloaded = type(ours).from_pretrained(tmp_path / "saved-base", attn_implementation="eager")  # (as make_pair's)
    close(logits(reloaded, ids, mask), base, "saved after the failed load")
    ours.load_adapter(good)
    with_good, frozen = logits(ours, ids, mask), trainable(ours)
    with pytest.raises(RuntimeError, match="size mismatch"):
        ours.load_adapter(bad, adapter_name="other")
    assert list(ours.peft_config) == ["default"] and ours.active_adapters() == ["default"]
    assert trainable(ours) == frozen == []  # the adapter loaded for inference stays frozen
    close(logits(ours, ids, mask), with_good, "the adapter loaded before, still active")

    saved = _lora(hf, tmp_path / "saved", 3, r=2, lora_alpha=4, target_modules=["v_proj"],
                  modules_to_save=["lm_head"])
    plain = _lora(hf, tmp_path / "plain", 4, r=2, lora_alpha=4, target_modules=["v_proj"])
    _, ours = make_pair(PHIMOE, tmp_path / "two", seed=3)
    ours.load_adapter(saved, adapter_name="a")
    ours.load_adapter(plain, adapter_name="b")
    ours.set_adapter("b")
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(saved), adapter_name="a")
    reference.load_adapter(str(plain), adapter_name="b")
    reference.set_adapter("b")
    assert ours.active_adapters() == ["b"]
    close(logits(ours, ids, mask), logits(reference.eval(), ids, mask), "PEFT's set_adapter('b')")
    ours.set_adapter("a")
    reference.set_adapter("a")
    close(logits(ours, ids, mask), logits(reference.eval(), ids, mask), "PEFT's set_adapter('a')")
