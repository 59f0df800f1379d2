"""`generate(custom_generate=...)`, `generate(use_model_defaults=...)` and `generate(synced_gpus=...)`:
the parts of Transformers' `generate` that hand the decoding to someone else's code, choose which
defaults apply, or keep several processes stepping together.

- A callable replaces the decoding loop: `generate` prepares the prompt, cache, logits processors
  and stopping criteria as usual, then returns `fn(model, input_ids, logits_processor=...,
  stopping_criteria=..., generation_config=..., **model_kwargs)`. Keyword arguments of `generate`
  that the callable names (and the usual loop does not take) go to it.
- A string is a local directory holding `custom_generate/generate.py`, whose `generate(model, ...)`
  replaces `generate` whole and receives every argument of the call. `from_pretrained(path,
  trust_remote_code=True)` installs a checkpoint's own `custom_generate/generate.py` as the model's
  `generate`, as Transformers does.
- `use_model_defaults=False` (or a model whose generation config was saved before Transformers 4.50)
  runs a passed `generation_config` as given, with only the model's special tokens filled in.
- `synced_gpus=True` keeps a process whose rows have finished running forwards until every process
  of the default group has finished, so that sharded models (FSDP) meet in their collectives.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import os
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch

from ..defaults import checkpoint_path
from ..hub import CUSTOM_GENERATE_PATTERNS

CUSTOM_GENERATE_FILE = os.path.join("custom_generate", "generate.py")
CUSTOM_GENERATE_REQUIREMENTS = os.path.join("custom_generate", "requirements.txt")
# The parameters of the usual decoding loop (Transformers' `_sample`): a callable's other named
# parameters are its own options, taken out of generate()'s keyword arguments for it.
LOOP_PARAMETERS = frozenset(
    {"self", "model", "input_ids", "logits_processor", "stopping_criteria", "generation_config",
     "synced_gpus", "streamer", "model_kwargs"}
)
# Special tokens a passed generation_config takes from the model's when it runs without its defaults.
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


def own_arguments(fn: Callable) -> list[str]:
    """The named keyword parameters of a custom decoding callable beyond the usual loop's."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: nothing to route
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.name not in LOOP_PARAMETERS]


def _check_requirements(path: str) -> None:
    """Raise ImportError naming every requirement of `custom_generate/requirements.txt` that is
    missing or at a version outside its specifier."""
    req_file = os.path.join(path, CUSTOM_GENERATE_REQUIREMENTS)
    if not os.path.isfile(req_file):
        return
    from packaging.requirements import InvalidRequirement, Requirement

    problems = []
    with open(req_file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                req = Requirement(line)
            except InvalidRequirement as e:
                raise ValueError(f"{req_file}, line {n}: not a requirement ({e})") from None
            if req.marker is not None and not req.marker.evaluate():
                continue
            try:
                installed = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                problems.append(f"{req.name} (not installed)")
                continue
            if req.specifier and not req.specifier.contains(installed, prereleases=True):
                problems.append(f"{req.name}{req.specifier} (installed: {installed})")
    if problems:
        raise ImportError(f"{req_file} needs packages this environment lacks: {', '.join(problems)}")


def load_custom_generate(path: str | os.PathLike, trust_remote_code: bool = False) -> Callable:
    """The `generate` function of `path/custom_generate/generate.py`: a local directory, or with
    `trust_remote_code=True` a Hub repository, fetched into the Hugging Face cache (`moetorch.hub`)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        if not trust_remote_code:
            raise OSError(
                f"custom_generate={path!r} is not a local directory holding {CUSTOM_GENERATE_FILE}. To fetch "
                "a Hub repository's generation code and run it, pass trust_remote_code=True"
            )
        path = checkpoint_path(path, CUSTOM_GENERATE_PATTERNS)
    file = os.path.join(path, CUSTOM_GENERATE_FILE)
    if not os.path.isfile(file):
        raise OSError(f"{path!r} has no {CUSTOM_GENERATE_FILE}: there is no custom generate function to load")
    _check_requirements(path)
    name = "moetorch_custom_generate_" + hashlib.sha1(os.path.abspath(file).encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, "generate", None)
    if not callable(fn):
        raise AttributeError(f"{file} defines no `generate` function")
    return fn


def install_checkpoint_generate(model, path: str) -> None:
    """Make `path/custom_generate/generate.py`'s `generate` the model's (with trust_remote_code)."""
    if os.path.isfile(os.path.join(path, CUSTOM_GENERATE_FILE)):
        model.generate = functools.partial(load_custom_generate(path), model=model)


def _version(text: Any) -> tuple[int, ...] | None:
    """A version string's release numbers ((4, 43, 3) for "4.43.3"); None when absent or invalid."""
    if text is None:
        return None
    from packaging.version import InvalidVersion, Version

    try:
        return Version(str(text)).release
    except InvalidVersion:
        return None


def uses_model_defaults(flag: bool | None, model_generation_config) -> bool:
    """Whether a passed generation_config is completed from the model's: `flag` when given,
    otherwise unless the model's generation config was saved by a Transformers before 4.50."""
    if flag is not None:
        if not isinstance(flag, bool):
            raise TypeError(f"use_model_defaults must be True, False or None, got {flag!r}")
        return flag
    saved_by = _version(getattr(model_generation_config, "transformers_version", None))
    return saved_by is None or saved_by >= (4, 50)


def model_defaults_layer(model_generation_config, passed, use_defaults: bool) -> dict[str, Any]:
    """The model's settings that a call starts from, below `passed` (a GenerationConfig or None)."""
    items = model_generation_config.explicit_items()
    if passed is None or use_defaults:
        return items
    return {k: items[k] for k in SPECIAL_TOKENS if k in items and not passed.is_set(k)}


# ---- synced_gpus ---------------------------------------------------------------------------------
def _is_fsdp(model: torch.nn.Module) -> bool:
    """Whether any part of `model` is sharded by FSDP (either version)."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:
        return False
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def synced(flag: bool | None, model: torch.nn.Module) -> bool:
    """Whether this call steps together with the other processes: `flag` when given; by default
    when the model is sharded by FSDP over more than one process (as Transformers decides)."""
    dist = torch.distributed
    many = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if flag is None:
        return many and _is_fsdp(model)
    if not isinstance(flag, bool):
        raise TypeError(f"synced_gpus must be True, False or None, got {flag!r}")
    return flag and many


class PeerSync:
    """Keeps the processes of the default group stepping together. Each step, every process runs
    one forward and then `all_done(done)` (one all-reduce); a process whose own rows are done keeps
    running forwards on its last token (`idle`) until every process is done."""

    def __init__(self, model, device: torch.device) -> None:
        self.model, self.device = model, device

    def all_done(self, done: bool) -> bool:
        flag = torch.tensor(0.0 if done else 1.0, device=self.device)
        torch.distributed.all_reduce(flag)
        return flag.item() == 0.0

    def idle(self, seq_RL: torch.Tensor) -> None:
        """After this process's last step: forwards on its last token (no cache, nothing kept),
        each followed by the step's all-reduce, until every process is done."""
        # nothing is kept: a negative pad id there (Transformers takes one) goes in as id 0, never as
        # an index out of the embedding's range
        last = seq_RL[:, -1:].clamp(min=0)
        while True:
            self.model(input_ids=last, use_cache=False, logits_to_keep=1)
            if self.all_done(True):
                return

    def stop(self, done: bool, seq_RL: torch.Tensor) -> bool:
        """At the end of a step: whether to leave the loop (every process done, after idling
        through the others' steps if this one is done first)."""
        if self.all_done(done):
            return True
        if done:
            self.idle(seq_RL)
        return done
