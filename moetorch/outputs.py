"""Model outputs with Transformers' field names, usable as attributes, by key and as tuples."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch


class ModelOutput(OrderedDict):
    """A dataclass whose non-None fields also form an ordered dict and a tuple.

    `out.logits`, `out["logits"]` and `out[1]` (position among the non-None fields) all work,
    as in Transformers.
    """

    def __post_init__(self) -> None:
        first, *rest = fields(self)
        pairs = getattr(self, first.name)
        if isinstance(pairs, Mapping) and all(getattr(self, f.name) is None for f in rest):
            # built from a dict of its fields, as Transformers' ModelOutput is: what libraries do that
            # rebuild an output with `type(out)({...})` (accelerate casting outputs to float32 under
            # mixed precision)
            unknown = sorted(set(pairs) - {f.name for f in fields(self)})
            if unknown:
                raise ValueError(f"{type(self).__name__} has no fields {unknown}")
            super().__setattr__(first.name, None)
            for name, value in pairs.items():
                super().__setattr__(name, value)
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                super().__setitem__(f.name, v)

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, str):
            return dict(self.items())[k]
        return self.to_tuple()[k]

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in self.__dataclass_fields__ and value is not None:
            super().__setitem__(name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __iter__(self):
        return iter(self.keys())

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self[k] for k in self.keys())

    def __reduce__(self):
        return type(self), tuple(getattr(self, f.name) for f in fields(self))


@dataclass(repr=False, eq=False)
class MoeModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass(repr=False, eq=False)
class MoeCausalLMOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass(repr=False, eq=False)
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
