"""Key/value caches: `DynamicCache` (grows by concatenation) and `StaticCache` (preallocated).

Legend: B batch, G kv heads, S cached slots, T new tokens, d head_dim.
Both keep the number of cached tokens as a host-side integer, so that no decode step needs to read
a device value.

LongRoPE models also keep a replay record: the decoder inputs (embeddings and rotary positions) of
the first `original_max_position_embeddings` tokens, and which factor set the cached K/V were
computed with. When a sequence crosses the threshold, the model rebuilds the cache from that
record with the other factors, which gives exactly what a forward from scratch gives. (Rotating
the cached keys alone would fix only the first layer: deeper layers' keys and values depend on
hidden states that were themselves computed with the old factors.)
"""

from __future__ import annotations

from numbers import Integral

import torch

from .ops import fused
from .ops.attention import Mixed, Packed
from .ops.host import to_device
from .ops.linear import linears_rotated
from .ops.rope import apply_rotary_qk

# The most bytes one step of StaticCache.reorder_cache copies at once (its temporary's size).
REORDER_CHUNK_BYTES = 256 * 2**20


def _carry_over_hint(cache) -> str:
    """For the error refusing another library's cache: how its layers carry over, where they can
    (Transformers 5's caches iterate as (keys, values, ...) a layer)."""
    if type(cache).__module__.startswith("transformers") and hasattr(cache, "__iter__"):
        return " (its layers carry over: moetorch.DynamicCache(ddp_cache_data=cache))"
    return ""


