"""Where a model's modules go: Transformers' `device_map` and `max_memory`.

moetorch places whole modules: the embeddings (with the rotary tables), each decoder layer, the
final norm and the head. A model on one device runs every fast path (the static cache and the
CUDA-graphed steps). Modules that a plan with a GPU puts on the CPU run on a GPU, as accelerate
runs what it offloads (`run_on_gpus`): a decoder layer's MLP experts' weights stay in pinned host
memory, which the expert kernels read over the bus (`ops.moe.host_weights`), and the rest of the
module goes to the GPU. So a model too large for one GPU (Phi-3.5-MoE in bf16 on an 80 GB GPU) runs
on it with every fast path. A model placed over several GPUs runs its layers where they are,
moving the hidden state between them, with a dynamic cache.

`device_map` takes what Transformers takes:
- one device (`"cuda"`, `"cuda:1"`, `1`, `"cpu"`, a `torch.device`): the whole model there;
- `"auto"`: one GPU when the weights fit in its budget, else `"balanced"`;
- `"balanced"` (and `"balanced_low_0"`, which leaves GPU 0 half a share): the layers spread evenly
  over the GPUs; what fits on no GPU goes to the CPU;
- `"sequential"`: each GPU filled to its budget in turn, then the CPU;
- a dict of module names (`"model.layers.3"`, `"lm_head"`, `""` for everything) to devices.
A GPU's budget is `max_memory[i]` when given, else 90% of its free memory, and it covers the parts
of the units placed on the CPU that the GPU holds to run them; with `max_memory` given, only the
devices it names are used. Disk offload is not supported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .checkpoint import parse_size

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
GPU_FREE_SHARE = 0.9  # of a GPU's free memory that a plan may fill (the rest: cache and activations)
_CPU = torch.device("cpu")


def as_device(value: Any, what: str = "device_map") -> torch.device:
    """A torch.device from what Transformers accepts for one: an int (a CUDA index), a string, a device."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: {value!r} is not a device")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what}: CUDA device index must be >= 0, got {value}")
        return torch.device("cuda", value)
    if value == "disk":
        raise ValueError(f"{what}: moetorch does not offload modules to disk ('disk'); place them on a GPU or the CPU")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{what}: {value!r} is not a device ({e})") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    if device.type == "meta":
        raise ValueError(f"{what}: 'meta' holds no weights; place modules on a GPU or the CPU")
    return device


def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules placed whole, in the order the forward runs them: the base model's children with
    its `layers` one by one (the rotary tables beside the embeddings), then the model's own heads."""
    base = getattr(model, "base_model", model)
    prefix = next((name + "." for name, m in model.named_children() if m is base), "")
    out: list[tuple[str, nn.Module]] = []
    for name, child in base.named_children():
        if isinstance(child, nn.ModuleList):
            out.extend((f"{prefix}{name}.{i}", layer) for i, layer in enumerate(child))
        else:
            out.append((prefix + name, child))
    if base is not model:  # (a base model has no heads: its children are listed above)
        out.extend((name, m) for name, m in model.named_children() if m is not base)
    return out


def unit_bytes(module: nn.Module, skip: set[int]) -> int:
    tensors = [t for t in (*module.parameters(), *module.buffers()) if id(t) not in skip]
    return sum(t.numel() * t.element_size() for t in tensors)


def gpu_budgets(max_memory: Mapping | None) -> dict[torch.device, int | None]:
    """Bytes each device may take, in the order a plan fills them (GPUs by index, then the CPU;
    None: no limit). Without `max_memory`: every visible GPU at GPU_FREE_SHARE of its free memory,
    and the CPU without a limit."""
    if max_memory is None:
        budgets: dict[torch.device, int | None] = {}
        for i in range(_visible_gpus()):
            budgets[torch.device("cuda", i)] = int(torch.cuda.mem_get_info(i)[0] * GPU_FREE_SHARE)
        budgets[_CPU] = None
        return budgets
    if not isinstance(max_memory, Mapping) or not max_memory:
        raise ValueError(f"max_memory must be a dict of devices to sizes like {{0: '70GiB', 'cpu': '200GiB'}}, "
                         f"got {max_memory!r}")
    parsed = {}
    for key, size in max_memory.items():
        device = as_device(key, "max_memory")
        parsed[device] = 0 if size == 0 else parse_size(size, f"max_memory[{key!r}]")
    order = sorted(parsed, key=lambda d: (d.type != "cuda", d.index or 0))
    return {d: parsed[d] for d in order}


