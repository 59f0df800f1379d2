"""Training: loss goes down, accumulation equals a big batch, resume is exact, checkpoint writes are
atomic, the tokenizer trainer's output loads in moetorch and Transformers, and the CLI runs end to end.

Everything is tiny and on CPU: a corpus of a few standard-library files, a 320-token BPE, 2-layer models.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from moetorch import AutoModelForCausalLM, Tokenizer
from moetorch.cli import main as cli_main
from moetorch.train import PRESETS, Trainer, TrainingConfig, TrainingConfigError, lr_factor, train_tokenizer
from moetorch.train import checkpointing as ckpt
from moetorch.train.data import split_by_file, stdlib_files, stdlib_root, text_corpus
from moetorch.train.tokenizer_trainer import SPECIAL_TOKENS
from moetorch.train.trainer import document_positions, end_of_text

REPO = Path(__file__).resolve().parents[1]
PHI = {
    "model_type": "phimoe", "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "max_position_embeddings": 64,
    "rope_theta": 10000.0, "attention_bias": True, "lm_head_bias": True,
}
JET = {
    "model_type": "jetmoe", "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2,
    "num_key_value_heads": 2, "kv_channels": 8, "num_local_experts": 4, "num_experts_per_tok": 2,
    "max_position_embeddings": 64,
}
ARCHS = {"phimoe": PHI, "jetmoe": JET}


@pytest.fixture(autouse=True)
def _one_thread():
    # Matrices this small run fastest on one thread, and several threads on a busy 2-core machine
    # spin against each other (100x slower steps).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A few small standard-library files (and a .md and .txt) in one directory."""
    root = tmp_path_factory.mktemp("corpus")
    files = [f for f in stdlib_files() if f.stat().st_size < 20_000][:12]
    for f in files:
        shutil.copyfile(f, root / f.relative_to(stdlib_root()).as_posix().replace("/", "__"))
    (root / "notes.md").write_text("# Notes\n\nExperts route tokens; the router learns to balance them.\n" * 20)
    (root / "story.txt").write_text("Once upon a time a mixture of experts learned Python.\n" * 20)
    return root


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory) -> Path:
    return train_tokenizer(str(corpus), tmp_path_factory.mktemp("tok"), vocab_size=320, show_progress=False)


def make_config(tmp: Path, tok_dir: Path, corpus: Path, arch: str = "phimoe", **kw) -> TrainingConfig:
    base = dict(
        model=dict(ARCHS[arch]), tokenizer=str(tok_dir), data=str(corpus), output_dir=str(tmp), seq_len=32,
        batch_size=4, max_steps=6, lr=3e-3, warmup_steps=2, eval_every=0, save_every=0, log_every=1,
        eval_max_batches=4, progress=False, eval_fraction=0.2,
    )
    base.update(kw)
    return TrainingConfig(**base)


def records(out: Path, event: str) -> list[dict]:
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


# ---- corpus and tokenizer -----------------------------------------------------------------------


def test_stdlib_corpus_is_sorted_and_excludes_tests():
    files = stdlib_files()
    root = stdlib_root()
    names = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 100 and names == sorted(names)
    assert all(n.endswith(".py") for n in names)
    for n in names:
        parts = n.split("/")
        assert not {"test", "tests", "idle_test", "site-packages", "encodings"} & set(parts[:-1]), n
        assert not parts[-1].startswith("test_"), n
    assert all(f.stat().st_size <= 200_000 for f in files)
    assert text_corpus("stdlib", max_files=5).files == files[:5]


def test_split_by_file_is_deterministic_and_stable():
    names = [f"pkg/module_{i}.py" for i in range(400)]
    train, held = split_by_file(names, 0.1)
    assert 20 <= len(held) <= 60 and sorted(train + held) == list(range(400))
    assert split_by_file(names, 0.1) == (train, held)
    # Adding files never moves an existing file across the split.
    more = names + [f"other/extra_{i}.py" for i in range(100)]
    _, held_more = split_by_file(more, 0.1)
    assert {more[i] for i in held_more if i < 400} == {names[i] for i in held}
    # At least one file is held out and one kept, however small the fraction or the corpus.
    assert len(split_by_file(["a.py", "b.py"], 0.001)[1]) == 1
    assert len(split_by_file(["a.py", "b.py"], 0.999)[0]) == 1


def test_trained_tokenizer_loads_in_moetorch_and_transformers(tok_dir):
    ours = Tokenizer.from_pretrained(tok_dir)
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    assert len(ours) == len(hf) == 320
    assert [ours.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(8))
    assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<s>", "</s>", "<pad>")
    for text in ["def f(x):\n    return x + 1  # ünïcode ✓", "The router balances experts."]:
        ids = ours.encode(text)
        assert ids == hf.encode(text) and ids[0] == ours.bos_token_id
        assert ours.decode(ids, skip_special_tokens=True) == text == hf.decode(ids, skip_special_tokens=True)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    text = ours.apply_chat_template(chat, tokenize=False)
    assert text == hf.apply_chat_template(chat, tokenize=False)
    assert text == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n</s>"
    prompt = ours.apply_chat_template(chat[:2], add_generation_prompt=True, return_dict=False)
    assert prompt == hf.apply_chat_template(chat[:2], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.convert_tokens_to_ids("<|end|>") in prompt


# ---- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["phimoe", "jetmoe"])
def test_training_reduces_loss(tmp_path, tok_dir, corpus, arch):
    trainer = Trainer(make_config(tmp_path, tok_dir, corpus, arch, max_steps=30, log_every=5))
    before = trainer.evaluate()["eval_loss"]
    summary = trainer.train()
    assert summary["step"] == 30 and summary["eval_loss"] < before - 0.5
    train = records(tmp_path, "train")
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    r = train[-1]
    assert r["loss"] == pytest.approx(r["ce"] + trainer.aux_coef * r["aux_loss"])
    assert r["tokens"] == 30 * 4 * 32 and r["tokens_per_s"] > 0 and 0 < r["lr"] < 3e-3
    n_routers = 2 if arch == "phimoe" else 4  # JetMoE: attention and MLP router per layer, each counted once
    assert len(r["expert_load"]) == n_routers and all(len(row) == 4 for row in r["expert_load"])
    assert all(sum(row) == pytest.approx(1.0, abs=1e-3) for row in r["expert_load"])
    assert 1.0 <= r["load_imbalance"] <= r["load_imbalance_max"] <= 4.0
    end = records(tmp_path, "end")[-1]
    assert end["eval_ppl"] == pytest.approx(math.exp(end["eval_loss"]))
    assert os.readlink(tmp_path / "latest") == "checkpoint-30"


@pytest.mark.parametrize("arch", ["phimoe", "jetmoe"])
def test_grad_accumulation_equals_one_larger_batch(tmp_path, tok_dir, corpus, arch):
    # Router loss off: it multiplies per-batch statistics, so only its per-micro-batch form accumulates
    # (see trainer.py). PhiMoE with router_jitter_noise=0: sparsemixer's mask keeps only the argmax, so
    # its training-mode sample is deterministic however the RNG is consumed.
    overrides = {"router_aux_loss_coef": 0.0, "router_jitter_noise": 0.0} if arch == "phimoe" else {"aux_loss_coef": 0.0}
    params = []
    for batch, accum in ((8, 1), (2, 4)):
        cfg = make_config(tmp_path / f"b{batch}", tok_dir, corpus, arch, batch_size=batch, grad_accum=accum,
                          max_steps=1, warmup_steps=0, model_overrides=overrides, eval_fraction=0.0)
        trainer = Trainer(cfg)
        initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.train()
        params.append(trainer.model.state_dict())
    changed = 0
    for name, p in params[0].items():
        torch.testing.assert_close(params[1][name], p, rtol=0, atol=2e-6, msg=name)
        changed += not torch.equal(p, initial[name])
    assert changed > 10  # the step did move the weights


@pytest.mark.parametrize("arch", ["phimoe", "jetmoe"])
def test_resume_matches_an_uninterrupted_run(tmp_path, tok_dir, corpus, arch):
    # A large jitter threshold makes PhiMoE's sparsemixer really sample: its draws must replay exactly.
    overrides = {"router_jitter_noise": 0.5} if arch == "phimoe" else {}
    kw = dict(batch_size=2, grad_accum=2, eval_every=2, save_every=2, model_overrides=overrides)
    whole = Trainer(make_config(tmp_path / "whole", tok_dir, corpus, arch, **kw))
    whole.train()

    first = Trainer(make_config(tmp_path / "cut", tok_dir, corpus, arch, **kw))
    first.train(until_step=3)  # checkpoint at 2; step 3 is lost and redone
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "checkpoint-2"
    resumed = Trainer(make_config(tmp_path / "cut", tok_dir, corpus, arch, resume=True, **kw))
    assert resumed.step == 2
    resumed.train()

    def trace(out, event, keys):
        return [tuple(r[k] for k in keys) for r in records(out, event)]

    keys = ("step", "loss", "aux_loss", "grad_norm", "lr", "expert_load")
    assert trace(tmp_path / "cut", "train", keys) == trace(tmp_path / "whole", "train", keys)
    assert [r["step"] for r in records(tmp_path / "cut", "train")] == [1, 2, 3, 4, 5, 6]
    keys = ("step", "eval_loss")
    assert trace(tmp_path / "cut", "eval", keys) == trace(tmp_path / "whole", "eval", keys)
    for name, p in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], p), name
    assert len(records(tmp_path / "cut", "resume")) == 1


