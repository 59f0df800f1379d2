"""generate() against Transformers' generate, token for token, for every architecture in ARCHS:
greedy, sampling, beam search, processors, stopping rules, caches, outputs, assisted decoding,
classifier-free guidance, stop strings, streamers and GenerationConfig I/O."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import threading

import pytest
import torch
import transformers
from archs import ARCH_IDS, ARCHS, randomize_
from parity import make_inputs, make_pair
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

import moetorch
from moetorch import (
    AsyncTextIteratorStreamer,
    DynamicCache,
    GenerationConfig,
    LogitsProcessorList,
    StaticCache,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
)
from moetorch.generation import MaxLengthCriteria, TopKLogitsWarper
from moetorch.generation.utils import STATIC_CACHE_BUCKET, GenerateArgumentError

VOCAB = 97


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy machine idle OpenMP workers spin
    # (a 50x slowdown seen with 2 threads on 2 loaded cores).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=ARCHS, ids=ARCH_IDS)
def pair(request, tmp_path_factory):
    """(Transformers model, moetorch model) with the same random weights (Transformers saved them)."""
    return make_pair(request.param, tmp_path_factory.mktemp(request.param.name), seed=0)


def both(pair, *args, seed=None, **kwargs):
    """Transformers' and our generate() on the same arguments (and the same RNG seed, if given)."""
    hf, ours = pair
    outs = []
    for model in (hf, ours):
        if seed is not None:
            torch.manual_seed(seed)
        outs.append(model.generate(*args, **kwargs))
    return outs


def assert_same_tokens(a, b, what=""):
    assert torch.equal(a, b), f"{what}\nTransformers:\n{a}\nmoetorch:\n{b}"


def close(a, b, what):
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what}: {m}")


def assert_same_steps(want: tuple, got: tuple, what: str) -> None:
    """Per-step tuples of per-layer tensors (a generate output's attentions or hidden states)."""
    assert len(got) == len(want), f"{what}: {len(got)} steps, want {len(want)}"
    for step, (w, g) in enumerate(zip(want, got)):
        assert len(g) == len(w), f"{what}, step {step}: {len(g)} layers, want {len(w)}"
        for layer, (x, y) in enumerate(zip(w, g)):
            assert y.shape == x.shape, f"{what}, step {step}, layer {layer}: {tuple(y.shape)}, want {tuple(x.shape)}"
            close(x, y, f"{what}, step {step}, layer {layer}")


def prompts(batch=3, seq=6, padding="left", seed=1):
    return make_inputs(VOCAB, batch, seq, padding, seed=seed)


def greedy_new_tokens(pair, ids, mask, n=10):
    return pair[1].generate(ids, attention_mask=mask, max_new_tokens=n)[:, ids.shape[1] :]


# ---- decoding strategies ------------------------------------------------------------------------


def test_greedy_matches_transformers(pair):
    for padding in ("left", None):
        ids, mask = prompts(padding=padding)
        a, b = both(pair, ids, attention_mask=mask, max_new_tokens=12)
        assert_same_tokens(a, b, f"greedy, padding={padding}")
        assert b.shape == (3, 6 + 12)
    # The spec's usage example: a total max_length, no mask.
    a, b = both(pair, ids[:1], max_length=15)
    assert_same_tokens(a, b, "max_length=15")
    assert b.shape[1] == 15
    # The default max_length (20) means 20 new tokens, as in Transformers.
    a, b = both(pair, ids[:1])
    assert_same_tokens(a, b, "default length")
    assert b.shape[1] == 6 + 20


def test_left_padded_batch_equals_each_prompt_alone(pair):
    ids, mask = prompts(batch=4, seq=7)
    batched = greedy_new_tokens(pair, ids, mask, n=8)
    for row in range(4):
        alone = ids[row : row + 1, mask[row].bool()]
        assert_same_tokens(batched[row : row + 1], greedy_new_tokens(pair, alone, None, n=8), f"row {row}")
    # Padding inferred from pad_token_id when no mask is given, as in Transformers.
    inferred = pair[1].generate(ids, max_new_tokens=8)[:, 7:]
    assert_same_tokens(batched, inferred, "mask inferred from pad_token_id")


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.7, top_k=10),
        dict(top_p=0.8, top_k=0),
        dict(min_p=0.2, temperature=1.3),
        dict(top_k=20, top_p=0.9, num_return_sequences=2),
        dict(typical_p=0.6, top_k=0),
        dict(epsilon_cutoff=0.01, top_k=0),
        dict(eta_cutoff=0.02, temperature=1.5, top_k=0),
        dict(top_h=0.5, top_k=0),
        dict(top_p=0.0, top_k=0),
    ],
    ids=["temperature-top_k", "top_p", "min_p", "num_return_sequences", "typical_p", "epsilon_cutoff",
         "eta_cutoff", "top_h", "top_p-zero"],
)
def test_sampling_matches_transformers_random_stream(pair, settings):
    ids, mask = prompts()
    torch.manual_seed(11)
    a = pair[0].generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=10, **settings)
    after_hf = torch.rand(4)
    torch.manual_seed(11)
    b = pair[1].generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=10, **settings)
    after_ours = torch.rand(4)
    assert_same_tokens(a, b, f"sampling {settings}")
    # Both drew exactly the same random numbers from the global generator.
    assert torch.equal(after_hf, after_ours)
    greedy = pair[1].generate(ids, attention_mask=mask, max_new_tokens=10)
    if settings.get("top_p") == 0.0:  # the top token alone is kept: greedy's tokens
        assert_same_tokens(greedy, b, "top_p=0")
    else:
        assert not torch.equal(b[:: settings.get("num_return_sequences", 1)], greedy), "sampling drew nothing"


@contextlib.contextmanager
def sampling_kernel(monkeypatch):
    """Let generate() draw with ops.triton_sample on the CPU (under the interpreter) while the model
    itself runs its torch code; yields the kernel's calls."""
    from types import SimpleNamespace

    from moetorch.ops import triton_sample

    calls = []
    sample = triton_sample.sample

    def counting(*args, **kwargs):
        calls.append(args[1:])
        return sample(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(moetorch.generation.utils, "fused", SimpleNamespace(SAMPLE_KERNEL=1, serves=lambda device: True))
        m.setattr(triton_sample, "sample", counting)
        yield calls


# settings -> what the kernel computes (temperature, top_k, top_p, min_p); the processors before run in torch
KERNEL_SAMPLING = {
    "temperature-top_k": (dict(temperature=0.5, top_k=10), (0.5, 10, None, None)),
    "top_k-top_p": (dict(top_k=20, top_p=0.9, num_return_sequences=2), (None, 20, 0.9, None)),
    "top_p-zero": (dict(top_k=20, top_p=0.0), (None, 20, 0.0, None)),  # the top token alone
    "no-warpers": (dict(top_k=0), (None, None, None, None)),
    "top_k-beyond-vocab": (dict(top_k=VOCAB + 5, top_p=0.7, temperature=2.0), (2.0, VOCAB + 5, 0.7, None)),
    "repetition-penalty-first": (dict(repetition_penalty=1.3, top_k=10, top_p=0.8), (None, 10, 0.8, None)),
    "min_p": (dict(min_p=0.2, temperature=0.5, top_k=30), (0.5, 30, None, 0.2)),
    "top_p-alone-in-torch": (dict(top_p=0.8, top_k=0, temperature=0.5), (None, None, None, None)),
    "top_k-beyond-the-kernel": (dict(top_k=300, top_p=0.9), (None, None, None, None)),
    # typical / epsilon / eta come after min-p: everything runs in torch, the kernel only draws
    "typical_p-last-in-torch": (dict(typical_p=0.8, top_k=20), (None, None, None, None)),
    # top-h sits between temperature and top-k: the temperature stays in torch
    "top_h-before-top_k": (dict(temperature=0.5, top_h=0.6, top_k=20), (None, 20, None, None)),
}


@pytest.mark.parametrize("case", list(KERNEL_SAMPLING))
def test_sampling_kernel_matches_transformers(pair, monkeypatch, case):
    settings, computes = KERNEL_SAMPLING[case]
    ids, mask = prompts()
    torch.manual_seed(12)
    a = pair[0].generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=8, **settings)
    after_hf = torch.rand(4)
    with sampling_kernel(monkeypatch) as calls:
        torch.manual_seed(12)
        b = pair[1].generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=8, **settings)
    after_ours = torch.rand(4)
    assert calls == [computes] * 8, "the kernel drew every step, with these warpers"
    assert_same_tokens(a, b, f"sampling kernel {settings}")
    assert torch.equal(after_hf, after_ours)


def test_sampling_kernel_not_where_scores_are_recorded_or_for_beams(pair, monkeypatch):
    ids, mask = prompts(batch=1)
    for settings in (dict(return_dict_in_generate=True, output_scores=True), dict(num_beams=2)):
        with sampling_kernel(monkeypatch) as calls:
            pair[1].generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=2, **settings)
        assert not calls, settings


def test_sampling_kernel_with_lagged_stop(pair, monkeypatch):
    # The step past the last is drawn by the kernel too, and gives its draw back.
    hf, ours = pair
    ids, mask = prompts()
    torch.manual_seed(5)
    free = ours.generate(ids, attention_mask=mask, do_sample=True, top_k=10, max_new_tokens=10)[:, 6:]
    stop = sorted({int(t) for t in free[:, 1]})
    torch.manual_seed(5)
    a = hf.generate(ids, attention_mask=mask, do_sample=True, top_k=10, max_new_tokens=10, eos_token_id=stop)
    after_hf = torch.rand(4)
    with sampling_kernel(monkeypatch) as calls, lagged_stop(ours, monkeypatch) as reads:
        torch.manual_seed(5)
        b = ours.generate(ids, attention_mask=mask, do_sample=True, top_k=10, max_new_tokens=10, eos_token_id=stop)
    after_ours = torch.rand(4)
    assert_same_tokens(a, b, "sampling kernel, lagged stop")
    assert b.shape[1] == 6 + 2 and len(calls) == 3 and reads[-1] is False
    assert torch.equal(after_hf, after_ours)


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_beams=2),
        dict(num_beams=4, num_return_sequences=3, length_penalty=0.5, early_stopping=True),
        dict(num_beams=3, num_return_sequences=2, length_penalty=2.0, early_stopping="never"),
        dict(num_beams=3, length_penalty=-1.0, early_stopping=False),
    ],
    ids=["2-beams", "4-beams-early", "3-beams-never", "3-beams-negative-penalty"],
)
def test_beam_search_matches_transformers(pair, settings):
    ids, mask = prompts()
    # EOS ids that greedy search produces, so that beams finish at different lengths.
    new = greedy_new_tokens(pair, ids, mask, n=6)
    eos = sorted({int(new[0, 2]), int(new[1, 4])})
    kwargs = dict(attention_mask=mask, max_new_tokens=9, eos_token_id=eos, pad_token_id=VOCAB - 1,
                  return_dict_in_generate=True, output_scores=True, output_logits=True, **settings)
    a, b = both(pair, ids, **kwargs)
    assert_same_tokens(a.sequences, b.sequences, f"beam search {settings}")
    close(a.sequences_scores, b.sequences_scores, "sequences_scores")
    assert torch.equal(a.beam_indices.long(), b.beam_indices)
    assert len(a.scores) == len(b.scores) and len(a.logits) == len(b.logits)
    for i, (x, y) in enumerate(zip(a.scores, b.scores)):
        close(x, y, f"scores[{i}]")
    plain_kwargs = {k: v for k, v in kwargs.items() if not k.startswith(("return", "output"))}
    plain = pair[1].generate(ids, **plain_kwargs)
    assert_same_tokens(b.sequences, plain, "return_dict_in_generate changes nothing")
    # Deciding to go on one step late (as on CUDA) drops the step past the last.
    pair[1].lagged_stop = True
    try:
        assert_same_tokens(b.sequences, pair[1].generate(ids, **plain_kwargs), "beam search, lagged stop")
    finally:
        del pair[1].lagged_stop


def test_beam_sampling_matches_transformers(pair):
    ids, mask = prompts(batch=2)
    a, b = both(pair, ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=True, top_k=30,
                num_return_sequences=2, pad_token_id=VOCAB - 1, seed=5)
    assert_same_tokens(a, b, "beam sampling")


@pytest.mark.parametrize("pad", [0, None, VOCAB - 1])
def test_finished_beams_are_padded_as_transformers_pads_them(pair, pad):
    """A beam that ends early is padded with the pad id, or with the first EOS id where the pad id
    is unset or 0 (Transformers' `pad or eos`)."""
    ids, mask = prompts(batch=2)
    new = greedy_new_tokens(pair, ids, mask, n=6)
    eos = [int(new[0, 1]), int(new[1, 3])]
    a, b = both(pair, ids, attention_mask=mask, max_new_tokens=8, num_beams=3, num_return_sequences=3,
                eos_token_id=eos, pad_token_id=pad)
    assert_same_tokens(a, b, f"beam search, pad_token_id={pad}")
    fill = pad or eos[0]
    ends = [(row == e).nonzero() for row in b[:, ids.shape[1]:] for e in eos]
    assert any(len(at) and int(at[0]) < b.shape[1] - ids.shape[1] - 1 for at in ends), "no beam ended early"
    assert (b[:, -1] == fill).any()


def test_beam_search_with_lagged_stop_drops_its_extra_step(pair, monkeypatch):
    hf, ours = pair
    ids, mask = prompts(batch=2)
    new = greedy_new_tokens(pair, ids, mask, n=6)
    for settings in (dict(early_stopping=True), dict(do_sample=True, top_k=3, early_stopping=True)):
        # EOS ids greedy search meets early (more of them for sampling), so that beams stop before the end
        eos = sorted({int(new[0, 1]), int(new[1, 2])} | (set(new[:, :3].flatten().tolist()) if "top_k" in settings
                                                         else set()))
        outs, after = [], []
        with lagged_stop(ours, monkeypatch) as reads:
            for model in (hf, ours):
                torch.manual_seed(6)
                outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=2,
                                           eos_token_id=eos, pad_token_id=VOCAB - 1, **settings))
                after.append(torch.rand(3))
        assert_same_tokens(*outs, f"beam search, lagged stop, {settings}")
        # the random draws of the dropped step are given back
        assert torch.equal(*after)
        # greedy beams stop before max_new_tokens (sampled ones may not): the step after was dropped
        assert outs[1].shape[1] < 6 + 12 or "top_k" in settings
        if outs[1].shape[1] < 6 + 12:
            assert reads[-1] is False and reads.count(False) == 1


