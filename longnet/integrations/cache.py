"""The generation cache of dilated attention in ``transformers``: per layer only the keys
a later query can read (:class:`DilatedAttentionCache`), optionally in int8, made the
default cache of ``generate`` by :func:`longnet.integrations.transformers.enable`."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from longnet.integrations.pattern_cache import (
    DilatedPatternLayer,
    pattern_storage_rows,
    quantize_int8,
)
from longnet.integrations.patterns import ATTN_IMPLEMENTATION, layer_patterns

__all__ = [
    "CACHE_KINDS",
    "STORAGE_KINDS",
    "DilatedAttentionCache",
    "DilatedAttentionLayer",
    "prepare_cache_for_generation",
]


STORAGE_KINDS = ("auto", "period", "pattern")
"""How :class:`DilatedAttentionCache` holds a layer's keys (see there)."""

CACHE_KINDS = ("dilated", "dilated-int8", "full")
"""What :func:`enable` makes ``generate`` use: :class:`DilatedAttentionCache` (keeps only
reachable keys), the same in int8, or transformers' own cache (keeps every key)."""


class DilatedAttentionLayer(CacheLayerMixin):
    """One layer of :class:`DilatedAttentionCache`.

    Holds, in a buffer of ``period - 1 + headroom`` positions, the keys and values of
    at most the last ``period - 1`` tokens before the current call (``period`` =
    ``lcm(segment_lengths)`` of the layer) plus the call's own tokens. A query at
    relative position ``x`` (counted from its row's first real token) reads, in
    pattern ``i``, keys of its own segment, which starts at ``floor(x / w_i) * w_i >=
    floor(x / period) * period > x - period``; so keys more than ``period - 1``
    positions before the first query of a call are never read again, whatever the
    row's padding. :func:`key_ranges_from_mask` starts each row a multiple of
    ``period`` after its first real token, which keeps every segment boundary and head
    offset without per-row position offsets.

    New tokens are written in place behind the held ones; when the buffer is full the
    last ``period - 1`` are moved to the front of a fresh buffer (a copy of
    ``period - 1`` tokens every ``headroom`` tokens). Calls with gradients enabled
    concatenate instead of writing in place (earlier results stay valid for backward).

    With ``int8=True`` the buffer holds int8 values with one float32 scale per token
    and head (symmetric, absmax / 127); the held tokens are dequantized into the
    model's dtype just before the attention call, the call's own tokens are used as
    computed.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, period: int, *, int8: bool = False, headroom: int = 64) -> None:
        super().__init__()
        if int(period) < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        if int(headroom) < 1:
            raise ValueError(f"headroom must be >= 1, got {headroom}")
        self.period = int(period)
        self.int8 = bool(int8)
        self.headroom = int(headroom)
        self.cumulative_length = 0
        self.first = 0  # buffer index of the first held token
        self.end = 0  # buffer index past the last held token
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.key_scales: Tensor | None = None
        self.value_scales: Tensor | None = None
        self.dtype: torch.dtype | None = None

    def __repr__(self) -> str:
        return (
            f"DilatedAttentionLayer(period={self.period}, int8={self.int8}, "
            f"seen={self.cumulative_length}, held={self.held})"
        )

    @property
    def held(self) -> int:
        """Tokens held (the last ``held`` of the ``cumulative_length`` seen)."""
        return self.end - self.first

    @property
    def dropped(self) -> int:
        """Tokens seen and dropped (the first ``dropped`` positions)."""
        return self.cumulative_length - self.held

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers (keys, values and int8 scales), held or not."""
        tensors = (self.keys, self.values, self.key_scales, self.value_scales)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self._allocate(key_states, value_states, 0)
        self.is_initialized = True

    def _allocate(self, key_states: Tensor, value_states: Tensor, capacity: int) -> None:
        b, hk, _, d = key_states.shape
        dv = value_states.shape[-1]
        store = torch.int8 if self.int8 else key_states.dtype
        self.keys = key_states.new_empty((b, hk, capacity, d), dtype=store)
        self.values = value_states.new_empty((b, value_states.shape[1], capacity, dv), dtype=store)
        if self.int8:
            self.key_scales = key_states.new_empty((b, hk, capacity, 1), dtype=torch.float32)
            self.value_scales = key_states.new_empty(
                (b, value_states.shape[1], capacity, 1), dtype=torch.float32
            )

    def _write(self, at: int, key_states: Tensor, value_states: Tensor) -> None:
        """Store new tokens at buffer positions ``[at, at + n)``."""
        assert self.keys is not None and self.values is not None
        n = key_states.shape[-2]
        if not self.int8:
            self.keys[:, :, at : at + n] = key_states
            self.values[:, :, at : at + n] = value_states
            return
        assert self.key_scales is not None and self.value_scales is not None
        for data, scales, x in (
            (self.keys, self.key_scales, key_states),
            (self.values, self.value_scales, value_states),
        ):
            q, scale = quantize_int8(x)
            data[:, :, at : at + n] = q
            scales[:, :, at : at + n] = scale

    def _held_states(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
        """The held tokens followed by the call's new ones (not yet written)."""
        assert self.keys is not None and self.values is not None
        if not self.int8:
            return (
                torch.cat((self.keys[:, :, self.first : self.end], key_states), dim=-2),
                torch.cat((self.values[:, :, self.first : self.end], value_states), dim=-2),
            )
        assert self.key_scales is not None and self.value_scales is not None
        out = []
        for data, scales, x in (
            (self.keys, self.key_scales, key_states),
            (self.values, self.value_scales, value_states),
        ):
            b, h, n, d = x.shape
            full = x.new_empty((b, h, self.held + n, d))
            torch.mul(
                data[:, :, self.first : self.end],
                scales[:, :, self.first : self.end],
                out=full[:, :, : self.held],
            )
            full[:, :, self.held :] = x
            out.append(full)
        return out[0], out[1]

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Append ``(B, Hk, n, D)`` keys and values; return the held ones and the new ones
        (the keys the call's queries can read), then drop what no later query reads."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        n = key_states.shape[-2]
        total = self.cumulative_length + n
        keep = min(total, self.period - 1)  # what the next call's queries can read
        grad = torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad)
        if not grad and self.end + n <= self.keys.shape[-2]:
            if self.int8:
                keys, values = self._held_states(key_states, value_states)
            self._write(self.end, key_states, value_states)
            self.end += n
            if not self.int8:
                keys = self.keys[:, :, self.first : self.end]
                values = self.values[:, :, self.first : self.end]
        else:
            keys, values = self._held_states(key_states, value_states)
            if grad and not self.int8:
                self.keys, self.values = keys[:, :, -keep:], values[:, :, -keep:]
            else:
                old = (self.keys, self.values, self.key_scales, self.value_scales)
                from_old = max(0, keep - n)  # held tokens that stay
                self._allocate(key_states, value_states, keep + self.headroom)
                for src, dst in zip(
                    old, (self.keys, self.values, self.key_scales, self.value_scales)
                ):
                    if src is not None and dst is not None and from_old > 0:
                        dst[:, :, :from_old] = src[:, :, self.end - from_old : self.end]
                self._write(
                    from_old,
                    key_states[:, :, n - (keep - from_old) :],
                    value_states[:, :, n - (keep - from_old) :],
                )
            self.end = keep
        self.cumulative_length = total
        self.first = self.end - keep
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.held + query_length, self.dropped

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys, self.values = None, None
        self.key_scales, self.value_scales = None, None
        self.is_initialized = False
        self.cumulative_length = self.first = self.end = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "DilatedAttentionCache cannot be cropped (it has dropped keys that earlier "
            "positions need); use transformers' DynamicCache for assisted decoding"
        )

    def _map_batch(self, fn: Any) -> None:
        for name in ("keys", "values", "key_scales", "value_scales"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])


