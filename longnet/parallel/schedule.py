"""What one rank of sequence-parallel dilated attention computes, sends and receives.

:func:`plan_rank` turns a configuration (ranks, heads, patterns, causal, position
offset, the packed documents that cross a rank boundary) into a :class:`RankPlan`:
the local operator calls on this rank's rows (every pattern, its rank-crossing
segments clipped to the rows here), and for every segment that spans ranks the rows
this rank sends and the operator call its queries make on the rows it receives (see
:mod:`longnet.parallel.attention` for how the operator runs a plan). Plans are
cached per configuration in a least-recently-used cache bounded in bytes (the
plans' index tensors and Python objects on the CPU plus their device copies;
:func:`set_plan_cache_bytes`, :func:`plan_cache_info`): with packed documents almost
every batch is a new configuration. Index tensors live on the CPU and are copied to
the device once per plan (:func:`on_device`).
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import update_wrapper
from typing import NamedTuple

import torch
from torch import Tensor

from longnet.parallel.layout import HeadGroup, Segment, segment, segment_ranks

__all__ = [
    "Call",
    "Local",
    "RankPlan",
    "plan_rank",
    "on_device",
    "PlanCacheInfo",
    "plan_cache_info",
    "set_plan_cache_bytes",
]


@dataclass
class Call:
    """One operator call for the cross-rank rows of a segment on this rank."""

    pattern: int
    n_q: int  # this rank's query rows per head
    n_heads: int  # query heads |J|
    n_pairs: int  # exchanged (kv head, offset) pairs |U|
    q_start: int  # offset of its queries in the gathered queries
    pieces: tuple[tuple[int, int], ...]  # received keys in position order: (start, rows)
    head_map: Tensor | None  # (|J|,) pair index per head; None when GQA maps it


@dataclass(frozen=True)
class Local:
    """One local operator call on this rank's rows ``[a, b)``: the rows of one sequence
    (or document fragment) whose first row sits at absolute position
    ``position_offset``, computed with the patterns ``ws``/``rs`` (a segment that
    crosses ranks clipped to these rows: its keys here); with ``packed``,
    rows that hold whole documents, run in one packed call (their boundaries come from
    each call's ``cu_seqlens``, every document's first token at ``position_offset``)."""

    a: int
    b: int
    ws: tuple[int, ...]
    rs: tuple[int, ...]
    position_offset: int
    packed: bool = False


@dataclass
class RankPlan:
    """Everything one rank does for one configuration (index tensors on CPU).

    Key/value rows are addressed as flat indices ``row * Hk + head`` into a
    ``(B, L * Hk, D)`` view, query/output rows as ``row * H + head``, lse rows as
    ``head * L + row``.
    """

    pieces: tuple[Local, ...]  # the local calls, in row order, covering [0, L)
    cross_patterns: tuple[int, ...]  # patterns whose received keys some call attends
    calls: list[Call]
    kv_index: Tensor  # rows sent, by destination
    send_rows: tuple[int, ...]  # kv_index entries per destination
    recv_rows: tuple[int, ...]  # received entries per source
    q_index: Tensor  # query rows of all calls
    out_index: dict[int, Tensor]  # pattern -> output rows of its calls
    lse_index: dict[int, Tensor]  # pattern -> lse rows (same entries and order)
    exchange: bool  # whether the ranks exchange anything
    _device_cache: dict = field(default_factory=dict)
    _nbytes: int = 0  # bytes the plan cache counts for it (host and device copies)
    _cache_key: tuple | None = None  # its key in the plan cache, once stored there

    def __repr__(self) -> str:
        local = [
            f"[{p.a}, {p.b}): " + ("packed documents" if p.packed else str(list(zip(p.ws, p.rs))))
            for p in self.pieces
        ]
        return (
            f"RankPlan(local calls {local}, cross-rank patterns {list(self.cross_patterns)}, "
            f"{len(self.calls)} calls, rows sent {list(self.send_rows)}, "
            f"received {list(self.recv_rows)})"
        )


def on_device(plan: RankPlan, t: Tensor, device: torch.device) -> Tensor:
    """``t`` (one of ``plan``'s index tensors) on ``device``, cached per plan; a copy
    that holds new memory counts towards the plan cache's bytes."""
    key = (id(t), device)
    hit = plan._device_cache.get(key)
    if hit is None:
        hit = plan._device_cache[key] = t.to(device)
        plan_rank.grew(plan, _copy_bytes(t, hit))
    return hit


def _copy_bytes(t: Tensor, copy: Tensor) -> int:
    """Bytes that ``copy`` (``t.to(device)``) holds besides ``t``: its storage's bytes
    when it is a new storage, 0 when ``to`` returned ``t``'s own storage (``t``
    already on that device: a CPU plan "copied" to the CPU holds nothing more) or a
    meta tensor (no memory behind it)."""
    if copy.device.type == "meta":
        return 0
    if copy.device == t.device and (
        copy.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
    ):
        return 0
    return copy.untyped_storage().nbytes()


def _rows(
    seg: Segment, g: HeadGroup, rank: int, chunk: int, offs: Sequence[int], base: int = 0
) -> Tensor:
    """Local rows of ``rank`` for the given offsets: (count, len(offs)); ``base`` is
    the absolute position of the whole sequence's row 0 in the segment's frame."""
    qi = rank - seg.first_rank
    n = g.counts[qi]
    t = torch.arange(n).unsqueeze(1)
    first = base + rank * chunk  # absolute position of local row 0
    base_t = torch.tensor([seg.start + o + g.first_t[qi][o] * seg.r - first for o in offs])
    return base_t.unsqueeze(0) + t * seg.r


def _cat(ts: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts]) if ts else torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class _Config:
    """The arguments of :func:`plan_rank` that every step of the planning reads."""

    world: int
    rank: int
    chunk: int
    num_heads: int
    kv_heads: int
    ws: tuple[int, ...]
    rs: tuple[int, ...]
    is_causal: bool
    offset: int