# ---- processors and stopping rules --------------------------------------------------------------


def test_logits_processors_match_transformers(pair):
    ids, mask = prompts()
    new = greedy_new_tokens(pair, ids, mask, n=8)
    cases = {
        "repetition_penalty": dict(repetition_penalty=1.5),
        "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
        # the prompt's tokens (left padding included, as Transformers reads them) favoured
        "encoder_repetition_penalty": dict(encoder_repetition_penalty=3.0),
        # Ban tokens and a 2-token sequence that greedy search produces, and the EOS id (never banned alone).
        "bad_words_ids": dict(bad_words_ids=[[int(new[0, 1])], new[1, 2:4].tolist(), [int(new[2, 0])]]),
        "min_new_tokens": dict(min_new_tokens=6, eos_token_id=[int(new[0, 1]), int(new[1, 0])]),
        "prefix_allowed_tokens_fn": dict(prefix_allowed_tokens_fn=lambda b, row: [int(row[-1]) % 7 + b, 30, 40 + b]),
        "custom": dict(logits_processor=LogitsProcessorList([TopKLogitsWarper(3)]), do_sample=True),
    }
    for name, settings in cases.items():
        a, b = both(pair, ids, attention_mask=mask, max_new_tokens=8, seed=3, **settings)
        assert_same_tokens(a, b, name)
        if name != "custom":
            assert not torch.equal(b[:, 6:], new), f"{name} changed nothing"
    rep = pair[1].generate(ids, attention_mask=mask, max_new_tokens=8, no_repeat_ngram_size=1)
    for row in rep.tolist():
        assert len(set(row[6:])) == 8, "no_repeat_ngram_size=1 repeats no token"


@pytest.mark.parametrize("settings", [dict(do_sample=True, top_k=5), dict(num_beams=3), dict(num_beams=3, do_sample=True)],
                         ids=["sampling", "beams", "beam-sampling"])
