"""The CUDA-graph decode step, through its CPU fallback (same buffers, same host bookkeeping)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from archs import ARCH_IDS, ARCHS, PHIMOE, longrope_scaling, randomize_
from parity import close, make_inputs

from moetorch import DynamicCache, StaticCache
from moetorch.engine import GraphedChunk, GraphedDecodeStep, GraphedPrefill
from moetorch.generation import utils as generation


def tiny(arch, seed=0, **overrides):
    model = arch.ours["causal_lm"](arch.our_config(**overrides))
    randomize_(model, seed, std=0.3)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@torch.no_grad()
def test_graphed_step_fallback_equals_plain_decode(arch):
    model = tiny(arch, seed=1)
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 5, "left")
    cache = StaticCache(model.config, max_cache_len=12)
    model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    step = GraphedDecodeStep(model, cache, batch=2)
    assert not step.enabled  # CPU
    ref_cache = DynamicCache()
    model(ids, attention_mask=mask, past_key_values=ref_cache, use_cache=True)
    tok = torch.tensor([[3], [4]])
    for t in range(5, 10):
        m = torch.cat([mask, torch.ones(2, t - 5 + 1, dtype=torch.long)], 1)
        pos = (m.cumsum(-1) - 1)[:, -1:]
        got = step(tok, m, pos, torch.tensor([t]))
        want = model(tok, attention_mask=m, position_ids=pos, past_key_values=ref_cache).logits[:, -1]
        close(got, want, f"step {t}")
        tok = got.argmax(-1, keepdim=True)
    assert cache.get_seq_length() == 10


@torch.no_grad()
def test_graphed_step_handles_the_longrope_switch():
    model = tiny(PHIMOE, seed=2, rope_scaling=longrope_scaling(8, original=8), max_position_embeddings=64)
    ids, _ = make_inputs(97, 1, 12, None, seed=4)
    cache = StaticCache(model.config, max_cache_len=16)
    model(ids[:, :5], past_key_values=cache, use_cache=True)
    step = GraphedDecodeStep(model, cache, batch=1)
    for t in range(5, 12):
        got = step(ids[:, t : t + 1], None, torch.tensor([[t]]), torch.tensor([t]))
        close(got, model(ids[:, : t + 1]).logits[:, -1], f"step {t}")
    assert cache.rope_long


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_generate_with_static_cache_uses_the_step_and_matches_dynamic(arch, monkeypatch):
    model = tiny(arch, seed=3)
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 4, "left")
    calls = []
    original = GraphedDecodeStep.__call__

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(GraphedDecodeStep, "__call__", counting)
    static = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert len(calls) == 5  # every token after the first comes from the graphed step
    dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(static, dynamic)
    model.decode_graphs = False
    calls.clear()
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert not calls


def test_graphed_step_needs_a_static_cache():
    model = tiny(PHIMOE)
    with pytest.raises(TypeError, match="StaticCache"):
        GraphedDecodeStep(model, DynamicCache(), batch=1)
    with pytest.raises(TypeError, match="StaticCache"):
        GraphedPrefill(model, DynamicCache(), batch=1)


def _static(model, ids, mask=None, **kw):
    return model.generate(ids, attention_mask=mask, do_sample=False, cache_implementation="static", **kw)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_generate_reuses_its_static_cache_and_step(arch):
    model = tiny(arch, seed=5)
    V = arch.base["vocab_size"]
    ids, mask = make_inputs(V, 2, 4, "left")
    first = _static(model, ids, mask, max_new_tokens=6)
    held = model._held_decode()
    cache, step = held.cache, held.step
    assert cache is not None and step is not None
    # rounded up to the bucket, within the model's positions (64 here)
    assert cache.max_cache_len == min(generation.STATIC_CACHE_BUCKET, model.config.max_position_embeddings)
    assert torch.equal(_static(model, ids, mask, max_new_tokens=6), first)
    assert held.cache is cache and held.step is step
    # other prompts of the same batch and length bucket: the zeroed cache, the same graphs
    for seed, n in ((7, 6), (8, 9)):
        other, other_mask = make_inputs(V, 2, 6, "left", seed=seed)
        got = _static(model, other, other_mask, max_new_tokens=n)
        assert held.cache is cache and held.step is step
        assert torch.equal(got, model.generate(other, attention_mask=other_mask, max_new_tokens=n, do_sample=False))
    # another batch size: a new cache and step
    one, _ = make_inputs(V, 1, 4, None, seed=9)
    got = _static(model, one, max_new_tokens=5)
    assert held.cache is not cache and held.cache.max_cache_len == cache.max_cache_len
    assert torch.equal(got, model.generate(one, max_new_tokens=5, do_sample=False))
    model.release_decode_cache()
    assert held.cache is None and held.step is None


def test_generate_keeps_no_cache_it_hands_back():
    model = tiny(PHIMOE, seed=6)
    ids, _ = make_inputs(PHIMOE.base["vocab_size"], 1, 4, None)
    out = _static(model, ids, max_new_tokens=4, return_dict_in_generate=True)
    assert model._held_decode().cache is None
    returned = out.past_key_values
    assert returned.get_seq_length() == 7
    _static(model, ids, max_new_tokens=4)
    assert model._held_decode().cache is not returned and returned.get_seq_length() == 7
    model.release_decode_cache()
    out = _static(model, ids, max_new_tokens=4, num_beams=2, return_dict_in_generate=True)
    assert model._held_decode().cache is None and out.past_key_values.get_seq_length() > 4


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_beam_search_replays_the_graphed_step_on_its_reordered_cache(arch, monkeypatch):
    model = tiny(arch, seed=11)
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 5, "left", seed=3)
    calls = []
    original = GraphedDecodeStep.__call__

    def counting(self, *args):
        calls.append(self)
        return original(self, *args)

    monkeypatch.setattr(GraphedDecodeStep, "__call__", counting)
    beams = dict(max_new_tokens=6, eos_token_id=None, num_beams=3, num_return_sequences=2)
    for settings in (dict(do_sample=False), dict(do_sample=True, top_k=8)):
        torch.manual_seed(4)
        static = model.generate(ids, attention_mask=mask, cache_implementation="static", **beams, **settings)
        assert len(calls) == 5  # every token after the first, for all 2 x 3 beams at once
        torch.manual_seed(4)
        assert torch.equal(static, model.generate(ids, attention_mask=mask, **beams, **settings))
        calls.clear()
    # The next call with as many rows replays the same step on the held cache.
    held = model._held_decode()
    step = held.step
    other, other_mask = make_inputs(arch.base["vocab_size"], 2, 5, "left", seed=4)
    got = _static(model, other, other_mask, **beams)
    assert held.step is step and set(calls) == {step}
    assert torch.equal(got, model.generate(other, attention_mask=other_mask, **beams, do_sample=False))


@pytest.mark.parametrize("arch", [*ARCHS, "longrope"], ids=[*ARCH_IDS, "phimoe-longrope"])
def test_beam_search_reads_its_static_cache_through_slot_rows(arch, monkeypatch):
    # Beam search on a static cache reorders the cache's slot_rows, not its keys and values, and runs
    # each prompt once for its beams: the same beams as moving the cache with every beam's prompt
    # (beam_slot_rows = False) and as a dynamic cache, LongRoPE's switch during the search included;
    # the cache handed back holds each row's own keys and values.
    model = (tiny(PHIMOE, seed=12, rope_scaling=longrope_scaling(8, original=8), max_position_embeddings=64)
             if arch == "longrope" else tiny(arch, seed=12))
    ids, mask = make_inputs(model.config.vocab_size, 2, 5, "left", seed=3)
    beams = dict(attention_mask=mask, max_new_tokens=8, eos_token_id=None, num_beams=3, num_return_sequences=2,
                 do_sample=False, return_dict_in_generate=True, output_scores=True)
    moves, prompts = [], []
    reorder, take = StaticCache.reorder_cache, StaticCache.take_prompt
    monkeypatch.setattr(StaticCache, "reorder_cache",
                        lambda self, idx: moves.append(self.slot_rows is None) or reorder(self, idx))
    monkeypatch.setattr(StaticCache, "take_prompt",
                        lambda self, view, step: prompts.append(view.keys[0].shape[0]) or take(self, view, step))
    outs = {}
    for name, rows, once in (("once", True, True), ("rows", True, False), ("moved", False, False)):
        monkeypatch.setattr(model, "beam_slot_rows", rows, raising=False)
        monkeypatch.setattr(model, "prompt_once", once, raising=False)
        moves.clear()
        outs[name] = model.generate(ids, cache_implementation="static", **beams)
        assert moves and all(moves) != rows
    assert prompts == [2]  # "once": the prompt ran for 2 rows (one per prompt), not 6
    dynamic = model.generate(ids, cache_implementation="dynamic", **beams)
    for name in ("once", "rows", "moved"):
        assert torch.equal(outs[name].sequences, dynamic.sequences), name
        assert torch.equal(outs[name].beam_indices, dynamic.beam_indices), name
        close(outs[name].scores[0], dynamic.scores[0], f"{name}: first step's scores")
    caches = {name: out.past_key_values for name, out in outs.items()}
    n = caches["moved"].get_seq_length()
    assert all(c.slot_rows is None and c.get_seq_length() == n for c in caches.values())
    # reading through slot_rows leaves the storage moving the cache leaves; the prompt run once
    # per group differs from six rows' only by rounding (other row counts)
    for x, y, z in zip(caches["rows"]._all, caches["moved"]._all, caches["once"]._all):
        assert torch.equal(x[:, :, :, :n], y[:, :, :, :n])
        close(z[:, :, :, :n], y[:, :, :, :n], "prompt once")
    assert arch != "longrope" or all(c.rope_long for c in caches.values())


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_beam_search_keeps_the_prompt_view_of_its_held_cache(arch):
    # Without a handed-back cache, the held cache's view of each group's first row and its graphed
    # prefill are kept and reused by the next call with as many beams; the tokens equal moving the cache.
    model = tiny(arch, seed=13)
    ids, mask = make_inputs(model.config.vocab_size, 2, 5, "left", seed=5)
    beams = dict(attention_mask=mask, max_new_tokens=6, eos_token_id=None, num_beams=3, do_sample=False)
    first = model.generate(ids, cache_implementation="static", **beams)
    held = model._held_decode()
    view, prefill = held.prompt_views[3]
    assert view.keys[0].shape[0] == 2 and view.keys[0].data_ptr() == held.cache.keys[0].data_ptr()
    assert torch.equal(model.generate(ids, cache_implementation="static", **beams), first)
    assert held.prompt_views[3][1] is prefill
    model.prompt_once = False
    assert torch.equal(model.generate(ids, cache_implementation="static", **beams), first)


@pytest.mark.parametrize("arch", [*ARCHS, "longrope"], ids=[*ARCH_IDS, "phimoe-longrope-long-prompt"])
def test_beam_search_prompt_once_with_embeddings_sampling_and_a_long_prompt(arch):
    # The prompt run once per group of beams: given as embeddings, for beam sampling, and (LongRoPE)
    # past the threshold from its start, against a dynamic cache, which runs every beam's prompt.
    model = (tiny(PHIMOE, seed=3, rope_scaling=longrope_scaling(8, original=8), max_position_embeddings=64)
             if arch == "longrope" else tiny(arch, seed=3))
    ids, mask = make_inputs(model.config.vocab_size, 2, 10 if arch == "longrope" else 6, "left", seed=3)
    beams = dict(attention_mask=mask, max_new_tokens=6, eos_token_id=None, num_beams=3)
    embeds = model.get_input_embeddings()(ids).detach()
    for inputs, settings in ((dict(inputs_embeds=embeds), dict(do_sample=False)),
                             (dict(input_ids=ids), dict(do_sample=True, top_k=5))):
        outs = []
        for cache in ("static", "dynamic"):
            torch.manual_seed(1)
            outs.append(model.generate(**inputs, cache_implementation=cache, **beams, **settings))
        assert torch.equal(*outs), f"{list(inputs)} {settings}"


@pytest.mark.parametrize("arch", [*ARCHS, "longrope"], ids=[*ARCH_IDS, "phimoe-longrope"])
def test_sampling_several_sequences_runs_each_prompt_once(arch, monkeypatch):
    # num_return_sequences > 1 on a static cache: each prompt runs once for its rows (which read it
    # through slot_rows), the draws equal a dynamic cache's (every row's prompt), and the cache
    # handed back holds each row's own keys and values.
    model = (tiny(PHIMOE, seed=14, rope_scaling=longrope_scaling(8, original=8), max_position_embeddings=64)
             if arch == "longrope" else tiny(arch, seed=14))
    ids, mask = make_inputs(model.config.vocab_size, 2, 5, "left", seed=6)
    settings = dict(attention_mask=mask, max_new_tokens=7, eos_token_id=None, do_sample=True, top_k=8,
                    num_return_sequences=3)
    prompts = []
    take = StaticCache.take_prompt
    monkeypatch.setattr(StaticCache, "take_prompt",
                        lambda self, view, step: prompts.append((view.keys[0].shape[0], step)) or take(self, view, step))
    outs = []
    for cache, once in (("static", True), ("static", False), ("dynamic", True)):
        monkeypatch.setattr(model, "prompt_once", once, raising=False)
        torch.manual_seed(2)
        outs.append(model.generate(ids, cache_implementation=cache, **settings))
    assert prompts == [(2, 3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    # held between calls: the view is kept and the next call's draws come out alike
    monkeypatch.setattr(model, "prompt_once", True, raising=False)
    torch.manual_seed(2)
    assert torch.equal(model.generate(ids, cache_implementation="static", **settings), outs[0])
    assert model._held_decode().cache.slot_rows is None  # settled
    torch.manual_seed(2)
    out = model.generate(ids, cache_implementation="static", return_dict_in_generate=True, **settings)
    n = out.past_key_values.get_seq_length()
    torch.manual_seed(2)
    monkeypatch.setattr(model, "prompt_once", False, raising=False)
    every = model.generate(ids, cache_implementation="static", return_dict_in_generate=True, **settings)
    assert torch.equal(out.sequences, every.sequences)
    for x, y in zip(out.past_key_values._all, every.past_key_values._all):
        close(x[:, :, :, :n], y[:, :, :, :n], "prompt once, handed back")


def test_the_held_cache_follows_the_weights():
    model = tiny(PHIMOE, seed=7)
    ids, _ = make_inputs(PHIMOE.base["vocab_size"], 1, 4, None)
    _static(model, ids, max_new_tokens=4)
    cache = model._held_decode().cache
    # a replaced parameter: the old graphs would read the old tensor
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 2)
    got = _static(model, ids, max_new_tokens=4)
    assert model._held_decode().cache is not cache
    assert torch.equal(got, model.generate(ids, max_new_tokens=4, do_sample=False))
    # in-place changes keep the tensors (and the graphs read the new values)
    cache = model._held_decode().cache
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
    got = _static(model, ids, max_new_tokens=4)
    assert model._held_decode().cache is cache
    assert torch.equal(got, model.generate(ids, max_new_tokens=4, do_sample=False))


def test_copies_and_pickles_of_a_model_hold_no_cache():
    model = tiny(PHIMOE, seed=8)
    ids, _ = make_inputs(PHIMOE.base["vocab_size"], 1, 4, None)
    want = _static(model, ids, max_new_tokens=4)
    copied = copy.deepcopy(model)
    assert copied._held_decode().cache is None and model._held_decode().cache is not None
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded._held_decode().cache is None
    assert torch.equal(_static(copied, ids, max_new_tokens=4), want)
    assert torch.equal(_static(loaded, ids, max_new_tokens=4), want)


@torch.no_grad()
def test_a_reused_cache_after_the_longrope_switch():
    model = tiny(PHIMOE, seed=2, rope_scaling=longrope_scaling(8, original=8), max_position_embeddings=64)
    ids, _ = make_inputs(97, 1, 12, None, seed=4)
    fresh = tiny(PHIMOE, seed=2, rope_scaling=longrope_scaling(8, original=8), max_position_embeddings=64)
    long_run = _static(model, ids[:, :5], max_new_tokens=7)  # crosses 8 tokens: the cache is rebuilt long
    assert model._held_decode().cache.rope_long
    short_run = _static(model, ids[:, 2:6], max_new_tokens=3)  # stays short: the reset cache starts short
    assert torch.equal(long_run, fresh.generate(ids[:, :5], max_new_tokens=7, do_sample=False))
    assert torch.equal(short_run, fresh.generate(ids[:, 2:6], max_new_tokens=3, do_sample=False))


@torch.no_grad()
def test_graphed_step_writes_its_mask_buffer_only_when_the_mask_changes():
    model = tiny(PHIMOE, seed=9)
    ids, mask = make_inputs(PHIMOE.base["vocab_size"], 2, 4, "left")
    cache = StaticCache(model.config, max_cache_len=12)
    model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    step = GraphedDecodeStep(model, cache, batch=2)
    tok = torch.tensor([[3], [4]])

    def run(m, t):
        pos = torch.full((2, 1), t) if m is None else (torch.cat([m, torch.ones(2, t - 3, dtype=torch.long)], 1)
                                                      .cumsum(-1) - 1)[:, -1:]
        got = step(tok, m, pos, t)
        full = torch.ones(2, 12, dtype=torch.long)
        if m is not None:
            full[:, : m.shape[1]] = m
        assert torch.equal(step.mask_BS, full) and int(step.cpos_1) == t and torch.equal(step.pos_B1, pos)
        return got

    run(mask, 4)
    version = step.mask_BS._version
    run(mask, 5)  # the same prompt mask: nothing to write
    assert step.mask_BS._version == version
    other = mask.clone()
    other[0, 0] = 0
    run(other, 6)  # another tensor
    other[1, 3] = 0
    run(other, 7)  # the same tensor, written in place
    run(None, 8)  # all ones
    version = step.mask_BS._version
    run(None, 9)
    assert step.mask_BS._version == version
    step(tok, None, 10, 10)  # ints for every row
    assert torch.equal(step.pos_B1, torch.full((2, 1), 10)) and int(step.cpos_1) == 10


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("padding", [None, "left"])
@torch.no_grad()
def test_graphed_prefill_fallback_pads_to_its_bucket_and_decodes_on(arch, padding):
    model = tiny(arch, seed=10)
    V = arch.base["vocab_size"]
    ids, mask = make_inputs(V, 2, 5, padding, seed=11)
    pos = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    cache = StaticCache(model.config, max_cache_len=24)
    prefill = GraphedPrefill(model, cache, batch=2)
    assert not prefill.enabled and prefill.bucket(5) == 16
    first = prefill(ids, mask, pos)  # padded to 16 tokens
    cache.reset()
    got = prefill(ids, mask, pos)
    assert torch.equal(got, first)  # one prompt, the same logits on every call
    assert cache.get_seq_length() == 5
    ref_cache = DynamicCache()
    want = model(ids, attention_mask=mask, position_ids=pos, past_key_values=ref_cache).logits[:, -1]
    close(got, want, "prefill")
    # decoding on: the padding's keys in slots 5..15 must not be seen
    tok = got.argmax(-1, keepdim=True)
    m = mask
    for t in range(5, 9):
        m = None if mask is None else torch.cat([m, torch.ones(2, 1, dtype=torch.long)], 1)
        p = torch.full((2, 1), t) if m is None else (m.cumsum(-1) - 1)[:, -1:]
        got = model(tok, attention_mask=m, position_ids=p, past_key_values=cache,
                    cache_position=torch.tensor([t])).logits[:, -1]
        want = model(tok, attention_mask=m, position_ids=p, past_key_values=ref_cache).logits[:, -1]
        close(got, want, f"step {t}")
        tok = want.argmax(-1, keepdim=True)


@torch.no_grad()
def test_graphed_prefill_declines_what_it_cannot_pad():
    model = tiny(PHIMOE, seed=12, rope_scaling=longrope_scaling(8, original=32), max_position_embeddings=64)
    ids, _ = make_inputs(PHIMOE.base["vocab_size"], 1, 20, None)
    cache = StaticCache(model.config, max_cache_len=48)
    prefill = GraphedPrefill(model, cache, batch=1)
    assert prefill.bucket(16) == 16 and prefill.bucket(17) == 32
    assert prefill.bucket(33) is None  # a bucket of 64 would switch LongRoPE to its long factors
    assert GraphedPrefill(tiny(PHIMOE), StaticCache(model.config, max_cache_len=20), 1).bucket(17) is None  # past the cache
    assert GraphedPrefill(tiny(PHIMOE), StaticCache(max_cache_len=4096, num_layers=1), 1).bucket(2049) is None
    assert prefill(ids[:, :20], None, None) is not None  # bucket 32
    model(ids[:, :2], past_key_values=cache, use_cache=True, cache_position=torch.arange(20, 22))
    assert prefill(ids[:, :20], None, None) is None  # a cache that holds tokens already
    other = StaticCache(model.config, max_cache_len=48)
    assert GraphedPrefill(model, other, batch=2)(ids[:, :3], None, None) is None  # another batch size


def test_generate_pads_every_prompt_of_a_bucket(monkeypatch):
    model = tiny(PHIMOE, seed=13)
    ids, _ = make_inputs(PHIMOE.base["vocab_size"], 1, 6, None)
    calls = []
    original = GraphedPrefill._run

    def counting(self, buf):
        calls.append(buf["ids"].shape[1])
        return original(self, buf)

    monkeypatch.setattr(GraphedPrefill, "_run", counting)
    want = model.generate(ids, max_new_tokens=5, do_sample=False)
    runs = [_static(model, ids, max_new_tokens=5) for _ in range(3)]
    assert calls == [16, 16, 16]  # every call's prompt padded to 16 tokens (on CPU never captured)
    assert all(torch.equal(r, want) for r in runs)
    _static(model, ids, max_new_tokens=5, return_dict_in_generate=True)  # a cache used once pads alike
    assert calls == [16] * 4
    model.prefill_graphs = False
    _static(model, ids, max_new_tokens=5)
    assert calls == [16] * 4


def test_generate_pads_and_continues_a_static_cache_passed_in():
    model = tiny(PHIMOE, seed=14)
    ids, _ = make_inputs(PHIMOE.base["vocab_size"], 1, 6, None)

    def run(prefill_graphs: bool):
        model.prefill_graphs = prefill_graphs
        cache = StaticCache(model.config, max_cache_len=40)
        first = model.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
        assert cache.get_seq_length() == 9 and model._held_decode().cache is None  # the caller's, never kept
        # the padding's keys sit in slots 9..15: the continuation must not see them
        return first, model.generate(first, past_key_values=cache, max_new_tokens=4, do_sample=False)

    padded, unpadded = run(True), run(False)
    assert torch.equal(padded[0], model.generate(ids, max_new_tokens=4, do_sample=False))
    assert torch.equal(padded[0], unpadded[0]) and torch.equal(padded[1], unpadded[1])


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_lagged_stop_on_the_held_cache(arch):
    """The step past the last writes the held cache; the next call zeroes it and gives the same tokens."""
    model = tiny(arch, seed=13)
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 5, "left", seed=6)
    free = _static(model, ids, mask, max_new_tokens=8, eos_token_id=None)[:, 5:]
    eos = [int(free[0, 2]), int(free[1, 4])]  # both rows stop within 5 tokens
    # references: a dynamic cache, the stop read each step (the CPU default)
    want = {n: model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, do_sample=False,
                              num_beams=n) for n in (1, 2)}
    assert want[1].shape[1] <= 5 + 5
    model.lagged_stop = True
    for beams in (1, 1, 2, 2):
        got = _static(model, ids, mask, max_new_tokens=8, eos_token_id=eos, num_beams=beams)
        assert torch.equal(got, want[beams]), f"{beams} beams"


# ---- assisted decoding's verify chunks (GraphedChunk) --------------------------------------------


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@torch.no_grad()
def test_graphed_chunk_fallback_pads_to_its_bucket_and_decodes_on(arch):
    model = tiny(arch, seed=20)
    V = arch.base["vocab_size"]
    ids, _ = make_inputs(V, 1, 14, None, seed=21)
    cache, ref = StaticCache(model.config, max_cache_len=40), DynamicCache()
    model(ids[:, :6], past_key_values=cache, use_cache=True)
    model(ids[:, :6], past_key_values=ref, use_cache=True)
    chunk = GraphedChunk(model, cache, batch=1)
    assert not chunk.enabled
    got = chunk(ids[:, 6:11], None, None, 6)  # 5 tokens, padded to 8
    assert got.shape == (1, 5, V) and cache.get_seq_length() == 11
    close(got, model(ids[:, 6:11], past_key_values=ref, use_cache=True).logits, "chunk")
    # a verify round keeps 2 of the tokens: the next chunk starts there; the padding and the
    # rejected tokens' slots are written again before anything reads them
    cache.crop(8)
    ref.crop(8)
    got = chunk(ids[:, 8:14], None, None, 8)
    close(got, model(ids[:, 8:14], past_key_values=ref, use_cache=True).logits, "chunk after crop")
    step = model(ids[:, :1], past_key_values=cache, cache_position=torch.tensor([14])).logits
    close(step, model(ids[:, :1], past_key_values=ref, use_cache=True).logits, "step after the chunks")


@torch.no_grad()
def test_graphed_chunk_declines_what_it_cannot_pad():
    model = tiny(PHIMOE, seed=22, rope_scaling=longrope_scaling(8, original=32), max_position_embeddings=128)
    ids, _ = make_inputs(PHIMOE.base["vocab_size"], 1, 70, None)
    cache = StaticCache(model.config, max_cache_len=100)
    model(ids[:, :20], past_key_values=cache, use_cache=True)
    chunk = GraphedChunk(model, cache, batch=1)
    assert chunk(ids[:, 20:23], None, None, 19) is None  # not at the cache's count
    assert chunk(ids[:, 20:23], None, torch.arange(20, 23)[None], 20) is None  # positions of its own
    assert chunk(ids[:, 20:90], None, None, 20) is None  # past the last bucket (64)
    assert chunk(ids[:, 20:30], None, None, 20) is None  # padded to 16: 36 slots, past LongRoPE's 32
    assert chunk(ids[:, 20:23].expand(2, -1), None, None, 20) is None  # another batch size
    assert chunk(ids[:, 20:23], None, None, 20) is not None  # padded to 4: 24
    short = StaticCache(model.config, max_cache_len=24)
    model(ids[:, :20], past_key_values=short, use_cache=True)
    assert GraphedChunk(model, short, batch=1)(ids[:, 20:23], None, None, 20) is not None  # 24 slots: fits
    short.crop(21)
    assert GraphedChunk(model, short, batch=1)(ids[:, 21:24], None, None, 21) is None  # 21 + 4 > 24
    with pytest.raises(TypeError, match="StaticCache"):
        GraphedChunk(model, DynamicCache(), batch=1)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("drafter", ["prompt_lookup", "assistant"])
def test_assisted_decoding_on_the_static_cache_runs_its_chunks(arch, drafter, monkeypatch):
    """On a GPU, assisted decoding takes the static cache by default, its verify forwards replaying
    GraphedChunk's graphs and its single tokens GraphedDecodeStep's; here their CPU fallbacks. The
    tokens are greedy search's, and sampling draws what the dynamic cache draws."""
    model = tiny(arch, seed=23)
    base, _ = make_inputs(arch.base["vocab_size"], 1, 8, None, seed=24)
    ids = torch.cat([base, base, base[:, :5]], dim=1)  # text that repeats: drafts to look up
    kw = dict(prompt_lookup_num_tokens=4) if drafter == "prompt_lookup" else dict(assistant_model=tiny(arch, seed=23))
    chunks, steps = [], []
    for cls, seen in ((GraphedChunk, chunks), (GraphedDecodeStep, steps)):
        original = cls.__call__
        monkeypatch.setattr(cls, "__call__", lambda self, *a, _o=original, _s=seen: _s.append(a[0].shape[1]) or _o(self, *a))
    greedy = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None)
    static = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None,
                            cache_implementation="static", **kw)
    assert torch.equal(static, greedy) and chunks and all(1 < n <= 64 for n in chunks)
    assert not steps or set(steps) == {1}
    held = model._held_decode()
    kept = held.cache, held.chunk
    assert isinstance(kept[1], GraphedChunk) and kept[1].cache is kept[0]
    again = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None,
                           cache_implementation="static", **kw)
    assert torch.equal(again, greedy) and (held.cache, held.chunk) == kept  # kept between calls
    chunks.clear()
    dynamic = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, **kw)
    assert torch.equal(dynamic, greedy) and not chunks
    draws = []
    for implementation in ("static", "dynamic"):
        torch.manual_seed(5)
        draws.append(model.generate(ids, max_new_tokens=16, do_sample=True, top_k=4, eos_token_id=None,
                                    cache_implementation=implementation, **kw))
    assert torch.equal(*draws)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_an_assistant_drafts_on_its_own_held_static_cache(arch, monkeypatch):
    """With the static cache, a moetorch assistant drafts on a static cache it holds between calls:
    its prompt through GraphedPrefill, single tokens through GraphedDecodeStep, and the tokens kept
    in the last round (a catch-up of several) through GraphedChunk, each the last token's logits;
    here their CPU fallbacks. The tokens are greedy search's and the dynamic cache's."""
    model = tiny(arch, seed=30)
    base, _ = make_inputs(arch.base["vocab_size"], 1, 7, None, seed=31)
    ids = torch.cat([base, base[:, :4]], dim=1)
    runs = {}  # (runner class, its model's role) -> token counts
    for cls in (GraphedChunk, GraphedDecodeStep, GraphedPrefill):
        original = cls.__call__

        def spy(self, *a, _o=original, _cls=cls.__name__):
            out = _o(self, *a)
            if out is not None:
                runs.setdefault((_cls, "target" if self.model is model else "assistant"), []).append(a[0].shape[1])
            return out

        monkeypatch.setattr(cls, "__call__", spy)
    greedy = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None)
    # 4 drafts a round, none stopped early by the assistant's confidence
    kw = dict(max_new_tokens=20, do_sample=False, eos_token_id=None, num_assistant_tokens=4,
              assistant_confidence_threshold=0.0)
    # the same weights (every draft kept: catch-ups of 2 tokens) and other weights (mostly rejected)
    for assistant in (tiny(arch, seed=30), tiny(arch, seed=32, num_hidden_layers=1)):
        runs.clear()
        got = model.generate(ids, **kw, cache_implementation="static", assistant_model=assistant)
        assert torch.equal(got, greedy)
        held = assistant._held_decode()
        assert isinstance(held.cache, StaticCache) and held.step.cache is held.cache
        assert runs[("GraphedPrefill", "assistant")] == [ids.shape[1]] and set(runs[("GraphedDecodeStep", "assistant")]) == {1}
        kept = held.cache, held.step, held.prefill, held.chunk
        again = model.generate(ids, **kw, cache_implementation="static", assistant_model=assistant)
        assert torch.equal(again, greedy) and (held.cache, held.step, held.prefill, held.chunk) == kept
        runs.clear()
        dynamic = model.generate(ids, **kw, cache_implementation="dynamic", assistant_model=assistant)
        assert torch.equal(dynamic, greedy) and not runs  # eager forwards on dynamic caches, as before
    same = tiny(arch, seed=30)
    runs.clear()
    model.generate(ids, **kw, cache_implementation="static", assistant_model=same)
    assert set(runs[("GraphedChunk", "assistant")]) == {2}  # the last draft and this model's token
    for implementation in ("static", "dynamic"):  # sampling draws the same from either
        torch.manual_seed(7)
        runs[implementation] = model.generate(ids, **{**kw, "do_sample": True, "top_k": 4},
                                              cache_implementation=implementation, assistant_model=same)
    assert torch.equal(runs["static"], runs["dynamic"])


