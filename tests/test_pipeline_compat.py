"""moetorch's text-generation pipeline against Transformers' (the oracle) on the embedded tiny models:
call and constructor arguments, batching, generator inputs, and the global RNG use of list inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import test_generation
import torch
import transformers

import moetorch

ASSETS = Path(moetorch.__file__).parent / "assets"
CHAT = [{"role": "user", "content": "Solve 2x + 3 = 7"}]
CHATS = [[{"role": "user", "content": "hi"}], CHAT,
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit"}]]
PROMPTS = ["The experts", "Bananas and dragonfruits are", "A", "Routing tokens to experts is", "Hello"]
GREEDY = dict(max_new_tokens=4, do_sample=False)


_one_thread = test_generation._one_thread  # one intra-op thread for tiny models


def make_pipes(name, **kw):
    """(Transformers' pipeline, moetorch's) for the embedded model `name`."""
    return (transformers.pipeline("text-generation", model=str(ASSETS / name), **kw),
            moetorch.pipeline("text-generation", model=name, **kw))


@pytest.fixture(scope="module", params=["tiny-phimoe", "tiny-jetmoe"])
def pipes(request):
    return make_pipes(request.param)


@pytest.fixture(scope="module")
def phi():
    return make_pipes("tiny-phimoe")


def both(pipes, fn, seed=0):
    """fn(pipe) for each pipeline from the same seed; the results and the RNG state after them."""
    out = []
    for p in pipes:
        torch.manual_seed(seed)
        out.append((fn(p), torch.rand(3).tolist()))
    return out


def assert_same(pipes, fn, seed=0):
    theirs, ours = both(pipes, fn, seed)
    assert ours == theirs
    return ours[0]


def raises_like(pipes, fn):
    """Both pipelines raise the same exception type; returns moetorch's message."""
    errors = []
    for p in pipes:
        with pytest.raises(Exception) as info:
            fn(p)
        errors.append(info.value)
    assert type(errors[1]) is type(errors[0]), (errors[0], errors[1])
    return str(errors[1])


# 1. Seeded sampling over lists: the DataLoader's one draw per call, batched or not


@pytest.mark.parametrize("seed", [0, 7, 1234])
@pytest.mark.parametrize("n,batch_size", [(1, 1), (2, 1), (3, 1), (3, 2), (5, 2), (4, 4), (2, 3)])
def test_seeded_sampling_over_a_list_matches(pipes, seed, n, batch_size):
    def run(p):  # the pipeline's default: sampling at temperature 0.7
        return [r[0]["generated_token_ids"] for r in p(PROMPTS[:n], max_new_tokens=4, return_tensors=True,
                                                        batch_size=batch_size)]
    assert_same(pipes, run, seed)


@pytest.mark.parametrize("seed,batch_size", [(3, 1), (11, 2), (5, 3)])
def test_seeded_sampling_over_chats_and_generators_matches(phi, seed, batch_size):
    assert_same(phi, lambda p: p(CHATS, max_new_tokens=4, batch_size=batch_size), seed)
    assert_same(phi, lambda p: list(p((x for x in PROMPTS[:3]), max_new_tokens=4, batch_size=batch_size)), seed)
    assert_same(phi, lambda p: list(p((c for c in CHATS), max_new_tokens=4, batch_size=batch_size)), seed)
    # a single prompt draws nothing extra; two calls in a row keep matching
    assert_same(phi, lambda p: [p(PROMPTS[0], max_new_tokens=4), p(PROMPTS[:2], max_new_tokens=4),
                                p(CHAT, max_new_tokens=3, num_return_sequences=2)], seed)


def test_pipeline_batch_size_default_is_used_by_calls(phi):
    pipes = make_pipes("tiny-phimoe", batch_size=3)
    assert_same(pipes, lambda p: p(PROMPTS, max_new_tokens=4), seed=2)


# 2. Call arguments


@pytest.mark.parametrize("batch_size", [2, 3, 5])
def test_batched_greedy_generation_matches(pipes, batch_size):
    assert_same(pipes, lambda p: p(PROMPTS, batch_size=batch_size, **GREEDY))
    assert_same(pipes, lambda p: p(CHATS, batch_size=batch_size, return_full_text=False, **GREEDY))
    assert_same(pipes, lambda p: p(PROMPTS[:3], batch_size=batch_size, num_return_sequences=2, num_beams=2,
                                   max_new_tokens=3))


