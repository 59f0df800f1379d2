"""Data-parallel training over the processes `torchrun` starts (torch.distributed).

`moetorch train` and `Trainer` read torchrun's environment (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`,
`MASTER_ADDR`, ...): with more than one process they join a process group (NCCL on GPUs, gloo on
the CPU), each process trains on its own GPU (`cuda:LOCAL_RANK`) and its own share of every
batch, and DDP averages the gradients. One process (`Group.single()`) is the plain single-device
trainer: no group, no collectives.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class PeerFailed(RuntimeError):
    """Another process of the group failed; its error is in the message."""


@dataclass
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # this trainer made the process group (and the CLI destroys it)

    @classmethod
    def single(cls) -> Group:
        return cls()

    @classmethod
    def from_environment(cls, device: str) -> Group:
        """The group this process belongs to: torchrun's (joined here when `WORLD_SIZE` > 1 and no
        group exists yet), one the caller already made, or none."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return cls.single()
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        local_rank = _env_int("LOCAL_RANK", 0)
        # (a process without a GPU of its own joins over gloo, and `device` then says what is wrong)
        gpu = device != "cpu" and torch.cuda.is_available() and local_rank < torch.cuda.device_count()
        if gpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if gpu else "gloo")
        group = cls(dist.get_rank(), dist.get_world_size(), local_rank, owned=True)
        # left to the interpreter's exit, a group's threads can abort the process as it ends
        atexit.register(group.close)
        return group

    @property
    def main(self) -> bool:
        """The process that logs, evaluates' report and writes checkpoints (rank 0)."""
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The device this process trains on: `name` for one process; with several, `auto` and
        `cuda` mean this process's GPU (`cuda:LOCAL_RANK`), `cpu` the CPU."""
        if self.world == 1 or name == "cpu":
            return resolve_device(name)
        if name in ("auto", "cuda"):
            if not torch.cuda.is_available():
                if name == "cuda":
                    raise ValueError("device: 'cuda' asked for, but CUDA is not available")
                return torch.device("cpu")
            if self.local_rank >= torch.cuda.device_count():
                raise ValueError(f"device: process {self.rank} has LOCAL_RANK {self.local_rank}, but "
                                 f"{torch.cuda.device_count()} GPU(s) are visible; start at most that many "
                                 "processes a machine (torchrun --nproc_per_node)")
            return torch.device(f"cuda:{self.local_rank}")
        raise ValueError(f"device: {name!r} with {self.world} processes; pass auto or cuda (each process then "
                         f"takes cuda:LOCAL_RANK) or cpu")

    def agree(self, error: BaseException | None = None) -> None:
        """Where every process stops until all have got here: raises `error` in the process that
        had it, and `PeerFailed` naming it in the others, so that no process waits forever for one
        that failed. A failing process calls this once, in place of its next `agree`."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        report = None if error is None else f"{type(error).__name__}: {error}"
        reports: list[Any] = [None] * self.world
        dist.all_gather_object(reports, report)
        if error is not None:
            raise error
        failed = [(rank, r) for rank, r in enumerate(reports) if r is not None]
        if failed:
            rank, report = failed[0]
            raise PeerFailed(f"process {rank} of {self.world} failed: {report}")

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the processes, in place (no-op for one)."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max_int(self, value: int, device: torch.device) -> int:
        """The largest of the processes' `value`s (a host sync; for one process, `value`)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """Leave the process group this trainer made (also at the interpreter's exit). Over gloo the
        processes first wait for each other, for at most a minute: one that tears its group down
        while a peer's last messages are in flight can abort as it exits (`terminate called without
        an active exception`, seen here with DDP)."""
        if not (self.owned and dist.is_initialized()):
            return
        self.owned = False
        if self.world > 1 and dist.get_backend() == "gloo":
            try:
                dist.monitored_barrier(timeout=timedelta(seconds=60))
            except RuntimeError:  # a peer that failed or left: nothing left to wait for
                pass
        dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device: {name!r} is not a device name (cpu, cuda, cuda:N or auto)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} asked for, but CUDA is not available")
    return device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
