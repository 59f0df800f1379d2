"""Hub repository names, as in a Transformers script: `from_pretrained("org/name")` resolves
through the Hugging Face cache (tests run with HF_HUB_OFFLINE=1 and build the repositories in a
cache directory, laid out as huggingface_hub lays it out), and Transformers, loading the same name
from the same cache, is the oracle."""

from __future__ import annotations

import json
import os
import shutil
from fnmatch import fnmatch

import huggingface_hub
import peft
import pytest
import torch
import transformers
from huggingface_hub.utils import filter_repo_objects
from parity import close, make_inputs

import moetorch
from moetorch import hub
from moetorch.defaults import ASSETS

SHA = "0123456789abcdef0123456789abcdef01234567"
OTHER_SHA = "89abcdef0123456789abcdef0123456789abcdef"


def cached_repo(cache, name: str, source, sha: str = SHA, ref: str = "main"):
    """Put `source`'s files into `cache` as huggingface_hub caches repository `name` at `ref`."""
    root = cache / ("models--" + name.replace("/", "--"))
    shutil.copytree(source, root / "snapshots" / sha, dirs_exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(sha)
    return root / "snapshots" / sha


@pytest.fixture
def cache(tmp_path):
    cached_repo(tmp_path / "cache", "someone/tiny-phimoe", ASSETS / "tiny-phimoe")
    return tmp_path / "cache"


def test_models_configs_and_tokenizers_load_by_hub_name_from_the_cache(cache):
    name, kw = "someone/tiny-phimoe", dict(cache_dir=cache)
    want = transformers.AutoModelForCausalLM.from_pretrained(name, **kw)
    for got in (moetorch.AutoModelForCausalLM.from_pretrained(name, **kw),
                moetorch.PhimoeForCausalLM.from_pretrained(name, local_files_only=True, **kw)):
        assert type(got) is moetorch.PhimoeForCausalLM
        assert got.name_or_path == want.name_or_path == name
        ids, mask = make_inputs(got.config.vocab_size, 2, 9, "left", seed=3)
        with torch.no_grad():
            close(got(input_ids=ids, attention_mask=mask).logits, want(input_ids=ids, attention_mask=mask).logits,
                  "logits")
    text = "def fibonacci(n):\n    return n"
    assert moetorch.AutoTokenizer.from_pretrained(name, **kw)(text)["input_ids"] == \
        transformers.AutoTokenizer.from_pretrained(name, **kw)(text)["input_ids"]
    assert moetorch.AutoConfig.from_pretrained(name, **kw).to_json_string() == \
        moetorch.AutoConfig.from_pretrained(ASSETS / "tiny-phimoe").to_json_string()  # (to_dict: with the path)
    assert moetorch.GenerationConfig.from_pretrained(name, **kw).to_dict() == \
        moetorch.GenerationConfig.from_pretrained(ASSETS / "tiny-phimoe").to_dict()
    assert "revision" not in moetorch.AutoConfig.from_pretrained(name, revision=SHA, **kw).to_dict()


def test_the_pipeline_takes_a_hub_name(cache):
    kw = dict(model_kwargs={"cache_dir": cache}, max_new_tokens=8, do_sample=False)
    want = transformers.pipeline("text-generation", model="someone/tiny-phimoe", **kw)("def f(x):")
    got = moetorch.pipeline("text-generation", model="someone/tiny-phimoe", **kw)("def f(x):")
    assert got == want


def test_revisions_are_the_cached_ones(cache, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(ASSETS / "tiny-phimoe", changed)
    config = json.loads((changed / "config.json").read_text())
    config["router_jitter_noise"] = 0.25
    (changed / "config.json").write_text(json.dumps(config))
    cached_repo(cache, "someone/tiny-phimoe", changed, sha=OTHER_SHA, ref="v2")
    name = "someone/tiny-phimoe"
    assert moetorch.AutoConfig.from_pretrained(name, cache_dir=cache).router_jitter_noise != 0.25
    for revision in ("v2", OTHER_SHA):
        model = moetorch.AutoModelForCausalLM.from_pretrained(name, cache_dir=cache, revision=revision)
        assert model.config.router_jitter_noise == 0.25
    with pytest.raises(FileNotFoundError, match="someone/tiny-phimoe"):
        moetorch.AutoModelForCausalLM.from_pretrained(name, cache_dir=cache, revision="v3")


def test_names_that_are_neither_directories_nor_cached_repositories_say_so(cache):
    for load in (moetorch.AutoModelForCausalLM.from_pretrained, moetorch.PhimoeForCausalLM.from_pretrained,
                 moetorch.AutoConfig.from_pretrained, moetorch.AutoTokenizer.from_pretrained,
                 moetorch.GenerationConfig.from_pretrained):
        with pytest.raises(FileNotFoundError, match=r"'someone/other' is not a local directory, and the Hub "
                                                    r"repository of that name could not be had.*tiny-phimoe"):
            load("someone/other", cache_dir=cache)
        with pytest.raises(FileNotFoundError, match=r"not a local directory \(nor a Hub repository name"):
            load("/no/such/directory", cache_dir=cache)


def test_an_adapter_loads_by_hub_name_and_its_base_too(cache, tmp_path):
    base = transformers.AutoModelForCausalLM.from_pretrained("someone/tiny-phimoe", cache_dir=cache)
    torch.manual_seed(0)
    made = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                     target_modules=["q_proj", "v_proj"]))
    made.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "someone/tiny-phimoe"  # PEFT records the Hub name
    cached_repo(cache, "someone/tiny-lora", tmp_path / "adapter")
    ids, mask = make_inputs(base.config.vocab_size, 2, 9, "left", seed=3)
    with torch.no_grad():
        want = made.eval()(input_ids=ids, attention_mask=mask).logits
        got = moetorch.AutoModelForCausalLM.from_pretrained("someone/tiny-lora", cache_dir=cache)
        assert got.name_or_path == "someone/tiny-phimoe" and got.active_adapters() == ["default"]
        close(got(input_ids=ids, attention_mask=mask).logits, want, "adapter by name, base by name")
        model = moetorch.PhimoeForCausalLM.from_pretrained(ASSETS / "tiny-phimoe")
        model.load_adapter("someone/tiny-lora", cache_dir=cache)
        close(model(input_ids=ids, attention_mask=mask).logits, want, "load_adapter by name")