def test_prefix_allowed_tokens_fn_gets_the_prompt_index_with_several_sequences(pair, settings):
    """`prefix_allowed_tokens_fn(batch_id, ids)`: batch_id is the prompt's index in the batch, for
    each of the sequences it returns (num_return_sequences, sampled or beam), as Transformers 5.24
    fixed it (5.23 handed sampled rows their expanded row index)."""
    _, ours = pair
    ids, mask = prompts(batch=2)
    seen = []

    def only_by_prompt(batch_id, row_ids):
        seen.append(batch_id)
        return [10 + batch_id, 20 + batch_id]

    out = ours.generate(ids, attention_mask=mask, max_new_tokens=4, num_return_sequences=3,
                        prefix_allowed_tokens_fn=only_by_prompt, pad_token_id=VOCAB - 1, **settings)
    assert set(seen) == {0, 1}
    for row, new in enumerate(out[:, ids.shape[1]:].tolist()):
        assert set(new) <= {10 + row // 3, 20 + row // 3}, f"row {row} (prompt {row // 3}): {new}"


def test_a_sampled_row_left_no_allowed_token_falls_back_alone(pair):
    """Sampled rows of one prompt (num_return_sequences) are independent: where one row's allowed
    tokens are all -inf (EOS under min_new_tokens) and its sibling's are not, that row alone falls
    back to the bare constraint, as in Transformers 5.23 (same seed, same tokens); the constraint
    does not read batch_id, which 5.23 gives otherwise."""
    ids, _ = make_inputs(VOCAB, 2, 4, None, seed=int(torch.randint(1 << 20, ())))
    eos, first = 2, (10, 11)

    def fn(batch_id, row):
        new = row[ids.shape[1]:].tolist()
        return list(first) if not new else [eos] if new[0] == first[0] else [12]

    diverged = 0
    for seed in range(6):
        a, b = both(pair, ids, do_sample=True, num_return_sequences=2, max_new_tokens=4, min_new_tokens=3,
                    eos_token_id=eos, pad_token_id=0, prefix_allowed_tokens_fn=fn, seed=seed)
        assert_same_tokens(a, b, f"seed {seed}")
        diverged += any(len(set(b[r:r + 2, ids.shape[1]].tolist())) == 2 for r in (0, 2))
    assert diverged, "no prompt's two rows took different first tokens"
    with pytest.raises(ValueError, match=r"beams \(2\) must divide num_beams \(3\)"):
        moetorch.generation.PrefixConstrainedLogitsProcessor(fn, 3, beams=2)


def test_more_processors_and_warpers_match_transformers_on_random_scores():
    """Each of Transformers' other processors and warpers against its own, on random scores with
    -inf entries (and a NaN for the invalid-values one), at sequence lengths around their triggers."""
    torch.manual_seed(0)
    cases = [
        ("TopHLogitsWarper", (0.4,), {}),
        ("TypicalLogitsWarper", (0.7,), dict(min_tokens_to_keep=2)),
        ("EpsilonLogitsWarper", (3e-3,), dict(min_tokens_to_keep=3)),
        ("EtaLogitsWarper", (3e-3,), dict(min_tokens_to_keep=2)),
        ("ForcedBOSTokenLogitsProcessor", (5,), {}),
        ("ForcedEOSTokenLogitsProcessor", (8, [3, 9]), {}),
        ("ExponentialDecayLengthPenalty", ((2, 1.5), [3, 9], 3), {}),
        ("SuppressTokensLogitsProcessor", ([1, 4, 7],), {}),
        ("SuppressTokensAtBeginLogitsProcessor", ([1, 4], 7), {}),
        ("InfNanRemoveLogitsProcessor", (), {}),
    ]
    for trial in range(6):
        scores = torch.randn(4, 300) * (1 + trial)
        scores[0, :5] = float("-inf")
        ids = torch.randint(0, 300, (4, 8))
        for name, args, kwargs in cases:
            theirs = getattr(transformers.generation.logits_process, name)(*args, **kwargs)
            ours = getattr(moetorch, name)(*args, **kwargs)
            x = scores.clone()
            if name == "InfNanRemoveLogitsProcessor":
                x[1, 3], x[2, 4] = float("nan"), float("inf")
            for length in (1, 6, 7, 8):
                want, got = theirs(ids[:, :length], x.clone()), ours(ids[:, :length], x.clone())
                assert torch.equal(got, want), f"{name} at length {length}"
    for name, value in (("TypicalLogitsWarper", 1.0), ("EpsilonLogitsWarper", 0.0), ("EtaLogitsWarper", 1.5),
                        ("TopHLogitsWarper", 0.0)):
        with pytest.raises(ValueError):
            getattr(moetorch, name)(value)


def test_prompt_processors_match_transformers_on_random_scores():
    """The processors that read the prompt as Transformers reads an encoder's input: against its
    own on random scores, with a prompt over a few ids (so its n-grams recur), rows repeating it
    (beams) and sequences that run on from it."""
    from transformers.generation import logits_process as theirs

    g = torch.Generator().manual_seed(0)
    for trial in range(8):
        prompt = torch.randint(0, 6, (2, 7), generator=g)
        rows = 2 * (1 + trial % 2)
        ids = torch.cat([prompt.repeat_interleave(rows // 2, dim=0), torch.randint(0, 6, (rows, trial), generator=g)], 1)
        scores = torch.randn(rows, 11, generator=g) * 3
        for name, arg in (("EncoderRepetitionPenaltyLogitsProcessor", 0.5 + trial / 2),
                          ("EncoderNoRepeatNGramLogitsProcessor", 1 + trial % 3)):
            want = getattr(theirs, name)(arg, prompt)(ids, scores.clone())
            got = getattr(moetorch, name)(arg, prompt)(ids, scores.clone())
            assert torch.equal(got, want), (name, arg, trial)
    with pytest.raises(ValueError, match="penalty"):
        moetorch.EncoderRepetitionPenaltyLogitsProcessor(0.0, prompt)
    with pytest.raises(ValueError, match="encoder_ngram_size"):
        moetorch.EncoderNoRepeatNGramLogitsProcessor(0, prompt)


def _forward_lengths(model) -> tuple[list, object]:
    """(the new-token count of each forward of `model`'s base model, the hook to remove)."""
    seen = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        seen.append(ids.shape[1])
    return seen, model.model.register_forward_pre_hook(hook, with_kwargs=True)


def test_prefill_chunks_split_the_new_tokens_as_transformers(pair):
    """`prefill_chunk_size` with a cache passed in that holds the first tokens and ids of the new
    tokens alone (the mask over both): the chunks start at the first new token, as Transformers
    splits them (each forward's length), with its tokens and logits; assisted decoding and prompt
    lookup verify the whole prompt in their first forward, unchunked, as Transformers' do (the
    main model's forwards; Transformers' assistant chunks its own prompt, moetorch's does not);
    without a cache the setting is an error, as there."""
    hf, ours = pair
    ids, _ = make_inputs(hf.config.vocab_size, 1, 16, None, seed=7)
    for held, size in ((2, 4), (6, 4), (3, 5)):
        lengths = []
        outs = []
        for model, cache in ((hf, transformers.DynamicCache(config=hf.config)), (ours, DynamicCache())):
            with torch.no_grad():
                model(ids[:, :held], past_key_values=cache, use_cache=True)
            seen, hook = _forward_lengths(model)
            try:
                outs.append(model.generate(ids[:, held:], attention_mask=torch.ones_like(ids), past_key_values=cache,
                                           max_new_tokens=3, pad_token_id=0, prefill_chunk_size=size,
                                           return_dict_in_generate=True, output_logits=True))
            finally:
                hook.remove()
            lengths.append(seen)
        assert lengths[0] == lengths[1], (held, size, lengths)
        assert torch.equal(outs[0].sequences, outs[1].sequences)
        torch.testing.assert_close(outs[0].logits[0], outs[1].logits[0], atol=1e-4, rtol=1e-4)
    row = ids[:, :6].repeat(1, 2)  # repeated n-grams, so that prompt lookup finds drafts
    for drafted in (dict(prompt_lookup_num_tokens=3), dict(assistant_model=True)):
        lengths = []
        for model in (hf, ours):
            kw = dict(drafted, assistant_model=copy.deepcopy(model)) if "assistant_model" in drafted else drafted
            seen, hook = _forward_lengths(model)
            try:
                model.generate(row, max_new_tokens=4, do_sample=False, pad_token_id=0, prefill_chunk_size=4, **kw)
            finally:
                hook.remove()
            lengths.append(seen)
        assert lengths[0] == lengths[1] and lengths[1][0] >= 12, (drafted, lengths)  # the prompt and drafts
    with pytest.raises(ValueError, match="prefill_chunk_size.*use_cache=True"):
        ours.generate(row, max_new_tokens=2, prefill_chunk_size=4, use_cache=False)


def test_transformers_settings_of_the_cache_prefill_and_ids(pair):
    """`prefill_chunk_size` (the prompt in chunks: the tokens of one forward), `max_cache_len` (the
    static cache's length, checked against the call's), an EOS id tensor and the accepted no-ops
    (`disable_compile`, `output_router_logits`, `token_healing=False`), each as Transformers gives
    them; settings moetorch lacks are an error that says so."""
    hf, ours = pair
    ids, mask = prompts(batch=2, seq=9)
    kinds = [dict(), dict(num_beams=2), dict(do_sample=True, top_k=5), dict(cache_implementation="static")]
    for kw in kinds:
        want = both(pair, ids, attention_mask=mask, max_new_tokens=6, seed=2, **kw)[1]
        for size in (1, 4, 16):
            calls = []
            hook = ours.register_forward_hook(lambda *_, seen=calls: seen.append(1))
            try:
                torch.manual_seed(2)
                got = ours.generate(ids, attention_mask=mask, max_new_tokens=6, prefill_chunk_size=size, **kw)
            finally:
                hook.remove()
            assert_same_tokens(want, got, f"prefill_chunk_size={size}, {kw}")
            # the chunks of the 9 prompt tokens (as Transformers splits them; the last gives the
            # first new token), then 5 steps
            assert len(calls) == -(-9 // size) + 5, (size, kw)
    a, b = both(pair, ids, attention_mask=mask, max_new_tokens=6, prefill_chunk_size=4)
    assert_same_tokens(a, b, "prefill_chunk_size")
    # the prompt's n-grams banned: a prompt that ends in greedy search's own continuation
    long_ids = torch.cat([ids, greedy_new_tokens(pair, ids, mask, n=4)], dim=1)
    long_mask = torch.cat([mask, torch.ones_like(mask[:, :4])], dim=1)
    free = ours.generate(long_ids, attention_mask=long_mask, max_new_tokens=6)
    for n in (1, 2):
        a, b = both(pair, long_ids, attention_mask=long_mask, max_new_tokens=6, encoder_no_repeat_ngram_size=n)
        assert_same_tokens(a, b, f"encoder_no_repeat_ngram_size={n}")
        assert n == 2 or not torch.equal(b, free)
    out = ours.generate(ids[:1], max_new_tokens=6, cache_implementation="static", max_cache_len=300,
                        return_dict_in_generate=True)
    assert out.past_key_values.max_cache_len >= 300
    assert_same_tokens(ours.generate(ids[:1], max_new_tokens=6), out.sequences, "max_cache_len")
    with pytest.raises(ValueError, match=r"max_cache_len=10 is shorter than the 14 tokens"):
        ours.generate(ids[:1], max_new_tokens=6, cache_implementation="static", max_cache_len=10)
    eos = torch.tensor([int(b[0, 11]), int(b[1, 12])])
    kw = dict(max_new_tokens=6, eos_token_id=eos, pad_token_id=0, disable_compile=True, token_healing=False)
    a = hf.generate(ids, attention_mask=mask, **kw)  # its router-logits aux loss fails on cached steps with a mask
    b = ours.generate(ids, attention_mask=mask, **kw, output_router_logits=True)
    assert_same_tokens(a, b, "an EOS id tensor and the no-ops")
    with pytest.raises(TypeError, match=r"\['token_healing'\] pick a decoding mode of Transformers' that moetorch"):
        ours.generate(ids, max_new_tokens=2, token_healing=True)
    # an unknown keyword: Transformers' ValueError, which a TypeError catches too
    with pytest.raises(ValueError, match="model_kwargs"):
        hf.generate(ids, max_new_tokens=2, not_an_argument=1)
    for error in (ValueError, TypeError):
        with pytest.raises(error, match=r"unknown keyword arguments \['not_an_argument'\]"):
            ours.generate(ids, max_new_tokens=2, not_an_argument=1)
    with pytest.raises(ValueError, match="prefill_chunk_size runs the prompt's ids"):
        ours.generate(inputs_embeds=ours.get_input_embeddings()(ids), max_new_tokens=2, prefill_chunk_size=2)
    with pytest.raises(ValueError, match="encoder_repetition_penalty"):
        ours.generate(ids, max_new_tokens=2, encoder_repetition_penalty=-1.0)


@pytest.mark.parametrize("settings", [
    dict(penalty_alpha=0.6), dict(penalty_alpha=0.6, top_k=4), dict(num_beams=2, num_beam_groups=2),
    dict(num_beams=2, force_words_ids=[[5]]), dict(dola_layers="low"), dict(token_healing=True), dict(use_mtp=True),
    # what picks no other mode: Transformers decodes as without them
    dict(penalty_alpha=0.6, top_k=1), dict(penalty_alpha=0.6, do_sample=True, top_k=4), dict(num_beam_groups=2),
    dict(num_beams=2, diversity_penalty=0.5), dict(num_beams=2, dola_layers="low"), dict(low_memory=True),
    dict(assistant_early_exit=1), dict(speculation_type="dflash"), dict(penalty_alpha=0.0, token_healing=False)])
def test_settings_of_other_decoding_modes_are_refused_where_transformers_refuses_them(pair, settings):
    """Transformers 5 settings moetorch does not implement: those that pick a decoding mode of its own
    (contrastive, group beam, constrained, DoLa, token healing, MTP) are refused, as keyword
    arguments or in a passed GenerationConfig, where Transformers refuses them; the rest (hints, or
    a setting another one makes inert) decode to Transformers' tokens."""
    hf, ours = pair
    ids, mask = prompts(batch=1, padding=None)
    kw = dict(max_new_tokens=4, **({"top_k": 50} if "top_k" not in settings else {}))
    outs = []
    for model, config in ((hf, transformers.GenerationConfig), (ours, moetorch.GenerationConfig)):
        for how in ("keywords", "config"):
            torch.manual_seed(0)
            try:
                if how == "keywords":
                    outs.append(model.generate(ids, **kw, **settings))
                else:
                    outs.append(model.generate(ids, generation_config=config(**kw, **settings)))
            except ValueError as e:  # (Transformers: trust_remote_code, a tokenizer, MTP layers it lacks)
                outs.append(type(e))
    theirs, ours_ = outs[:2], outs[2:]
    for a, b in zip(theirs, ours_):
        if isinstance(a, type):
            assert b is GenerateArgumentError, settings
        else:
            assert torch.is_tensor(b), (settings, b)
            assert_same_tokens(a, b, str(settings))


def test_more_generation_settings_match_transformers(pair):
    """generate() with the token forcing, suppression, length-penalty and invalid-value settings:
    Transformers' tokens."""
    ids, mask = prompts()
    new = greedy_new_tokens(pair, ids, mask, n=8)
    eos = [int(new[0, 5]), int(new[1, 3])]
    cases = {
        "suppress_tokens": dict(suppress_tokens=[int(new[0, 0]), int(new[1, 1])]),
        "begin_suppress_tokens": dict(begin_suppress_tokens=[int(new[0, 0]), int(new[2, 0])]),
        "forced_eos_token_id": dict(forced_eos_token_id=int(new[2, 6])),
        "exponential_decay_length_penalty": dict(exponential_decay_length_penalty=(1, 3.0), eos_token_id=eos),
        "remove_invalid_values": dict(remove_invalid_values=True),
    }
    for name, settings in cases.items():
        a, b = both(pair, ids, attention_mask=mask, max_new_tokens=8, **settings)
        assert_same_tokens(a, b, name)
        if name != "remove_invalid_values":  # finite logits: nothing to remove
            assert not torch.equal(b[:, 6:], new[:, : b.shape[1] - 6]), f"{name} changed nothing"
    # with beams and beam sampling (the warpers keep one token beyond the EOS ids), and several warpers at once
    for settings in (dict(num_beams=3, suppress_tokens=[5, 6, 7], forced_eos_token_id=2),
                     dict(num_beams=2, do_sample=True, typical_p=0.7),
                     dict(num_beams=2, exponential_decay_length_penalty=(1, 2.0), eos_token_id=eos),
                     dict(do_sample=True, top_h=0.5, epsilon_cutoff=0.01, eta_cutoff=0.01, num_return_sequences=2)):
        a, b = both(pair, ids, attention_mask=mask, max_new_tokens=6, seed=4, **settings)
        assert_same_tokens(a, b, str(settings))
    # a one-token prompt: the forced BOS comes first, and begin suppression moves to the token after it
    one = ids[:1, -1:]
    settings = dict(forced_bos_token_id=7, begin_suppress_tokens=[int(new[0, 0])], max_new_tokens=5)
    a, b = both(pair, one, **settings)
    assert_same_tokens(a, b, "forced BOS")
    assert int(b[0, 1]) == 7
    # a prompt given as embeddings alone counts no ids: the forced BOS comes second, and begin
    # suppression with it, so the first new token is free (Transformers' begin index: 0 + 1)
    embeds = pair[0].get_input_embeddings()(ids[:1]).detach()
    first = int(greedy_new_tokens(pair, ids[:1], None, n=1)[0, 0])
    settings = dict(forced_bos_token_id=7, begin_suppress_tokens=[first], max_new_tokens=3)
    a, b = both(pair, None, inputs_embeds=embeds, **settings)
    assert_same_tokens(a, b, "forced BOS after an embeddings-only prompt")
    assert b[0, :2].tolist() == [first, 7]


def test_eos_ids_stop_rows_and_pad(pair):
    ids, mask = prompts()
    new = greedy_new_tokens(pair, ids, mask, n=10)
    eos = [int(new[0, 2]), int(new[2, 5])]
    pad = VOCAB - 2
    a, b = both(pair, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=pad)
    assert_same_tokens(a, b, "several eos ids")
    out = b[:, 6:]
    ends = []
    for row in range(3):
        hits = [i for i, t in enumerate(new[row].tolist()) if t in eos]
        ends.append(hits[0] + 1 if hits else 10)
        # each row stops at its first EOS; the rest is padding
        assert out[row, : ends[-1]].tolist() == new[row, : ends[-1]].tolist()
        assert out[row, ends[-1] :].tolist() == [pad] * (out.shape[1] - ends[-1])
    assert out.shape[1] == max(ends) and ends[0] <= 3
    # Once every row is done, generation stops before max_new_tokens.
    first = pair[1].generate(ids[:1], attention_mask=mask[:1], max_new_tokens=10, eos_token_id=eos)
    assert first.shape[1] == 6 + ends[0] and int(first[0, -1]) in eos
    # A custom stopping criterion replaces the default of its type.
    stop = StoppingCriteriaList([MaxLengthCriteria(9)])
    a, b = both(pair, ids, attention_mask=mask, max_new_tokens=10, stopping_criteria=stop)
    assert_same_tokens(a, b, "custom max length")
    assert b.shape[1] == 9


def test_a_criterion_that_returns_one_bool_stops_every_row(pair):
    """A criterion may return one Python bool for the batch (lm-evaluation-harness's multi-token
    stop sequences do), which Transformers applies to every row."""
    ids, mask = prompts()

    class StopAfter(transformers.StoppingCriteria):
        def __init__(self, length):
            self.length = length

        def __call__(self, input_ids, scores, **kwargs):
            return input_ids.shape[1] >= self.length

    for cache in (None, "static"):
        a, b = both(pair, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None, cache_implementation=cache,
                    stopping_criteria=transformers.StoppingCriteriaList([StopAfter(ids.shape[1] + 4)]))
        assert_same_tokens(a, b, f"one bool for the batch, {cache}")
        assert b.shape[1] == ids.shape[1] + 4


@contextlib.contextmanager
def lagged_stop(model, monkeypatch):
    """Turn the one-step-late stop check on (it is on for CUDA only) and record the stop flag each
    push read (None: not read)."""
    reads = []
    push = moetorch.generation.utils._OneStepLate.push

    def recording(self, running, tokens):
        out = push(self, running, tokens)
        reads.append(out[0])
        return out

    monkeypatch.setattr(moetorch.generation.utils._OneStepLate, "push", recording)
    model.lagged_stop = True
    try:
        yield reads
    finally:
        del model.lagged_stop


class RecordingStreamer:
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended += 1


def test_lagged_stop_check_drops_its_extra_step(pair, monkeypatch):
    hf, ours = pair
    ids, mask = prompts()
    new = greedy_new_tokens(pair, ids, mask, n=10)
    eos = [int(new[0, 1]), int(new[1, 3]), int(new[2, 5])]  # every row is done within 6 tokens
    with lagged_stop(ours, monkeypatch) as reads:
        # Rows stop at different steps, all before max_new_tokens: one step past the last is computed
        # (its flag read shows all rows done) and dropped.
        a, b = both(pair, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=VOCAB - 2)
        assert_same_tokens(a, b, "lagged stop, several eos ids")
        assert b.shape[1] <= 6 + 6 and reads[-1] is False and reads[:-1].count(False) == 0
        # One row done at its first EOS; and max_new_tokens reached first, with nothing dropped.
        a, b = both(pair, ids[:1], attention_mask=mask[:1], max_new_tokens=10, eos_token_id=eos)
        assert_same_tokens(a, b, "lagged stop, one row")
        reads.clear()
        unused = next(t for t in range(3, VOCAB) if t not in new)
        a, b = both(pair, ids, attention_mask=mask, max_new_tokens=4, eos_token_id=unused)
        assert_same_tokens(a, b, "lagged stop, max_new_tokens first")
        assert b.shape[1] == 6 + 4
        assert False not in reads
        # Sampling: the dropped step gives its draw back, so the global generator ends where
        # Transformers' does.
        torch.manual_seed(5)
        sampled = ours.generate(ids, attention_mask=mask, do_sample=True, top_k=10, max_new_tokens=10,
                                eos_token_id=None)[:, 6:]
        stop = sorted({int(t) for t in sampled[:, 1]})
        outs, after = [], []
        for model in (hf, ours):
            torch.manual_seed(5)
            outs.append(model.generate(ids, attention_mask=mask, do_sample=True, top_k=10, max_new_tokens=10,
                                       eos_token_id=stop))
            after.append(torch.rand(4))
        assert_same_tokens(*outs, "lagged stop, sampling")
        assert outs[1].shape[1] == 6 + 2
        assert torch.equal(*after) and reads[-1] is False


def test_lagged_stop_check_streams_the_same_tokens(pair, monkeypatch):
    ours = pair[1]
    ids, mask = prompts(batch=1)
    new = greedy_new_tokens(pair, ids, mask, n=10)[0].tolist()
    unused = next(t for t in range(3, VOCAB) if t not in new)
    for eos in (new[4], unused, None):  # EOS met, max_new_tokens first, only max_length can stop
        streams = []
        for lag in (False, True):
            ours.lagged_stop = lag
            streamer = RecordingStreamer()
            out = ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, streamer=streamer)
            streams.append((out, streamer.puts, streamer.ended))
        del ours.lagged_stop
        (a, puts_a, ended_a), (b, puts_b, ended_b) = streams
        assert_same_tokens(a, b, f"streamed, eos {eos}")
        assert puts_a == puts_b and ended_a == ended_b == 1
        assert puts_b[0] == ids.tolist() and [p[0] for p in puts_b[1:]] == b[0, ids.shape[1] :].tolist()
    with lagged_stop(ours, monkeypatch) as reads:
        ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=new[4], streamer=RecordingStreamer())
        assert reads[-1] is False  # the step past the end was computed, and not streamed


class NeverStop(moetorch.generation.StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def test_lagged_stop_check_is_off_where_the_extra_step_would_show(pair, monkeypatch):
    hf, ours = pair
    ids, mask = prompts()
    eos = int(greedy_new_tokens(pair, ids, mask, n=3)[0, 1])
    one = dict(attention_mask=mask[:1], max_new_tokens=6, eos_token_id=eos)
    with lagged_stop(ours, monkeypatch) as reads:
        # A cache the caller passed holds exactly the tokens it would without the lag; returned
        # outputs, custom processors and criteria see every step.
        cache = DynamicCache()
        out = ours.generate(ids[:1], past_key_values=cache, **one)
        assert out.shape[1] == 6 + 2 and cache.get_seq_length() == 6 + 1
        ours.generate(ids[:1], return_dict_in_generate=True, output_scores=True, **one)
        ours.generate(ids[:1], logits_processor=LogitsProcessorList([TopKLogitsWarper(5)]), **one)
        ours.generate(ids[:1], stopping_criteria=StoppingCriteriaList([NeverStop()]), **one)
        ours.generate(ids[:1], prefix_allowed_tokens_fn=lambda b, s: list(range(VOCAB)), **one)
        assert reads == []
        # Its own classes, passed by the caller, stay on the device: the lag holds.
        ours.generate(ids[:1], stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(12)]), **one)
        assert reads == [None, True, False]


def test_static_cache_and_no_cache_match(pair):
    ids, mask = prompts()
    for settings in (dict(cache_implementation="static"), dict(use_cache=False),
                     dict(cache_implementation="static", num_beams=2)):
        a, b = both(pair, ids, attention_mask=mask, max_new_tokens=9, **settings)
        assert_same_tokens(a, b, str(settings))
    out = pair[1].generate(ids, attention_mask=mask, max_new_tokens=9, cache_implementation="static",
                           return_dict_in_generate=True)
    cache = out.past_key_values
    # prompt + new tokens - 1 slots, rounded up to the bucket within the model's positions
    bucket = min(STATIC_CACHE_BUCKET, pair[1].config.max_position_embeddings)
    assert isinstance(cache, moetorch.StaticCache) and cache.max_cache_len == max(bucket, 6 + 9 - 1)
    assert pair[1].generate(ids, attention_mask=mask, max_new_tokens=9, use_cache=False,
                            return_dict_in_generate=True).past_key_values is None


def test_static_cache_attentions_span_transformers_cache(pair):
    """`output_attentions` with `cache_implementation="static"`: each step's weights span the slots
    of the cache Transformers would make (the tokens cached, at least `max_cache_len` and the
    longest such cache of an earlier call on the model), not the wider cache moetorch allocates
    (rounded up to STATIC_CACHE_BUCKET): the same shapes and numbers as Transformers, for greedy
    search and beam search, a call after a longer one included. (Unpadded prompts: a padding
    token's query row, masked whole, spreads its eager weights over every slot of the cache.)"""
    hf, ours = pair
    hf._previous_max_cache_length = -1  # (Transformers keeps it on the model between calls)
    ours.__dict__.pop("_previous_max_cache_length", None)
    ids, mask = prompts(batch=2, padding=None)
    for settings in (dict(max_new_tokens=6), dict(max_new_tokens=3), dict(max_new_tokens=3, max_cache_len=20),
                     dict(max_new_tokens=4, num_beams=2)):
        want, got = both(pair, ids, attention_mask=mask, eos_token_id=None, cache_implementation="static",
                         return_dict_in_generate=True, output_attentions=True, **settings)
        assert_same_tokens(want.sequences, got.sequences, str(settings))
        assert_same_steps(want.attentions, got.attentions, f"attentions, {settings}")
    assert want.attentions[0][0].shape[-1] == 20


def test_the_default_static_cache_returns_attentions_over_the_cached_tokens(pair):
    """Where generate picks the static cache itself (a GPU's default, where Transformers decodes on a
    dynamic cache), the attentions span the tokens cached so far, as a dynamic cache's do."""
    _, ours = pair
    cache = StaticCache(ours.config, max_cache_len=64)
    width = ours._attention_width(GenerationConfig(), 9, cache, default=True)
    ids, _ = prompts(batch=1, padding=None)
    out = ours(ids, past_key_values=cache, use_cache=True, output_attentions=True)
    assert out.attentions[0].shape[-1] == 64 and width() == ids.shape[1]
    with_width = moetorch.generation.utils._Record(GenerationConfig(return_dict_in_generate=True,
                                                                    output_attentions=True), width)
    with_width.add(None, None, out)
    want = ours(ids, output_attentions=True).attentions
    assert_same_steps((want,), with_width.attentions, "cut to the cached tokens")


def test_return_dict_scores_and_logits_match(pair):
    ids, mask = prompts()
    for settings in (dict(), dict(do_sample=True, top_k=8, temperature=0.8)):
        a, b = both(pair, ids, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True,
                    output_scores=True, output_logits=True, seed=2, **settings)
        assert isinstance(b, moetorch.GenerateDecoderOnlyOutput)
        assert_same_tokens(a.sequences, b.sequences, "sequences")
        assert len(b.scores) == len(b.logits) == 6 and isinstance(b.past_key_values, DynamicCache)
        for i in range(6):
            close(a.scores[i], b.scores[i], f"scores[{i}]")
            close(a.logits[i], b.logits[i], f"logits[{i}]")
        assert b.past_key_values.get_seq_length() == 6 + 6 - 1
    out = pair[1].generate(ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True,
                           output_attentions=True, output_hidden_states=True)
    L = pair[1].config.num_hidden_layers
    assert len(out.attentions) == 3 and len(out.attentions[0]) == L
    assert out.attentions[0][0].shape[-2:] == (6, 6) and out.attentions[1][0].shape[-2:] == (1, 7)
    assert len(out.hidden_states[2]) == L + 1 and out.hidden_states[2][0].shape[1] == 1


def test_inputs_embeds_and_cache_continuation(pair):
    hf, ours = pair
    ids, mask = prompts(padding="left")
    embeds = ours.get_input_embeddings()(ids)
    a, b = both(pair, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=7)
    assert_same_tokens(a, b, "inputs_embeds")
    assert b.shape == (3, 7)  # new tokens only
    assert_same_tokens(b, greedy_new_tokens(pair, ids, mask, n=7), "embeddings prompt = ids prompt")
    # ids with the embeddings and no mask: the padding is inferred from the ids' pad id, as from ids alone
    a, b = both(pair, ids, inputs_embeds=embeds, max_new_tokens=7)
    assert_same_tokens(a, b, "ids + inputs_embeds, no mask")
    assert_same_tokens(b[:, ids.shape[1]:], greedy_new_tokens(pair, ids, mask, n=7), "padding inferred")
    # Continue from the cache a first call returned: the same tokens as one longer call.
    first = ours.generate(ids[:1], max_new_tokens=4, return_dict_in_generate=True)
    cont = ours.generate(first.sequences, past_key_values=first.past_key_values, max_new_tokens=5)
    assert_same_tokens(ours.generate(ids[:1], max_new_tokens=9), cont, "cache continuation")


def one_layer_assistant(ours):
    """A one-layer assistant sharing the embeddings, first layer and head: it agrees often, not always."""
    arch = next(a for a in ARCHS if isinstance(ours, a.ours["causal_lm"]))
    assistant = arch.ours["causal_lm"](arch.our_config(num_hidden_layers=1)).eval()
    assistant.load_state_dict(ours.state_dict(), strict=False)
    return assistant


def test_assisted_decoding_equals_greedy(pair):
    hf, ours = pair
    assistant = one_layer_assistant(ours)
    ids, _ = prompts(batch=2, padding=None)
    calls, new_tokens = [], 0
    for row in range(2):
        prompt = ids[row : row + 1]
        new = greedy_new_tokens(pair, prompt, None, n=12)
        for eos in (None, [int(new[0, 7])]):
            kwargs = dict(max_new_tokens=12, eos_token_id=eos, return_dict_in_generate=True, output_scores=True)
            want = ours.generate(prompt, **kwargs)
            hook = ours.register_forward_hook(lambda *_: calls.append(1))
            try:
                got = ours.generate(prompt, assistant_model=assistant, num_assistant_tokens=4, **kwargs)
            finally:
                hook.remove()
            assert_same_tokens(want.sequences, got.sequences, f"assisted, eos={eos}")
            assert_same_tokens(hf.generate(prompt, **kwargs).sequences, got.sequences, "Transformers greedy")
            assert len(got.scores) == len(want.scores)
            for x, y in zip(want.scores, got.scores):
                close(x, y, "assisted scores")
            new_tokens += got.sequences.shape[1] - prompt.shape[1]
    assert len(calls) < new_tokens, "no draft was ever accepted"


def test_assistant_drafts_under_the_logits_processors(pair):
    """An assistant drafts under the call's logits processors, as Transformers' does: with this
    model's weights it drafts what verification picks even where a no-repeat rule moves the argmax,
    so every draft is kept, in as many verify forwards as Transformers makes (its raw argmax would
    be rejected there). With a repetition penalty too, moetorch keeps every draft; Transformers'
    assistant applies the penalty twice (once from the generation config it copies, once from the
    processors it is handed), so its drafts part from the target's and it verifies more often."""
    hf, ours = pair
    ids, _ = prompts(batch=2, padding=None)

    def verify_forwards(model, **settings):
        assistant = copy.deepcopy(model)
        assistant.generation_config.num_assistant_tokens = 4
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        assistant.generation_config.assistant_confidence_threshold = 0.0
        calls = []
        hook = model.register_forward_hook(lambda *_: calls.append(1))
        try:
            outs = [model.generate(ids[row : row + 1], assistant_model=assistant, **settings) for row in range(2)]
        finally:
            hook.remove()
        for row, out in enumerate(outs):
            what = f"{type(model).__name__}, {settings}, row {row}"
            assert_same_tokens(model.generate(ids[row : row + 1], **settings), out, what)
        return len(calls)

    no_repeat = dict(max_new_tokens=20, eos_token_id=None, no_repeat_ngram_size=2)
    raw = [ours.generate(ids[row : row + 1], max_new_tokens=20, eos_token_id=None) for row in range(2)]
    assert any(not torch.equal(r, ours.generate(ids[row : row + 1], **no_repeat)) for row, r in enumerate(raw)), \
        "the no-repeat rule must move the argmax somewhere"
    counts = [verify_forwards(model, **no_repeat) for model in (hf, ours)]
    assert counts == [2 * 4, 2 * 4], f"verify forwards (Transformers, moetorch): {counts}; 4 rounds of 5 tokens a row"
    assert verify_forwards(ours, repetition_penalty=4.0, **no_repeat) == 2 * 4


def test_assisted_decoding_returns_greedy_attentions_and_hidden_states(pair):
    """`output_attentions` / `output_hidden_states` with an assistant or prompt lookup: one entry per
    new token, split out of the verify forwards, equal to greedy search's (the prompt's rows first,
    then each token's row over the keys it saw), drafts kept or not; on a static cache the same
    numbers (each entry over the keys the token saw, as Transformers cuts them)."""
    hf, ours = pair
    assistant = one_layer_assistant(ours)
    ids, _ = prompts(batch=2, padding=None)
    kept, calls = 0, []
    hook = ours.register_forward_hook(lambda *_: calls.append(1))
    try:
        for row in range(2):
            prompt = ids[row : row + 1]
            kwargs = dict(max_new_tokens=10, eos_token_id=None, return_dict_in_generate=True,
                          output_attentions=True, output_hidden_states=True, output_scores=True)
            want = ours.generate(prompt, **kwargs)
            for drafts in (dict(assistant_model=assistant, num_assistant_tokens=3), dict(prompt_lookup_num_tokens=3),
                           dict(assistant_model=assistant, num_assistant_tokens=3, cache_implementation="static")):
                before = len(calls)
                got = ours.generate(prompt, **drafts, **kwargs)
                kept += len(got.scores) - (len(calls) - before)
                assert_same_tokens(want.sequences, got.sequences, f"{drafts}, row {row}")
                assert_same_steps(want.attentions, got.attentions, f"attentions, {drafts}, row {row}")
                assert_same_steps(want.hidden_states, got.hidden_states, f"hidden states, {drafts}, row {row}")
    finally:
        hook.remove()
    assert kept > 0, "no draft was ever kept"
    only = ours.generate(ids[:1], assistant_model=assistant, max_new_tokens=4, return_dict_in_generate=True,
                         output_hidden_states=True)
    assert only.attentions is None and len(only.hidden_states) == 4


def test_prompt_lookup_attentions_and_hidden_states_match_transformers(pair):
    """Against Transformers' prompt lookup on a prompt of distinct tokens (nothing to look up in the
    first round, whose later entries Transformers slices from the prompt's rows; later rounds keep
    drafts where the random model repeats itself): the same entries, shapes and numbers."""
    hf, ours = pair
    prompt = torch.randperm(VOCAB - 1, generator=torch.Generator().manual_seed(8))[None, :7] + 1
    kwargs = dict(max_new_tokens=16, eos_token_id=None, prompt_lookup_num_tokens=3, return_dict_in_generate=True,
                  output_attentions=True, output_hidden_states=True)
    calls = []
    hook = ours.register_forward_hook(lambda *_: calls.append(1))
    try:
        want, got = both(pair, prompt, **kwargs)
    finally:
        hook.remove()
    assert len(calls) < len(got.hidden_states), "no looked-up draft was kept"
    assert_same_tokens(want.sequences, got.sequences, "prompt lookup")
    assert_same_steps(want.attentions, got.attentions, "attentions")
    assert_same_steps(want.hidden_states, got.hidden_states, "hidden states")


@pytest.mark.parametrize("cache", [None, "static"])
def test_a_transformers_model_drafts_for_a_moetorch_model(pair, cache):
    """A Transformers assistant of the same vocabulary (a small draft model of the same family)
    drafts on a cache of its own: greedy assisted decoding gives the model's own greedy tokens and
    Transformers' tokens with the same assistant; sampled drafts give tokens of the vocabulary."""
    hf, ours = pair
    arch = next(a for a in ARCHS if isinstance(ours, a.ours["causal_lm"]))
    assistant = arch.hf["causal_lm"](arch.hf_config(num_hidden_layers=1)).eval()
    assistant.load_state_dict(hf.state_dict(), strict=False)  # agrees often, not always
    ids, _ = prompts(batch=1, padding=None)
    kwargs = dict(max_new_tokens=12, eos_token_id=None, cache_implementation=cache)
    got = ours.generate(ids, assistant_model=assistant, num_assistant_tokens=3, **kwargs)
    assert_same_tokens(ours.generate(ids, **kwargs), got, "greedy with a Transformers assistant")
    assert_same_tokens(hf.generate(ids, assistant_model=assistant, num_assistant_tokens=3, max_new_tokens=12,
                                   eos_token_id=None), got, "Transformers with the same assistant")
    torch.manual_seed(0)
    sampled = ours.generate(ids, assistant_model=assistant, do_sample=True, **kwargs)
    assert sampled.shape == got.shape and int(sampled.max()) < VOCAB


def test_assistant_ensemble_weight_matches_transformers(pair):
    """`assistant_ensemble_weight=w`: greedy verification takes the argmax of w * p + (1 - w) * q at
    each draft (this model's p, the assistant's q) and p's past the last, as Transformers does with
    the same Transformers assistant; a small w keeps more of the assistant's tokens than greedy
    search would. Bad weights, and a weight with prompt lookup (no q), are errors naming it."""
    hf, ours = pair
    arch = next(a for a in ARCHS if isinstance(ours, a.ours["causal_lm"]))
    assistant = arch.hf["causal_lm"](arch.hf_config(num_hidden_layers=1)).eval()
    randomize_(assistant, seed=7)  # other weights: its drafts differ from the model's choices
    ids, _ = prompts(batch=2, padding=None)
    differs = False
    for row in range(2):
        prompt = ids[row : row + 1]
        for weight in (0.2, 0.7):
            kwargs = dict(max_new_tokens=12, eos_token_id=None, num_assistant_tokens=3, assistant_ensemble_weight=weight)
            want = hf.generate(prompt, assistant_model=assistant, **kwargs)
            got = ours.generate(prompt, assistant_model=assistant, **kwargs)
            assert_same_tokens(want, got, f"row {row}, weight {weight}")
            differs |= not torch.equal(got, ours.generate(prompt, max_new_tokens=12, eos_token_id=None))
    assert differs, "the weight never changed a token"
    torch.manual_seed(0)
    sampled = ours.generate(ids[:1], assistant_model=assistant, do_sample=True, assistant_ensemble_weight=0.5,
                            max_new_tokens=8, eos_token_id=None)
    assert sampled.shape == (1, ids.shape[1] + 8) and int(sampled.max()) < VOCAB
    for bad in (0, 1, 1.5, -0.1, "0.5"):
        with pytest.raises(ValueError, match="assistant_ensemble_weight"):
            ours.generate(ids[:1], assistant_model=assistant, assistant_ensemble_weight=bad, max_new_tokens=2)
    with pytest.raises(ValueError, match="assistant_ensemble_weight.*prompt lookup"):
        ours.generate(ids[:1], prompt_lookup_num_tokens=2, assistant_ensemble_weight=0.5, max_new_tokens=2)


def test_speculative_pick_with_an_ensemble_weight_draws_from_the_mixture():
    """Speculative sampling's acceptance rule with an ensemble weight w: a draft x ~ q is kept with
    probability min(1, 1 - w + w p(x) / q(x)), a rejection draws from max(p - q, 0) renormalised,
    so the token that comes is distributed as w * p + (1 - w) * q (as p itself without a weight)."""
    from moetorch.generation.utils import _speculative_pick

    g = torch.Generator().manual_seed(0)
    p = torch.rand(6, generator=g).pow(3).softmax(dim=0) ** 2
    p, q = p / p.sum(), torch.rand(6, generator=g).softmax(dim=0) ** 3
    q = q / q.sum()
    torch.manual_seed(0)
    n = 20000
    for weight, want in ((None, p), (0.3, 0.3 * p + 0.7 * q), (0.8, 0.8 * p + 0.2 * q)):
        counts = torch.zeros(6)
        drafts = torch.multinomial(q, n, replacement=True)
        for x in drafts.tolist():
            kept, _ = _speculative_pick(torch.tensor([[x]]), [q[None]], torch.stack([p, p])[None], weight)
            counts[kept[0, 0]] += 1
        assert 0.5 * (counts / n - want).abs().sum() < 0.02, (weight, counts / n, want)
    kept, k = _speculative_pick(torch.tensor([[2]]), [q[None]], torch.stack([q, p])[None], 0.5)
    assert k == 1 and kept[0, 0] == 2  # p == q at the draft: always kept


def test_a_moetorch_model_drafts_for_a_transformers_model(pair):
    """A moetorch model as the `assistant_model` of a Transformers model's generate: Transformers'
    greedy tokens, and the same drafting as with the Transformers assistant of the same weights
    (as many assistant forwards: the confidence stop, `is_assistant` + ConfidenceCriteria, and the
    cache crops between rounds agree); sampled drafts give tokens of the vocabulary. A moetorch
    cache handed to a Transformers model's assisted generate serves it too."""
    hf, ours = pair
    arch = next(a for a in ARCHS if isinstance(ours, a.ours["causal_lm"]))
    theirs = arch.hf["causal_lm"](arch.hf_config(num_hidden_layers=1)).eval()
    theirs.load_state_dict(hf.state_dict(), strict=False)
    assistant = one_layer_assistant(ours)  # the same weights
    ids, _ = prompts(batch=1, padding=None)
    kwargs = dict(max_new_tokens=16, eos_token_id=None, do_sample=False)
    want = hf.generate(ids, **kwargs)
    forwards = {}
    for name, drafter in (("moetorch", assistant), ("transformers", theirs)):
        calls = []
        hook = drafter.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        try:
            got = hf.generate(ids, assistant_model=drafter, **kwargs)
        finally:
            hook.remove()
        assert_same_tokens(want, got, f"Transformers' greedy, with a {name} assistant")
        forwards[name] = len(calls)
    assert forwards["moetorch"] == forwards["transformers"] < 16, forwards
    assert_same_tokens(want, hf.generate(ids, assistant_model=theirs, past_key_values=DynamicCache(), **kwargs),
                       "a moetorch cache in Transformers' assisted generate")
    torch.manual_seed(0)
    sampled = hf.generate(ids, assistant_model=assistant, max_new_tokens=8, do_sample=True, eos_token_id=None)
    assert sampled.shape == (1, ids.shape[1] + 8) and int(sampled.max()) < VOCAB


def test_confidence_criteria_and_batched_guidance_as_transformers():
    """ConfidenceCriteria (stop where the last token's probability is under the threshold) and
    ClassifierFreeGuidanceLogitsProcessor (a doubled batch: conditional rows, then unconditional
    ones) against Transformers' on random scores; their bad input named."""
    from transformers.generation import ConfidenceCriteria as TheirConfidence

    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        ids = torch.randint(0, VOCAB, (1, 5), generator=g)
        scores = (torch.randn(1, VOCAB, generator=g) * 3,)
        threshold = float(torch.rand((), generator=g)) * 0.2
        want = TheirConfidence(threshold)(ids, scores)
        got = moetorch.ConfidenceCriteria(threshold)(ids, scores)
        assert bool(got.all()) == bool(want), trial
    with pytest.raises(ValueError, match="output_scores=True"):
        moetorch.ConfidenceCriteria(0.4)(ids, None)
    ids = torch.randint(0, VOCAB, (3, 5), generator=g)
    scores = torch.randn(6, VOCAB, generator=g)
    want = transformers.ClassifierFreeGuidanceLogitsProcessor(2.5)(ids, scores.clone())
    torch.testing.assert_close(moetorch.ClassifierFreeGuidanceLogitsProcessor(2.5)(ids, scores.clone()), want)
    with pytest.raises(ValueError, match="guidance_scale must be greater than 1"):
        moetorch.ClassifierFreeGuidanceLogitsProcessor(1)
    with pytest.raises(ValueError, match="twice the ids'"):
        moetorch.ClassifierFreeGuidanceLogitsProcessor(2.0)(ids, scores[:3])


def test_compile_config_and_transformers_config_updates(pair, tmp_path):
    """`CompileConfig` (moetorch's or Transformers') is taken by GenerationConfig and generate and,
    as in Transformers, not written to generation_config.json; anything else there is an error that
    names it. `update(defaults_only=True)` sets only the fields not set, `allow_custom_entries=True`
    keeps unknown keys; `_get_default_generation_params` gives defaults that change nothing."""
    _, ours = pair
    ids, _ = prompts(batch=1, padding=None)
    for compile_config in (moetorch.CompileConfig(dynamic=True), transformers.CompileConfig(fullgraph=True)):
        gen = GenerationConfig(max_new_tokens=3, compile_config=compile_config)
        gen.save_pretrained(tmp_path)
        saved = json.loads((tmp_path / "generation_config.json").read_text())
        assert "compile_config" not in saved and saved["max_new_tokens"] == 3
        assert torch.equal(ours.generate(ids, generation_config=gen), ours.generate(ids, max_new_tokens=3))
    assert moetorch.CompileConfig(mode="default").to_dict()["mode"] == "default"
    with pytest.raises(ValueError, match="compile_config"):
        GenerationConfig(compile_config={"fullgraph": True})
    gen = GenerationConfig(top_k=5)
    unused = gen.update(defaults_only=True, top_k=7, top_p=0.5, flavour="x")
    assert (gen.top_k, gen.top_p, unused) == (5, 0.5, {"flavour": "x"})
    assert gen.update(allow_custom_entries=True, flavour="x") == {} and gen.flavour == "x"
    before = GenerationConfig(max_new_tokens=4)
    after = copy.deepcopy(before)
    after.update(**after._get_default_generation_params(), defaults_only=True)
    assert after.to_dict() == before.to_dict() and after.is_set("max_new_tokens") and not after.is_set("top_k")


def test_classifier_free_guidance(pair):
    ids, _ = prompts(batch=2, padding=None)
    plain = pair[1].generate(ids, max_new_tokens=8)
    assert_same_tokens(plain, pair[1].generate(ids, max_new_tokens=8, guidance_scale=1.0), "guidance_scale=1")
    negative = make_inputs(VOCAB, 2, 3, None, seed=9)[0]
    for settings in (dict(guidance_scale=1.8), dict(guidance_scale=1.5, negative_prompt_ids=negative),
                     dict(guidance_scale=2.0, negative_prompt_ids=negative, use_cache=False)):
        a, b = both(pair, ids, max_new_tokens=8, **settings)
        assert_same_tokens(a, b, f"cfg {settings.get('guidance_scale')}")
        assert not torch.equal(b, plain), "guidance changed nothing"


@contextlib.contextmanager
def count_host_reads():
    """Count calls that read a tensor's value back to the host (each one a sync on CUDA)."""
    names = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "cpu"]
    saved = {n: getattr(torch.Tensor, n) for n in names}
    counter = {"reads": 0}

    def counting(orig):
        def f(*args, **kwargs):
            counter["reads"] += 1
            return orig(*args, **kwargs)
        return f

    try:
        for n, orig in saved.items():
            setattr(torch.Tensor, n, counting(orig))
        yield counter
    finally:
        for n, orig in saved.items():
            setattr(torch.Tensor, n, orig)


def test_decode_loop_reads_the_device_only_to_decide_to_stop(pair):
    ids, mask = prompts()
    unused = next(t for t in range(3, VOCAB) if t not in greedy_new_tokens(pair, ids, mask, n=8))

    def reads(n, **kwargs):
        with count_host_reads() as counter:
            pair[1].generate(ids, attention_mask=mask, max_new_tokens=n, **kwargs)
        return counter["reads"]

    # Only max_length can stop: the host counts steps itself, whatever the length.
    assert reads(8, eos_token_id=None) == reads(4, eos_token_id=None)
    # With an EOS id: one read per step, whether the rows are done.
    assert reads(8, eos_token_id=unused) - reads(4, eos_token_id=unused) == 4
    assert reads(8, eos_token_id=unused, num_beams=2) - reads(4, eos_token_id=unused, num_beams=2) == 4
    # Read one step late (as on CUDA), it is still one read per step.
    pair[1].lagged_stop = True
    try:
        assert reads(8, eos_token_id=unused) - reads(4, eos_token_id=unused) == 4
    finally:
        del pair[1].lagged_stop


# ---- text: stop strings and streamers -----------------------------------------------------------


def bpe_tokenizer():
    """Byte-level BPE: the 256 bytes plus a few merged pairs, so that some tokens span 2 characters."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = [("s", "t"), ("o", "p"), ("a", "b"), ("t", "o")]
    for x, y in merges:
        vocab[x + y] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    return tok


class TinyTokenizer:
    """The smallest tokenizer generate() uses: encode/decode over a `tokenizers.Tokenizer`."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module", params=ARCHS, ids=ARCH_IDS)
