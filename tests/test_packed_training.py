"""Packed sequences without a cache (training and scoring: positions that start again at 0, no
attention mask), as TRL's packing and padding-free collators give them. Where the varlen flash
kernel serves (a GPU), the attention takes one `Packed` over the batch's tokens instead of a
dense block-diagonal mask; `PACKED_VARLEN = True` runs that path here (each sequence through sdpa),
False the dense mask. Padded batches without a cache run unpadded the same way (`UNPAD_ROWS`).
Both are held to Transformers, forward and backward."""

from __future__ import annotations

import pytest
import torch
from archs import ARCH_IDS, ARCHS, JETMOE, PHIMOE, longrope_scaling
from parity import close, make_pair

from moetorch import DynamicCache, modeling_utils
from moetorch.models.heads import loss_positions
from moetorch.ops import attention as attention_ops
from moetorch.ops.attention import Packed, attention, token_runs


def switched(monkeypatch, switch: str, on: bool) -> list | None:
    """`modeling_utils.<switch>` set to `on`; where on, the list of the `Packed` that each packed
    attention call took."""
    monkeypatch.setattr(modeling_utils, switch, on)
    calls = []
    real = attention_ops.packed_attention

    def counted(q, k, v, packed, *args, **kwargs):
        calls.append(packed)
        return real(q, k, v, packed, *args, **kwargs)

    monkeypatch.setattr(attention_ops, "packed_attention", counted)
    return calls if on else None


@pytest.fixture(params=[True, False], ids=["varlen", "dense"])
def varlen(request, monkeypatch):
    """Each test runs with the varlen path and with the dense mask; counts the varlen calls."""
    return switched(monkeypatch, "PACKED_VARLEN", request.param)


