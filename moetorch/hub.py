"""Hub repositories by name: `from_pretrained("microsoft/Phi-3.5-MoE-instruct")` as in Transformers.

A name that is not a local directory is fetched with huggingface_hub's `snapshot_download` into
the Hugging Face cache that Transformers uses (a model Transformers downloaded is not downloaded
again), and read from there. Only the files moetorch reads are fetched: JSON (configs,
tokenizers, indexes), safetensors, chat templates and `custom_generate/`. With `HF_HUB_OFFLINE=1`
or `local_files_only=True`, only the cache is read.
"""

from __future__ import annotations

import os
from typing import Any

# Transformers' `from_pretrained` options that say where and how to fetch a repository
HUB_OPTIONS = ("revision", "cache_dir", "token", "local_files_only", "force_download")
PATTERNS = ["*.json", "*.safetensors", "*.jinja", "custom_generate/*"]


def hub_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the hub options out of `kwargs` (in place) and return them."""
    return {k: kwargs.pop(k) for k in HUB_OPTIONS if k in kwargs}


def snapshot(name: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
             token: bool | str | None = None, local_files_only: bool = False, force_download: bool = False) -> str:
    """The local directory of Hub repository `name` at `revision` (cached, or downloaded now).
    Raises FileNotFoundError that says why where `name` is neither a local directory nor a
    repository that can be had."""
    not_local = f"{name!r} is not a local directory"
    try:
        import huggingface_hub
        from huggingface_hub.errors import HFValidationError
    except ImportError as e:
        raise FileNotFoundError(f"{not_local}, and huggingface_hub, which fetches Hub repositories, is not "
                                "installed (pip install huggingface_hub)") from e
    try:
        huggingface_hub.utils.validate_repo_id(name)
    except HFValidationError as e:
        raise FileNotFoundError(f"{not_local} (nor a Hub repository name: {e})") from e
    try:
        return huggingface_hub.snapshot_download(
            name, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only,
            force_download=force_download, allow_patterns=PATTERNS, library_name="moetorch")
    except Exception as e:  # offline and not cached, unknown, gated, unreachable: each says so
        raise FileNotFoundError(f"{not_local}, and the Hub repository of that name could not be had: "
                                f"{type(e).__name__}: {e}") from e