def text_pair(request, tmp_path_factory):
    tok = bpe_tokenizer()
    hf, ours = make_pair(request.param, tmp_path_factory.mktemp(f"text-{request.param.name}"), seed=2,
                         vocab_size=tok.get_vocab_size())
    return hf, ours, tok


def allow(tok, pieces):
    """A prefix_allowed_tokens_fn allowing only these tokens (keeps the text ASCII)."""
    ids = [tok.token_to_id(p) for p in pieces]
    return lambda batch_id, row: ids


def test_stop_strings_match_transformers(text_pair):
    hf, ours, tok = text_pair
    mine, theirs = TinyTokenizer(tok), transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    prompt = torch.tensor([mine.encode("ab st")])
    fn = allow(tok, ["st", "op", "ab", "to"])  # 2-character tokens only
    seq = ours.generate(prompt, max_new_tokens=14, prefix_allowed_tokens_fn=fn)[0].tolist()
    pieces = [mine.decode([t]) for t in seq[prompt.shape[1] :]]
    # A stop string ending inside a token, one made of two whole tokens, and a list (the 2nd matches).
    stops = [pieces[3][-1] + pieces[4][0], pieces[5] + pieces[6], ["qq", pieces[-3][1] + pieces[-2]]]
    for stop in stops:
        kwargs = dict(max_new_tokens=14, prefix_allowed_tokens_fn=fn, stop_strings=stop)
        a = hf.generate(prompt, tokenizer=theirs, **kwargs)
        b = ours.generate(prompt, tokenizer=mine, **kwargs)
        assert_same_tokens(a, b, f"stop_strings={stop!r}")
        # It stops at the first token whose text completes a stop string.
        targets = [stop] if isinstance(stop, str) else stop
        want = next(n for n in range(prompt.shape[1] + 1, len(seq) + 1)
                    if any(s in mine.decode(seq[:n]) for s in targets))
        assert b.shape[1] == want, (stop, b.shape[1], want)
    with pytest.raises(ValueError, match="tokenizer"):
        ours.generate(prompt, max_new_tokens=3, stop_strings="x")