class DilatedAttentionCache(Cache):
    """transformers ``Cache`` for ``attn_implementation="longnet"`` that keeps, per
    layer, only the keys a later query can read under that layer's patterns: at most
    ``lcm(segment_lengths) - 1`` tokens before a call plus the call's own tokens
    (``max(segment_lengths) - 1`` when every length divides the longest). Decoding then
    costs the same per token at any context length, and the cache's memory stays
    bounded. :func:`enable` makes it ``generate``'s default; pass one as ``cache=`` to
    a forward to decode by hand (e.g. a prompt prefilled in chunks).

    Exact: every query reads the keys it reads with a cache that keeps everything
    (left-padded batches included). Not croppable (no assisted decoding).

    Two ways to hold a layer's keys (``storage``): ``"period"`` keeps the last
    ``lcm(segment_lengths) - 1`` tokens (:class:`DilatedAttentionLayer`); ``"pattern"``
    keeps, per pattern, the current segment's positions at the offsets its heads read
    (:class:`~longnet.integrations.pattern_cache.DilatedPatternLayer`, inference only),
    which pays when segments grow to cover the context (SmolLM2-135M under ``[2K ..
    128K] / [1 .. 64]``: 0.30x the bytes of every key at 128K). ``"auto"`` picks, per
    layer, the one that holds fewer key rows at most.

    Args:
        config: the model config with the patterns :func:`enable` stored.
        int8: hold keys and values in int8 with one float32 scale per token and head
            (0.27x the bytes of float32, 0.53x of bfloat16); approximate.
        headroom: tokens of room behind the held ones before the buffer is compacted
            (period storage).
        storage: ``"auto"``, ``"period"`` or ``"pattern"``.
    """

    def __init__(
        self, config: Any, *, int8: bool = False, headroom: int = 64, storage: str = "auto"
    ) -> None:
        if storage not in STORAGE_KINDS:
            raise ValueError(f"storage must be one of {STORAGE_KINDS}, got {storage!r}")
        text = (
            config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        )
        num_layers = getattr(text, "num_hidden_layers", None)
        if num_layers is None:
            raise ValueError("DilatedAttentionCache needs config.num_hidden_layers")
        implementation = getattr(text, "_attn_implementation", None)
        if implementation != ATTN_IMPLEMENTATION:
            # Another attention function would silently attend to the held keys only.
            raise ValueError(
                f'DilatedAttentionCache needs attn_implementation="{ATTN_IMPLEMENTATION}" '
                f"(the config has {implementation!r}); call "
                "longnet.integrations.transformers.enable(model, ...) first"
            )
        heads = int(text.num_attention_heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        layers: list[Any] = []
        for i in range(num_layers):
            ws, rs = layer_patterns(text, i)
            period = math.lcm(*ws)
            per_pattern = storage == "pattern" or (
                storage == "auto"
                and pattern_storage_rows(ws, rs, heads, kv_heads) < (period - 1) * kv_heads
            )
            if per_pattern:
                layers.append(DilatedPatternLayer(ws, rs, heads, int8=int8))
            else:
                layers.append(DilatedAttentionLayer(period, int8=int8, headroom=headroom))
        super().__init__(layers=layers)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` with the offset of the layer that dropped the most
        keys (0 while no layer dropped any): :func:`longnet_mask` then keeps the mask
        over every position, and each layer finds its own offset from it."""
        seen = self.get_seq_length()
        dropped = max((layer.dropped for layer in self.layers), default=0)
        return seen + query_length - dropped, dropped

    @property
    def nbytes(self) -> int:
        """Bytes of every layer's buffers."""
        return sum(layer.nbytes for layer in self.layers)

    def held(self, layer_idx: int = 0) -> int:
        """Tokens layer ``layer_idx`` holds."""
        return self.layers[layer_idx].held


def prepare_cache_for_generation(
    model: Any, generation_config: Any, model_kwargs: dict[str, Any], *args: Any, kind: str
) -> Any:
    """``generate``'s cache set-up, with :class:`DilatedAttentionCache` in place of the
    ``DynamicCache`` it makes by default (not of a cache passed by the caller, nor of
    one named by ``cache_implementation``, nor for assisted decoding, nor once the
    model has been switched to another attention implementation)."""
    result = type(model)._prepare_cache_for_generation(
        model, generation_config, model_kwargs, *args
    )
    made = model_kwargs.get("cache")
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if (
        getattr(text, "_attn_implementation", None) == ATTN_IMPLEMENTATION
        and type(made) is DynamicCache
        and not getattr(made, "_is_user_defined", False)
        and generation_config.cache_implementation in (None, "dynamic")
        and not getattr(generation_config, "is_assistant", False)
    ):
        model_kwargs["cache"] = DilatedAttentionCache(model.config, int8=kind == "dilated-int8")
    return result