def plan(sizes: list[tuple[str, int]], budgets: dict[torch.device, int | None], strategy: str,
         pinned: Mapping[str, str] | None = None, resident: Mapping[str, int] | None = None
         ) -> dict[str, torch.device]:
    """A device for each unit of `sizes` ([(name, bytes)] in forward order), filling `budgets`'
    devices in order as `strategy` says. `pinned` names units that go where another unit went (a
    head tied to the embeddings; the rotary tables): they count no bytes. `resident`: the bytes of
    a unit that a GPU holds when the plan puts the unit on the CPU (it runs on that GPU,
    `run_on_gpus`: all but a decoder layer's experts); the plan leaves each GPU room for those of
    the units it runs."""
    placed = _plan(sizes, budgets, strategy, pinned)
    if not resident:
        return placed
    order, reserve = [name for name, _ in sizes], {}
    for _ in range(len(sizes)):  # more room reserved spills more units, whose parts need more room
        runs, held = run_on_gpus(placed, order)
        need: dict[torch.device, int] = {}
        for name in held:
            need[runs[name]] = need.get(runs[name], 0) + resident.get(name, 0)
        if all(n <= reserve.get(d, 0) for d, n in need.items()):
            break
        reserve = {d: max(reserve.get(d, 0), need.get(d, 0)) for d in {*reserve, *need}}
        less = {d: b if b is None or d not in reserve else max(0, b - reserve[d]) for d, b in budgets.items()}
        placed = _plan(sizes, less, strategy, pinned)
    return placed


def _plan(sizes, budgets, strategy, pinned):
    if strategy not in STRATEGIES:
        raise ValueError(f"device_map must be one of {STRATEGIES}, a device or a dict, got {strategy!r}")
    pinned = dict(pinned or {})
    gpus = [d for d in budgets if d.type == "cuda"]
    rest = [d for d in budgets if d.type != "cuda"]
    total = sum(n for name, n in sizes if name not in pinned)
    if strategy == "auto" and gpus:
        first = budgets[gpus[0]]
        if first is None or total <= first:
            return _with_pinned({name: gpus[0] for name, _ in sizes}, pinned)
    if strategy in ("auto", "balanced", "balanced_low_0") and gpus:
        shares = [0.5 if strategy == "balanced_low_0" and i == 0 and len(gpus) > 1 else 1.0 for i in range(len(gpus))]
        targets = {d: min(_limit(budgets[d]), total * s / sum(shares)) for d, s in zip(gpus, shares)}
        # the last GPU takes up to its budget, so that rounding of the shares spills nothing to the CPU
        targets[gpus[-1]] = _limit(budgets[gpus[-1]])
    else:
        targets = {d: _limit(budgets[d]) for d in gpus}
    targets.update({d: _limit(budgets[d]) for d in rest})
    order = gpus + rest
    placed: dict[str, torch.device] = {}
    used = dict.fromkeys(order, 0)
    at = 0
    for name, n in sizes:
        if name in pinned:
            continue
        # the next device whose budget holds the unit, within its target unless it is still empty
        while at < len(order) and not (
            used[order[at]] + n <= _limit(budgets[order[at]])
            and (used[order[at]] + n <= targets[order[at]] or used[order[at]] == 0)
        ):
            at += 1
        if at == len(order):
            free = ", ".join(f"{d}: {format_size(_limit(budgets[d]) - used[d])}" for d in order)
            raise torch.OutOfMemoryError(
                f"{name} ({format_size(n)}) fits on no device that remains (left after the modules before it: {free}); "
                f"moetorch does not offload to disk: raise max_memory or free memory"
            )
        placed[name] = order[at]
        used[order[at]] += n
    return _with_pinned(placed, pinned)


