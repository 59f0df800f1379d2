"""Caches: prefill-then-decode equals a full forward (dynamic and static), LongRoPE threshold
crossing re-encodes cached keys, and the cache API (crop, reorder, reset, legacy tuples)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from archs import ARCH_IDS, ARCHS, JETMOE, PHIMOE, longrope_scaling, randomize_
from parity import close, make_inputs, make_pair

import moetorch
import moetorch.cache
from moetorch import DynamicCache, StaticCache


def tiny(arch, seed=0, **overrides):
    model = arch.ours["causal_lm"](arch.our_config(**overrides))
    randomize_(model, seed)
    return model.eval()


def new_cache(kind, model, max_len=32):
    return DynamicCache() if kind == "dynamic" else StaticCache(model.config, max_cache_len=max_len)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("padding", [None, "left"])
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(arch, kind, padding):
    model = tiny(arch, seed=1)
    ids, mask = make_inputs(model.config.vocab_size, 2, 10, padding, seed=3)
    full = model(ids, attention_mask=mask).logits
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    cache = new_cache(kind, model)
    out = model(ids[:, :4], attention_mask=None if mask is None else mask[:, :4], past_key_values=cache, use_cache=True)
    assert out.past_key_values is cache
    close(out.logits[valid[:, :4]], full[:, :4][valid[:, :4]], "prefill")
    for t in range(4, 10):
        step_mask = None if mask is None else mask[:, : t + 1]
        out = model(ids[:, t : t + 1], attention_mask=step_mask, past_key_values=cache)
        close(out.logits[:, 0], full[:, t], f"decode step {t}")
    assert cache.get_seq_length() == 10



def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _same_grads(ours, oracle):
    assert ours.keys() == oracle.keys()
    for name, g in oracle.items():
        close(ours[name], g, f"grad of {name}", atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_static_cache_with_gradients_on(arch, attn, tmp_path):
    """A forward outside torch.no_grad() fills a StaticCache as Transformers' does: prefill, then
    two decode steps, the same logits, and the loss of every step backpropagates to the same
    gradients (the keys written into the cache carry theirs into the later steps). Under sdpa
    too, whose backward keeps the keys it read (Transformers' own sdpa fails here on PhiMoE, so
    its eager forward is the oracle)."""
    from parity import make_pair

    hf, ours = make_pair(arch, tmp_path, seed=4)
    ours.set_attn_implementation(attn)
    ids, _ = make_inputs(ours.config.vocab_size, 2, 8, None, seed=5)
    runs = []
    for model, lib in ((hf, transformers), (ours, moetorch)):
        model.zero_grad()
        cache = lib.StaticCache(config=model.config, max_cache_len=12)
        logits = [model(ids[:, s:e], past_key_values=cache, use_cache=True).logits for s, e in ((0, 6), (6, 7), (7, 8))]
        assert cache.get_seq_length() == 8 and all(x.requires_grad for x in logits)
        sum(x.logsumexp(-1).mean() for x in logits).backward()
        runs.append(([x.detach() for x in logits], _grads(model)))
    (hf_logits, hf_grads), (our_logits, our_grads) = runs
    for i, (a, b) in enumerate(zip(our_logits, hf_logits)):
        close(a, b, f"logits of step {i}")
    _same_grads(our_grads, hf_grads)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_longrope_rebuild_with_gradients_on(kind):
    """A cached forward with gradients on that crosses PhiMoE's LongRoPE threshold rebuilds the
    cache from the recorded inputs, and the loss reaches what a forward from scratch reaches: the
    replayed tokens' embeddings included. Oracle: Transformers without a cache, the first step
    with the short factors and the whole sequence with the long ones (Transformers' own model with
    the long factors put in place of the short, as test_long_factors_match_the_original_model_rule)."""
    ours = longrope_model(seed=3)
    ours.set_attn_implementation("sdpa")
    scaling = ours.config.rope_parameters
    oracles = []
    for factors in ((), ("factor", "mscale")):
        rope = {**longrope_scaling(8, original=8), **{f"short_{f}": scaling[f"long_{f}"] for f in factors}}
        hf = transformers.PhimoeForCausalLM(transformers.PhimoeConfig(**PHIMOE.config_kwargs(
            max_position_embeddings=64, rope_scaling=rope))).eval()
        hf.load_state_dict(ours.state_dict())
        hf.set_attn_implementation("eager")
        oracles.append(hf)
    ids, _ = make_inputs(64, 2, 11, None, seed=6)
    short, long = oracles
    for m in (short, long):
        m.zero_grad()
    hf_first, hf_rest = short(ids[:, :6]).logits, long(ids[:, :11]).logits[:, 6:]
    (hf_first.logsumexp(-1).mean() + hf_rest.logsumexp(-1).mean()).backward()
    hf_grads = {n: _grads(short)[n] + _grads(long)[n] for n in _grads(long)}

    ours.zero_grad()
    cache = new_cache(kind, ours, max_len=16)
    first = ours(ids[:, :6], past_key_values=cache, use_cache=True).logits
    rest = ours(ids[:, 6:11], past_key_values=cache, use_cache=True).logits  # 11 > 8: rebuilt
    assert cache.rope_long and cache.get_seq_length() == 11
    (first.logsumexp(-1).mean() + rest.logsumexp(-1).mean()).backward()
    close(first, hf_first, "first step")
    close(rest, hf_rest, "the step that crossed")
    _same_grads(_grads(ours), hf_grads)

WINDOWED = [a for a in ARCHS if "sliding_window" in a.variants]


@pytest.mark.parametrize("arch", WINDOWED, ids=[a.name for a in WINDOWED])
@torch.no_grad()
def test_sliding_window_decode(arch):
    model = tiny(arch, seed=2, sliding_window=3)
    ids, _ = make_inputs(model.config.vocab_size, 1, 9, None)
    full = model(ids).logits
    cache = DynamicCache()
    model(ids[:, :2], past_key_values=cache, use_cache=True)
    for t in range(2, 9):
        close(model(ids[:, t : t + 1], past_key_values=cache).logits[:, 0], full[:, t], f"step {t}")


def longrope_model(seed=0, original=8):
    return tiny(PHIMOE, seed=seed, rope_scaling=longrope_scaling(8, original=original), max_position_embeddings=64)


@torch.no_grad()
def test_long_factors_match_the_original_model_rule():
    """Beyond original_max_position_embeddings we use long_factor and long_mscale (the original
    Phi-3.5-MoE rule). Oracle: Transformers with short_factor/mscale replaced by the long ones."""
    ours = longrope_model(seed=3)
    scaling = ours.config.rope_parameters
    hf_cfg = transformers.PhimoeConfig(**PHIMOE.config_kwargs(
        max_position_embeddings=64,
        rope_scaling={**longrope_scaling(8, original=8), "short_factor": scaling["long_factor"], "short_mscale": scaling["long_mscale"]},
    ))
    hf = transformers.PhimoeForCausalLM(hf_cfg).eval()
    hf.load_state_dict(ours.state_dict())
    hf.set_attn_implementation("eager")
    ids, _ = make_inputs(64, 2, 12, None)
    close(hf(ids).logits, ours(ids).logits, "12 tokens > original 8")


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@torch.no_grad()
def test_crossing_threshold_reencodes_cached_keys(kind):
    model = longrope_model(seed=4)
    ids, _ = make_inputs(64, 2, 14, None, seed=5)
    cache = new_cache(kind, model)
    model(ids[:, :5], past_key_values=cache, use_cache=True)
    assert not cache.rope_long
    for t in range(5, 14):
        out = model(ids[:, t : t + 1], past_key_values=cache)
        scratch = model(ids[:, : t + 1]).logits[:, -1]
        close(out.logits[:, 0], scratch, f"step {t} (sequence length {t + 1})")
    assert cache.rope_long


@torch.no_grad()
def test_crossing_inside_a_chunk_and_cropping_back():
    model = longrope_model(seed=6)
    ids, _ = make_inputs(64, 1, 12, None, seed=8)
    cache = DynamicCache()
    model(ids[:, :6], past_key_values=cache, use_cache=True)
    out = model(ids[:, 6:11], past_key_values=cache)  # 6 cached + 5 new crosses 8
    close(out.logits, model(ids[:, :11]).logits[:, 6:], "chunk across the threshold")
    cache.crop(7)  # back below the threshold: keys go back to the short factors
    out = model(ids[:, 7:8], past_key_values=cache)
    close(out.logits[:, 0], model(ids[:, :8]).logits[:, -1], "after crop")
    assert not cache.rope_long


@torch.no_grad()
def test_static_cache_is_preallocated_and_checked():
    model = tiny(PHIMOE)
    cache = StaticCache(model.config, max_cache_len=8, max_batch_size=2, device="cpu", dtype=torch.float32)
    k0 = cache.keys[0]
    ids, _ = make_inputs(97, 2, 8, None)
    model(ids[:, :6], past_key_values=cache, use_cache=True)
    model(ids[:, 6:7], past_key_values=cache)
    assert cache.keys[0] is k0 and k0.shape == (2, 2, 8, 8)
    model(ids[:, 7:8], past_key_values=cache)
    with pytest.raises(ValueError, match="max_cache_len"):
        model(ids[:, :1], past_key_values=cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.keys[0] is k0
    with pytest.raises(ValueError, match="batch"):
        model(torch.ones(3, 2, dtype=torch.long), past_key_values=cache)


@torch.no_grad()
def test_cache_api(monkeypatch):
    model = tiny(PHIMOE, seed=9)
    ids, _ = make_inputs(97, 3, 6, None)
    cache = model(ids, use_cache=True).past_key_values
    assert isinstance(cache, DynamicCache) and len(cache) == 2 and cache.get_seq_length() == 6
    legacy = cache.to_legacy_cache()
    assert legacy[0][0].shape == (3, 2, 6, 8)
    again = DynamicCache.from_legacy_cache(legacy)
    nxt = torch.tensor([[5], [6], [7]])
    close(model(nxt, past_key_values=again).logits, model(nxt, past_key_values=legacy).logits, "legacy tuple input")
    # reorder: continuing a permuted cache equals continuing the permuted batch
    perm = torch.tensor([2, 0, 1])
    c1 = model(ids, use_cache=True).past_key_values
    c1.reorder_cache(perm)
    c2 = model(ids[perm], use_cache=True).past_key_values
    close(model(nxt, past_key_values=c1).logits, model(nxt, past_key_values=c2).logits, "reorder_cache")
    c1.crop(4)
    assert c1.get_seq_length() == 4 and c1.keys[0].shape[2] == 4
    assert model(ids, use_cache=False).past_key_values is None
    # A static cache reorders in place (graphs keep reading its storage), its filled slots only.
    s1, s2 = StaticCache(model.config, max_cache_len=10), StaticCache(model.config, max_cache_len=10)
    model(ids, past_key_values=s1, use_cache=True)
    model(ids[perm], past_key_values=s2, use_cache=True)
    s1.keys[0][:, :, 6:] = 7.0  # unfilled slots: not moved
    storage = [t.data_ptr() for t in (*s1.keys, *s1.values)]
    s3 = copy.deepcopy(s1)
    s1.reorder_cache(perm)
    assert [t.data_ptr() for t in (*s1.keys, *s1.values)] == storage and bool((s1.keys[0][:, :, 6:] == 7.0).all())
    # layer by layer (a copy budget below one layer's slots) moves the same
    monkeypatch.setattr(moetorch.cache, "REORDER_CHUNK_BYTES", 1)
    s3.reorder_cache(perm)
    assert all(torch.equal(a, b) for a, b in zip((*s1.keys, *s1.values), (*s3.keys, *s3.values)))
    close(model(nxt, past_key_values=s1).logits, model(nxt, past_key_values=s2).logits, "static reorder_cache")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@torch.no_grad()
def test_cache_built_and_read_as_transformers_does(arch):
    """Transformers' cache guide: `DynamicCache(config=model.config)`, `ddp_cache_data` to start
    from, `cache.layers[i].keys / .values`; the same keys and logits as Transformers' own cache
    on the same weights. A Transformers cache passed in is an error that says which cache to build."""
    model = tiny(arch, seed=11)
    ids, _ = make_inputs(97, 2, 6, None)
    cache = DynamicCache(config=model.config)
    out = model(ids[:, :4], past_key_values=cache, use_cache=True)
    assert out.past_key_values is cache and [layer.keys.shape for layer in cache.layers] == [k.shape for k in cache.keys]
    assert all(layer.keys is k and layer.values is v for layer, k, v in zip(cache.layers, cache.keys, cache.values))
    started = DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in cache.layers])
    assert started.get_seq_length() == 4
    close(model(ids[:, 4:], past_key_values=started).logits, model(ids).logits[:, 4:], "from ddp_cache_data")
    hf = arch.hf["causal_lm"](arch.hf_config())
    hf.load_state_dict(model.state_dict())
    theirs = transformers.DynamicCache(config=hf.config)
    hf.eval()(ids[:, :4], past_key_values=theirs, use_cache=True)
    for ours_layer, their_layer in zip(cache.layers, theirs.layers):
        close(their_layer.keys, ours_layer.keys, "keys")
        close(their_layer.values, ours_layer.values, "values")
    with pytest.raises(TypeError, match=r"moetorch.DynamicCache or StaticCache\), got transformers\."):
        model(ids, past_key_values=transformers.DynamicCache())
    with pytest.raises(NotImplementedError, match="offloaded"):
        DynamicCache(offloading=True)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@torch.no_grad()
def test_dynamic_cache_counts_layers_as_transformers(arch):
    """`len`, `layers` and `is_initialized` of a DynamicCache made from a config, after a forward
    and after `reset()` (which keeps the layers, emptied), and of one made bare, against
    Transformers' DynamicCache on the same model."""
    model = tiny(arch, seed=13)
    hf = arch.hf["causal_lm"](arch.hf_config()).eval()
    hf.load_state_dict(model.state_dict())
    ids, _ = make_inputs(97, 2, 5, None)
    n = model.config.num_hidden_layers

    def state(cache):
        return (len(cache), cache.is_initialized, cache.get_seq_length(),
                [None if layer.keys is None else tuple(layer.keys.shape) for layer in cache.layers])

    for ours, theirs in ((DynamicCache(config=model.config), transformers.DynamicCache(config=hf.config)),
                         (DynamicCache(), transformers.DynamicCache())):
        assert state(ours) == state(theirs)
        model(ids, past_key_values=ours, use_cache=True)
        hf(ids, past_key_values=theirs, use_cache=True)
        assert state(ours) == state(theirs) and len(ours) == n
        ours.reset()
        theirs.reset()
        assert state(ours) == state(theirs) == (n, False, 0, [None] * n)
        with pytest.raises(ValueError, match=r"cache.layers\[1\].keys: the layer holds no keys yet"):
            ours.layers[1].keys = torch.zeros(2, 2, 3, 4)
        close(model(ids, past_key_values=ours).logits, model(ids).logits, "a forward on the reset cache")


