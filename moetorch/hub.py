"""Hub repositories by name: `from_pretrained("microsoft/Phi-3.5-MoE-instruct")` as in Transformers.

A name that is not a local directory is fetched with huggingface_hub's `snapshot_download` into
the Hugging Face cache that Transformers uses (a model Transformers downloaded is not downloaded
again), and read from there. Only the files the caller reads are fetched: a model's JSON (configs,
tokenizer, indexes), safetensors, chat templates and `custom_generate/`; a config's or
tokenizer's files alone, without the weights. With `HF_HUB_OFFLINE=1` or `local_files_only=True`,
only the cache is read.
"""

from __future__ import annotations

import os
from typing import Any

# Transformers' `from_pretrained` options that say where and how to fetch a repository (and where in it:
# `subfolder`, for a local directory too)
HUB_OPTIONS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder")
# what save_pretrained(push_to_hub=True) takes for the upload, as in Transformers
PUSH_OPTIONS = ("repo_id", "token", "private", "commit_message", "commit_description", "create_pr", "revision", "tags")
PATTERNS = ["*.json", "*.safetensors", "*.jinja", "custom_generate/*"]  # a model's (the default)
# PyTorch .bin weights (at any depth: a subfolder's too), where a repository has no safetensors
BIN_PATTERNS = ["*pytorch_model*.bin", "*pytorch_model*.bin.index.json"]
CONFIG_PATTERNS = ["*.json"]  # configs, generation configs
TOKENIZER_PATTERNS = ["*.json", "*.jinja"]
ADAPTER_PATTERNS = ["*.json", "adapter_model.safetensors", "adapter_model.bin"]
CUSTOM_GENERATE_PATTERNS = ["custom_generate/*"]


def hub_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the hub options out of `kwargs` (in place) and return them."""
    return {k: kwargs.pop(k) for k in HUB_OPTIONS if k in kwargs}


def snapshot(name: str, *, patterns: list[str] | None = None, revision: str | None = None,
             cache_dir: str | os.PathLike | None = None, token: bool | str | None = None,
             local_files_only: bool = False, force_download: bool = False,
             use_safetensors: bool | None = None) -> str:
    """The local directory of Hub repository `name` at `revision` (cached, or downloaded now),
    with the files that match `patterns` (default: a model's, `PATTERNS`; their PyTorch .bin
    weights instead of safetensors with `use_safetensors=False`, or where it has no safetensors).
    Raises FileNotFoundError that says why where `name` is neither a local directory nor a
    repository that can be had."""
    not_local = f"{name!r} is not a local directory"
    try:
        import huggingface_hub
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id
    except ImportError as e:
        raise FileNotFoundError(f"{not_local}, and huggingface_hub, which fetches Hub repositories, is not "
                                "installed (pip install huggingface_hub)") from e
    try:
        validate_repo_id(name)
    except HFValidationError as e:
        raise FileNotFoundError(f"{not_local} (nor a Hub repository name: {e})") from e
    try:
        fetch = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only,
                     force_download=force_download, library_name="moetorch")
        if patterns is None and use_safetensors is False:
            patterns = [p for p in PATTERNS if p != "*.safetensors"] + BIN_PATTERNS
        folder = huggingface_hub.snapshot_download(name, allow_patterns=patterns or PATTERNS, **fetch)
        if patterns is None and use_safetensors is None and not any(
                f.endswith(".safetensors") for _, _, files in os.walk(folder) for f in files):
            # a repository of PyTorch .bin weights only (older checkpoints): those, as Transformers falls back
            folder = huggingface_hub.snapshot_download(name, allow_patterns=BIN_PATTERNS, **fetch)
        return folder
    except Exception as e:  # offline and not cached, unknown, gated, unreachable: each says so
        raise FileNotFoundError(f"{not_local}, and the Hub repository of that name could not be had: "
                                f"{type(e).__name__}: {e}") from e


def upload(directory: str | os.PathLike, repo_id: str, *, token: bool | str | None = None, private: bool | None = None,
           commit_message: str | None = None, commit_description: str | None = None, revision: str | None = None,
           create_pr: bool = False, tags: list[str] | None = None, what: str = "files"):
    """Upload `directory` as one commit to Hub repository `repo_id`, created where missing (with
    `private`), as Transformers' push_to_hub does. `tags` go into a README.md model card where the
    directory has none. Returns huggingface_hub's CommitInfo (a str: the commit's URL)."""
    from huggingface_hub import HfApi

    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"push_to_hub: repo_id must name a Hub repository, got {repo_id!r}")
    if tags and not os.path.exists(os.path.join(directory, "README.md")):
        card = "---\ntags:\n" + "".join(f"- {t}\n" for t in tags) + "---\n"
        with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo.repo_id, folder_path=directory, revision=revision, create_pr=create_pr,
                             commit_message=commit_message or f"Upload {what}", commit_description=commit_description)


class PushToHubMixin:
    """`push_to_hub` for what has a `save_pretrained` (models, configs, tokenizers, generation
    configs), as in Transformers: saved to a temporary directory, uploaded as one commit."""

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
                    create_pr: bool = False, max_shard_size: int | str | None = "50GB",
                    tags: list[str] | None = None):
        """Save to a temporary directory and upload it as one commit to Hub repository `repo_id`
        (created where missing). Returns huggingface_hub's CommitInfo (a str: the commit's URL)."""
        import inspect
        import tempfile

        with tempfile.TemporaryDirectory() as directory:
            if "max_shard_size" in inspect.signature(self.save_pretrained).parameters:  # a model's
                self.save_pretrained(directory, max_shard_size=max_shard_size)
            else:
                self.save_pretrained(directory)
            return upload(directory, repo_id, token=token, private=private, commit_message=commit_message,
                          commit_description=commit_description, revision=revision, create_pr=create_pr, tags=tags,
                          what=type(self).__name__)