def test_custom_generate_from_the_hub_needs_trust_remote_code(cache, tmp_path, monkeypatch):
    repo = tmp_path / "gen"
    (repo / "custom_generate").mkdir(parents=True)
    (repo / "custom_generate" / "generate.py").write_text(
        "def generate(model, inputs=None, **kwargs):\n    return inputs.flip(-1)\n")
    cached_repo(cache, "someone/flip", repo)
    model = moetorch.PhimoeForCausalLM.from_pretrained(ASSETS / "tiny-phimoe")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(OSError, match="pass trust_remote_code=True"):
        model.generate(ids, custom_generate="someone/flip")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # the default cache
    assert model.generate(ids, custom_generate="someone/flip", trust_remote_code=True).tolist() == [[7, 6, 5]]


def test_hub_options_reach_the_download(monkeypatch, tmp_path):
    """Online (not reachable here): the options and the file patterns go to snapshot_download."""
    calls = []

    def fake(name, **kw):
        calls.append((name, kw))
        return str(ASSETS / "tiny-phimoe")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    model = moetorch.AutoModelForCausalLM.from_pretrained(
        "microsoft/Phi-3.5-MoE-instruct", revision="r1", token="t", force_download=True, cache_dir=tmp_path)
    assert model.name_or_path == "microsoft/Phi-3.5-MoE-instruct"
    assert {name for name, _ in calls} == {"microsoft/Phi-3.5-MoE-instruct"}
    for _, kw in calls:
        assert (kw["revision"], kw["token"], kw["force_download"], kw["cache_dir"]) == ("r1", "t", True, tmp_path)
    # the Auto class reads the config alone, the model class fetches the weights too
    assert [kw["allow_patterns"] for _, kw in calls] == [hub.CONFIG_PATTERNS, hub.PATTERNS]
    calls.clear()  # a tokenizer, a config or a generation config fetches no weights
    moetorch.AutoTokenizer.from_pretrained("microsoft/Phi-3.5-MoE-instruct")
    moetorch.AutoConfig.from_pretrained("microsoft/Phi-3.5-MoE-instruct")
    moetorch.GenerationConfig.from_pretrained("microsoft/Phi-3.5-MoE-instruct")
    assert [kw["allow_patterns"] for _, kw in calls] == [hub.TOKENIZER_PATTERNS, *[hub.CONFIG_PATTERNS] * 3]
    assert not any(fnmatch("model-00001-of-00017.safetensors", p) for _, kw in calls for p in kw["allow_patterns"])


