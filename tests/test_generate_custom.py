"""generate()'s hand-offs against Transformers: `custom_generate` (a callable that replaces the
decoding loop, or a local directory's `custom_generate/generate.py`, also installed by
`from_pretrained(..., trust_remote_code=True)`), `use_model_defaults`, `synced_gpus` across two
processes of a gloo group, and assisted decoding with sampling (speculative sampling, checked
against the model's distribution)."""

from __future__ import annotations

import datetime
import os
import textwrap

import pytest
import test_generation
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from archs import ARCH_IDS, ARCHS, randomize_
from parity import make_inputs, make_pair
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import moetorch
from moetorch import GenerationConfig
from moetorch.generation import MaxLengthCriteria, TopKLogitsWarper

VOCAB = 97
# test_generation's fixtures: one intra-op thread, and (Transformers, moetorch) models per architecture
_one_thread, pair = test_generation._one_thread, test_generation.pair


def greedy_loop(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
    """A decoding loop as a user writes one: the model's own forward with the cache it was handed
    (positions counted from the mask, so left padding is skipped), the processors, and the stopping
    criteria (each row's flag), EOS rows padded."""
    return loop_with_the_cache_as("past_key_values", model, input_ids, logits_processor, stopping_criteria,
                                  generation_config, **model_kwargs)


def greedy_loop_own_cache(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
    """`greedy_loop` on a cache of its own, the one it was handed set aside."""
    model_kwargs.pop("past_key_values")
    return loop_with_the_cache_as("cache", model, input_ids, logits_processor, stopping_criteria, generation_config,
                                  cache=moetorch.DynamicCache(), **model_kwargs)


def greedy_loop_no_cache(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
    """Greedy search that computes the whole sequence each step, the cache it was handed set aside."""
    model_kwargs.pop("past_key_values")
    model_kwargs["use_cache"] = False
    return loop_with_the_cache_as("past_key_values", model, input_ids, logits_processor, stopping_criteria,
                                  generation_config, past_key_values=None, **model_kwargs)


def loop_with_the_cache_as(name, model, input_ids, logits_processor, stopping_criteria, generation_config,
                           **model_kwargs):
    """Greedy decoding that passes the cache to the model by `name` (its 5.24 name: `cache`);
    without one (None), each step computes the whole sequence."""
    mask = model_kwargs.pop("attention_mask")
    cache = model_kwargs.pop(name)
    model_kwargs.pop("position_ids", None)  # Transformers 5.23 also hands over the prompt's
    running = torch.ones(input_ids.shape[0], dtype=torch.bool)
    pad = generation_config.pad_token_id or 0
    step_ids = input_ids
    while True:
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, **{name: cache},
                       **model_kwargs).logits
        scores = logits_processor(input_ids, logits[:, -1].float())
        nxt = torch.where(running, scores.argmax(dim=-1), pad)
        input_ids = torch.cat([input_ids, nxt[:, None]], dim=-1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        running &= ~stopping_criteria(input_ids, scores)
        if not running.any():
            return input_ids
        step_ids = nxt[:, None] if cache is not None else input_ids


def test_custom_callable_matches_transformers(pair):
    hf, ours = pair
    ids, mask = make_inputs(VOCAB, 3, 6, "left", seed=4)
    settings = dict(attention_mask=mask, max_new_tokens=9, repetition_penalty=1.3, pad_token_id=0)
    ref = hf.generate(ids, **settings)
    eos = int(ref[1, 6 + 3])  # row 1 stops early, the others run to max_new_tokens
    outs = [m.generate(ids, custom_generate=greedy_loop, eos_token_id=eos, **settings) for m in (hf, ours)]
    assert torch.equal(outs[0], outs[1]), f"\nTransformers:\n{outs[0]}\nmoetorch:\n{outs[1]}"
    assert int(outs[1][1, 6 + 3]) == eos and (outs[1][1, 6 + 4 :] == 0).all()
    # the callable's loop gives what the built-in greedy search gives
    assert torch.equal(outs[1], ours.generate(ids, eos_token_id=eos, **settings))
    # so do loops that set the cache they were handed aside (and pass the other keywords on): one
    # on a cache of its own, passed as `cache`, and one that computes every step without a cache
    for loop in (greedy_loop_own_cache, greedy_loop_no_cache):
        assert torch.equal(outs[1], ours.generate(ids, custom_generate=loop, eos_token_id=eos, **settings)), loop


def test_custom_callable_receives_the_prepared_loop_inputs(pair):
    _, ours = pair
    ids, mask = make_inputs(VOCAB, 2, 5, "left", seed=5)
    seen = {}

    def probe(model, input_ids, logits_processor, stopping_criteria, generation_config, my_option=None,
              **model_kwargs):
        seen.update(model=model, ids=input_ids, procs=logits_processor, crit=stopping_criteria,
                    gen=generation_config, my_option=my_option, kwargs=model_kwargs)
        return "result"

    out = ours.generate(ids, attention_mask=mask, custom_generate=probe, my_option=7, do_sample=True, top_k=4,
                        max_new_tokens=3, num_return_sequences=2)
    assert out == "result" and seen["model"] is ours and seen["my_option"] == 7
    assert torch.equal(seen["ids"], ids.repeat_interleave(2, dim=0))  # expanded for the returned sequences
    assert torch.equal(seen["kwargs"]["attention_mask"], mask.repeat_interleave(2, dim=0))
    assert isinstance(seen["kwargs"]["past_key_values"], moetorch.DynamicCache)
    assert "cache" not in seen["kwargs"]  # under one name: a loop passing the rest on passes it no more
    assert seen["kwargs"]["use_cache"] is True and seen["kwargs"]["logits_to_keep"] == 1
    assert any(isinstance(p, TopKLogitsWarper) and p.top_k == 4 for p in seen["procs"])
    assert any(isinstance(c, MaxLengthCriteria) and c.max_length == 5 + 3 for c in seen["crit"])
    assert seen["gen"].do_sample and seen["gen"].max_new_tokens == 3
    # pad ids in a prompt without a mask are masked, as in Transformers
    ours.generate(ids, custom_generate=probe, max_new_tokens=2)
    assert torch.equal(seen["kwargs"]["attention_mask"], mask)
    # without padding the mask is all ones; without a cache there is none to hand over
    plain, _ = make_inputs(VOCAB, 2, 5, None, seed=5)
    ours.generate(plain, custom_generate=probe, use_cache=False, max_new_tokens=2)
    assert torch.equal(seen["kwargs"]["attention_mask"], torch.ones_like(plain))
    assert "past_key_values" not in seen["kwargs"] and "cache" not in seen["kwargs"]
    assert seen["kwargs"]["use_cache"] is False
    ours.generate(ids, custom_generate=probe, cache_implementation="static", max_new_tokens=2)
    assert isinstance(seen["kwargs"]["past_key_values"], moetorch.StaticCache)
    # a keyword the callable does not name is still an error
    with pytest.raises(TypeError, match="not_an_option"):
        ours.generate(ids, custom_generate=probe, not_an_option=1)
    with pytest.raises(TypeError, match="custom_generate"):
        ours.generate(ids, custom_generate=3)


GENERATE_PY = '''
import torch


def generate(model, input_ids=None, generation_config=None, max_new_tokens=None, extra_tokens=0, **kwargs):
    """Greedy decoding without a cache, `extra_tokens` more than asked for, and the arguments it got."""
    ids = input_ids
    for _ in range(max_new_tokens + extra_tokens):
        logits = model(input_ids=ids).logits
        ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=-1)
    return ids, sorted(kwargs)
'''


def write_custom_generate(path, body=GENERATE_PY, requirements=None):
    (path / "custom_generate").mkdir(parents=True, exist_ok=True)
    (path / "custom_generate" / "generate.py").write_text(textwrap.dedent(body))
    if requirements is not None:
        (path / "custom_generate" / "requirements.txt").write_text(requirements)
    return path


def test_custom_generate_from_a_local_directory(pair, tmp_path):
    hf, ours = pair
    repo = write_custom_generate(tmp_path / "repo")
    ids, _ = make_inputs(VOCAB, 2, 5, None, seed=6)
    # Transformers 5.23 asks for trust_remote_code for local code too; both take it
    got = [m.generate(input_ids=ids, max_new_tokens=3, extra_tokens=2, custom_generate=str(repo),
                      trust_remote_code=True) for m in (hf, ours)]
    assert torch.equal(got[0][0], got[1][0]) and got[1][0].shape == (2, 5 + 5)
    # it receives every argument of generate() (those not in its signature in **kwargs)
    assert got[1][1] == sorted([
        "inputs", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
        "assistant_model", "streamer", "negative_prompt_ids", "negative_prompt_attention_mask", "use_model_defaults",
    ])
    assert torch.equal(ours.generate(input_ids=ids, max_new_tokens=3, custom_generate=repo)[0],
                       ours.generate(ids, max_new_tokens=3))  # a Path, and plain greedy search's tokens


def test_custom_generate_directory_errors(pair, tmp_path):
    _, ours = pair
    ids, _ = make_inputs(VOCAB, 1, 4, None)
    with pytest.raises(OSError, match="not a local directory"):
        ours.generate(ids, custom_generate="some-org/some-repo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="custom_generate/generate.py"):
        ours.generate(ids, custom_generate=str(tmp_path / "empty"))
    write_custom_generate(tmp_path / "nofn", body="x = 1\n")
    with pytest.raises(AttributeError, match="no `generate` function"):
        ours.generate(ids, custom_generate=str(tmp_path / "nofn"))
    write_custom_generate(tmp_path / "needs", requirements="torch>=1.0\nno-such-package-xyz>=1.0\nnumpy<0.1\n")
    with pytest.raises(ImportError) as e:
        ours.generate(ids, custom_generate=str(tmp_path / "needs"))
    assert "no-such-package-xyz" in str(e.value) and "numpy<0.1" in str(e.value) and "torch" not in str(e.value)
    write_custom_generate(tmp_path / "bad", requirements="torch\nnot a requirement!\n")
    with pytest.raises(ValueError, match="line 2: not a requirement"):
        ours.generate(ids, custom_generate=str(tmp_path / "bad"))
    write_custom_generate(tmp_path / "ok", requirements=f"# pinned\ntorch>={torch.__version__.split('+')[0]}\n")
    assert ours.generate(input_ids=ids, max_new_tokens=1, custom_generate=str(tmp_path / "ok"))[0].shape == (1, 5)


def test_from_pretrained_installs_a_checkpoint_generate_with_trust_remote_code(pair, tmp_path):
    hf, ours = pair
    ours.save_pretrained(tmp_path / "ckpt")
    write_custom_generate(tmp_path / "ckpt")
    ids, _ = make_inputs(VOCAB, 1, 4, None, seed=7)
    cls = type(ours)
    plain = cls.from_pretrained(tmp_path / "ckpt")
    assert torch.is_tensor(plain.generate(ids, max_new_tokens=2))  # without trust: the built-in generate
    trusted = cls.from_pretrained(tmp_path / "ckpt", trust_remote_code=True)
    theirs = type(hf).from_pretrained(tmp_path / "ckpt", trust_remote_code=True)
    a, b = (m.generate(input_ids=ids, max_new_tokens=2, extra_tokens=1) for m in (theirs, trusted))
    assert torch.equal(a[0], b[0]) and b[0].shape == (1, 4 + 3) and a[1] == b[1] == []


def test_use_model_defaults(pair, tmp_path):
    _, ours = pair
    ids, _ = make_inputs(VOCAB, 1, 4, None, seed=8)
    saved = ours.generation_config
    try:
        ours.generation_config = GenerationConfig(max_new_tokens=3, eos_token_id=5, pad_token_id=0, bos_token_id=1)
        passed = GenerationConfig(do_sample=False)
        n_new = lambda **kw: ours.generate(ids, generation_config=passed, **kw).shape[1] - 4  # noqa: E731
        # with them, the model's max_new_tokens (3); without, the global default (20 new tokens)
        assert n_new() == n_new(use_model_defaults=True) == 3
        assert n_new(use_model_defaults=False, eos_token_id=None) == 20
        # without them the model's special tokens still apply where the passed config sets none
        gen, _ = ours._generation_settings(passed, {}, use_model_defaults=False)
        assert (gen.eos_token_id, gen.pad_token_id, gen.max_new_tokens) == (5, 0, None)
        gen, _ = ours._generation_settings(GenerationConfig(eos_token_id=9), {}, use_model_defaults=False)
        assert gen.eos_token_id == 9
        # without a passed config the model's config is the base either way
        assert ours.generate(ids, use_model_defaults=False).shape[1] - 4 <= 3
        # unset: a generation config saved by Transformers before 4.50 is not completed from
        ours.generation_config.transformers_version = "4.43.3"
        assert n_new(eos_token_id=None) == 20
        ours.generation_config.transformers_version = "4.50.0"
        assert n_new(eos_token_id=None) == 3
        ours.generation_config.transformers_version = "not a version"  # unreadable: as a recent one
        assert n_new(eos_token_id=None) == 3
        with pytest.raises(TypeError, match="use_model_defaults"):
            n_new(use_model_defaults="yes")
    finally:
        ours.generation_config = saved


# ---- synced_gpus: two processes of a gloo group --------------------------------------------------
def _synced_worker(rank: int, world: int, port: int, ckpt: str, results: dict, synced) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        model = moetorch.AutoModelForCausalLM.from_pretrained(ckpt)
        forwards = [0]

        def collective(module, args):
            # A collective in every forward, as FSDP's all-gathers are: processes that stopped calling
            # forward at different steps would pair it with another collective and fail or hang.
            dist.all_reduce(torch.ones(3))
            forwards[0] += 1

        model.register_forward_pre_hook(collective)
        ids, mask = make_inputs(VOCAB, 2, 5 + rank, "left", seed=10 + rank)
        # each process stops at a different step: different prompt lengths, budgets and EOS ids
        kw = dict(attention_mask=mask, max_new_tokens=4 + 5 * rank, synced_gpus=synced, pad_token_id=0)
        out = {"greedy": model.generate(ids, **kw).tolist(),
               "beams": model.generate(ids, num_beams=2, **kw).tolist()}
        out["forwards"] = forwards[0]
        try:
            model.generate(ids, assistant_model=model, **kw)
        except ValueError as e:
            out["assisted"] = str(e)
        # Sharded by FSDP2 (each decoder layer, then the whole model), synced_gpus defaults to on.
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        kw.pop("synced_gpus")
        forwards[0] = 0
        out["fsdp_greedy"] = model.generate(ids, **kw).tolist()
        out["fsdp_beams"] = model.generate(ids, num_beams=2, **kw).tolist()
        out["fsdp_forwards"] = forwards[0]
        results[rank] = out
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # torch 2.13's FSDP2 on gloo can crash in interpreter teardown, after the work is done


def test_synced_gpus_keeps_processes_stepping_together(pair, tmp_path):
    _, ours = pair
    ours.save_pretrained(tmp_path / "ckpt")
    expected = {}
    for rank in range(2):
        ids, mask = make_inputs(VOCAB, 2, 5 + rank, "left", seed=10 + rank)
        kw = dict(attention_mask=mask, max_new_tokens=4 + 5 * rank, pad_token_id=0)
        expected[rank] = {"greedy": ours.generate(ids, **kw).tolist(),
                          "beams": ours.generate(ids, num_beams=2, **kw).tolist()}
    with mp.Manager() as manager:
        results = manager.dict()
        port = 29500 + os.getpid() % 1000
        mp.start_processes(_synced_worker, args=(2, port, str(tmp_path / "ckpt"), results, True), nprocs=2,
                           start_method="spawn")
        results = dict(results)
    for rank in range(2):  # each process's tokens are its own, as if alone
        for kind in ("greedy", "beams"):
            assert results[rank][kind] == expected[rank][kind], (rank, kind)
            assert results[rank]["fsdp_" + kind] == expected[rank][kind], (rank, "fsdp", kind)
        assert "assistant_model" in results[rank]["assisted"]
    assert results[0]["forwards"] == results[1]["forwards"]  # the shorter one idled through the rest
    assert results[0]["fsdp_forwards"] == results[1]["fsdp_forwards"]


def test_synced_gpus_argument_checks(pair):
    _, ours = pair
    ids, _ = make_inputs(VOCAB, 1, 4, None)
    # one process: nothing to wait for, so synced_gpus changes nothing
    assert torch.equal(ours.generate(ids, max_new_tokens=3, synced_gpus=True), ours.generate(ids, max_new_tokens=3))
    with pytest.raises(TypeError, match="synced_gpus"):
        ours.generate(ids, synced_gpus="yes")


# ---- assisted decoding with sampling (speculative sampling) -----------------------------------------
@pytest.mark.parametrize("drafter", ["assistant", "prompt_lookup"])
@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_assisted_sampling_follows_the_models_distribution(arch, drafter, tmp_path):
    """Speculative sampling keeps each token distributed as this model's processed distribution p,
    whatever is drafted. Over a 6-token vocabulary, the first two new tokens' empirical joint
    distribution is compared with p(x1) p(x2 | x1) from Transformers' logits, with the assistant
    (other random weights) far from it, so drafts are often rejected; or with drafts looked up in
    the prompt (`prompt_lookup_num_tokens`, drafts of probability 1: the prompt's last token
    occurred before, so the token after it is drafted every time)."""
    V, temperature, top_k = 6, 1.5, 4
    prompt = torch.tensor([[1, 3]]) if drafter == "assistant" else torch.tensor([[1, 3, 5, 1]])
    hf, ours = make_pair(arch, tmp_path, seed=0, vocab_size=V)
    assistant = arch.ours["causal_lm"](arch.our_config(vocab_size=V))
    randomize_(assistant, seed=5, std=0.5)
    assistant.eval()

    def processed(model, ids):  # the warpers generate applies: temperature, then top-k
        logits = model(ids).logits[0, -1].float() / temperature
        cut = logits.topk(top_k).values[-1]
        return logits.masked_fill(logits < cut, float("-inf")).softmax(dim=-1)

    def joint(model):
        p1 = processed(model, prompt)
        return torch.stack([p1[a] * processed(model, torch.cat([prompt, torch.tensor([[a]])], 1)) for a in range(V)])

    with torch.no_grad():
        want, drafts = joint(hf), joint(assistant)
    tv = lambda a, b: 0.5 * (a - b).abs().sum().item()  # noqa: E731
    assert tv(want, drafts) > 0.3, "the assistant must draft from a different distribution"

    # 1500 draws: about 0.03 from the exact joint (0.03 for both models when written); keeping every
    # draft, or drawing from p instead of max(p - q, 0) at a rejection, misses by far more
    torch.manual_seed(0)
    n, counts = 1500, torch.zeros(V, V)
    drafting = (dict(assistant_model=assistant, num_assistant_tokens=2) if drafter == "assistant"
                else dict(prompt_lookup_num_tokens=2))
    L = prompt.shape[1]
    for _ in range(n):
        out = ours.generate(prompt, do_sample=True, temperature=temperature, top_k=top_k, max_new_tokens=2,
                            eos_token_id=None, **drafting)
        counts[out[0, L], out[0, L + 1]] += 1
    assert tv(counts / n, want) < 0.08, (counts / n, want)
    # the scores it records are this model's processed scores of the tokens it kept
    out = ours.generate(prompt, do_sample=True, temperature=temperature, top_k=top_k, max_new_tokens=5,
                        eos_token_id=None, return_dict_in_generate=True, output_scores=True, **drafting)
    assert out.sequences.shape == (1, L + 5) and len(out.scores) == 5
    assert all(torch.isfinite(s[0, t]) for s, t in zip(out.scores, out.sequences[0, L:]))