def test_a_model_that_assists_itself_drafts_on_a_dynamic_cache():
    # its held static cache is the one it verifies on
    model = tiny(PHIMOE, seed=33)
    ids, _ = make_inputs(PHIMOE.base["vocab_size"], 1, 9, None, seed=34)
    kw = dict(max_new_tokens=10, do_sample=False, eos_token_id=None)
    got = model.generate(ids, **kw, cache_implementation="static", assistant_model=model)
    assert torch.equal(got, model.generate(ids, **kw))
    assert model._held_decode().step is not None


def test_assisted_decoding_on_the_static_cache_across_the_longrope_switch():
    # Chunks whose padding would cross the threshold run unpadded, and the one that crosses it
    # rebuilds the cache eagerly: the tokens of the dynamic cache. (Not greedy search's: a verify
    # forward's drafts count in the length that picks LongRoPE's factors, as in Transformers.)
    longrope = dict(rope_scaling=longrope_scaling(8, original=32), max_position_embeddings=128)
    model = tiny(PHIMOE, seed=25, **longrope)
    base, _ = make_inputs(PHIMOE.base["vocab_size"], 1, 6, None, seed=26)
    ids = torch.cat([base, base, base, base[:, :4]], dim=1)  # 22 tokens; 40 more cross 32
    for kw in (dict(prompt_lookup_num_tokens=6), dict(assistant_model=tiny(PHIMOE, seed=25, **longrope))):
        got = [model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None, cache_implementation=c, **kw)
               for c in ("static", "dynamic")]
        assert torch.equal(*got) and got[0].shape[1] == 62