def packed_batch(vocab: int, lengths: list[list[int]], seed: int):
    """Random ids [B, T] and positions counting from 0 in each sequence of each row."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    return torch.randint(1, vocab, pos.shape, generator=g), pos


def sdpa_pair(arch, tmp_path, seed, **overrides):
    """Transformers (eager, the reference) and moetorch on sdpa (the implementation that packs)."""
    hf, ours = make_pair(arch, tmp_path, "causal_lm", "hf_to_ours", seed=seed, **overrides)
    ours.set_attn_implementation("sdpa")
    return hf, ours


def same_step(a, b, hf, ours, real: torch.Tensor | None = None) -> None:
    """Transformers' output `a` and moetorch's `b` of one step: logits (the `real` tokens'), loss
    and aux loss; then every parameter's gradient of the loss."""
    close(a.logits if real is None else a.logits[real], b.logits if real is None else b.logits[real], "logits")
    close(a.loss, b.loss, "loss")
    close(a.aux_loss, b.aux_loss, "aux_loss")
    a.loss.backward()
    b.loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref = hf_params[name].grad
        assert (ref is None) == (p.grad is None), name
        if ref is not None:
            close(ref, p.grad, f"grad of {name}", atol=1e-5, rtol=1e-4)


def loss_and_grads(model, seed: int, **inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step of `model` (no cache, router logits out, the RNG at `seed`): its loss and every
    parameter's gradient."""
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(**inputs, output_router_logits=True, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def same_loss_and_grads(x, y) -> None:
    close(x[0], y[0], "loss")
    for name, g in x[1].items():
        close(g, y[1][name], f"grad of {name}", atol=1e-6, rtol=1e-5)


def check_calls(calls, layers: int, lengths: list[list[int]]) -> None:
    """With the varlen path, one packed attention a layer over every sequence of every row."""
    if calls is None:
        return
    want = tuple(n for row in lengths for n in row)
    assert len(calls) == layers and all(p.lens_q == p.lens_k == want for p in calls), [p.lens_q for p in calls]


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_packed_training_loss_and_gradients_match_transformers(arch, varlen, tmp_path):
    """Train mode (PhiMoE with its sliding window of 4, shorter than most sequences): logits,
    loss, auxiliary loss and every parameter's gradient as Transformers' over its packed mask."""
    hf, ours = sdpa_pair(arch, tmp_path, 10, **arch.train_overrides)
    hf.train()
    ours.train()
    lengths = [[5, 9, 2], [11, 1, 4]]
    ids, pos = packed_batch(hf.config.vocab_size, lengths, seed=3)
    runs = []
    for model in (hf, ours):
        torch.manual_seed(321)  # the same routing samples in both
        runs.append(model(ids, position_ids=pos, labels=ids, output_router_logits=True, use_cache=False))
    check_calls(varlen, ours.config.num_hidden_layers, lengths)
    same_step(*runs, hf, ours)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("lengths", [[[6, 6, 6]], [[18], [18]], [[1] * 18]], ids=["equal", "unpacked", "ones"])
def test_packed_shapes_score_as_transformers(arch, lengths, varlen, tmp_path):
    """Sequences of one length (one batched causal kernel), rows that hold one sequence each (the
    positions given but nothing packed), and one-token sequences; positions as one 1D row for
    every batch row where the rows are alike (Transformers takes them as [1, T])."""
    hf, ours = sdpa_pair(arch, tmp_path, 11)
    ids, pos = packed_batch(hf.config.vocab_size, lengths, seed=4)
    shared = len(lengths) > 1
    with torch.no_grad():
        a = hf(ids, position_ids=pos[:1] if shared else pos, labels=ids, use_cache=False)
        b = ours(ids, position_ids=pos[0] if shared else pos, labels=ids, use_cache=False)
    check_calls(varlen, ours.config.num_hidden_layers, lengths)
    close(a.logits, b.logits, "logits")
    close(a.loss, b.loss, "loss")


def test_longrope_reads_the_largest_packed_position(varlen, tmp_path):
    """LongRoPE's factor set follows the largest position + 1, not the row's length: sequences of
    12 tokens packed in rows of 24 keep the short factors (original length 16), as Transformers'
    mscale does, and each sequence's logits are those of its own forward."""
    hf, ours = sdpa_pair(PHIMOE, tmp_path, 12, **PHIMOE.variants["longrope"])
    lengths = [[12, 12], [5, 12, 7]]
    ids, pos = packed_batch(hf.config.vocab_size, lengths, seed=5)
    with torch.no_grad():
        a = hf(ids, position_ids=pos, use_cache=False).logits
        b = ours(ids, position_ids=pos, use_cache=False).logits
        close(a, b, "packed LongRoPE logits")
        close(b[0, 12:], ours(ids[:1, 12:], use_cache=False).logits[0], "the second sequence alone")
        # positions past the original length switch the whole forward to the long factors
        far = ours(ids, position_ids=pos + 8, use_cache=False).logits
        assert not torch.allclose(far, b, atol=1e-3)


@pytest.mark.parametrize("use_cache", [None, True], ids=["default", "cache"])
def test_longrope_reads_the_largest_position_with_a_cache(use_cache, tmp_path):
    """Positions given with no mask pick LongRoPE's factor set by their largest value + 1 also
    when the forward makes a cache (the default `use_cache`): packed rows of 24 tokens whose
    sequences stay under the original length (16) keep the short factors, as in Transformers (which
    then attends across the row, not per sequence); positions past the original length take the
    long ones from their first step. The cached keys then serve the next step. (Both factor lists
    alike, so the mscales show the switch: Transformers never applies `long_factor`.)"""
    scaling = longrope_scaling(8, original=16)
    scaling["short_factor"] = scaling["long_factor"]
    hf, ours = sdpa_pair(PHIMOE, tmp_path, 14, rope_scaling=scaling, max_position_embeddings=64)
    lengths = [[12, 12], [5, 12, 7]]
    ids, pos = packed_batch(hf.config.vocab_size, lengths, seed=6)
    with torch.no_grad():
        for shift in (0, 8):
            a = hf(ids, position_ids=pos + shift, use_cache=use_cache)
            b = ours(ids, position_ids=pos + shift, use_cache=use_cache)
            close(a.logits, b.logits, f"packed LongRoPE logits, positions + {shift}")
            nxt = torch.randint(0, hf.config.vocab_size, (2, 1), generator=torch.Generator().manual_seed(shift))
            step = pos[:, -1:] + 1 + shift
            a = hf(nxt, position_ids=step, past_key_values=a.past_key_values)
            b = ours(nxt, position_ids=step, past_key_values=b.past_key_values)
            close(a.logits, b.logits, f"the next step, positions + {shift}")


def test_varlen_packing_reads_the_sequences_and_stands_aside(monkeypatch, tmp_path):
    """`varlen_packing`: the lengths along the flattened rows (1D positions shared by every row);
    None without packed positions, with attention weights asked for, the eager implementation,
    layers over several devices, PACKED_VARLEN False, or (None) no varlen kernel here (the CPU)."""
    _, ours = sdpa_pair(JETMOE, tmp_path, 13)
    x = torch.zeros(2, 7, 4)
    pos = torch.tensor([0, 1, 2, 0, 1, 0, 1])
    segments = modeling_utils.packed_segments(pos, None, None, 2)
    monkeypatch.setattr(modeling_utils, "PACKED_VARLEN", True)
    packed = modeling_utils.varlen_packing(ours.model, segments, 3, False, x)
    assert packed.lens_q == packed.lens_k == (3, 2, 2, 3, 2, 2) and packed.window == 3
    assert packed.cu_q.tolist() == [0, 3, 5, 7, 10, 12, 14]
    assert modeling_utils.varlen_packing(ours.model, None, None, False, x) is None
    assert modeling_utils.varlen_packing(ours.model, segments, None, True, x) is None
    ours.model.spread_over_devices = True
    assert modeling_utils.varlen_packing(ours.model, segments, None, False, x) is None
    ours.model.spread_over_devices = False
    ours.set_attn_implementation("eager")
    assert modeling_utils.varlen_packing(ours.model, segments, None, False, x) is None
    ours.set_attn_implementation("sdpa")
    monkeypatch.setattr(modeling_utils, "PACKED_VARLEN", False)
    assert modeling_utils.varlen_packing(ours.model, segments, None, False, x) is None
    monkeypatch.setattr(modeling_utils, "PACKED_VARLEN", None)
    assert modeling_utils.varlen_packing(ours.model, segments, None, False, x) is None


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_attention_weights_of_packed_sequences_come_from_the_dense_mask(arch, monkeypatch, tmp_path):
    """`output_attentions=True` over packed sequences: the dense mask's path, with Transformers'
    weights, even where the varlen path would run."""
    monkeypatch.setattr(modeling_utils, "PACKED_VARLEN", True)
    hf, ours = sdpa_pair(arch, tmp_path, 14)
    ids, pos = packed_batch(hf.config.vocab_size, [[4, 6], [10]], seed=6)
    with torch.no_grad():
        a = hf(ids, position_ids=pos, output_attentions=True, use_cache=False)
        b = ours(ids, position_ids=pos, output_attentions=True, use_cache=False)
    close(a.logits, b.logits, "logits")
    for x, y in zip(a.attentions, b.attentions):
        close(x, y, "attention weights")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_packed_attention_dropout_in_training(arch, monkeypatch, tmp_path):
    """The varlen path takes the attention's dropout in train mode: a loss and gradients that the
    seed decides, that differ from the eval forward's, and none in eval mode."""
    monkeypatch.setattr(modeling_utils, "PACKED_VARLEN", True)
    _, ours = sdpa_pair(arch, tmp_path, 15, attention_dropout=0.5)
    ids, pos = packed_batch(ours.config.vocab_size, [[5, 7], [3, 9]], seed=7)
    with torch.no_grad():
        plain = ours(ids, position_ids=pos, labels=ids, use_cache=False).loss
    ours.train()
    losses = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        losses.append(ours(ids, position_ids=pos, labels=ids, use_cache=False).loss)
    assert losses[0].item() == losses[1].item() != losses[2].item()
    assert losses[0].item() != plain.item()
    losses[0].backward()
    q_proj = next(p for n, p in ours.named_parameters() if "kv_proj" in n or "q_proj" in n)
    assert q_proj.grad is not None and q_proj.grad.abs().sum() > 0
    ours.eval()
    with torch.no_grad():
        close(ours(ids, position_ids=pos, labels=ids, use_cache=False).loss, plain, "eval: no dropout")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_packed_training_under_bf16_autocast(arch, monkeypatch, tmp_path):
    """Mixed precision over float32 weights: the varlen path takes autocast's bf16 as sdpa does,
    and its loss and gradients agree with the dense mask's to bf16's rounding."""
    _, ours = sdpa_pair(arch, tmp_path, 16)
    ids, pos = packed_batch(ours.config.vocab_size, [[6, 10], [16]], seed=8)
    results = []
    for mode in (True, False):
        monkeypatch.setattr(modeling_utils, "PACKED_VARLEN", mode)
        ours.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ours(ids, position_ids=pos, labels=ids, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in ours.named_parameters()}))
    (a, grads_a), (b, grads_b) = results
    assert (a - b).abs() <= 1e-2 * b.abs()
    for name, g in grads_a.items():
        ref = grads_b[name]
        assert (g - ref).norm() <= 3e-2 * ref.norm() + 1e-6, name


@pytest.mark.parametrize("tiled", [False, True])
def test_attention_over_packed_rows_and_its_backward(tiled):
    """`attention` with a `Packed` over B > 1 rows reads the rows' tokens in order as one; its
    output and the gradients of queries, keys and values equal a dense block-diagonal mask's, in
    float64."""
    torch.manual_seed(9)
    B, T, H, G, d = 2, 7, 4, 2, 8
    lens = [3, 4, 2, 5]  # row 0: 3 + 4, row 1: 2 + 5
    q = torch.randn(B, H, T, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, G, T, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, G, T, d, dtype=torch.float64, requires_grad=True)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
    dense = torch.ones(T, T, dtype=torch.bool).tril() & (seg[:, None, :, None] == seg[:, None, None, :])
    layout = "tiled" if tiled else "grouped"
    grad = torch.randn(B, T, H, d, dtype=torch.float64)
    results = []
    for mask in (Packed.of(lens, lens, q.device), dense):
        out, _ = attention(q, k, v, mask, False, 0.3, kv_layout=layout)
        q.grad = k.grad = v.grad = None
        out.backward(grad)
        results.append((out.detach(), q.grad, k.grad, v.grad))
    for name, x, y in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_packed_training_with_gradient_checkpointing(arch, reentrant, monkeypatch, tmp_path):
    """Checkpointed layers (reentrant or not) recompute their packed attention from the same
    `Packed`: the loss and every gradient as without checkpointing."""
    monkeypatch.setattr(modeling_utils, "PACKED_VARLEN", True)
    _, ours = sdpa_pair(arch, tmp_path, 17)
    ours.train()
    ids, pos = packed_batch(ours.config.vocab_size, [[7, 9], [4, 12]], seed=9)
    plain = loss_and_grads(ours, 3, input_ids=ids, position_ids=pos, labels=ids)
    ours.gradient_checkpointing_enable({"use_reentrant": reentrant})
    same_loss_and_grads(plain, loss_and_grads(ours, 3, input_ids=ids, position_ids=pos, labels=ids))


# ---- padded batches, unpadded -------------------------------------------------------------------


@pytest.fixture(params=[True, False], ids=["unpadded", "padded"])
def unpad(request, monkeypatch):
    """Each test runs unpadded and padded; counts the packed attention calls."""
    return switched(monkeypatch, "UNPAD_ROWS", request.param)


def edge_padded(vocab: int, runs: list[tuple[int, int]], T: int, seed: int):
    """Ids [B, T] and a mask whose row b holds real tokens from runs[b][0] for runs[b][1] tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(runs), T), generator=g)
    mask = torch.zeros(len(runs), T, dtype=torch.long)
    for b, (start, n) in enumerate(runs):
        mask[b, start:start + n] = 1
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_padded_batch_runs_unpadded_as_transformers(arch, unpad, tmp_path):
    """No cache, right padding (and a row padded on both sides whose first real token is no
    target): loss, auxiliary loss, the real tokens' logits and every gradient as Transformers';
    unpadded, one packed attention a layer over the rows' real tokens alone. (Eval mode: in train
    mode PhiMoE's routing samples per token, and the unpadded rows draw for their real tokens
    alone; the next test covers it.)"""
    hf, ours = sdpa_pair(arch, tmp_path, 20, **arch.train_overrides)
    ids, mask = edge_padded(hf.config.vocab_size, [(0, 11), (0, 6), (3, 7), (0, 12)], 12, seed=1)
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, 3] = -100  # predicted from a padding position: no target, so the padding is not read
    a, b = (model(ids, attention_mask=mask, labels=labels, output_router_logits=True, use_cache=False)
            for model in (hf, ours))
    if unpad is not None:
        assert len(unpad) == ours.config.num_hidden_layers and all(p.lens_q == (11, 6, 7, 12) for p in unpad)
    same_step(a, b, hf, ours, real=mask.bool())


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_unpadded_training_step_is_the_packed_rows_step(arch, monkeypatch, tmp_path):
    """Train mode: a right-padded batch, unpadded, takes the step of its real tokens packed in one
    row (positions starting again at each sequence, the boundaries no target): the same routing
    draws (PhiMoE's sampling, jitter), loss and gradients."""
    monkeypatch.setattr(modeling_utils, "UNPAD_ROWS", True)
    monkeypatch.setattr(modeling_utils, "PACKED_VARLEN", True)
    _, ours = sdpa_pair(arch, tmp_path, 24, **arch.train_overrides)
    ours.train()
    lengths = [9, 4, 12]
    ids, mask = edge_padded(ours.config.vocab_size, [(0, n) for n in lengths], 12, seed=4)
    flat = ids[mask.bool()][None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    packed_labels = flat.clone()
    packed_labels[0, torch.tensor(lengths).cumsum(0)[:-1]] = -100  # each sequence's first token
    same_loss_and_grads(
        loss_and_grads(ours, 6, input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)),
        loss_and_grads(ours, 6, input_ids=flat, position_ids=pos, labels=packed_labels))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_padded_batch_with_the_default_cache_runs_unpadded(mode, unpad, tmp_path):
    """Transformers' default `use_cache=True` (the forward builds an empty dynamic cache, as in a
    Trainer's training or evaluation step): the step of a right-padded batch is Transformers'
    (JetMoE: no routing draws in train mode), and the cache it returns holds Transformers' keys
    and values at the real tokens' slots, zeros at the padding's where the batch ran unpadded
    (Transformers' there are the padding tokens' own, which any later step under the same mask
    ignores). A cache passed in, as generate passes its own, keeps the batch as given."""
    hf, ours = sdpa_pair(JETMOE, tmp_path, 25, **JETMOE.train_overrides)
    hf.train(mode == "train")
    ours.train(mode == "train")
    ids, mask = edge_padded(hf.config.vocab_size, [(0, 10), (0, 4), (0, 7)], 10, seed=5)
    labels = ids.masked_fill(mask == 0, -100)
    a, b = (model(ids, attention_mask=mask, labels=labels, output_router_logits=True) for model in (hf, ours))
    layers = ours.config.num_hidden_layers
    if unpad is not None:
        assert len(unpad) == layers and all(p.lens_q == (10, 4, 7) for p in unpad)
    real = mask.bool()
    assert isinstance(b.past_key_values, DynamicCache) and b.past_key_values.get_seq_length() == 10
    for theirs, mine in zip(a.past_key_values.layers, b.past_key_values.layers, strict=True):
        for x, y in ((theirs.keys, mine.keys), (theirs.values, mine.values)):
            assert y.shape == x.shape
            close(x.transpose(1, 2)[real], y.transpose(1, 2)[real], "cached keys and values")
            if unpad is not None:
                assert not y.transpose(1, 2)[~real].any()
    same_step(a, b, hf, ours, real=real)
    with torch.no_grad():
        given = ours(ids, attention_mask=mask, past_key_values=DynamicCache()).past_key_values
    assert unpad is None or len(unpad) == layers  # no packed attention: the batch ran as given
    first = a.past_key_values.layers[0]  # the padding's keys and values too (no attention before them)
    close(first.keys, given.layers[0].keys, "first layer's keys")
    close(first.values, given.layers[0].values, "first layer's values")


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_unpadded_training_step_with_the_default_cache(arch, monkeypatch, tmp_path):
    """Train mode, unpadded: the step with the default cache is the step without one (the same
    routing draws, loss and gradients), and its first layer's cached keys and values (which no
    routing precedes) are the padded forward's at the real slots. Only the cache a forward builds
    lets the batch run unpadded."""
    monkeypatch.setattr(modeling_utils, "UNPAD_ROWS", True)
    _, ours = sdpa_pair(arch, tmp_path, 26, **arch.train_overrides)
    ours.train()
    ids, mask = edge_padded(ours.config.vocab_size, [(0, 8), (0, 3), (0, 5)], 8, seed=6)
    labels = ids.masked_fill(mask == 0, -100)
    without = loss_and_grads(ours, 7, input_ids=ids, attention_mask=mask, labels=labels)
    ours.zero_grad()
    torch.manual_seed(7)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    out.loss.backward()
    same_loss_and_grads(without, (out.loss.detach(), {n: p.grad for n, p in ours.named_parameters()}))
    monkeypatch.setattr(modeling_utils, "UNPAD_ROWS", False)
    torch.manual_seed(7)
    padded = ours(input_ids=ids, attention_mask=mask, labels=labels).past_key_values
    real = mask.bool()
    for x, y in ((padded.layers[0].keys, out.past_key_values.layers[0].keys),
                 (padded.layers[0].values, out.past_key_values.layers[0].values)):
        close(x.transpose(1, 2)[real], y.transpose(1, 2)[real], "first layer's cache")
    assert modeling_utils._writes_unpadded(None, DynamicCache())
    assert not modeling_utils._writes_unpadded(DynamicCache(), DynamicCache())  # passed in
    assert not modeling_utils._writes_unpadded(None, padded)  # holds tokens
    assert not modeling_utils._writes_unpadded(None, None)


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_unpadded_outputs_are_zero_at_the_padding(arch, unpad, tmp_path):
    """The base model's hidden states and router logits: the real tokens' as Transformers', zeros
    at the padding (unpadded); a row with no real token at all is zeros throughout."""
    hf, ours = sdpa_pair(arch, tmp_path, 21)
    hf, ours = hf.model, ours.model
    ids, mask = edge_padded(ours.config.vocab_size, [(0, 9), (0, 0), (2, 7)], 9, seed=2)
    flags = dict(attention_mask=mask, output_hidden_states=True, output_router_logits=True, use_cache=False)
    with torch.no_grad():
        a, b = hf(ids, **flags), ours(ids, **flags)
    real = mask.bool()
    assert len(a.hidden_states) == len(b.hidden_states)
    for x, y in zip((a.last_hidden_state, *a.hidden_states), (b.last_hidden_state, *b.hidden_states)):
        close(x[real], y[real], "hidden states")
        if unpad is not None:
            assert not y[~real].any()
    for x, y in zip(a.router_logits, b.router_logits):
        assert x.shape == y.shape
        close(x[real.flatten()], y[real.flatten()], "router logits")
        if unpad is not None:
            assert not y[~real.flatten()].any()


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_padded_classification_runs_unpadded(arch, unpad, tmp_path):
    """A classifier reads each row's last real token, which the unpadded rows compute as
    Transformers does (its loss reads no padding)."""
    hf, ours = make_pair(arch, tmp_path, "seq_cls", "hf_to_ours", seed=22, num_labels=3)
    ours.set_attn_implementation("sdpa")
    ids, mask = edge_padded(ours.config.vocab_size, [(0, 8), (0, 5), (0, 3)], 8, seed=3)
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        a = hf(ids, attention_mask=mask, labels=labels, use_cache=False)
        b = ours(ids, attention_mask=mask, labels=labels, use_cache=False)
    close(a.logits, b.logits, "classifier logits")
    close(a.loss, b.loss, "classifier loss")
    if unpad is not None:
        assert len(unpad) == ours.config.num_hidden_layers


def test_padded_batches_that_stay_padded(monkeypatch, tmp_path):
    """`unpadded_rows` declines (the forward runs as given) without padding, with a cache, with a
    row whose real tokens are not one run, where the loss reads a padding position (left padding:
    the first real token is predicted from the padding), with attention weights asked for, or,
    by default, off the GPU."""
    _, ours = sdpa_pair(PHIMOE, tmp_path, 23)
    model = ours.model
    x = torch.zeros(2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    ids = torch.ones(2, 6, dtype=torch.long)

    def rows(m=mask, cache=None, attentions=False, positions=None):
        return modeling_utils.unpadded_rows(model, m, cache, None, attentions, x, positions)

    monkeypatch.setattr(modeling_utils, "UNPAD_ROWS", True)
    index, packed = rows()
    assert index.tolist() == [0, 1, 2, 3, 8, 9, 10, 11] and packed.lens_q == (4, 4)
    assert rows(torch.ones(2, 6, dtype=torch.long)) is None
    assert rows(cache=DynamicCache()) is None
    assert rows(torch.tensor([[1, 0, 1, 1, 0, 0], [1] * 6])) is None
    assert rows(torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0]])) is None  # longer than the tokens
    assert rows(attentions=True) is None
    assert rows(positions=loss_positions(ids.masked_fill(mask == 0, -100), {})) is None  # left padding
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    assert rows(right, positions=loss_positions(ids.masked_fill(right == 0, -100), {})) is not None
    monkeypatch.setattr(modeling_utils, "UNPAD_ROWS", None)
    assert rows() is None
    monkeypatch.setattr(modeling_utils, "UNPAD_ROWS", False)
    assert rows() is None