def test_streamers_yield_the_decoded_text(text_pair, capsys):
    hf, ours, tok = text_pair
    mine = TinyTokenizer(tok)
    prompt = torch.tensor([mine.encode("ab to\nst ")])
    fn = allow(tok, ["st", "op", "ab", "to", "Ġ", "Ċ", "a"])
    kwargs = dict(max_new_tokens=16, prefix_allowed_tokens_fn=fn)
    full = ours.generate(prompt, **kwargs)[0]
    capsys.readouterr()
    ours.generate(prompt, streamer=TextStreamer(mine), **kwargs)
    assert capsys.readouterr().out == mine.decode(full) + "\n"

    streamer = TextIteratorStreamer(mine, skip_prompt=True, timeout=60)
    worker = threading.Thread(target=ours.generate, kwargs=dict(inputs=prompt, streamer=streamer, **kwargs))
    worker.start()
    chunks = list(streamer)
    worker.join()
    assert "".join(chunks) == mine.decode(full[prompt.shape[1] :])
    assert len(chunks) > 2, "the text arrived in one piece"

    async def consume(streamer_class, model, tokenizer):
        streamer = streamer_class(tokenizer, skip_prompt=True, timeout=60)
        worker = threading.Thread(target=model.generate, kwargs=dict(inputs=prompt, streamer=streamer, **kwargs))
        worker.start()
        got = [chunk async for chunk in streamer]
        worker.join()
        return got

    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    want = asyncio.run(consume(transformers.AsyncTextIteratorStreamer, hf, theirs))
    assert asyncio.run(consume(AsyncTextIteratorStreamer, ours, mine)) == want == chunks
    with pytest.raises(RuntimeError, match="inside a coroutine"):
        AsyncTextIteratorStreamer(mine)