@pytest.mark.parametrize("arch", ["phimoe", "jetmoe"])
def test_bf16_autocast_training(tmp_path, tok_dir, corpus, arch):
    # The GPU default (bf16 autocast over float32 weights), here on CPU: experts see float32
    # activations but get bf16 matmul outputs.
    trainer = Trainer(make_config(tmp_path, tok_dir, corpus, arch, precision="bf16", max_steps=2, batch_size=2))
    assert trainer.amp_dtype == torch.bfloat16
    summary = trainer.train()
    assert math.isfinite(summary["eval_loss"]) and trainer.model.dtype == torch.float32


def test_gradient_checkpointing_replays_sparsemixer_draws(tmp_path, tok_dir, corpus):
    # Recomputation in backward must redraw the same experts, so the run is unchanged.
    losses = []
    for flag in (False, True):
        cfg = make_config(tmp_path / str(flag), tok_dir, corpus, max_steps=3, gradient_checkpointing=flag,
                          model_overrides={"router_jitter_noise": 0.5}, eval_fraction=0.0)
        trainer = Trainer(cfg)
        assert trainer.model.is_gradient_checkpointing == flag
        trainer.train()
        losses.append([r["loss"] for r in records(tmp_path / str(flag), "train")])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)


def test_phimoe_training_routing_samples_from_the_torch_rng():
    # What the resume test guards: in train mode sparsemixer's choices depend on the RNG state.
    from moetorch import PhimoeConfig, PhimoeForCausalLM

    cfg = PhimoeConfig(**{k: v for k, v in PHI.items() if k != "model_type"}, vocab_size=64, router_jitter_noise=0.5)
    model = PhimoeForCausalLM(cfg).train()
    ids = torch.randint(0, 64, (2, 16))
    losses = []
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        losses.append(model(ids, labels=ids).loss.item())
    assert losses[0] == losses[2] != losses[1]


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, tok_dir, corpus, monkeypatch):
    cfg = make_config(tmp_path, tok_dir, corpus, save_every=2, max_steps=6)
    real = ckpt.fsync_tree

    def failing(path):
        if "checkpoint-4" in path.name:
            raise OSError("disk full (simulated)")
        real(path)

    monkeypatch.setattr(ckpt, "fsync_tree", failing)
    with pytest.raises(OSError, match="simulated"):
        Trainer(cfg).train()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert os.readlink(tmp_path / "latest") == "checkpoint-2"
    assert any(p.name.startswith(".tmp-checkpoint-4") for p in tmp_path.iterdir())
    AutoModelForCausalLM.from_pretrained(tmp_path / "latest")
    monkeypatch.setattr(ckpt, "fsync_tree", real)
    resumed = Trainer(cfg.replace(resume=True))
    assert resumed.step == 2 and not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    assert resumed.train()["step"] == 6


_KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from moetorch.train import Trainer, TrainingConfig

    real_save = torch.save
    def save_then_die(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:  # the second checkpoint: die half-way
            with open(f, "wb") as fh:
                fh.write(b"half a trainer state")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)
    torch.save = save_then_die
    Trainer(TrainingConfig.from_json(sys.argv[1])).train()
