"""Helpers Transformers' scripts import beside the models."""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

logger = logging.getLogger("moetorch")

# The keys of the warnings given once per process (`warn_once`)
WARNED_ONCE: set = set()


def warn_once(key, msg: str, *args) -> bool:
    """Log `msg % args` as a warning the first time `key` comes in this process; whether it did."""
    if key in WARNED_ONCE:
        return False
    WARNED_ONCE.add(key)
    logger.warning(msg, *args)
    return True


def outside_vocabulary(what: str, ids: torch.Tensor, vocab: int) -> ValueError:
    """The error for ids outside the vocabulary, naming `what` and the first such id (an error
    path: it reads the ids)."""
    bad = ids[(ids < 0) | (ids >= vocab)]
    shown = f"id {int(bad[0])}" if bad.numel() else "ids"
    return ValueError(f"{what} hold {shown}, outside the vocabulary (0 .. {vocab - 1}, vocab_size={vocab}); after "
                      "adding tokens to a tokenizer, call model.resize_token_embeddings(len(tokenizer))")


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed Python's, NumPy's and torch's generators (every CUDA device's too), as Transformers'
    `set_seed` does; `deterministic=True` also asks torch for deterministic algorithms only (and
    cuBLAS for a fixed workspace), so that runs repeat bit for bit."""
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


@contextmanager
def handling_signals(handler: Callable, *signums: int) -> Iterator[None]:
    """Within the block, `handler` handles each of `signums`, and the previous handlers come back
    after it. Only in the main thread (elsewhere Python cannot set handlers), and not for a signal
    the process ignores (SIGINT in a job started in the background stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signums if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