@pytest.mark.parametrize("text", ["def f(x):\n    return x\n\n  if x:\n\tpass\nend", "a\n b\n\n   c", "\n  lead"])
def test_streamed_lines_keep_their_leading_spaces_with_a_sentencepiece_tokenizer(tmp_path, text):
    """Phi-3.5-MoE's and JetMoE's tokenizers are SentencePiece (Llama): a decode drops the leading
    space of its first token. A line streamed after a newline is decoded with the token before it,
    so indented code streams as the whole decode gives it (Transformers 5.23's streamer lost one
    space per indented line; 5.24 fixed it)."""
    from tok_util import build_llama_tokenizer

    tok = moetorch.AutoTokenizer.from_pretrained(build_llama_tokenizer(tmp_path))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # a special token after a newline, skipped in the decode: the next line keeps its spaces too
    end = tok.convert_tokens_to_ids("<|end|>")
    marked = [t for i in ids for t in ([i, end, end] if tok.decode([i]).endswith("\n") else [i])]
    assert len(marked) > len(ids)

    class Recorded(TextStreamer):
        def on_finalized_text(self, chunk, stream_end=False):
            self.printed.append(chunk)

    for tokens, kwargs in ((ids, {}), (marked, dict(skip_special_tokens=True))):
        for split in (1, 3):  # a token a put, or several
            streamer, queue = Recorded(tok, **kwargs), TextIteratorStreamer(tok, **kwargs)
            streamer.printed = []
            for at in range(0, len(tokens), split):
                for s in (streamer, queue):
                    s.put(torch.tensor([tokens[at:at + split]]))
            streamer.end()
            queue.end()
            want = tok.decode(tokens, **kwargs)  # byte tokens are special in this tokenizer: skipped too
            assert "".join(streamer.printed) == want and "".join(queue) == want, (kwargs, split)
    # a long run of skipped tokens after a newline (EOS held back by min_new_tokens): a few decodes a
    # token, not a search back over the run at each
    calls = []

    class Counted:
        def decode(self, ids, **kwargs):
            calls.append(len(ids))
            return tok.decode(ids, **kwargs)

    run = Recorded(Counted(), skip_special_tokens=True)
    run.printed = []
    tokens = tok("a\n", add_special_tokens=False)["input_ids"] + [end] * 300 + ids
    for t in tokens:
        run.put(torch.tensor([t]))
    run.end()
    assert "".join(run.printed) == tok.decode(tokens, skip_special_tokens=True)
    assert len(calls) <= 4 * len(tokens), len(calls)


# ---- GenerationConfig -------------------------------------------------------------------------


def test_generation_config_io_and_overrides(pair, tmp_path):
    hf, ours = pair
    gc = GenerationConfig(max_new_tokens=7, do_sample=True, top_k=5, eos_token_id=[3, 4], my_custom_key="x")
    gc.save_pretrained(tmp_path / "gc")
    saved = json.loads((tmp_path / "gc" / "generation_config.json").read_text())
    assert saved == {"max_new_tokens": 7, "do_sample": True, "top_k": 5, "eos_token_id": [3, 4], "my_custom_key": "x"}
    back = GenerationConfig.from_pretrained(tmp_path / "gc")
    assert back == gc and back.my_custom_key == "x" and back.is_set("top_k") and not back.is_set("top_p")
    theirs = transformers.GenerationConfig.from_pretrained(tmp_path / "gc")
    assert (theirs.max_new_tokens, theirs.top_k, theirs.eos_token_id) == (7, 5, [3, 4])

    # The model's config comes from generation_config.json (Transformers wrote one) or the model config.
    assert (ours.generation_config.bos_token_id, ours.generation_config.eos_token_id) == (1, 2)
    fresh = type(ours)(ours.config)
    assert fresh.generation_config.pad_token_id == ours.config.pad_token_id
    ids, mask = prompts()
    new = greedy_new_tokens(pair, ids, mask, n=8)
    eos = int(new[0, 1])
    ours.generation_config = GenerationConfig(eos_token_id=eos, max_new_tokens=8, pad_token_id=0)
    try:
        ours.save_pretrained(tmp_path / "model")
        loaded = type(ours).from_pretrained(tmp_path / "model")
        assert loaded.generation_config.eos_token_id == eos
        out = loaded.generate(ids[:1], attention_mask=mask[:1])
        assert out.shape[1] == 6 + 2 and int(out[0, -1]) == eos
        # generate() kwargs beat the caller's config, which beats the model's.
        assert loaded.generate(ids[:1], generation_config=GenerationConfig(max_new_tokens=3),
                               eos_token_id=None).shape[1] == 6 + 3
        assert loaded.generate(ids[:1], generation_config=GenerationConfig(max_new_tokens=3),
                               max_new_tokens=5, eos_token_id=None).shape[1] == 6 + 5
        assert_same_tokens(hf.generate(ids[:1], max_new_tokens=5, eos_token_id=eos),
                           loaded.generate(ids[:1], max_new_tokens=5), "EOS from generation_config.json")
    finally:
        ours.generation_config = GenerationConfig.from_model_config(ours.config)
        ours.generation_config.bos_token_id = 1


INVALID = [
    (dict(do_sample=True, temperature=0.0), ValueError, "temperature"),
    (dict(do_sample=True, top_p=1.5), ValueError, "top_p"),
    (dict(do_sample=True, top_p=-0.1), ValueError, "top_p"),
    (dict(do_sample=True, min_p=2.0), ValueError, "min_p"),
    (dict(num_beams=2, num_return_sequences=3), ValueError, "num_return_sequences"),
    (dict(num_return_sequences=2), ValueError, "num_return_sequences"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(max_length=4), ValueError, "max_length"),
    (dict(early_stopping="sometimes"), ValueError, "early_stopping"),
    (dict(cache_implementation="paged"), ValueError, "cache_implementation"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(bad_words_ids=[[]]), ValueError, "bad_words_ids"),
    (dict(eos_token_id=2.5), ValueError, "eos_token_id"),  # a negative id is taken, as Transformers takes it
    (dict(max_new_token=3), TypeError, "max_new_token"),
    (dict(generation_config={"max_new_tokens": 3}), TypeError, "generation_config"),
    (dict(num_beams=2, streamer=TextStreamer(None)), ValueError, "streamer"),
    (dict(num_beams=2, assistant_model="x"), ValueError, "assistant_model"),
    (dict(num_assistant_tokens_schedule="fast"), ValueError, "num_assistant_tokens_schedule"),
    (dict(assistant_confidence_threshold=1.5), ValueError, "assistant_confidence_threshold"),
    (dict(assistant_lookbehind=-1), ValueError, "assistant_lookbehind"),
    (dict(prefill_chunk_size=0), ValueError, "prefill_chunk_size"),
    (dict(max_cache_len=-4), ValueError, "max_cache_len"),
    (dict(encoder_no_repeat_ngram_size=-1), ValueError, "encoder_no_repeat_ngram_size"),
    (dict(disable_compile="yes"), ValueError, "disable_compile"),
    (dict(do_sample=True, typical_p=0.0), ValueError, "typical_p"),
    (dict(do_sample=True, epsilon_cutoff=1.0), ValueError, "epsilon_cutoff"),
    (dict(do_sample=True, top_h=1.5), ValueError, "top_h"),
    (dict(suppress_tokens=[-1]), ValueError, "suppress_tokens"),
    (dict(forced_eos_token_id=[]), ValueError, "forced_eos_token_id"),
    (dict(exponential_decay_length_penalty=(2,)), ValueError, "exponential_decay_length_penalty"),
    (dict(exponential_decay_length_penalty=(2, 1.5), eos_token_id=None), ValueError, "needs an eos_token_id"),
    (dict(remove_invalid_values="yes"), ValueError, "remove_invalid_values"),
    (dict(forced_eos_token_id=[2, 3], suppress_tokens=[3, 2, 9]), ValueError, "`forced_eos_token_id`.*suppressed"),
    (dict(forced_bos_token_id=5, suppress_tokens=[5]), ValueError, "`forced_bos_token_id`.*suppressed"),
    (dict(forced_bos_token_id=-1), ValueError, "forced_bos_token_id"),
    (dict(prompt_lookup_num_tokens=2, max_matching_ngram_size=0), ValueError, "max_matching_ngram_size"),
    (dict(prompt_lookup_num_tokens=0), ValueError, "prompt_lookup_num_tokens"),
    (dict(prompt_lookup_num_tokens=2, num_beams=2), ValueError, "prompt_lookup_num_tokens"),
    (dict(past_key_values=(1, 2)), TypeError, "past_key_values"),
    (dict(attention_mask=torch.ones(1, 3)), ValueError, "attention_mask"),
]


@pytest.mark.parametrize(("settings", "error", "match"), INVALID, ids=[m for _, _, m in INVALID])
def test_invalid_settings_raise(pair, settings, error, match):
    ids, _ = prompts(batch=1, padding=None)
    with pytest.raises(error, match=match):
        pair[1].generate(ids, **settings)


def test_a_call_that_may_run_past_max_position_embeddings_warns(pair, caplog, monkeypatch):
    """As Transformers' MaxLengthCriteria warns once a sequence has run past max_position_embeddings
    (here said up front, when max_length reaches past it); greedy tokens still equal Transformers'."""
    hf, ours = pair
    monkeypatch.setattr(moetorch.utils, "WARNED_ONCE", set())
    n = ours.config.max_position_embeddings
    ids = torch.randint(3, ours.config.vocab_size, (1, n - 2), generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="moetorch"):
        ours.generate(ids, max_new_tokens=2, do_sample=False)
        assert "max_position_embeddings" not in caplog.text  # ends at n tokens: within
        out = ours.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert f"this call may run to {n + 3} tokens, past the model's max_position_embeddings ({n})" in caplog.text
    want = hf.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.tolist() == want.tolist()


