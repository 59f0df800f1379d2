"""The Transformers-style surface: outputs, flags, argument errors, embeddings resizing, gradient
checkpointing, and a decode step that never reads a device value back to the host."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
import torch.nn.functional as F
import transformers
from archs import ARCH_IDS, ARCHS, PHIMOE, randomize_
from parity import close, make_inputs

import moetorch
from moetorch import DynamicCache, StaticCache
from moetorch.ops import moe


def tiny(arch, seed=0, head="causal_lm", **overrides):
    model = arch.ours[head](arch.our_config(**overrides))
    randomize_(model, seed)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@torch.no_grad()
def test_outputs_by_attribute_key_and_index(arch):
    model = tiny(arch)
    ids, _ = make_inputs(arch.base["vocab_size"], 2, 5, None)
    out = model(ids, labels=ids, output_router_logits=True)
    assert out["logits"] is out.logits and out[0] is out.loss and out[1] is out.aux_loss and out[2] is out.logits
    assert list(out.keys()) == ["loss", "aux_loss", "logits", "past_key_values", "router_logits"]
    loss, aux, logits, *_ = out.to_tuple()
    as_tuple = model(ids, labels=ids, output_router_logits=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 5
    close(as_tuple[2], logits, "return_dict=False")
    plain = model(ids, use_cache=False)
    assert plain.loss is None and plain.aux_loss is None and plain.router_logits is None
    assert plain[0] is plain.logits and len(plain) == 1
    # rebuilt from a dict of its fields, as Transformers' outputs are (accelerate does this to cast
    # outputs to float32 under mixed precision)
    rebuilt = type(out)({k: v for k, v in out.items()})
    assert list(rebuilt.keys()) == list(out.keys()) and rebuilt.loss is out.loss and rebuilt[2] is out.logits
    with pytest.raises(ValueError, match="no fields \\['scores'\\]"):
        type(out)({"scores": out.logits})


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@torch.no_grad()
def test_config_output_flags_are_defaults(arch):
    model = tiny(arch, output_hidden_states=True, output_router_logits=True, use_cache=False)
    out = model(torch.ones(1, 3, dtype=torch.long))
    assert len(out.hidden_states) == arch.base["num_hidden_layers"] + 1 and out.aux_loss is not None
    assert out.past_key_values is None
    assert model(torch.ones(1, 3, dtype=torch.long), output_hidden_states=False).hidden_states is None


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_argument_errors(arch):
    model = tiny(arch)
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids, inputs_embeds=model.get_input_embeddings()(ids))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="input_ids must have shape"):
        model(torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        model(torch.ones(1, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="past_key_values"):
        model(ids, past_key_values="cache")
    with pytest.raises(ImportError, match="flash"):
        model.set_attn_implementation("flash_attention_2")
    with pytest.raises(ValueError, match="attn_implementation"):
        model.set_attn_implementation("fastest")
    with pytest.raises(TypeError, match="needs a"):
        arch.ours["causal_lm"](object())


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@torch.no_grad()
def test_shape_errors_name_the_argument(arch):
    """Inputs whose shapes do not fit the tokens: an error that names the argument and the shape
    it needs, before anything runs (a mask short of the tokens would otherwise read as all ones)."""
    model = tiny(arch)
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 5, "left")
    bad = {
        "attention_mask": [mask[:, :4], mask[:1], torch.ones(3, 5, dtype=torch.long)],
        "position_ids": [torch.arange(4)[None], torch.arange(5).expand(3, 5), torch.zeros(2, 1, 5, dtype=torch.long)],
        "cache_position": [torch.arange(3), torch.arange(5)[None]],
    }
    for name, values in bad.items():
        for value in values:
            with pytest.raises(ValueError, match=rf"{name} must have shape .*got {re.escape(str(tuple(value.shape)))}"):
                model(ids, **{name: value})
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \[batch, seq, hidden_size\] = \[batch, seq, 32\], got \(5, 32\)"):
        model(inputs_embeds=torch.randn(5, 32))
    # after 5 cached tokens the mask covers 5 + 1: one of 5 is short
    out = model(ids, attention_mask=mask, use_cache=True)
    step = dict(past_key_values=out.past_key_values, input_ids=ids[:, :1])
    with pytest.raises(ValueError, match=r"attention_mask must have shape .* = \[2, 6\] \(the 5 cached tokens"):
        model(**step, attention_mask=mask)
    full = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    assert model(**step, attention_mask=full).logits.shape == (2, 1, arch.base["vocab_size"])
    # the ones that fit: a mask as long as a static cache, position ids shared by the rows
    cache = StaticCache(model.config, max_cache_len=12)
    assert model(ids, attention_mask=F.pad(mask, (0, 7), value=1), past_key_values=cache,
                 position_ids=torch.arange(5)).logits.shape[:2] == (2, 5)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_resize_token_embeddings(arch, tmp_path):
    model = tiny(arch, seed=1)
    V = model.config.vocab_size
    old_emb = model.get_input_embeddings().weight.detach().clone()
    new = model.resize_token_embeddings(V + 5, pad_to_multiple_of=8)
    n = ((V + 5 + 7) // 8) * 8
    assert new.num_embeddings == n and model.config.vocab_size == n
    assert model.get_output_embeddings().out_features == n
    w = model.get_input_embeddings().weight
    assert torch.equal(w[:V], old_emb)
    # drawn about the mean, with 1e-9 times the old rows' covariance: within a few 1e-5 of it
    close(w[V:], old_emb.mean(0, keepdim=True).expand(n - V, -1), "new rows start about the mean", atol=2e-4)
    assert not torch.equal(w[V:], old_emb.mean(0, keepdim=True).expand(n - V, -1))
    assert model(torch.tensor([[n - 1, 1]])).logits.shape == (1, 2, n)
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    again = arch.ours["causal_lm"].from_pretrained(tmp_path)
    assert again.config.vocab_size == n
    small = again.resize_token_embeddings(V - 3)
    assert small.num_embeddings == V - 3
    with pytest.raises(ValueError, match="new_num_tokens"):
        again.resize_token_embeddings(-1)  # (0 gives 0 rows, as in Transformers: test_compat_api.py)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_fine_tuning_helpers_as_transformers(arch, tmp_path):
    """What adapter and Trainer code reads from a model: the memory footprint (Transformers' own
    figure for the same checkpoint), the decoder, the main input's name, gradient checkpointing's
    support, and input embeddings whose output requires gradients behind frozen weights."""
    model = tiny(arch, seed=3)
    model.save_pretrained(tmp_path)
    hf = arch.hf["causal_lm"].from_pretrained(tmp_path)
    assert model.get_memory_footprint() == hf.get_memory_footprint()
    assert model.get_memory_footprint(return_buffers=False) == hf.get_memory_footprint(return_buffers=False)
    assert model.get_decoder() is model.model and model.main_input_name == hf.main_input_name == "input_ids"
    # both models checkpoint (test below); Transformers' JetMoe says it does not
    assert model.supports_gradient_checkpointing
    decoder = arch.ours["model"](model.config)
    model.set_decoder(decoder)
    assert model.get_decoder() is decoder and decoder.get_decoder() is decoder
    with pytest.raises(ValueError, match="decoder itself"):
        decoder.set_decoder(model.model)

    for p in model.parameters():
        p.requires_grad_(False)
    ids, _ = make_inputs(arch.base["vocab_size"], 1, 5, None)

    def embedded_requires_grad():
        return model(ids, output_hidden_states=True).hidden_states[0].requires_grad

    assert not embedded_requires_grad()
    model.enable_input_require_grads()
    model.enable_input_require_grads()  # a second call replaces the hook
    assert embedded_requires_grad()
    model.disable_input_require_grads()
    assert not embedded_requires_grad()


CHECKPOINT_OPTIONS = {
    "default": {},
    "reentrant": {"activation_checkpointing_kwargs": {"use_reentrant": True}},
    "every_2nd": {"every_n_layers": 2},
    "offload": {"offload": True},
}


@pytest.mark.parametrize("options", CHECKPOINT_OPTIONS, ids=list(CHECKPOINT_OPTIONS))
@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_gradient_checkpointing_gives_the_same_gradients(arch, options, monkeypatch):
    """Transformers' activation_checkpointing_enable options: the checkpoint's own arguments (a
    reentrant checkpoint, which follows tensor arguments only, included), every n-th layer from the
    first, and offloading what it saves; the gradients stay those of the plain backward."""
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 6, "left")
    grads, calls = [], []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(k) or checkpoint(*a, **k))
    for ckpt, cache in ((False, None), (True, None), (True, DynamicCache())):
        model = tiny(arch, seed=2, num_hidden_layers=3).train()
        if ckpt:
            model.activation_checkpointing_enable(**CHECKPOINT_OPTIONS[options])
            assert model.is_gradient_checkpointing and model.is_activation_checkpointing
        torch.manual_seed(5)
        # a cache passed in training under checkpointing: the layers run without it, as Transformers'
        # (a layer recomputed in backward would write its keys twice), and it comes back empty
        out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True, past_key_values=cache,
                    use_cache=cache is not None or None)
        assert out.past_key_values is cache or not ckpt
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert cache is None or cache.get_seq_length() == 0
    for other in grads[1:]:
        assert grads[0].keys() == other.keys()
        for n in grads[0]:
            close(grads[0][n], other[n], f"grad {n}", atol=1e-6, rtol=1e-5)
    assert len(calls) == 2 * (2 if options == "every_2nd" else 3)  # layers 0 and 2 of 3, or all
    want = CHECKPOINT_OPTIONS[options].get("activation_checkpointing_kwargs", {"use_reentrant": False})
    assert all(k == want for k in calls)


def test_add_model_tags_keeps_each_tag_once():
    model = tiny(PHIMOE)
    assert model.model_tags is None
    model.add_model_tags("trl")
    model.add_model_tags(["sft", "trl", "sft"])
    assert model.model_tags == ["trl", "sft"]


def test_gradient_checkpointing_options_are_checked():
    model = tiny(PHIMOE, seed=2)
    with pytest.raises(ValueError, match="every_n_layers"):
        model.activation_checkpointing_enable(every_n_layers=0)
    with pytest.raises(TypeError, match="activation_checkpointing_kwargs"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=["use_reentrant"])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True}, every_n_layers=2)
    assert model.model.gradient_checkpointing.every_n_layers == 2
    model.train()
    ids = torch.randint(0, PHIMOE.base["vocab_size"], (1, 4))
    filled = model.eval()(ids, use_cache=True).past_key_values  # (its layers could not attend to it in training)
    with pytest.raises(ValueError, match="holds 4 earlier tokens that they could not attend to"):
        model.train()(ids, past_key_values=filled)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


@contextlib.contextmanager
def forbid_host_sync():
    """Fail on any call that reads a tensor's value back to the host (a sync on CUDA)."""
    names = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "cpu", "unique"]
    saved = {n: getattr(torch.Tensor, n) for n in names}
    saved_fns = {n: getattr(torch, n) for n in ("nonzero", "unique", "bincount", "where")}

    def boom(name):
        def f(*a, **k):
            raise AssertionError(f"host sync: Tensor.{name} called on the decode path")
        return f

    def where(cond, *rest, **k):
        if not rest:
            raise AssertionError("host sync: torch.where(cond) called on the decode path")
        return saved_fns["where"](cond, *rest, **k)

    try:
        for n in names:
            setattr(torch.Tensor, n, boom(n))
        for n in ("nonzero", "unique", "bincount"):
            setattr(torch, n, boom(n))
        torch.where = where
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
        for n, f in saved_fns.items():
            setattr(torch, n, f)


