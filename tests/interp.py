"""Helpers for tests that run Triton kernels under the CPU interpreter."""

from __future__ import annotations

import itertools
import random


def shuffle_programs(monkeypatch, seed):
    """Make the interpreter run each launch's programs in a random order (it runs them one by one in
    grid order, where split s = SPLIT_K - 1 always arrives last). Counts the column tiles whose last
    program is another split."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    set_dim, set_idx, state = builder.set_grid_dim, builder.set_grid_idx, {"other_last": 0}

    def shuffled_dim(nx, ny, nz):
        set_dim(nx, ny, nz)
        order = list(itertools.product(range(nx), range(ny), range(nz)))
        random.Random(seed).shuffle(order)
        last = {x: y for x, y, _ in order}
        state["other_last"] += sum(y != ny - 1 for y in last.values())
        state["order"] = iter(order)

    monkeypatch.setattr(builder, "set_grid_dim", shuffled_dim)
    monkeypatch.setattr(builder, "set_grid_idx", lambda x, y, z: set_idx(*next(state["order"])))
    return state
