"""PEFT adapters on moetorch models, against the same adapters on Transformers' models.

An adapter is made on one library's model, saved, and loaded by PEFT onto the other library's
model with the same base weights: the losses, logits, adapter gradients and generated tokens must
agree. Merged adapters must load in Transformers as plain checkpoints."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers
from archs import JETMOE, PHIMOE
from parity import close, compare_outputs, make_inputs, make_pair

import moetorch
from moetorch.ops import fused

ARCHS = {"phimoe": PHIMOE, "jetmoe": JETMOE}
# Linear modules each architecture's adapters wrap on both sides. Transformers' PhiMoE router
# returns a tuple from its forward, which PEFT's layers cannot wrap, so it is tested on moetorch's
# side alone (test_merged_adapter_loads_in_transformers).
TARGETS = {"phimoe": ["q_proj", "k_proj", "v_proj", "o_proj"], "jetmoe": ["kv_proj", "layer"]}
EXPERT_PARAMS = {
    "phimoe": ["experts.gate_up_proj", "experts.down_proj"],
    "jetmoe": ["input_linear.weight", "output_linear.weight"],
}


def adapter_config(method: str, arch: str):
    if method == "ia3":
        return peft.IA3Config(target_modules=TARGETS[arch], feedforward_modules=[], task_type="CAUSAL_LM")
    kw = dict(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM")  # random B: a real delta
    if method == "lora_experts":
        return peft.LoraConfig(target_modules=[], target_parameters=EXPERT_PARAMS[arch], **kw)
    return peft.LoraConfig(target_modules=TARGETS[arch], use_dora=method == "dora", **kw)


def with_adapter(model, method: str, arch: str, seed: int = 0):
    torch.manual_seed(seed)
    wrapped = peft.get_peft_model(model, adapter_config(method, arch))
    g = torch.Generator().manual_seed(seed)
    for name, p in wrapped.named_parameters():
        if p.requires_grad and "ia3_l" in name:  # IA3 starts at ones, which changes nothing
            with torch.no_grad():
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return wrapped


def step(model, ids, mask):
    """(loss, logits, adapter gradients) of one training forward and backward. Seeded: PhiMoE's
    training router (sparsemixer) draws, the same draws in both libraries."""
    model.train()
    model.zero_grad()
    torch.manual_seed(7)
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


@pytest.mark.parametrize("method", ["lora", "dora", "lora_experts", "ia3"])
@pytest.mark.parametrize("direction", ["hf_to_ours", "ours_to_hf"])
@pytest.mark.parametrize("arch_name", ["phimoe", "jetmoe"])
def test_adapter_matches_transformers(arch_name, direction, method, tmp_path):
    arch = ARCHS[arch_name]
    hf, ours = make_pair(arch, tmp_path, seed=3)
    source, target = (hf, ours) if direction == "hf_to_ours" else (ours, hf)
    made = with_adapter(source, method, arch_name, seed=4)
    made.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    loaded = peft.PeftModel.from_pretrained(target, tmp_path / "adapter", is_trainable=True)
    hf_peft, our_peft = (made, loaded) if source is hf else (loaded, made)

    ids, mask = make_inputs(arch.base["vocab_size"], 3, 9, "left", seed=5)
    a, ga = step(hf_peft, ids, mask)
    b, gb = step(our_peft, ids, mask)
    compare_outputs(a, b, mask, fields=("logits", "loss"))
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        close(gb[name], ga[name], f"grad {name}", atol=1e-5, rtol=1e-4)

    prompt, pmask = make_inputs(arch.base["vocab_size"], 2, 6, "left", seed=6)
    kw = dict(attention_mask=pmask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    hf_peft.eval()
    our_peft.eval()
    want = hf_peft.generate(input_ids=prompt, **kw)
    for cache in (None, "static"):
        got = our_peft.generate(input_ids=prompt, cache_implementation=cache, **kw)
        assert torch.equal(got, want), cache


# Everything each architecture's fused inference kernels read a weight of: the attention projections,
# the routers, the experts. Only moetorch's PhiMoE router can be wrapped (see TARGETS).
EVERY_TARGET = {"phimoe": [*TARGETS["phimoe"], "router"], "jetmoe": TARGETS["jetmoe"]}


def every_target_adapter(model, arch: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                          target_modules=EVERY_TARGET[arch], target_parameters=EXPERT_PARAMS[arch])
    return peft.get_peft_model(model, cfg)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("arch_name", ["phimoe", "jetmoe"])
def test_fused_kernels_leave_wrapped_layers_to_their_wrappers(arch_name, cache):
    """At inference on a GPU, kernels that read a layer's weight stand in for the layer's call (the
    q/k/v GEMV, the norm + router kernel, the kv + map kernel at one token). A layer that PEFT wraps
    exposes its base weight but computes more: the kernels must leave it to its call. Run here under
    the interpreter: the fused decode gives the torch path's tokens and scores."""
    arch = ARCHS[arch_name]
    torch.manual_seed(0)
    model = arch.ours["causal_lm"](arch.our_config()).eval()
    wrapped = every_target_adapter(model, arch_name, seed=1).eval()
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 6, "left", seed=7)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    if cache == "static":
        kw["cache_implementation"] = "static"
    want = wrapped.generate(input_ids=ids, **kw)
    with fused.forced():
        got = wrapped.generate(input_ids=ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        close(a, b, "decode scores", atol=1e-4, rtol=1e-4)
    # the adapter changes the tokens: a kernel that skipped it would have been seen
    base = copy.deepcopy(wrapped).unload().generate(input_ids=ids, **kw)
    assert not all(torch.equal(a, b) for a, b in zip(base.scores, want.scores))


@pytest.mark.parametrize("arch_name", ["phimoe", "jetmoe"])
def test_merged_adapter_loads_in_transformers(arch_name, tmp_path):
    """merge_and_unload gives back moetorch's model with the adapter in its weights (the PhiMoE
    router's and the experts' too); saved, Transformers loads it and computes the same logits."""
    arch = ARCHS[arch_name]
    torch.manual_seed(0)
    model = arch.ours["causal_lm"](arch.our_config()).eval()
    wrapped = every_target_adapter(model, arch_name, seed=2).eval()
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 8, "right", seed=8)
    with torch.no_grad():
        want = wrapped(input_ids=ids, attention_mask=mask).logits
        merged = wrapped.merge_and_unload()
        assert type(merged) is arch.ours["causal_lm"]
        assert not any("lora" in n for n, _ in merged.named_parameters())
        close(merged(ids, attention_mask=mask).logits, want, "merged logits", atol=1e-5, rtol=1e-4)
        merged.save_pretrained(tmp_path / "merged")
        hf = arch.hf["causal_lm"].from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
        got = hf(ids, attention_mask=mask).logits
    real = mask.bool()
    close(got[real], want[real], "Transformers' logits of the merged checkpoint", atol=1e-5, rtol=1e-4)


