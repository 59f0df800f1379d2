"""Bad input to the public API: an error that names the argument, field or file at fault, raised
before any work is lost; and inputs Transformers takes (a 4D additive mask), taken the same way."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import transformers
from archs import ARCH_IDS, ARCHS, PHIMOE
from parity import close, make_pair
from tok_util import build_tokenizer

import moetorch
from moetorch import ConfigError, DynamicCache, StaticCache

VOCAB = 97


@pytest.fixture(scope="module", params=ARCHS, ids=ARCH_IDS)
def pair(request, tmp_path_factory):
    return make_pair(request.param, tmp_path_factory.mktemp(request.param.name), seed=0)


def ids_(batch=2, seq=5, seed=0):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_forward_input_ids_and_embeds(pair):
    """Ids outside the vocabulary (negative, or from tokens added without resizing), ids that are
    no tensor (a tokenizer's output without return_tensors) or not integers, an empty batch,
    embeddings of another width: each an error naming the argument, in forward and generate.
    Embeddings of another float dtype are cast to the model's, as generate casts them."""
    _, ours = pair
    for bad in (torch.full((1, 3), VOCAB), torch.full((1, 3), -1)):
        for call in (lambda b=bad: ours(b), lambda b=bad: ours.generate(b, max_new_tokens=2)):
            with pytest.raises(ValueError, match=r"input_ids hold id -?\d+, outside the vocabulary \(0 .. 96"):
                call()
    with pytest.raises(TypeError, match=r"input_ids must be an integer tensor .* got list .*return_tensors"):
        ours(input_ids=[[1, 2, 3]])
    with pytest.raises(TypeError, match="input_ids must be an integer tensor .* got dtype torch.float32"):
        ours(ids_().float())
    with pytest.raises(ValueError, match="batch size 0"):
        ours(torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch size 0"):
        ours.generate(torch.zeros(0, 3, dtype=torch.long), max_new_tokens=2)
    width = ours.config.hidden_size
    with pytest.raises(ValueError, match=rf"inputs_embeds must have shape \[batch, seq, hidden_size\] = "
                                         rf"\[batch, seq, {width}\], got \(1, 3, 7\)"):
        ours(inputs_embeds=torch.randn(1, 3, 7))
    with pytest.raises(TypeError, match="inputs_embeds must be a float tensor"):
        ours(inputs_embeds=torch.ones(1, 3, width, dtype=torch.long))
    embeds = ours.get_input_embeddings()(ids_())
    want = ours(inputs_embeds=embeds).logits
    close(want, ours(inputs_embeds=embeds.double()).logits, "float64 embeddings, cast")
    with pytest.raises(TypeError, match="logits_to_keep must be an int"):
        ours(ids_(), logits_to_keep=1.0)


def test_labels_named(pair):
    """Labels of another shape than the input, float labels, or ids outside the vocabulary (but
    -100) name `labels`, where the loss would raise in terms of flattened token counts."""
    _, ours = pair
    ids = ids_()
    with pytest.raises(ValueError, match=r"labels must have the input's shape \[batch, seq\] = \[2, 5\], got \[2, 4\]"):
        ours(ids, labels=ids[:, :4])
    with pytest.raises(TypeError, match="labels must be an integer tensor .* got torch.float32"):
        ours(ids, labels=ids.float())
    with pytest.raises(ValueError, match=r"labels hold 200, neither a token id \(0 .. 96\) nor ignore_index"):
        ours(ids, labels=torch.full_like(ids, 200))
    labels = ids.clone()
    labels[:, :2] = -100
    assert torch.isfinite(ours(ids, labels=labels).loss)


def test_caches_that_do_not_fit(pair):
    """A DynamicCache filled for another batch size, and a StaticCache shorter than what generate
    will cache, are errors naming past_key_values, before any token is generated."""
    _, ours = pair
    cache = DynamicCache()
    ours(ids_(), past_key_values=cache)
    with pytest.raises(ValueError, match="past_key_values holds 2 rows, but the input has 1"):
        ours(ids_(1, 2), past_key_values=cache)
    for length in (5, 8):  # 5 prompt tokens + 5 new ones cache 9
        with pytest.raises(ValueError, match=f"StaticCache's max_cache_len={length} is shorter than the 9 tokens"):
            ours.generate(ids_(), max_new_tokens=5, past_key_values=StaticCache(ours.config, max_cache_len=length))
    out = ours.generate(ids_(), max_new_tokens=5, past_key_values=StaticCache(ours.config, max_cache_len=9))
    assert out.shape == (2, 10)
    with pytest.raises(ValueError, match="max_cache_len must be a positive integer, got '8'"):
        StaticCache(ours.config, max_cache_len="8")


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_a_4d_float_mask_is_additive_as_in_transformers(pair, impl):
    """A 4D float attention mask is added to the scores, as Transformers adds it: 0 attends, a large
    negative value (-1e4, -1e9, the dtype's minimum) masks, other values bias, with the same logits
    as Transformers' for each (it was read as 'attend' wherever above the dtype's minimum / 2)."""
    hf, ours = pair
    hf.set_attn_implementation(impl)
    ours.set_attn_implementation(impl)
    try:
        ids = ids_()
        causal = torch.ones(5, 5).tril()
        masks = [((1 - causal) * fill)[None, None].expand(2, 1, 5, 5)
                 for fill in (-1e4, -1e9, torch.finfo(torch.float32).min)]
        masks.append(torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(1)) - 10 * (1 - causal))
        for i, mask in enumerate(masks):
            close(hf(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits, f"mask {i}")
        close(ours(ids).logits, ours(ids, attention_mask=masks[1]).logits, "an additive causal mask is the causal mask")
    finally:
        hf.set_attn_implementation("eager")
        ours.set_attn_implementation("eager")


def test_generate_hooks_that_misbehave(pair):
    """A logits processor that returns no scores, or scores over fewer tokens, and a streamer without
    put/end: errors naming the processor's class or the streamer's missing method."""
    _, ours = pair

    class ReturnsNothing(moetorch.LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, 0] = 0.0

    class Cuts(moetorch.LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores[:, :10]

    for processor, got in ((ReturnsNothing(), "NoneType"), (Cuts(), r"\(2, 10\)")):
        name = type(processor).__name__
        with pytest.raises(ValueError, match=rf"logits processor {name} must return scores .* 97 tokens .*got {got}"):
            ours.generate(ids_(), max_new_tokens=2, logits_processor=[processor])

    class NoEnd:
        def put(self, value):
            pass

    with pytest.raises(TypeError, match="streamer: a NoEnd has no end method"):
        ours.generate(ids_(1), max_new_tokens=2, streamer=NoEnd())


def test_config_token_ids_and_files(tmp_path):
    """Special token ids that are no integers (a string in config.json), a pad id outside the
    vocabulary (the embedding's padding row), and from_json_file of a path that is no file."""
    for field, value, match in (("pad_token_id", 200, "200 is outside the vocabulary of 97 tokens"),
                                ("eos_token_id", "2", "must be a token id .* got '2'"),
                                ("bos_token_id", 1.5, "must be a token id .* got 1.5")):
        with pytest.raises(ConfigError, match=f"`{field}`: {match}"):
            PHIMOE.our_config(**{field: value})
    assert PHIMOE.our_config(eos_token_id=[2, 3], pad_token_id=-1).eos_token_id == [2, 3]
    with pytest.raises(FileNotFoundError, match="from_json_file: no file at"):
        moetorch.PhimoeConfig.from_json_file(tmp_path / "missing.json")
    (tmp_path / "config.json").write_text(json.dumps({**PHIMOE.base, "model_type": "phimoe"}))
    assert moetorch.PhimoeConfig.from_json_file(tmp_path / "config.json").vocab_size == VOCAB
    with pytest.raises(ValueError, match="dtype must be a floating-point dtype"):
        moetorch.PhimoeForCausalLM.from_pretrained(tmp_path, dtype=torch.int8)


def test_tokenizer_pipeline_and_batch_inputs(pair, tmp_path):
    """decode of training labels (-100), a chat template given a string, a pipeline of a model built
    from a config without tokenizer=, and generate_batch given a 2-D tensor (taken, a prompt a row)."""
    _, ours = pair
    tok = moetorch.AutoTokenizer.from_pretrained(build_tokenizer(tmp_path / "tok"))
    with pytest.raises(ValueError, match=r"token ids must be non-negative, got \[-100\].*-100"):
        tok.decode([5, 6, -100])
    assert tok.batch_decode([[5, 6]]) == [tok.decode([5, 6])]
    with pytest.raises(TypeError, match="the conversation must be a list of messages .* got a str"):
        tok.apply_chat_template("hi")
    arch = next(a for a in ARCHS if isinstance(ours, a.ours["causal_lm"]))
    built = type(ours)(arch.our_config())  # (a loaded config would carry its directory's name)
    with pytest.raises(ValueError, match="pipeline needs tokenizer= when the model was not loaded from a directory"):
        moetorch.pipeline("text-generation", model=built)
    prompts = ids_(2, 4)
    out = ours.generate_batch(prompts, max_new_tokens=3, warmup=False)
    want = ours.generate_batch(prompts.tolist(), max_new_tokens=3, warmup=False)
    assert [r.generated_tokens for r in out.values()] == [r.generated_tokens for r in want.values()]
    with pytest.raises(TypeError, match="inputs must be a list of prompts"):
        ours.generate_batch("hello", max_new_tokens=2)
    for bad in (4.0, 0, True, "4"):  # named before it sizes the cache (a float failed there, naming max_cache_len)
        with pytest.raises(ValueError, match=rf"generate_batch\(\): max_new_tokens must be a positive int, got {bad!r}"):
            ours.generate_batch(prompts.tolist(), max_new_tokens=bad)
    manager = ours.init_continuous_batching(continuous_batching_config={"max_cache_len": 16})
    for bad in (4.0, 0, True, "4"):  # (True was taken as 1)
        with pytest.raises(ValueError, match=rf"add_request\('r'\): max_new_tokens must be a positive int, got {bad!r}"):
            manager.add_request([5, 6], request_id="r", max_new_tokens=bad)
    for bad in (0, -3, True, 2.5):  # (0 became the default)
        with pytest.raises(ValueError, match=rf"max_batch_tokens must be a positive int \(None: \d+\), got {bad!r}"):
            ours.init_continuous_batching(continuous_batching_config={"max_batch_tokens": bad})
    # config values of the wrong type or range: a str was compared deep in the manager, a float
    # truncated, "no" taken as true, 5 (500%) or a negative queue size taken
    for name, bad in (("max_requests_per_batch", "2"), ("max_requests_per_batch", 2.5), ("max_cache_len", "30"),
                      ("max_cache_len", 30.5), ("seed", "x"), ("seed", 2**64), ("return_logprobs", "no"),
                      ("max_memory_percent", 5), ("max_memory_percent", 0), ("max_queue_size", -1),
                      ("drop_unsupported_processors", 2), ("paged", "yes"), ("use_cuda_graph", (True,))):
        with pytest.raises(ValueError, match=rf"^continuous_batching_config\.{name} must be .*, got {re.escape(repr(bad))}$"):
            ours.init_continuous_batching(continuous_batching_config={name: bad})
        with pytest.raises(ValueError, match=rf"continuous_batching_config\.{name} must be"):
            moetorch.ContinuousBatchingConfig(**{name: bad})
    # add_request's eos_token_id and streaming: named before the request is queued
    for bad, error, message in (("2", TypeError, "eos_token_id must be a token id or a list of them, got '2'"),
                                (2.7, TypeError, "eos_token_id must be a token id"),
                                ([1, None], TypeError, "eos_token_id must be a token id"),
                                (torch.tensor([1.0]), TypeError, "eos_token_id must hold token ids .ints., got a torch.float32")):
        with pytest.raises(error, match=rf"add_request\('r'\): {message}"):
            manager.add_request([5, 6], request_id="r", max_new_tokens=2, eos_token_id=bad)
    for name in ("streaming", "record_timestamps"):
        with pytest.raises(TypeError, match=f"add_request\\('r'\\): {name} must be True or False, got 'no'"):
            manager.add_request([5, 6], request_id="r", max_new_tokens=2, **{name: "no"})
    # numpy's numbers and flags, 0 / 1 for a flag, None for no queue limit: taken, as before the checks
    taken = moetorch.ContinuousBatchingConfig(max_cache_len=np.int64(16), max_requests_per_batch=np.int32(2), paged=0,
                                              return_logprobs=np.bool_(True), max_queue_size=None)
    assert (taken.max_cache_len, taken.max_requests_per_batch, taken.max_queue_size, taken.return_logprobs) == \
        (16, 2, 0, True) and type(taken.max_cache_len) is int
    # none of them queued anything: the same id is taken now, and ends at its own end token
    manager.start()
    try:
        for i, eos in enumerate((torch.tensor([3, 4]), np.array([3, 4]), np.int64(3), [np.int32(3), 4], -1)):
            manager.add_request([5, 6], request_id=f"r{i}", max_new_tokens=2, eos_token_id=eos)
            assert manager.get_result(f"r{i}", timeout=120).request_id == f"r{i}"
    finally:
        manager.stop(block=True)


def test_transformers_takes_the_same_inputs(pair):
    """The checks refuse nothing Transformers' model computes: negative pad ids in a config, labels
    of -100, a 2D mask, a boolean 4D mask with sdpa."""
    hf, ours = pair
    ids = ids_()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    close(hf(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits, "2D mask")
    labels = torch.where(mask.bool(), ids, -100)
    close(hf(ids, attention_mask=mask, labels=labels).loss, ours(ids, attention_mask=mask, labels=labels).loss, "loss")
    assert isinstance(transformers.PhimoeConfig(pad_token_id=-1), transformers.PhimoeConfig)