CALL_CASES = {
    "prefix": ("The experts", dict(prefix="Hello there. ")),
    "prefix+max_length": ("The experts", dict(prefix="Hello there. ", max_length=12, max_new_tokens=None)),
    "prefix+batch": (PROMPTS[:3], dict(prefix="Once: ", batch_size=2)),
    "stop_sequence": ("The experts", dict(stop_sequence=".", max_new_tokens=8)),
    "stop_sequence list": (PROMPTS[:2], dict(stop_sequence=[".", "\n"], max_new_tokens=8)),
    "hole": ("The experts", dict(handle_long_generation="hole")),
    "return_text": ("The experts", dict(return_text=True)),
    "return_full_text=False": (PROMPTS[:2], dict(return_full_text=False)),
    "return_tensors": ("The experts", dict(return_tensors=True)),
    "add_special_tokens=False": ("The experts", dict(add_special_tokens=False)),
    "tokenizer_encode_kwargs": ("The experts", dict(tokenizer_encode_kwargs={"add_special_tokens": False})),
    "truncation+max_length": (" ".join(PROMPTS), dict(truncation=True, max_length=6)),
    "padding": ("The experts", dict(padding=True)),
    "skip_special_tokens=False": ("The experts", dict(skip_special_tokens=False, return_full_text=False)),
    "clean_up_tokenization_spaces": ("The experts", dict(clean_up_tokenization_spaces=True)),
    "tools": (CHAT, dict(tools=[{"type": "function", "function": {"name": "f", "description": "d"}}])),
    "documents": (CHAT, dict(documents=[{"title": "a", "text": "b"}])),
    "continue_final_message=False": (CHAT, dict(continue_final_message=False)),
}


@pytest.mark.parametrize("case", list(CALL_CASES))
def test_call_arguments_match(phi, case):
    inputs, kw = CALL_CASES[case]
    kw = {k: v for k, v in {**GREEDY, **kw}.items() if v is not None}
    assert_same(phi, lambda p: p(inputs, **kw))


def test_hole_truncates_the_prompt_from_the_left_as_transformers(phi):
    long = " ".join(PROMPTS * 3)
    for p in phi:
        p.tokenizer.model_max_length = 12
    try:
        for n in (5, 11):
            assert_same(phi, lambda p, n=n: p(long, handle_long_generation="hole", max_new_tokens=n,
                                                 do_sample=False))
        phi[0].model.generation_config.max_length = phi[1].model.generation_config.max_length = 16
        try:  # 'hole' counts the new tokens from the model's max_length when nothing else sets them
            assert "infer" in raises_like(phi, lambda p: p(long, handle_long_generation="hole", do_sample=False))
            assert_same(phi, lambda p: p("The experts", handle_long_generation="hole", do_sample=False))
        finally:
            phi[0].model.generation_config.max_length = phi[1].model.generation_config.max_length = 20
        # more new tokens than the model's length; a call's max_length is the tokenizer's, and 'hole'
        # then counts the pipeline's default 256 new tokens, as in Transformers
        for kw in (dict(max_new_tokens=12), dict(max_length=40)):
            msg = raises_like(phi, lambda p, kw=kw: p(long, handle_long_generation="hole", do_sample=False, **kw))
            assert "hole" in msg
    finally:
        for p in phi:
            p.tokenizer.model_max_length = int(1e30)


def test_generator_inputs_yield_results_lazily(phi):
    for p in phi:
        seen = []

        def prompts(seen=seen):
            for x in PROMPTS[:3]:
                seen.append(x)
                yield x
        out = p(prompts(), **GREEDY)
        assert not isinstance(out, list)
        first = next(iter(out))
        assert len(seen) < 3 and first[0]["generated_text"].startswith(PROMPTS[0])
    assert_same(phi, lambda p: list(p(iter_prompts(), **GREEDY)))
    assert_same(phi, lambda p: p((m for m in CHAT), **GREEDY))  # a generator of messages is one chat
    assert_same(phi, lambda p: list(p((x for x in []), **GREEDY)))


def iter_prompts():
    yield from PROMPTS[:3]