@dataclass
class _Exchanges:
    """The cross-rank segment groups this rank takes part in, as planned so far.

    Every record starts with its key ``(document, pattern, segment, group)``, which
    orders the exchanges the same way on every rank."""

    jobs: list = field(default_factory=list)  # (key, seg, group, ranks, flat kv rows, base)
    sends: list[list] = field(default_factory=list)  # per destination: (key, flat kv rows)
    recvs: list[list] = field(default_factory=list)  # per source: (key, entries)


def _plan_crossing_segment(cfg: _Config, seg: Segment, c: int, base: int, ex: _Exchanges) -> None:
    """Record the rows this rank receives and sends, and the call its queries make on
    the received rows, for the head groups of the cross-rank segment ``seg`` of the
    document starting at global token ``c`` (its rows here are keys of the local call)."""
    rank = cfg.rank
    me = rank - seg.first_rank
    for gi, g in enumerate(seg.groups):
        if g.counts[me] == 0:
            continue  # no queries here, and no rows to send
        key = (c, seg.pattern, seg.index, gi)
        sources = [
            q
            for q in range(seg.first_rank, seg.last_rank + 1)
            if q != rank and (not cfg.is_causal or q < rank) and g.counts[q - seg.first_rank] > 0
        ]
        if sources:
            ex.jobs.append((key, seg, g, sources, base))
        for q in sources:
            ex.recvs[q].append((key, g.counts[q - seg.first_rank] * len(g.pairs)))
        # This rank's rows go to every later (causal) or other rank of the segment
        # that has queries in the group.
        dsts = [
            dst
            for dst in range(seg.first_rank, seg.last_rank + 1)
            if dst != rank
            and not (cfg.is_causal and dst < rank)
            and g.counts[dst - seg.first_rank] > 0
        ]
        if dsts:
            kv_rows = _rows(seg, g, rank, cfg.chunk, [o for _, o in g.pairs], base)
            kvh = torch.tensor([hh for hh, _ in g.pairs])
            flat_kv = kv_rows * cfg.kv_heads + kvh
            for dst in dsts:
                ex.sends[dst].append((key, flat_kv))