def test_the_patterns_fetch_what_moetorch_reads_and_nothing_else():
    reads = ["config.json", "generation_config.json", "model.safetensors", "model-00001-of-00017.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json", "chat_template.jinja", "adapter_config.json", "adapter_model.safetensors",
             "custom_generate/generate.py", "custom_generate/requirements.txt", "sub/config.json"]
    skips = ["pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json.bak", "model.gguf",
             "tokenizer.model", "modeling_phimoe.py", "README.md", "onnx/model.onnx", "sample_finetune.py"]
    assert list(filter_repo_objects(reads + skips, allow_patterns=hub.PATTERNS)) == reads


def test_the_cli_takes_a_hub_name(cache, monkeypatch, capsys):
    from moetorch import cli

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # the default cache
    assert cli.main(["generate", "--model", "someone/tiny-phimoe", "def f(x):", "--max-new-tokens", "4",
                     "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def f(x):")


class RecordingApi:
    """huggingface_hub.HfApi's two calls that push_to_hub makes, recorded (no network here): the
    files of each upload are read as they are uploaded."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        assert exist_ok
        self.calls.append(("create", repo_id, private, self.token))
        full = repo_id if "/" in repo_id else f"me/{repo_id}"  # the Hub puts a bare name in the user's namespace
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{full}")

    def upload_folder(self, repo_id, folder_path, **kw):
        import os

        files = sorted(os.path.relpath(os.path.join(d, f), folder_path) for d, _, fs in os.walk(folder_path) for f in fs)
        self.calls.append(("upload", repo_id, files, kw))
        return f"https://huggingface.co/{repo_id}/commit/1"


def test_push_to_hub_uploads_what_save_pretrained_writes(monkeypatch, tmp_path):
    RecordingApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    model = moetorch.PhimoeForCausalLM.from_pretrained(ASSETS / "tiny-phimoe")
    tok = moetorch.AutoTokenizer.from_pretrained(ASSETS / "tiny-phimoe")
    assert model.push_to_hub("me/tiny", private=True, token="t", commit_message="m", tags=["moe"]).endswith("/1")
    tok.push_to_hub("me/tiny")
    model.config.push_to_hub("me/tiny", create_pr=True)
    model.generation_config.push_to_hub("me/tiny", revision="dev")
    model.save_pretrained(tmp_path / "tiny-out", push_to_hub=True, commit_description="d")
    model.save_pretrained(tmp_path / "x", push_to_hub=True, repo_id="me/other")
    model.save_pretrained(tmp_path / "no-push", token="t")  # the push options alone push nothing

    model.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "tok")
    written = sorted(os.listdir(tmp_path / "saved"))
    creates = [c[1:] for c in RecordingApi.calls if c[0] == "create"]
    uploads = [c[1:] for c in RecordingApi.calls if c[0] == "upload"]
    assert creates == [("me/tiny", True, "t"), ("me/tiny", None, None), ("me/tiny", None, None),
                       ("me/tiny", None, None), ("tiny-out", None, None), ("me/other", None, None)]
    assert [u[0] for u in uploads] == ["me/tiny"] * 4 + ["me/tiny-out", "me/other"]
    assert uploads[0][1] == sorted([*written, "README.md"])  # a card with the tags
    assert uploads[0][2]["commit_message"] == "m"
    assert uploads[1][1] == sorted(os.listdir(tmp_path / "tok"))
    assert uploads[2][1] == ["config.json"] and uploads[2][2]["create_pr"] is True
    assert uploads[3][1] == ["generation_config.json"] and uploads[3][2]["revision"] == "dev"
    assert uploads[4][1] == written and uploads[4][2]["commit_description"] == "d"
    with pytest.raises(ValueError, match="repo_id must name a Hub repository"):
        tok.push_to_hub("")


def test_a_hub_name_loads_in_a_process_without_transformers(cache):
    """moetorch's own imports reach huggingface_hub's (Transformers, imported by the other tests,
    imports more of it): a fresh interpreter loads a cached repository by name."""
    import subprocess
    import sys

    code = ("import sys, moetorch; m = moetorch.AutoModelForCausalLM.from_pretrained('someone/tiny-phimoe', "
            f"cache_dir={str(cache)!r}); assert 'transformers' not in sys.modules; print(type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "PhimoeForCausalLM"


def test_subfolders_of_directories_and_hub_repositories(cache, tmp_path):
    """`subfolder` names a directory inside the checkpoint, for every loader, as in Transformers."""
    repo = tmp_path / "repo"
    shutil.copytree(ASSETS / "tiny-jetmoe", repo / "sub")
    cached_repo(cache, "someone/nested", repo)
    ids = torch.tensor([[5, 6, 7, 8]])
    want = transformers.AutoModelForCausalLM.from_pretrained(repo, subfolder="sub")
    for name, kw in ((repo, {}), ("someone/nested", {"cache_dir": cache})):
        got = moetorch.AutoModelForCausalLM.from_pretrained(name, subfolder="sub", **kw)
        assert type(got) is moetorch.JetMoeForCausalLM
        with torch.no_grad():
            close(got(ids).logits, want(ids).logits, f"model in a subfolder of {name}")
        assert moetorch.AutoConfig.from_pretrained(name, subfolder="sub", **kw).model_type == "jetmoe"
        assert "subfolder" not in moetorch.AutoConfig.from_pretrained(name, subfolder="sub", **kw).to_dict()
        assert moetorch.AutoTokenizer.from_pretrained(name, subfolder="sub", **kw)("def f():")["input_ids"] == \
            transformers.AutoTokenizer.from_pretrained(repo, subfolder="sub")("def f():")["input_ids"]
        assert moetorch.GenerationConfig.from_pretrained(name, subfolder="sub", **kw).to_dict() == \
            moetorch.GenerationConfig.from_pretrained(ASSETS / "tiny-jetmoe").to_dict()


def test_a_repository_of_bin_weights_alone_fetches_them(monkeypatch, tmp_path):
    """A repository without safetensors (an older checkpoint's pytorch_model.bin): after the
    model's files, its .bin files are fetched, and the model loads from them."""
    from safetensors.torch import load_file

    repo = tmp_path / "repo"
    shutil.copytree(ASSETS / "tiny-phimoe", repo)
    for f in repo.glob("*.safetensors"):
        torch.save(load_file(f), repo / "pytorch_model.bin")
        f.unlink()
    calls = []

    def fake(name, **kw):
        calls.append(kw["allow_patterns"])
        return str(repo)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    model = moetorch.PhimoeForCausalLM.from_pretrained("someone/old-phimoe")
    assert calls == [hub.PATTERNS, hub.BIN_PATTERNS]
    calls.clear()  # use_safetensors=False: the .bin weights in place of safetensors, at once
    moetorch.PhimoeForCausalLM.from_pretrained("someone/old-phimoe", use_safetensors=False)
    assert len(calls) == 1 and "*.safetensors" not in calls[0] and set(hub.BIN_PATTERNS) <= set(calls[0])
    want = moetorch.PhimoeForCausalLM.from_pretrained(ASSETS / "tiny-phimoe")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))
    names = ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"]
    assert list(filter_repo_objects([*names, "pytorch_model.bin.index.json.bak", "model.gguf"],
                                    allow_patterns=hub.BIN_PATTERNS)) == names