def test_argument_clashes_raise_as_transformers(phi):
    for kw, words in ((dict(return_full_text=False, return_tensors=True), "mutually exclusive"),
                      (dict(return_text=True, return_full_text=True), "return_text"),
                      (dict(return_text=True, return_tensors=True), "return_text"),
                      (dict(handle_long_generation="middle"), "handle_long_generation")):
        assert words in raises_like(phi, lambda p, kw=kw: p("The experts", **GREEDY, **kw))
    assert "batch_size" in raises_like(phi, lambda p: p(PROMPTS[:2], batch_size=0, **GREEDY))


def test_scores_and_logits_are_added_to_each_result(phi):
    kw = dict(return_dict_in_generate=True, output_scores=True, output_logits=True, max_new_tokens=3)
    for inputs, extra in (("The experts", dict(do_sample=False)), (PROMPTS[:3], dict(batch_size=2)),
                          ("The experts", dict(num_return_sequences=2))):
        theirs, ours = both(phi, lambda p, i=inputs, e=extra: p(i, **kw, **e), seed=4)
        assert ours[1] == theirs[1]
        theirs, ours = theirs[0], ours[0]
        flat_t = theirs if isinstance(theirs[0], list) else [theirs]
        flat_o = ours if isinstance(ours[0], list) else [ours]
        for rt, ro in zip(flat_t, flat_o, strict=True):
            for a, b in zip(rt, ro, strict=True):
                assert a.keys() == b.keys() == {"generated_text", "scores", "logits"}
                assert a["generated_text"] == b["generated_text"]
                for key in ("scores", "logits"):
                    ta, tb = torch.tensor(a[key]), torch.tensor(b[key])
                    assert ta.shape == tb.shape
                    finite = torch.isfinite(ta)
                    assert torch.equal(finite, torch.isfinite(tb))
                    torch.testing.assert_close(ta[finite], tb[finite], rtol=1e-4, atol=1e-4)


def test_batching_without_a_pad_token_raises_as_transformers(tmp_path):
    d = tmp_path / "nopad"
    shutil.copytree(ASSETS / "tiny-phimoe", d)
    pipes = make_pipes("tiny-phimoe")
    for p in pipes:
        p.tokenizer.pad_token = None
    try:
        assert "pad" in raises_like(pipes, lambda p: p(PROMPTS[:2], batch_size=2, **GREEDY))
    finally:
        for p in pipes:
            p.tokenizer.pad_token = "<pad>"


# 2b. Constructor arguments


@pytest.mark.parametrize("kw", [dict(return_full_text=False), dict(batch_size=2), dict(prefix="Hi "),
                                dict(clean_up_tokenization_spaces=True), dict(use_fast=True), dict(device=-1),
                                dict(max_new_tokens=3, do_sample=False), dict(return_tensors=True),
                                dict(stop_sequence=".", max_new_tokens=9), dict(add_special_tokens=False),
                                dict(device=0),  # (no CUDA: the CPU, as Transformers falls back)
                                dict(config=str(ASSETS / "tiny-phimoe")),
                                dict(feature_extractor=None, image_processor=None, processor=None,
                                     video_processor=None, pipeline_class=None, assistant_tokenizer=None)])
def test_constructor_arguments_are_the_calls_defaults(kw):
    pipes = make_pipes("tiny-phimoe", **kw)
    assert_same(pipes, lambda p: p(PROMPTS[:2], max_new_tokens=4), seed=1)
    assert_same(pipes, lambda p: p("The experts", do_sample=False), seed=1)
    if "return_full_text" in kw:  # a call's own return_tensors still wins over the pipeline's
        assert_same(pipes, lambda p: p("The experts", return_tensors=True, **GREEDY))


def test_task_device_dtype(phi):
    theirs, ours = ((p.task, p.device, p.dtype) for p in phi)
    assert ours == theirs


@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu", 0), -1])
def test_the_device_is_the_one_given(device):
    theirs, ours = make_pipes("tiny-phimoe", device=device)
    assert ours.device == theirs.device and str(ours.device) == str(theirs.device)
    assert ours.model.device.type == "cpu"


def test_a_device_of_another_type_is_refused_by_name(phi):
    for bad in (1.5, [0], object()):
        with pytest.raises(TypeError, match="device must be a torch.device, a string such as 'cuda:0' or an index"):
            moetorch.TextGenerationPipeline(phi[1].model, phi[1].tokenizer, device=bad)


