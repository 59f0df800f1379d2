"""Training data: text files -> token ids -> fixed-length sequences, and the order they are read in.

Sources (`TrainingConfig.data` / `eval_data`):
- "stdlib": the .py sources of the running Python's standard library (`stdlib_files`), a corpus
  every machine with Python has; docstrings and comments make it English-like.
- a directory (every .txt/.py/.md file under it), a glob pattern, a text file, or a list of files.
- a pre-tokenized `.npy` (1-D integer array) or `.bin` (raw array of `data_dtype`) of token ids.

Text files are read in sorted order of their path relative to the corpus root, tokenized with the
tokenizer's post-processor (a leading <s>), each followed by the eos token, and concatenated. The
stream is cut into non-overlapping windows of `seq_len` tokens (the remainder is dropped); a window
is both the input and the labels (the model shifts). Tokenized corpora are cached in
`<output_dir>/data/` under a fingerprint of the files, the tokenizer and the split, so a resumed
run reads exactly the tokens the first one did.

Held-out split, deterministic and machine-independent:
- "file": a file is held out when the SHA-1 of its relative path, read as a number in [0, 1), is
  below `eval_fraction` (at least one file is held out, at least one kept). Adding or removing
  files never moves another file across the split.
- "fraction": the last `eval_fraction` of the windows of the token stream.
A separate `eval_data` source replaces the split: nothing is split off `data` (an `eval_split` or
`eval_fraction` given is warned about as unused), and an `eval_data` that shares files with `data`
(the same file, a link to one, a file of the training directory) is warned about: its loss is
measured on training data.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger("moetorch")

STDLIB = "stdlib"
TEXT_SUFFIXES = (".txt", ".py", ".md")
TOKEN_SUFFIXES = (".npy", ".bin")
# Not prose or code a model should learn from: test suites (huge, repetitive), codec tables,
# installed third-party packages, bytecode caches.
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                                  "encodings"})
# Larger files are generated data dumps (e.g. pydoc_data/topics.py), not hand-written source.
STDLIB_MAX_FILE_BYTES = 200_000
_CACHE_VERSION = 1


# ---- corpora ------------------------------------------------------------------------------------


def stdlib_root() -> Path:
    """The `Lib/` directory of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(max_bytes: int = STDLIB_MAX_FILE_BYTES) -> list[Path]:
    """The default training corpus: the standard library's .py files, sorted by relative path.

    Excluded: test suites (`test/`, `tests/`, `idle_test/`, `test_*.py`), `encodings/` (codec tables),
    `site-packages/`, and files over `max_bytes` bytes. The list depends only on the Python version.
    """
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS and not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            if name.endswith(".py") and not name.startswith("test_") and path.stat().st_size <= max_bytes:
                files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@dataclass