def test_dynamic_cache_updated_out_of_layer_order_as_transformers():
    """A DynamicCache updated at a layer before the layers below it were (a pipeline stage's first
    layer, say) keeps those layers empty and uninitialized until their own update, and crops each
    layer by its own length: random sequences of updates and crops against Transformers'."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        ours, theirs = DynamicCache(), transformers.DynamicCache()
        for _ in range(int(torch.randint(1, 10, (1,), generator=gen))):
            if torch.rand((), generator=gen) < 0.25:
                n = -int(torch.randint(0, 5, (1,), generator=gen))
                ours.crop(n)
                theirs.crop(n)
            else:
                layer = int(torch.randint(0, 5, (1,), generator=gen))
                k, v = torch.randn(2, 2, 2, int(torch.randint(1, 4, (1,), generator=gen)), 4, generator=gen)
                got, want = ours.update(k, v, layer), theirs.update(k, v, layer)
                assert all(torch.equal(a, b) for a, b in zip(got, want))
            assert len(ours) == len(theirs) and ours.is_initialized == theirs.is_initialized
            assert [ours.get_seq_length(i) for i in range(6)] == [theirs.get_seq_length(i) for i in range(6)]
            assert [layer.is_initialized for layer in ours.layers] == [layer.is_initialized for layer in theirs.layers]
            for a, b in zip(ours.layers, theirs.layers):
                assert (a.keys is None) == (b.keys is None)
                if a.keys is not None:
                    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 2)
    with pytest.raises(ValueError, match=r"cache.layers\[0\].keys: the layer holds no keys yet"):
        cache.layers[0].keys = torch.zeros(1, 2, 3, 4)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("kind", ["dynamic", "static"])
@torch.no_grad()
def test_cache_iterated_and_its_layers_set_as_transformers(arch, kind):
    """Iterating a cache gives Transformers 5's (keys, values, sliding-window tensor) a layer,
    which both libraries' `DynamicCache(ddp_cache_data=...)` take back. `cache.layers[i].keys = t`
    (and `.values`): a dynamic cache takes the tensors (layer 0's keys set its length), so cutting
    every layer to 3 tokens continues as a 3-token cache; a static cache copies them into its slots
    and refuses another shape, naming it."""
    model = tiny(arch, seed=12)
    ids, _ = make_inputs(97, 2, 6, None)
    cache = new_cache(kind, model, max_len=16)
    model(ids[:, :5], past_key_values=cache, use_cache=True)
    hf = arch.hf["causal_lm"](arch.hf_config()).eval()
    hf.load_state_dict(model.state_dict())
    theirs = transformers.DynamicCache()
    hf(ids[:, :5], past_key_values=theirs, use_cache=True)
    items = list(cache)
    assert len(items) == len(list(theirs)) == model.config.num_hidden_layers
    for (k, v, window), (tk, tv, twindow) in zip(items, theirs):
        assert window is None and twindow is None
        close(tk, k[..., :5, :], "keys")
        close(tv, v[..., :5, :], "values")
    if kind == "dynamic":
        for again in (DynamicCache(ddp_cache_data=cache), transformers.DynamicCache(ddp_cache_data=cache)):
            assert again.get_seq_length() == 5
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[..., :3, :], layer.values[..., :3, :]
        assert cache.get_seq_length() == cache.layers[0].get_seq_length() == 3
    else:
        storage = cache.keys[0]
        for layer in cache.layers:  # zeroed through the setter, then set back: the slots hold each
            keys, values = layer.keys.clone(), layer.values.clone()
            layer.keys, layer.values = torch.zeros_like(keys), torch.zeros_like(values)
            assert not layer.keys.any() and not layer.values.any()
            layer.keys, layer.values = keys, values
        assert cache.keys[0] is storage
        with pytest.raises(ValueError, match=r"layers\[0\]\.keys: expected a tensor of the slots' shape"):
            cache.layers[0].keys = cache.layers[0].keys[..., :3, :]
        cache.crop(3)
    want = model(ids[:, :4]).logits[:, 3:]
    close(want, model(ids[:, 3:4], past_key_values=cache, use_cache=True).logits, "after setting the layers")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("kind", ["dynamic", "static"])
@torch.no_grad()
def test_a_moetorch_cache_serves_a_transformers_model(arch, kind):
    """A moetorch cache handed to a Transformers model of the same weights: its forward (which
    writes without cache positions) and generate give what Transformers' own cache gives."""
    model = tiny(arch, seed=13)
    hf = arch.hf["causal_lm"](arch.hf_config()).eval()
    hf.load_state_dict(model.state_dict())
    ids, _ = make_inputs(97, 2, 6, None)
    cache = new_cache(kind, model, max_len=16)
    full = hf(ids).logits
    close(full[:, :4], hf(ids[:, :4], past_key_values=cache, use_cache=True).logits, "prefill")
    close(full[:, 4:], hf(ids[:, 4:], past_key_values=cache, use_cache=True).logits, "continued")
    assert cache.get_seq_length() == 6
    want = hf.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None)
    got = hf.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None,
                      past_key_values=new_cache(kind, model, max_len=16))
    assert torch.equal(want, got)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("head", ["model", "causal_lm", "seq_cls"])