SYNC_CASES = [(a, v) for a in ARCHS for v in ("default", "longrope") if v in a.variants]


@pytest.mark.parametrize(("arch", "variant"), SYNC_CASES, ids=[f"{a.name}-{v}" for a, v in SYNC_CASES])
@pytest.mark.parametrize("kind", ["static", "dynamic"])
@torch.no_grad()
def test_decode_step_never_syncs_with_the_host(arch, variant, kind, monkeypatch):
    # the experts as a CUDA device without Triton runs them (gather: no host read); the CPU's own
    # choice, the reference loop, reads the routing back, which costs nothing there
    monkeypatch.setattr(moe, "pick_backend", lambda x, ids, *weights: "gather")
    model = tiny(arch, seed=3, **arch.variants[variant])
    ids, mask = make_inputs(arch.base["vocab_size"], 4, 6, "left")
    cache = StaticCache(model.config, max_cache_len=16) if kind == "static" else DynamicCache()
    model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    nxt = torch.ones(4, 1, dtype=torch.long)
    full_mask = torch.cat([mask, torch.ones(4, 1, dtype=torch.long)], 1)
    with forbid_host_sync():
        out = model(nxt, attention_mask=full_mask, past_key_values=cache, cache_position=torch.tensor([6]),
                    position_ids=torch.full((4, 1), 6))
    assert out.logits.shape == (4, 1, arch.base["vocab_size"])