def test_invalid_prompts_and_configs_raise(pair):
    ours = pair[1]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours.generate(torch.ones(1, ours.config.max_position_embeddings + 1, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        ours.generate(torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="generate\\(\\)"):
        GenerationConfig(logits_processor=LogitsProcessorList())
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(do_sample=True, temperature=-1.0)
    # temperature=0 is fine when not sampling (the spec's pipeline example passes it).
    ids, _ = prompts(batch=1, padding=None)
    assert ours.generate(ids, max_new_tokens=2, temperature=0.0, do_sample=False).shape[1] == 8


@pytest.mark.parametrize("settings", [dict(), dict(do_sample=True, top_k=8, num_return_sequences=2),
                                      dict(num_beams=3, num_return_sequences=2, length_penalty=0.5)],
                         ids=["greedy", "sampling", "beams"])
def test_compute_transition_scores_matches_transformers(pair, settings):
    """`compute_transition_scores`: on Transformers' own generate outputs it returns what
    Transformers' returns (bit for bit from the scores; raw logits normalized, to rounding), and on
    ours what Transformers returns on its outputs, to rounding; beams that end early read 0 past
    their end."""
    hf, ours = pair
    ids, mask = prompts()
    new = greedy_new_tokens(pair, ids, mask, n=6)
    kwargs = dict(attention_mask=mask, max_new_tokens=7, eos_token_id=[int(new[0, 2]), int(new[1, 4])],
                  pad_token_id=VOCAB - 1, return_dict_in_generate=True, output_scores=True, output_logits=True,
                  **settings)
    a, b = both(pair, ids, seed=3, **kwargs)
    assert_same_tokens(a.sequences, b.sequences, f"generate {settings}")
    for field, normalize in (("scores", False), ("logits", True)):
        want = hf.compute_transition_scores(a.sequences, getattr(a, field), a.beam_indices if "num_beams" in settings
                                            else None, normalize_logits=normalize)
        same_inputs = ours.compute_transition_scores(a.sequences, getattr(a, field), a.beam_indices if
                                                     "num_beams" in settings else None, normalize_logits=normalize)
        if normalize:  # Transformers' log-softmax runs over another layout: its sums may round apart
            torch.testing.assert_close(same_inputs, want, atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(same_inputs, want), field
        got = ours.compute_transition_scores(b.sequences, getattr(b, field), b.beam_indices if "num_beams" in settings
                                             else None, normalize_logits=normalize)
        close(want, got, f"transition scores from {field}")
    if "num_beams" in settings:
        ended = b.beam_indices < 0
        assert ended.any(), "no beam ended early: the test needs one"
        assert (ours.compute_transition_scores(b.sequences, b.scores, b.beam_indices)[ended] == 0).all()
    with pytest.raises(ValueError, match="output_scores"):
        ours.compute_transition_scores(b.sequences, ())
    if "num_beams" in settings:
        with pytest.raises(ValueError, match="beam_indices"):
            ours.compute_transition_scores(b.sequences, b.scores)
        with pytest.raises(ValueError, match="beam_indices has 1 rows"):
            ours.compute_transition_scores(b.sequences, b.scores, b.beam_indices[:1])


@pytest.mark.parametrize("seed", range(3))
def test_prompt_lookup_drafts_pass_the_logits_processors_as_transformers(seed):
    """Prompt lookup drops a draft the logits processors forbid (and the drafts after it), and where
    an occurrence's first draft is forbidden takes the next occurrence, as Transformers' candidate
    generator does: against it on random sequences over a few token ids, under a no-repeat rule
    and banned words (which forbid many looked-up drafts), and a repetition penalty (none)."""
    from transformers import LogitsProcessorList as HFList
    from transformers import NoBadWordsLogitsProcessor as HFBad
    from transformers import NoRepeatNGramLogitsProcessor as HFNoRepeat
    from transformers import RepetitionPenaltyLogitsProcessor as HFPenalty
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    from moetorch.generation import (
        LogitsProcessorList,
        NoBadWordsLogitsProcessor,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )
    from moetorch.generation.utils import _lookup_allowed, _prompt_lookup

    V = 6
    gen = torch.Generator().manual_seed(seed)
    rules = [(lambda: [HFNoRepeat(2)], lambda: [NoRepeatNGramLogitsProcessor(2)]),
             (lambda: [HFNoRepeat(3), HFBad([[4]], eos_token_id=5)],
              lambda: [NoRepeatNGramLogitsProcessor(3), NoBadWordsLogitsProcessor([[4]], eos_token_id=5)]),
             (lambda: [HFPenalty(1.5)], lambda: [RepetitionPenaltyLogitsProcessor(1.5)])]
    cut = 0
    for trial in range(30):
        L = int(torch.randint(3, 30, (1,), generator=gen))
        row = torch.randint(0, V, (L,), generator=gen)
        ngram, num = 1 + trial % 3, 1 + trial % 5
        theirs_list, ours_list = rules[trial % 3]
        theirs = PromptLookupCandidateGenerator(None, num, ngram, max_length=L + 100,
                                                logits_processor=HFList(theirs_list()), vocab_size=V)
        want = theirs.get_candidates(row[None])[0][0, L:].tolist()
        allowed = _lookup_allowed(LogitsProcessorList(ours_list()), row[None], V)
        begin, count = _prompt_lookup(row, num, ngram, L + 100, set(), None, allowed)
        assert row[begin : begin + count].tolist() == want, (row.tolist(), ngram, num, trial % 3)
        plain = _prompt_lookup(row, num, ngram, L + 100, set())
        cut += plain != (begin, count)
    assert cut >= 5, "the processors must forbid some looked-up drafts"
    assert _lookup_allowed(LogitsProcessorList(), torch.zeros(1, 3, dtype=torch.long), V) is None


def test_prompt_lookup_decoding_equals_greedy(pair):
    """`prompt_lookup_num_tokens`: drafts looked up in the sequence itself (the tokens after an
    earlier occurrence of its last n-gram), checked as assisted decoding checks an assistant's:
    greedy search's tokens and scores, Transformers' prompt-lookup tokens, and fewer forwards
    than tokens where the sequence repeats itself (these random models fall into loops)."""
    hf, ours = pair
    ids, _ = prompts(batch=3, padding=None)
    calls, new_tokens = [], 0
    for row in range(3):
        prompt = ids[row : row + 1]
        kwargs = dict(max_new_tokens=24, eos_token_id=None, return_dict_in_generate=True, output_scores=True)
        want = ours.generate(prompt, **kwargs)
        hook = ours.register_forward_hook(lambda *_: calls.append(1))
        try:
            got = ours.generate(prompt, prompt_lookup_num_tokens=3, **kwargs)
        finally:
            hook.remove()
        assert_same_tokens(want.sequences, got.sequences, f"prompt lookup, row {row}")
        assert_same_tokens(hf.generate(prompt, prompt_lookup_num_tokens=3, max_matching_ngram_size=2,
                                       max_new_tokens=24, eos_token_id=None), got.sequences, "Transformers")
        assert len(got.scores) == len(want.scores)
        for x, y in zip(want.scores, got.scores):
            close(x, y, "prompt lookup scores")
        new_tokens += got.sequences.shape[1] - prompt.shape[1]
    assert len(calls) < new_tokens, "no looked-up draft was ever kept"
    eos = int(want.sequences[0, -5])
    a, b = both(pair, ids[2:], max_new_tokens=24, eos_token_id=eos, prompt_lookup_num_tokens=2)
    assert_same_tokens(a, b, "prompt lookup with an EOS id")
    with pytest.raises(ValueError, match="not both"):
        ours.generate(ids[:1], assistant_model=ours, prompt_lookup_num_tokens=2, max_new_tokens=3)


@pytest.mark.parametrize("seed", range(4))
def test_prompt_lookup_drafts_are_transformers_candidates(seed):
    """The drafts prompt lookup takes from a sequence, against Transformers' own candidate generator
    on the same sequence: random sequences over a few token ids (so n-grams recur), with and
    without EOS ids among them, 1- to 3-grams, and short max_lengths (Transformers' cap: no draft
    from index max_length on, none where one token is left, so drafts may run past it); a static
    cache's free slots cap them further."""
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    from moetorch.generation.utils import _prompt_lookup

    gen = torch.Generator().manual_seed(seed)
    for trial in range(40):
        L = int(torch.randint(2, 30, (1,), generator=gen))
        row = torch.randint(0, 5, (L,), generator=gen)
        eos = [] if trial % 2 else [int(torch.randint(0, 5, (1,), generator=gen))]
        ngram, num = 1 + trial % 3, 1 + trial % 7
        theirs = PromptLookupCandidateGenerator(torch.tensor(eos) if eos else None, num, ngram, max_length=L + 100)
        want = theirs.get_candidates(row[None])[0][0, L:].tolist()
        begin, count = _prompt_lookup(row, num, ngram, L + 100, set(eos))
        assert row[begin : begin + count].tolist() == want, (row.tolist(), eos, ngram, num)
        for max_length in range(L + 1, L + 5):  # (generate calls it while the sequence is shorter)
            theirs.max_length = max_length
            short = theirs.get_candidates(row[None])[0][0, L:].tolist()
            begin, count = _prompt_lookup(row, num, ngram, max_length, set(eos))
            assert row[begin : begin + count].tolist() == short, (row.tolist(), eos, ngram, num, max_length)
        room = int(torch.randint(0, 4, (1,), generator=gen))  # a static cache with `room` free slots
        begin, count = _prompt_lookup(row, num, ngram, L + 100, set(eos), room)
        assert row[begin : begin + count].tolist() == want[:room]


def test_assisted_decoding_with_a_stop_rule_of_its_own_and_a_streamer(pair):
    """A custom stopping rule is read each round (it stops a round's tokens where greedy search
    stops them, or after: a round adds several); a custom EosTokenCriteria stops the call after a
    round whose last token is one of its ids, as Transformers' does (its ids do not cut a round's
    tokens, as the generation config's EOS ids do); a streamer gets the prompt, then each round's
    tokens."""
    from moetorch.generation import EosTokenCriteria, StoppingCriteria

    ours = pair[1]
    ids, _ = prompts(batch=1, padding=None, seed=3)
    prompt = torch.cat([ids, ids, ids[:, :3]], dim=1)
    free = ours.generate(prompt, max_new_tokens=20, eos_token_id=None)
    L = prompt.shape[1]

    class AtLength(StoppingCriteria):
        calls = 0

        def __call__(self, input_ids, scores, **kwargs):
            AtLength.calls += 1
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= L + 7, dtype=torch.bool)

    got = ours.generate(prompt, max_new_tokens=20, eos_token_id=None, prompt_lookup_num_tokens=3,
                        stopping_criteria=StoppingCriteriaList([AtLength()]))
    assert AtLength.calls > 0 and L + 7 <= got.shape[1] <= L + 7 + 3
    assert_same_tokens(free[:, : got.shape[1]], got, "stopped by a rule of its own")
    stop = int(free[0, L + 5])
    first = L + int((free[0, L:] == stop).nonzero()[0]) + 1
    a, b = both(pair, prompt, max_new_tokens=20, eos_token_id=None, prompt_lookup_num_tokens=3,
                stopping_criteria=[transformers.EosTokenCriteria(stop)])
    got = ours.generate(prompt, max_new_tokens=20, eos_token_id=None, prompt_lookup_num_tokens=3,
                        stopping_criteria=StoppingCriteriaList([EosTokenCriteria(stop)]))
    assert_same_tokens(a, got, "a custom EosTokenCriteria")
    assert_same_tokens(a, b, "Transformers' EosTokenCriteria passed to moetorch")
    for kw in (dict(prompt_lookup_num_tokens=3), dict(assistant_model=copy.deepcopy(ours))):
        got = ours.generate(prompt, max_new_tokens=20, eos_token_id=None, **kw,
                            stopping_criteria=StoppingCriteriaList([EosTokenCriteria(stop)]))
        assert first <= got.shape[1] and int(got[0, -1]) == stop or got.shape[1] == L + 20
        assert_same_tokens(free[:, : got.shape[1]], got, f"a custom EosTokenCriteria, {kw}")

        class Collect:
            def __init__(self):
                self.puts, self.ended = [], False

            def put(self, t):
                self.puts.append(t.reshape(-1).tolist())

            def end(self):
                self.ended = True

        streamer = Collect()
        got = ours.generate(prompt, max_new_tokens=12, eos_token_id=None, streamer=streamer, **kw)
        assert streamer.ended and streamer.puts[0] == prompt[0].tolist()
        assert sum(streamer.puts[1:], []) == got[0, L:].tolist() == free[0, L : L + 12].tolist()


def _drafting_rounds(n_new: int, num: int, schedule: str, one_draft: bool = False) -> tuple[int, int]:
    """(rounds, the draft length reached) of assisted decoding when every draft is kept, by
    Transformers' rules: a round drafts min(num, tokens left - 1) (one_draft: the confidence
    threshold stops it after one) and adds its drafts and one token; the heuristic schedules then
    add 2 to num."""
    rounds = made = 0
    while made < n_new:
        drafts = min(num, n_new - made - 1, 1 if one_draft else num)
        made += drafts + 1
        rounds += 1
        num = num + 2 if schedule != "constant" else num
    return rounds, num


def test_assisted_draft_length_schedule_and_confidence(pair, tmp_path):
    """Transformers' draft-length settings. The "heuristic" schedules add 2 to the draft length
    after a round whose drafts were all kept (else take 1 off), and "heuristic" leaves the length
    reached in the assistant's generation config, where its next call starts; a draft that the
    assistant gives less than `assistant_confidence_threshold` ends the round's drafting; the
    call's settings beat the assistant's config, which beats the defaults. The model assisting a
    copy of itself keeps every draft, so the rounds (this model's forwards) follow from the
    settings alone, and the tokens are greedy search's."""
    ours = pair[1]
    assistant = copy.deepcopy(ours)
    prompt, _ = prompts(batch=1, padding=None)
    n = 12
    want = ours.generate(prompt, max_new_tokens=n, eos_token_id=None)

    def rounds(**kw):
        calls = []
        hook = ours.register_forward_hook(lambda *_: calls.append(1))
        try:
            got = ours.generate(prompt, assistant_model=assistant, max_new_tokens=n, eos_token_id=None, **kw)
        finally:
            hook.remove()
        assert_same_tokens(want, got, f"assisted, {kw}")
        return len(calls)

    off = dict(assistant_confidence_threshold=0.0)
    assert rounds(num_assistant_tokens=2, **off) == _drafting_rounds(n, 2, "constant")[0] == 4
    assert rounds(num_assistant_tokens=2, num_assistant_tokens_schedule="heuristic_transient", **off) == 3
    assert not assistant.generation_config.is_set("num_assistant_tokens")
    want_rounds, reached = _drafting_rounds(n, 2, "heuristic")
    assert rounds(num_assistant_tokens=2, num_assistant_tokens_schedule="heuristic", **off) == want_rounds == 3
    assert assistant.generation_config.num_assistant_tokens == reached == 8
    # the assistant's config when the call sets nothing (its 8 now): 12 new tokens in 2 rounds
    assert rounds(**off) == _drafting_rounds(n, 8, "constant")[0] == 2
    assistant.generation_config.num_assistant_tokens = 1
    assert rounds(**off) == 6
    assert rounds(num_assistant_tokens=5, **off) == 2  # the call's setting wins
    # a threshold of 1 stops every round after its first draft; None and 0 stop none
    assert rounds(num_assistant_tokens=5, assistant_confidence_threshold=1.0) == _drafting_rounds(
        n, 5, "constant", one_draft=True)[0] == 6
    assert rounds(num_assistant_tokens=5, assistant_confidence_threshold=None) == 2
    assistant.generation_config.assistant_confidence_threshold = 1.0  # from the assistant's config too
    assert rounds(num_assistant_tokens=5) == 6
    assistant.generation_config.num_assistant_tokens_schedule = "sometimes"
    with pytest.raises(ValueError, match="num_assistant_tokens_schedule"):
        rounds()
    # the fields round-trip through generation_config.json, which Transformers reads
    GenerationConfig(num_assistant_tokens_schedule="heuristic", assistant_confidence_threshold=0.25,
                     assistant_lookbehind=4).save_pretrained(tmp_path)
    theirs = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (theirs.num_assistant_tokens_schedule, theirs.assistant_confidence_threshold,
            theirs.assistant_lookbehind) == ("heuristic", 0.25, 4)
    assert GenerationConfig.from_pretrained(tmp_path).num_assistant_tokens_schedule == "heuristic"


def test_bos_start_and_randomized_assistant_vocab_mismatch(pair):
    arch = next(a for a in ARCHS if isinstance(pair[1], a.ours["causal_lm"]))
    a, b = both(pair, max_new_tokens=5)  # no prompt: start from bos_token_id
    assert_same_tokens(a, b, "from bos")
    assert b.shape == (1, 6) and int(b[0, 0]) == 1
    other = arch.ours["causal_lm"](arch.our_config(vocab_size=50, num_hidden_layers=1))
    randomize_(other, 0)
    with pytest.raises(ValueError, match="vocabulary"):
        pair[1].generate(torch.ones(1, 3, dtype=torch.long), assistant_model=other.eval(), max_new_tokens=3)


@pytest.mark.parametrize("settings", [dict(bias=2.5), dict(bias=3.0, context_width=2, seeding_scheme="selfhash"),
                                      dict(greenlist_ratio=0.5, hashing_key=7)], ids=["lefthash", "selfhash", "half"])
def test_watermarking_matches_transformers(pair, settings, tmp_path):
    """Watermarked greedy search, sampling and beam search give Transformers' tokens on both caches,
    and the detectors agree on every statistic: watermarked text is detected, plain text is not."""
    hf, ours = pair
    ids, mask = prompts(batch=2)
    hf_cfg, our_cfg = transformers.WatermarkingConfig(**settings), moetorch.WatermarkingConfig(**settings)
    for kw in (dict(do_sample=False), dict(do_sample=True, top_k=20), dict(num_beams=2)):
        common = dict(attention_mask=mask, max_new_tokens=10, **kw)
        torch.manual_seed(4)
        want = hf.generate(ids, watermarking_config=hf_cfg, **common)
        for cache, cfg in (("dynamic", our_cfg), ("static", settings)):  # a dict works too
            torch.manual_seed(4)
            got = ours.generate(ids, watermarking_config=cfg, cache_implementation=cache, **common)
            assert_same_tokens(want, got, f"watermarked {kw}, {cache} cache")
    torch.manual_seed(5)
    free = dict(max_new_tokens=40, do_sample=True, eos_token_id=None)  # no EOS padding in the texts
    marked = ours.generate(ids[:, -1:], watermarking_config=our_cfg, **free)[:, 1:]
    torch.manual_seed(5)
    plain = ours.generate(ids[:, -1:], **free)[:, 1:]
    detectors = (transformers.WatermarkDetector(hf.config, "cpu", hf_cfg),
                 moetorch.WatermarkDetector(ours.config, "cpu", our_cfg))
    for text in (marked, plain):
        a, b = (d(text, return_dict=True) for d in detectors)
        for field in ("num_tokens_scored", "num_green_tokens", "green_fraction", "z_score", "p_value", "prediction",
                      "confidence"):
            assert (getattr(a, field) == getattr(b, field)).all(), field
    # the bias shows: more green tokens than the same draws without it
    assert (detectors[1](marked, return_dict=True).z_score > detectors[1](plain, return_dict=True).z_score).all()
    gen = moetorch.GenerationConfig(watermarking_config=settings)
    gen.save_pretrained(tmp_path)
    assert moetorch.GenerationConfig.from_pretrained(tmp_path).watermarking_config == our_cfg
    assert transformers.GenerationConfig.from_pretrained(tmp_path).watermarking_config.to_dict() == {
        **hf_cfg.to_dict()}


def test_watermarking_errors_name_the_setting(pair):
    ids, _ = prompts(batch=1, padding=None)
    for bad, match in ((dict(seeding_scheme="middlehash"), "seeding_scheme"),
                       (dict(greenlist_ratio=1.0), "greenlist_ratio"), (dict(context_width=0), "context_width"),
                       (dict(ngram_len=5, keys=[1, 2]), "SynthID"), (dict(colour="green"), "colour"),
                       (dict(hashing_key="k"), "hashing_key"), (5, "must be a WatermarkingConfig or a dict")):
        with pytest.raises(ValueError, match=match):
            pair[1].generate(ids, max_new_tokens=2, watermarking_config=bad)
    with pytest.raises(ValueError, match="context_width"):
        moetorch.WatermarkDetector(pair[1].config, "cpu", moetorch.WatermarkingConfig(context_width=4))(ids[:, :4])


def test_a_transformers_generation_config_is_taken_for_its_set_fields(tmp_path):
    """A script that still imports Transformers' GenerationConfig: generate, the model's
    generation_config and from_pretrained take it as the moetorch config of the fields it sets
    (the model's defaults fill the rest, as for a moetorch config)."""
    arch = ARCHS[0]
    hf, ours = make_pair(arch, tmp_path)
    ids, mask = make_inputs(arch.base["vocab_size"], 2, 5, "left", seed=3)
    settings = dict(max_new_tokens=6, do_sample=True, top_k=5, temperature=0.7, pad_token_id=0,
                    watermarking_config={"bias": 2.0})
    runs = []
    for config in (moetorch.GenerationConfig(**settings), transformers.GenerationConfig(**settings)):
        torch.manual_seed(4)
        runs.append(ours.generate(ids, attention_mask=mask, generation_config=config))
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(4)
    assert torch.equal(hf.generate(ids, attention_mask=mask, generation_config=transformers.GenerationConfig(
        **settings)), runs[0])
    ours.generation_config = transformers.GenerationConfig(max_new_tokens=3, eos_token_id=5)
    assert isinstance(ours.generation_config, moetorch.GenerationConfig)
    assert ours.generation_config.max_new_tokens == 3 and ours.generation_config.is_set("eos_token_id")
    loaded = type(ours).from_pretrained(tmp_path / "hf", generation_config=transformers.GenerationConfig(top_k=7))
    assert loaded.generation_config.top_k == 7
    with pytest.raises(TypeError, match="generation_config must be a moetorch GenerationConfig .*got builtins.dict"):
        ours.generate(ids, generation_config={"max_new_tokens": 2})
    with pytest.raises(TypeError, match=r"moetorch Cache .*got transformers\.cache_utils\.DynamicCache"):
        ours.generate(ids, attention_mask=mask, past_key_values=transformers.DynamicCache(), max_new_tokens=2)


# ---- negative EOS and pad ids -------------------------------------------------------------------


def first_ends(new: torch.Tensor, eos: list[int]) -> list[int]:
    """Each row's count of new tokens through its first EOS (one past the row where none)."""
    return [next((i + 1 for i, t in enumerate(row) if t in eos), len(row) + 1) for row in new.tolist()]


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(pad_token_id=-1), dict(cache_implementation="static", pad_token_id=-1),
     dict(do_sample=True, top_k=10, num_return_sequences=2, pad_token_id=-1), dict(num_beams=2),
     dict(num_beams=3, num_return_sequences=2, pad_token_id=-1), dict(use_cache=False, pad_token_id=-1)],
    ids=["greedy", "pad", "static", "sampling", "beams", "beams-pad", "no-cache"],
)
def test_a_negative_eos_id_never_comes(pair, settings, caplog):
    """`eos_token_id=-1` (Transformers' own tests pass it to generate to the maximum length), with a
    pad id of -1 too: taken, and no token matches it; Transformers' tokens, with its warnings."""
    moetorch.utils.WARNED_ONCE.discard("generate: negative pad_token_id")  # the warning comes once per process
    ids, mask = prompts()
    seed = 4 if settings.get("do_sample") else None
    with caplog.at_level("WARNING", logger="moetorch"):
        a, b = both(pair, ids, attention_mask=mask, max_new_tokens=7, eos_token_id=-1, seed=seed, **settings)
    assert_same_tokens(a, b, f"eos_token_id=-1, {settings}")
    assert b.shape[1] == ids.shape[1] + 7
    assert "`eos_token_id` [-1] holds negative ids" in caplog.text
    assert ("`pad_token_id` is negative (-1)" in caplog.text) == ("pad_token_id" in settings)
    if not settings.get("do_sample"):  # as without an EOS id
        assert_same_tokens(pair[1].generate(ids, attention_mask=mask, max_new_tokens=7, eos_token_id=None,
                                            **{k: v for k, v in settings.items() if k != "pad_token_id"}), b, "no EOS")
    # among other EOS ids: those stop rows, as they do alone
    new = greedy_new_tokens(pair, ids, mask, n=7)
    eos = [-1, int(new[1, 2])]
    a, b = both(pair, ids, attention_mask=mask, max_new_tokens=7, eos_token_id=eos, seed=seed,
                **{**settings, "pad_token_id": VOCAB - 1})
    assert_same_tokens(a, b, f"eos_token_id={eos}, {settings}")