@torch.no_grad()
def test_cache_by_its_transformers_5_24_name(arch, head):
    """Transformers 5.24 calls the cache `cache` (argument and output field), keeping
    `past_key_values` as an alias: a forward takes either, an output answers to both, and both
    at once is an error that names them. The logits are Transformers' (its own name for it)."""
    model = arch.ours[head](arch.our_config(pad_token_id=0))
    randomize_(model, 5)
    model.eval()
    hf = arch.hf[head](arch.hf_config(pad_token_id=0)).eval()
    hf.load_state_dict(model.state_dict())
    ids, _ = make_inputs(arch.base["vocab_size"], 2, 7, None, seed=int(torch.randint(1 << 20, ())))
    theirs = transformers.DynamicCache(config=hf.config)
    hf(ids[:, :4], past_key_values=theirs, use_cache=True)
    want = hf(ids[:, 4:], past_key_values=theirs)
    first = model(ids[:, :4], cache=DynamicCache(), use_cache=True)
    assert first.cache is first.past_key_values and first["cache"] is first.past_key_values
    assert "cache" in first and first.get("cache") is first.past_key_values and first.get("nothing", 3) == 3
    assert first.cache.get_seq_length() == 4
    prompt_cache = copy.deepcopy(first.cache)
    got = model(ids[:, 4:], cache=first.cache)
    field = "last_hidden_state" if head == "model" else "logits"
    close(getattr(got, field), getattr(want, field), f"{head} through cache=")
    with pytest.raises(ValueError, match="two caches were given, as `cache` and as `past_key_values`"):
        model(ids, cache=DynamicCache(), past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="two caches were given"):
        model(ids, None, None, DynamicCache(), cache=DynamicCache())  # the old name by position
    # one cache under both names (a decoding loop handed both passes both on), or beside a None: one cache
    for kwargs in (dict(cache=1, past_key_values=1), dict(cache=1, past_key_values=None),
                   dict(cache=None, past_key_values=1)):
        again = copy.deepcopy(prompt_cache)
        kwargs = {k: again if v is not None else None for k, v in kwargs.items()}
        close(getattr(model(ids[:, 4:], **kwargs), field), getattr(want, field), f"{head}, {list(kwargs)}")
        assert again.get_seq_length() == 7
    positional = copy.deepcopy(prompt_cache)
    close(getattr(model(ids[:, 4:], None, None, positional, cache=positional), field), getattr(want, field),
          f"{head}, the old name by position")
    plain = model(ids, use_cache=False)
    assert plain.cache is None and "cache" not in plain and plain.get("cache") is None
    with pytest.raises(KeyError):
        plain["cache"]
    plain["cache"] = first.cache  # set by either name: the one field
    assert plain.past_key_values is first.cache and list(plain.keys())[-1] == "past_key_values"
    plain.cache = prompt_cache
    assert plain["past_key_values"] is prompt_cache and plain.to_tuple()[-1] is prompt_cache
    assert list(plain.keys()).count("past_key_values") == 1 and "cache" not in plain.keys()


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@torch.no_grad()
def test_generate_and_step_inputs_take_the_cache_as_cache(arch):
    """`generate(..., cache=)` continues from a cache as `past_key_values=` does in Transformers
    (the same tokens as its generate), and `prepare_inputs_for_generation(..., cache=)` passes it
    on; a generate output answers to `cache` too."""
    model = tiny(arch, seed=13)
    hf = arch.hf["causal_lm"](arch.hf_config()).eval()
    hf.load_state_dict(model.state_dict())
    ids, _ = make_inputs(arch.base["vocab_size"], 1, 6, None, seed=int(torch.randint(1 << 20, ())))
    theirs = transformers.DynamicCache(config=hf.config)
    hf(ids[:, :5], past_key_values=theirs, use_cache=True)
    want = hf.generate(ids, past_key_values=theirs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    ours = DynamicCache()
    model(ids[:, :5], cache=ours, use_cache=True)
    out = model.generate(ids, cache=ours, max_new_tokens=5, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences, want) and out.cache is ours and out["cache"] is ours
    step = model.prepare_inputs_for_generation(ids[:, -1:], cache=ours)
    assert step["past_key_values"] is ours
    with pytest.raises(ValueError, match="two caches were given"):
        model.generate(ids, cache=ours, past_key_values=DynamicCache(), max_new_tokens=2)


@pytest.mark.parametrize("arch", [*ARCHS, "longrope"], ids=[*ARCH_IDS, "phimoe-longrope"])
@torch.no_grad()
def test_static_cache_slot_rows_match_moving_the_cache(arch):
    # Beam-search reorders through slot_rows (no key or value moves) against the same reorders
    # moving the filled slots: the same logits at every step, LongRoPE's rebuild across its
    # threshold included (its record read through the rows too), and settling leaves the storage
    # the moving cache holds.
    model = longrope_model(seed=12) if arch == "longrope" else tiny(arch, seed=12)
    V = model.config.vocab_size
    ids, _ = make_inputs(V, 3, 5, None, seed=13)
    rows_cache, moved = StaticCache(model.config, max_cache_len=16), StaticCache(model.config, max_cache_len=16)
    close(model(ids, past_key_values=rows_cache).logits, model(ids, past_key_values=moved).logits, "prompt")
    rows_cache.use_slot_rows()
    assert rows_cache.slot_rows.shape == (3, 16)
    g = torch.Generator().manual_seed(14)
    for step in range(8):
        beam_idx = torch.randint(0, 3, (3,), generator=g)  # duplicates: rows share their past
        before = [t.clone() for t in rows_cache._all]
        rows_cache.reorder_cache(beam_idx)
        moved.reorder_cache(beam_idx)
        assert all(torch.equal(a, b) for a, b in zip(before, rows_cache._all)), "no key or value moves"
        nxt = torch.randint(0, V, (3, 1), generator=g)
        a, b = model(nxt, past_key_values=rows_cache).logits, model(nxt, past_key_values=moved).logits
        assert torch.equal(a, b), f"step {step}"
    assert arch != "longrope" or rows_cache.rope_long  # crossed the threshold (8) on the way
    n = moved.get_seq_length()
    rows_cache.settle_slot_rows()
    assert rows_cache.slot_rows is None
    for a, b in zip(rows_cache._all, moved._all):
        assert torch.equal(a[:, :, :, :n], b[:, :, :, :n])
    if arch == "longrope":
        kept = moved.replay_embeds.shape[1] - 1  # the record holds the first `original` slots
        assert all(torch.equal(a, b) for a, b in zip(rows_cache.replay(kept), moved.replay(kept)))
    # reset reads rows as their own again (the table stays, for graphs that captured it)
    table = rows_cache._rows
    rows_cache.use_slot_rows()
    rows_cache.reorder_cache(torch.tensor([2, 2, 0]))
    rows_cache.reset()
    assert rows_cache.slot_rows is None and torch.equal(table, torch.arange(3)[:, None].expand(3, 16))
    rows_cache.use_slot_rows()
    assert rows_cache.slot_rows is table
    with pytest.raises(RuntimeError, match="no storage yet"):
        StaticCache(model.config, max_cache_len=8).use_slot_rows()
    for step in (0, 2):
        with pytest.raises(ValueError, match="positive divisor of the 3 rows"):
            rows_cache.rows_view(step, 3, "cpu", torch.float32)


def _padded(ids_rows: list[list[int]], width: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask of `width` columns."""
    ids = torch.full((len(ids_rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids_rows), width, dtype=torch.long)
    for b, row in enumerate(ids_rows):
        ids[b, width - len(row):] = torch.tensor(row)
        mask[b, width - len(row):] = 1
    return ids, mask


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@torch.no_grad()
def test_longrope_counts_the_batch_real_tokens_not_its_padding(cache_implementation):
    """LongRoPE's factor set follows the largest position + 1: padding that every row of a batch
    has (a tokenizer's pad_to_multiple_of, padding="max_length") changes no token. Rows of 10 and
    13 tokens, padded to 13 or to 21 columns, cross the threshold (16) at the same step of
    `generate`: the row's length (21 from the start) used to switch the padded batch at once."""
    model = longrope_model(seed=6, original=16)
    g = torch.Generator().manual_seed(6)
    rows = [torch.randint(1, 64, (n,), generator=g).tolist() for n in (10, 13)]
    outs = []
    for width in (13, 21):
        ids, mask = _padded(rows, width)
        seq = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                             eos_token_id=None, cache_implementation=cache_implementation)
        outs.append(seq[:, width:])
    assert torch.equal(outs[0], outs[1])


def test_longrope_forward_with_a_mask_reads_the_largest_position(tmp_path):
    """A forward given a mask and positions (Transformers' generate passes both) picks the factor
    set by the largest position + 1, as Transformers does: rows of 9 and 12 tokens padded to 20
    columns keep the short factors (threshold 16) where the row's length would take the long ones;
    the same with a cache, and a step after it."""
    hf, ours = make_pair(PHIMOE, tmp_path, seed=7, rope_scaling=longrope_scaling(8, original=16),
                         max_position_embeddings=64)
    g = torch.Generator().manual_seed(7)
    ids, mask = _padded([torch.randint(1, 64, (n,), generator=g).tolist() for n in (9, 12)], 20)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    real = mask.bool()
    with torch.no_grad():
        for use_cache in (False, True):
            a = hf(ids, attention_mask=mask, position_ids=pos, use_cache=use_cache)
            b = ours(ids, attention_mask=mask, position_ids=pos, use_cache=use_cache)
            close(a.logits[real], b.logits[real], f"padded LongRoPE logits, use_cache={use_cache}")
        nxt = torch.tensor([[5], [7]])
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        step = pos[:, -1:] + 1
        a = hf(nxt, attention_mask=step_mask, position_ids=step, past_key_values=a.past_key_values)
        b = ours(nxt, attention_mask=step_mask, position_ids=step, past_key_values=b.past_key_values)
        close(a.logits, b.logits, "the next step")


def test_the_longrope_record_grows_with_its_limit():
    """The replay record (inputs of the first `limit` slots) keeps what it holds when a later
    forward records with a longer limit (a padded batch's switch comes later)."""
    cache = DynamicCache()
    embeds = torch.randn(2, 6, 4)
    cache.record_inputs(embeds[:, :3], torch.arange(3)[None], torch.arange(3), 4)
    cache.record_inputs(embeds[:, 3:], torch.arange(3, 6)[None], torch.arange(3, 6), 8)
    got, positions = cache.replay(6)
    assert torch.equal(got, embeds) and positions.tolist() == [list(range(6))] * 2


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("kind", ["dynamic", "static"])
@torch.no_grad()
def test_crop_as_transformers(arch, kind):
    """`crop(-n)` drops the last n tokens (all of them at most) and `crop(0)` drops none, as
    Transformers 5's DynamicCache; the next step then gives the logits of a cache that never held
    the dropped tokens. A positive n keeps the first n (Transformers 4's form); `truncate(0)`
    empties the cache."""
    model = tiny(arch, seed=2)
    ids = torch.randint(1, model.config.vocab_size, (2, 7))
    nxt = torch.randint(1, model.config.vocab_size, (2, 1))
    hf = transformers.DynamicCache()
    for layer in range(model.config.num_hidden_layers):
        hf.update(torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8), layer)
    for n, held in ((0, 7), (-2, 5), (-7, 0)):
        cache = new_cache(kind, model)
        model(ids, past_key_values=cache, use_cache=True)
        cache.crop(n)
        theirs = copy.deepcopy(hf)
        theirs.crop(n)
        assert cache.get_seq_length() == theirs.get_seq_length() == held, n
        if held:
            want = model(torch.cat([ids[:, :held], nxt], dim=1)).logits[:, -1]
            close(model(nxt, past_key_values=cache).logits[:, -1], want, f"crop({n}) then a step")
    cache = new_cache(kind, model)
    model(ids, past_key_values=cache, use_cache=True)
    cache.crop(-20)  # more than it holds: empty (Transformers' slice to -20 is empty too)
    assert cache.get_seq_length() == 0
    model(ids, past_key_values=cache, use_cache=True)
    cache.crop(3)
    assert cache.get_seq_length() == 3
    cache.truncate(0)
    assert cache.get_seq_length() == 0


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_generate_from_a_cache_holding_a_one_token_prompt(kind):
    """generate given a cache that holds the whole one-token prompt recomputes that token's logits
    from an emptied cache: the tokens of a call without the cache."""
    model = tiny(PHIMOE, seed=3)
    ids = torch.tensor([[5]])
    cache = new_cache(kind, model)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    want = model.generate(ids, max_new_tokens=5, do_sample=False)
    got = model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("kind", ["dynamic", "static"])
@torch.no_grad()
def test_cache_queries_as_transformers(arch, kind):
    """Transformers 5's cache queries, before and after a forward of the same model: get_max_length
    (-1 for no maximum), get_mask_sizes (the keys a forward of q new tokens sees: a static cache's
    every slot, before its first update too), is_sliding, is_initialized, len (a static cache's
    layers from the start); and the rows held (batch_size)."""
    hf_model, ours = arch.hf["causal_lm"](arch.hf_config()).eval(), tiny(arch)
    ids = torch.randint(1, arch.base["vocab_size"], (2, 5))
    theirs = transformers.DynamicCache() if kind == "dynamic" else transformers.StaticCache(hf_model.config,
                                                                                             max_cache_len=16)
    cache = new_cache(kind, ours, max_len=16)
    for q in (1, 3):
        assert cache.get_mask_sizes(q, 0) == theirs.get_mask_sizes(q, 0) == ((q if kind == "dynamic" else 16), 0)
    assert cache.is_initialized == theirs.is_initialized is False and cache.batch_size == -1
    assert len(cache) == len(theirs) and cache.is_sliding == theirs.is_sliding
    if kind == "static":
        assert cache.get_max_length() == theirs.get_max_length() == 16
    hf_model(ids, past_key_values=theirs, use_cache=True)
    ours(ids, past_key_values=cache, use_cache=True)
    for q in (1, 3):
        assert cache.get_mask_sizes(q, 0) == theirs.get_mask_sizes(q, 0), q
    assert cache.get_max_length() == theirs.get_max_length() == (-1 if kind == "dynamic" else 16)
    assert cache.get_max_length(0) == theirs.get_max_length(0)
    assert cache.is_sliding == theirs.is_sliding and cache.is_initialized == theirs.is_initialized is True
    assert cache.batch_size == 2


def test_static_cache_takes_transformers_offloading_keywords():
    config = PHIMOE.our_config()
    cache = StaticCache(config, max_cache_len=8, offloading=False, offload_only_non_sliding=True)
    assert cache.get_max_length() == 8
    transformers.StaticCache(PHIMOE.hf_config(), max_cache_len=8, offloading=False, offload_only_non_sliding=True)
    with pytest.raises(ValueError, match="offloading=True .* is not supported"):
        StaticCache(config, max_cache_len=8, offloading=True)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@torch.no_grad()
def test_a_transformers_cache_is_refused_with_the_way_to_carry_it_over(arch):
    """A Transformers cache passed to a moetorch forward or generate is refused by a TypeError that
    names its class and how its layers carry over; carried over, a forward continues from it as from
    moetorch's own cache."""
    model = tiny(arch, seed=5)
    hf = arch.hf["causal_lm"](arch.hf_config()).eval()
    hf.load_state_dict(model.state_dict())
    ids, _ = make_inputs(97, 2, 7, None)
    theirs = hf(ids[:, :5], use_cache=True).past_key_values
    for call in (lambda: model(ids[:, 5:], past_key_values=theirs),
                 lambda: model.generate(ids, past_key_values=theirs, max_new_tokens=2)):
        with pytest.raises(TypeError, match=r"got transformers\.cache_utils\.DynamicCache.*"
                                            r"moetorch\.DynamicCache\(ddp_cache_data=cache\)"):
            call()
    carried = DynamicCache(ddp_cache_data=theirs)
    assert carried.get_seq_length() == 5 and len(carried) == model.config.num_hidden_layers
    close(model(ids[:, 5:], past_key_values=carried).logits, model(ids).logits[:, 5:], "a carried-over cache")


# ---- Transformers 5's cache API around the caches, against Transformers itself ---------------------------
def _pair_caches(arch, hf, ours, kind: str, **kwargs):
    lib = {"hf": transformers, "ours": moetorch}
    if kind == "dynamic":
        return lib["hf"].DynamicCache(config=hf.config), lib["ours"].DynamicCache(config=ours.config)
    return (lib["hf"].StaticCache(config=hf.config, max_cache_len=12, **kwargs),
            lib["ours"].StaticCache(config=ours.config, max_cache_len=12, **kwargs))


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("kwargs", [
    {"max_batch_size": 2, "device": "cpu", "dtype": torch.bfloat16},  # (a float32 model: its keys decide)
    {"max_batch_size": 1, "device": "cpu", "dtype": torch.float32},  # (a batch of 2: its keys decide)
    {"batch_size": 2}, {"layer_device_map": None}, {"tp_size": 1},
])
@torch.no_grad()
def test_static_cache_takes_transformers_4_keywords_as_transformers_5_does(arch, kwargs, tmp_path):
    """Transformers 5 takes Transformers 4's StaticCache keywords and allocates from the first keys;
    storage made up front that those keys do not fit is made again from them."""
    hf, ours = make_pair(arch, tmp_path)
    ids, _ = make_inputs(hf.config.vocab_size, 2, 7, None, seed=5)
    theirs, mine = _pair_caches(arch, hf, ours, "static", **kwargs)
    for chunk in (ids[:, :5], ids[:, 5:6], ids[:, 6:]):
        close(ours(chunk, past_key_values=mine).logits, hf(chunk, past_key_values=theirs).logits, str(kwargs))
    assert mine.layers[0].keys.dtype == theirs.layers[0].keys.dtype == torch.float32
    assert mine.layers[0].keys.shape == theirs.layers[0].keys.shape


def _same_generate(hf, ours, ids, theirs, mine, **gen) -> None:
    """Both libraries' generate from the same seed, each with its cache: the same tokens."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    torch.manual_seed(seed)
    want = hf.generate(ids, past_key_values=theirs, **gen)
    torch.manual_seed(seed)
    got = ours.generate(ids, past_key_values=mine, **gen)
    assert torch.equal(got, want), (gen, got, want)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("kwargs", [{"num_beams": 3}, {"num_beams": 2, "num_return_sequences": 2},
                                    {"do_sample": True, "num_return_sequences": 3}])
@torch.no_grad()
def test_static_cache_of_one_row_made_up_front_serves_beams_as_transformers(arch, kwargs, tmp_path):
    """A StaticCache made up front for one row (Transformers 4's max_batch_size) passed to beam search
    or to several sampled sequences per prompt: Transformers 5 allocates from the first keys, so the
    rows that generate needs are made then; the tokens are Transformers'."""
    hf, ours = make_pair(arch, tmp_path)
    ids, _ = make_inputs(hf.config.vocab_size, 1, 6, None, seed=int(torch.randint(0, 2**31 - 1, ())))
    theirs, mine = _pair_caches(arch, hf, ours, "static", max_batch_size=1, device="cpu", dtype=torch.float32)
    _same_generate(hf, ours, ids, theirs, mine, **{"max_new_tokens": 4, "do_sample": False, **kwargs})
    assert mine.layers[0].keys.shape[0] == kwargs.get("num_beams", kwargs.get("num_return_sequences"))


def test_static_cache_batch_size_and_max_batch_size_must_agree():
    config = PHIMOE.our_config()
    with pytest.raises(ValueError, match="batch_size=2 and max_batch_size=3 differ"):
        StaticCache(config, max_cache_len=8, batch_size=2, max_batch_size=3)
    cache = StaticCache(config, max_cache_len=8, batch_size=2, max_batch_size=2, device="cpu", dtype=torch.float32)
    assert cache.layers[0].keys.shape[0] == 2


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@torch.no_grad()
def test_early_initialization_as_transformers(arch, tmp_path):
    hf, ours = make_pair(arch, tmp_path)
    ids, _ = make_inputs(hf.config.vocab_size, 2, 6, None, seed=2)
    theirs, mine = _pair_caches(arch, hf, ours, "static")
    heads, width = (hf.config.num_key_value_heads, hf.config.kv_channels) if arch is JETMOE else \
        (hf.config.num_key_value_heads, hf.config.hidden_size // hf.config.num_attention_heads)
    for cache in (theirs, mine):
        cache.early_initialization(2, heads, width, torch.float32, "cpu")
    assert mine.layers[0].keys.shape == theirs.layers[0].keys.shape and mine.layers[0].is_initialized
    storage = mine.layers[1].keys
    close(ours(ids, past_key_values=mine).logits, hf(ids, past_key_values=theirs).logits, "after early init")
    assert mine.layers[1].keys.data_ptr() == storage.data_ptr()  # (the storage made up front serves)
    layers = len(mine)
    with pytest.raises(ValueError, match="differs between layers"):
        StaticCache(ours.config, max_cache_len=8).early_initialization(1, [heads] * (layers - 1) + [heads + 1],
                                                                        width, torch.float32, "cpu")
    with pytest.raises(ValueError, match=f"3 entries for a cache of {layers} layers"):
        StaticCache(ours.config, max_cache_len=8).early_initialization(1, [heads] * 3, width, torch.float32, "cpu")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("kind", ["dynamic", "static"])
@torch.no_grad()
def test_cache_layer_members_as_transformers(arch, kind, tmp_path):
    hf, ours = make_pair(arch, tmp_path)
    ids, _ = make_inputs(hf.config.vocab_size, 2, 6, None, seed=4)
    theirs, mine = _pair_caches(arch, hf, ours, kind)
    hf(ids, past_key_values=theirs)
    ours(ids, past_key_values=mine)
    assert mine.is_dummy == theirs.is_dummy == [False] * len(theirs)
    for a, b in zip(theirs.layers, mine.layers):
        assert (b.get_max_length(), b.get_mask_sizes(3), b.is_sliding, b.dtype, b.device, b.is_compileable,
                b.is_croppable) == (a.get_max_length(), a.get_mask_sizes(3), a.is_sliding, a.dtype, a.device,
                                    a.is_compileable, a.is_croppable)
        if kind == "static":
            assert b.max_cache_len == a.max_cache_len == 12
            with pytest.raises(AttributeError):
                a.crop(-1)
            with pytest.raises(AttributeError, match="cache.crop"):
                b.crop(-1)
    if kind == "dynamic":
        for cache in (theirs, mine):
            cache.layers[0].crop(-2)
            with pytest.raises(ValueError):
                cache.layers[0].crop(2)
        assert [(b.get_seq_length(), b.keys.shape) for b in mine.layers] == \
            [(a.get_seq_length(), a.keys.shape) for a in theirs.layers]
        close(mine.layers[0].keys, theirs.layers[0].keys, "layer 0 cropped")
    for cache in (theirs, mine):
        cache.layers[1].reset()
    if kind == "static":  # (its token count is the cache's, which a layer's reset leaves: `cache.reset()` clears it)
        assert not mine.layers[1].keys.any() and not theirs.layers[1].keys.any()
    else:
        assert [b.get_seq_length() for b in mine.layers] == [a.get_seq_length() for a in theirs.layers]


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("index", [[1], [0, 1, 1]])
@torch.no_grad()
def test_static_reorder_to_another_batch_as_transformers(arch, index, tmp_path):
    hf, ours = make_pair(arch, tmp_path)
    ids, _ = make_inputs(hf.config.vocab_size, 2, 6, None, seed=6)
    theirs, mine = _pair_caches(arch, hf, ours, "static")
    hf(ids[:, :5], past_key_values=theirs)
    ours(ids[:, :5], past_key_values=mine)
    for cache in (theirs, mine):
        cache.reorder_cache(torch.tensor(index))
    step = ids[index, 5:6]
    close(ours(step, past_key_values=mine).logits, hf(step, past_key_values=theirs).logits, f"after {index}")
    assert mine.layers[0].keys.shape == theirs.layers[0].keys.shape


@torch.no_grad()
def test_a_4d_mask_at_the_longrope_switch_is_refused_and_the_cache_kept(tmp_path):
    """Crossing LongRoPE's switch recomputes the cached tokens under the other factors, with the
    step's mask over them: a 4D mask has the new tokens' rows alone, so it is refused, before the
    cache changes, and the 2D mask then gives Transformers' numbers."""
    rope = longrope_scaling(8, original=8, seed=3)
    rope["short_factor"], rope["short_mscale"] = rope["long_factor"], rope["long_mscale"]  # (Transformers: exact)
    hf, ours = make_pair(PHIMOE, tmp_path, rope_scaling=rope, max_position_embeddings=64)
    ids, _ = make_inputs(hf.config.vocab_size, 1, 11, None, seed=8)
    theirs, mine = transformers.DynamicCache(), DynamicCache()
    hf(ids[:, :8], past_key_values=theirs)
    ours(ids[:, :8], past_key_values=mine)
    q, k = torch.arange(8, 11)[:, None], torch.arange(11)[None]
    mask_4d = torch.zeros(1, 1, 3, 11).masked_fill(k > q, torch.finfo(torch.float32).min)
    with pytest.raises(ValueError, match="4D mask holds the rows of the 3 new tokens alone: pass the 2D mask"):
        ours(ids[:, 8:], past_key_values=mine, attention_mask=mask_4d)
    assert mine.get_seq_length() == 8 and not mine.rope_long
    expected = hf(ids[:, 8:], past_key_values=theirs, attention_mask=mask_4d).logits
    close(ours(ids[:, 8:], past_key_values=mine, attention_mask=torch.ones(1, 11, dtype=torch.long)).logits,
          expected, "2D mask across the switch")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@torch.no_grad()
def test_a_mask_of_another_width_without_a_cache_is_refused_as_transformers_refuses_it(arch, tmp_path):
    hf, ours = make_pair(arch, tmp_path)
    ids, _ = make_inputs(hf.config.vocab_size, 2, 5, None, seed=2)
    wide = torch.ones(2, 7, dtype=torch.long)
    with pytest.raises(Exception):  # noqa: B017 -- (Transformers' error is a shape error from its mask code)
        hf(ids, attention_mask=wide, use_cache=False)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[batch, seq\] = \[2, 5\] for a forward "
                                         r"without a cache, got \(2, 7\)"):
        ours(ids, attention_mask=wide, use_cache=False)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_a_static_cache_of_other_rows_is_refused_before_it_changes(arch, tmp_path):
    """A StaticCache used for another batch counted the step's tokens before its batch check failed
    (a reset cache then claimed tokens it did not hold, and refused its own batch after); a
    left-padded batch larger than its rows failed with a bare IndexError."""
    _, ours = make_pair(arch, tmp_path, seed=0)
    V = arch.base["vocab_size"]
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, max_new_tokens=3)
    ids2, mask2 = make_inputs(V, 2, 6, "left", seed=3)
    cache = StaticCache(config=ours.config, max_cache_len=40)
    ours(ids2, past_key_values=cache)
    for rows in (1, 3):
        with pytest.raises(ValueError, match=f"StaticCache holds 2 rows .* gives keys of {rows} rows"):
            ours(torch.randint(1, V, (rows, 1)), past_key_values=cache)
        assert cache.get_seq_length() == 6
    cache.reset()
    ids4, mask4 = make_inputs(V, 4, 6, "left", seed=4)
    for ids, mask, match in ((ids2[:1], None, "gives keys of 1 rows"), (ids4, mask4, "writes rows 0 to 3")):
        with pytest.raises(ValueError, match=f"past_key_values: the StaticCache holds 2 rows.*{match}"):
            ours.generate(ids, attention_mask=mask, past_key_values=cache, **kw)
        assert cache.get_seq_length() == 0
    want = ours.generate(ids2, attention_mask=mask2, **kw)  # its own batch still runs on it
    assert torch.equal(ours.generate(ids2, attention_mask=mask2, past_key_values=cache, **kw), want)


# ---- a forward that fails leaves the cache as it was ------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("failing_layer", [0, 1])
@torch.no_grad()
def test_failed_forward_adds_no_tokens_to_the_cache(arch, kind, failing_layer, monkeypatch, tmp_path):
    """A forward that raises inside the layers (out of memory, an interrupt) leaves the cache holding
    the tokens it held before: the next forward continues from them as Transformers' model does."""
    hf, ours = make_pair(arch, tmp_path)
    ids, _ = make_inputs(hf.config.vocab_size, 2, 9, None, seed=int(torch.randint(0, 2**31 - 1, ())))
    cache = new_cache(kind, ours)
    ours(ids[:, :5], past_key_values=cache)
    layer = ours.model.layers[failing_layer]
    with monkeypatch.context() as m:
        def fail(*args, **kwargs):
            raise RuntimeError("CUDA out of memory (simulated)")
        m.setattr(layer, "forward", fail)
        with pytest.raises(RuntimeError, match="simulated"):
            ours(ids[:, 5:7], past_key_values=cache)
    assert cache.get_seq_length() == 5
    close(ours(ids[:, 5:], past_key_values=cache).logits, hf(ids).logits[:, 5:], "after the failed forward")
    assert cache.get_seq_length() == 9


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("positions", [(6, 11), (-1, 4)])
@torch.no_grad()
def test_cache_position_outside_static_slots_is_named(arch, positions):
    model = tiny(arch)
    ids, _ = make_inputs(model.config.vocab_size, 1, 5, None, seed=1)
    cache = StaticCache(model.config, max_cache_len=8)
    with pytest.raises(ValueError, match=rf"cache_position runs from {positions[0]} to {positions[1] - 1}, "
                                         r"outside the static cache's 8 slots"):
        model(ids, past_key_values=cache, cache_position=torch.arange(*positions))
    assert cache.get_seq_length() == 0
    full = model(ids).logits
    close(model(ids, past_key_values=cache, cache_position=torch.arange(5)).logits, full, "after the error")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@torch.no_grad()
def test_cache_of_another_model_is_named(arch):
    small, big = tiny(arch), tiny(arch, num_hidden_layers=3)
    ids, _ = make_inputs(small.config.vocab_size, 1, 5, None, seed=2)
    fewer = StaticCache(small.config, max_cache_len=16)
    with pytest.raises(ValueError, match="the StaticCache holds 2 layers, and the model has 3"):
        big(ids, past_key_values=fewer)
    assert fewer.get_seq_length() == 0
    other = tiny(arch, num_key_value_heads=small.config.num_key_value_heads * 2,
                 num_attention_heads=small.config.num_attention_heads * 2)
    filled = DynamicCache()
    other(ids, past_key_values=filled)
    with pytest.raises(ValueError, match=r"DynamicCache's layer 0 holds keys of 1 rows of \d+ kv heads"):
        small(ids, past_key_values=filled)
    assert filled.get_seq_length() == 5


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@pytest.mark.parametrize("retry", [5, 1])
@torch.no_grad()
def test_failed_forward_across_longrope_switch_leaves_the_cache_as_it_was(kind, retry, monkeypatch, tmp_path):
    """A forward across LongRoPE's switch computes the cached tokens again under the long factors;
    when it fails inside its layers, the cache holds its 14 tokens still (a static cache's slots,
    part rewritten, are computed again by the next forward), and the next forward, across the
    switch (5 tokens) or not (1 token), gives the logits of a forward over all tokens (Transformers'
    own, or past the switch Transformers' with the long factors in place of the short, as
    test_long_factors_match_the_original_model_rule)."""
    hf, ours = make_pair(PHIMOE, tmp_path, seed=11, rope_scaling=longrope_scaling(8, original=16),
                         max_position_embeddings=64)
    if retry == 5:
        rope = dict(hf.config.rope_parameters)
        rope["short_factor"], rope["short_mscale"] = rope["long_factor"], rope["long_mscale"]
        state, hf = hf.state_dict(), transformers.PhimoeForCausalLM(
            transformers.PhimoeConfig(**{**hf.config.to_dict(), "rope_parameters": rope})).eval()
        hf.load_state_dict(state)
        hf.set_attn_implementation("eager")
    ids, _ = make_inputs(hf.config.vocab_size, 1, 19, None, seed=int(torch.randint(0, 2**31 - 1, ())))
    cache = new_cache(kind, ours, max_len=32)
    ours(ids[:, :14], past_key_values=cache)
    with monkeypatch.context() as m:
        def fail(*args, **kwargs):
            raise torch.OutOfMemoryError("simulated")
        m.setattr(ours.model.layers[1], "forward", fail)
        with pytest.raises(torch.OutOfMemoryError):
            ours(ids[:, 14:], past_key_values=cache)  # 19 tokens: past the switch at 16
    assert cache.get_seq_length() == 14
    want = hf(ids[:, :14 + retry]).logits[:, 14:]
    close(ours(ids[:, 14:14 + retry], past_key_values=cache).logits, want, f"the next forward ({retry} tokens)")
    assert cache.get_seq_length() == 14 + retry


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@torch.no_grad()
def test_failed_first_forward_leaves_a_dynamic_cache_empty(arch, monkeypatch, tmp_path):
    """An empty DynamicCache whose first forward fails (out of memory at batch 4) is empty still:
    a retry at a smaller batch, the usual answer to running out of memory, is taken."""
    hf, ours = make_pair(arch, tmp_path)
    ids, _ = make_inputs(hf.config.vocab_size, 4, 6, None, seed=int(torch.randint(0, 2**31 - 1, ())))
    cache = DynamicCache()
    with monkeypatch.context() as m:
        def fail(*args, **kwargs):
            raise torch.OutOfMemoryError("simulated")
        m.setattr(ours.model.layers[1], "forward", fail)
        with pytest.raises(torch.OutOfMemoryError):
            ours(ids, past_key_values=cache)
    assert len(cache) == 0 and not cache.is_initialized and cache.get_seq_length() == 0
    close(ours(ids[:2], past_key_values=cache).logits, hf(ids[:2]).logits, "the retry at batch 2")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@torch.no_grad()
def test_static_cache_keeps_its_rows_after_generate(arch, tmp_path):
    """A StaticCache made up front for 2 rows serves 2 sampled sequences per prompt (Transformers'
    tokens for the same seed); after reset() it keeps those rows, as a cache that held keys keeps
    them through reset (Transformers' fails inside torch at 4): 4 sequences are a ValueError that
    says so, with a prompt alone generated (one token) too, and 2 are served again."""
    hf, ours = make_pair(arch, tmp_path)
    ids, _ = make_inputs(hf.config.vocab_size, 1, 5, None, seed=int(torch.randint(0, 2**31 - 1, ())))
    theirs, mine = _pair_caches(arch, hf, ours, "static", max_batch_size=2, device="cpu", dtype=torch.float32)
    for new in (3, 1):
        _same_generate(hf, ours, ids, theirs, mine, max_new_tokens=new, do_sample=True, num_return_sequences=2)
        theirs.reset(), mine.reset()
        with pytest.raises(ValueError, match="the StaticCache holds 2 rows, and generate runs 4"):
            ours.generate(ids, past_key_values=mine, max_new_tokens=new, do_sample=True, num_return_sequences=4)
        mine.reset()