def _same_inputs(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, w in want.items():
        g = got[key]
        if isinstance(w, torch.Tensor):
            assert isinstance(g, torch.Tensor) and torch.equal(g, w), key
            assert g.is_contiguous() == w.is_contiguous(), key
        elif isinstance(w, transformers.Cache):
            assert isinstance(g, moetorch.Cache), key
        else:
            assert g == w, key


@pytest.mark.parametrize("arch_name", ["phimoe", "jetmoe"])
def test_prepare_inputs_for_generation_matches_transformers(arch_name, tmp_path):
    arch = ARCHS[arch_name]
    hf, ours = make_pair(arch, tmp_path)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 97, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    embeds = torch.randn(2, 7, arch.base["hidden_size"], generator=g)
    positions = torch.arange(7).expand(2, 7)
    cases = [
        dict(),
        dict(attention_mask=mask, use_cache=True, labels=ids, output_attentions=True),
        dict(next_sequence_length=1, attention_mask=mask, position_ids=positions, caches=True),
        dict(next_sequence_length=3, position_ids=positions[:, -3:], logits_to_keep=1),
        dict(inputs_embeds=embeds, is_first_iteration=True, attention_mask=mask),
        dict(inputs_embeds=embeds, is_first_iteration=True, next_sequence_length=4),
        dict(inputs_embeds=embeds, is_first_iteration=False, next_sequence_length=1, caches=True),
    ]
    for case in cases:
        case = dict(case)
        caches = case.pop("caches", False)
        want = hf.prepare_inputs_for_generation(
            ids, **case, **({"past_key_values": transformers.DynamicCache()} if caches else {}))
        got = ours.prepare_inputs_for_generation(
            ids, **case, **({"past_key_values": moetorch.DynamicCache()} if caches else {}))
        _same_inputs(got, want)
    cache = moetorch.DynamicCache()
    assert ours.prepare_inputs_for_generation(ids, past_key_values=cache)["past_key_values"] is cache
    if arch_name == "phimoe":
        # Transformers' PhiMoE drops a cache of at most original_max_position_embeddings tokens once
        # the ids reach past it (the LongRoPE switch); a longer cache, or shorter ids, stay
        for omax, cached in [(6, 4), (6, 6), (6, 7), (8, 4)]:
            hf.config.original_max_position_embeddings = ours.config.original_max_position_embeddings = omax
            caches = []
            for cache in (transformers.DynamicCache(), moetorch.DynamicCache()):
                for layer in range(arch.base["num_hidden_layers"]):
                    kv = torch.zeros(2, arch.base["num_key_value_heads"], cached, 8)
                    cache.update(kv, kv, layer)
                caches.append(cache)
            want = hf.prepare_inputs_for_generation(ids, next_sequence_length=1, past_key_values=caches[0])
            got = ours.prepare_inputs_for_generation(ids, next_sequence_length=1, past_key_values=caches[1])
            _same_inputs(got, want)
            assert ("past_key_values" in got) == (omax >= 7 or cached > omax)
    # the forward takes what it returns
    ours(**ours.prepare_inputs_for_generation(ids, attention_mask=mask, use_cache=True, labels=ids))


@pytest.mark.parametrize("arch_name", ["phimoe", "jetmoe"])
def test_prompt_tuning_trains_as_in_transformers_and_generate_says_it_cannot(arch_name, tmp_path):
    """Prompt tuning puts its virtual tokens in front of the embeddings in the forward, which
    matches Transformers; generating, PEFT adds them in prepare_inputs_for_generation, which
    moetorch's generate does not call: an error that says so, not tokens without the prompt."""
    arch = ARCHS[arch_name]
    hf, ours = make_pair(arch, tmp_path)
    cfg = peft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    runs = []
    for model in (hf, ours):
        torch.manual_seed(0)
        runs.append(step(peft.get_peft_model(model, copy.deepcopy(cfg)), *make_inputs(97, 2, 6, "left", seed=2)))
    (a, ga), (b, gb) = runs
    close(b.loss, a.loss, "loss")
    close(b.logits, a.logits, "logits", atol=1e-5, rtol=1e-4)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        close(gb[name], ga[name], f"grad {name}", atol=1e-5, rtol=1e-4)
    wrapped = peft.get_peft_model(arch.ours["causal_lm"](arch.our_config()), cfg)
    with pytest.raises(NotImplementedError, match="PROMPT_TUNING.*prepare_inputs_for_generation"):
        wrapped.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2)


