"""Model outputs with Transformers' field names, usable as attributes, by key and as tuples; and
the cache's two names.

Transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache`,
keeping the old name as an alias (until 5.40 for a forward, 6.0 for `generate`). Scripts of
either version run on moetorch: forwards, `prepare_inputs_for_generation` and `generate` take
either name (`takes_cache_name`), and outputs answer to both (`out.cache`, `out["cache"]`).
Outputs keep `past_key_values` as their field, the name the models' documentation gives.
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

OLD, NEW = "past_key_values", "cache"


def takes_cache_name(fn):
    """`fn` (a method with a `past_key_values` parameter or **kwargs that take it) also takes the
    cache as `cache=`. Two different caches under both names are a ValueError; one cache under
    both, or beside a None under the other, is one cache."""
    params = list(inspect.signature(fn).parameters)
    at = params.index(OLD) if OLD in params else None  # its place among the positional arguments

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if NEW in kwargs:
            new = kwargs.pop(NEW)
            positional = at is not None and len(args) > at
            given = args[at] if positional else kwargs.get(OLD)
            if new is not None and given is not None and given is not new:
                raise ValueError(f"{fn.__qualname__}(): two caches were given, as `cache` and as `past_key_values`; "
                                 "pass one (`cache` is Transformers' name since 5.24)")
            if new is not None and positional:
                args = (*args[:at], new, *args[at + 1:])
            elif new is not None:
                kwargs[OLD] = new
        return fn(*args, **kwargs)

    return wrapper


def _field_name(self, key):
    """`key`, or the cache's field where `key` is its new name and the output has the field."""
    return OLD if key == NEW and OLD in self.__dataclass_fields__ else key


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
            return dict(self.items())[_field_name(self, k)]
        return self.to_tuple()[k]

    def __contains__(self, key: object) -> bool:
        return super().__contains__(_field_name(self, key))

    def get(self, key: Any, default: Any = None) -> Any:
        return super().get(_field_name(self, key), default)

    @property
    def cache(self) -> Any:
        """The cache (`past_key_values`), by Transformers' name since 5.24."""
        if OLD not in self.__dataclass_fields__:
            raise AttributeError(f"{type(self).__name__} has no cache")
        return self.past_key_values

    def __setattr__(self, name: str, value: Any) -> None:
        name = _field_name(self, name)
        super().__setattr__(name, value)
        if name in self.__dataclass_fields__ and value is not None:
            super().__setitem__(name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        key = _field_name(self, key)
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
