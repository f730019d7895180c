"""Per-pattern key storage for :class:`~longnet.integrations.cache.DilatedAttentionCache`:
for every pattern only the positions its dilation reads, so that patterns whose segments
cover the whole context still keep a fraction of it (:class:`DilatedPatternLayer`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

import longnet

__all__ = ["PATTERN_LAYER_MARK", "DilatedPatternLayer", "pattern_storage_rows"]

PATTERN_LAYER_MARK = "_longnet_pattern_layer"  # attribute of the keys update() hands to attention


def pattern_storage_rows(
    segment_lengths: list[int], dilation_rates: list[int], heads: int, kv_heads: int
) -> int:
    """Key rows (one position of one head's keys) :class:`DilatedPatternLayer` holds per
    batch row at most: ``ceil(w / r)`` per pattern, for every key/value head when
    ``r = 1`` and for every query head otherwise (each head's own offset)."""
    return sum(
        -(-w // r) * (kv_heads if r == 1 else heads)
        for w, r in zip(segment_lengths, dilation_rates)
    )


def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row of the last dimension (per token and head): int8 values
    and float32 scales with ``x ~ values * scales`` (absolute error <= scale / 2)."""
    x32 = x.detach().to(torch.float32)
    scale = x32.abs().amax(dim=-1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x32 / scale).clamp_(-127, 127).to(torch.int8), scale


class _Store:
    """One pattern's keys or values: ``(B, S, capacity, D)``, slot ``m`` of head slot
    ``s`` holding position ``segment start + offset(s) + m * r`` of the current
    segment; int8 with float32 scales ``(B, S, capacity, 1)`` when asked."""

    def __init__(self, like: Tensor, slots: int, dim: int, int8: bool) -> None:
        self.int8 = int8
        self.dtype = like.dtype
        b = like.shape[0]
        self.data = like.new_empty((b, slots, 0, dim), dtype=torch.int8 if int8 else like.dtype)
        self.scale = like.new_empty((b, slots, 0, 1), dtype=torch.float32) if int8 else None

    @property
    def capacity(self) -> int:
        return self.data.shape[2]

    @property
    def nbytes(self) -> int:
        t = [self.data] + ([self.scale] if self.scale is not None else [])
        return sum(x.numel() * x.element_size() for x in t)

    def grow(self, slots: int, limit: int, step: float = 1.0) -> None:
        """At least ``slots`` slots (growing by ``step`` times the capacity, at most
        ``limit``), contents kept."""
        if slots <= self.capacity:
            return
        cap = min(limit, max(slots, self.capacity + max(64, int(step * self.capacity))))
        for name in ("data", "scale"):
            old = getattr(self, name)
            if old is None:
                continue
            new = old.new_zeros((*old.shape[:2], cap, old.shape[3]))
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)

    def put(self, index: tuple[Any, ...], x: Tensor) -> None:
        """``data[index] = x`` (``x``: (n, D) rows in the model's dtype)."""
        if self.int8:
            assert self.scale is not None
            q, s = quantize_int8(x)
            self.data[index] = q
            self.scale[index] = s
        else:
            self.data[index] = x.to(self.data.dtype)

    def read(self, slots: int, heads: slice = slice(None)) -> Tensor:
        """The first ``slots`` slots of every row and of ``heads``, in the model's dtype."""
        if not self.int8:
            return self.data[:, heads, :slots]
        assert self.scale is not None
        scale = self.scale[:, heads, :slots].to(self.dtype)
        return self.data[:, heads, :slots].to(self.dtype) * scale

    def map_batch(self, fn: Any) -> None:
        self.data = fn(self.data)
        if self.scale is not None:
            self.scale = fn(self.scale)


class DilatedPatternLayer(CacheLayerMixin):
    """One layer of :class:`~longnet.integrations.cache.DilatedAttentionCache` that keeps
    keys per pattern: for pattern ``(w, r)`` only the positions of the current segment
    (the one the next query falls in; later queries never read an earlier one) at the
    offsets the heads read, ``ceil(w / r)`` rows per head at most (per key/value head
    when ``r = 1``). With segments up to 128K and rates growing with them this holds a
    fraction of the context (0.30x for SmolLM2-135M under ``[2K .. 128K] / [1 .. 64]``).

    Positions count from each row's first real token (left padding), read from the
    attention mask of the call that first holds it. The attention itself runs in
    :meth:`attend` (the attention function hands it the call): one new token reads its
    keys straight from the per-pattern rows, one softmax over all patterns' keys (the
    contract's multiset union, so a key two patterns reach counts twice); a longer call
    (a prompt, or a prompt's chunk) rebuilds each row's positions from the longest
    pattern's segment start (positions no pattern keeps are never read) and runs
    ``longnet.dilated_attention`` on them.

    While every key costs fewer rows than the per-pattern bound
    (:func:`pattern_storage_rows`: short contexts), the layer keeps every position as
    transformers' cache does (in a buffer that grows in place) and runs the operator on
    them; it switches once the context passes that bound, so it never holds more than
    the smaller of the two (plus one call's tokens).

    Inference only: a call with gradients raises. ``int8=True`` stores int8 values with
    one float32 scale per position and head, dequantized just before the read.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(
        self,
        segment_lengths: list[int],
        dilation_rates: list[int],
        heads: int,
        *,
        int8: bool = False,
    ) -> None:
        super().__init__()
        ws, rs = longnet.ops.validate_patterns(segment_lengths, dilation_rates)
        if int(heads) < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        self.segment_lengths, self.dilation_rates = list(ws), list(rs)
        self.heads = int(heads)
        self.int8 = bool(int8)
        self.cumulative_length = 0
        self.starts: list[int | None] = []  # each row's first real position, once seen
        self.keys_per_pattern: list[_Store] = []
        self.values_per_pattern: list[_Store] = []
        # Until every key costs more rows than the per-pattern bound, every position
        # is kept as is: (B, Hk, capacity, D) by position, a DynamicCache that grows
        # in place.
        self.dense_keys: _Store | None = None
        self.dense_values: _Store | None = None
        self.switch_rows = 0  # pattern_storage_rows: past it, per-pattern rows are fewer
        self.kv_heads = 0

    def __repr__(self) -> str:
        pat = ", ".join(f"{w}/{r}" for w, r in zip(self.segment_lengths, self.dilation_rates))
        return (
            f"DilatedPatternLayer(patterns=[{pat}], int8={self.int8}, "
            f"seen={self.cumulative_length}, held={self.held})"
        )

    # -- bookkeeping -------------------------------------------------------------

    @property
    def per_pattern(self) -> bool:
        """Whether the keys are held per pattern yet (else every position is)."""
        return self.is_initialized and self.dense_keys is None

    @property
    def held(self) -> int:
        """Every position seen while every key is kept; then the key rows per head
        held, for the batch row that holds the most: over the patterns, the current
        segment's positions at one head's offset."""
        if self.dense_keys is not None:
            return self.cumulative_length
        xs = [x for x in (self._last_positions() or []) if x >= 0]
        if not xs:
            return 0
        return sum(
            max((x % w) // r + 1 for x in xs)
            for w, r in zip(self.segment_lengths, self.dilation_rates)
        )

    @property
    def dropped(self) -> int:
        return 0  # the mask keeps covering every position (rows' starts come from it)

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers (keys, values and int8 scales)."""
        stores = self.keys_per_pattern + self.values_per_pattern
        stores += [s for s in (self.dense_keys, self.dense_values) if s is not None]
        return sum(s.nbytes for s in stores)

    def _last_positions(self) -> list[int] | None:
        """Each row's position of the last token seen (negative: padding only)."""
        if not self.starts or self.cumulative_length == 0:
            return None
        last = self.cumulative_length - 1
        return [last - s if s is not None else -1 for s in self.starts]

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        b, hk, _, d = key_states.shape
        if self.heads % hk:
            raise ValueError(
                f"the model has {self.heads} query heads and {hk} key/value heads; "
                "the query heads must be a multiple of them"
            )
        self.kv_heads = hk
        for r in self.dilation_rates:
            slots = hk if r == 1 else self.heads
            self.keys_per_pattern.append(_Store(key_states, slots, d, self.int8))
            self.values_per_pattern.append(
                _Store(value_states, slots, value_states.shape[-1], self.int8)
            )
        self.dense_keys = _Store(key_states, hk, d, self.int8)
        self.dense_values = _Store(value_states, hk, value_states.shape[-1], self.int8)
        self.switch_rows = pattern_storage_rows(
            self.segment_lengths, self.dilation_rates, self.heads, hk
        )
        self.starts = [None] * b
        self.is_initialized = True

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Hand the call's own ``(B, Hk, n, D)`` keys and values to the attention
        function, marked so that it calls :meth:`attend` (which stores them)."""
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            raise ValueError(
                "DilatedAttentionCache with per-pattern storage is for inference (it writes "
                "in place); run under torch.no_grad(), or use storage='period' for a "
                "forward with gradients through the cache"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = key_states.view_as(key_states), value_states.view_as(value_states)
        setattr(keys, PATTERN_LAYER_MARK, self)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys_per_pattern, self.values_per_pattern = [], []
        self.dense_keys = self.dense_values = None
        self.starts = []
        self.is_initialized = False
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "DilatedAttentionCache cannot be cropped (it has dropped keys that earlier "
            "positions need); use transformers' DynamicCache for assisted decoding"
        )

    def _map_batch(self, fn: Any, rows: list[int]) -> None:
        stores = self.keys_per_pattern + self.values_per_pattern
        stores += [s for s in (self.dense_keys, self.dense_values) if s is not None]
        for store in stores:
            store.map_batch(fn)
        self.starts = [self.starts[i] for i in rows]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        rows = [int(i) for i in beam_idx.tolist()]
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)), rows)

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = [i for i in range(len(self.starts)) for _ in range(repeats)]
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0), rows)

    def batch_select_indices(self, indices: Tensor) -> None:
        rows = torch.arange(len(self.starts))[indices.cpu()].tolist()
        self._map_batch(lambda t: t[indices, ...], rows)

    # -- attention ---------------------------------------------------------------

    def _read_starts(self, padding: Tensor | None, n: int) -> None:
        """Each row's first real position, from the call's padding mask (B, W) over
        the last W positions, for rows that had none yet."""
        missing = [b for b, s in enumerate(self.starts) if s is None]
        if not missing:
            return
        total = self.cumulative_length + n
        if padding is None:
            for b in missing:
                self.starts[b] = 0
            return
        width = padding.shape[1]
        has = padding.any(dim=1).tolist()
        first = padding.to(torch.uint8).argmax(dim=1).tolist()
        for b in missing:
            if has[b]:
                self.starts[b] = total - width + first[b]

    def attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        padding: Tensor | None,
        scale: float | None,
    ) -> Tensor:
        """``(B, Nq, H, D)`` output of the call's queries ``(B, H, n, D)`` against the
        held keys and the call's own ``key``/``value`` ``(B, Hk, n, D)``; stores them.
        ``padding``: the 2-D padding mask over the last positions (True: real)."""
        b, h, n, d = query.shape
        if h != self.heads:
            raise ValueError(f"expected {self.heads} query heads, got {h}")
        if scale is None:
            scale = 1.0 / math.sqrt(d)
        self._read_starts(padding, n)
        before = self.cumulative_length
        if self.dense_keys is not None:
            out = self._attend_every_key(query, key, value, scale)
            self.cumulative_length = before + n
            if self.cumulative_length * self.kv_heads >= self.switch_rows:
                self._switch_to_patterns()
            return out
        # Position of the call's first token in each row (None: no real token yet).
        first = [before - s if s is not None else None for s in self.starts]
        if n == 1 and all(x is not None and x > 0 for x in first):
            xs = [x for x in first if x is not None]
            if len(set(xs)) == 1:  # every row at one position (one row, beams)
                out = self._decode_at(query, key, value, xs[0], scale)
            else:
                self._store(key, value, list(first))
                out = self._decode(query, xs, scale)
        else:
            out = self._rebuild_and_attend(query, key, value, first, scale)
            self._store(key, value, first)
        self.cumulative_length = before + n
        return out

    def _attend_every_key(self, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        """Every position kept: the call's tokens written behind the held ones (the
        buffer grows by 1/8 when full), the operator on all of them, each row from its
        first real token."""
        assert self.dense_keys is not None and self.dense_values is not None
        before, n = self.cumulative_length, key.shape[2]
        total = before + n
        for store, x in ((self.dense_keys, key), (self.dense_values, value)):
            store.grow(total, 1 << 62, step=0.125)  # at most 1/8 (or 64) unused
            store.put((slice(None), slice(None), slice(before, total)), x)
        dev = query.device
        starts = [s if s is not None else total for s in self.starts]
        return longnet.dilated_attention(
            query.transpose(1, 2),
            self.dense_keys.read(total).transpose(1, 2),
            self.dense_values.read(total).transpose(1, 2),
            self.segment_lengths,
            self.dilation_rates,
            is_causal=True,
            scale=scale,
            key_start=torch.tensor(starts, device=dev),
            key_end=torch.full((len(starts),), total, device=dev),
        )

    def _switch_to_patterns(self) -> None:
        """From every position to the per-pattern rows of the last segments."""
        assert self.dense_keys is not None and self.dense_values is not None
        total = self.cumulative_length
        keys, values = self.dense_keys.read(total), self.dense_values.read(total)
        self.dense_keys = self.dense_values = None
        # Row b's buffer position t is its position t - start (negative: padding).
        self._store(keys, values, [-s if s is not None else None for s in self.starts])

    def _store(self, key: Tensor, value: Tensor, first: list[int | None]) -> None:
        """Write the call's tokens into every pattern's rows (row b's token t sits at
        position ``first[b] + t``); only the real tokens of each row's last segment."""
        n = key.shape[2]
        for w, r, ks, vs in zip(
            self.segment_lengths,
            self.dilation_rates,
            self.keys_per_pattern,
            self.values_per_pattern,
        ):
            spans = []  # (row, first position stored, last position, segment start)
            for row, x0 in enumerate(first):
                if x0 is not None and x0 + n - 1 >= 0:
                    last = x0 + n - 1
                    seg = last // w * w
                    spans.append((row, max(seg, x0, 0), last, seg))
            if not spans:
                continue
            limit = -(-w // r)
            need = max((last - seg) // r + 1 for _, _, last, seg in spans)
            ks.grow(need, limit)
            vs.grow(need, limit)
            if n == 1:
                self._store_one(key, value, w, r, ks, vs, spans)
                continue
            g = self.heads // self.kv_heads
            for row, lo, last, seg in spans:
                x0 = first[row]
                assert x0 is not None
                for s in range(1) if r == 1 else range(self.heads):
                    off = 0 if r == 1 else s % r
                    p0 = lo + (off - (lo - seg)) % r  # the first position at this offset
                    if p0 > last:
                        continue
                    cnt = (last - p0) // r + 1
                    m0, t0 = (p0 - seg) // r, p0 - x0
                    src = slice(t0, t0 + (cnt - 1) * r + 1, r)
                    heads = slice(None) if r == 1 else s // g  # r = 1: every kv head
                    dst = (row, slice(None) if r == 1 else s, slice(m0, m0 + cnt))
                    ks.put(dst, key[row, heads, src])
                    vs.put(dst, value[row, heads, src])

    def _store_one(
        self,
        key: Tensor,
        value: Tensor,
        w: int,
        r: int,
        ks: _Store,
        vs: _Store,
        spans: list[tuple[int, int, int, int]],
    ) -> None:
        """One token per row, every row at once (one indexed write per pattern)."""
        g = self.heads // self.kv_heads
        rows, slots, at, src_h = [], [], [], []
        for row, _, p, seg in spans:
            u = p - seg
            for s in range(self.kv_heads) if r == 1 else range(u % r, self.heads, r):
                rows.append(row)
                slots.append(s)
                at.append(u // r)
                src_h.append(s if r == 1 else s // g)
        if not rows:  # r > H: no head reads this offset
            return
        dev = key.device
        rows_t, slots_t, at_t, h_t = (torch.tensor(a, device=dev) for a in (rows, slots, at, src_h))
        ks.put((rows_t, slots_t, at_t), key[rows_t, h_t, 0])
        vs.put((rows_t, slots_t, at_t), value[rows_t, h_t, 0])

    def _expanded(self, x: Tensor) -> Tensor:
        """``(B, Hk, 1, D)`` as ``(B, H, D)``: each query head's key/value head."""
        b, hk, _, d = x.shape
        g = self.heads // hk
        return x[:, :, 0, None, :].expand(b, hk, g, d).reshape(b, self.heads, d)

    def _decode_at(self, query: Tensor, key: Tensor, value: Tensor, x: int, scale: float) -> Tensor:
        """One new token per row, every row at position ``x``: stored by slicing, and
        read per pattern as the ``m`` held rows of the heads at ``x``'s offset (every
        one of them valid), all patterns' logits in one softmax."""
        b, h, _, d = query.shape
        hk = self.kv_heads
        g = h // hk
        acc = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
        q = query.to(acc).view(b, h, d) * scale
        key_h = value_h = None  # the new token's keys/values per query head, once needed
        # (query heads: a slice, or None for every head via its kv head; m; stores)
        plan: list[tuple[slice | None, int, _Store, _Store]] = []
        for w, r, ks, vs in zip(
            self.segment_lengths,
            self.dilation_rates,
            self.keys_per_pattern,
            self.values_per_pattern,
        ):
            u = x % w
            m = u // r + 1
            limit = -(-w // r)
            ks.grow(m, limit)
            vs.grow(m, limit)
            if r == 1:
                ks.put((slice(None), slice(None), u), key[:, :, 0])
                vs.put((slice(None), slice(None), u), value[:, :, 0])
                plan.append((None, m, ks, vs))
                continue
            if u % r >= h:
                continue  # r > H: no head at this offset
            heads: slice | None = slice(u % r, None, r)
            if key_h is None:
                key_h, value_h = self._expanded(key), self._expanded(value)
            assert value_h is not None
            ks.put((slice(None), heads, u // r), key_h[:, heads])
            vs.put((slice(None), heads, u // r), value_h[:, heads])
            plan.append((heads, m, ks, vs))
        if not plan:  # no pattern serves any head here: no key, out = 0
            return query.new_zeros((b, 1, h, d))
        total = sum(m for _, m, _, _ in plan)
        logits = torch.full((b, h, total), -math.inf, dtype=acc, device=query.device)
        at = 0
        for heads, m, ks, _ in plan:
            if heads is None:  # (B, Hk, G, D) @ (B, Hk, D, m)
                k = ks.read(m).to(acc)
                logits[:, :, at : at + m] = torch.matmul(
                    q.view(b, hk, g, d), k.transpose(-1, -2)
                ).view(b, h, m)
            else:  # (B, Hl, 1, D) @ (B, Hl, D, m)
                k = ks.read(m, heads).to(acc)
                logits[:, heads, at : at + m] = torch.matmul(
                    q[:, heads, None, :], k.transpose(-1, -2)
                ).squeeze(2)
            at += m
        p = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # a head without keys: 0
        dv = value.shape[-1]
        out = torch.zeros(b, h, dv, dtype=acc, device=query.device)
        at = 0
        for heads, m, _, vs in plan:
            if heads is None:
                v = vs.read(m).to(acc)
                blk = p.view(b, hk, g, total)[..., at : at + m]
                out += torch.matmul(blk, v).view(b, h, dv)
            else:
                v = vs.read(m, heads).to(acc)
                out[:, heads] += torch.matmul(p[:, heads, None, at : at + m], v).squeeze(2)
            at += m
        return out.to(query.dtype).view(b, 1, h, dv)

    def _decode(self, query: Tensor, xs: list[int], scale: float) -> Tensor:
        """One new token per row at positions ``xs`` (already stored): one softmax over
        the keys every pattern gives each head. Only the rows a head reads are read:
        with ``r > 1`` a pattern serves the heads at the new position's offset, a
        strided slice of heads when every row is at the same offset."""
        b, h, _, d = query.shape
        dev = query.device
        acc = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
        q = query.to(acc).view(b, h, d) * scale
        g = h // self.kv_heads
        all_heads = torch.arange(h, device=dev)
        scores, values = [], []  # per pattern: (B, H, m) logits, (heads served, rows)
        for w, r, ks, vs in zip(
            self.segment_lengths,
            self.dilation_rates,
            self.keys_per_pattern,
            self.values_per_pattern,
        ):
            us = [x % w for x in xs]
            counts = [u // r + 1 for u in us]
            m = max(counts)
            cnt = torch.tensor(counts, device=dev).view(b, 1, 1)
            keep = torch.arange(m, device=dev).view(1, 1, m) < cnt  # (B, 1, m)
            offsets = {u % r for u in us}
            if r == 1:  # (B, Hk, m, D): the query heads of a key/value head share it
                k = ks.read(m).to(acc)
                sc = torch.matmul(q.view(b, self.kv_heads, g, d), k.transpose(-1, -2))
                sc = sc.view(b, h, m).masked_fill(~keep, -math.inf)
                heads: slice | None = None
            elif len(offsets) == 1:  # the heads at this offset: a strided view
                heads = slice(offsets.pop(), None, r)
                if heads.start >= h:
                    continue  # r > H: no head at this offset
                k = ks.read(m, heads).to(acc)
                live = torch.matmul(q[:, heads, None, :], k.transpose(-1, -2)).squeeze(2)
                sc = torch.full((b, h, m), -math.inf, dtype=acc, device=dev)
                sc[:, heads] = live.masked_fill(~keep, -math.inf)
            else:  # rows at different offsets: every head, masked
                k = ks.read(m).to(acc)
                sc = torch.matmul(q[:, :, None, :], k.transpose(-1, -2)).squeeze(2)
                res = torch.tensor([u % r for u in us], device=dev)
                served = (all_heads[None, :] % r == res[:, None])[:, :, None]
                sc = sc.masked_fill(~(served & keep), -math.inf)
                heads = slice(None)
            scores.append(sc)
            values.append((heads, vs.read(m, heads if heads is not None else slice(None))))
        if not scores:  # no pattern serves any head here: no key, out = 0
            return query.new_zeros((b, 1, h, d))
        logits = torch.cat(scores, dim=-1)  # (B, H, sum m): the multiset union
        p = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # a head without keys: 0
        dv = values[0][1].shape[-1] if values else d
        out = torch.zeros(b, h, dv, dtype=acc, device=dev)
        at = 0
        for heads, v in values:
            m = v.shape[2]
            v = v.to(acc)
            blk = p[:, :, at : at + m]
            if heads is None:  # grouped: (B, Hk, G, m) @ (B, Hk, m, Dv)
                out += torch.matmul(blk.view(b, self.kv_heads, g, m), v).view(b, h, dv)
            else:
                out[:, heads] += torch.matmul(blk[:, heads, None, :], v).squeeze(2)
            at += m
        return out.to(query.dtype).view(b, 1, h, dv)

    def _rebuild_and_attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        first: list[int | None],
        scale: float,
    ) -> Tensor:
        """Row by row: the held positions the call's queries can read rebuilt in place
        (from the earliest segment start of any pattern), followed by the call's
        tokens, through ``longnet.dilated_attention``."""
        b, h, n, d = query.shape
        out = query.new_zeros((b, n, h, value.shape[-1]))
        g = self.heads // self.kv_heads
        for row, x0 in enumerate(first):
            if x0 is None or x0 + n - 1 < 0:
                continue  # padding only: out = 0
            q = query[row : row + 1].transpose(1, 2)
            k_new = key[row : row + 1].transpose(1, 2)
            v_new = value[row : row + 1].transpose(1, 2)
            if x0 <= 0:  # nothing held: the call's real tokens from position 0
                start = torch.tensor([-x0], device=query.device)
                out[row : row + 1] = longnet.dilated_attention(
                    q,
                    k_new,
                    v_new,
                    self.segment_lengths,
                    self.dilation_rates,
                    is_causal=True,
                    scale=scale,
                    key_start=start,
                    key_end=torch.tensor([n], device=query.device),
                )
                continue
            lo = min(x0 // w * w for w in self.segment_lengths)
            k_old = key.new_zeros((1, x0 - lo, self.kv_heads, d))
            v_old = value.new_zeros((1, x0 - lo, self.kv_heads, value.shape[-1]))
            for w, r, ks, vs in zip(
                self.segment_lengths,
                self.dilation_rates,
                self.keys_per_pattern,
                self.values_per_pattern,
            ):
                seg = x0 // w * w
                if (x0 - 1) // w * w != seg:
                    continue  # the call starts a new segment: nothing held is read
                held = x0 - seg  # positions seg .. x0 - 1 of this segment
                slots = range(self.kv_heads) if r == 1 else range(self.heads)
                k_all = ks.read(-(-held // r))[row]  # (S, m, D)
                v_all = vs.read(-(-held // r))[row]
                for s in slots:
                    off = 0 if r == 1 else s % r
                    cnt = len(range(off, held, r))
                    if cnt == 0:
                        continue
                    kvh = s if r == 1 else s // g
                    pos = torch.arange(seg + off - lo, seg + held - lo, r, device=key.device)
                    k_old[0, pos, kvh] = k_all[s, :cnt].to(key.dtype)
                    v_old[0, pos, kvh] = v_all[s, :cnt].to(value.dtype)
            out[row : row + 1] = longnet.dilated_attention(
                q,
                torch.cat((k_old, k_new), dim=1),
                torch.cat((v_old, v_new), dim=1),
                self.segment_lengths,
                self.dilation_rates,
                is_causal=True,
                scale=scale,
                position_offset=lo,
            )
        return out
