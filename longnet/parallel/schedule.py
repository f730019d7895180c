"""What one rank of sequence-parallel dilated attention computes, sends and receives.

:func:`plan_rank` turns a configuration (ranks, heads, patterns, causal, position
offset, the packed documents that cross a rank boundary) into a :class:`RankPlan`:
the local operator calls on this rank's rows, the per-pattern calls of segments that
lie partly here, and for every segment that spans ranks the rows this rank sends and
the operator call it makes on the rows it gathers (see
:mod:`longnet.parallel.attention` for how the operator runs a plan). Plans are
cached per configuration; their index tensors live on the CPU and are copied to the
device once (:func:`on_device`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor

from longnet.parallel.layout import HeadGroup, Segment, segment, segment_ranks

__all__ = ["Call", "Local", "RankPlan", "plan_rank", "on_device"]


@dataclass
class Call:
    """One operator call for the cross-rank rows of a segment on this rank."""

    pattern: int
    n_q: int  # this rank's query rows per head
    n_heads: int  # query heads |J|
    n_pairs: int  # exchanged (kv head, offset) pairs |U|
    q_start: int  # offset of its queries in the gathered queries
    pieces: tuple[tuple[bool, int, int], ...]  # keys in position order: (received?, start, rows)
    head_map: Tensor | None  # (|J|,) pair index per head; None when GQA maps it


@dataclass(frozen=True)
class Local:
    """One local operator call on this rank's rows ``[a, b)``: the rows of one sequence
    (or document fragment) whose first row sits at absolute position
    ``position_offset``, computed with the patterns ``ws``/``rs``; with ``packed``,
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
    partial: tuple[Local, ...]  # per-pattern calls of locally computed segments
    partial_pattern: tuple[int, ...]  # their pattern indices
    cross_patterns: tuple[int, ...]  # patterns that get a per-pattern result
    calls: list[Call]
    kv_index: Tensor  # rows sent (by destination), then own rows
    send_rows: tuple[int, ...]  # kv_index entries per destination
    recv_rows: tuple[int, ...]  # received entries per source
    q_index: Tensor  # query rows of all calls
    out_index: dict[int, Tensor]  # pattern -> output rows (partial, then calls)
    lse_index: dict[int, Tensor]  # pattern -> lse rows (same entries and order)
    exchange: bool  # whether the ranks exchange anything
    _device_cache: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        local = [
            f"[{p.a}, {p.b}): " + ("packed documents" if p.packed else str(list(zip(p.ws, p.rs))))
            for p in self.pieces
        ]
        return (
            f"RankPlan(local calls {local}, cross-rank patterns {list(self.cross_patterns)}, "
            f"partly local {[(i, p.a, p.b) for i, p in zip(self.partial_pattern, self.partial)]}, "
            f"{len(self.calls)} calls, rows sent {list(self.send_rows)}, "
            f"received {list(self.recv_rows)})"
        )


def on_device(plan: RankPlan, t: Tensor, device: torch.device) -> Tensor:
    """``t`` (one of ``plan``'s index tensors) on ``device``, cached per plan."""
    key = (id(t), device)
    hit = plan._device_cache.get(key)
    if hit is None:
        hit = plan._device_cache[key] = t.to(device)
    return hit


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
    """Record the rows this rank receives, sends and computes for the head groups of
    the cross-rank segment ``seg`` of the document starting at global token ``c``."""
    rank = cfg.rank
    me = rank - seg.first_rank
    for gi, g in enumerate(seg.groups):
        if g.counts[me] == 0:
            continue  # no queries here, and no rows to send
        key = (c, seg.pattern, seg.index, gi)
        kv_rows = _rows(seg, g, rank, cfg.chunk, [o for _, o in g.pairs], base)
        kvh = torch.tensor([hh for hh, _ in g.pairs])
        flat_kv = kv_rows * cfg.kv_heads + kvh
        ranks = [
            q for q in range(seg.first_rank, seg.last_rank + 1) if not cfg.is_causal or q <= rank
        ]
        ex.jobs.append((key, seg, g, ranks, flat_kv, base))
        for q in ranks:
            nq = g.counts[q - seg.first_rank]
            if q != rank and nq > 0:
                ex.recvs[q].append((key, nq * len(g.pairs)))
        # This rank's rows go to every later (causal) or other rank of the segment
        # that has queries in the group.
        for dst in range(seg.first_rank, seg.last_rank + 1):
            if (
                dst != rank
                and not (cfg.is_causal and dst < rank)
                and g.counts[dst - seg.first_rank] > 0
            ):
                ex.sends[dst].append((key, flat_kv))