""")


def test_process_killed_mid_write_leaves_a_loadable_checkpoint(tmp_path, tok_dir, corpus):
    out = tmp_path / "run"
    cfg = make_config(out, tok_dir, corpus, save_every=2, max_steps=6, seq_len=16, batch_size=2)
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(tmp_path / "cfg.json")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    half = [p for p in out.iterdir() if p.name.startswith(".tmp-checkpoint-4")]
    assert len(half) == 1 and (half[0] / "model.safetensors").exists()
    assert not (out / "checkpoint-4").exists() and os.readlink(out / "latest") == "checkpoint-2"
    assert ckpt.latest_checkpoint(out).name == "checkpoint-2"
    AutoModelForCausalLM.from_pretrained(out / "latest")
    resumed = Trainer(cfg.replace(resume=True))
    assert resumed.step == 2 and not half[0].exists()
    assert resumed.train()["step"] == 6


# ---- data sources, presets, options -------------------------------------------------------------


def test_pretokenized_npy_and_bin(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 64, 4000)
    np.save(tmp_path / "tokens.npy", tokens.astype(np.int32))
    tokens.astype(np.uint16).tofile(tmp_path / "tokens.bin")
    for name in ("tokens.npy", "tokens.bin"):
        cfg = TrainingConfig(model={**PHI, "vocab_size": 64}, data=str(tmp_path / name), output_dir=str(tmp_path / name[-3:]),
                             seq_len=32, batch_size=2, max_steps=2, progress=False, eval_fraction=0.1)
        trainer = Trainer(cfg)
        assert trainer.data.info["split"] == "fraction"
        assert trainer.data.info["eval_sequences"] == 12 and trainer.data.info["train_sequences"] == 113
        held = trainer.data.eval.get(np.arange(1))[0].numpy()
        assert (held == tokens[113 * 32 : 114 * 32]).all()  # the tail is held out
        assert math.isfinite(trainer.train()["eval_ppl"])
    bad = TrainingConfig(model={**PHI, "vocab_size": 32}, data=str(tmp_path / "tokens.npy"),
                         output_dir=str(tmp_path / "bad"), seq_len=32, progress=False)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        Trainer(bad)


def test_presets_fit_in_16_mb():
    from moetorch.auto import registry

    for name, preset in PRESETS.items():
        classes = registry()[preset["model_type"]]
        config = classes["config"].from_dict({**preset, "vocab_size": 4096})
        with torch.device("meta"):
            model = classes["causal_lm"](config)
        n = model.num_parameters()
        assert 2.5e6 < n and n * 4 <= 16e6, (name, n)


def test_lr_schedule():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 10, 100, 0.1) == pytest.approx(0.1)


def test_errors_name_the_option(tmp_path, tok_dir, corpus):
    with pytest.raises(TrainingConfigError, match="batch_size"):
        TrainingConfig(batch_size=0)
    with pytest.raises(TrainingConfigError, match="precision"):
        TrainingConfig(precision="fp8")
    with pytest.raises(TrainingConfigError, match="unknown training option"):
        TrainingConfig.from_dict({"learning_rate": 1.0})
    # a config file: unreadable, not JSON, or not an object, each named
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(TrainingConfigError, match="cannot read training config .*missing.json"):
        TrainingConfig.from_json(tmp_path / "missing.json")
    with pytest.raises(TrainingConfigError, match="cannot read training config .*broken.json"):
        TrainingConfig.read_json(tmp_path / "broken.json")
    with pytest.raises(TrainingConfigError, match="list.json must hold a JSON object"):
        TrainingConfig.from_json(tmp_path / "list.json")
    with pytest.raises(FileNotFoundError, match="data"):
        Trainer(make_config(tmp_path / "a", tok_dir, corpus, data=str(tmp_path / "nothing" / "*.txt")))
    with pytest.raises(ValueError, match="model"):
        Trainer(make_config(tmp_path / "b", tok_dir, corpus, model="no-such-preset"))
    with pytest.raises(FileNotFoundError, match="resume"):
        Trainer(make_config(tmp_path / "c", tok_dir, corpus, resume=True))
    cfg = make_config(tmp_path / "d", tok_dir, corpus, max_steps=1)
    Trainer(cfg).train()
    with pytest.raises(FileExistsError, match="output_dir"):
        Trainer(cfg)


def _tiny_run(out: Path, tmp: Path, steps: int = 2, **kw) -> TrainingConfig:
    """A 1-layer PhiMoE on random token ids (no tokenizer): a fast run to get checkpoints from."""
    tokens = tmp / "ids.npy"
    if not tokens.exists():
        np.save(tokens, np.random.default_rng(0).integers(0, 64, 2000))
    base = dict(model={**PHI, "vocab_size": 64, "num_hidden_layers": 1}, data=str(tokens), output_dir=str(out),
                seq_len=16, batch_size=2, max_steps=steps, warmup_steps=0, save_every=1, eval_every=0,
                eval_fraction=0.1, progress=False)
    base.update(kw)
    return TrainingConfig(**base)


def test_bad_numbers_and_paths_are_refused_naming_the_option(tmp_path):
    with pytest.raises(TrainingConfigError, match="lr must be positive"):
        TrainingConfig(lr=0.0)  # trains nothing, yet wrote checkpoints as if it had
    with pytest.raises(TrainingConfigError, match="seed"):
        TrainingConfig(seed=-1)  # numpy's "Seed must be between 0 and 2**32 - 1" named no option
    # Non-finite numbers trained to an all-NaN checkpoint and exited 0 (inf) or failed inside torch (nan);
    # a number of the wrong type (as a JSON config can hold) failed on a comparison inside Python.
    for name in ("lr", "weight_decay", "grad_clip", "adam_eps"):
        for value in (float("inf"), float("nan"), "0.1", None, True):
            with pytest.raises(TrainingConfigError, match=f"^{name} must be a finite, non-negative number"):
                TrainingConfig(**{name: value})
    for name, value in (("beta1", "0.9"), ("beta2", float("nan")), ("min_lr_ratio", "x"),
                        ("eval_fraction", None), ("min_lr_ratio", float("inf"))):
        with pytest.raises(TrainingConfigError, match=f"^{name} must be in \\[0, 1"):
            TrainingConfig(**{name: value})
    # Fields that name files: a number or null is named here, not by os.path's TypeError.
    for name, value in (("model", 5), ("data", 5), ("data", []), ("data", ["a.txt", 3]), ("eval_data", 7),
                        ("tokenizer", 1.0), ("output_dir", None), ("device", 0), ("resume", 1)):
        with pytest.raises(TrainingConfigError, match=f"^{name} must be "):
            TrainingConfig(**{name: value})
    # pathlib paths are taken and kept as text, so the config still round-trips through JSON
    cfg = TrainingConfig(data=[tmp_path / "a.txt", "b.txt"], output_dir=tmp_path / "out", tokenizer=tmp_path)
    assert cfg.data == [str(tmp_path / "a.txt"), "b.txt"] and cfg.output_dir == str(tmp_path / "out")
    assert TrainingConfig.from_dict(json.loads(cfg.to_json())) == cfg
    # a tuple of paths and numpy's floats, taken before these checks, are taken still (kept as JSON's types)
    cfg = TrainingConfig(data=("a.txt", "b.txt"), beta1=np.float32(0.5), lr=np.float64(0.002))
    assert cfg.data == ["a.txt", "b.txt"] and type(cfg.beta1) is float and cfg.beta1 == 0.5
    assert TrainingConfig.from_dict(json.loads(cfg.to_json())) == cfg
    (tmp_path / "a_file").write_text("")
    with pytest.raises(FileExistsError, match="output_dir: .* is a file"):
        Trainer(_tiny_run(tmp_path / "a_file", tmp_path))
    # Positions past max_position_embeddings (64 here): refused rather than trained on silently.
    with pytest.raises(TrainingConfigError, match="seq_len 128 .* max_position_embeddings 64"):
        Trainer(_tiny_run(tmp_path / "long", tmp_path, seq_len=128))
    # A --set key that is no config field would be kept as an unused extra: the run would ignore it.
    with pytest.raises(ValueError, match=r"model_overrides .*\['router_aux_loss_coeff'\]"):
        Trainer(_tiny_run(tmp_path / "typo", tmp_path, model_overrides={"router_aux_loss_coeff": 0.1}))


def test_bad_token_arrays_are_refused_naming_the_option(tmp_path):
    ids = np.random.default_rng(0).integers(0, 64, 2000)
    ids[100] = -5  # inside a training window: an index error deep in torch when its batch comes
    np.save(tmp_path / "neg.npy", ids)
    with pytest.raises(ValueError, match=r"data: token id -5 is outside the model's vocabulary"):
        Trainer(_tiny_run(tmp_path / "neg", tmp_path, data=str(tmp_path / "neg.npy")))
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    with pytest.raises(ValueError, match="data: cannot read .*junk.npy"):
        Trainer(_tiny_run(tmp_path / "junk", tmp_path, data=str(tmp_path / "junk.npy")))
    np.arange(1001, dtype=np.uint16).tofile(tmp_path / "odd.bin")  # 2002 bytes: no whole uint32s
    with pytest.raises(ValueError, match="data: cannot read .*odd.bin.*data_dtype"):
        Trainer(_tiny_run(tmp_path / "odd", tmp_path, data=str(tmp_path / "odd.bin"), data_dtype="uint32"))
    np.save(tmp_path / "short.npy", np.arange(10))
    with pytest.raises(ValueError, match="eval_data: 10 held-out tokens make no sequence"):
        Trainer(_tiny_run(tmp_path / "short", tmp_path, eval_data=str(tmp_path / "short.npy")))
    # the runs that could not start left no output directories of their own; one that existed stays
    assert not any((tmp_path / name).exists() for name in ("neg", "junk", "odd", "short"))
    (tmp_path / "mine").mkdir()
    with pytest.raises(ValueError, match="data: cannot read"):
        Trainer(_tiny_run(tmp_path / "mine", tmp_path, data=str(tmp_path / "junk.npy")))
    assert (tmp_path / "mine").is_dir()


def test_rewind_sets_the_later_checkpoints_aside(tmp_path, caplog):
    """`resume=OUTPUT_DIR/checkpoint-K` of an older step: the later checkpoints move, whole and
    loadable, into abandoned-after-K with their log records; nothing is deleted; a second rewind to
    the same step gets the next free name (a dangling link holds one), and takes a later checkpoint
    cut short along; the resumed run then saves and rotates as usual."""
    run = tmp_path / "run"
    Trainer(_tiny_run(run, tmp_path, steps=5, keep_checkpoints=3, log_every=1)).train()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]
    first = AutoModelForCausalLM.from_pretrained(run / "checkpoint-5").state_dict()
    with caplog.at_level("WARNING", logger="moetorch"):
        trainer = Trainer(_tiny_run(run, tmp_path, steps=5, keep_checkpoints=3, resume=str(run / "checkpoint-3")))
    aside = run / "abandoned-after-3"
    assert "the later checkpoint-4, checkpoint-5 moved to" in caplog.text and str(aside) in caplog.text
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-4", "checkpoint-5", "train_log.jsonl"]
    for name, p in AutoModelForCausalLM.from_pretrained(aside / "checkpoint-5").state_dict().items():
        assert torch.equal(first[name], p), name
    moved = [json.loads(line) for line in (aside / "train_log.jsonl").read_text().splitlines()]
    assert {r["step"] for r in moved if r["event"] == "train"} == {4, 5} and any(r["event"] == "end" for r in moved)
    assert max(r["step"] for r in records(run, "train")) == 3 and ckpt.latest_checkpoint(run).name == "checkpoint-3"
    assert trainer.train()["step"] == 5
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]
    assert (aside / "checkpoint-5").is_dir()  # the rotation left it alone
    # a later checkpoint cut short goes aside too; a dangling link holds its name
    (run / "checkpoint-9").mkdir()
    (run / "abandoned-after-3-2").symlink_to(tmp_path / "gone")
    Trainer(_tiny_run(run, tmp_path, steps=5, keep_checkpoints=3, resume=str(run / "checkpoint-3")))
    assert sorted(p.name for p in (run / "abandoned-after-3-3").iterdir()) == \
        ["checkpoint-4", "checkpoint-5", "checkpoint-9", "train_log.jsonl"]
    # resuming the latest checkpoint sets nothing aside
    Trainer(_tiny_run(run, tmp_path, steps=6, keep_checkpoints=3, resume=True))
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("abandoned")) == \
        ["abandoned-after-3", "abandoned-after-3-2", "abandoned-after-3-3"]


def test_resume_refusals_name_the_fault(tmp_path):
    from moetorch.checkpoint import CheckpointError

    run = tmp_path / "run"
    Trainer(_tiny_run(run, tmp_path, steps=3)).train()
    # max_steps below the checkpoint's step: it used to return at once, with nothing trained or said.
    with pytest.raises(TrainingConfigError, match="max_steps 2 is below step 3"):
        Trainer(_tiny_run(run, tmp_path, steps=2, resume=True))
    # A resume from another run's checkpoint would overwrite this directory's checkpoints step for step.
    other = tmp_path / "other"
    Trainer(_tiny_run(other, tmp_path, steps=2)).train()
    with pytest.raises(FileExistsError, match="output_dir: .* holds checkpoints of its own run"):
        Trainer(_tiny_run(run, tmp_path, steps=4, resume=str(other / "checkpoint-2")))
    assert ckpt.latest_checkpoint(run).name == "checkpoint-3"
    # Into an empty output_dir it is allowed (a branch of that run).
    assert Trainer(_tiny_run(tmp_path / "branch", tmp_path, steps=4, resume=str(other / "checkpoint-2"))).step == 2
    # A trainer state cut short: the file is named, not torch's unpickler internals.
    (run / "checkpoint-3" / ckpt.STATE_FILE).write_bytes(b"half a trainer state")
    with pytest.raises(CheckpointError, match="resume: cannot read .*checkpoint-3.*trainer_state.pt"):
        Trainer(_tiny_run(run, tmp_path, steps=4, resume=True))


def test_a_branch_into_an_empty_output_dir_is_a_run_of_its_own(tmp_path, capsys):
    """`--resume A/checkpoint-K --output-dir B` (B empty) writes B's training_config.json and a
    `start` record that names the checkpoint and step it branched from; `--resume auto` in B then
    continues B's own checkpoints, and before B has one it branches again from the same checkpoint
    (it used to start a fresh run from the defaults). A's directory is left as it was."""
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 64, 2000))
    (tmp_path / "model.json").write_text(json.dumps({**PHI, "vocab_size": 64, "num_hidden_layers": 1}))
    a, b = tmp_path / "a", tmp_path / "b"
    flags = ["--progress", "false", "--log-every", "1"]
    assert cli_main(["train", "--output-dir", str(a), "--model", str(tmp_path / "model.json"), "--data",
                     str(tmp_path / "ids.npy"), "--seq-len", "16", "--batch-size", "2", "--max-steps", "2",
                     "--warmup-steps", "0", "--save-every", "1", "--eval-max-batches", "1", *flags]) == 0
    a_log = (a / "train_log.jsonl").read_text()
    source = a / "checkpoint-1"
    # the branch is set up but stopped before its first checkpoint (killed, preempted)
    config = TrainingConfig.from_json(source / "training_config.json")
    Trainer(config.replace(output_dir=str(b), resume=str(source), max_steps=3))
    saved = TrainingConfig.from_json(b / "training_config.json")
    assert saved.resume == str(source.resolve()) and saved.max_steps == 3 and saved.data == config.data
    start = records(b, "start")
    assert len(start) == 1 and start[0]["step"] == 1
    assert start[0]["resumed_from"] == {"checkpoint": str(source.resolve()), "step": 1}
    assert start[0]["data"]["train_sequences"] > 0 and start[0]["config"]["max_steps"] == 3
    # --resume auto in B, no other flag: B has no checkpoint yet, so it branches from A's again
    assert cli_main(["train", "--output-dir", str(b), "--resume", "auto", *flags]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["step"] == 3
    assert [p.name for p in ckpt.list_checkpoints(b)] == ["checkpoint-2", "checkpoint-3"]
    assert [r["event"] for r in map(json.loads, (b / "train_log.jsonl").read_text().splitlines())][:2] == \
        ["start", "resume"]  # the earlier attempt's records replaced, not doubled
    assert [r["step"] for r in records(b, "train")] == [2, 3]
    # then --resume auto continues B's own checkpoints, keeping B's start record
    assert cli_main(["train", "--output-dir", str(b), "--resume", "auto", "--max-steps", "4", *flags]) == 0
    assert [r["step"] for r in records(b, "train")] == [2, 3, 4]
    assert [r["resumed_from"] for r in records(b, "start")] == [{"checkpoint": str(source.resolve()), "step": 1}]
    assert [r["checkpoint"] for r in records(b, "resume")] == [str(source), str(b / "checkpoint-3")]
    assert (a / "train_log.jsonl").read_text() == a_log and ckpt.latest_checkpoint(a).name == "checkpoint-2"
    # a fresh run's start record says it resumed from nothing
    assert records(a, "start")[0]["resumed_from"] is None
    # A's checkpoint again into B, which now holds checkpoints of its own: refused, B's records kept
    log = (b / "train_log.jsonl").read_text()
    with pytest.raises(FileExistsError, match="holds checkpoints of its own"):
        Trainer(config.replace(output_dir=str(b), resume=str(source), max_steps=3))
    assert (b / "train_log.jsonl").read_text() == log


def test_eval_and_start_records_count_tokens_each_their_own_way(tmp_path):
    """The `start` record's data.eval_tokens counts the held-out windows' tokens (as train_tokens
    counts the training windows'); the `eval` record's eval_label_tokens counts the label tokens the
    held-out loss averages over (seq_len - 1 a window, of the windows eval_max_batches lets in).
    Both used to be called eval_tokens."""
    out = tmp_path / "run"
    summary = Trainer(_tiny_run(out, tmp_path, eval_batch_size=2, eval_max_batches=2)).train()
    data = records(out, "start")[0]["data"]
    assert data["eval_sequences"] == 12 and data["eval_tokens"] == 12 * 16
    assert data["train_sequences"] == 113 and data["train_tokens"] == 113 * 16
    (evaluation,) = records(out, "eval")
    assert evaluation["eval_label_tokens"] == 4 * 15 and "eval_tokens" not in evaluation
    (end,) = records(out, "end")
    assert end["eval_label_tokens"] == summary["eval_label_tokens"] == 4 * 15 and "eval_tokens" not in end


def test_eval_data_overlapping_the_training_data_is_warned_about(tmp_path, tok_dir, corpus, caplog):
    """eval_data that resolves to any file of the training data (the same file, a link to it, a file
    of the training directory) makes the held-out loss optimistic: a warning names both sources and
    the shared files, and the run still starts (a smoke test may want that). With eval_data nothing
    is split off data: an eval_split or eval_fraction given is said to be unused, and the start
    record's data.split is "eval_data"."""
    def build(name, **kw):
        caplog.clear()
        with caplog.at_level("WARNING", logger="moetorch"):
            return Trainer(_tiny_run(tmp_path / name, tmp_path, **kw))

    ids = tmp_path / "ids.npy"
    trainer = build("same", eval_data=str(ids))
    assert trainer.data.eval is not None and trainer.data.info["eval_source"]["shared_files"] == 1
    assert trainer.data.info["split"] == "eval_data"
    assert f"eval_data (--eval-data) '{ids}' overlaps data (--data) '{ids}'" in caplog.text
    assert "the same file" in caplog.text and "optimistic" in caplog.text
    (tmp_path / "link.npy").symlink_to(ids)
    build("link", eval_data=str(tmp_path / "link.npy"))
    assert "overlaps data (--data)" in caplog.text and "the same file" in caplog.text
    np.save(tmp_path / "other.npy", np.random.default_rng(1).integers(0, 64, 400))
    trainer = build("other", eval_data=str(tmp_path / "other.npy"), eval_fraction=TrainingConfig().eval_fraction)
    assert "overlaps" not in caplog.text and "not used" not in caplog.text
    assert trainer.data.info["eval_source"]["shared_files"] == 0
    # an explicit split with eval_data: nothing is split off data, and the warning says so
    trainer = build("split", eval_data=str(tmp_path / "other.npy"), eval_split="fraction", eval_fraction=0.3)
    assert "eval_split 'fraction' and eval_fraction 0.3 are not used" in caplog.text
    assert len(trainer.data.train) == 2000 // 16 and len(trainer.data.eval) == 400 // 16
    # text: one file of the training directory as eval_data
    caplog.clear()
    with caplog.at_level("WARNING", logger="moetorch"):
        trainer = Trainer(make_config(tmp_path / "text", tok_dir, corpus, eval_data=str(corpus / "story.txt")))
    assert f"overlaps data (--data) '{corpus}'" in caplog.text and "1 of its 1 file(s)" in caplog.text
    assert str((corpus / "story.txt").resolve()) in caplog.text
    assert trainer.data.info["eval_source"]["shared_files"] == 1


def test_resume_applies_model_overrides(tmp_path):
    run = tmp_path / "run"
    Trainer(_tiny_run(run, tmp_path, steps=1)).train()
    resumed = Trainer(_tiny_run(run, tmp_path, steps=2, resume=True, model_overrides={"router_aux_loss_coef": 0.25}))
    assert resumed.model.config.router_aux_loss_coef == 0.25 and resumed.aux_coef == 0.25  # was ignored
    resumed.train()
    assert json.loads((run / "checkpoint-2" / "config.json").read_text())["router_aux_loss_coef"] == 0.25
    with pytest.raises(ValueError, match=r"model_overrides .*\['typo'\]"):
        Trainer(_tiny_run(run, tmp_path, steps=3, resume=True, model_overrides={"typo": 1}))


def test_missing_evaluation_and_short_warmup_warn(tmp_path, tok_dir, corpus, caplog):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copyfile(corpus / "story.txt", one / "story.txt")
    with caplog.at_level("WARNING", logger="moetorch"):
        trainer = Trainer(make_config(tmp_path / "run", tok_dir, one, max_steps=3, warmup_steps=10))
    assert trainer.data.eval is None
    assert "no held-out data" in caplog.text and "--eval-split" in caplog.text
    assert "warmup_steps 10 > max_steps 3" in caplog.text


def test_cli_resume_keeps_the_flags_of_an_earlier_resume(tmp_path, capsys):
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 64, 2000))
    (tmp_path / "model.json").write_text(json.dumps({**PHI, "vocab_size": 64}))
    out = str(tmp_path / "run")
    common = ["--output-dir", out, "--progress", "false", "--log-every", "1"]
    assert cli_main(["train", *common, "--model", str(tmp_path / "model.json"), "--data", str(tmp_path / "ids.npy"),
                     "--seq-len", "16", "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "0",
                     "--lr", "1e-3", "--min-lr-ratio", "0.5", "--set", "num_hidden_layers=1"]) == 0
    assert cli_main(["train", *common, "--resume", "--max-steps", "3", "--lr", "0.02"]) == 0
    assert cli_main(["train", *common, "--resume", "--max-steps", "4"]) == 0
    capsys.readouterr()
    # Step 4 (0-based 3) of a cosine from lr 0.02 to 0.5 x lr over 4 steps, no warmup: the lr of the
    # second resume, which the third keeps (it read the first run's 1e-3 from the output dir).
    lr = [r["lr"] for r in records(Path(out), "train") if r["step"] == 4]
    assert lr == [pytest.approx(0.02 * (0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 3 / 4))))]


