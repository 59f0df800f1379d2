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


# How long a process waits in a collective for the others (torch's gloo default; NCCL's is 10
# minutes): process 0 alone tokenizes the data and writes each checkpoint while the others wait.
DEFAULT_TIMEOUT_S = 1800.0

_control: tuple[Any, float, Any] | None = None  # (the default group, timeout, its gloo group for host messages)


@dataclass
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # this trainer made the process group (and the CLI destroys it)
    # Host-side messages (agree, gather, max_int) go over a gloo group of the same processes: no
    # GPU copy or host sync for a flag, and no NCCL watchdog while process 0 works alone.
    control: Any = None

    @classmethod
    def single(cls) -> Group:
        return cls()

    @classmethod
    def from_environment(cls, device: str, timeout: float = DEFAULT_TIMEOUT_S) -> Group:
        """The group this process belongs to: torchrun's (joined here when `WORLD_SIZE` > 1 and no
        group exists yet), one the caller already made, or none. `timeout`: seconds a process waits
        in a collective for the others."""
        if dist.is_available() and dist.is_initialized():
            return cls._made_by_caller(device, timeout)
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return cls.single()
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        group = cls(_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0), owned=True)
        # Every process picks its backend by the same rule, and a device no process could train on
        # fails here, before joining (torchrun then stops the others) rather than at the first
        # collective, where the others would wait for it.
        where = group.device(device)
        if where.type == "cuda":
            torch.cuda.set_device(where)  # before any collective: NCCL's object messages use it
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
        group.rank, group.world = dist.get_rank(), dist.get_world_size()
        group.control = _control_group(timeout)
        # left to the interpreter's exit, a group's threads can abort the process as it ends
        atexit.register(group.close)
        return group

    @classmethod
    def _made_by_caller(cls, device: str, timeout: float) -> Group:
        # "nccl", or a group made without naming one ("undefined": NCCL for CUDA tensors where CUDA
        # is there), or "cpu:gloo,cuda:nccl"
        if "nccl" in dist.get_backend_config():
            if device == "cpu":
                raise ValueError("device: 'cpu' with the NCCL process group this program made; NCCL needs "
                                 "each process on a GPU: pass auto or cuda, or make a gloo group")
            # without LOCAL_RANK (mp.spawn, say), the GPU the program made current
            local_rank = _env_int("LOCAL_RANK", torch.cuda.current_device())
            torch.cuda.set_device(torch.device("cuda", local_rank))
        else:
            local_rank = _env_int("LOCAL_RANK", 0)
        group = cls(dist.get_rank(), dist.get_world_size(), local_rank)
        if group.world > 1:
            group.control = _control_group(timeout)
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
                                 f"{torch.cuda.device_count()} GPU(s) are visible to it; start at most that many "
                                 "processes a machine (torchrun --nproc_per_node), each seeing all of the "
                                 "machine's GPUs (CUDA_VISIBLE_DEVICES)")
            return torch.device(f"cuda:{self.local_rank}")
        raise ValueError(f"device: {name!r} with {self.world} processes; pass auto or cuda (each process then "
                         f"takes cuda:LOCAL_RANK) or cpu")

    def agree(self, error: BaseException | None = None, same: Any = None) -> list[Any]:
        """Where every process stops until all have got here: raises `error` in the process that
        had it, and `PeerFailed` naming it in the others, so that no process waits forever for one
        that failed. A failing process calls this once, in place of its next `agree`. Returns
        every process's `same` (rank order), for the caller to check that they match."""
        if self.world == 1:
            if error is not None:
                raise error
            return [same]
        report = None if error is None else f"{type(error).__name__}: {error}"
        reports: list[Any] = [None] * self.world
        dist.all_gather_object(reports, (report, same), group=self.control)
        if error is not None:
            raise error
        failed = [(rank, r) for rank, (r, _) in enumerate(reports) if r is not None]
        if failed:
            rank, report = failed[0]
            raise PeerFailed(f"process {rank} of {self.world} failed: {report}")
        return [value for _, value in reports]

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the processes, in place (no-op for one); on the training device."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max_int(self, value: int) -> int:
        """The largest of the processes' `value`s (host to host: no GPU sync)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return int(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def close(self) -> None:
        """Leave the process group this trainer made (also at the interpreter's exit). The
        processes first wait for each other, for at most a minute: one that tears its gloo groups
        down while a peer's last messages are in flight can abort as it exits (`terminate called
        without an active exception`, seen here with DDP)."""
        global _control
        if not (self.owned and dist.is_initialized()):
            return
        self.owned = False
        if self.world > 1:
            try:
                dist.monitored_barrier(group=self.control, timeout=timedelta(seconds=60))
            except RuntimeError:  # a peer that failed or left: nothing left to wait for
                pass
        dist.destroy_process_group()
        _control = None


def _control_group(timeout: float):
    """The gloo group of the default group's processes (one for each default group; every process
    must call this, as every process builds its Trainer)."""
    global _control
    world = dist.group.WORLD
    if _control is None or _control[0] is not world or _control[1] != timeout:
        _control = (world, timeout, dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout)))
    return _control[2]


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