def test_capture_holds_the_garbage_collector_off(monkeypatch):
    """A collection during a capture may destroy an unreachable CUDA graph, which invalidates the
    capture; `capture` holds Python's collector off while the graph is captured, in every thread,
    and puts it back as it was."""
    import contextlib
    import gc
    import threading

    from moetorch.engine import cuda_graph

    seen = []

    class FakeStream:
        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def fake_graph(graph, pool=None, capture_error_mode="global"):
        seen.append(("capture", gc.isenabled()))
        yield

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: FakeStream())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)

    def fn():
        seen.append(("run", gc.isenabled()))
        return 7

    was = gc.isenabled()
    try:
        gc.enable()
        graph, out = cuda_graph.capture(fn, warmups=2)
        assert out == 7 and seen == [("run", True), ("run", True), ("capture", False), ("run", False)]
        assert gc.isenabled()
        gc.disable()  # off before: off after
        cuda_graph.capture(fn, warmups=0)
        assert not gc.isenabled()
        gc.enable()

        # two threads capturing at once: the collector stays off until the last one leaves
        inside, leave = threading.Event(), threading.Event()

        def other():
            with cuda_graph.gc_held():
                inside.set()
                leave.wait(10)

        t = threading.Thread(target=other)
        t.start()
        assert inside.wait(10)
        with cuda_graph.gc_held():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the other thread still holds it
        leave.set()
        t.join(10)
        assert gc.isenabled()

        # an error inside lets go as well
        with pytest.raises(ZeroDivisionError), cuda_graph.gc_held():
            raise ZeroDivisionError
        assert gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()