def test_cli_resume_keeps_the_checkpoints_model(tmp_path, caplog):
    """--model given with --resume names another model: the run continues the checkpoint's, says
    so, and its saved config keeps naming the model it trains."""
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 64, 2000))
    (tmp_path / "model.json").write_text(json.dumps({**PHI, "vocab_size": 64, "num_hidden_layers": 1}))
    out = tmp_path / "run"
    common = ["--output-dir", str(out), "--progress", "false"]
    assert cli_main(["train", *common, "--model", str(tmp_path / "model.json"), "--data", str(tmp_path / "ids.npy"),
                     "--seq-len", "16", "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "0"]) == 0
    with caplog.at_level("WARNING", logger="moetorch"):
        assert cli_main(["train", *common, "--resume", "--max-steps", "3", "--model", "tiny-jetmoe"]) == 0
    assert "--model tiny-jetmoe is not used" in caplog.text
    saved = TrainingConfig.from_json(ckpt.latest_checkpoint(out) / "training_config.json")
    assert saved.model == str(tmp_path / "model.json")
    assert AutoModelForCausalLM.from_pretrained(out / "latest").config.model_type == "phimoe"


def test_cli_ctrl_c_names_the_checkpoint_to_resume_from(tmp_path, capsys, monkeypatch):
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 64, 2000))
    (tmp_path / "model.json").write_text(json.dumps({**PHI, "vocab_size": 64, "num_hidden_layers": 1}))
    real = Trainer._train_step

    def interrupted(self):
        if self.step == 3:
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(Trainer, "_train_step", interrupted)
    out = tmp_path / "run"
    try:
        code = cli_main(["train", "--output-dir", str(out), "--model", str(tmp_path / "model.json"), "--data",
                         str(tmp_path / "ids.npy"), "--seq-len", "16", "--batch-size", "2", "--max-steps", "6",
                         "--save-every", "2", "--progress", "false"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C came out of `moetorch train` as a traceback")
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert "interrupted at step 3" in err and "checkpoint-2" in err and "--resume" in err


def _signal_at(monkeypatch, steps: dict[int, list[int]]) -> None:
    """Trainer._train_step sends this process the signals listed for the step it is about to take
    (delivered in the middle of that step, as a Ctrl-C would be)."""
    real = Trainer._train_step

    def step_with_signals(self):
        for signum in steps.get(self.step + 1, []):
            os.kill(os.getpid(), signum)
        real(self)

    monkeypatch.setattr(Trainer, "_train_step", step_with_signals)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_saves_and_resumes_exactly(tmp_path, tok_dir, corpus, monkeypatch, signum,
                                                              python_ctrl_c):
    """Ctrl-C or SIGTERM (preemption) in step 3: the step finishes, checkpoint-3 is saved (save_every
    is 4), train() returns early naming the signal, the handlers are restored, and the run resumed from
    it gives the uninterrupted run's losses and weights."""
    kw = dict(batch_size=2, save_every=4, model_overrides={"router_jitter_noise": 0.5})
    whole = Trainer(make_config(tmp_path / "whole", tok_dir, corpus, **kw))
    whole.train()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    _signal_at(monkeypatch, {3: [signum]})
    cut = Trainer(make_config(tmp_path / "cut", tok_dir, corpus, **kw))
    summary = cut.train()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert summary["interrupted"] == signal.Signals(signum).name and summary["step"] == 3
    assert summary["checkpoint"] == str(tmp_path / "cut" / "checkpoint-3")
    assert ckpt.latest_checkpoint(tmp_path / "cut").name == "checkpoint-3"
    assert [r["step"] for r in records(tmp_path / "cut", "interrupted")] == [3] and not records(tmp_path / "cut", "end")
    monkeypatch.undo()
    resumed = Trainer(make_config(tmp_path / "cut", tok_dir, corpus, resume=True, **kw))
    assert resumed.step == 3
    assert resumed.train()["step"] == 6
    keys = ("step", "loss", "aux_loss", "grad_norm", "lr")
    trace = [[tuple(r[k] for k in keys) for r in records(out, "train")] for out in (tmp_path / "cut", tmp_path / "whole")]
    assert trace[0] == trace[1] and [t[0] for t in trace[0]] == [1, 2, 3, 4, 5, 6]
    for name, p in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], p), name