def test_key_datasets_positional_arguments_and_batch_sizes_as_transformers(phi):
    """A KeyDataset of chats gives a list of results (one of texts, an iterator), a second
    positional argument is a TypeError, and a batch size that is no positive integer a ValueError
    that names it, as in Transformers."""
    from transformers.pipelines.pt_utils import KeyDataset

    chats = KeyDataset([{"c": c} for c in CHATS], "c")
    assert isinstance(assert_same(phi, lambda p: p(chats, **GREEDY)), list)
    texts = KeyDataset([{"t": t} for t in PROMPTS[:2]], "t")
    for p in phi:
        assert not isinstance(p(texts, **GREEDY), list)
    assert_same(phi, lambda p: list(p(texts, **GREEDY)))
    assert "positional" in raises_like(phi, lambda p: p("The experts", 4, **GREEDY))
    for bad in (True, 0, -2, 1.5):
        msg = raises_like(phi, lambda p, b=bad: p(PROMPTS[:2], batch_size=b, **GREEDY))
        assert f"batch_size={bad}" in msg
        assert_same(phi, lambda p, b=bad: p(PROMPTS[0], batch_size=b, **GREEDY))  # one input: no batches


# 3. An empty prompt, with and without a BOS token added


def test_empty_prompt_generates_from_nothing(tmp_path):
    d = tmp_path / "nobos"
    shutil.copytree(ASSETS / "tiny-phimoe", d)
    j = json.loads((d / "tokenizer.json").read_text())
    j["post_processor"] = None
    (d / "tokenizer.json").write_text(json.dumps(j))
    pipes = (transformers.pipeline("text-generation", model=str(d)), moetorch.pipeline("text-generation", model=d))
    assert_same(pipes, lambda p: p("", **GREEDY))
    assert_same(pipes, lambda p: p("", max_new_tokens=4), seed=9)
    assert_same(pipes, lambda p: p(["", "The experts"], **GREEDY))


def test_processors_of_other_modalities_are_refused():
    """A pipeline of these text models takes no processor of another modality, pipeline class or
    assistant tokenizer: given (not None), each is named."""
    for name in ("feature_extractor", "image_processor", "processor", "video_processor", "pipeline_class",
                 "assistant_tokenizer"):
        with pytest.raises(ValueError, match=f"'{name}'.*not supported"):
            moetorch.pipeline("text-generation", model="tiny-phimoe", **{name: object()})
    config = moetorch.AutoConfig.from_pretrained("tiny-phimoe")
    pipe = moetorch.pipeline("text-generation", model="tiny-phimoe", config=config)
    assert pipe.model.config == config


def test_the_pipeline_base_api_as_transformers(tmp_path):
    """What Transformers' `Pipeline` base gives every pipeline: save_pretrained (model and
    tokenizer, which both libraries load back), dtype / torch_dtype, device_placement, predict /
    transform, call_count, binary_output taken, its repr; the dtype given twice is an error."""
    theirs, ours = make_pipes("tiny-phimoe")
    ours.save_pretrained(tmp_path / "saved")
    for lib in (transformers, moetorch):
        again = lib.pipeline("text-generation", model=str(tmp_path / "saved"))
        assert again("The experts", **GREEDY) == theirs("The experts", **GREEDY)
    assert ours.torch_dtype == ours.dtype == theirs.dtype == torch.float32
    with ours.device_placement():  # (predict and transform are calls, sampling as the call samples)
        torch.manual_seed(0)
        predicted = ours.predict("A")
        torch.manual_seed(0)
        assert predicted == ours("A")
    before = ours.call_count
    torch.manual_seed(1)
    transformed = ours.transform(["A"])
    torch.manual_seed(1)
    assert transformed == ours(["A"]) and ours.call_count == before + 2
    assert repr(ours) == "TextGenerationPipeline: {'model': 'PhimoeForCausalLM', 'dtype': 'float32', 'device': 'cpu'}"
    assert repr(theirs).startswith(repr(ours)[:-1])
    binary = moetorch.pipeline("text-generation", model="tiny-phimoe", binary_output=True)
    assert binary("The experts", **GREEDY) == theirs("The experts", **GREEDY)
    for lib, path in ((transformers, str(ASSETS / "tiny-phimoe")), (moetorch, "tiny-phimoe")):
        with pytest.raises(ValueError, match="dtype"):
            lib.pipeline("text-generation", model=path, dtype=torch.float32, model_kwargs={"dtype": torch.bfloat16})