def test_a_negative_eos_and_pad_id_set_on_the_generation_config(pair):
    hf, ours = pair
    ids, mask = prompts()
    saved = [(m.generation_config.eos_token_id, m.generation_config.pad_token_id) for m in pair]
    try:
        for model in pair:
            model.generation_config.eos_token_id = -1
            model.generation_config.pad_token_id = -1
        a, b = both(pair, ids, attention_mask=mask, max_new_tokens=6)
        assert_same_tokens(a, b, "eos and pad -1 on the generation config")
        assert b.shape[1] == ids.shape[1] + 6
        # a passed config: Transformers' (which moetorch takes too), or moetorch's
        settings = dict(eos_token_id=[-1], pad_token_id=-1, do_sample=False, max_new_tokens=6)
        a, b = both(pair, ids, attention_mask=mask, generation_config=transformers.GenerationConfig(**settings))
        assert_same_tokens(a, b, "a passed Transformers config with eos and pad -1")
        c = ours.generate(ids, attention_mask=mask, generation_config=GenerationConfig(**settings))
        assert_same_tokens(a, c, "a passed config with eos and pad -1")
    finally:
        for model, (eos, pad) in zip(pair, saved):
            model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, pad


def test_negative_pad_and_eos_ids_in_the_config_and_what_stays_invalid(tmp_path):
    gen = GenerationConfig(eos_token_id=-1, pad_token_id=-1)
    assert (gen.eos_token_id, gen.pad_token_id) == (-1, -1)
    assert GenerationConfig(eos_token_id=torch.tensor([2, -1])).eos_token_id == [2, -1]
    # a negative EOS id is saved and read back, as Transformers saves it; a negative pad id is not saved
    GenerationConfig(eos_token_id=[2, -1]).save_pretrained(tmp_path / "eos")
    assert GenerationConfig.from_pretrained(tmp_path / "eos").eos_token_id == [2, -1]
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "eos").eos_token_id == [2, -1]
    with pytest.raises(ValueError, match="Fix these issues"):
        transformers.GenerationConfig(pad_token_id=-1).save_pretrained(tmp_path / "theirs")
    with pytest.raises(ValueError, match="`pad_token_id` is -1"):
        gen.save_pretrained(tmp_path / "ours")
    for settings, field in [(dict(pad_token_id=1.5), "pad_token_id"), (dict(pad_token_id=True), "pad_token_id"),
                            (dict(pad_token_id="0"), "pad_token_id"), (dict(eos_token_id=2.5), "eos_token_id"),
                            (dict(eos_token_id=[2, True]), "eos_token_id"), (dict(eos_token_id=[]), "eos_token_id"),
                            (dict(eos_token_id="2"), "eos_token_id"), (dict(forced_eos_token_id=-1), "forced_eos_token_id"),
                            (dict(bos_token_id=-1), "bos_token_id"), (dict(forced_bos_token_id=-1), "forced_bos_token_id")]:
        with pytest.raises(ValueError, match=f"`{field}`"):
            GenerationConfig(**settings)


@contextlib.contextmanager
def fed_ids(model):
    """The smallest token id each forward of `model` is given."""
    seen = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.numel():
            seen.append(int(ids.min()))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize("settings", [dict(), dict(cache_implementation="static"), dict(use_cache=False),
                                      dict(lagged=True)], ids=["dynamic", "static", "no-cache", "lagged"])
def test_a_negative_pad_id_is_returned_and_never_fed_to_the_model(pair, settings, monkeypatch):
    """A row that stops before the others, with pad_token_id=-1: Transformers writes -1 into its
    next token. Where that is the last step, the -1s come back, as Transformers returns them; where
    a later step would feed -1 to the model (Transformers: an IndexError from the embedding; a
    device-side assert on a GPU), moetorch raises a ValueError naming pad_token_id before it
    does. The model never sees a negative id, with the one-step-late stop check too."""
    hf, ours = pair
    ids, mask = prompts()
    settings = dict(settings)
    lagged = settings.pop("lagged", False)
    new = greedy_new_tokens(pair, ids, mask, n=8)
    # an EOS id that stops a row at least two steps before another stops
    eos = next([t] for t in new[:, :3].flatten().tolist()
               if min(first_ends(new, [t])) + 2 < max(first_ends(new, [t])))
    first = min(first_ends(new, eos))
    with contextlib.ExitStack() as stack:
        reads = stack.enter_context(lagged_stop(ours, monkeypatch)) if lagged else None
        seen = stack.enter_context(fed_ids(ours))
        # the step after the first row stops is the last: its -1 is returned
        a, b = both(pair, ids, attention_mask=mask, max_new_tokens=first + 1, eos_token_id=eos, pad_token_id=-1,
                    **settings)
        assert_same_tokens(a, b, f"pad -1 in the last step, {settings}")
        assert (b[:, -1] == -1).any() and (b[:, -1] != -1).any()
        # another step after it would feed the -1
        with pytest.raises(IndexError):
            hf.generate(ids, attention_mask=mask, max_new_tokens=first + 2, eos_token_id=eos, pad_token_id=-1,
                        **settings)
        with pytest.raises(ValueError, match="pad_token_id=-1"):
            ours.generate(ids, attention_mask=mask, max_new_tokens=first + 2, eos_token_id=eos, pad_token_id=-1,
                          **settings)
        assert seen and min(seen) >= 0
        if lagged:
            assert reads == []  # the stop is read as it comes: no step computed ahead of it
    # a pad id of the vocabulary: on to max_new_tokens, as before
    a, b = both(pair, ids, attention_mask=mask, max_new_tokens=first + 2, eos_token_id=eos, pad_token_id=VOCAB - 1,
                **settings)
    assert_same_tokens(a, b, f"pad {VOCAB - 1}")


def test_finished_beams_padded_with_a_negative_pad_id(pair):
    """Beam search never feeds a finished beam: its padding is -1 in the output, as in Transformers."""
    ids, mask = prompts(batch=2)
    new = greedy_new_tokens(pair, ids, mask, n=6)
    eos = [int(new[0, 1]), int(new[1, 3])]
    a, b = both(pair, ids, attention_mask=mask, max_new_tokens=8, num_beams=3, num_return_sequences=3,
                eos_token_id=eos, pad_token_id=-1)
    assert_same_tokens(a, b, "beam search, pad_token_id=-1")
    assert (b[:, -1] == -1).any()


def test_assisted_and_prompt_lookup_decoding_with_a_negative_eos_id(pair):
    hf, ours = pair
    assistant = one_layer_assistant(ours)
    ids, _ = prompts(batch=1, padding=None)
    kwargs = dict(max_new_tokens=12, eos_token_id=-1, pad_token_id=-1)
    want = hf.generate(ids, **kwargs)
    assert want.shape[1] == ids.shape[1] + 12
    looked_up = hf.generate(ids, prompt_lookup_num_tokens=2, **kwargs)  # (Transformers': dynamic caches only)
    for cache in (None, "static"):
        got = ours.generate(ids, assistant_model=assistant, num_assistant_tokens=4, cache_implementation=cache,
                            **kwargs)
        assert_same_tokens(want, got, f"assisted, eos -1, {cache}")
        got = ours.generate(ids, prompt_lookup_num_tokens=2, cache_implementation=cache, **kwargs)
        assert_same_tokens(looked_up, got, f"prompt lookup, eos -1, {cache}")
        assert_same_tokens(want, got, "prompt lookup equals greedy")


def test_continuous_batching_takes_a_negative_eos_id_as_one_that_never_comes(pair):
    hf, ours = pair
    inputs = [[5, 6, 7, 8], [9, 10, 11, 12, 13], [20, 21]]
    want = [hf.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, eos_token_id=-1)[0, len(p):].tolist()
            for p in inputs]
    for eos in (-1, [-1]):
        out = ours.generate_batch(inputs, generation_config=GenerationConfig(
            max_new_tokens=5, do_sample=False, eos_token_id=eos, pad_token_id=-1))
        assert [r.generated_tokens for r in out.values()] == want
    # beside an EOS id that comes: that one ends its request
    stop = want[0][1]
    out = ours.generate_batch(inputs, generation_config=GenerationConfig(
        max_new_tokens=5, do_sample=False, eos_token_id=[stop, -1], pad_token_id=-1))
    assert [r.generated_tokens for r in out.values()] == [
        w[: w.index(stop) + 1] if stop in w else w for w in want]


def test_the_server_manager_takes_a_model_whose_eos_id_is_negative(pair):
    """`moetorch serve` builds its manager from the model's generation config: an EOS id of -1 (and
    the pad id it falls back to) there runs each request to its max_new_tokens."""
    from moetorch.serve.engine import build_manager

    hf, ours = pair
    saved = ours.generation_config.eos_token_id, ours.generation_config.pad_token_id
    prompt = [5, 6, 7, 8]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=-1)[0, 4:].tolist()
    try:
        ours.generation_config.eos_token_id, ours.generation_config.pad_token_id = -1, None
        manager, info = build_manager(ours, eos=[], pad=None, max_model_len=32, max_batch=2)
        assert info["eos"] == [-1]
        manager.start()
        try:
            manager.add_request(prompt, request_id="r", max_new_tokens=5, eos_token_id=info["eos"])
            result = manager.get_result("r", timeout=120)
        finally:
            manager.stop()
    finally:
        ours.generation_config.eos_token_id, ours.generation_config.pad_token_id = saved
    assert result.error is None and result.generated_tokens == want