class TextCorpus:
    """Text files and the root their names are taken relative to (for the held-out hash)."""

    root: Path
    files: list[Path]

    def name(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() if self.root != path else path.name


def _walk_text(directory: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        files += [Path(dirpath) / n for n in filenames if n.endswith(TEXT_SUFFIXES)]
    return files


def text_corpus(spec: str | list[str], arg: str = "data", max_files: int | None = None) -> TextCorpus:
    """Resolve a text source to a sorted file list; errors name `arg` (the option at fault)."""
    if isinstance(spec, (list, tuple)):
        files = [Path(f) for f in spec]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{arg}: {f} is not a file")
        root = Path(os.path.commonpath([str(f.resolve().parent) for f in files])) if files else Path(".")
        files = [f.resolve() for f in files]
    elif spec == STDLIB:
        root, files = stdlib_root(), stdlib_files()
    elif Path(spec).is_dir():
        root = Path(spec).resolve()
        files = _walk_text(root)
    elif Path(spec).is_file():
        root, files = Path(spec).resolve().parent, [Path(spec).resolve()]
    elif glob.has_magic(spec):
        files = [Path(f).resolve() for f in glob.glob(spec, recursive=True)
                 if os.path.isfile(f) and f.endswith(TEXT_SUFFIXES)]  # as a directory's: text files only
        root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else Path(".")
    else:
        raise FileNotFoundError(f"{arg}: {spec!r}: no such file or directory (nor 'stdlib' or a glob pattern)")
    corpus = TextCorpus(root, files)
    corpus.files = sorted(set(files), key=corpus.name)
    if max_files is not None:
        corpus.files = corpus.files[:max_files]
    if not corpus.files:
        raise FileNotFoundError(f"{arg}: {spec!r} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    return corpus


def is_token_file(spec: Any) -> bool:
    return isinstance(spec, (str, os.PathLike)) and str(spec).endswith(TOKEN_SUFFIXES)


def contains(tokens: np.ndarray, value: int, chunk: int = 1 << 24) -> bool:
    """Whether `value` occurs in a (memory-mapped) token array: read a chunk at a time, stopping at
    the first that holds it."""
    return any(np.any(tokens[i:i + chunk] == value) for i in range(0, len(tokens), chunk))


def load_token_file(path: str | os.PathLike, dtype: str, arg: str = "data") -> np.ndarray:
    """A 1-D array of token ids, memory-mapped: `.npy` as saved, `.bin` as raw `dtype`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{arg}: no such token file {path}")
    try:
        if path.suffix == ".npy":
            tokens = np.load(path, mmap_mode="r")
        else:
            size, itemsize = path.stat().st_size, np.dtype(dtype).itemsize
            if size % itemsize:
                raise ValueError(f"its {size} bytes are not a whole number of {dtype} ids ({itemsize} bytes "
                                 "each): is data_dtype (--data-dtype) right?")
            tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r") if size else np.zeros(0, dtype)
    except ValueError as e:  # not an .npy file, a pickled one, a .bin of another element size
        raise ValueError(f"{arg}: cannot read {path} as token ids: {e}") from e
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{arg}: {path} must hold a 1-D integer array, got {tokens.dtype} {tokens.shape}")
    return tokens


def heldout_score(name: str) -> float:
    """A file's place in [0, 1) for the held-out split: SHA-1 of its relative path."""
    return int(hashlib.sha1(name.encode("utf-8")).hexdigest()[:15], 16) / 16**15


def split_by_file(names: list[str], fraction: float) -> tuple[list[int], list[int]]:
    """Indices of (training, held-out) files: held out when `heldout_score(name) < fraction`."""
    scores = [heldout_score(n) for n in names]
    held = [i for i, s in enumerate(scores) if s < fraction]
    if fraction > 0 and not held and len(names) > 1:
        held = [min(range(len(names)), key=scores.__getitem__)]
    if len(held) == len(names) and names:  # keep at least one file to train on
        held.remove(max(held, key=scores.__getitem__))
    held_set = set(held)
    return [i for i in range(len(names)) if i not in held_set], sorted(held)


def read_text(path: Path) -> str:
    # A few stdlib files are latin-1; replacement characters keep tokenization deterministic.
    return path.read_bytes().decode("utf-8", errors="replace")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenize_files(files: list[Path], tokenizer, desc: str, show_progress: bool = True) -> np.ndarray:
    """Token ids of the files in order, each as `tokenizer(text)` (with its <s>) plus eos."""
    eos = tokenizer.eos_token_id
    dtype = token_dtype(len(tokenizer))
    parts: list[np.ndarray] = []
    chunk = 32  # files per encode_batch call: parallel in the tokenizers library, bounded memory
    with tqdm(total=len(files), desc=desc, unit="file", disable=not show_progress) as bar:
        for start in range(0, len(files), chunk):
            texts = [read_text(f) for f in files[start : start + chunk]]
            for ids in tokenizer(texts, return_attention_mask=False)["input_ids"]:
                parts.append(np.asarray(ids + ([eos] if eos is not None else []), dtype=dtype))
            bar.update(len(texts))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


# ---- sequences and their order ------------------------------------------------------------------


class PackedSequences:
    """Non-overlapping windows of `seq_len` tokens over a 1-D token array (the tail is dropped)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, name: str) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.name = name
        self.n = len(tokens) // seq_len

    def __len__(self) -> int:
        return self.n

    @property
    def num_tokens(self) -> int:
        return self.n * self.seq_len

    def get(self, indices: np.ndarray) -> torch.Tensor:
        """The windows at `indices` as a [len(indices), seq_len] int64 tensor."""
        T = self.seq_len
        rows = np.stack([np.asarray(self.tokens[i * T : (i + 1) * T]) for i in indices])
        return torch.from_numpy(rows.astype(np.int64))


class ShuffledStream:
    """An endless stream of window indices: epoch e is a permutation seeded by (seed, e).

    Position p of the stream is slot p % n of epoch p // n, so any position can be reached directly:
    a run resumes by remembering one integer, and the order never depends on the global RNGs.
    """

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError("the training set has no complete sequence (fewer tokens than seq_len)")
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def take(self, position: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            p = position + i
            out[i] = self._permutation(p // self.n)[p % self.n]
        return out


# ---- building the train / held-out sets ---------------------------------------------------------


@dataclass
class TrainData:
    """The packed training and held-out sequences, with a summary for the log."""

    train: PackedSequences
    eval: PackedSequences | None
    info: dict[str, Any] = field(default_factory=dict)


def _tokenizer_state(tokenizer) -> str:
    # the tokenizer's whole pipeline and vocabulary as `tokenizers` serializes it (moetorch's
    # Tokenizer, or Transformers' fast one), so that a tokenizer object with no files on disk
    # still keys the cache; "" where there is no such backend
    backend = getattr(tokenizer, "_tok", None) or getattr(tokenizer, "backend_tokenizer", None)
    to_str = getattr(backend, "to_str", None)
    return hashlib.sha256(to_str().encode()).hexdigest() if callable(to_str) else ""


def _fingerprint(corpus: TextCorpus, tokenizer_files: list[Path], extra: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps({"version": _CACHE_VERSION, **extra}, sort_keys=True).encode())
    for f in tokenizer_files:
        if f.exists():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    for f in corpus.files:
        h.update(corpus.name(f).encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _save_array(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tokenized_text(
    corpus: TextCorpus, tokenizer, split: str, fraction: float, cache_dir: Path | None, tokenizer_files: list[Path],
    show_progress: bool,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(train tokens, held-out tokens or None, info) of a text corpus, from the cache when it matches."""
    names = [corpus.name(f) for f in corpus.files]
    key = _fingerprint(corpus, tokenizer_files, {"split": split, "fraction": fraction, "eos": tokenizer.eos_token_id,
                                                 "tokenizer": _tokenizer_state(tokenizer)})
    if cache_dir is not None and (cache_dir / "meta.json").exists():
        meta = json.loads((cache_dir / "meta.json").read_text())
        if meta.get("fingerprint") == key:
            train = np.load(cache_dir / "train.npy", mmap_mode="r")
            held = np.load(cache_dir / "eval.npy", mmap_mode="r") if meta["info"].get("eval_files") else None
            return train, held, meta["info"]
        logger.warning("%s: the corpus or tokenizer changed since it was cached; tokenizing again", cache_dir)
    if split == "file" and fraction > 0:
        train_idx, held_idx = split_by_file(names, fraction)
    else:
        train_idx, held_idx = list(range(len(names))), []
    train = tokenize_files([corpus.files[i] for i in train_idx], tokenizer, "Tokenizing", show_progress)
    held = tokenize_files([corpus.files[i] for i in held_idx], tokenizer, "Tokenizing held-out", show_progress)
    info = {"root": str(corpus.root), "files": len(names), "eval_files": [names[i] for i in held_idx]}
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _save_array(cache_dir / "train.npy", train)
        _save_array(cache_dir / "eval.npy", held)
        meta_tmp = cache_dir / f"meta.json.tmp{os.getpid()}"
        meta_tmp.write_text(json.dumps({"fingerprint": key, "info": info}, indent=1))
        os.replace(meta_tmp, cache_dir / "meta.json")  # last: the cache is valid only once complete
    return train, (held if held_idx else None), info


def _tail_split(tokens: np.ndarray, seq_len: int, fraction: float) -> tuple[np.ndarray, np.ndarray | None]:
    n = len(tokens) // seq_len
    n_eval = min(round(n * fraction), n - 1) if fraction > 0 else 0  # at least one window trains
    if fraction > 0 and n_eval == 0 and n > 1:
        n_eval = 1
    cut = (n - n_eval) * seq_len
    return tokens[:cut], (tokens[cut : n * seq_len] if n_eval else None)


def load_source(spec, cfg, tokenizer, arg: str, cache_dir: Path | None, tokenizer_files: list[Path],
                split: str, fraction: float) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Tokens of one source, split into (train, held-out or None) as `split` says."""
    if is_token_file(spec):
        tokens = load_token_file(spec, cfg.data_dtype, arg)
        train, held = _tail_split(tokens, cfg.seq_len, fraction) if split == "fraction" else (tokens, None)
        return train, held, {"token_file": str(spec)}
    if tokenizer is None:
        raise ValueError(f"{arg}: text data needs a tokenizer (set tokenizer / --tokenizer DIR)")
    corpus = text_corpus(spec, arg, cfg.max_files)
    text_split = "file" if split == "file" else "none"
    train, held, info = _tokenized_text(corpus, tokenizer, text_split, fraction, cache_dir, tokenizer_files,
                                        cfg.progress)
    if split == "fraction":
        train, held = _tail_split(train, cfg.seq_len, fraction)
    return train, held, info


def source_files(spec, cfg, arg: str) -> list[Path]:
    """The files a source reads (a token file, or the text files `text_corpus` finds)."""
    if is_token_file(spec):
        return [Path(spec)]
    return text_corpus(spec, arg, cfg.max_files).files


def _file_key(path: Path) -> tuple[int, int] | str:
    # the file itself, whatever the name: links followed, hard links and bind mounts included
    try:
        st = os.stat(path)
        return st.st_dev, st.st_ino
    except OSError:
        return str(Path(path).resolve())


def check_eval_overlap(cfg) -> int:
    """How many of `eval_data`'s files `data` trains on too; warns, naming both sources, when any.

    Not refused: evaluating on the training data is what a smoke test may want.
    """
    train = {_file_key(f) for f in source_files(cfg.data, cfg, "data")}
    held = source_files(cfg.eval_data, cfg, "eval_data")
    shared = [f for f in held if _file_key(f) in train]
    if shared:
        if len(shared) == len(held) == len(train):
            what = "the same file" + ("s" if len(held) > 1 else "")
        else:
            names = ", ".join(str(Path(f).resolve()) for f in shared[:3]) + (", ..." if len(shared) > 3 else "")
            what = f"{len(shared)} of its {len(held)} file(s) are training files too: {names}"
        logger.warning(
            "eval_data (--eval-data) %r overlaps data (--data) %r (%s): the model is evaluated on data it trains "
            "on, so the held-out loss is optimistic (nothing is split off data when eval_data is given; for a real "
            "held-out loss give eval_data that data does not hold)", cfg.eval_data, cfg.data, what)
    return len(shared)


def build_data(cfg, tokenizer, vocab_size: int, cache_dir: Path | None, tokenizer_files: list[Path]) -> TrainData:
    """The training and held-out sequences of a `TrainingConfig`; checks every id is < vocab_size."""
    split = cfg.eval_split
    if split == "auto":
        split = "fraction" if is_token_file(cfg.data) else "file"
    if split == "file" and is_token_file(cfg.data) and cfg.eval_data is None:
        raise ValueError(f"eval_split: 'file' needs text data; {cfg.data} is a token array (use 'fraction')")
    fraction = 0.0 if cfg.eval_data is not None else cfg.eval_fraction
    train, held, info = load_source(cfg.data, cfg, tokenizer, "data", cache_dir and cache_dir / "train",
                                    tokenizer_files, split, fraction)
    if cfg.eval_data is not None:
        held, _, eval_info = load_source(cfg.eval_data, cfg, tokenizer, "eval_data",
                                         cache_dir and cache_dir / "eval", tokenizer_files, "none", 0.0)
        info = {**info, "eval_source": {**eval_info, "shared_files": check_eval_overlap(cfg)}}
        defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.name in ("eval_split", "eval_fraction")}
        unused = [f"{name} {getattr(cfg, name)!r}" for name in defaults if getattr(cfg, name) != defaults[name]]
        if unused:
            logger.warning("%s %s not used: eval_data (--eval-data) %r is the held-out set, and nothing is split "
                           "off data (--data)", " and ".join(unused), "is" if len(unused) == 1 else "are",
                           cfg.eval_data)
    for name, tokens in (("data", train), ("eval_data" if cfg.eval_data is not None else "data", held)):
        if tokens is None or not len(tokens):
            continue
        low, high = int(tokens.min()), int(tokens.max())  # a pass each over a memory-mapped file
        if low < 0 or high >= vocab_size:
            bad = high if high >= vocab_size else low
            raise ValueError(f"{name}: token id {bad} is outside the model's vocabulary [0, {vocab_size})")
    data = TrainData(
        PackedSequences(train, cfg.seq_len, "train"),
        PackedSequences(held, cfg.seq_len, "eval") if held is not None else None,
    )
    if len(data.train) == 0:
        raise ValueError(f"data: {len(train)} training tokens make no sequence of seq_len {cfg.seq_len}")
    if data.eval is not None and len(data.eval) == 0 and cfg.eval_data is not None:
        raise ValueError(f"eval_data: {len(held)} held-out tokens make no sequence of seq_len {cfg.seq_len}")
    if data.eval is not None and len(data.eval) == 0:
        logger.warning("the held-out set (%d tokens) is shorter than seq_len %d: no evaluation", len(held),
                       cfg.seq_len)
        data.eval = None
    if held is None and fraction > 0:
        why, other = (("one file?", "eval_split 'fraction' (--eval-split)") if split == "file" else
                      ("one window of seq_len?", "more data"))
        logger.warning("no held-out data: eval_split %r holds out nothing of %s (%s), so there is no "
                       "evaluation; use %s or eval_data (--eval-data)", split, cfg.data, why, other)
    data.info = {
        **info, "split": "eval_data" if cfg.eval_data is not None else split,
        "train_tokens": data.train.num_tokens, "train_sequences": len(data.train),
        "eval_tokens": data.eval.num_tokens if data.eval else 0, "eval_sequences": len(data.eval) if data.eval else 0,
    }
    return data