def _plan_fragment(
    cfg: _Config, c: int, e: int, ex: _Exchanges, partial: list[tuple[int, Local]]
) -> tuple[Local, set[int]]:
    """This rank's part of the sequence (document) of global tokens ``[c, e)``: its
    local call with the patterns it holds whole, the per-pattern calls of the segments
    of crossing patterns that lie here whole (appended to ``partial``), the crossing
    segments' exchanges (recorded in ``ex``), and the crossing patterns."""
    chunk, rank = cfg.chunk, cfg.rank
    lo, hi, base = cfg.offset, cfg.offset + e - c, cfg.offset - c  # the document's frame
    r_lo, r_hi = rank * chunk, (rank + 1) * chunk
    first = base + rank * chunk  # absolute position of this rank's row 0
    fa, fb = max(c, r_lo) - r_lo, min(e, r_hi) - r_lo  # its rows here
    a_abs, b_abs = first + fa, first + fb
    kv_group = cfg.num_heads // cfg.kv_heads
    cross: set[int] = set()
    local_ws, local_rs = [], []
    for i, (w, r) in enumerate(zip(cfg.ws, cfg.rs)):
        s_a, s_b = a_abs // w, (b_abs - 1) // w
        crossing = [
            s
            for s in sorted({s_a, s_b})
            if segment_ranks(s, w, lo, hi, base, chunk)[3]
            > segment_ranks(s, w, lo, hi, base, chunk)[2]
        ]
        if not crossing:
            local_ws.append(w)
            local_rs.append(r)
            continue
        cross.add(i)
        s_lo = s_a + 1 if s_a in crossing else s_a
        s_hi = s_b - 1 if s_b in crossing else s_b
        if s_lo <= s_hi:
            pa, pb = max(s_lo * w, a_abs), min((s_hi + 1) * w, b_abs)
            partial.append((i, Local(pa - first, pb - first, (w,), (r,), pa)))
        for s in crossing:
            seg = segment(i, s, w, r, lo, hi, base, chunk, cfg.num_heads, kv_group)
            _plan_crossing_segment(cfg, seg, c, base, ex)
    return Local(fa, fb, tuple(local_ws), tuple(local_rs), a_abs), cross


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


def _index_calls(
    cfg: _Config,
    ex: _Exchanges,
    partial: list[tuple[int, Local]],
    cross_patterns: tuple[int, ...],
    own_pos: int,
):
    """The operator calls of the cross-rank segment groups and the flat indices they
    read and write: ``(calls, own kv rows, query rows, output rows, lse rows)``, the
    last two per crossing pattern (the partly local segments' rows first)."""
    rank, chunk, num_heads = cfg.rank, cfg.chunk, cfg.num_heads
    recv_start, pos = {}, 0
    for src in range(cfg.world):
        for key, size in ex.recvs[src]:
            recv_start[(key, src)] = pos
            pos += size
    calls, own_parts, q_parts = [], [], []
    out_parts: dict[int, list] = {i: [] for i in cross_patterns}
    lse_parts: dict[int, list] = {i: [] for i in cross_patterns}
    for i, part in partial:  # the locally computed segments come first
        local_rows = torch.arange(part.a, part.b)
        out_parts[i].append(local_rows.unsqueeze(1) * num_heads + torch.arange(num_heads))
        lse_parts[i].append(local_rows.unsqueeze(1) + torch.arange(num_heads) * chunk)
    q_pos = 0
    for key, seg, g, ranks, flat_kv, base in ex.jobs:
        q_rows = _rows(seg, g, rank, chunk, [j % seg.r for j in g.heads], base)
        heads = torch.tensor(g.heads)
        pieces_kv = []
        for src in ranks:
            rows = g.counts[src - seg.first_rank]
            if src == rank:
                pieces_kv.append((False, own_pos, rows))
                own_parts.append(flat_kv)
                own_pos += flat_kv.numel()
            elif rows > 0:
                pieces_kv.append((True, recv_start[(key, src)], rows))
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
                tuple(pieces_kv),
                None if uniform else torch.tensor(g.head_to_pair),
            )
        )
        q_flat = q_rows * num_heads + heads
        q_parts.append(q_flat)
        q_pos += q_flat.numel()
        out_parts[seg.pattern].append(q_flat)
        lse_parts[seg.pattern].append(heads * chunk + q_rows)
    return calls, own_parts, q_parts, out_parts, lse_parts


@lru_cache(maxsize=64)
def plan_rank(
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
    packed local call (its boundaries are filled in per call)."""
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
    cross: set[int] = set()
    pieces: list[Local] = []
    partial: list[tuple[int, Local]] = []
    for c, e in spans:
        if c < (rank + 1) * chunk and e > rank * chunk:  # the document has rows here
            piece, crossing = _plan_fragment(cfg, c, e, ex, partial)
            pieces.append(piece)
            cross |= crossing
    if docs is not None:
        pieces = _with_packed_call(cfg, pieces)
    ex.jobs.sort(key=lambda x: x[0])
    for lst in ex.sends + ex.recvs:
        lst.sort(key=lambda x: x[0])
    send_parts = [t for dst in range(world) for _, t in ex.sends[dst]]
    send_rows = tuple(sum(t.numel() for _, t in ex.sends[dst]) for dst in range(world))
    cross_patterns = tuple(sorted(cross))
    calls, own_parts, q_parts, out_parts, lse_parts = _index_calls(
        cfg, ex, partial, cross_patterns, sum(send_rows)
    )
    return RankPlan(
        tuple(pieces),
        tuple(p for _, p in partial),
        tuple(i for i, _ in partial),
        cross_patterns,
        calls,
        kv_index=_cat(send_parts + own_parts),
        send_rows=send_rows,
        recv_rows=tuple(sum(sz for _, sz in ex.recvs[src]) for src in range(world)),
        q_index=_cat(q_parts),
        out_index={i: _cat(v) for i, v in out_parts.items()},
        lse_index={i: _cat(v) for i, v in lse_parts.items()},
        exchange=exchange,
    )