def test_generate_refuses_a_prepare_inputs_for_generation_it_would_ignore():
    class Custom(moetorch.PhimoeForCausalLM):
        def prepare_inputs_for_generation(self, input_ids, **kwargs):
            return super().prepare_inputs_for_generation(input_ids[:, -1:], **kwargs)

    torch.manual_seed(0)
    model = Custom(PHIMOE.our_config()).eval()
    with pytest.raises(NotImplementedError, match="Custom overrides prepare_inputs_for_generation"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)
    plain = moetorch.PhimoeForCausalLM(PHIMOE.our_config()).eval()
    plain.prepare_inputs_for_generation = lambda input_ids, **kw: {"input_ids": input_ids}
    with pytest.raises(NotImplementedError, match="was replaced"):
        plain.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)
    del plain.prepare_inputs_for_generation
    assert plain.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2).shape == (1, 5)


def test_transformers_trainer_fine_tunes_a_lora_adapter_that_transformers_loads(tmp_path):
    """The common fine-tuning script: Transformers' Trainer on a PEFT model, with the model class
    imported from moetorch. Its checkpoint holds the adapter alone, and the adapter on Transformers'
    model gives the trained model's logits."""
    arch = JETMOE
    hf, ours = make_pair(arch, tmp_path, seed=1)
    model = peft.get_peft_model(ours, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["jetmoe"],
                                                      task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": (t := torch.randint(1, 97, (10,), generator=g).tolist()), "labels": t} for _ in range(8)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="steps", save_steps=3, logging_steps=1)
    transformers.Trainer(model=model, args=args, train_dataset=rows).train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").exists()
    assert not (checkpoint / "model.safetensors").exists()
    ids = torch.tensor([r["input_ids"] for r in rows[:2]])
    model.eval()
    hf_model = peft.PeftModel.from_pretrained(hf, checkpoint).eval()
    with torch.no_grad():
        want, got = hf_model(input_ids=ids).logits, model(input_ids=ids).logits
        base = hf_model.get_base_model()
        with hf_model.disable_adapter():
            untrained = base(ids).logits
    close(got, want, "trained logits", atol=1e-5, rtol=1e-4)
    assert not torch.allclose(untrained, want, atol=1e-3)  # training moved the adapter


@pytest.mark.parametrize("arch_name", ["phimoe", "jetmoe"])
def test_sequence_classification_adapter_trains_its_score_as_in_transformers(arch_name, tmp_path):
    """task_type="SEQ_CLS": PEFT trains a copy of the classifier (`score`, modules_to_save) beside
    the LoRA layers; both libraries give the same loss, logits and gradients."""
    arch = ARCHS[arch_name]
    hf, ours = make_pair(arch, tmp_path, head="seq_cls", num_labels=3)
    cfg = peft.LoraConfig(r=4, target_modules=TARGETS[arch_name], task_type="SEQ_CLS", init_lora_weights=False)
    ids, mask = make_inputs(arch.base["vocab_size"], 3, 7, "left", seed=3)
    runs = []
    for model in (hf, ours):
        torch.manual_seed(0)
        wrapped = peft.get_peft_model(model, copy.deepcopy(cfg)).train()
        torch.manual_seed(1)
        out = wrapped(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2, 1]))
        out.loss.backward()
        runs.append((out, {n: p.grad for n, p in wrapped.named_parameters() if p.requires_grad}))
    (a, ga), (b, gb) = runs
    close(b.loss, a.loss, "loss")
    close(b.logits, a.logits, "logits", atol=1e-5, rtol=1e-4)
    assert ga.keys() == gb.keys() and any("modules_to_save" in n for n in ga)
    for name in ga:
        close(gb[name], ga[name], f"grad {name}", atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("reentrant", [False, True])
def test_adapter_gradients_through_checkpointed_layers(reentrant):
    """LoRA behind frozen embeddings with activation checkpointing (as Transformers' Trainer runs it
    with gradient_checkpointing=True): the adapter's gradients are those without checkpointing, a
    reentrant checkpoint included (it needs the embeddings' output to require gradients)."""
    grads = []
    ids, mask = make_inputs(JETMOE.base["vocab_size"], 2, 7, "left", seed=4)
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = with_adapter(JETMOE.ours["causal_lm"](JETMOE.our_config()), "lora", "jetmoe", seed=2)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        grads.append(step(model, ids, mask)[1])
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert grads[1][name].abs().sum() > 0, name
        close(grads[1][name], grads[0][name], f"grad {name}", atol=1e-6, rtol=1e-5)


def test_a_model_with_adapter_layers_keeps_no_graphs_between_calls():
    """generate keeps its static cache and graphs between calls under a key of the weights'
    addresses. Switching an adapter off, merging or swapping it changes no address, so graphs held
    from before would replay the old computation: a model with PEFT's layers (any module of
    another library) captures anew each call. Each call gives the scores of the model as it is."""
    torch.manual_seed(0)
    model = JETMOE.ours["causal_lm"](JETMOE.our_config()).eval()
    ids = torch.tensor([[5, 6, 7, 8]])

    def scores(m):  # recorded by a processor: the call keeps the path that holds graphs
        seen = []
        m.generate(input_ids=ids, max_new_tokens=5, do_sample=False, cache_implementation="static",
                   logits_processor=[lambda _, s: seen.append(s.clone()) or s])
        return torch.stack(seen)

    plain = scores(model)
    assert model._held_decode().cache is not None  # a plain model holds its cache and graphs
    wrapped = with_adapter(model, "lora", "jetmoe", seed=1).eval()
    adapted = scores(wrapped)
    assert model._held_decode().cache is None
    assert not torch.allclose(adapted, plain, atol=1e-3)
    with wrapped.disable_adapter():
        close(scores(wrapped), plain, "adapter off", atol=1e-5, rtol=1e-5)
    close(scores(wrapped), adapted, "adapter on", atol=1e-5, rtol=1e-5)
    wrapped.merge_adapter()
    close(scores(wrapped), adapted, "merged", atol=1e-5, rtol=1e-4)
    wrapped.unmerge_adapter()
    with wrapped.disable_adapter():
        close(scores(wrapped), plain, "unmerged, off", atol=1e-5, rtol=1e-4)