def test_a_second_signal_stops_at_once_and_save_on_interrupt_false_leaves_signals_alone(
        tmp_path, tok_dir, corpus, monkeypatch, python_ctrl_c):
    _signal_at(monkeypatch, {2: [signal.SIGINT, signal.SIGINT]})
    trainer = Trainer(make_config(tmp_path / "twice", tok_dir, corpus, save_every=0))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.step == 1 and not ckpt.list_checkpoints(tmp_path / "twice")  # stopped in step 2, nothing saved
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    _signal_at(monkeypatch, {2: [signal.SIGINT]})
    trainer = Trainer(make_config(tmp_path / "off", tok_dir, corpus, save_every=0, save_on_interrupt=False))
    with pytest.raises(KeyboardInterrupt):  # Python's own Ctrl-C, in the middle of step 2
        trainer.train()
    assert trainer.step == 1 and not ckpt.list_checkpoints(tmp_path / "off")
    with pytest.raises(TrainingConfigError, match="save_on_interrupt must be true or false"):
        make_config(tmp_path, tok_dir, corpus, save_on_interrupt="yes")


def test_a_signal_in_the_last_step_ends_the_run_as_usual(tmp_path, tok_dir, corpus, monkeypatch):
    _signal_at(monkeypatch, {6: [signal.SIGTERM]})
    summary = Trainer(make_config(tmp_path, tok_dir, corpus, save_every=0)).train()
    assert summary["step"] == 6 and "interrupted" not in summary and "eval_loss" in summary
    assert len(records(tmp_path, "end")) == 1 and not records(tmp_path, "interrupted")


def test_an_ignored_sigint_stays_ignored(tmp_path, tok_dir, corpus, monkeypatch):
    """A job started in the background ignores SIGINT: the trainer does not take it up."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _signal_at(monkeypatch, {2: [signal.SIGINT]})
        summary = Trainer(make_config(tmp_path, tok_dir, corpus, max_steps=3)).train()
        assert summary["step"] == 3 and "interrupted" not in summary
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_trainer_outside_the_main_thread_leaves_signals_alone(tmp_path, tok_dir, corpus):
    import threading

    result, before = {}, signal.getsignal(signal.SIGINT)
    trainer = Trainer(make_config(tmp_path, tok_dir, corpus, max_steps=2))
    thread = threading.Thread(target=lambda: result.update(trainer.train()))
    thread.start()
    thread.join()
    assert result["step"] == 2 and signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_cli_signal_saves_and_names_the_resume_command(tmp_path, capfd, monkeypatch, signum, code, python_ctrl_c):
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 64, 2000))
    (tmp_path / "model.json").write_text(json.dumps({**PHI, "vocab_size": 64, "num_hidden_layers": 1}))
    _signal_at(monkeypatch, {3: [signum]})
    out = tmp_path / "run"
    args = ["train", "--output-dir", str(out), "--model", str(tmp_path / "model.json"), "--data",
            str(tmp_path / "ids.npy"), "--seq-len", "16", "--batch-size", "2", "--max-steps", "6",
            "--save-every", "5", "--progress", "false"]
    assert cli_main(args) == code
    err = capfd.readouterr().err  # the handler's notice goes straight to file descriptor 2
    name = signal.Signals(signum).name
    assert f"{name}: stopping after the step in progress" in err and "Traceback" not in err
    assert f"{name}: stopped at step 3 with checkpoint {out / 'checkpoint-3'}" in err and "--resume" in err
    monkeypatch.undo()
    assert cli_main(["train", "--output-dir", str(out), "--resume", "--progress", "false"]) == 0
    assert [r["step"] for r in records(out, "resume")] == [3] and records(out, "end")[0]["step"] == 6
    with pytest.raises(SystemExit):
        cli_main(args[:-2] + ["--save-on-interrupt", "maybe"])


def test_cli_train_tokenizer_refuses_bad_output_and_max_files(tmp_path, corpus, caplog):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="output: .*a_file is a file"):
        cli_main(["train-tokenizer", "--data", str(corpus), "--output", str(tmp_path / "a_file"), "--vocab-size", "300"])
    with pytest.raises(ValueError, match="max_files must be a positive integer"):
        train_tokenizer(str(corpus), tmp_path / "t", max_files=0, show_progress=False)
    with caplog.at_level("WARNING", logger="moetorch"):
        train_tokenizer(str(corpus / "story.txt"), tmp_path / "small", vocab_size=5000, show_progress=False)
    n = len(Tokenizer.from_pretrained(tmp_path / "small"))
    assert n < 5000 and f"the tokenizer has {n} tokens, fewer than vocab_size 5000" in caplog.text


# ---- command line -------------------------------------------------------------------------------


def test_document_positions_start_again_after_each_end_of_text():
    ids = torch.tensor([[5, 2, 7, 7, 2, 2, 9], [2, 1, 1, 1, 1, 1, 2]])
    assert document_positions(ids, 2).tolist() == [[0, 1, 0, 1, 2, 0, 0], [0, 0, 1, 2, 3, 4, 5]]
    no_eos = transformers.PretrainedConfig(eos_token_id=None)
    with pytest.raises(TrainingConfigError, match="document_attention needs the token that ends each document"):
        end_of_text(None, no_eos)
    assert end_of_text(None, transformers.PretrainedConfig(eos_token_id=[7, 8])) == 7
    with pytest.raises(TrainingConfigError, match="document_attention must be true or false"):
        TrainingConfig(document_attention="yes")


@pytest.mark.parametrize("arch", ["phimoe", "jetmoe"])
def test_document_attention_keeps_each_document_to_itself(tmp_path, tok_dir, corpus, arch):
    """With `document_attention`, a window's tokens after an end-of-text token get the logits of
    that document alone: nothing before the boundary reaches them. Training and evaluation run
    with it, and the resumed run keeps it."""
    trainer = Trainer(make_config(tmp_path, tok_dir, corpus, arch, document_attention=True, max_steps=2,
                                  save_every=2))
    eos = trainer.tokenizer.eos_token_id
    assert trainer.eos_id == eos
    windows = trainer.data.train.get(np.arange(len(trainer.data.train)))
    row, cut = next((r, int(c) + 1) for r in range(len(windows))
                    for c in (windows[r, :-4] == eos).nonzero().flatten()[:1])
    ids = windows[row : row + 1]
    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(ids, use_cache=False, **trainer._positions(ids)).logits
        alone = model(ids[:, cut:]).logits
        whole = model(ids).logits
    torch.testing.assert_close(packed[:, cut:], alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(whole[:, cut:], alone, rtol=1e-3, atol=1e-3)  # without it, the document before shows
    summary = trainer.train()
    assert summary["step"] == 2 and math.isfinite(summary["eval_loss"])
    resumed = Trainer(TrainingConfig.from_json(tmp_path / "training_config.json").replace(resume=True, max_steps=3))
    assert resumed.config.document_attention and resumed.eos_id == eos
    assert resumed.train()["step"] == 3


def test_cli_train_tokenizer_train_and_resume(tmp_path, corpus, capsys):
    tok = tmp_path / "tok"
    assert cli_main(["train-tokenizer", "--data", str(corpus), "--output", str(tok), "--vocab-size", "300"]) == 0
    assert len(Tokenizer.from_pretrained(tok)) == 300
    (tmp_path / "model.json").write_text(json.dumps(JET))
    out = tmp_path / "run"
    args = ["train", "--output-dir", str(out), "--model", str(tmp_path / "model.json"), "--tokenizer", str(tok),
            "--data", f"{corpus}/*.py", "--seq-len", "32", "--batch-size", "2", "--max-steps", "3",
            "--eval-every", "2", "--save-every", "2", "--log-every", "1", "--progress", "false",
            "--set", "num_hidden_layers=1", "--eval-split", "fraction", "--eval-fraction", "0.1",
            "--document-attention", "true"]
    capsys.readouterr()
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 3 and math.isfinite(summary["eval_ppl"])
    # Resume from the output dir alone, extending the run.
    assert cli_main(["train", "--output-dir", str(out), "--resume", "--max-steps", "4", "--progress", "false"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 4 and Path(summary["checkpoint"]).name == "checkpoint-4"
    saved = json.loads((out / "latest" / "training_config.json").read_text())
    assert saved["max_steps"] == 4 and saved["model_overrides"] == {"num_hidden_layers": 1}
    assert saved["document_attention"] is True
    # The checkpoint is a Transformers checkpoint too.
    ours = AutoModelForCausalLM.from_pretrained(out / "latest")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "latest")
    ids = torch.tensor([Tokenizer.from_pretrained(out / "latest").encode("def main():")])
    torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)
    assert ours.config.num_hidden_layers == 1


@pytest.mark.parametrize("arch_name", ["phimoe", "jetmoe"])
def test_transformers_trainer_fine_tunes_a_moetorch_model(arch_name, tmp_path):
    """A Transformers fine-tuning script with the model imported from moetorch: its Trainer finds
    the same label column as for Transformers' model, evaluates the loss, and (the forward taking
    keywords) passes num_items_in_batch, so gradient accumulation averages over all its tokens."""
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))
    from archs import JETMOE, PHIMOE

    from moetorch.models.heads import LOSS_KWARGS

    arch = PHIMOE if arch_name == "phimoe" else JETMOE
    torch.manual_seed(0)
    model = arch.ours["causal_lm"](arch.our_config())
    assert transformers.utils.find_labels(type(model)) == transformers.utils.find_labels(arch.hf["causal_lm"])
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(1, 97, (12,), generator=g).tolist()} for _ in range(8)]
    for r in rows:
        r["labels"] = [t if i % 3 else -100 for i, t in enumerate(r["input_ids"])]
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(sorted(kw.keys() & LOSS_KWARGS)), with_kwargs=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    assert trainer.train().training_loss > 0
    assert ["num_items_in_batch"] in seen
    metrics = trainer.evaluate(eval_dataset=rows[:4])
    model.eval()
    batch = transformers.default_data_collator(rows[:4])
    with torch.no_grad():
        want = model(**batch).loss
    assert math.isclose(metrics["eval_loss"], want.item(), rel_tol=1e-5)


@pytest.mark.parametrize("arch_name", ["phimoe", "jetmoe"])
def test_transformers_trainer_steps_as_for_transformers_model(arch_name, tmp_path):
    """Transformers' Trainer, gradient accumulation included, on moetorch's model and on
    Transformers' with the same weights: the same losses and the same weights after each step. The
    Trainer reads `loss_type` to count num_items_in_batch over the shifted labels, one token a row
    fewer; counted unshifted, every step's loss and gradients came out smaller."""
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))
    from archs import JETMOE, PHIMOE
    from parity import make_pair

    arch = PHIMOE if arch_name == "phimoe" else JETMOE
    hf, ours = make_pair(arch, tmp_path, seed=3, router_jitter_noise=0.0) if arch is PHIMOE else make_pair(
        arch, tmp_path, seed=3)
    g = torch.Generator().manual_seed(2)
    rows = [{"input_ids": (t := torch.randint(1, 97, (int(n),), generator=g).tolist()), "labels": t}
            for n in torch.randint(5, 12, (8,), generator=g)]
    runs = []
    for model in (hf, ours):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / type(model).__module__), per_device_train_batch_size=2,
            gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-3, report_to=[], use_cpu=True,
            save_strategy="no", logging_steps=1, seed=0, data_seed=0)
        collator = transformers.DataCollatorForSeq2Seq(_PadOnly(), padding=True, label_pad_token_id=-100)
        trainer = transformers.Trainer(model=model.train(), args=args, train_dataset=rows, data_collator=collator)
        assert trainer._loss_shifts_labels
        trainer.train()
        runs.append(([h["loss"] for h in trainer.state.log_history if "loss" in h], dict(model.named_parameters())))
    (hf_losses, hf_params), (our_losses, our_params) = runs
    assert our_losses == pytest.approx(hf_losses, rel=1e-4)
    for name, p in hf_params.items():
        torch.testing.assert_close(our_params[name], p, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


class _PadOnly:
    """What DataCollatorForSeq2Seq asks of a tokenizer to pad ids with 0 (right padding)."""

    padding_side = "right"
    pad_token_id = 0
    model_input_names = ["input_ids", "attention_mask"]

    def pad(self, features, padding=True, max_length=None, pad_to_multiple_of=None, return_tensors=None):
        n = max(len(f["input_ids"]) for f in features)
        ids = [f["input_ids"] + [0] * (n - len(f["input_ids"])) for f in features]
        mask = [[1] * len(f["input_ids"]) + [0] * (n - len(f["input_ids"])) for f in features]
        return transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask}, tensor_type=return_tensors)


