"""Atomic training checkpoints and the RNG state a bit-exact resume needs.

Layout of an output directory:

    checkpoint-<step>/       config.json, model.safetensors, tokenizer files (save_pretrained's
                             format: loads with from_pretrained in moetorch and Transformers), plus
                             trainer_state.pt and training_config.json
    latest -> checkpoint-<step>   symlink to the newest complete checkpoint
    .tmp-*                   in-progress writes: never loaded, removed when a trainer starts

A checkpoint is written into `.tmp-checkpoint-<step>-<pid>`, every file and the directory are
fsynced, and only then is it renamed to `checkpoint-<step>`: a directory of that name is always
complete. `latest` is replaced (atomically, by renaming a new symlink over it) after that rename, and
old checkpoints are deleted after `latest` moved on. A process killed anywhere in between leaves the
previous checkpoint, and `latest`, intact.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import CheckpointError
from .config import CONFIG_FILE

logger = logging.getLogger("moetorch")

STATE_FILE = "trainer_state.pt"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# ---- RNG ----------------------------------------------------------------------------------------


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """The state of every RNG a training step may draw from: torch's CPU generator and, training on
    a GPU, that GPU's (`device`), Python's, numpy's.

    numpy's state is stored as plain values so that `torch.load(weights_only=True)` reads it.
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }
    if device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda_device" in state:
        if device is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_device"].cpu(), device)
        else:
            logger.warning("the checkpoint was trained on a GPU and resumes on %s: the GPU's random draws do not "
                           "replay", device)
    elif "cuda" in state and torch.cuda.is_available():  # checkpoints that saved every visible GPU's state
        if len(state["cuda"]) != torch.cuda.device_count():
            logger.warning("the checkpoint saved RNG states for %d GPUs, this machine has %d: CUDA RNG not restored",
                           len(state["cuda"]), torch.cuda.device_count())
        else:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ---- durable file operations --------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new names, renames) durable; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def _remove(path: Path) -> None:
    """Delete a file, symlink or directory tree; a directory is first renamed to a temporary name,
    so that a half-deleted checkpoint never keeps a name that looks complete."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        trash = path.with_name(f"{TMP_PREFIX}delete-{path.name}-{os.getpid()}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def clean_temporary(output_dir: Path) -> list[str]:
    """Remove leftovers of interrupted writes (`.tmp-*`); returns their names."""
    removed = []
    if output_dir.is_dir():
        for entry in sorted(output_dir.iterdir()):
            if entry.name.startswith(TMP_PREFIX):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry.name)
    if removed:
        logger.warning("%s: removed %d incomplete write(s) left by an interrupted run: %s",
                       output_dir, len(removed), removed)
    return removed


# ---- finding checkpoints ------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int | None:
    m = _CHECKPOINT.match(path.name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / "config.json").is_file()


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete `checkpoint-<step>` directories, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if checkpoint_step(p) is not None and p.is_dir() and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint `latest` names, else the highest-step complete checkpoint, else None."""
    link = output_dir / LATEST
    if link.is_symlink() or link.is_file():
        target = output_dir / (os.readlink(link) if link.is_symlink() else link.read_text().strip())
        if target.is_dir() and is_complete(target):
            return target
        logger.warning("%s points to %s, which is not a complete checkpoint; scanning", link, target)
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def branch_point(output_dir: Path) -> Path | None:
    """The checkpoint of another run that the run in `output_dir` branched from (`resume=CHECKPOINT`
    into it), as its `training_config.json` names it; None for a run of its own, or where that
    checkpoint is gone."""
    try:
        resume = json.loads((output_dir / CONFIG_FILE).read_text(encoding="utf-8")).get("resume")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(resume, str) or resume in ("", "latest", "auto"):
        return None
    path = Path(resume)
    if path.is_dir() and is_complete(path):
        return path
    logger.warning("%s is a branch of %s, which is no longer a complete checkpoint", output_dir, path)
    return None


def _point_latest(output_dir: Path, name: str) -> None:
    tmp = output_dir / f"{TMP_PREFIX}latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(name, tmp)
    except OSError:  # no symlinks here (some Windows setups): a file naming the checkpoint
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, output_dir / LATEST)  # atomic: readers see the old or the new target
    fsync_dir(output_dir)


# ---- writing ------------------------------------------------------------------------------------


def copy_tokenizer(tokenizer, tokenizer_dir: Path | None, target: Path) -> None:
    """The tokenizer files from `tokenizer_dir` as they are, or the tokenizer's own save_pretrained."""
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, target / name)
    elif tokenizer is not None:
        tokenizer.save_pretrained(target)


def save_checkpoint(
    output_dir: Path,
    step: int,
    model,
    state: dict[str, Any],
    training_config_json: str,
    tokenizer=None,
    tokenizer_dir: Path | None = None,
    keep: int = 2,
) -> Path:
    """Write `checkpoint-<step>` atomically, point `latest` at it, keep the newest `keep` checkpoints."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"{TMP_PREFIX}checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    copy_tokenizer(tokenizer, tokenizer_dir, tmp)
    (tmp / "training_config.json").write_text(training_config_json, encoding="utf-8")
    torch.save(state, tmp / STATE_FILE)
    fsync_tree(tmp)
    if final.exists():  # re-saving a step (a run resumed from an older checkpoint): retire the old one
        _remove(final)
    os.rename(tmp, final)
    fsync_dir(output_dir)
    _point_latest(output_dir, final.name)
    for old in list_checkpoints(output_dir)[:-keep]:
        _remove(old)
    return final


def load_state(checkpoint: Path) -> dict[str, Any]:
    file = checkpoint / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"resume: {checkpoint} has no {STATE_FILE} (not a training checkpoint)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # cut short, overwritten or not ours: say which file, not torch's internals
        raise CheckpointError(f"resume: cannot read {file} ({type(e).__name__}): cut short or not a trainer "
                              "state; resume from an earlier checkpoint (--resume DIR)") from e
    missing = [k for k in ("step", "data_position", "tokens_seen", "optimizer", "scheduler", "rng")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"resume: {file} is not a moetorch trainer state (no {missing})")
    return state


def set_aside_later_checkpoints(output_dir: Path, step: int) -> Path | None:
    """Resuming from `step` abandons the checkpoints of later steps (their future is being redone).
    They move, whole, into `output_dir/abandoned-after-<step>` (`-2`, `-3`, ... beside an earlier
    one), out of the run's way but not lost; `latest` then names `checkpoint-<step>`. Returns that
    directory, or None when no later checkpoint was there."""
    # (incomplete ones too: a later save of that step would replace one)
    later = sorted((p for p in output_dir.iterdir() if p.is_dir() and not p.is_symlink()
                    and (checkpoint_step(p) or 0) > step), key=checkpoint_step)
    if not later:
        return None
    aside, n = output_dir / f"abandoned-after-{step}", 2
    while aside.exists() or aside.is_symlink():
        aside, n = output_dir / f"abandoned-after-{step}-{n}", n + 1
    aside.mkdir()
    for path in later:
        os.replace(path, aside / path.name)
    fsync_dir(aside)
    fsync_dir(output_dir)
    logger.warning("resuming from step %d: the later %s moved to %s (delete it when it is no longer needed)",
                   step, ", ".join(p.name for p in later), aside)
    if (output_dir / f"checkpoint-{step}").is_dir():
        _point_latest(output_dir, f"checkpoint-{step}")
    return aside