class Cache:
    """Common interface, as in Transformers: `update`, `get_seq_length`, `reorder_cache`, ..."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        # cached K/V were computed with the LongRoPE long factors (None: with neither set throughout,
        # after a failed forward that was computing them again: the next one recomputes them)
        self.rope_long: bool | None = False
        self.replay_embeds: torch.Tensor | None = None  # [B, L, D] inputs of the first L tokens
        self.replay_positions: torch.Tensor | None = None  # [B, L] their rotary positions
        self._seen = 0

    # [B, S] or None: the row whose storage holds each slot's key and value (StaticCache under beam
    # search, `use_slot_rows`); None: row b's slots are its own.
    slot_rows: torch.Tensor | None = None
    # Whether LongRoPE's replay record is kept (`record_inputs`). A continuous-batching cache turns
    # it off: its rows hold sequences that never reach the long factors (engine/batching.py).
    records_inputs = True
    # Set by a cache of packed sequences (`PackedRows`): the forward attends with it as its mask.
    packed: Packed | None = None
    # LongRoPE's factor set per position, set by its user (continuous batching, whose rows each
    # have their own): a tensor broadcastable to the forward's positions, nonzero where the long
    # factors apply. None: chosen from the sequence's length (`modeling_utils.sync_rope_cache`).
    rope_long_BT: torch.Tensor | None = None
    # Slots past the largest position + 1 (LongRoPE's sequence length): left-padding columns that
    # every row has, set by `generate` before each forward, or by a forward that starts the cache
    # with positions (`modeling_utils.rope_length`; negative for positions past the slots). The
    # steps after it count the sequence length on the host: cached + new tokens less these.
    rope_pad: int = 0

    # Layers a dynamic cache made empty, before their first update, because a later layer was
    # updated first: not yet initialized, as Transformers' lazily made layers.
    _unset: frozenset[int] = frozenset()

    # The layers a cache counts before it makes them: a config's (`DynamicCache(config=)`, a
    # StaticCache's) or those a `reset` emptied; None: the layers made so far.
    num_layers: int | None = None

    def __len__(self) -> int:
        """The layers the cache holds: those made so far, else its layer count (a static cache, a
        dynamic one made from a config or reset), as Transformers counts its layers."""
        return len(self.keys) or self.num_layers or 0

    def crop(self, max_length: int) -> None:
        """Transformers 5's crop: a negative n drops the last -n tokens (all of them, at most), 0
        drops none. A positive n keeps the first n tokens (Transformers 4's form, which 5 refuses).
        `truncate` keeps a given length, 0 included."""
        if max_length < 0:
            self.truncate(max(self.get_seq_length() + max_length, 0))
        elif max_length > 0:
            self.truncate(max_length)

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens (none past the cached ones)."""
        raise NotImplementedError

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformers 4's `cache[i]`: layer i's (keys, values)."""
        return self.keys[layer_idx], self.values[layer_idx]

    def __iter__(self):
        """Transformers 5's iteration: (keys, values, sliding-window tensor) a layer, the last None
        here (a window is a mask, the cache keeps every position); `DynamicCache(ddp_cache_data=c)`
        takes these back."""
        return ((k, v, None) for k, v in zip(self.keys, self.values))

    @property
    def layers(self) -> list[CacheLayer]:
        """Each layer as Transformers 5's `cache.layers[i]`: `.keys` / `.values`, which may be set
        (None before the layer's first update)."""
        return [CacheLayer(self, i) for i in range(len(self))]

    def _set_layer(self, layer_idx: int, name: str, tensor: torch.Tensor) -> None:
        """`cache.layers[i].keys = t` (or `.values`): a dynamic cache takes `t` in place of the
        layer's tensor (whose length is then the layer's)."""
        if layer_idx >= len(self.keys) or layer_idx in self._unset:
            raise ValueError(f"cache.layers[{layer_idx}].{name}: the layer holds no keys yet, so there is nothing to "
                             "replace; fill the cache with a forward first, or start it from tensors with "
                             "DynamicCache(ddp_cache_data=[(keys, values), ...])")
        getattr(self, name)[layer_idx] = tensor

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of cached tokens (a host integer; no device read)."""
        return self._seen if len(self.keys) > layer_idx else 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int | None:
        return None

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Transformers 5's mask builders' position of the first new query: the cached tokens."""
        return self.get_seq_length(layer_idx)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """Transformers 5's name: the slots a layer holds at most, -1 for none (a dynamic cache)."""
        most = self.get_max_cache_shape()
        return -1 if most is None else most

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset) of a forward of `query_length` new tokens, as Transformers' mask
        builders read them: the cached and new tokens of a dynamic cache, every slot of a static
        one (before its first update too)."""
        most = self.get_max_cache_shape()
        return (self.get_seq_length(layer_idx) + query_length if most is None else most), 0

    @property
    def is_sliding(self) -> list[bool]:
        """Whether each layer keeps a sliding window of its keys (none here: the window is a mask)."""
        return [False] * len(self)

    @property
    def is_linear(self) -> list[bool]:
        """Whether each layer is a linear-attention state (none here)."""
        return [False] * len(self)

    @property
    def is_dummy(self) -> list[bool]:
        """Whether each layer shares another's keys and stores none (none here)."""
        return [False] * len(self)

    def activate_past_recording(self) -> None:
        """Transformers 5's call before a step it may roll back (for layers that drop old states): a
        no-op, these caches keep every position and `crop` rolls back any step."""

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        """Whether every layer holds keys (as Transformers: a layer not yet updated makes it False)."""
        return len(self.keys) > 0 and not self._unset

    @property
    def is_croppable(self) -> bool:
        return True

    @property
    def batch_size(self) -> int:
        """The rows the cache holds; -1 before its first update."""
        return self.keys[0].shape[0] if self.keys else -1

    def kv_length(self, new_tokens: int) -> int:
        """Key length the attention sees after adding `new_tokens`."""
        return self.get_seq_length() + new_tokens

    @property
    def is_static(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        """As Transformers' caches: True for a static cache (its steps can be captured), else False."""
        return self.is_static

    def record_inputs(
        self, embeds_BTD: torch.Tensor, position_ids_BT: torch.Tensor, cache_position_T: torch.Tensor, limit: int
    ) -> None:
        """Keep the inputs of tokens at slots < `limit`. Written at `cache_position` on the device
        (slots past the limit land in one spare slot), so a CUDA-graph replay records correctly."""
        B, T, D = embeds_BTD.shape
        if self.replay_embeds is None or self.replay_embeds.shape[0] != B:
            self.replay_embeds = embeds_BTD.new_zeros(B, limit + 1, D)
            self.replay_positions = torch.zeros(B, limit + 1, dtype=torch.long, device=embeds_BTD.device)
        elif self.replay_embeds.shape[1] < limit + 1:  # a longer limit (a padded batch's): the record grows
            old_embeds, old_positions, n = self.replay_embeds, self.replay_positions, self.replay_embeds.shape[1] - 1
            self.replay_embeds = old_embeds.new_zeros(B, limit + 1, D)
            self.replay_positions = old_positions.new_zeros(B, limit + 1)
            self.replay_embeds[:, :n] = old_embeds[:, :n]
            self.replay_positions[:, :n] = old_positions[:, :n]
        slot_T = cache_position_T.clamp(max=limit)
        if torch.is_grad_enabled() and embeds_BTD.requires_grad:
            # kept with their gradients, so that a rebuild's loss reaches the embeddings it replays
            self.replay_embeds = self.replay_embeds.index_copy(1, slot_T, embeds_BTD.to(self.replay_embeds.dtype))
        else:
            self.replay_embeds.index_copy_(1, slot_T, embeds_BTD.detach().to(self.replay_embeds.dtype))
        self.replay_positions.index_copy_(1, slot_T, position_ids_BT.expand(B, -1).to(self.replay_positions.dtype))

    def replay(self, past_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and positions of the `past_len` cached tokens, for rebuilding the cache."""
        if self.replay_embeds is None or past_len > self.replay_embeds.shape[1] - 1:
            raise RuntimeError(
                f"cannot rebuild a LongRoPE cache of {past_len} tokens: its inputs were not recorded "
                "(was this cache filled by another model?)"
            )
        rows = self.slot_rows
        if rows is not None:  # recorded like the keys: slot s of row b in row rows[b, s]
            slots = torch.arange(past_len, device=rows.device)
            return self.replay_embeds[rows[:, :past_len], slots], self.replay_positions[rows[:, :past_len], slots]
        return self.replay_embeds[:, :past_len], self.replay_positions[:, :past_len]

    def clear(self) -> None:
        """Forget the cached keys and values (the replay record stays)."""
        self._seen = 0

    def snapshot(self) -> tuple:
        """What `restore` puts back after a forward that failed inside its layers (out of memory, an
        interrupt): the token count and LongRoPE's state."""
        return self._seen, self.rope_long, self.rope_pad

    def restore(self, state: tuple, recomputing: bool) -> None:
        """Back to `state` (`snapshot`'s) after a failed forward: the tokens cached before it, none of
        its own. `recomputing`: the forward was computing the cached tokens again under LongRoPE's
        other factors (`modeling_utils.sync_rope_cache`)."""
        self._seen, self.rope_long, self.rope_pad = state

    def _batch_apply_replay(self, fn) -> None:
        if self.replay_embeds is not None:
            self.replay_embeds = fn(self.replay_embeds)
            self.replay_positions = fn(self.replay_positions)


    def update_rotated(self, query_states, key_states, value_states, cos, sin, layer_idx, cache_kwargs=None):
        """The rotary embedding of queries and keys, then `update`: (queries, all keys, all values);
        queries None: the keys alone are rotated (None comes back).
        A static cache at inference does it in one kernel, rotating the keys into their slots."""
        query_states, key_states = apply_rotary_qk(query_states, key_states, cos, sin)
        return (query_states, *self.update(key_states, value_states, layer_idx, cache_kwargs))

    def project_rotated(self, x_BTD, layers, head_dim, cos, sin, layer_idx, cache_kwargs=None, experts=None):
        """(rotated queries, all keys, all values) from the q/k/v projections `layers` of x, the
        cache updated, in one kernel; None where no such kernel serves (a static cache at inference
        has one), and the caller then projects and calls `update_rotated`. `layers` = (kv_proj,),
        whose outputs are keys then values: the queries come back None, or with `experts` (JetMoE's
        MoA map weight and ids) at one row its unrotated projection (see ops.linear.linears_rotated)."""
        return None


def slot_major_bytes(layers: int, rows: int, slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of a slot-major cache (`slot_major`)."""
    return rows * slots * 2 * layers * kv_heads * head_dim * dtype.itemsize


def slot_major(storage: torch.Tensor, layers: int, rows: int, slots: int, kv_heads: int, head_dim: int,
               dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [layers, rows, kv heads, slots, head_dim] as views of `storage` (flat uint8)
    laid out [rows, slots, 2, layers, kv heads, head_dim]: each slot's keys and values for every
    layer lie together, and a row's slots follow each other, so that the slots a row uses are one
    range of bytes (`engine.pages` backs only those)."""
    need = slot_major_bytes(layers, rows, slots, kv_heads, head_dim, dtype)
    if storage.numel() < need:
        raise ValueError(f"StaticCache: storage holds {storage.numel()} bytes, {rows} rows x {slots} slots x "
                         f"{layers} layers x 2 x {kv_heads} heads x {head_dim} of {dtype} need {need}")
    device = torch.device(device)
    if storage.device.type != device.type or device.index not in (None, storage.device.index):
        raise ValueError(f"StaticCache: storage is on {storage.device}, the keys on {device}")
    x = storage[:need].view(dtype).view(rows, slots, 2, layers, kv_heads, head_dim)
    return x[:, :, 0].permute(2, 0, 3, 1, 4), x[:, :, 1].permute(2, 0, 3, 1, 4)


def _per_layer(t: torch.Tensor) -> list[torch.Tensor]:
    """A layer's view each of `t` [layers, ...]: one `select` view apiece, not `unbind`'s, whose
    views autograd never lets a forward with gradients on write in place."""
    return [t[i] for i in range(t.shape[0])]


class CacheLayer:
    """One layer of a cache, as Transformers 5's `cache.layers[i]`: its `keys` and `values` ([B,
    kv heads, slots, head dim]), which may be set (a dynamic cache takes the new tensor, a static
    one copies it into its slots), and its length."""

    def __init__(self, cache: Cache, layer_idx: int) -> None:
        self._cache, self._idx = cache, layer_idx

    @property
    def keys(self) -> torch.Tensor | None:
        return self._cache.keys[self._idx] if self.is_initialized else None

    @keys.setter
    def keys(self, tensor: torch.Tensor) -> None:
        self._cache._set_layer(self._idx, "keys", tensor)

    @property
    def values(self) -> torch.Tensor | None:
        return self._cache.values[self._idx] if self.is_initialized else None

    @values.setter
    def values(self, tensor: torch.Tensor) -> None:
        self._cache._set_layer(self._idx, "values", tensor)

    @property
    def is_initialized(self) -> bool:
        return self._idx < len(self._cache.keys) and self._idx not in self._cache._unset

    def get_seq_length(self) -> int:
        return self._cache.get_seq_length(self._idx)

    # Transformers 5's other layer members, read from the cache
    @property
    def is_sliding(self) -> bool:
        return False  # (a sliding window is a mask here: the layer keeps every position)

    @property
    def is_compileable(self) -> bool:
        return self._cache.is_compileable

    @property
    def is_croppable(self) -> bool:
        return not self._cache.is_static

    @property
    def max_cache_len(self) -> int:
        if not self._cache.is_static:
            raise AttributeError("a dynamic cache's layer has no max_cache_len (it grows): see get_max_length()")
        return self._cache.max_cache_len

    @property
    def dtype(self) -> torch.dtype | None:
        return self.keys.dtype if self.is_initialized else None

    @property
    def device(self) -> torch.device | None:
        return self.keys.device if self.is_initialized else None

    def get_max_length(self) -> int:
        return self._cache.get_max_length(self._idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.get_mask_sizes(query_length, self._idx)

    def reset(self) -> None:
        """Empty this layer (a dynamic cache's) or zero its slots (a static cache's, whose token
        count all layers share: `cache.reset()` forgets them)."""
        if not self.is_initialized:
            return
        if self._cache.is_static:
            self.keys.zero_()
            self.values.zero_()
            return
        empty = self.keys[..., :0, :]
        self._cache.keys[self._idx], self._cache.values[self._idx] = empty, self.values[..., :0, :]

    def crop(self, tokens_to_remove: int) -> None:
        """Transformers 5's layer crop: drop this layer's last `-tokens_to_remove` tokens (a dynamic
        cache's; a static cache's layers have none, as Transformers' have not)."""
        if self._cache.is_static:
            raise AttributeError("a static cache's layer has no crop (its token count is the cache's): use "
                                 "cache.crop(-n)")
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): a layer's crop takes the negative count of the tokens to "
                             "drop, as Transformers' does")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        keep = max(self.keys.shape[-2] + tokens_to_remove, 0)
        self._cache.keys[self._idx] = self.keys[..., :keep, :]
        self._cache.values[self._idx] = self.values[..., :keep, :]


class DynamicCache(Cache):
    """A cache that grows by concatenation on every update.

    Takes Transformers' arguments: `ddp_cache_data`, each layer's (keys, values) to start from;
    `config`, whose layer count the cache counts before its first update (it keeps every
    position, sliding-window layers too); `offloading`, not supported."""

    def __init__(self, ddp_cache_data=None, config=None, offloading: bool = False,
                 offload_only_non_sliding: bool = False) -> None:
        super().__init__()
        self.num_layers = getattr(config, "num_hidden_layers", None)
        if offloading:
            raise NotImplementedError("DynamicCache(offloading=True): moetorch has no offloaded cache; "
                                      "use a DynamicCache or a StaticCache on the model's device")
        for layer_idx, (keys, values, *_) in enumerate(ddp_cache_data or ()):
            self.update(keys, values, layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of tokens cached in layer `layer_idx` (0 before its first update)."""
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if len(self.keys) <= layer_idx:
            # layers before this one not yet updated (a pipeline stage's first layer, say) start
            # empty, as Transformers' lazily made layers: length 0 until their first update
            self._unset = self._unset | set(range(len(self.keys), layer_idx))
            for dst, src in ((self.keys, key_states), (self.values, value_states)):
                dst.extend(src.new_empty(*src.shape[:-2], 0, src.shape[-1]) for _ in range(layer_idx - len(dst)))
            self.keys.append(key_states)
            self.values.append(value_states)
        else:
            held = self.keys[layer_idx]
            if (held.shape[0], held.shape[1], held.shape[-1]) != (key_states.shape[0], key_states.shape[1],
                                                                   key_states.shape[-1]):
                raise ValueError(f"past_key_values: the DynamicCache's layer {layer_idx} holds keys of {held.shape[0]} "
                                 f"rows of {held.shape[1]} kv heads of size {held.shape[-1]}, and the forward gives "
                                 f"{key_states.shape[0]} rows of {key_states.shape[1]} heads of size "
                                 f"{key_states.shape[-1]} (a cache serves the model and batch that filled it)")
            self._unset = self._unset - {layer_idx}
            self.keys[layer_idx] = torch.cat([held, key_states], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_states], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def clear(self) -> None:
        super().clear()
        self.keys, self.values, self._unset = [], [], frozenset()

    def snapshot(self) -> tuple:
        # (the layers' tensors too: an update concatenates into new ones, so these stay as they are)
        return super().snapshot(), list(self.keys), list(self.values), self._unset

    def restore(self, state: tuple, recomputing: bool) -> None:
        base, self.keys, self.values, self._unset = state
        super().restore(base, recomputing)

    def crop(self, max_length: int) -> None:
        """As `Cache.crop`; a negative n drops the last -n tokens of each layer (of its own length)."""
        if max_length >= 0:
            return super().crop(max_length)
        self.keys = [k[..., :max(k.shape[-2] + max_length, 0), :] for k in self.keys]
        self.values = [v[..., :max(v.shape[-2] + max_length, 0), :] for v in self.values]

    def truncate(self, length: int) -> None:
        if all(k.shape[-2] <= length for k in self.keys):
            return
        self.keys = [k[..., :length, :] for k in self.keys]
        self.values = [v[..., :length, :] for v in self.values]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        # the layers (and their keys) of a model placed over several devices sit on several devices
        self.keys = [k[indices.to(k.device)] for k in self.keys]
        self.values = [v[indices.to(v.device)] for v in self.values]
        self._batch_apply_replay(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch (beam search)."""
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.keys = [k.repeat_interleave(repeats, dim=0) for k in self.keys]
        self.values = [v.repeat_interleave(repeats, dim=0) for v in self.values]
        self._batch_apply_replay(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        """Empty every layer; the cache still counts them (Transformers' reset keeps its layers)."""
        layers = len(self)
        self.__init__()
        self.num_layers = layers or None

    def to_legacy_cache(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        return tuple(zip(self.keys, self.values))

    @classmethod
    def from_legacy_cache(cls, past: tuple[tuple[torch.Tensor, torch.Tensor], ...]) -> DynamicCache:
        cache = cls()
        for i, (k, v) in enumerate(past):
            cache.update(k, v, i)
        return cache


class StaticCache(Cache):
    """A preallocated cache of `max_cache_len` slots, written in place at `cache_position`.

    Decode steps write without allocating or reading device values, so a step can be captured in
    a CUDA graph. Storage is allocated at the first update (batch, heads, dtype and device taken
    from the keys), as Transformers 5 allocates it, or up front by `early_initialization`, or by
    Transformers 4's `max_batch_size` (`batch_size`), `device` and `dtype` together; storage made
    up front that the first keys do not fit (another batch, dtype or device) is made again from
    them, as Transformers 5, which ignores those three, allocates. Transformers 4's `layer_device_map`
    and `tp_size` are taken and mean nothing here.
    """

    def __init__(
        self,
        config=None,
        max_cache_len: int | None = None,
        max_batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        num_layers: int | None = None,
        storage: torch.Tensor | None = None,
        offloading: bool = False,
        offload_only_non_sliding: bool = True,
        batch_size: int | None = None,
        layer_device_map: dict | None = None,
        tp_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size is not None:  # (Transformers 4.4x's name of max_batch_size)
            if max_batch_size is not None and max_batch_size != batch_size:
                raise ValueError(f"StaticCache: batch_size={batch_size} and max_batch_size={max_batch_size} differ "
                                 "(batch_size is the older name of max_batch_size: pass one)")
            max_batch_size = batch_size
        if offloading:  # (Transformers 5's keywords: `offload_only_non_sliding` means nothing without it)
            raise ValueError("StaticCache: offloading=True (layers kept in host memory) is not supported; "
                             "a model placed over several devices uses a DynamicCache instead")
        if max_cache_len is None:
            if config is None:
                raise ValueError("StaticCache needs `max_cache_len` (or a config with max_position_embeddings)")
            max_cache_len = config.max_position_embeddings
        if not (isinstance(max_cache_len, Integral) and not isinstance(max_cache_len, bool) and max_cache_len > 0):
            raise ValueError(f"StaticCache: max_cache_len must be a positive integer, got {max_cache_len!r}")
        self.max_cache_len = int(max_cache_len)
        self._rows: torch.Tensor | None = None  # slot_rows' storage, once used (graphs keep its address)
        # layer -> (keys, values) carrying gradients, from forwards with gradients on (`_write_tracked`),
        # and the token count after the last of them: valid while no other write came after it
        self._grad_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._grad_seen: int | None = None
        self.num_layers = num_layers or (config.num_hidden_layers if config is not None else None)
        self._config = config
        if storage is not None and (storage.dtype != torch.uint8 or storage.dim() != 1):
            raise ValueError(f"StaticCache: storage must be a flat uint8 tensor, got {storage.dtype} "
                             f"{tuple(storage.shape)}")
        self._storage = storage
        self._early = False  # storage made up front, before any keys: made again if they do not fit it
        if max_batch_size is not None and device is not None and dtype is not None and config is not None:
            kv_heads, head_dim = _kv_shape(config)
            self._allocate(max_batch_size, kv_heads, head_dim, torch.device(device), dtype)
            self._early = True

    def early_initialization(self, batch_size: int, num_heads: int | list[int], head_dim: int | list[int],
                             dtype: torch.dtype, device: torch.device | str) -> None:
        """Transformers 5's allocation ahead of the first update (for `torch.export` and compiled
        prefills): `num_heads` and `head_dim` the kv heads' count and width, one value or one per
        layer (these models' layers all share them)."""
        n = self.num_layers
        if n is None:
            raise ValueError("StaticCache.early_initialization needs the cache's layer count (config or num_layers)")
        shape = []
        for name, value in (("num_heads", num_heads), ("head_dim", head_dim)):
            values = [value] * n if isinstance(value, int) else list(value)
            if len(values) != n:
                raise ValueError(f"StaticCache.early_initialization: {name} has {len(values)} entries for a cache "
                                 f"of {n} layers")
            if len(set(values)) != 1:
                raise ValueError(f"StaticCache.early_initialization: {name} differs between layers ({values}); a "
                                 "StaticCache here holds one shape for every layer")
            shape.append(values[0])
        if self.keys:
            return  # (initialized already: Transformers leaves such layers as they are)
        self._allocate(batch_size, *shape, torch.device(device), dtype)
        self._early = True

    @property
    def is_static(self) -> bool:
        return True

    def _set_layer(self, layer_idx: int, name: str, tensor: torch.Tensor) -> None:
        """`cache.layers[i].keys = t`: copied into the layer's slots, which keep their storage
        (graphs replay from it); `t` must have the slots' shape."""
        slots = getattr(self, name)[layer_idx]
        if tensor.shape != slots.shape:
            raise ValueError(f"StaticCache.layers[{layer_idx}].{name}: expected a tensor of the slots' shape "
                             f"{tuple(slots.shape)}, got {tuple(tensor.shape)} (a static cache keeps its storage)")
        slots.copy_(tensor)
        self._grad_kv.pop(layer_idx, None)

    def _allocate(self, B: int, G: int, d: int, device: torch.device, dtype: torch.dtype) -> None:
        self._early = False  # (set again by the callers that allocate up front)
        self._rows, self.slot_rows = None, None  # (a slot-row table of the storage it replaces)
        n = self.num_layers
        if n is None:
            raise ValueError("StaticCache needs `config` or `num_layers` to allocate its storage")
        if self._storage is not None:
            self._all = slot_major(self._storage, n, B, self.max_cache_len, G, d, dtype, device)
        else:
            # One tensor each for all layers' keys and values (a layer's are views of it): reordering
            # and zeroing them take a launch or two, not one per layer.
            shape = (n, B, G, self.max_cache_len, d)
            self._all = (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        self.keys, self.values = _per_layer(self._all[0]), _per_layer(self._all[1])

    def _fits(self, B: int, G: int, d: int, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether the storage takes keys of this shape, device and dtype; storage made up front that
        does not, before anything is written, is made again (False), as Transformers makes it from the
        first keys. Otherwise True (a batch that does not fit is then `_slots`' error)."""
        if not self._early or self._seen:
            return True
        k = self.keys[0]
        return (k.shape[0], k.shape[1], k.shape[-1], k.device, k.dtype) == (B, G, d, device, dtype)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_cache_len

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen

    def kv_length(self, new_tokens: int) -> int:
        if self._seen + new_tokens > self.max_cache_len:
            raise ValueError(
                f"StaticCache is full: {self._seen} cached + {new_tokens} new tokens exceed "
                f"max_cache_len={self.max_cache_len}"
            )
        return self.max_cache_len

    def _positions(self, T, device, cache_kwargs, layer_idx):
        # the new tokens' slots: `cache_position` when given, else the T after the cached ones (which
        # layer 0's write has counted already for the layers after it)
        cache_position = (cache_kwargs or {}).get("cache_position")
        if cache_position is not None:
            return cache_position
        start = self._seen if layer_idx == 0 else self._seen - T
        return torch.arange(start, start + T, device=device)

    def _slots(self, key_states, layer_idx, cache_kwargs):
        # (key storage, value storage, slots of the new tokens), allocating on first use
        B, G, T, d = key_states.shape
        if not self.keys or not self._fits(B, G, d, key_states.device, key_states.dtype):
            self._allocate(B, G, d, key_states.device, key_states.dtype)
        self._early = False  # (the storage holds keys now: kept from here on, through `reset` too)
        k, v = self.keys[layer_idx], self.values[layer_idx]
        self._check_rows(k, B, G, d, layer_idx)
        cache_position = self._positions(T, key_states.device, cache_kwargs, layer_idx)
        if layer_idx == 0:
            if self._grad_seen != self._seen:  # other writes came after the last tracked step
                self._grad_kv.clear()
            self._seen += T
        return k, v, cache_position

    @staticmethod
    def _check_rows(k: torch.Tensor, B: int, G: int, d: int, layer_idx: int) -> None:
        """Keys of another batch, or of another model's heads, are an error before the cache counts
        or writes them (a failed step must leave it as it was)."""
        if (k.shape[0], k.shape[1], k.shape[-1]) != (B, G, d):
            raise ValueError(f"past_key_values: the StaticCache holds {k.shape[0]} rows of {k.shape[1]} kv heads of "
                             f"size {k.shape[-1]}, and layer {layer_idx} gives keys of {B} rows of {G} heads of size "
                             f"{d} (reset() does not change its rows: make a cache for this batch and model)")

    def update_rotated(self, query_states, key_states, value_states, cos, sin, layer_idx, cache_kwargs=None):
        k, v, cache_position = self._slots(key_states, layer_idx, cache_kwargs)
        if fused.active(key_states, query_states, value_states, cos, sin, k) and key_states.shape[-1] % 2 == 0:
            q = fused.kernels().rope_qk_cache(query_states, key_states, value_states, cos, sin, k, v, cache_position)
            return q, k, v
        query_states, key_states = apply_rotary_qk(query_states, key_states, cos, sin)
        return (query_states, *self._write(key_states, value_states, k, v, cache_position, layer_idx))

    def project_rotated(self, x_BTD, layers, head_dim, cos, sin, layer_idx, cache_kwargs=None, experts=None):
        B, T, _ = x_BTD.shape
        kv_width = layers[1].out_features if len(layers) == 3 else layers[0].out_features // 2
        if not self.keys or not self._fits(B, kv_width // head_dim, head_dim, x_BTD.device, x_BTD.dtype):
            if not fused.active(x_BTD):
                return None  # `update` allocates
            self._allocate(B, kv_width // head_dim, head_dim, x_BTD.device, x_BTD.dtype)
        self._early = False
        k, v = self.keys[layer_idx], self.values[layer_idx]
        self._check_rows(k, B, kv_width // head_dim, head_dim, layer_idx)
        slots = (k, v, self._positions(T, x_BTD.device, cache_kwargs, layer_idx))
        out = linears_rotated(x_BTD, layers, head_dim, cos, sin, slots, experts)
        if out is not None and layer_idx == 0:
            self._seen += T
        return out

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        k, v, cache_position = self._slots(key_states, layer_idx, cache_kwargs)
        return self._write(key_states, value_states, k, v, cache_position, layer_idx)

    def _write(self, key_states, value_states, k, v, cache_position, layer_idx):
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad
                                        or layer_idx in self._grad_kv):
            return self._write_tracked(key_states, value_states, cache_position, layer_idx)
        if fused.active(key_states, value_states, k):
            fused.kernels().kv_write(key_states, value_states, k, v, cache_position)
        else:
            k.index_copy_(2, cache_position, key_states.to(k.dtype))
            v.index_copy_(2, cache_position, value_states.to(v.dtype))
        return k, v

    def _write_tracked(self, key_states, value_states, cache_position, layer_idx):
        # With gradients on: this layer's keys and values as new tensors that carry them, where
        # an in-place write would fail the backward (all layers' views share one storage, and
        # autograd rejects a saved tensor whose storage was written after). The next tracked step
        # continues from them, so a loss over several steps reaches every step's keys, as
        # Transformers' own in-place writes do. The storage gets the new slots' values.
        k, v = self._grad_kv.get(layer_idx, (self.keys[layer_idx], self.values[layer_idx]))
        key_states, value_states = key_states.to(k.dtype), value_states.to(v.dtype)
        k, v = k.index_copy(2, cache_position, key_states), v.index_copy(2, cache_position, value_states)
        with torch.no_grad():
            self.keys[layer_idx].index_copy_(2, cache_position, key_states)
            self.values[layer_idx].index_copy_(2, cache_position, value_states)
        self._grad_kv[layer_idx] = (k, v)
        self._grad_seen = self._seen
        return k, v

    def truncate(self, length: int) -> None:
        self._seen = min(self._seen, length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch in place (beam search), so that graphs keep reading the same storage.
        With `slot_rows` in use only that index table moves. Otherwise the filled slots move: the
        others hold nothing a later step reads. All layers move at once, in groups whose copy stays
        within REORDER_CHUNK_BYTES."""
        self._grad_kv.clear()
        n = self._seen
        if self.keys and len(beam_idx) != self.keys[0].shape[0]:
            return self._resize_batch(beam_idx)
        if self.slot_rows is not None:
            if n:
                self.slot_rows[:, :n] = self.slot_rows[beam_idx, :n]
            return
        for filled in self._filled(n):
            filled.copy_(filled.index_select(1, beam_idx))
        for t in self._replay_record(n):
            t.copy_(t.index_select(0, beam_idx))

    def _resize_batch(self, index: torch.LongTensor) -> None:
        """`reorder_cache` with an index of another length: the batch becomes those rows, in new
        storage (as Transformers' static layers take `index_select`'s tensors). Graphs captured on
        the old storage no longer read this cache."""
        rows = self.keys[0].shape[0]
        if self._storage is not None or self.slot_rows is not None:
            raise ValueError(f"StaticCache.reorder_cache: {len(index)} indices for a cache of {rows} rows; this "
                             "cache's storage is shared (a batching engine's or one under beam search) and keeps "
                             "its row count")
        index = torch.as_tensor(index, device=self.keys[0].device)
        self._all = tuple(t.index_select(1, index) for t in self._all)
        self.keys, self.values = _per_layer(self._all[0]), _per_layer(self._all[1])
        self._early, self._rows = False, None
        self._batch_apply_replay(lambda t: t.index_select(0, index.to(t.device)))

    def _filled(self, n: int):
        # the keys' and values' first n slots, [layers, B, G, n, d] views of groups of layers whose
        # copy stays within REORDER_CHUNK_BYTES
        if not (n and self.keys):
            return
        L = len(self.keys)
        layer_bytes = self.keys[0][:, :, :n].numel() * self.keys[0].element_size()
        group = max(1, min(L, REORDER_CHUNK_BYTES // max(layer_bytes, 1)))
        for t in self._all:
            for first in range(0, L, group):
                yield t[first : first + group, :, :, :n]

    def _replay_record(self, n: int) -> tuple[torch.Tensor, ...]:
        # LongRoPE's record of the first n slots (views: reordered in place, as graphs write there)
        if self.replay_embeds is None:
            return ()
        m = min(n, self.replay_embeds.shape[1])
        return self.replay_embeds[:, :m], self.replay_positions[:, :m]

    def use_slot_rows(self) -> None:
        """Beam search without moving keys and values: from now on `reorder_cache` reorders
        `slot_rows` ([B, S], each slot's row of storage), and attention reads each row's keys and
        values through it. A step writes every row's new slot into that row's own storage, and no
        slot is written twice, so rows share the slots of their common past. `settle_slot_rows`
        moves the slots into their own rows and ends it."""
        self._grad_kv.clear()
        if not self.keys:
            raise RuntimeError("StaticCache.use_slot_rows: no storage yet (it is allocated by the first update)")
        if self._rows is None:
            self._rows = self._identity_rows()
        self.slot_rows = self._rows

    def _identity_rows(self) -> torch.Tensor:
        B, S = self.keys[0].shape[0], self.max_cache_len
        return torch.arange(B, device=self.keys[0].device)[:, None].expand(B, S).contiguous()

    def settle_slot_rows(self) -> None:
        """Move each filled slot's key and value (and LongRoPE's record) into the row that reads it,
        so that every row's slots are its own again (what `reorder_cache` would have left)."""
        self._grad_kv.clear()
        rows = self.slot_rows
        if rows is None:
            return
        n = self._seen
        src_Bn, slots = rows[:, :n], torch.arange(n, device=rows.device)
        for filled in self._filled(n):
            # [B, n, layers, G, d] gathered (a copy), then written back as [layers, B, G, n, d]
            filled.copy_(filled[:, src_Bn, :, slots].permute(2, 0, 3, 1, 4))
        for t in self._replay_record(n):
            m = t.shape[1]
            t.copy_(t[src_Bn[:, :m], slots[:m]])
        rows.copy_(self._identity_rows())
        self.slot_rows = None

    def rows_view(self, step: int, batch: int, device, dtype) -> StaticCache:
        """A StaticCache over rows 0, step, 2*step, ... of this one's storage (allocated here first
        for `batch` rows if it is not yet), empty, with its own token count and LongRoPE state:
        what a forward writes into it lands in those rows. `take_prompt` then hands the prompt over.
        Storage made up front for another batch is made again, as the first keys would make it;
        storage that held keys keeps its rows (through `reset` too), as `update` keeps them."""
        device, heads = torch.device(device), self._kv_heads()
        if not self.keys or not self._fits(batch, *heads, device, dtype):
            self._allocate(batch, *heads, device, dtype)
        self._early = False  # (the view writes into the storage)
        rows = self.keys[0].shape[0]
        if rows != batch:
            raise ValueError(f"past_key_values: the StaticCache holds {rows} rows, and generate runs {batch} (the "
                             "batch times num_beams or num_return_sequences; reset() does not change its rows: make a "
                             "cache for this batch)")
        if step < 1 or rows % step:
            raise ValueError(f"StaticCache.rows_view: step must be a positive divisor of the {rows} rows, got {step}")
        return self.rows_slice(slice(None, None, step))

    def _kv_heads(self) -> tuple[int, int]:
        """(kv heads, head size): the storage's, else the config's."""
        if self.keys:
            return self.keys[0].shape[1], self.keys[0].shape[-1]
        if self._config is None:
            raise ValueError("StaticCache.rows_view needs the config to allocate the storage")
        return _kv_shape(self._config)

    def rows_slice(self, rows: slice) -> StaticCache:
        """An empty StaticCache over `rows` of this one's (allocated) storage, with its own token
        count and LongRoPE state, and this one's `records_inputs`."""
        view = StaticCache(self._config, max_cache_len=self.max_cache_len, num_layers=self.num_layers)
        view._all = tuple(t[:, rows] for t in self._all)
        view.keys, view.values = _per_layer(view._all[0]), _per_layer(view._all[1])
        view.records_inputs = self.records_inputs
        return view

    def take_prompt(self, view: StaticCache, step: int) -> None:
        """After a forward of one row per group of `step` into `view` (`rows_view(step)`): every row
        of a group reads the prompt's slots from the group's first row, through `slot_rows`."""
        n, B = view._seen, self.keys[0].shape[0]
        self._seen, self.rope_long = n, view.rope_long
        if view.replay_embeds is not None:  # LongRoPE's record, in place where graphs write it
            shape = (B, *view.replay_embeds.shape[1:])
            if self.replay_embeds is None or self.replay_embeds.shape != shape:
                self.replay_embeds = view.replay_embeds.new_zeros(shape)
                self.replay_positions = view.replay_positions.new_zeros(shape[:2])
            self.replay_embeds[::step].copy_(view.replay_embeds)
            self.replay_positions[::step].copy_(view.replay_positions)
        self.use_slot_rows()
        first = torch.arange(B, device=self.slot_rows.device) // step * step
        self.slot_rows[:, :n] = first[:, None]

    def clear(self) -> None:
        """Forget the cached keys and values (the replay record stays); rows read their own slots."""
        super().clear()
        self._grad_kv.clear()
        if self.slot_rows is not None:  # the LongRoPE rebuild rewrites every slot in its own row
            self.slot_rows.copy_(self._identity_rows())

    def restore(self, state: tuple, recomputing: bool) -> None:
        """As `Cache.restore`. A forward that was recomputing the cached tokens under LongRoPE's other
        factors has rewritten some layers' slots in place: `rope_long` None then says that the
        slots hold neither set, and the next forward with cached tokens computes them again from
        the replay record, whichever set it needs."""
        super().restore(state, recomputing)
        self._grad_kv.clear()
        if recomputing:
            self.rope_long = None

    def reset(self) -> None:
        """Forget the cached tokens, keeping the storage (no reallocation)."""
        self._seen = 0
        self.rope_long = False
        self._grad_kv.clear()
        for t in self._all if self.keys else ():
            t.zero_()
        if self._rows is not None:
            self._rows.copy_(self._identity_rows())
        self.slot_rows = None


def pack_plan(rows: list[int], starts: list[int], new: list[int], shared: list[tuple[int, int, int]] | None,
              slots: int, pad: tuple[int, int] | None = None) -> tuple[torch.Tensor, list[int], list[int]]:
    """Where the keys of a forward over packed sequences come from and go (see `PackedRows`), on
    the host: (index [5, K] int64, the sequences' query counts, their key counts).

    The index's rows, per key in the packed order (each sequence's prefix, then its new tokens):
    `take`, the forward's token of a new key (-1 for a prefix key); `src_row`, `src_slot`, where a
    prefix key lies (0 for a new one); `dst_row`, `dst_slot`, where the key goes.

    `pad = (tokens, keys)`: the forward runs `tokens` tokens and holds `keys` keys, at least the
    sequences' own, with `keys - tokens` at least their prefix keys (a CUDA graph's fixed shapes).
    The extra tokens are one more sequence, the extra keys its prefix; with no extra tokens the
    extra keys belong to no sequence. Their keys are read from slot 0 of row 0 and go nowhere
    (`dst_row` -1)."""
    k = len(new)
    shared = shared or [(0, 0, 0)] * k
    if len(rows) != k or len(starts) != k or len(shared) != k:
        raise ValueError("PackedRows: rows, starts, new and shared need one entry per sequence")
    prefix = [p for *_, p in shared]
    if min(new, default=0) < 1 or min(starts, default=0) < 0 or \
            max((s + p + n for s, p, n in zip(starts, prefix, new)), default=0) > slots:
        raise ValueError(f"PackedRows: every sequence needs a new token and slots within the {slots} of a row")
    lens_q, lens_k = list(new), [p + n for p, n in zip(prefix, new)]
    src_rows, firsts = [r for r, *_ in shared], [f for _, f, _ in shared]
    dst_rows, dst_starts = list(rows), list(starts)
    extra_q = extra_k = 0
    if pad is not None:
        extra_q, extra_k = pad[0] - sum(lens_q), pad[1] - sum(lens_k)
        if extra_q < 0 or extra_k < extra_q:
            raise ValueError(f"PackedRows: a pad of {pad} (tokens, keys) must hold the sequences' {sum(lens_q)} "
                             f"tokens and {sum(lens_k)} keys, with at least as many extra keys as tokens")
        if extra_q:
            prefix.append(extra_k - extra_q)
            lens_q.append(extra_q)
            lens_k.append(extra_k)
            src_rows.append(0), firsts.append(0), dst_rows.append(-1), dst_starts.append(0)
    lens = torch.tensor(lens_k, dtype=torch.long)
    seq = torch.repeat_interleave(torch.arange(len(lens_k)), lens)  # each key's sequence
    at = torch.arange(len(seq)) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)  # its place in it
    is_prefix = at < torch.tensor(prefix, dtype=torch.long)[seq]
    take = torch.full((len(seq),), -1, dtype=torch.long)
    take[~is_prefix] = torch.arange(int((~is_prefix).sum()))
    def per_key(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)[seq]

    src_row, src_slot = per_key(src_rows), per_key(firsts) + at
    dst_row, dst_slot = per_key(dst_rows), per_key(dst_starts) + at
    src_row[~is_prefix] = src_slot[~is_prefix] = 0
    nowhere = dst_row < 0  # the padding's keys
    src_slot[nowhere] = dst_slot[nowhere] = 0
    index = torch.stack([take, src_row, src_slot, dst_row, dst_slot])
    if extra_k and not extra_q:
        loose = torch.tensor([-1, 0, 0, -1, 0], dtype=torch.long)[:, None].expand(5, extra_k)
        index = torch.cat([index, loose], dim=1)
    return index, lens_q, lens_k


class PackedRows(Cache):
    """The cache of one forward over sequences packed in one row (`ops.attention.Packed`), whose
    keys and values land in rows of a StaticCache `target` (continuous batching's prefill).

    Sequence i has `new[i]` tokens in the forward. Its keys are its prefix of `shared[i] = (row,
    first, p)`: p keys read from that row of `target`, slots `first ..` (p = 0: none), then its new
    tokens' keys; all of them go to row `rows[i]`, slots `starts[i] ..`, and the sequence attends
    over them. Each layer's prefixes are read before anything of that layer is written, so a
    prefix may come from the row that it moves within. Nothing else of `target` changes.

    `PackedRows.static` makes one over device buffers that a CUDA graph reads at each replay."""

    def __init__(self, target: StaticCache, rows: list[int], starts: list[int], new: list[int],
                 shared: list[tuple[int, int, int]] | None = None, window: int | None = None) -> None:
        held = target.keys[0].shape[0] if target.keys else 0
        if rows and not 0 <= min(rows) <= max(rows) < held:  # (before anything is written)
            raise ValueError(f"past_key_values: the StaticCache holds {held} rows, and this forward writes rows "
                             f"{min(rows)} to {max(rows)} (reset() does not change its rows: make a cache for this "
                             "batch)")
        index, lens_q, lens_k = pack_plan(rows, starts, new, shared, target.max_cache_len)
        device = target._all[0].device
        self._bind(target, to_device(index, device), Packed.of(lens_q, lens_k, device, window),
                   shares=sum(lens_k) > sum(lens_q), padded=False)

    @classmethod
    def static(cls, target: StaticCache, index_5K: torch.Tensor, packed: Packed, tokens: int) -> PackedRows:
        """Over a `pack_plan` index (padded, `pad=(tokens, K)`) already on the device, in a buffer
        that each use refills."""
        self = cls.__new__(cls)
        self._bind(target, index_5K, packed, shares=index_5K.shape[1] > tokens, padded=True)
        return self

    def _bind(self, target: StaticCache, index_5K: torch.Tensor, packed: Packed, shares: bool, padded: bool) -> None:
        super().__init__()
        self.records_inputs = False
        self.target, self.packed, self.shares, self.padded = target, packed, shares, padded
        self.take, self.src_row, self.src_slot, self.dst_row, self.dst_slot = index_5K

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        out = []
        for states, store in ((key_states, self.target.keys[layer_idx]), (value_states, self.target.values[layer_idx])):
            new_KGd = states[0].transpose(0, 1)
            if fused.active(new_KGd, store):
                all_KGd = new_KGd
                if self.shares:
                    all_KGd = fused.kernels().pack_keys(new_KGd, store, self.take, self.src_row, self.src_slot)
                fused.kernels().place_keys(all_KGd, store, self.dst_row, self.dst_slot)  # skips rows < 0
            else:
                all_KGd = new_KGd
                if self.shares:
                    fresh = self.take >= 0  # as pack_keys reads `take`
                    all_KGd = new_KGd.new_empty(self.take.shape[0], *new_KGd.shape[1:])
                    all_KGd[fresh] = new_KGd[self.take[fresh]]
                    all_KGd[~fresh] = store[self.src_row[~fresh], :, self.src_slot[~fresh]]
                if self.padded:
                    kept = self.dst_row >= 0
                    store[self.dst_row[kept], :, self.dst_slot[kept]] = all_KGd[kept]
                else:
                    store[self.dst_row, :, self.dst_slot] = all_KGd
            out.append(all_KGd.transpose(0, 1)[None])
        return out[0], out[1]


class MixedRows(Cache):
    """The cache of one forward over a prompt chunk packed as `chunk` (a `PackedRows`), then one
    decode token for each of the first `rows` rows of the same StaticCache (continuous batching's
    decode step riding along with a chunk): token `n + b` (n the chunk's tokens) writes its key and
    value into row b at slot `cpos_1` [1] and attends that row under `decode_mask_B11S` [rows, 1, 1,
    S] (bool). Its `packed` is the forward's mask (`ops.attention.Mixed`). The decode writes come
    first, then the chunk's update: a chunk reads no slot at the decode column. `tokens`: the
    chunk's token count (default: from its host lengths; a graph's padded count otherwise)."""

    def __init__(self, chunk: PackedRows, rows: int, cpos_1: torch.Tensor, decode_mask_B11S: torch.Tensor,
                 tokens: int | None = None) -> None:
        super().__init__()
        if tokens is None:
            if chunk.packed.lens_q is None:
                raise ValueError("MixedRows: a graph's PackedRows (no host lengths) needs its token count, `tokens`")
            tokens = sum(chunk.packed.lens_q)
        self.records_inputs = False
        self.chunk, self.rows, self.cpos, self.tokens = chunk, rows, cpos_1, tokens
        self._layer = 0
        self.packed = Mixed(chunk.packed, self.tokens, rows, decode_mask_B11S, self._rows_kv)

    def _rows_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        target = self.chunk.target
        return target.keys[self._layer][:self.rows], target.values[self._layer][:self.rows]

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        n, target = self.tokens, self.chunk.target
        for states, store in ((key_states, target.keys[layer_idx]), (value_states, target.values[layer_idx])):
            store[:self.rows].index_copy_(2, self.cpos, states[0, :, n:].transpose(0, 1)[:, :, None])
        self._layer = layer_idx
        return self.chunk.update(key_states[:, :, :n], value_states[:, :, :n], layer_idx, cache_kwargs)


def rotate_and_update(cache: Cache | None, q, k, v, cos, sin, layer_idx: int, cache_kwargs=None):
    """The rotary embedding of queries and keys, then the cache update when there is a cache:
    (queries, keys, values) to attend over. q None: the keys alone (the attention then rotates the
    queries, `ops.attention.attention(rope_q=)`)."""
    if cache is not None:
        return cache.update_rotated(q, k, v, cos, sin, layer_idx, cache_kwargs)
    q, k = apply_rotary_qk(q, k, cos, sin)
    return q, k, v


def _kv_shape(config) -> tuple[int, int]:
    head_dim = (getattr(config, "head_dim", None) or getattr(config, "kv_channels", None)
                or config.hidden_size // config.num_attention_heads)
    return config.num_key_value_heads, head_dim