def test_transformers_trainer_checkpoints_a_tied_head(tmp_path):
    """Transformers' Trainer writes a non-Transformers model's checkpoint as its state_dict through
    safetensors, which refuses tensors that share memory: JetMoE's tied LM head stopped the first
    checkpoint. The state_dict now holds a copy of the shared tensor (keep_vars=True still gives the
    one parameter); the checkpoint resumes, and loads strictly into Transformers' model with the
    trained logits."""
    import sys as _sys

    import safetensors.torch

    _sys.path.insert(0, str(Path(__file__).parent))
    from archs import JETMOE
    from parity import make_pair

    hf, model = make_pair(JETMOE, tmp_path, seed=1)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    with_vars = model.state_dict(keep_vars=True)
    assert with_vars["lm_head.weight"] is with_vars["model.embed_tokens.weight"]
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": (t := torch.randint(1, 97, (10,), generator=g).tolist()), "labels": t} for _ in range(8)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2, report_to=[], use_cpu=True,
        save_strategy="steps", save_steps=2, logging_steps=1, learning_rate=1e-2)
    transformers.Trainer(model=model.train(), args=args, train_dataset=rows).train()
    weights = safetensors.torch.load_file(tmp_path / "run" / "checkpoint-2" / "model.safetensors")
    assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    hf.load_state_dict(weights, strict=True)
    ids = torch.tensor([rows[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, model.eval()(ids).logits, rtol=1e-4, atol=1e-5)
    args.max_steps = 3
    resumed = transformers.Trainer(model=type(model)(model.config), args=args, train_dataset=rows)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.state.global_step == 3


@pytest.mark.parametrize("arch_name", ["phimoe", "jetmoe"])
def test_transformers_trainer_with_mixed_precision(arch_name, tmp_path):
    """Transformers' Trainer with bf16=True (autocast; accelerate casts the outputs to float32 by
    rebuilding them from a dict, which moetorch's outputs take as Transformers' do): the losses of
    Transformers' model with the same weights, to bf16's rounding."""
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))
    from archs import JETMOE, PHIMOE
    from parity import make_pair

    arch = PHIMOE if arch_name == "phimoe" else JETMOE
    hf, ours = make_pair(arch, tmp_path, seed=2, **({"router_jitter_noise": 0.0} if arch is PHIMOE else {}))
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": (t := torch.randint(1, 97, (10,), generator=g).tolist()), "labels": t} for _ in range(8)]
    losses = []
    for model in (hf, ours):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2, report_to=[], use_cpu=True,
            bf16=True, save_strategy="no", logging_steps=1, seed=0)
        trainer = transformers.Trainer(model=model.train(), args=args, train_dataset=rows)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert losses[1] == pytest.approx(losses[0], rel=2e-3)


def test_transformers_trainer_accumulates_a_classifier_as_the_mean(tmp_path):
    """Transformers' sequence classifier takes loss keywords that its loss ignores, so its Trainer
    neither divides by the accumulation steps nor passes a token count: its logged losses are
    gradient_accumulation_steps times the mean. moetorch's classifier takes none, and the Trainer
    averages (docs/differences.md); with AdamW the weights come out the same to rounding."""
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))
    from archs import JETMOE
    from parity import make_pair

    hf, ours = make_pair(JETMOE, tmp_path, head="seq_cls", seed=2, num_labels=3)
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(1, 97, (10,), generator=g).tolist(), "labels": i % 3} for i in range(8)]
    losses = []
    for model in (hf, ours):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=2, learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0)
        trainer = transformers.Trainer(model=model.train(), args=args, train_dataset=rows)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert losses[1] == pytest.approx([x / 2 for x in losses[0]], rel=1e-4)
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, hf_params[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_transformers_trainer_over_two_processes(strategy):
    """Transformers' Trainer over two CPU processes (torchrun, gloo), data-parallel (DDP) or sharded
    (FSDP2, a shard per decoder layer): both models give the losses of Transformers' model with the
    same weights (tests/dist_trainer.py)."""
    script = Path(__file__).parent / "dist_trainer.py"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), strategy],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    losses = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("LOSSES "))[7:])
    for arch in ("tiny-phimoe", "tiny-jetmoe"):
        want, got = losses[f"{arch}/transformers"], losses[f"{arch}/moetorch"]
        assert len(got) == 2 and got == pytest.approx(want, rel=1e-5), arch