def test_token_runs_of_a_mask():
    """Each row's first real token and count where every row's real tokens are one run (left,
    right or both sides padded, an empty row); None where a row has a gap."""
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    starts, lengths = token_runs(mask)
    assert starts.tolist()[:3] + starts.tolist()[4:] == [2, 0, 1, 0] and lengths.tolist() == [2, 3, 2, 0, 4]
    assert token_runs(torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]], dtype=torch.bool)) is None
    assert token_runs(torch.tensor([[0, 1, 0, 1]], dtype=torch.bool)) is None


def test_loss_positions_follow_the_loss():
    """The positions whose logits `causal_lm_loss` reads: t predicts label t + 1; `shift_labels`
    name the targets directly; `ignore_index` marks none."""
    labels = torch.tensor([[5, 6, -100, 7], [-100, 3, 4, 9]])
    assert loss_positions(labels, {}).tolist() == [[True, False, True, False], [True, True, True, False]]
    assert loss_positions(labels, {"ignore_index": 6}).tolist() == [[False, True, True, False],
                                                                    [True, True, True, False]]
    shifted = torch.tensor([[1, -100, 2, -100], [-100, -100, 4, 4]])
    assert loss_positions(labels, {"shift_labels": shifted}).tolist() == [[True, False, True, False],
                                                                          [False, False, True, True]]
    assert loss_positions(None, {}) is None