def test_forbid_host_sync_catches_a_sync():
    with forbid_host_sync(), pytest.raises(AssertionError, match="host sync"):
        torch.tensor([1.0]).item()


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_model_attributes_as_transformers(arch):
    hf = arch.hf["causal_lm"](arch.hf_config())
    ours = arch.ours["causal_lm"](arch.our_config())
    names = ["vocab_size", "num_experts", "num_experts_per_tok", "name_or_path"]
    names += ["router_aux_loss_coef"] if arch is PHIMOE else ["aux_loss_coef", "tie_word_embeddings"]
    assert {n: getattr(ours, n) for n in names} == {n: getattr(hf, n) for n in names}
    # the router loss's settings are the model's own, copied from the config when it is built, as
    # Transformers' are: set on the model they change the loss, set on the config afterwards they do not
    ours.load_state_dict(hf.state_dict())
    hf.eval(), ours.eval()
    coef = "router_aux_loss_coef" if arch is PHIMOE else "aux_loss_coef"
    ids = torch.randint(1, arch.base["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(3))
    for change in ((coef, 0.7), ("num_experts_per_tok", 1)):
        for target in ("config", "model"):
            losses = []
            for model in (hf, ours):
                setattr(model.config if target == "config" else model, *change)
                losses.append(model(ids, labels=ids, output_router_logits=True).loss)
            close(losses[1], losses[0], f"{change} set on the {target}")
    ours.activation_checkpointing_enable()
    assert ours.is_activation_checkpointing and ours.is_gradient_checkpointing
    ours.activation_checkpointing_disable()
    assert not ours.is_activation_checkpointing
    for model in (hf, ours):  # a plain attribute there: set, it leaves the config; a resize sets it
        model.vocab_size = 7
        assert (model.vocab_size, model.config.vocab_size) == (7, arch.base["vocab_size"])
        model.resize_token_embeddings(arch.base["vocab_size"] + 5)
        assert (model.vocab_size, model.config.vocab_size) == (arch.base["vocab_size"] + 5,) * 2


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_reentrant_checkpoint_runs_no_inference_kernels(arch, monkeypatch):
    """A reentrant checkpoint runs the layers' forward under no_grad, where inference kernels would
    serve (on a GPU, the Triton experts leave a [.., K, D] output where the recompute's is summed).
    Checkpointed layers take the training paths in the forward and the recompute alike: under
    fused.forced() (the GPU's choice of kernels), no fused kernel runs inside a layer, and the
    gradients are those of the plain backward."""
    from moetorch.ops import fused

    ids, mask = make_inputs(arch.base["vocab_size"], 2, 6, "left")
    grads = []
    for ckpt in (False, True):
        model = tiny(arch, seed=2, num_hidden_layers=2).train()
        if ckpt:
            model.activation_checkpointing_enable({"use_reentrant": True})
        inside = []
        for layer in model.model.layers:
            layer.register_forward_pre_hook(lambda m, a, inside=inside: inside.append(fused.active(torch.ones(1))))
        torch.manual_seed(5)
        with fused.forced():
            model(ids, attention_mask=mask, labels=ids).loss.backward()
        if ckpt:  # each layer's forward and recompute: training paths
            assert len(inside) == 4 and not any(inside)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for n in grads[0]:
        close(grads[0][n], grads[1][n], f"grad {n}", atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_loss_type_and_loss_function_are_transformers(arch):
    """`loss_type` (which Transformers' Trainer reads to count num_items_in_batch over the shifted
    labels) and `loss_function` (Transformers' signature) as on Transformers' models."""
    g = torch.Generator().manual_seed(0)
    for head in ("model", "causal_lm", "seq_cls"):
        ours, hf = arch.ours[head](arch.our_config()), arch.hf[head](arch.hf_config())
        assert ours.loss_type == hf.loss_type, head
    ours, hf = arch.ours["causal_lm"](arch.our_config()), arch.hf["causal_lm"](arch.hf_config())
    logits, labels = torch.randn(3, 7, 97, generator=g), torch.randint(0, 97, (3, 7), generator=g)
    labels[0, :3] = -100
    shifted = torch.randint(0, 97, (3, 7), generator=g)
    for kw in ({}, {"num_items_in_batch": torch.tensor(11)}, {"ignore_index": 5}, {"shift_labels": shifted}):
        y = labels.masked_fill(labels == -100, 5) if "ignore_index" in kw else labels
        close(ours.loss_function(logits, y, 97, **kw), hf.loss_function(logits, y, 97, **kw), f"{kw}")
    with pytest.raises(ValueError, match="vocab_size is 96"):
        ours.loss_function(logits, labels, 96)
    for num_labels, target in ((1, torch.randn(3, generator=g)), (3, torch.tensor([0, 2, 1])),
                               (3, (torch.rand(3, 3, generator=g) > 0.5).float())):
        ours = arch.ours["seq_cls"](arch.our_config(num_labels=num_labels))
        hf = arch.hf["seq_cls"](arch.hf_config(num_labels=num_labels))
        pooled = torch.randn(3, num_labels, generator=g)
        close(ours.loss_function(target, pooled, ours.config), hf.loss_function(target, pooled, hf.config), "cls")
        assert ours.config.problem_type == hf.config.problem_type


def test_transformers_helper_names_a_script_imports_are_there():
    """A script that imports these from Transformers runs with the import changed: the generation
    classes moetorch has, the base classes of its annotations and isinstance checks, set_seed."""
    import moetorch.generation as generation

    assert set(generation.__all__) <= set(moetorch.__all__)
    for name in ("PreTrainedModel", "PretrainedConfig", "PreTrainedConfig", "PreTrainedTokenizerFast",
                 "PreTrainedTokenizerBase", "set_seed", "AsyncTextIteratorStreamer", "MaxTimeCriteria",
                 "SequenceBiasLogitsProcessor", "LogitNormalization"):
        assert name in moetorch.__all__ and getattr(transformers, name, None) is not None, name
    model = moetorch.PhimoeForCausalLM.from_pretrained("tiny-phimoe")
    assert isinstance(model, moetorch.PreTrainedModel) and isinstance(model.config, moetorch.PretrainedConfig)
    assert isinstance(moetorch.AutoTokenizer.from_pretrained("tiny-phimoe"), moetorch.PreTrainedTokenizerFast)


def test_set_seed_seeds_what_transformers_set_seed_seeds():
    import random

    import numpy as np

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    transformers.set_seed(123)
    want = draws()
    moetorch.set_seed(123)
    assert draws() == want
    moetorch.set_seed(124)
    assert draws() != want
    try:
        moetorch.set_seed(5, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