@pytest.mark.parametrize("arch", ["phimoe", "jetmoe"])
def test_trainer_over_two_processes(tmp_path, arch):
    """moetorch's Trainer under torchrun (2 CPU processes, gloo; tests/dist_train.py): the losses,
    held-out losses and weights of one process at twice the batch size; a run stopped and resumed
    equals the uninterrupted one exactly, each process's random draws included; SIGTERM to one
    process stops both after the same step with a checkpoint; a process that cannot start stops
    the other, which names its error; processes that would resume different checkpoints refuse to."""
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 64, 3000))
    (tmp_path / "model.json").write_text(json.dumps({**ARCHS[arch], "vocab_size": 64}))
    script = Path(__file__).parent / "dist_train.py"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                          str(tmp_path / "runs"), str(tmp_path / "ids.npy"), str(tmp_path / "model.json"), arch],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    results = dict(line.split(" ", 2)[1:] for line in run.stdout.splitlines() if line.startswith("RESULT "))
    results = {int(rank): json.loads(text) for rank, text in results.items()}
    assert set(results) == {0, 1}
    runs = tmp_path / "runs"

    # A: one process, batch 4 = two processes of batch 2 (the data order is global)
    quiet = {"router_aux_loss_coef": 0.0, "router_jitter_noise": 0.0} if arch == "phimoe" else {"aux_loss_coef": 0.0}
    one = Trainer(TrainingConfig(
        model=str(tmp_path / "model.json"), data=str(tmp_path / "ids.npy"), output_dir=str(tmp_path / "one"), seq_len=16,
        batch_size=4, grad_accum=2, max_steps=4, warmup_steps=1, lr=3e-3, eval_every=2, save_every=2, log_every=1,
        progress=False, eval_fraction=0.2, model_overrides=quiet))
    one.train()
    for event, keys in (("train", ("loss", "grad_norm", "lr", "tokens")), ("eval", ("eval_loss",))):
        ours, single = records(runs / "A", event), records(tmp_path / "one", event)
        assert [r["step"] for r in ours] == [r["step"] for r in single] and ours
        for a, b in zip(ours, single):
            for k in keys:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (event, a["step"], k)
    assert [r["expert_load"] for r in records(runs / "A", "train")] == \
        [r["expert_load"] for r in records(tmp_path / "one", "train")]
    weights = AutoModelForCausalLM.from_pretrained(runs / "A" / "latest").state_dict()
    for name, p in one.model.state_dict().items():
        # A key projection's bias (PhiMoE's) gets no gradient but rounding: it adds q.b to every
        # score of a query, which the softmax takes away. AdamW turns that noise into updates of up
        # to lr * |g| / eps a step, and the two runs' gradient sums round otherwise. Elsewhere a weight
        # whose gradient is small against its rounding moves a few 1e-6 apart in 4 steps at lr 3e-3.
        tol = dict(rtol=0.0, atol=1e-4) if name.endswith("k_proj.bias") else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(weights[name], p, **tol, msg=name)
    assert records(runs / "A", "start")[0]["processes"] == 2

    # B and C: stopped after step 3, resumed at the checkpoint of step 2, and equal to B bit for bit
    assert results[0]["C_resumed_at"] == results[1]["C_resumed_at"] == 2
    keys = ("step", "loss", "aux_loss", "grad_norm", "lr", "expert_load")
    assert [tuple(r[k] for k in keys) for r in records(runs / "C", "train")] == \
        [tuple(r[k] for k in keys) for r in records(runs / "B", "train")]
    b = AutoModelForCausalLM.from_pretrained(runs / "B" / "latest").state_dict()
    for name, p in AutoModelForCausalLM.from_pretrained(runs / "C" / "latest").state_dict().items():
        assert torch.equal(b[name], p), name
    state = torch.load(runs / "B" / "latest" / ckpt.STATE_FILE, weights_only=True)
    assert len(state["rng_ranks"]) == 2 and not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])

    # D: SIGTERM to process 1 in step 2
    for rank in (0, 1):
        assert results[rank]["D"]["interrupted"] == "SIGTERM" and results[rank]["D"]["step"] == 2
        assert results[rank]["D_handlers_restored"]
    assert ckpt.latest_checkpoint(runs / "D").name == "checkpoint-2"

    # F: process 1 sees an output_dir without the checkpoint (another machine, no shared file system)
    for rank in (0, 1):
        assert results[rank]["F"].startswith("TrainingConfigError: the processes did not resume the same checkpoint")
        assert "process 0: checkpoint-2 (step 2, data position 16); process 1: no checkpoint" in results[rank]["F"]

    # E: process 1's data is missing
    assert results[1]["E"].startswith("FileNotFoundError") and "missing.npy" in results[1]["E"]
    assert results[0]["E"].startswith("PeerFailed: process 1 of 2 failed: FileNotFoundError") and \
        "missing.npy" in results[0]["E"]