def _with_pinned(placed: dict[str, torch.device], pinned: Mapping[str, str]) -> dict[str, torch.device]:
    for name, to in pinned.items():
        placed[name] = placed[to]
    return placed


def from_dict(device_map: Mapping, names: list[str], optional: Mapping[str, str] | None = None
              ) -> dict[str, torch.device]:
    """The unit placement that a user's dict of module names gives. A key names a unit, a module
    that holds units (`"model"`, `"model.layers"`; `""` for all), or a module inside a unit (which
    places the unit). A unit takes the device of the most specific key that holds it and of every
    key inside it, and these must agree: a unit is not split. Units in `optional` (those the caller
    places beside another) may go unnamed, and are then left out."""
    devices = {}
    for key, value in device_map.items():
        if not isinstance(key, str):
            raise ValueError(f"device_map keys are module names, got {key!r}")
        devices[key] = as_device(value, f"device_map[{key!r}]")
        if not any(_holds(key, n) or key.startswith(n + ".") for n in names):
            raise ValueError(f"device_map names {key!r}, which is no module of this model (its modules: "
                             f"{_short(names)})")
    placement, missing = {}, []
    for n in names:
        holders = [k for k in devices if _holds(k, n)]
        wanted = {devices[k] for k in devices if k.startswith(n + ".")}
        if holders:
            wanted.add(devices[max(holders, key=len)])
        if not wanted:
            if n not in (optional or {}):
                missing.append(n)
        elif len(wanted) > 1:
            raise ValueError(f"device_map places parts of {n} on {sorted(map(str, wanted))}: moetorch places "
                             f"each decoder layer, the embeddings, the final norm and the head whole, on one device")
        else:
            placement[n] = wanted.pop()
    if missing:
        raise ValueError(f"device_map gives no device for {_short(missing)}")
    return placement


def _holds(key: str, name: str) -> bool:
    return key == "" or name == key or name.startswith(key + ".")


def run_on_gpus(placement: Mapping[str, torch.device], order: list[str]) -> tuple[dict[str, torch.device], list[str]]:
    """Where each unit runs once a placement that uses a GPU has its CPU units run on a GPU, as
    accelerate runs the modules it offloads to the CPU: on the GPU of the unit before them (the
    first GPU for those before any), with their expert weights kept in host memory and read from
    there (`ops.host`), and their other weights on that GPU. Returns ({unit: device it runs on},
    [the units placed on the CPU, in `order`]); a placement without a GPU and the CPU is returned as it is."""
    gpus = sorted({d for d in placement.values() if d.type == "cuda"}, key=lambda d: d.index)
    held = [n for n in order if placement[n].type == "cpu"]
    if not gpus or not held:
        return dict(placement), []
    runs, last = {}, gpus[0]
    for name in order:
        runs[name] = last = last if placement[name].type == "cpu" else placement[name]
    return runs, held


def check_devices(placement: Mapping[str, torch.device]) -> None:
    count = _visible_gpus()
    for name, d in placement.items():
        if d.type == "cuda" and d.index >= count:
            raise ValueError(f"device_map places {name} on {d}, but {count} CUDA device(s) are visible")


def hf_device_map(placement: Mapping[str, torch.device]) -> dict[str, int | str]:
    """Transformers' `model.hf_device_map`: CUDA devices as their index, others by name; one entry
    "" when everything is on one device."""
    values = {name: d.index if d.type == "cuda" else str(d) for name, d in placement.items()}
    if len(set(values.values())) == 1:
        return {"": next(iter(values.values()))}
    return values


def _visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _limit(budget: int | None) -> float:
    return float("inf") if budget is None else budget


def format_size(n: float) -> str:
    if n == float("inf"):
        return "unlimited"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 // 10 else f"{n / 2**20:.1f} MiB"


def _short(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
