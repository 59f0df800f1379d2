"""Checkpoint I/O: the one place where on-disk tensor names meet moetorch's module names.

moetorch's parameter names are Transformers-5's in-memory names (`mlp.experts.gate_up_proj`,
`mlp.router.weight`, ...). On disk we read both those and the original per-expert names, and we
write what Transformers 5 itself writes for each architecture (for PhiMoE the original
`block_sparse_moe.experts.E.w1/w2/w3.weight` + `block_sparse_moe.gate.weight` names), as sharded
safetensors with an index, so that Transformers loads our checkpoints unchanged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

logger = logging.getLogger("moetorch")

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"  # PyTorch's pickled state dicts, as older checkpoints store them
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
# Classifier / LM heads that may legitimately be absent or extra when a checkpoint of one head
# type is loaded into another (e.g. fine-tuning a classifier from a causal-LM checkpoint).
HEAD_WEIGHTS = ("score.weight", "lm_head.weight", "lm_head.bias")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not fit the model; the message names the file/tensor."""


@dataclass(frozen=True)
class Target:
    """Where a disk tensor goes: parameter `name`, at `index` (None = the whole tensor)."""

    name: str
    index: tuple | None = None


# ---- name mapping -------------------------------------------------------------------------------

_PHIMOE_EXPERT = re.compile(r"^(.*)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_PHIMOE_GATE = re.compile(r"^(.*)\.block_sparse_moe\.gate\.weight$")


def phimoe_from_disk(key: str, config) -> Target:
    if m := _PHIMOE_EXPERT.match(key):
        prefix, e, w = m.group(1), int(m.group(2)), m.group(3)
        I = config.intermediate_size
        if w == "w2":
            return Target(f"{prefix}.mlp.experts.down_proj", (e,))
        rows = slice(0, I) if w == "w1" else slice(I, 2 * I)
        return Target(f"{prefix}.mlp.experts.gate_up_proj", (e, rows))
    if m := _PHIMOE_GATE.match(key):
        return Target(f"{m.group(1)}.mlp.router.weight")
    return Target(key)


def phimoe_to_disk(name: str, tensor: torch.Tensor, config) -> Iterator[tuple[str, torch.Tensor]]:
    if name.endswith(".mlp.experts.gate_up_proj"):
        prefix = name.removesuffix(".mlp.experts.gate_up_proj")
        I = config.intermediate_size
        for e in range(tensor.shape[0]):
            yield f"{prefix}.block_sparse_moe.experts.{e}.w1.weight", tensor[e, :I]
            yield f"{prefix}.block_sparse_moe.experts.{e}.w3.weight", tensor[e, I:]
    elif name.endswith(".mlp.experts.down_proj"):
        prefix = name.removesuffix(".mlp.experts.down_proj")
        for e in range(tensor.shape[0]):
            yield f"{prefix}.block_sparse_moe.experts.{e}.w2.weight", tensor[e]
    elif name.endswith(".mlp.router.weight"):
        yield name.replace(".mlp.router.weight", ".block_sparse_moe.gate.weight"), tensor
    else:
        yield name, tensor


def _identity_from_disk(key: str, config) -> Target:
    return Target(key)


def _identity_to_disk(name: str, tensor: torch.Tensor, config) -> Iterator[tuple[str, torch.Tensor]]:
    yield name, tensor


NAME_MAPS = {
    "phimoe": (phimoe_from_disk, phimoe_to_disk),
}


def name_maps(model_type: str):
    return NAME_MAPS.get(model_type, (_identity_from_disk, _identity_to_disk))


# ---- reading ------------------------------------------------------------------------------------


def with_variant(name: str, variant: str | None) -> str:
    """A weights file's name for a variant, as Transformers names it: `model.safetensors` ->
    `model.{variant}.safetensors`, `model.safetensors.index.json` -> `model.safetensors.index.{variant}.json`."""
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# Buffers that older checkpoints saved and the models compute instead
_STALE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class _MappingTensors:
    """A state_dict read as `safe_open` reads a file (`keys`, `get_tensor`)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.state_dict = state_dict

    def keys(self):
        return self.state_dict.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.state_dict[key]

    def get_slice(self, key: str) -> torch.Tensor:  # (a tensor's get_shape: `_shape_of`)
        return self.state_dict[key]


def _open(file: str, state_dict: Mapping[str, torch.Tensor] | None = None):
    """A checkpoint file (or `state_dict`) to read tensors from by name: safetensors memory-mapped,
    a PyTorch .bin through `torch.load(weights_only=True)` (tensors only: no code runs)."""
    if state_dict is not None:
        return contextlib.nullcontext(_MappingTensors(state_dict))
    if file.endswith(".bin"):
        try:
            tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # (a file of the legacy, non-zip format cannot be memory-mapped)
            tensors = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(tensors, Mapping):
            raise CheckpointError(f"{file} holds a {type(tensors).__name__}, not a state dict of tensors")
        return contextlib.nullcontext(_MappingTensors(check_state_dict(tensors, file)))
    return safe_open(file, framework="pt", device="cpu")


@contextlib.contextmanager
def _reading(file: str, state_dict: Mapping[str, torch.Tensor] | None = None):
    """`_open(file, state_dict)`, with any error that is not already a CheckpointError (safetensors
    raises its own types for corrupt files) made one that names the file."""
    try:
        with _open(file, state_dict) as f:
            yield f
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read {file}: {type(e).__name__}: {e}") from e


def _shape_of(f, key: str) -> tuple[int, ...]:
    """A stored tensor's shape, read without its data."""
    piece = f.get_slice(key)
    return tuple(piece.shape) if torch.is_tensor(piece) else tuple(piece.get_shape())


def key_renamer(key_mapping: Mapping[str, str] | None):
    """Transformers' `from_pretrained(key_mapping={pattern: replacement})`: each stored name is
    rewritten by the first pattern (a regular expression) that matches it, as `re.sub` rewrites it,
    before it is read as the model's names. A mapping that is not of strings, or a pattern that does
    not compile, is a ValueError naming it."""
    if not key_mapping:
        return lambda key: key
    if not isinstance(key_mapping, Mapping):
        raise ValueError(f"from_pretrained: key_mapping must be a dict of regular expressions to replacements, got "
                         f"{type(key_mapping).__name__}")
    rules = []
    for pattern, replacement in key_mapping.items():
        if not (isinstance(pattern, str) and isinstance(replacement, str)):
            raise ValueError(f"from_pretrained: key_mapping maps strings to strings, got {pattern!r}: {replacement!r}")
        try:
            rules.append((re.compile(pattern), replacement))
        except re.error as e:
            raise ValueError(f"from_pretrained: key_mapping pattern {pattern!r} is no regular expression: "
                             f"{e}") from None

    def rename(key: str) -> str:
        for rule, replacement in rules:
            new, count = rule.subn(replacement, key)
            if count:
                return new
        return key

    return rename


def _stored_fused_shapes(files: list, state_dict, config, own: dict, base_prefix: str, from_disk,
                         rename=lambda key: key) -> dict:
    """The shape each parameter that the checkpoint stores in pieces (PhiMoE's experts, one tensor
    per expert and projection) has there, as Transformers fuses it: experts x (pieces x rows) x
    columns, e.g. (E, 2 * intermediate, hidden) for gate_up_proj. Empty for a checkpoint whose names
    map one to one (no file is opened for them)."""
    if from_disk is _identity_from_disk:
        return {}
    pieces: dict[str, dict] = {}
    for file in files:
        with _reading(file, state_dict) as f:
            for key in f.keys():
                target = from_disk(_adapt_prefix(rename(key), own, base_prefix), config)
                if target.index is None:
                    continue
                seen = pieces.setdefault(_adapt_prefix(target.name, own, base_prefix), {"experts": set(),
                                                                                        "slices": set()})
                seen["experts"].add(target.index[0])
                seen["slices"].add(repr(target.index[1:]))
                seen["shape"] = _shape_of(f, key)
    return {name: (max(p["experts"]) + 1, len(p["slices"]) * p["shape"][0], *p["shape"][1:])
            for name, p in pieces.items()}


def check_state_dict(state_dict: Any, where: str = "from_pretrained: state_dict") -> Mapping[str, torch.Tensor]:
    """`from_pretrained(state_dict=...)` (or a .bin file's, `where`): a mapping of tensor names (as
    a checkpoint names them) to tensors; anything else is a TypeError that says what it got."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{where} must be a mapping of tensor names to tensors (a model's "
                        f"state_dict()), got {type(state_dict).__name__}")
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise TypeError(f"{where} must map tensor names to tensors; not so for {bad[:5]}")
    return state_dict


def stored_dtype(path: str | os.PathLike | None, variant: str | None = None,
                 state_dict: Mapping[str, torch.Tensor] | None = None,
                 use_safetensors: bool | None = None) -> torch.dtype | None:
    """The dtype of a checkpoint's first floating-point tensor (what Transformers' `dtype="auto"`
    takes when config.json names none), or None (no weights there, or none floating). The
    checkpoint is `state_dict` where given, else the files in `path`."""
    if state_dict is not None:
        return next((t.dtype for t in state_dict.values() if t.is_floating_point()), None)
    try:
        files = checkpoint_files(path, variant, use_safetensors)
        if files[0].endswith(".bin"):
            with _open(files[0]) as f:
                return next((t.dtype for t in map(f.get_tensor, f.keys()) if t.is_floating_point()), None)
        with safe_open(files[0], framework="pt", device="cpu") as f:
            for key in f.keys():
                dtype = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
                if dtype is not None:
                    return dtype
    except Exception:  # noqa: BLE001 -- no weights, or a corrupt file: loading then names what is wrong
        return None
    return None


def checkpoint_files(path: str | os.PathLike, variant: str | None = None,
                     use_safetensors: bool | None = None) -> list[str]:
    """The weight files of a checkpoint directory (of one `variant`), in index order: its
    safetensors, else PyTorch .bin files (`pytorch_model.bin` or the shards its index lists), as
    Transformers picks them; `use_safetensors=False` takes the .bin files, `True` only safetensors."""
    path = os.fspath(path)
    if use_safetensors is not False:
        files = _indexed_files(path, variant, SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)
        if files is None and use_safetensors is None:
            files = _indexed_files(path, variant, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    else:
        files = _indexed_files(path, variant, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
        if files is None:
            raise CheckpointError(f"use_safetensors=False: no {with_variant(WEIGHTS_NAME, variant)} or "
                                  f"{with_variant(WEIGHTS_INDEX_NAME, variant)} found in {path}")
    if files is not None:
        return files
    single = with_variant(SAFE_WEIGHTS_NAME, variant)
    if variant is not None:
        raise CheckpointError(f"variant={variant!r}: no {single} or {with_variant(SAFE_WEIGHTS_INDEX_NAME, variant)} "
                              f"(nor {with_variant(WEIGHTS_NAME, variant)}) found in {path}")
    names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) if os.path.isdir(path) else []
    shards = [f for f in names if _SHARD.match(f)]  # model-00001-of-00002.safetensors without its index
    if shards:
        return [os.path.join(path, f) for f in shards]
    if names:
        raise CheckpointError(f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {path}, only {names[:4]}; "
                              "for model.VARIANT.safetensors pass variant=VARIANT")
    if use_safetensors and _indexed_files(path, None, WEIGHTS_NAME, WEIGHTS_INDEX_NAME) is not None:
        raise CheckpointError(f"use_safetensors=True, but {path} holds PyTorch .bin weights only")
    raise CheckpointError(f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} (nor {WEIGHTS_NAME}) found in {path}")


def _indexed_files(path: str, variant: str | None, single_name: str, index_name: str) -> list[str] | None:
    """The files of one format: those its index lists (in order, each once), or its single file,
    or None where the directory has neither."""
    index = os.path.join(path, with_variant(index_name, variant))
    single = os.path.join(path, with_variant(single_name, variant))
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid weights index (needs a 'weight_map'): {e}") from e
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that do not exist in {path}: {missing}")
        return [os.path.join(path, f) for f in files]
    if os.path.isfile(single):
        return [single]
    return None


def _adapt_prefix(key: str, own: dict[str, torch.Tensor], prefix: str) -> str:
    """Map a head-model key onto a base model and back (`model.x` <-> `x`)."""
    if key in own:
        return key
    if key.startswith(prefix + ".") and key[len(prefix) + 1 :] in own:
        return key[len(prefix) + 1 :]
    if f"{prefix}.{key}" in own:
        return f"{prefix}.{key}"
    return key


@torch.no_grad()
def load_into(model: torch.nn.Module, path: str | os.PathLike | None, config, base_prefix: str = "model",
              variant: str | None = None, ignore_mismatched_sizes: bool = False,
              state_dict: Mapping[str, torch.Tensor] | None = None,
              use_safetensors: bool | None = None, key_mapping: Mapping[str, str] | None = None) -> dict[str, set]:
    """Copy a checkpoint's tensors into `model`'s (already allocated) parameters and buffers, and
    return Transformers' loading info: `missing_keys` and `unexpected_keys` (head weights only),
    `mismatched_keys` ((name, checkpoint shape, model shape)), `error_msgs`. The tensors come from
    the weight files in `path` (safetensors, else .bin: `checkpoint_files`), or from `state_dict` (a mapping
    of the same names) where given.

    Every parameter must be written exactly once, with the right shape; anything else raises
    `CheckpointError` naming the tensor and file. Only a task head may be absent (a classifier
    loaded from a language model) or extra, and with `ignore_mismatched_sizes` a tensor of another
    shape is left out (a classifier of another label count). The caller initialises what is left
    out (the missing and mismatched keys). `key_mapping` renames the stored names first (`key_renamer`).
    """
    rename = key_renamer(key_mapping)
    files = checkpoint_files(path, variant, use_safetensors) if state_dict is None else ["state_dict"]
    if state_dict is not None:
        path = "state_dict"
    from_disk, to_disk = name_maps(config.model_type)
    own = dict(model.state_dict(keep_vars=True))
    tied = getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in own
    written = {name: 0 for name in own}
    seen: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[tuple[str, torch.Size, torch.Size]] = []
    stored_head = None  # (a tied head's tensor in the checkpoint, its file)
    # parameters stored in pieces whose whole does not fit the model's (another expert count or size):
    # one size mismatch each, as Transformers reports the fused tensor
    misfits = {name: shape for name, shape in _stored_fused_shapes(files, state_dict, config, own, base_prefix,
                                                                   from_disk, rename).items()
               if name in own and shape != tuple(own[name].shape)}
    for name, shape in misfits.items():
        _size_mismatch(name, path, name, torch.Size(shape), own[name].shape, ignore_mismatched_sizes, mismatched,
                       pieces=True)
    for file in tqdm(files, desc="Loading checkpoint shards", disable=len(files) < 2, unit="shard"):
        with _reading(file, state_dict) as f:
            for stored in f.keys():
                key = rename(stored)
                own_key = _adapt_prefix(key, own, base_prefix)
                seen.add(own_key)
                target = from_disk(own_key, config)
                name = _adapt_prefix(target.name, own, base_prefix)
                if name not in own:
                    if not _STALE.search(key):  # old rotary buffers: dropped, as Transformers drops them
                        unexpected.append(key)
                    continue
                if name in misfits:
                    continue
                dst = own[name] if target.index is None else own[name][target.index]
                if tied and name == "lm_head.weight":
                    # the embedding's copy (tied): the one parameter is loaded from the embedding (or
                    # from the head where the embedding is absent; a head that differs is untied
                    # below), but one of another shape is a size mismatch, as Transformers reports it
                    shape = _shape_of(f, stored)
                    if tuple(shape) != tuple(dst.shape):
                        _size_mismatch(key, file, name, torch.Size(shape), dst.shape, ignore_mismatched_sizes,
                                       mismatched)
                    else:
                        stored_head = (f.get_tensor(stored), file)
                    continue
                src = f.get_tensor(stored)
                if tuple(src.shape) != tuple(dst.shape):
                    _size_mismatch(key, file, name, src.shape, dst.shape, ignore_mismatched_sizes, mismatched)
                    continue
                dst.copy_(src)
                written[name] += dst.numel()
    for name, _, _ in mismatched:
        written[name] = own[name].numel()
    if stored_head is not None:
        _tied_head(model, config, own, written, *stored_head)
    over = [n for n, c in written.items() if c > own[n].numel()]
    if over:
        raise CheckpointError(f"checkpoint {path} writes these tensors more than once: {over[:10]}")
    missing = [n for n, c in written.items() if c < own[n].numel() and not (tied and n == "lm_head.weight")]
    heads_missing = [n for n in missing if n in HEAD_WEIGHTS]
    heads_extra = [k for k in unexpected if k in HEAD_WEIGHTS]
    missing = [n for n in missing if n not in HEAD_WEIGHTS]
    unexpected = [k for k in unexpected if k not in HEAD_WEIGHTS]
    if missing:
        # the missing parts in the original checkpoint naming too, where it differs (one file tensor per expert)
        absent = [k for n in missing for k, _ in to_disk(n, own[n].detach(), config) if k not in seen and k != n]
        named = f" (in the original naming, e.g. {absent[:8]})" if absent else ""
        raise CheckpointError(
            f"checkpoint {path} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:8]}{named}; "
            "refusing to leave them randomly initialised"
        )
    if unexpected:
        raise CheckpointError(
            f"checkpoint {path} has {len(unexpected)} tensor(s) this {type(model).__name__} does not use, "
            f"e.g. {unexpected[:8]} (is config.json for this checkpoint?)"
        )
    if heads_missing:
        logger.warning("%s: head weights %s not in the checkpoint; they are newly initialised", path, heads_missing)
    if heads_extra:
        logger.warning("%s: checkpoint head weights %s unused by %s", path, heads_extra, type(model).__name__)
    for name, src, dst in mismatched:
        what = "the input embeddings' (tied)" if tied and name == "lm_head.weight" else "newly initialised"
        logger.warning("%s: %s has shape %s in the checkpoint and %s in the model; %s (ignore_mismatched_sizes)",
                       path, name, tuple(src), tuple(dst), what)
    return {"missing_keys": set(heads_missing), "unexpected_keys": set(heads_extra),
            "mismatched_keys": set(mismatched), "error_msgs": []}


def _tied_head(model: torch.nn.Module, config, own: dict, written: dict, head: torch.Tensor, file: str) -> None:
    """A checkpoint that stores the head its config ties to the input embeddings, as Transformers
    loads it: where the embeddings are absent, the one parameter takes the head's values; where
    both are stored with other values, the head is untied and keeps its own (a warning says so, and
    the config's `tie_word_embeddings` becomes False, so that the model saves and reloads untied)."""
    embed = model.get_input_embeddings().weight
    name = next(n for n, t in own.items() if t is embed and n != "lm_head.weight")
    if written[name] == 0:
        embed.copy_(head)
        written[name] = embed.numel()
        return
    if torch.equal(head.to(device=embed.device, dtype=embed.dtype), embed):
        return
    logger.warning("%s: config.json ties lm_head.weight to %s (tie_word_embeddings), but the checkpoint stores "
                   "both with different values: they are not tied, and the model's config says "
                   "tie_word_embeddings=False", file, name)
    config.tie_word_embeddings = model.config.tie_word_embeddings = False
    model.get_output_embeddings().weight = torch.nn.Parameter(
        head.to(device=embed.device, dtype=embed.dtype, copy=True), requires_grad=embed.requires_grad)
    written["lm_head.weight"] = embed.numel()


def _size_mismatch(key: str, file: str, name: str, shape: torch.Size, expected: torch.Size, ignore: bool,
                   mismatched: list[tuple[str, torch.Size, torch.Size]], pieces: bool = False) -> None:
    """A checkpoint tensor of another shape than its parameter's: with `ignore`
    (ignore_mismatched_sizes) recorded in `mismatched` and left out (the caller initialises it),
    else a CheckpointError naming both (`pieces`: a parameter stored in pieces, `shape` their whole's)."""
    if ignore:
        mismatched.append((name, shape, expected))
        return
    if pieces:
        raise CheckpointError(f"{file}: {name} has shape {tuple(shape)} there (its pieces put together), but the "
                              f"model expects {tuple(expected)} (check config.json: num_local_experts, "
                              "intermediate_size, hidden_size)")
    raise CheckpointError(f"tensor {key!r} in {file} has shape {tuple(shape)}, but the model expects "
                          f"{tuple(expected)} for {name} (check config.json)")


# ---- writing ------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(size: int | str, what: str = "max_shard_size") -> int:
    """Bytes in `size`: an int, or a string like "5GB", "500MB", "2GiB"; errors name `what`."""
    if isinstance(size, int) and size > 0:
        return size
    m = _SIZE.match(str(size))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{what} must be a positive size like '5GB' or a byte count, got {size!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def save_into(
    model: torch.nn.Module, save_directory: str | os.PathLike, config, max_shard_size: int | str = "50GB",
    state_dict: dict[str, torch.Tensor] | None = None, variant: str | None = None, original_format: bool = True,
) -> None:
    """Write the model's tensors (or `state_dict`, in the model's names) as (sharded) safetensors
    in the names Transformers loads: the checkpoint's original ones (PhiMoE's one tensor per
    expert), or with `original_format=False` the model's own (fused experts), as Transformers'
    `save_original_format`; `variant` names the files as Transformers' does."""
    limit = parse_size(max_shard_size)
    to_disk = name_maps(config.model_type)[1] if original_format else _identity_to_disk
    tied = getattr(config, "tie_word_embeddings", False)
    # The model's tensors in its order, each as the file's pieces (PhiMoE's fused experts: one a
    # expert). They go into shards as Transformers (huggingface_hub) puts its model's tensors: one
    # larger than the limit in a shard of its own, the others filling shards in turn up to the
    # limit; a tensor's pieces stay together, as Transformers splits a fused tensor within its shard.
    shards: list[dict[str, torch.Tensor]] = []
    filling: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in (model.state_dict() if state_dict is None else state_dict).items():
        if tied and name == "lm_head.weight":
            continue
        pieces = {key: piece.detach().to("cpu").contiguous() for key, piece in to_disk(name, t, config)}
        n = sum(p.numel() * p.element_size() for p in pieces.values())
        if n > limit:
            shards.append(pieces)
            continue
        if filling and size + n > limit:
            shards.append(filling)
            filling, size = {}, 0
        filling.update(pieces)
        size += n
    if filling or not shards:
        shards.append(filling)
    os.makedirs(save_directory, exist_ok=True)
    stem = with_variant(SAFE_WEIGHTS_NAME, variant).removesuffix(".safetensors")
    names = (
        [f"{stem}.safetensors"]
        if len(shards) == 1
        else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    index_name = with_variant(SAFE_WEIGHTS_INDEX_NAME, variant)
    _remove_stale_weights(save_directory, stem, index_name, keep=set(names))
    for name, shard in tqdm(list(zip(names, shards)), desc="Writing shards", disable=len(shards) < 2, unit="shard"):
        tmp = os.path.join(save_directory, name + ".tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(save_directory, name))
    if len(shards) > 1:
        index = {
            # as Transformers' index: the model's parameter count (`num_parameters()`) and the tensors' bytes
            "metadata": {"total_parameters": model.num_parameters(),
                         "total_size": sum(t.numel() * t.element_size() for shard in shards for t in shard.values())},
            "weight_map": {k: names[i] for i, s in enumerate(shards) for k in s},
        }
        with open(os.path.join(save_directory, index_name), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)


def _remove_stale_weights(directory: str | os.PathLike, stem: str, index_name: str, keep: set[str]) -> None:
    # an earlier save's files of the same variant (its shards and index), so that no loader mixes them
    pattern = re.compile(rf"^{re.escape(stem)}(-\d{{5}}-of-\d{{5}})?\.safetensors$")
    for f in os.listdir(directory):
        if (pattern.match(f) or f == index_name) and f not in keep:
            os.remove(os.path.join(directory, f))