def test_process_group_devices_and_environment(monkeypatch):
    """What each process trains on, and the options that cannot work under torchrun, named."""
    from moetorch.train.distributed import Group

    two = Group(rank=1, world=2, local_rank=1)
    assert two.device("cpu") == torch.device("cpu") and Group.single().device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device: 'cuda:0' with 2 processes; pass auto or cuda"):
        two.device("cuda:0")
    if not torch.cuda.is_available():
        assert two.device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="device: 'cuda' asked for, but CUDA is not available"):
            two.device("cuda")
    with pytest.raises(KeyError):
        Group.single().agree(KeyError("raised where it happened"))
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="environment variable WORLD_SIZE='two' is not an integer"):
        Group.from_environment("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert Group.from_environment("cpu") == Group.single()


def test_process_group_joined_by_one_rule(monkeypatch):
    """Joining torchrun's group: NCCL for a process on a GPU (made current first), gloo on the
    CPU, the timeout passed on, host messages over a gloo group of their own; a process whose
    LOCAL_RANK has no GPU fails before joining, naming the counts. A group the program made itself
    with NCCL: its GPU made current, and `cpu` refused. (Mocked CUDA and torch.distributed.)"""
    from datetime import timedelta

    import moetorch.train.distributed as D

    calls = []
    monkeypatch.setattr(D, "_control", None)
    monkeypatch.setattr(D.atexit, "register", lambda f: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(D.dist, "init_process_group",
                        lambda backend, timeout: calls.append(("init", backend, timeout)))
    monkeypatch.setattr(D.dist, "new_group", lambda backend, timeout: calls.append(("new_group", backend)) or "g")
    monkeypatch.setattr(D.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(D.dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")

    group = D.Group.from_environment("auto", timeout=120)
    assert (group.rank, group.world, group.local_rank, group.owned, group.control) == (1, 2, 1, True, "g")
    assert calls == [("set_device", torch.device("cuda:1")), ("init", "nccl", timedelta(seconds=120)),
                     ("new_group", "gloo")]
    assert group.device("auto") == torch.device("cuda:1")
    calls.clear()
    monkeypatch.setattr(D, "_control", None)
    D.Group.from_environment("cpu")
    assert calls == [("init", "gloo", timedelta(seconds=D.DEFAULT_TIMEOUT_S)), ("new_group", "gloo")]
    calls.clear()
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ValueError, match="process 1 has LOCAL_RANK 3, but 2 GPU.s. are visible to it"):
        D.Group.from_environment("auto")
    with pytest.raises(ValueError, match="device: 'cuda:1' with 2 processes"):
        D.Group.from_environment("cuda:1")
    assert calls == []  # neither joined

    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setattr(D, "_control", None)
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    # a group made without naming a backend: gloo for CPU tensors, NCCL for CUDA ones
    monkeypatch.setattr(D.dist, "get_backend_config", lambda: "cpu:gloo,cuda:nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    group = D.Group.from_environment("auto")
    assert (group.rank, group.local_rank, group.owned) == (1, 1, False)
    assert calls == [("set_device", torch.device("cuda:1")), ("new_group", "gloo")]
    with pytest.raises(ValueError, match="device: 'cpu' with the NCCL process group this program made"):
        D.Group.from_environment("cpu")


def test_ddp_timeout_option(tmp_path, tok_dir, corpus):
    assert make_config(tmp_path, tok_dir, corpus).ddp_timeout == 1800
    for bad in (0, -5, float("inf"), float("nan"), "60", True):
        with pytest.raises(TrainingConfigError, match="ddp_timeout must be a positive number of seconds"):
            make_config(tmp_path, tok_dir, corpus, ddp_timeout=bad)
    with pytest.raises(SystemExit):
        cli_main(["train", "--output-dir", str(tmp_path / "r"), "--ddp-timeout", "soon"])


def test_rng_of_the_training_device_only(caplog):
    """A checkpoint keeps the RNG state of the GPU it trained on (not of every visible GPU); one
    trained on a GPU and resumed on the CPU says that the GPU's draws do not replay."""
    state = ckpt.capture_rng(torch.device("cpu"))
    assert "cuda_device" not in state and "cuda" not in state
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    state = ckpt.capture_rng(torch.device("cpu"))
    torch.rand(7)
    with caplog.at_level("WARNING", logger="moetorch"):
        ckpt.restore_rng({**state, "cuda_device": torch.zeros(16, dtype=torch.uint8)}, torch.device("cpu"))
    assert torch.equal(torch.rand(3), want)
    assert "trained on a GPU and resumes on cpu: the GPU's random draws do not replay" in caplog.text


def test_resume_with_another_process_count_warns(tmp_path, tok_dir, corpus, caplog):
    """A checkpoint saved by two processes (its `rng_ranks`) resumed by one: the data goes on from
    its position, and a warning says the random draws do not replay."""
    cfg = make_config(tmp_path, tok_dir, corpus, save_every=2)
    Trainer(cfg).train(until_step=2)
    state_file = tmp_path / "checkpoint-2" / ckpt.STATE_FILE
    state = torch.load(state_file, weights_only=True)
    state["rng_ranks"] = [state["rng"], state["rng"]]
    torch.save(state, state_file)
    with caplog.at_level("WARNING", logger="moetorch"):
        resumed = Trainer(cfg.replace(resume=True))
    assert "saved by 2 process(es) and resumes in 1" in caplog.text and "do not replay" in caplog.text
    assert resumed.step == 2 and resumed.data_position == state["data_position"]
    assert resumed.train()["step"] == 6


def test_cli_train_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 -m moetorch train ...`: one summary line (process 0's), one
    copy of each warning, a checkpoint both processes trained."""
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 64, 2000))
    (tmp_path / "model.json").write_text(json.dumps({**PHI, "vocab_size": 64}))
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "moetorch", "train",
         "--output-dir", str(tmp_path / "run"), "--model", str(tmp_path / "model.json"), "--data",
         str(tmp_path / "ids.npy"), "--seq-len", "16", "--batch-size", "2", "--max-steps", "2", "--progress", "false"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    summary = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(summary) == 1 and summary[0]["step"] == 2 and summary[0]["tokens"] == 2 * 2 * 2 * 16
    assert run.stderr.count("warmup_steps 100 > max_steps 2") == 1 and run.stderr.count("training PhimoeForCausalLM") == 1
    assert "on 2 processes (cpu)" in run.stderr
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "checkpoint-2"


def test_token_cache_is_keyed_by_the_tokenizer_object(tmp_path, tok_dir, corpus):
    """A tokenizer passed as an object (no files to hash) keys the tokenized-corpus cache by its
    own vocabulary: another tokenizer with the same EOS id tokenizes again instead of reading the
    first one's tokens. Oracle: the second tokenizer's own tokenization, with no cache."""
    from moetorch.train import data as train_data

    first = Tokenizer.from_pretrained(tok_dir)
    other = Tokenizer.from_pretrained(train_tokenizer(str(corpus), tmp_path / "tok2", vocab_size=300, show_progress=False))
    assert first.eos_token_id == other.eos_token_id and len(first) != len(other)
    text = train_data.text_corpus(str(corpus))
    cache = tmp_path / "cache"
    for tok in (first, other):
        got, _, _ = train_data._tokenized_text(text, tok, "none", 0.0, cache, [], False)
        want = train_data.tokenize_files(text.files, tok, "Tokenizing", False)
        np.testing.assert_array_equal(np.asarray(got), want)


def test_resume_options_logs_and_data_edges(tmp_path, tok_dir, corpus, monkeypatch, caplog, capsys, python_ctrl_c):
    """A --train-config on resume changes its own keys only (the others keep the resumed run's, not
    the defaults); `--resume auto` with no checkpoint starts afresh from the flags given; a stop
    by signal logs the steps since the last record; a fraction split keeps a training window; a
    glob takes text files only; train-tokenizer names bad numbers."""
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 64, 2000))
    (tmp_path / "model.json").write_text(json.dumps({**PHI, "vocab_size": 64, "num_hidden_layers": 1}))
    run = tmp_path / "run"
    base = ["train", "--output-dir", str(run), "--model", str(tmp_path / "model.json"), "--data",
            str(tmp_path / "ids.npy"), "--seq-len", "16", "--batch-size", "2", "--max-steps", "3",
            "--warmup-steps", "1", "--progress", "false"]
    assert cli_main(base) == 0
    (tmp_path / "tc.json").write_text(json.dumps({"lr": 0.002, "max_steps": 5}))
    assert cli_main(["train", "--output-dir", str(run), "--resume", "--train-config", str(tmp_path / "tc.json"),
                     "--progress", "false"]) == 0
    saved = json.loads((ckpt.latest_checkpoint(run) / "training_config.json").read_text())
    assert (saved["seq_len"], saved["batch_size"], saved["warmup_steps"], saved["lr"], saved["max_steps"]) == \
        (16, 2, 1, 0.002, 5)

    fresh = tmp_path / "fresh"  # an attempt that saved no checkpoint left its config behind
    fresh.mkdir()
    (fresh / "training_config.json").write_text(TrainingConfig(model="tiny-jetmoe", data="stdlib").to_json())
    with caplog.at_level("WARNING", logger="moetorch"):
        assert cli_main([*base[:2], str(fresh), *base[3:], "--resume", "auto", "--max-steps", "1"]) == 0
    assert "is not used" not in caplog.text
    assert records(fresh, "start")[0]["model_type"] == "phimoe"

    _signal_at(monkeypatch, {2: [signal.SIGTERM]})
    stopped = tmp_path / "stopped"
    assert cli_main([*base[:2], str(stopped), *base[3:], "--log-every", "1000"]) == 143
    monkeypatch.undo()
    assert [r["step"] for r in records(stopped, "train")] == [2]

    np.save(tmp_path / "short.npy", np.arange(31 * 16) % 64)
    trainer = Trainer(_tiny_run(tmp_path / "frac", tmp_path, data=str(tmp_path / "short.npy"), eval_split="fraction",
                                eval_fraction=0.999))
    assert len(trainer.data.train) == 1 and len(trainer.data.eval) == 30

    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("text " * 50)
    np.save(tmp_path / "mixed" / "b.npy", np.arange(10))
    assert [f.name for f in text_corpus(str(tmp_path / "mixed" / "*"), "data").files] == ["a.txt"]
    # document_attention with a document end that never occurs in the data: said, not silently ignored
    caplog.clear()
    with caplog.at_level("WARNING", logger="moetorch"):
        Trainer(_tiny_run(tmp_path / "docs", tmp_path, data=str(tmp_path / "short.npy"), document_attention=True,
                          model_overrides={"eos_token_id": 99}, model={**PHI, "vocab_size": 128, "num_hidden_layers": 1}))
    assert "the document end (token 99, the model config's eos_token_id) never occurs" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="moetorch"):
        Trainer(_tiny_run(tmp_path / "docs2", tmp_path, data=str(tmp_path / "short.npy"), document_attention=True,
                          model_overrides={"eos_token_id": 5}))
    assert "never occurs" not in caplog.text
    from moetorch.train.data import contains

    assert contains(np.arange(10), 9, chunk=3) and not contains(np.arange(10), 10, chunk=3)
    capsys.readouterr()
    for flag, value, message in (("--min-frequency", "-3", "must be at least 0, got -3"),
                                 ("--model-max-length", "-5", "must be at least 1, got -5"),
                                 ("--max-files", "0", "must be at least 1, got 0"),
                                 ("--vocab-size", "100", "must be at least 264 (256 byte symbols + 8 special tokens)")):
        with pytest.raises(SystemExit) as exited:  # usage errors naming the flag
            cli_main(["train-tokenizer", "--data", str(corpus), "--output", str(tmp_path / "tok"), flag, value])
        assert exited.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="model_max_length must be a positive integer"):  # the library's own check
        train_tokenizer(str(corpus), tmp_path / "tok", model_max_length=-5, show_progress=False)
    # an empty corpus trained a tokenizer of the byte symbols alone and exited 0; a missing file is said so
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(SystemExit, match="data: .*empty.* holds no text \\(1 file\\(s\\), all empty\\)"):
        cli_main(["train-tokenizer", "--data", str(tmp_path / "empty"), "--output", str(tmp_path / "tok")])
    assert not (tmp_path / "tok").exists()
    with pytest.raises(SystemExit, match="data: .*missing.txt': no such file or directory"):
        cli_main(["train-tokenizer", "--data", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "tok")])


@pytest.mark.parametrize("arch_name", ["phimoe", "jetmoe"])
def test_transformers_trainer_resumes_a_checkpoint_transformers_wrote(arch_name, tmp_path):
    """Transformers' Trainer resuming, with a moetorch model, a checkpoint that Transformers' model
    wrote (its save_pretrained: PhiMoE's original per-expert names, JetMoE without the tied head):
    the Trainer loads it with load_state_dict(strict=False), which takes those names, and reads
    `_keys_to_ignore_on_save` where a tensor is missing. The resumed run ends where an
    uninterrupted run of the same model ends."""
    import sys as _sys

    import safetensors.torch

    _sys.path.insert(0, str(Path(__file__).parent))
    from archs import JETMOE, PHIMOE
    from parity import make_pair

    arch = PHIMOE if arch_name == "phimoe" else JETMOE
    hf, ours = make_pair(arch, tmp_path, seed=3, **({"router_jitter_noise": 0.0} if arch is PHIMOE else {}))
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": (t := torch.randint(1, 97, (10,), generator=g).tolist()), "labels": t} for _ in range(8)]

    def args(out, steps):
        return transformers.TrainingArguments(
            output_dir=str(tmp_path / out), per_device_train_batch_size=4, max_steps=steps, report_to=[],
            use_cpu=True, save_strategy="steps", save_steps=1, learning_rate=1e-1, seed=0, disable_tqdm=True,
            optim="sgd")  # (AdamW would blow rounding noise up to full steps where a gradient is zero)

    transformers.Trainer(model=hf.train(), args=args("hf", 2), train_dataset=rows).train()
    written = safetensors.torch.load_file(tmp_path / "hf" / "checkpoint-1" / "model.safetensors")
    assert arch is JETMOE or any(".block_sparse_moe.experts.0.w1." in k for k in written)
    loaded = type(ours)(ours.config)
    if arch is PHIMOE:  # (a piece missing is an error that names the parameter, where strict)
        short = {k: v for k, v in written.items() if ".layers.1.block_sparse_moe.experts.2.w3." not in k}
        with pytest.raises(RuntimeError, match=r"model.layers.1.mlp.experts.gate_up_proj is stored as 8 per-expert "
                                               r"pieces, of which the state dict holds 7"):
            loaded.load_state_dict(short)
    loaded.load_state_dict(written, strict=arch is PHIMOE)
    hf_at_1 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "checkpoint-1")
    for name, value in hf_at_1.state_dict().items():  # (Transformers' model holds the fused names in memory)
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0, msg=name)
    resumed = type(ours)(ours.config)
    resumed.load_state_dict(start)
    trainer = transformers.Trainer(model=resumed.train(), args=args("resumed", 2), train_dataset=rows)
    trainer.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-1"))
    ours.load_state_dict(start)
    transformers.Trainer(model=ours.train(), args=args("whole", 2), train_dataset=rows).train()
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