def _plan_fragment(cfg: _Config, c: int, e: int, ex: _Exchanges) -> tuple[Local, set[int]]:
    """This rank's part of the sequence (document) of global tokens ``[c, e)``: its
    local call with every pattern (a rank-crossing segment clipped to the rows here),
    the crossing segments' exchanges (recorded in ``ex``), and the crossing patterns."""
    chunk, rank = cfg.chunk, cfg.rank
    lo, hi, base = cfg.offset, cfg.offset + e - c, cfg.offset - c  # the document's frame
    r_lo, r_hi = rank * chunk, (rank + 1) * chunk
    first = base + rank * chunk  # absolute position of this rank's row 0
    fa, fb = max(c, r_lo) - r_lo, min(e, r_hi) - r_lo  # its rows here
    a_abs, b_abs = first + fa, first + fb
    kv_group = cfg.num_heads // cfg.kv_heads
    cross: set[int] = set()
    for i, (w, r) in enumerate(zip(cfg.ws, cfg.rs)):
        for s in sorted({a_abs // w, (b_abs - 1) // w}):
            _, _, first_rank, last_rank = segment_ranks(s, w, lo, hi, base, chunk)
            if last_rank > first_rank:
                cross.add(i)
                seg = segment(i, s, w, r, lo, hi, base, chunk, cfg.num_heads, kv_group)
                _plan_crossing_segment(cfg, seg, c, base, ex)
    return Local(fa, fb, cfg.ws, cfg.rs, a_abs), cross


def _with_packed_call(cfg: _Config, pieces: list[Local]) -> list[Local]:
    """``pieces`` with the rows outside the spanning documents' fragments (which hold
    row 0 or row L - 1) replaced by one packed call of the whole documents there."""
    chunk = cfg.chunk
    head = pieces[0].b if pieces and pieces[0].a == 0 else 0
    tail = pieces[-1].a if pieces and pieces[-1].b == chunk and pieces[-1].a >= head else chunk
    if head >= tail:
        return pieces
    inside = Local(head, tail, cfg.ws, cfg.rs, cfg.offset, packed=True)
    return [p for p in pieces if p.b <= head] + [inside] + [p for p in pieces if p.a >= tail]


def _index_calls(cfg: _Config, ex: _Exchanges):
    """The operator calls of the cross-rank segment groups and the flat indices they
    read and write: ``(calls, query rows, output rows, lse rows)``, the last two per
    pattern that has calls."""
    rank, chunk, num_heads = cfg.rank, cfg.chunk, cfg.num_heads
    recv_start, pos = {}, 0
    for src in range(cfg.world):
        for key, size in ex.recvs[src]:
            recv_start[(key, src)] = pos
            pos += size
    calls, q_parts = [], []
    out_parts: dict[int, list] = {}
    lse_parts: dict[int, list] = {}
    q_pos = 0
    for key, seg, g, sources, base in ex.jobs:
        q_rows = _rows(seg, g, rank, chunk, [j % seg.r for j in g.heads], base)
        heads = torch.tensor(g.heads)
        pieces_kv = tuple(
            (recv_start[(key, src)], g.counts[src - seg.first_rank]) for src in sources
        )
        ratio = len(g.heads) // len(g.pairs)
        uniform = len(g.heads) % len(g.pairs) == 0 and all(
            m == jj // ratio for jj, m in enumerate(g.head_to_pair)
        )
        calls.append(
            Call(
                seg.pattern,
                g.counts[rank - seg.first_rank],
                len(g.heads),
                len(g.pairs),
                q_pos,
                pieces_kv,
                None if uniform else torch.tensor(g.head_to_pair),
            )
        )
        q_flat = q_rows * num_heads + heads
        q_parts.append(q_flat)
        q_pos += q_flat.numel()
        out_parts.setdefault(seg.pattern, []).append(q_flat)
        lse_parts.setdefault(seg.pattern, []).append(heads * chunk + q_rows)
    return calls, q_parts, out_parts, lse_parts


def _plan_rank(
    world: int,
    rank: int,
    chunk: int,
    num_heads: int,
    kv_heads: int,
    ws: tuple[int, ...],
    rs: tuple[int, ...],
    is_causal: bool,
    offset: int = 0,
    docs: tuple[tuple[int, int], ...] | None = None,
) -> RankPlan:
    """What ``rank`` computes, sends and receives.

    Without ``docs`` the sequence occupies absolute positions ``[offset, offset +
    world * chunk)``. With ``docs`` the global sequence is packed documents, each
    attended alone with its first token at ``offset``: ``docs`` are those that cross
    a rank boundary (:func:`~longnet.parallel.layout.spanning_documents`, the same on
    every rank); every other row belongs to a document inside one rank and runs in the
    packed local call (its boundaries are filled in per call).

    Plans are kept in a least-recently-used cache bounded in bytes
    (:func:`set_plan_cache_bytes`, :func:`plan_cache_info`, ``plan_rank.cache_clear()``);
    ``plan_rank.__wrapped__`` plans without it."""
    cfg = _Config(world, rank, chunk, num_heads, kv_heads, ws, rs, is_causal, offset)
    spans = docs if docs is not None else ((0, world * chunk),)
    # A rank boundary inside a segment of a document makes that segment cross ranks.
    exchange = any(
        (offset - c + p * chunk) % w
        for c, e in spans
        for p in range(1, world)
        if c < p * chunk < e
        for w in ws
    )
    ex = _Exchanges(sends=[[] for _ in range(world)], recvs=[[] for _ in range(world)])
    pieces: list[Local] = []
    for c, e in spans:
        if c < (rank + 1) * chunk and e > rank * chunk:  # the document has rows here
            piece, _ = _plan_fragment(cfg, c, e, ex)
            pieces.append(piece)
    if docs is not None:
        pieces = _with_packed_call(cfg, pieces)
    ex.jobs.sort(key=lambda x: x[0])
    for lst in ex.sends + ex.recvs:
        lst.sort(key=lambda x: x[0])
    send_parts = [t for dst in range(world) for _, t in ex.sends[dst]]
    send_rows = tuple(sum(t.numel() for _, t in ex.sends[dst]) for dst in range(world))
    calls, q_parts, out_parts, lse_parts = _index_calls(cfg, ex)
    return RankPlan(
        tuple(pieces),
        tuple(sorted(out_parts)),
        calls,
        kv_index=_cat(send_parts),
        send_rows=send_rows,
        recv_rows=tuple(sum(sz for _, sz in ex.recvs[src]) for src in range(world)),
        q_index=_cat(q_parts),
        out_index={i: _cat(v) for i, v in out_parts.items()},
        lse_index={i: _cat(v) for i, v in lse_parts.items()},
        exchange=exchange,
    )


# --------------------------------------------------------------------- plan cache

# The default bound of the plan cache. A plan's index tensors grow with the rows of its
# rank-crossing segments: about 0.2 MB at 4 ranks of 4K tokens, 2-9 MB at 64 ranks of
# 1M tokens (16 patterns, 32 heads, log-normal documents, causal or not), twice that
# with their device copies. 256 MiB keeps a dozen of the largest, more than one
# training step uses (every layer and the backward pass share one plan per batch).
DEFAULT_PLAN_CACHE_BYTES = 256 * 2**20

# A tensor's Python object, TensorImpl and storage bookkeeping, besides its data: an
# estimate (a plan of a few rows is mostly these and its Python objects).
_TENSOR_OBJECT_BYTES = 512


def _host_bytes(obj: object, seen: set[object]) -> int:
    """Bytes of ``obj`` and everything it holds, each object once: a tensor's storage
    (once per storage) plus ``_TENSOR_OBJECT_BYTES``; containers, dataclasses and
    scalars by ``sys.getsizeof``."""
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        size = _TENSOR_OBJECT_BYTES
        storage = obj.untyped_storage()
        where = (obj.device, storage.data_ptr())
        if obj.device.type != "meta" and where not in seen:
            seen.add(where)
            size += storage.nbytes()
        return size
    size = sys.getsizeof(obj)
    if isinstance(obj, (tuple, list)):
        size += sum(_host_bytes(x, seen) for x in obj)
    elif isinstance(obj, dict):
        size += sum(_host_bytes(k, seen) + _host_bytes(v, seen) for k, v in obj.items())
    elif hasattr(obj, "__dict__"):
        size += _host_bytes(vars(obj), seen)
    return size


class PlanCacheInfo(NamedTuple):
    """The state of :func:`plan_rank`'s cache (:func:`plan_cache_info`)."""

    entries: int  # plans kept
    bytes: int  # their bytes: index tensors and Python objects, plus device copies
    max_bytes: int  # the bound (:func:`set_plan_cache_bytes`)
    hits: int
    misses: int
    evictions: int  # plans dropped to stay within the bound


class _PlanCache:
    """A planner behind a least-recently-used cache bounded in bytes.

    A plan counts its key, its index tensors and Python objects when it is stored, and
    every device copy :func:`on_device` makes of its tensors while it is stored. When
    the bytes exceed ``max_bytes``, the least recently used plans are dropped (a plan
    larger than the bound alone is returned but not kept); a dropped plan still in use
    lives on until its last reference goes. Keys are the planner's arguments, the
    defaults filled in."""

    def __init__(self, planner: Callable[..., RankPlan], max_bytes: int) -> None:
        update_wrapper(self, planner)
        self.__name__ = self.__qualname__ = planner.__name__.lstrip("_")
        self.__wrapped__ = planner
        self.max_bytes = max_bytes
        self._plans: OrderedDict[tuple, RankPlan] = OrderedDict()
        self._bytes = self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def __call__(
        self,
        world: int,
        rank: int,
        chunk: int,
        num_heads: int,
        kv_heads: int,
        ws: tuple[int, ...],
        rs: tuple[int, ...],
        is_causal: bool,
        offset: int = 0,
        docs: tuple[tuple[int, int], ...] | None = None,
    ) -> RankPlan:
        key = (world, rank, chunk, num_heads, kv_heads, ws, rs, is_causal, offset, docs)
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                self._hits += 1
                return plan
            self._misses += 1
        plan = self.__wrapped__(*key)  # outside the lock: planning may take a while
        plan._nbytes = _host_bytes(plan, set()) + _host_bytes(key, set())
        with self._lock:
            kept = self._plans.get(key)
            if kept is not None:  # another thread planned it meanwhile
                self._plans.move_to_end(key)
                return kept
            plan._cache_key = key
            self._plans[key] = plan
            self._bytes += plan._nbytes
            self._evict()
        return plan

    def grew(self, plan: RankPlan, nbytes: int) -> None:
        """Count ``nbytes`` more for ``plan`` (a device copy of one of its tensors)."""
        if nbytes == 0:
            return
        with self._lock:
            plan._nbytes += nbytes
            key = plan._cache_key
            if key is not None and self._plans.get(key) is plan:
                self._bytes += nbytes
                self._evict()

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._plans:
            _, plan = self._plans.popitem(last=False)
            self._bytes -= plan._nbytes
            self._evictions += 1

    def set_max_bytes(self, max_bytes: int) -> int:
        with self._lock:
            previous, self.max_bytes = self.max_bytes, max_bytes
            self._evict()
        return previous

    def cache_info(self) -> PlanCacheInfo:
        """Entries, bytes, bound, hits, misses and evictions."""
        with self._lock:
            return PlanCacheInfo(
                len(self._plans),
                self._bytes,
                self.max_bytes,
                self._hits,
                self._misses,
                self._evictions,
            )

    def cache_clear(self) -> None:
        """Drop every plan and reset the counters."""
        with self._lock:
            self._plans.clear()
            self._bytes = self._hits = self._misses = self._evictions = 0


plan_rank = _PlanCache(_plan_rank, DEFAULT_PLAN_CACHE_BYTES)


def set_plan_cache_bytes(max_bytes: int) -> int:
    """Bound :func:`plan_rank`'s cache at ``max_bytes`` bytes (the plans' index tensors
    and Python objects on the CPU plus their device copies; default
    ``DEFAULT_PLAN_CACHE_BYTES``, 256 MiB), dropping least recently used plans now if
    it holds more; 0 keeps no plan. Returns the previous bound."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
    return plan_rank.set_max_bytes(max_bytes)


def plan_cache_info() -> PlanCacheInfo:
    """Plans kept by :func:`plan_rank`'s cache, their bytes (host and device), its
    bound, hits, misses and evictions."""
    return plan_rank.cache_info()
